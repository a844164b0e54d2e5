"""pyramidion-bench train: the statistics of interleaved step times (pure functions, fixed inputs) and one
tiny real run whose JSON carries them."""

import json
import os
import subprocess
import sys

import pytest

from pyramidion_ds.bench.train import (
    SPREAD_LIMIT,
    add_speedups,
    interleaved_times,
    pair_ratios,
    spread,
    summary_lines,
    untrustworthy,
)


def test_spread_is_median_quartiles_and_a_limit():
    steady = spread([1.0, 1.02, 0.98, 1.01, 0.99, 1.0, 1.03, 0.97])
    assert steady["median"] == pytest.approx(1.0) and steady["n"] == 8
    assert steady["range"] == [0.97, 1.03] and steady["trustworthy"]
    assert steady["iqr"] == pytest.approx([0.9875, 1.0125])
    # a busy machine: a third of the steps take twice as long
    busy = spread([1.0, 2.0, 1.0, 1.0, 2.1, 1.0, 1.9, 1.0, 1.0])
    assert busy["median"] == 1.0 and busy["relative_iqr"] > SPREAD_LIMIT and not busy["trustworthy"]
    assert not spread([1.0, 1.0, 1.0])["trustworthy"]  # too few to tell a spread


def test_pairs_cancel_load_that_hits_both_sides():
    # the load doubles every step's time from step 3 on: the medians of the two variants move, the pairs do not
    base = [2.0, 2.0, 4.0, 4.0, 4.0, 2.0]
    mine = [1.0, 1.0, 2.0, 2.0, 2.0, 1.0]
    assert spread(pair_ratios(base, mine)) == spread([2.0] * 6)
    assert spread(pair_ratios(base, mine))["trustworthy"] and not spread(base)["trustworthy"]
    with pytest.raises(ValueError, match="as many steps"):
        pair_ratios([1.0], [1.0, 2.0])


class Recorder:
    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def step(self):
        self.calls.append(self.name)
        return float(len(self.calls))


def test_variants_take_turns_and_the_order_reverses_each_round():
    calls = []
    times = interleaved_times([Recorder("a", calls), Recorder("b", calls)], steps=5, block=2)
    assert "".join(calls) == "aabbbbaaab"
    assert [len(t) for t in times] == [5, 5]


def rows_of(times: dict) -> list[dict]:
    return [
        {
            "variant": variant,
            "zero_stage": 2,
            "src_len": 64,
            "compile": False,
            "overflow_check": True,
            "interleaved": True,
            "step_times_s": steps,
            "step_s_spread": spread(steps),
            "tokens_per_s": 1 / spread(steps)["median"],
        }
        for variant, steps in times.items()
    ]


def test_speedup_comes_from_pairs_and_a_wide_spread_is_flagged():
    rows = rows_of({"blockwise": [2.0, 4.0, 2.0, 4.0], "pyramidion": [1.0, 2.0, 1.0, 2.0]})
    add_speedups(rows)
    assert rows[1]["speedup_vs_blockwise"] == 2.0 and rows[1]["speedup_vs_blockwise_spread"]["iqr"] == [2.0, 2.0]
    lines = untrustworthy(rows)  # the step times swing by 2x; the ratio holds
    assert lines == [
        f"{v} zero2 src_len 64: step time spread too large to trust: IQR 67% of the median over 4 "
        "(limit 10%, at least 4)"
        for v in ("blockwise", "pyramidion")
    ]
    assert not rows[0]["trustworthy"] and not rows[1]["trustworthy"]
    assert summary_lines(rows)[1] == (
        "pyramidion zero2 src_len 64: step 1.5 s (IQR 1-2, 4 steps), 2.000x blockwise (IQR 2.000-2.000) "
        "[spread too large to trust]"
    )
    steady = rows_of({"blockwise": [2.0, 2.0, 2.1, 2.0], "pyramidion": [1.0, 1.0, 1.0, 1.05]})
    add_speedups(steady)
    assert untrustworthy(steady) == [] and all(row["trustworthy"] for row in steady)


def test_tiny_run_reports_medians_spreads_and_trust(tmp_path):
    out = tmp_path / "train.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pyramidion_ds.cli.bench", "train", "--preset", "debug", "--src-len", "64"]
        + ["--tgt-len", "8", "--batch", "1", "--steps", "4", "--warmup", "1", "--vocab", "100"]
        + ["--variants", "blockwise", "pyramidion", "--output", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result == json.loads(out.read_text())
    assert result["interleave"] and result["spread_limit"] == SPREAD_LIMIT
    blockwise, pyramidion = result["rows"]
    for row in (blockwise, pyramidion):
        assert row["interleaved"] and len(row["step_times_s"]) == 4
        assert row["step_s"] == row["step_s_spread"]["median"]
    ratios = pair_ratios(blockwise["step_times_s"], pyramidion["step_times_s"])
    assert pyramidion["speedup_vs_blockwise"] == pytest.approx(spread(ratios)["median"], rel=1e-4)
    assert result["trustworthy"] == (not result["untrustworthy"])
    assert "pyramidion-bench train: pyramidion zero2 src_len 64: step " in proc.stderr
