"""Does the pooling learn? The four encoder variants trained side by side; quality, selection recall, speed.

One command, end to end, for one task::

    corpus (synthetic: planted salient sentences | real: ../shared/data PubMed + QMSum, split here)
      └─ pyramidion-preprocess ──> OUT/data-bin (sentencepiece + shards)
      └─ synthetic: warm-up corpora of shorter documents, same vocabulary ──> OUT/data-bin-warmup-<k>
           └─ for each variant (vanilla, blockwise, transpooler, pyramidion), same config / seed / data /
              step budget: [warm-up stages k = 1.., shortest documents first, each from the previous
              one's weights: pyramidion-train ──> OUT/runs/<variant>.warmup-<k>]
              pyramidion-train (--train.init_from the last stage) ──> OUT/runs/<variant>   (tensorboard)
                └─ pyramidion-generate --gen-subset test (beam search) ──> OUT/generate/<variant> (ROUGE)
                └─ selection recall (synthetic): planted tokens whose representation dominates a slot
                   of the final pyramid stage (``EncoderOut.source_positions[mask]``)
      └─ step time: the four models' fwd+bwd+optimizer step on one real batch, interleaved A B C D A ...
      └─ OUT/learn.json, OUT/learn.md (tables + targets), OUT/learn.png (valid loss vs wall clock)

The run configs sit beside this file: ``configs/synthetic.yaml`` / ``configs/real.yaml`` (the variant, data
dir, save dir and seed are set here). Corpus, vocabulary and warm-up settings are :data:`TASKS`
(``--curriculum-updates 0`` skips the warm-up). The training budget is a number of updates (reproducible);
``--budget-minutes`` caps each variant's training wall clock, warm-up included (the trainer is sent SIGUSR1,
saves, and stops). The experiment uses the installed ``pyramidion_ds`` one way; the package never imports it.

    python tools/experiments/pooling_learns/run.py --task synthetic --out results/learn/synthetic --seed 1
    python tools/experiments/pooling_learns/run.py --task real --out results/learn/real --budget-minutes 10
    python tools/experiments/pooling_learns/run.py --report-only --out results/learn/synthetic  # re-render
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

from report import _fmt, check_targets, machine, markdown, write_report
from selection import measure_selection

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]  #: the repository: cwd of every subprocess, on their PYTHONPATH
CONFIGS = HERE / "configs"  #: the run config of each task, ``configs/<TaskSpec.config>.yaml``
PROG = "tools/experiments/pooling_learns/run.py"
VARIANTS = ("vanilla", "blockwise", "transpooler", "pyramidion")
EXIT_PREEMPTED = 75  # pyramidion_ds.errors.EXIT_PREEMPTED (kept literal: no torch import at --help)


@dataclass(frozen=True)
class Stage:
    """One warm-up stage: the same task at documents of ``min_words``..``max_words`` words."""

    min_words: int
    max_words: int
    train_docs: int  #: training documents (fewer than updates x docs_per_update: cycled)
    updates: int  #: updates on this stage's corpus


@dataclass(frozen=True)
class Curriculum:
    """Warm-up stages of growing document length, trained in order before the main corpus with the same run
    config. Each stage starts from the previous one's weights (``train.init_from``; the main run from the
    last stage's), with a fresh optimizer and lr warmup. Every variant gets the same warm-up, and its time
    counts against the variant's budget."""

    stages: tuple  #: :class:`Stage` s, shortest documents first
    valid_docs: int = 20  #: validation documents per stage
    docs_per_update: int = 4  #: batch = this many documents (data.max_sentences; data.max_tokens =
    #: this x the stage's longest source, padded)

    def scaled(self, updates: int) -> "Curriculum":
        """The same stages with ``updates`` updates each (``--curriculum-updates``)."""
        return replace(self, stages=tuple(replace(stage, updates=updates) for stage in self.stages))


