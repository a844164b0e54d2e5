"""pyramidion-preprocess: sentencepiece + binarized mmap shards (fairseq-preprocess flags).

Exactly one input: ``--source-dataset NAME`` (Hugging Face, offline cache honoured), ``--source-files
train=PATH,...`` (jsonl/json/csv/parquet) or ``--tsv-dir DIR`` (the original release's
``<split>/in.tsv`` + ``expected.tsv``). Output: ``DESTDIR/spm.model``, ``spm.vocab``, per split and side
``<split>.<side>.{bin,idx,json}``, ``<split>.ids.json``, ``<split>.summaries.jsonl`` (the raw summaries
generation scores against) and, written last, ``meta.json``. All of it is written into ``DESTDIR.tmp-XXXX``
and renamed into place when complete; an existing DESTDIR is replaced only with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import signal
import sys

from ..errors import DataError, UsageError
from .common import fail, run_main

PROG = "pyramidion-preprocess"
#: exit code after SIGTERM, as a shell reports a process that SIGTERM ended (128 + 15): nothing was written,
#: so it is not EXIT_PREEMPTED (75, "saved, rerun to resume"); rerunning the command starts it again
EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(Exception):
    """SIGTERM arrived: unwind, so that the pool is stopped and the temporary directory removed."""


def _terminate(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the cleanup short
    raise Terminated


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"got {value}, expected an integer >= 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train or load a sentencepiece model and binarize documents and summaries "
        "into memory-mapped shards.",
        epilog="example: pyramidion-preprocess --source-files "
        "train=train.jsonl,valid=val.jsonl --destdir data-bin --spm-vocab-size 32000 --workers 8",
    )
    src = parser.add_argument_group("input (exactly one)")
    src.add_argument(
        "--source-dataset",
        metavar="NAME",
        help="Hugging Face dataset name or local dataset "
        "folder, loaded with datasets.load_dataset (HF_DATASETS_OFFLINE=1: cache only)",
    )
    src.add_argument("--dataset-config", metavar="NAME", help="configuration name of --source-dataset")
    src.add_argument(
        "--split-map",
        metavar="MAP",
        help="our split = theirs, e.g. train=train,valid=validation,test=test (default: those, absent ones skipped)",
    )
    src.add_argument(
        "--source-files",
        metavar="MAP",
        help="SPLIT=PATH,... of jsonl/json/csv/parquet files; splits: train, valid, test",
    )
    src.add_argument(
        "--tsv-dir",
        metavar="DIR",
        help="original release layout: DIR/{train,dev-0,test-A}/"
        "in.tsv (documents) and expected.tsv (summaries), one per line",
    )
    src.add_argument(
        "--document-column", default="document", help="column holding the document (default: %(default)s; e.g. article)"
    )
    src.add_argument(
        "--summary-column", default="summary", help="column holding the summary (default: %(default)s; e.g. abstract)"
    )
    src.add_argument(
        "--unlabeled",
        action="store_true",
        help="documents only (denoising pretraining); summaries are neither needed nor written",
    )
    out = parser.add_argument_group("output")
    out.add_argument(
        "--destdir",
        required=True,
        help="output directory; written beside it under a temporary name and renamed into place when complete",
    )
    out.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing data-bin at --destdir (kept "
        "until the new one is complete; a directory holding other files is never replaced)",
    )
    out.add_argument("--workers", type=_positive, default=1, help="tokenizer processes (default: %(default)s)")
    out.add_argument(
        "--max-source-positions",
        type=_positive,
        default=None,
        help="cut (or drop, with --no-truncate-source) longer documents; </s> included",
    )
    out.add_argument("--max-target-positions", type=_positive, default=None, help="cut longer summaries; </s> included")
    out.add_argument(
        "--truncate-source",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="truncate sources longer than --max-source-positions; --no-truncate-source "
        "drops them instead (counted) (default: on)",
    )
    out.add_argument("--quiet", action="store_true", help="no progress bars")
    spm = parser.add_argument_group("sentencepiece")
    spm.add_argument(
        "--spm-model",
        metavar="PATH",
        help="reuse this .model (needs ids bos=0 pad=1 eos=2 unk=3) instead of training one; or the "
        "tokenizer of a data dir or a pyramidion-import export dir (PEGASUS, BART: their own ids)",
    )
    spm.add_argument("--spm-vocab-size", type=_positive, default=32000, help="(default: %(default)s)")
    spm.add_argument("--spm-model-type", choices=("unigram", "bpe"), default="unigram", help="(default: %(default)s)")
    spm.add_argument("--spm-character-coverage", type=float, default=0.9995, help="(default: %(default)s)")
    spm.add_argument(
        "--spm-sample-size",
        type=_positive,
        default=2_000_000,
        help="training pieces sampled by sentencepiece (input_sentence_size) (default: %(default)s)",
    )
    spm.add_argument(
        "--spm-byte-fallback",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="spell characters outside the vocabulary as UTF-8 byte pieces, so any text round-trips "
        "(takes 256 pieces) (default: on when --spm-vocab-size has room for it, else off with a "
        "warning)",
    )
    spm.add_argument(
        "--spm-user-symbols", default="<mask>", help="comma-separated user-defined symbols (default: %(default)s)"
    )
    spm.add_argument(
        "--spm-sentinels",
        type=_positive,
        default=None,
        metavar="N",
        help="also add the N sentinel pieces <extra_id_0> ... <extra_id_N-1> that pretraining with "
        "data.task span_corruption needs (T5 uses 100) (default: none)",
    )
    return parser


def sources_from_args(args):
    from ..data.sources import file_sources, hub_sources, parse_mapping, tsv_sources

    chosen = [
        flag
        for flag, value in (
            ("--source-dataset", args.source_dataset),
            ("--source-files", args.source_files),
            ("--tsv-dir", args.tsv_dir),
        )
        if value
    ]
    if len(chosen) != 1:
        raise UsageError(
            "give exactly one input: --source-dataset, --source-files or --tsv-dir"
            + (f" (got {', '.join(chosen)})" if chosen else "")
        )
    if args.split_map and not args.source_dataset:
        raise UsageError("--split-map only applies to --source-dataset")
    columns = dict(document_column=args.document_column, summary_column=args.summary_column, unlabeled=args.unlabeled)
    if args.source_dataset:
        split_map = parse_mapping(args.split_map, "--split-map") if args.split_map else None
        return hub_sources(
            args.source_dataset, args.dataset_config, split_map, **columns
        ), f"dataset {args.source_dataset}"
    if args.source_files:
        return file_sources(parse_mapping(args.source_files, "--source-files"), **columns), f"files {args.source_files}"
    return tsv_sources(args.tsv_dir, args.unlabeled), f"tsv {args.tsv_dir}"


def main(argv: list[str] | None = None):
    def body():
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        from ..data.binarize import check_destdir, preprocess, summary_table, truncation_lines

        if not 0 < args.spm_character_coverage <= 1:  # also refuses nan
            raise UsageError(f"--spm-character-coverage: got {args.spm_character_coverage}, expected 0 < x <= 1")
        signal.signal(signal.SIGTERM, _terminate)
        try:
            check_destdir(args.destdir, args.overwrite)  # before reading a large input
            sources, describe = sources_from_args(args)
            spm_options = (
                {}
                if args.spm_model
                else dict(
                    vocab_size=args.spm_vocab_size,
                    model_type=args.spm_model_type,
                    character_coverage=args.spm_character_coverage,
                    sample_size=args.spm_sample_size,
                    byte_fallback=args.spm_byte_fallback,
                )
            )
            spm_options["user_symbols"] = tuple(s.strip() for s in args.spm_user_symbols.split(",") if s.strip())
            if args.spm_sentinels:
                if args.spm_model:
                    raise UsageError(
                        "--spm-sentinels adds pieces to a new vocabulary; with --spm-model the "
                        "vocabulary is given as it is"
                    )
                from ..data.denoise import SENTINEL_FORMAT

                spm_options["user_symbols"] += tuple(SENTINEL_FORMAT.format(k) for k in range(args.spm_sentinels))
            meta = preprocess(
                sources,
                args.destdir,
                spm_model=args.spm_model,
                spm_options=spm_options,
                max_source_positions=args.max_source_positions,
                max_target_positions=args.max_target_positions,
                truncate_source=args.truncate_source,
                unlabeled=args.unlabeled,
                workers=args.workers,
                progress=not args.quiet,
                describe=describe,
                overwrite=args.overwrite,
            )
        except DataError as err:
            raise UsageError(str(err)) from None
        except Terminated:
            fail(
                PROG,
                f"stopped by SIGTERM: worker processes stopped, temporary directory removed, "
                f"{args.destdir} left as it was",
                EXIT_TERMINATED,
            )
        print(
            f"{PROG}: wrote {args.destdir} (vocab {meta['vocab_size']}, {meta['dtype']}, spm {meta['spm_sha256'][:12]})"
        )
        for line in truncation_lines(meta):
            print(f"{PROG}: {line}")
        print(summary_table(meta))
        return 0

    run_main(PROG, body)


if __name__ == "__main__":
    main()
