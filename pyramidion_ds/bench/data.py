"""pyramidion-bench data: binarization throughput and mmap reader memory.

Binarizes the two real samples (PubMed, QMSum in --shared-data) and a synthetic corpus with 1 and 2
tokenizer workers (the 1-worker run is the baseline) and reports documents/s and tokens/s (source +
target tokens written). Then serves random batches from the synthetic shard and from a copy grown 10×,
each in a fresh process, and reports resident memory: it should not grow with the corpus, because the
reader maps the file and touches only the examples it serves. The figure to read is the process's
anonymous memory (``RssAnon``); ``VmRSS`` also counts clean page-cache pages of the mapped file, which
the kernel maps in large folios around each read and reclaims under pressure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

#: default of --shared-data, relative to the working directory: the shared samples beside a checkout's root
SHARED_DATA = "../shared/data"
SHARED_SAMPLES = ("pubmed_sample.jsonl", "qmsum_sample.jsonl")


def _rss_kib() -> dict:
    fields = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0])
    return fields


def reader_probe(prefix: str, batches: int, batch_size: int, seed: int = 0) -> dict:
    """Open a shard, serve ``batches`` random batches through ``collate``; memory before and after (MiB)."""
    import torch  # noqa: F401  (import cost paid before the first measurement)

    from pyramidion_ds.data.dataset import collate
    from pyramidion_ds.data.indexed import ShardReader

    before = _rss_kib()
    reader = ShardReader(prefix)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    served = 0
    for _ in range(batches):
        picks = rng.integers(0, len(reader), batch_size)
        samples = [
            {"id": int(i), "source": torch.from_numpy(reader[int(i)]), "target": torch.from_numpy(reader[int(i)][:64])}
            for i in picks
        ]
        served += int(collate(samples)["src_tokens"].numel())
    seconds = time.perf_counter() - start
    after = _rss_kib()

    def mib(kib):
        return round(kib / 1024, 1)

    return {
        "examples": len(reader),
        "file_mib": round(os.path.getsize(prefix + ".bin") / 2**20, 1),
        "rss_before_mib": mib(before["VmRSS"]),
        "rss_after_mib": mib(after["VmRSS"]),
        "rss_growth_mib": mib(after["VmRSS"] - before["VmRSS"]),
        "anon_growth_mib": mib(after["RssAnon"] - before["RssAnon"]),
        "file_backed_growth_mib": mib(after["RssFile"] - before["RssFile"]),
        "batches_per_s": round(batches / seconds, 1),
        "padded_tokens_served": served,
    }


def grow_shard(prefix: Path, out_prefix: Path, times: int) -> None:
    """A shard holding ``times`` copies of ``prefix`` (same header, more examples), without tokenizing."""
    from pyramidion_ds.data.indexed import shard_paths

    src, dst = shard_paths(prefix), shard_paths(out_prefix)
    offsets = np.fromfile(src["idx"], dtype=np.int64)
    total = int(offsets[-1])
    with open(dst["bin"], "wb") as out:
        data = src["bin"].read_bytes()
        for _ in range(times):
            out.write(data)
    grown = np.concatenate([offsets[:1]] + [offsets[1:] + k * total for k in range(times)])
    grown.tofile(dst["idx"])
    header = json.loads(src["json"].read_text())
    header.update(num_examples=len(grown) - 1, num_tokens=int(grown[-1]))
    dst["json"].write_text(json.dumps(header))


def time_binarize(source_fn, destdir: Path, spm_model: Path, workers: int) -> dict:
    from pyramidion_ds.data.binarize import preprocess
    from pyramidion_ds.data.indexed import ShardReader

    sources = source_fn()
    start = time.perf_counter()
    meta = preprocess(
        sources, destdir, spm_model=str(spm_model), workers=workers, progress=False, overwrite=True
    )  # a rerun with --workdir replaces the last one
    seconds = time.perf_counter() - start
    docs = sum(info["counts"]["examples"] for info in meta["splits"].values())
    tokens = sum(
        int(ShardReader(destdir / f"{split}.{side}").sizes.sum())
        for split, info in meta["splits"].items()
        for side in info["sides"]
    )
    return {
        "workers": workers,
        "seconds": round(seconds, 2),
        "docs": docs,
        "tokens": tokens,
        "docs_per_s": round(docs / seconds, 1),
        "tokens_per_s": round(tokens / seconds),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyramidion-bench data", description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic-docs", type=int, default=2000)
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts (first = baseline)")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument(
        "--shared-data",
        default=SHARED_DATA,
        help="directory holding the real samples (pubmed_sample.jsonl, qmsum_sample.jsonl), relative "
        "to the working directory; '' benchmarks the synthetic corpus alone (default %(default)s)",
    )
    parser.add_argument("--scale", type=int, default=10, help="growth factor for the reader memory check")
    parser.add_argument("--reader-batches", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workdir", default=None, help="keep outputs here (default: a temp dir)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    shared = Path(args.shared_data) if args.shared_data else None
    if shared is not None and not any((shared / name).is_file() for name in SHARED_SAMPLES):
        from ..errors import UsageError

        raise UsageError(
            f"--shared-data: no {' or '.join(SHARED_SAMPLES)} in '{shared}' (resolved against "
            f"{Path.cwd()}); give the directory that holds them, or --shared-data '' for the synthetic "
            f"corpus alone"
        )

    from pyramidion_ds.data.sources import file_sources
    from pyramidion_ds.data.spm import train_spm
    from pyramidion_ds.data.synthetic import write_corpus

    workers = [int(w) for w in args.workers.split(",")]
    tmp = tempfile.TemporaryDirectory(prefix="pyramidion-bench-data-") if args.workdir is None else None
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)

    corpora = {}
    t0 = time.perf_counter()
    synthetic = write_corpus(work / "raw", {"train": args.synthetic_docs})["train"]
    corpora["synthetic"] = str(synthetic)
    for sample in SHARED_SAMPLES if shared is not None else ():
        path = shared / sample
        if path.is_file():
            corpora[sample.removesuffix("_sample.jsonl")] = str(path)
    make_seconds = time.perf_counter() - t0

    # one joined vocabulary over everything (the real text gives it room beyond the synthetic words)
    def texts():
        for path in corpora.values():
            for line in open(path, encoding="utf-8"):
                row = json.loads(line)
                yield row["document"]
                yield row["summary"]

    t0 = time.perf_counter()
    spm_model = train_spm(
        texts(), work / "spm", vocab_size=args.vocab_size, sample_size=300_000, num_threads=max(workers)
    )
    spm_seconds = time.perf_counter() - t0

    results = {
        "suite": "data",
        "cpu_count": os.cpu_count(),
        "vocab_size": args.vocab_size,
        "spm_train_seconds": round(spm_seconds, 1),
        "synthetic_write_seconds": round(make_seconds, 1),
        "binarize": {},
    }
    for name, path in corpora.items():
        runs = [
            time_binarize(lambda path=path: file_sources({"train": path}), work / f"bin-{name}-{w}", spm_model, w)
            for w in workers
        ]
        for run in runs[1:]:
            run["speedup_vs_baseline"] = round(runs[0]["seconds"] / run["seconds"], 2)
        results["binarize"][name] = runs

    base = work / f"bin-synthetic-{workers[0]}" / "train.source"
    grown = work / "grown.source"
    grow_shard(base, grown, args.scale)
    probe = {}
    for label, prefix in (("1x", base), (f"{args.scale}x", grown)):
        code = (
            f"import json; from pyramidion_ds.bench.data import reader_probe; print(json.dumps(reader_probe("
            f"{str(prefix)!r}, {args.reader_batches}, {args.batch_size})))"
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        probe[label] = json.loads(proc.stdout.strip().splitlines()[-1])
    big = probe[f"{args.scale}x"]
    probe["anon_growth_ratio"] = round(big["anon_growth_mib"] / max(probe["1x"]["anon_growth_mib"], 0.1), 2)
    probe["note"] = (
        "anon = memory the process owns (flat); file-backed = shared, clean page-cache pages of the "
        "mapped shard that the kernel maps around each read (large folios), reclaimable and never "
        "more than the pages near what was read"
    )
    results["mmap_reader"] = probe
    print(json.dumps(results, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