@dataclass
class TaskSpec:
    """Corpus + vocabulary settings of one task (the run config lives in ``configs/<config>.yaml``)."""

    config: str  #: run config name, a file in :data:`CONFIGS`
    splits: dict  #: split -> number of documents (synthetic)
    min_words: int = 0  #: synthetic document length (words); ~1.0 piece per word
    max_words: int = 0
    num_salient: tuple = (2, 4)  #: planted sentences per document (inclusive range)
    spm_vocab_size: int = 1000
    spm_model_type: str = "bpe"
    spm_character_coverage: float = 1.0  #: digits are rare in the filler: keep every character
    budget_minutes: float = 30.0  #: default wall-clock cap per variant's training
    curriculum: Optional[Curriculum] = None


TASKS = {
    # documents of 2,080-2,460 pieces (>= 2,048), 2-4 planted sentences (summaries of 23-54 pieces)
    # 8,000 training documents: with 1,000 the models memorise summaries (train NLL 1.34 vs valid 1.52)
    # Warm-up in six stages of growing length, 4 documents per update (README.md here, "What it took"):
    # - 60-100 words: the whole document fits the 128 final slots, so the decoder learns to copy the planted
    #   sentences in order without depending on the scorer (trainer seeds 1 and 4: valid NLL 0.23 / 0.15 by
    #   update 1,500; at 200-300 words the copying transition came at 1,000-3,000 updates in some seeds and
    #   not by 8,000 in others)
    # - 200-300: the scorer learns to keep the planted pieces (128 of ~330 slots survive)
    # - 400-600 ... 1,600-2,000: sinusoidal positions the shorter stages never showed. A model that copies
    #   at 200-300 words fell to token accuracy 0.83 at 400-500 words and 0.64 at 1,500-1,700, and trained
    #   straight on 2,050-2,400 words went back to the template plateau; 300 updates a step kept it >= 0.96.
    "synthetic": TaskSpec(
        config="synthetic",
        splits={"train": 8000, "valid": 20, "test": 20},
        min_words=2050,
        max_words=2400,
        curriculum=Curriculum(
            stages=(
                Stage(60, 100, 4000, 2000),
                Stage(200, 300, 4000, 1000),
                Stage(400, 600, 1200, 300),
                Stage(700, 1000, 1200, 300),
                Stage(1100, 1500, 1200, 300),
                Stage(1600, 2000, 1200, 300),
            )
        ),
    ),
    # ../shared/data: 50 PubMed + 70 QMSum pairs; test/valid/train by position in each file
    "real": TaskSpec(
        config="real",
        splits={},
        spm_vocab_size=8000,
        spm_model_type="unigram",
        spm_character_coverage=0.9995,
        budget_minutes=10.0,
    ),
}
REAL_FILES = ("pubmed_sample.jsonl", "qmsum_sample.jsonl")


# --------------------------------------------------------------------------------------------------
# corpus + preprocessing
# --------------------------------------------------------------------------------------------------


def make_synthetic(
    raw_dir: Path, splits: dict, min_words: int, max_words: int, num_salient: tuple, seed: int
) -> dict[str, Path]:
    """The planted-sentence corpus at ``min_words``..``max_words`` words (the main one or a warm-up stage's)."""
    from pyramidion_ds.data.synthetic import write_corpus

    return write_corpus(
        raw_dir, splits, seed=seed, min_words=min_words, max_words=max_words, num_salient=tuple(num_salient)
    )


def split_of(position: int) -> str:
    """Deterministic split of the record at ``position`` in its file: every 10th test, the next valid."""
    return {0: "test", 1: "valid"}.get(position % 10, "train")


