"""The experiment's report: targets, the Markdown table, the validation-loss plot (OUT/learn.{json,md,png})."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

#: variants whose encoder pools (selection recall means something for them)
POOLING_VARIANTS = ("transpooler", "pyramidion")


def machine() -> str:
    import platform

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} (load average {load:.1f} at report time)"


def check_targets(rows: dict, task: str) -> list[dict]:
    """The experiment's targets for the Pyramidion variant (synthetic task), each with its measured value."""
    if task != "synthetic" or "pyramidion" not in rows:
        return []
    pyr = rows["pyramidion"]
    checks = [
        ("ROUGE-L >= 0.9", pyr.get("rouge", {}).get("rougeL"), lambda v: v >= 0.9),
        ("selection recall >= 0.9", pyr.get("selection", {}).get("recall"), lambda v: v >= 0.9),
    ]
    block = rows.get("blockwise")
    if block and block.get("final_valid_loss") and pyr.get("final_valid_loss"):
        ratio = pyr["final_valid_loss"] / block["final_valid_loss"]
        checks.append(("valid loss <= 1.05 x blockwise", ratio, lambda v: v <= 1.05))
    for base in ("blockwise", "vanilla"):
        if base in rows and rows[base].get("step_s_bench") and pyr.get("step_s_bench"):
            ratio = pyr["step_s_bench"] / rows[base]["step_s_bench"]
            checks.append((f"step faster than {base} (interleaved bench)", ratio, lambda v: v < 1.0))
        if base in rows and rows[base].get("step_s_median") and pyr.get("step_s_median"):
            ratio = pyr["step_s_median"] / rows[base]["step_s_median"]
            checks.append((f"step faster than {base} (training log)", ratio, lambda v: v < 1.0))
    return [
        {"target": name, "value": value, "met": bool(value is not None and ok(value))} for name, value, ok in checks
    ]


def _fmt(value, spec=".3f", none="–"):
    return none if value is None else format(value, spec)


def markdown(result: dict) -> str:
    rows = result["variants"]
    lines = [
        f"# pooling learns — task `{result['task']}`",
        "",
        f"Machine: {result['machine']}. Seed {result['seed']}. Command: `{result['command']}`.",
        "",
        f"Corpus: {result['corpus']}",
        "",
        "| variant | encoder widths | updates | train wall s | step s (log median) | step s (interleaved) "
        "| tokens/s | valid loss (end) | ROUGE-1 | ROUGE-2 | ROUGE-L | selection recall | chance |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, r in rows.items():
        sel = r.get("selection") or {}
        if variant in POOLING_VARIANTS and sel:
            recall, chance = _fmt(sel.get("recall")), _fmt(sel.get("chance_recall"))
        elif sel:
            recall, chance = "1.000 (n/a: no pooling)", "1.000"
        else:
            recall, chance = "n/a", "n/a"
        rouge = r.get("rouge", {})
        updates = r.get("updates")
        if r.get("warmup"):
            updates = f"{sum(st.get('updates') or 0 for st in r['warmup'])} warm-up + {updates}"
        lines.append(
            f"| {variant} | {r.get('encoder_widths')} | {updates} | {_fmt(r.get('train_seconds'), '.0f')} "
            f"| {_fmt(r.get('step_s_median'))} | {_fmt(r.get('step_s_bench'))} "
            f"| {_fmt(r.get('tokens_per_s_median'), '.0f')} | {_fmt(r.get('final_valid_loss'))} "
            f"| {_fmt(rouge.get('rouge1'))} | {_fmt(rouge.get('rouge2'))} | {_fmt(rouge.get('rougeL'))} "
            f"| {recall} | {chance} |"
        )
    if result.get("targets"):
        lines += ["", "Targets (Pyramidion):", ""]
        lines += [
            f"- {'met' if t['met'] else 'NOT met'}: {t['target']} (measured {_fmt(t['value'])})"
            for t in result["targets"]
        ]
    cur = result.get("curriculum")
    if cur and cur.get("stages"):  # results of before the staged warm-up have no stages
        stages = ", ".join(f"{st['updates']} on {st['min_words']}-{st['max_words']}" for st in cur["stages"])
        lines += [
            "",
            f"Warm-up: each variant first trains in {len(cur['stages'])} stages of growing document length "
            f"(updates on words per document: {stages}; same task, same run config, "
            f"{cur['docs_per_update']} documents per update), each stage and then the main run starting from the "
            "previous one's weights with a fresh optimizer; `train wall s` and the plot's clock include the "
            "warm-up, the plot's updates count the main run only.",
        ]
    lines += [
        "",
        "Notes: `valid loss (end)` = teacher-forced label-smoothed CE per target token on the valid split, "
        "computed for each run's final weights (a run stopped by the time budget ends between two "
        "validations). ROUGE = F1 (rouge-score, stemmed) of beam search on the test split. Selection recall = "
        "share of the planted sentences' pieces whose representation dominates a real slot of the final "
        "encoder stage; `chance` = final slots / source pieces (what a random choice keeps). "
        "`step s (interleaved)` = fastest of N fwd+bwd+AdamW steps of each model on one real batch, the "
        "four models run in turn in one process (plain torch; medians in the JSON); `step s (log median)` = "
        "median seconds per update in the "
        "training runs (DeepSpeed engine, validation intervals included). The CPUs are shared with other "
        "jobs: timings are noisy.",
        "",
    ]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for variant, r in result["variants"].items():
        curve = r.get("valid_curve") or []
        if not curve:
            continue
        axes[0].plot([p["seconds"] for p in curve], [p["loss"] for p in curve], marker="o", ms=3, label=variant)
        axes[1].plot([p["update"] for p in curve], [p["loss"] for p in curve], marker="o", ms=3, label=variant)
    axes[0].set_xlabel("training wall clock (s)")
    axes[1].set_xlabel("update")
    for ax in axes:
        ax.set_ylabel("validation loss (label-smoothed CE)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"pooling learns, task {result['task']} ({result['machine_short']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(result: dict, out: Path) -> None:
    (out / "learn.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    (out / "learn.md").write_text(markdown(result), encoding="utf-8")
    plot(result, out / "learn.png")
