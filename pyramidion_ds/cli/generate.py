"""pyramidion-generate: consolidate a ZeRO checkpoint and run beam search (fairseq-generate flags).

    pyramidion-generate --consolidate RUN_DIR [--export-dir DIR] [--dtype fp32|bf16]
    pyramidion-generate RUN_OR_EXPORT_DIR --gen-subset test [--data DIR] [--beam 4 --lenpen 2 ...]
    pyramidion-generate RUN_OR_EXPORT_DIR --input docs.txt|docs.jsonl [--results-path OUT] [--explain 5]
    pyramidion-generate RUN_OR_EXPORT_DIR --gen-subset valid --selection-report selection.json

Launch with N processes (torchrun / deepspeed / srun) to split the inputs over N devices. The generation
flags are the fields of ``GenerationConfig`` (``--no-repeat-ngram-size`` = ``generation.no_repeat_ngram_size``);
a flag not given takes the value in the model's saved config, then the default.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from ..checkpoint.manifest import check_model_dir
from ..config import GenerationConfig
from ..config.core import build
from ..errors import UsageError
from .common import default_threads, run_main

PROG = "pyramidion-generate"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Summarize documents with a trained model: "
        "consolidate ZeRO shards, beam search with a KV cache, ROUGE.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("path", nargs="?", help="run directory (ZeRO checkpoints) or export directory")
    parser.add_argument(
        "--consolidate",
        metavar="RUN_DIR",
        help="only write the export dir of RUN_DIR's newest "
        "complete checkpoint (default RUN_DIR/export/<tag>) and exit",
    )
    parser.add_argument("--export-dir", help="where --consolidate writes the export")
    parser.add_argument(
        "--dtype",
        default="fp32",
        choices=("fp32", "bf16"),
        help="weights of a new export, and the compute dtype of generation (default fp32)",
    )
    parser.add_argument(
        "--input", help='documents to summarize: one per line, or jsonl with "document" (and "summary", "id")'
    )
    parser.add_argument("--data", help="binarized data dir for --gen-subset (default: the run's data.data)")
    parser.add_argument("--cpu", action="store_true", help="generate on the CPU even when CUDA is available")
    parser.add_argument("--no-progress-bar", action="store_true", help="no progress bar")
    parser.add_argument(
        "--selection-report",
        metavar="FILE",
        help="also write FILE (JSON): per pooling layer, the share of kept source pieces in the document's own "
        "reference against all pieces, the lead and another document's reference, with a 95%% interval "
        "(inputs with references; docs/pretraining.md)",
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    hints = typing.get_type_hints(GenerationConfig)
    for f in dataclasses.fields(GenerationConfig):
        if f.name == "progress":
            continue
        help_text = f"{f.metadata.get('help', '')} (default {f.default!r})"
        if hints[f.name] is bool:
            parser.add_argument(_flag(f.name), dest=f"gen_{f.name}", action="store_true", default=None, help=help_text)
        else:
            parser.add_argument(
                _flag(f.name),
                dest=f"gen_{f.name}",
                type=hints[f.name],
                default=None,
                metavar=f.name.upper(),
                help=help_text,
            )
    return parser


def generation_overrides(args: argparse.Namespace) -> dict:
    """The GenerationConfig fields given on the command line (validated now, before any work)."""
    overrides = {name[4:]: value for name, value in vars(args).items() if name.startswith("gen_") and value is not None}
    if args.no_progress_bar:
        overrides["progress"] = False
    build(GenerationConfig, overrides, prefix="generation.")
    return overrides


def main(argv: list[str] | None = None):
    def body():
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        # bad input fails here, before torch is imported (seconds on a loaded machine)
        if args.consolidate:
            check_model_dir(args.consolidate)
            from ..generate.runner import run_consolidate

            return run_consolidate(args.consolidate, args.export_dir, args.dtype)
        if not args.path:
            raise UsageError("give a run dir or export dir (or --consolidate RUN_DIR)")
        overrides = generation_overrides(args)
        check_model_dir(args.path)
        default_threads()  # before torch is imported
        from ..generate.runner import GenerateRequest, run_generation

        request = GenerateRequest(
            path=args.path, data=args.data or "", input=args.input or "", dtype=args.dtype, cpu=args.cpu
        )
        code = run_generation(request, overrides)
        if args.selection_report:
            from ..generate.selection import write_selection_report

            write_selection_report(request, overrides, args.selection_report)
        return code

    run_main(PROG, body)


if __name__ == "__main__":
    main()
