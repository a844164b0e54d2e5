"""Compare two `run.py` result dirs (same task and seed): the reproducibility check.

    python tools/experiments/pooling_learns/compare_learn.py results/learn/synthetic-a results/learn/synthetic-b

Prints a Markdown table of each quality metric in both runs and the absolute difference. Quality numbers
(validation loss, ROUGE, selection recall) should agree closely: same seed, same data, same updates;
DeepSpeed/torch CPU kernels are not bitwise deterministic across thread schedules, so small differences
are expected. Timings are listed for information only (the CPUs are shared).
"""

import json
import sys
from pathlib import Path

METRICS = [
    ("updates", "updates"),
    ("final_valid_loss", "valid loss"),
    ("rouge.rouge1", "ROUGE-1"),
    ("rouge.rouge2", "ROUGE-2"),
    ("rouge.rougeL", "ROUGE-L"),
    ("selection.recall", "selection recall"),
    ("step_s_median", "step s (log)"),
    ("step_s_bench", "step s (interleaved)"),
]


def get(row: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(row, dict) or part not in row:
            return None
        row = row[part]
    return row


def fmt(v) -> str:
    return "–" if v is None else f"{v:.4f}"


def compare(a: dict, b: dict) -> str:
    lines = [
        f"# reproducibility: task {a['task']}, seed {a['seed']} vs seed {b['seed']}",
        "",
        "| variant | metric | run A | run B | abs diff |",
        "|---|---|---|---|---|",
    ]
    for variant in a["variants"]:
        for key, name in METRICS:
            va, vb = get(a["variants"][variant], key), get(b["variants"].get(variant, {}), key)
            if va is None and vb is None:
                continue
            diff = abs(va - vb) if va is not None and vb is not None else None
            lines.append(f"| {variant} | {name} | {fmt(va)} | {fmt(vb)} | {fmt(diff)} |")
    return "\n".join(lines) + "\n"


def main(argv):
    if len(argv) != 2:
        sys.exit(__doc__)
    runs = [json.loads((Path(p) / "learn.json").read_text()) for p in argv]
    print(compare(*runs))


if __name__ == "__main__":
    main(sys.argv[1:])
