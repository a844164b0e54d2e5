"""pyramidion-generate end to end: model, inputs, this rank's batches, merge, write, score, explain.

::

    run dir ──export_for (rank 0 consolidates once; cached as RUN/export/<tag>)──> export dir
    export dir ──load_export──> model (every rank holds the full model: no ZeRO at inference)
    inputs ──batches_for_rank──> rank r decodes batches r, r+N, r+2N, ... (no collective inside the loop)
    gather_object ──> rank 0: input order ──> hypotheses (+ fairseq-style log) ──> ROUGE ──> explain pages
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..checkpoint.export import DTYPES, export_for, load_export
from ..config import GenerationConfig, to_dict
from ..config.core import build
from ..data.spm import decode_text
from ..errors import UsageError
from .inputs import Example, Inputs, batches_for_rank, from_data_dir, from_file
from .rouge import format_rouge, rouge_scores
from .search import SearchOptions, generate

log = logging.getLogger(__name__)


@dataclass
class GenerateRequest:
    """What the command line asks for, beyond the generation config."""

    path: str  #: run dir or export dir
    data: str = ""  #: data dir for --gen-subset (default: the run's data.data)
    input: str = ""  #: text / jsonl file instead of a data dir
    dtype: str = "fp32"  #: compute dtype (and export dtype when consolidating)
    cpu: bool = False


@dataclass
class Result:
    index: int
    id: str
    source_length: int
    reference: Optional[str]
    hypotheses: list[dict]  #: nbest: {"text", "tokens", "score", "positional_scores"}


def search_options(gen: GenerationConfig, use_cache: bool = True) -> SearchOptions:
    return SearchOptions(
        beam=gen.beam,
        nbest=min(gen.nbest, gen.beam),
        lenpen=gen.lenpen,
        min_len=gen.min_len,
        max_len_a=gen.max_len_a,
        max_len_b=gen.max_len_b,
        no_repeat_ngram_size=gen.no_repeat_ngram_size,
        sampling=gen.sampling,
        temperature=gen.temperature,
        use_cache=use_cache,
        cuda_graph=not gen.no_cuda_graph,
    )


def collate_sources(
    batch: list[Example], pad_id: int, pad_to_multiple: int, max_width: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """B×S right-padded sources (S rounded up to ``pad_to_multiple`` as in training) and their lengths."""
    lengths = [len(e.source) for e in batch]
    width = max(lengths)
    if pad_to_multiple:
        width = min(-(-width // pad_to_multiple) * pad_to_multiple, max_width)
    tokens = torch.full((len(batch), width), pad_id, dtype=torch.long)
    for row, example in enumerate(batch):
        tokens[row, : len(example.source)] = torch.from_numpy(example.source)
    return tokens.to(device), torch.tensor(lengths, device=device)


def decode_batch(model, spm, batch: list[Example], gen: GenerationConfig, pad_to_multiple: int, device) -> list[Result]:
    cfg = model.cfg
    src_tokens, src_lengths = collate_sources(batch, cfg.pad_id, pad_to_multiple, cfg.max_source_positions, device)
    opts = search_options(gen)
    if gen.sampling:  # the seed depends on the batch's content only: any world size draws the same
        opts.generator = torch.Generator(device=device).manual_seed(gen.seed * 1_000_003 + batch[0].index)
    hypotheses = generate(model, src_tokens, src_lengths, opts)
    results = []
    for example, hyps in zip(batch, hypotheses, strict=True):
        nbest = []
        for h in hyps:
            body = [t for t in h.tokens if t != cfg.eos_id]
            nbest.append(
                {
                    "text": decode_text(spm, body),
                    "tokens": h.tokens,
                    "score": h.score,
                    "positional_scores": h.positional_scores,
                }
            )
        results.append(Result(example.index, example.id, len(example.source), example.reference, nbest))
    return results


def load_inputs(req: GenerateRequest, gen: GenerationConfig, cfg, spm, export_dir: Path) -> Inputs:
    max_src = cfg.model.max_source_positions
    if req.input:
        inputs = from_file(req.input, max_src, spm, cfg.model.eos_id)
    else:
        data_dir = req.data or cfg.data.data
        if not data_dir:
            raise UsageError("nothing to generate for: pass --input FILE, or --data DIR with --gen-subset")
        meta = json.loads((export_dir / "export.json").read_text()) if (export_dir / "export.json").is_file() else {}
        inputs = from_data_dir(data_dir, gen.gen_subset, max_src, spm, cfg.model.eos_id, meta, export_dir / "spm.model")
    if inputs.num_truncated:
        log.warning(
            f"truncated {inputs.num_truncated} of {len(inputs.examples)} sources to {max_src} tokens "
            f"(model.max_source_positions; longest was {max(inputs.original_lengths)})"
        )
    return inputs


def run_consolidate(run_dir: str, export_dir: Optional[str], dtype: str) -> int:
    from ..checkpoint.export import consolidate
    from ..logs import setup_logging

    setup_logging(0)
    print(consolidate(run_dir, export_dir, dtype))
    return 0


def run_generation(req: GenerateRequest, overrides: dict) -> int:
    """Generate for ``req`` with the model's saved ``generation`` config updated by ``overrides``."""
    from ..distributed.env import discover_world

    world = discover_world()
    distributed = world.world_size > 1
    if distributed:
        from ..distributed import init_distributed

        init_distributed()
    rank, world_size = world.rank, world.world_size
    from ..logs import setup_logging

    setup_logging(rank)
    device = torch.device("cpu")
    if torch.cuda.is_available() and not req.cpu:
        device = torch.device("cuda", world.local_rank % torch.cuda.device_count())
    if req.dtype not in DTYPES:
        raise UsageError(f"--dtype: got {req.dtype!r}, expected one of {', '.join(DTYPES)}")
    if overrides.get("explain") and not overrides.get("results_path"):
        raise UsageError("--explain needs --results-path (the pages are written there)")

    # rank 0 consolidates a run dir once; the others then find the cached export
    # (its error, if any, is shared so no rank waits for an export that will not come)
    export_dir, problem = None, None
    if rank == 0:
        try:
            export_dir = export_for(req.path, req.dtype)
        except UsageError as err:
            problem = str(err)
    if distributed:
        import torch.distributed as dist

        shared = [problem]
        dist.broadcast_object_list(shared, src=0)
        problem = shared[0]
    if problem:
        raise UsageError(problem)
    if export_dir is None:
        export_dir = export_for(req.path, req.dtype)
    model, cfg, spm = load_export(export_dir, device, DTYPES[req.dtype])
    gen = build(GenerationConfig, {**to_dict(cfg.generation), **overrides}, prefix="generation.")
    if gen.hard_topk:
        model.cfg.hard_topk = True
    inputs = load_inputs(req, gen, cfg, spm, export_dir)
    pad_to_multiple = cfg.source_pad_multiple
    batches = batches_for_rank(inputs.examples, gen.batch_size, gen.max_tokens, pad_to_multiple, rank, world_size)
    log.info(
        f"generating {len(inputs.examples)} sources in {len(batches)} batches on this rank "
        f"(world size {world_size}, {device}, {req.dtype}, beam {gen.beam})"
    )

    from tqdm import tqdm

    started = time.perf_counter()
    results: list[Result] = []
    with tqdm(
        total=sum(len(b) for b in batches),
        desc=f"generate[{rank}]" if distributed else "generate",
        unit="doc",
        disable=rank != 0 or not gen.progress,
        file=sys.stderr,
        dynamic_ncols=True,
    ) as bar:
        for batch in batches:
            results.extend(decode_batch(model, spm, batch, gen, pad_to_multiple, device))
            bar.update(len(batch))
    elapsed = time.perf_counter() - started

    if distributed:  # the only collective after the beam loops: each rank's results to rank 0
        import torch.distributed as dist

        gathered = [None] * world_size if rank == 0 else None
        dist.gather_object(results, gathered, dst=0)
        if rank == 0:
            results = [r for part in gathered for r in part]
    if rank == 0:
        results.sort(key=lambda r: r.index)
        name = Path(req.input).stem if req.input else gen.gen_subset
        write_outputs(results, gen, name, elapsed)
        if gen.explain:
            from .explain import write_explain_page

            pages = Path(gen.results_path) / f"explain-{name}"
            for result in results[: gen.explain]:
                example = inputs.examples[result.index]
                write_explain_page(
                    model,
                    spm,
                    example.source.tolist(),
                    pad_to_multiple,
                    pages / f"{result.index:06d}.html",
                    title=f"{name} #{result.index} ({result.id})",
                    hypothesis=result.hypotheses[0]["text"] if result.hypotheses else "",
                    reference=result.reference,
                )
            log.info(f"explain pages for {min(gen.explain, len(results))} documents in {pages}")
    if distributed:
        _barrier()
    return 0