def make_real(raw_dir: Path, data_dir: Path) -> dict[str, Path]:
    """``../shared/data`` samples split by position in each file (no shuffling: any clone splits alike)."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    rows = {"train": [], "valid": [], "test": []}
    for name in REAL_FILES:
        path = data_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: real sample missing (see ../shared/data/README.md)")
        with open(path, encoding="utf-8") as fh:
            records = [json.loads(line) for line in fh if line.strip()]
        for position, record in enumerate(records):
            rows[split_of(position)].append(
                {"id": f"{path.stem}-{record['id']}", "document": record["document"], "summary": record["summary"]}
            )
    written = {}
    for split, items in rows.items():
        path = raw_dir / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in items), encoding="utf-8")
        written[split] = path
    return written


def subprocess_env(threads: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_logged(
    cmd: list[str], log_path: Path, env: dict, time_limit_s: Optional[float] = None
) -> tuple[int, float, bool]:
    """Run ``cmd`` with output to ``log_path``; (exit code, seconds, stopped by the time limit).

    Past ``time_limit_s`` the process gets SIGUSR1 (the trainer saves a checkpoint and exits 75)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    signalled = False
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        while proc.poll() is None:
            if time_limit_s is not None and not signalled and time.perf_counter() - started > time_limit_s:
                proc.send_signal(signal.SIGUSR1)
                signalled = True
            time.sleep(1.0)
    return proc.returncode, time.perf_counter() - started, signalled


def preprocess(
    raw: dict[str, Path], dest: Path, spec: TaskSpec, env: dict, log_dir: Path, spm_model: Optional[Path] = None
) -> dict:
    """pyramidion-preprocess of ``raw`` into ``dest``: a new sentencepiece model, or ``spm_model``'s."""
    files = ",".join(f"{split}={path}" for split, path in raw.items())
    cmd = [
        sys.executable,
        "-m",
        "pyramidion_ds.cli.preprocess",
        "--source-files",
        files,
        "--destdir",
        str(dest),
        "--quiet",
    ]
    cmd += (
        ["--spm-model", str(spm_model)]
        if spm_model
        else [
            "--spm-vocab-size",
            str(spec.spm_vocab_size),
            "--spm-model-type",
            spec.spm_model_type,
            "--spm-character-coverage",
            str(spec.spm_character_coverage),
        ]
    )
    log_path = log_dir / f"preprocess-{dest.name}.log"
    code, seconds, _ = run_logged(cmd, log_path, env)
    if code != 0:
        raise RuntimeError(f"pyramidion-preprocess failed (exit {code}); see {log_path}")
    lengths = {}
    for split in raw:
        header = json.loads((dest / f"{split}.source.json").read_text())
        lengths[split] = {
            "source": header["lengths"],
            "target": json.loads((dest / f"{split}.target.json").read_text())["lengths"],
            "examples": header["num_examples"],
        }
    return {"seconds": seconds, "lengths": lengths}


# --------------------------------------------------------------------------------------------------
# train, generate, read curves
# --------------------------------------------------------------------------------------------------


def config_path(spec: TaskSpec) -> Path:
    """The task's run config, beside this file (pyramidion-train and load_config take a YAML path)."""
    return CONFIGS / f"{spec.config}.yaml"


def run_config_args(
    spec: TaskSpec, variant: str, data_bin: Path, run_dir: Path, seed: int, extra: Sequence[str]
) -> list[str]:
    return [
        str(config_path(spec)),
        "--model.variant",
        variant,
        "--data.data",
        str(data_bin),
        "--train.save_dir",
        str(run_dir),
        "--train.seed",
        str(seed),
        *extra,
    ]


def load_run_config(spec: TaskSpec, variant: str, data_bin: Path, run_dir: Path, seed: int, extra: Sequence[str]):
    """The resolved run config that ``pyramidion-train`` gets from :func:`run_config_args`."""
    from pyramidion_ds.config import load_config

    config, *overrides = run_config_args(spec, variant, data_bin, run_dir, seed, extra)
    return load_config(config, overrides)


def train_variant(spec, variant, data_bin, run_dir, seed, extra, env, budget_minutes) -> dict:
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cmd = [
        sys.executable,
        "-m",
        "pyramidion_ds.cli.train",
        *run_config_args(spec, variant, data_bin, run_dir, seed, extra),
        "--no-resume",
    ]
    log_path = run_dir.parent / f"{run_dir.name}.train.log"
    code, seconds, stopped = run_logged(cmd, log_path, env, time_limit_s=budget_minutes * 60)
    if code not in (0, EXIT_PREEMPTED):
        raise RuntimeError(f"training {run_dir.name} failed (exit {code}); see {log_path}")
    return {"exit_code": code, "process_seconds": seconds, "stopped_by_time_budget": stopped}


def stage_args(cur: Curriculum, stage: Stage, prep: dict, pad_to_multiple: int) -> list[str]:
    """Run-config overrides of one warm-up stage (on top of the shared ones): its updates, and batches of
    ``cur.docs_per_update`` documents (a token budget that fits that many of its longest, padded)."""
    from pyramidion_ds.data.batching import padded_length

    longest = max(split["source"]["max"] for split in prep["lengths"].values())
    return [
        "--train.max_update",
        str(stage.updates),
        "--data.max_sentences",
        str(cur.docs_per_update),
        "--data.max_tokens",
        str(cur.docs_per_update * padded_length(longest, pad_to_multiple)),
    ]


def generate_variant(run_dir: Path, out_dir: Path, env: dict, gen_args: Sequence[str]) -> dict:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    cmd = [
        sys.executable,
        "-m",
        "pyramidion_ds.cli.generate",
        str(run_dir),
        "--gen-subset",
        "test",
        "--results-path",
        str(out_dir),
        "--cpu",
        "--no-progress-bar",
        *gen_args,
    ]
    code, seconds, _ = run_logged(cmd, out_dir.parent / f"{out_dir.name}.generate.log", env)
    if code != 0:
        raise RuntimeError(
            f"pyramidion-generate failed for {run_dir} (exit {code}); "
            f"see {out_dir.parent / f'{out_dir.name}.generate.log'}"
        )
    rouge = json.loads((out_dir / "rouge-test.json").read_text())
    return {
        "seconds": seconds,
        "rouge": {k: v["fmeasure"] for k, v in rouge.items() if isinstance(v, dict)},
        "documents": rouge.get("count"),
    }