def write_outputs(results: list[Result], gen: GenerationConfig, name: str, elapsed: float) -> Optional[dict]:
    """fairseq-style lines (S/T/H/D/P), the best hypothesis per line, ROUGE when references exist.

    References are scored as given (their newlines mark sentences for ROUGE-Lsum); in the line-oriented
    files a newline inside a reference becomes a space."""
    lines = []
    for r in results:
        if r.reference is not None:
            lines.append(f"T-{r.index}\t{_one_line(r.reference)}")
        for h in r.hypotheses:
            lines.append(f"H-{r.index}\t{h['score']:.4f}\t{h['text']}")
            lines.append("P-{}\t{}".format(r.index, " ".join(f"{p:.4f}" for p in h["positional_scores"])))
    best = [r.hypotheses[0]["text"] if r.hypotheses else "" for r in results]
    scores = None
    if results and all(r.reference is not None for r in results):
        scores = rouge_scores(best, [r.reference for r in results])
    summary = f"generated {len(results)} documents in {elapsed:.1f} s"
    if gen.results_path:
        out = Path(gen.results_path)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"generate-{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (out / f"{name}.hyp").write_text("".join(h.replace("\n", " ") + "\n" for h in best), encoding="utf-8")
        if scores is not None:
            (out / f"{name}.ref").write_text("".join(_one_line(r.reference) + "\n" for r in results), encoding="utf-8")
            (out / f"rouge-{name}.json").write_text(json.dumps(scores, indent=1), encoding="utf-8")
        log.info(f"{summary}; hypotheses in {out / f'{name}.hyp'}")
    else:
        print("\n".join(lines))
        log.info(summary)
    if scores is not None:
        print(f"{name}: {format_rouge(scores)}")
    return scores


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