def tensorboard_series(run_dir: Path) -> dict[str, list[tuple[int, float, float]]]:
    """tag -> [(update, wall_time, value)] from the run's event files, plus 't0' (writer creation)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, list] = {}
    files = sorted((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    t0 = None
    for events in files:
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        first = acc.FirstEventTimestamp()
        t0 = first if t0 is None else min(t0, first)
        for tag in acc.Tags()["scalars"]:
            series.setdefault(tag, []).extend((e.step, e.wall_time, e.value) for e in acc.Scalars(tag))
    for values in series.values():
        values.sort()
    series["t0"] = t0
    return series


def curve_summary(series: dict, offset_s: float = 0.0) -> dict:
    """Curves and speed of one training run; ``offset_s`` (the warm-up stages' training time) is added to
    the validation curve's clock and to ``train_seconds``."""
    t0 = series["t0"] - offset_s
    valid = [(step, wall - t0, value) for step, wall, value in series.get("valid/loss", [])]
    train = series.get("train/loss", [])
    # seconds per update between consecutive log lines (validation/checkpoint intervals included: median)
    step_s = [(w2 - w1) / (s2 - s1) for (s1, w1, _), (s2, w2, _) in zip(train, train[1:], strict=False) if s2 > s1]
    tokens = [v for _, _, v in series.get("train/tokens_per_s", [])]
    last_update = max([s for s, _, _ in train] + [s for s, _, _ in valid] + [0])
    return {
        "valid_curve": [{"update": s, "seconds": round(t, 3), "loss": v} for s, t, v in valid],
        "final_valid_loss": valid[-1][2] if valid else None,
        "best_valid_loss": min(v for _, _, v in valid) if valid else None,
        "updates": last_update,
        "train_seconds": (max(w for _, w, _ in train) - t0) if train else None,
        "step_s_median": statistics.median(step_s) if step_s else None,
        "tokens_per_s_median": statistics.median(tokens) if tokens else None,
        "final_train_loss": train[-1][2] if train else None,
    }


# --------------------------------------------------------------------------------------------------
# step time of the four models on one real batch, interleaved (shared CPUs drift: compare in one loop)
# --------------------------------------------------------------------------------------------------


def interleaved_step_time(
    spec: TaskSpec,
    data_bin: Path,
    seed: int,
    extra: Sequence[str],
    variants: Sequence[str],
    repeats: int = 5,
    warmup: int = 1,
) -> dict:
    import torch

    from pyramidion_ds.data import SummarizationDataset, collate
    from pyramidion_ds.engine import label_smoothed_nll_loss
    from pyramidion_ds.model import PyramidionModel

    models, batch = {}, None
    for variant in variants:
        cfg = load_run_config(spec, variant, data_bin, Path("unused"), seed, extra)
        cfg.model.vocab_size = json.loads((data_bin / "meta.json").read_text())["vocab_size"]
        torch.manual_seed(seed)
        model = PyramidionModel(cfg.model).train()
        models[variant] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4), cfg)
        if batch is None:
            m = cfg.model
            data = SummarizationDataset(str(data_bin), "train", m.max_source_positions, m.max_target_positions)
            pad = cfg.source_pad_multiple
            per_batch = max(1, cfg.data.max_tokens // m.max_source_positions)
            batch = collate(
                [data[i] for i in range(per_batch)],
                pad_id=m.pad_id,
                bos_id=m.bos_id,
                eos_id=m.eos_id,
                pad_to_multiple=pad,
            )

    def step(variant):
        model, opt, cfg = models[variant]
        logits = model(batch["src_tokens"], batch["src_lengths"], batch["prev_output_tokens"])
        loss, _ = label_smoothed_nll_loss(logits, batch["target"], cfg.train.label_smoothing, cfg.model.pad_id)
        (loss / batch["ntokens"]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = {v: [] for v in variants}
    for i in range(warmup + repeats):
        for variant in variants:
            start = time.perf_counter()
            step(variant)
            if i >= warmup:
                times[variant].append(time.perf_counter() - start)
    shape = list(batch["src_tokens"].shape)
    return {
        "batch_src_shape": shape,
        "tgt_len": int(batch["target"].shape[1]),
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        # the minimum: on a shared machine other jobs only ever add time to a step
        "step_s": {v: min(t) for v, t in times.items()},
        "step_s_median": {v: statistics.median(t) for v, t in times.items()},
        "step_s_all": {v: t for v, t in times.items()},
    }


# --------------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=tuple(TASKS), default="synthetic")
    p.add_argument("--out", required=True, help="results directory (corpus, data-bin, runs, generate, report)")
    p.add_argument("--seed", type=int, default=1, help="corpus seed and training seed (default %(default)s)")
    p.add_argument(
        "--budget-minutes",
        type=float,
        default=None,
        help="wall-clock cap on each variant's training (default: the task's, 30 synthetic / 10 real)",
    )
    p.add_argument("--max-update", type=int, default=None, help="step budget (default: the task config's)")
    p.add_argument(
        "--train-docs",
        type=int,
        default=None,
        help="synthetic: training documents (default: the task's, 8,000); fewer for a quick look",
    )
    p.add_argument(
        "--curriculum-updates",
        type=int,
        default=None,
        help="updates in each warm-up stage, the shorter documents trained before the main corpus "
        "(default: the task's; 0 = no warm-up)",
    )
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated (default: all four)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per process")
    p.add_argument("--real-data", default=str(ROOT.parent / "shared" / "data"), help="dir of the real samples")
    p.add_argument("--bench-repeats", type=int, default=15, help="interleaved step-time repeats; 0 = skip")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="keep the corpus, data-bin and finished runs in OUT (train only variants without a run)",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild OUT/learn.{json,md,png} from OUT/learn.json parts already measured",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run-config override for every variant, e.g. --set train.lr=0.002 (repeatable)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out).resolve()  # the subprocesses run in the repository, wherever this was started
    if args.report_only:
        result = json.loads((out / "learn.json").read_text())
        result["targets"] = check_targets(result["variants"], result["task"])
        write_report(result, out)
        print(markdown(result))
        return 0
    spec = TASKS[args.task]
    if args.train_docs is not None:
        if args.task != "synthetic" or args.train_docs < 1:
            raise SystemExit(
                f"{PROG}: error: --train-docs {args.train_docs}: expected a positive "
                "number, for --task synthetic (the real task's split is fixed)"
            )
        spec = replace(spec, splits={**spec.splits, "train": args.train_docs})
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"{PROG}: error: unknown variants {unknown}, expected {VARIANTS}")
    budget = args.budget_minutes if args.budget_minutes is not None else spec.budget_minutes
    cur = spec.curriculum
    if args.curriculum_updates is not None:
        if args.curriculum_updates < 0:
            raise SystemExit(f"{PROG}: error: --curriculum-updates {args.curriculum_updates}: expected >= 0")
        if args.curriculum_updates and cur is None:
            raise SystemExit(
                f"{PROG}: error: --curriculum-updates {args.curriculum_updates}: task "
                f"{args.task} has no warm-up corpus, expected 0"
            )
        cur = cur.scaled(args.curriculum_updates) if args.curriculum_updates else None
    extra = []
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"{PROG}: error: --set {item!r}: expected KEY=VALUE")
        extra += [f"--{key}", value]
    if args.max_update is not None:
        extra += ["--train.max_update", str(args.max_update)]
    real_data = Path(args.real_data)
    if args.task == "real" and not (args.reuse and (out / "data-bin" / "meta.json").is_file()):
        missing = [name for name in REAL_FILES if not (real_data / name).is_file()]
        if missing:
            raise SystemExit(
                f"{PROG}: error: --real-data {real_data}: no {' or '.join(missing)} there (the "
                "PubMed and QMSum samples of ../shared/data, beside the repository)"
            )
    env = subprocess_env(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    command = f"python {PROG} " + " ".join(argv if argv is not None else sys.argv[1:])
    started = time.perf_counter()

    raw_dir, data_bin = out / "corpus", out / "data-bin"
    if not (args.reuse and (data_bin / "meta.json").is_file()):
        print(f"[learn] corpus ({args.task}) -> {raw_dir}", flush=True)
        raw = (
            make_synthetic(raw_dir, spec.splits, spec.min_words, spec.max_words, spec.num_salient, args.seed)
            if args.task == "synthetic"
            else make_real(raw_dir, real_data)
        )
        if data_bin.exists():
            shutil.rmtree(data_bin)
        prep = preprocess(raw, data_bin, spec, env, logs)
        (out / "preprocess.json").write_text(json.dumps(prep, indent=1))
    prep = json.loads((out / "preprocess.json").read_text())
    warmups = []  # (stage, data-bin, preprocess summary) of each warm-up stage
    for k, stage in enumerate(cur.stages if cur else (), 1):
        stage_bin, stage_prep = out / f"data-bin-warmup-{k}", out / f"preprocess-warmup-{k}.json"
        if not (args.reuse and (stage_bin / "meta.json").is_file()):
            print(
                f"[learn] warm-up corpus {k}/{len(cur.stages)} ({stage.min_words}-{stage.max_words} words) -> "
                f"{out / f'corpus-warmup-{k}'}",
                flush=True,
            )
            raw = make_synthetic(
                out / f"corpus-warmup-{k}",
                {"train": stage.train_docs, "valid": cur.valid_docs},
                stage.min_words,
                stage.max_words,
                spec.num_salient,
                args.seed,
            )
            if stage_bin.exists():
                shutil.rmtree(stage_bin)
            stage_prep.write_text(
                json.dumps(preprocess(raw, stage_bin, spec, env, logs, spm_model=data_bin / "spm.model"), indent=1)
            )
        warmups.append((stage, stage_bin, json.loads(stage_prep.read_text())))

    result = {
        "benchmark": "learn",
        "task": args.task,
        "seed": args.seed,
        "command": command,
        "machine": machine(),
        "machine_short": f"{os.cpu_count()}-core CPU, shared",
        "budget_minutes_per_variant": budget,
        "task_spec": asdict(spec),
        "overrides": extra,
        "curriculum": asdict(cur) if cur else None,
        "preprocess": prep,
        "variants": {},
    }
    lengths = prep["lengths"]
    result["corpus"] = (
        f"{args.task}: "
        + ", ".join(f"{s} {v['examples']} docs" for s, v in lengths.items())
        + f"; test sources {lengths['test']['source']['min']}-{lengths['test']['source']['max']} "
        f"pieces (mean {lengths['test']['source']['mean']:.0f}), summaries "
        f"{lengths['test']['target']['min']}-{lengths['test']['target']['max']} pieces"
    )
    previous = {}
    if args.reuse and (out / "learn.json").is_file():
        previous = json.loads((out / "learn.json").read_text()).get("variants", {})
    for variant in variants:
        cfg = load_run_config(spec, variant, data_bin, out / "runs" / variant, args.seed, extra)
        run_dir = out / "runs" / variant
        row = {"encoder_widths": cfg.model.encoder_widths(), "max_update": cfg.train.max_update}
        finished = args.reuse and (run_dir / "checkpoints").is_dir() and any((run_dir / "tensorboard").rglob("events*"))
        if finished:  # keep what the earlier invocation measured about the training process
            row.update(
                {
                    k: v
                    for k, v in previous.get(variant, {}).items()
                    if k in ("exit_code", "process_seconds", "stopped_by_time_budget", "warmup")
                }
            )
        else:
            main_extra, left, row["warmup"] = list(extra), budget, []
            pad = cfg.source_pad_multiple
            for k, (stage, stage_bin, stage_prep) in enumerate(warmups, 1):
                stage_dir = out / "runs" / f"{variant}.warmup-{k}"
                print(
                    f"[learn] warm up {variant}: stage {k}/{len(warmups)}, {stage.updates} updates on "
                    f"{stage.min_words}-{stage.max_words}-word documents (cap {left:.3g} min)",
                    flush=True,
                )
                stage_extra = main_extra + stage_args(cur, stage, stage_prep, pad)
                done = train_variant(spec, variant, stage_bin, stage_dir, args.seed, stage_extra, env, left)
                done.update(curve_summary(tensorboard_series(stage_dir)))
                row["warmup"].append(
                    {
                        "words": [stage.min_words, stage.max_words],
                        **{
                            key: done[key]
                            for key in (
                                "exit_code",
                                "process_seconds",
                                "stopped_by_time_budget",
                                "updates",
                                "train_seconds",
                                "final_valid_loss",
                            )
                        },
                    }
                )
                main_extra = extra + ["--train.init_from", str(stage_dir)]
                left = max(left - done["process_seconds"] / 60, 0.1)
            print(f"[learn] train {variant} ({cfg.train.max_update} updates, cap {left:.3g} min)", flush=True)
            row.update(train_variant(spec, variant, data_bin, run_dir, args.seed, main_extra, env, left))
        warm_up_s = sum(st.get("train_seconds") or st.get("process_seconds") or 0.0 for st in row.get("warmup") or [])
        row.update(curve_summary(tensorboard_series(run_dir), offset_s=warm_up_s))
        end = valid_loss_at_end(run_dir)
        row["last_logged_valid_loss"] = row["final_valid_loss"]
        row["final_valid_loss"], row["final_valid_nll"] = end["loss"], end["nll_loss"]
        print(f"[learn] generate {variant}", flush=True)
        gen_dir = out / "generate" / variant
        if args.reuse and finished and (gen_dir / "rouge-test.json").is_file():
            rouge = json.loads((gen_dir / "rouge-test.json").read_text())
            gen = {
                "rouge": {k: v["fmeasure"] for k, v in rouge.items() if isinstance(v, dict)},
                "seconds": previous.get(variant, {}).get("generate_seconds"),
            }
        else:
            gen = generate_variant(run_dir, gen_dir, env, [])
        row["rouge"], row["generate_seconds"] = gen["rouge"], gen["seconds"]
        if args.task == "synthetic":
            row["selection"] = selection_for_run(run_dir, raw_dir / "test.jsonl", cfg)
        result["variants"][variant] = row
        print(
            f"[learn] {variant}: valid loss {_fmt(row['final_valid_loss'])} "
            f"ROUGE-L {_fmt(row['rouge'].get('rougeL'))}"
            + (f" recall {_fmt(row['selection']['recall'])}" if "selection" in row else ""),
            flush=True,
        )
        write_report(result, out)  # partial results survive an interruption
    if args.bench_repeats > 0:
        print("[learn] interleaved step time", flush=True)
        import torch

        torch.set_num_threads(args.threads)
        bench = interleaved_step_time(spec, data_bin, args.seed, extra, variants, repeats=args.bench_repeats)
        result["step_bench"] = {k: v for k, v in bench.items() if k not in ("step_s", "step_s_median")}
        for variant, seconds in bench["step_s"].items():
            result["variants"][variant]["step_s_bench"] = seconds
            result["variants"][variant]["step_s_bench_median"] = bench["step_s_median"][variant]
    result["targets"] = check_targets(result["variants"], args.task)
    result["total_seconds"] = time.perf_counter() - started
    result["machine"] = machine()
    write_report(result, out)
    print(markdown(result))
    return 0


def valid_loss_at_end(run_dir: Path, batch_docs: int = 2) -> dict:
    """Teacher-forced validation loss of the run's newest checkpoint (as the trainer computes it: label-
    smoothed CE summed over target tokens / tokens), so a run stopped by the time budget between two
    validations still gets a loss for the weights it ends with."""
    import torch

    from pyramidion_ds.checkpoint.export import export_for, load_export
    from pyramidion_ds.data import SummarizationDataset, collate
    from pyramidion_ds.engine import label_smoothed_nll_loss

    model, cfg, _ = load_export(export_for(run_dir))
    m = cfg.model
    data = SummarizationDataset(
        cfg.data.data,
        cfg.data.valid_subset,
        m.max_source_positions,
        m.max_target_positions,
        truncate=cfg.data.truncate_source,
    )
    pad = cfg.source_pad_multiple
    loss_sum = nll_sum = tokens = 0.0
    with torch.no_grad():
        for start in range(0, len(data), batch_docs):
            batch = collate(
                [data[i] for i in range(start, min(start + batch_docs, len(data)))],
                pad_id=m.pad_id,
                bos_id=m.bos_id,
                eos_id=m.eos_id,
                pad_to_multiple=pad,
            )
            logits = model(batch["src_tokens"], batch["src_lengths"], batch["prev_output_tokens"])
            loss, nll = label_smoothed_nll_loss(logits, batch["target"], cfg.train.label_smoothing, m.pad_id)
            loss_sum, nll_sum, tokens = loss_sum + float(loss), nll_sum + float(nll), tokens + float(batch["ntokens"])
    return {"loss": loss_sum / max(tokens, 1), "nll_loss": nll_sum / max(tokens, 1)}


def selection_for_run(run_dir: Path, test_jsonl: Path, cfg) -> dict:
    from pyramidion_ds.checkpoint.export import export_for, load_export

    model, run_cfg, spm = load_export(export_for(run_dir))
    records = [json.loads(line) for line in test_jsonl.read_text(encoding="utf-8").splitlines() if line.strip()]
    pad = run_cfg.source_pad_multiple
    return measure_selection(model, spm, records, pad)


if __name__ == "__main__":
    from pyramidion_ds.cli.common import run_main  # config, data and usage errors as one line, as every CLI

    run_main(PROG, main)
