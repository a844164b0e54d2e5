"""pyramidion-bench generate --variants: the paper's comparison in miniature (tiny dims, one repeat)."""

import json

import pytest

from pyramidion_ds.bench import generate as bench
from pyramidion_ds.generate.search import SearchOptions, generate

ROW_FIELDS = (
    "encode_seconds",
    "decode_seconds",
    "seconds",
    "docs_per_s",
    "peak_memory_gib",
    "cross_attention_cache_bytes",
    "self_attention_cache_bytes",
    "encoder_width",
    "new_tokens",
)


def test_three_variants_same_weights_same_work_json_and_a_decode_profile(tmp_path, capsys):
    out = tmp_path / "generate.json"
    argv = "--variants pyramidion,blockwise,vanilla --preset debug --vocab 40 --src-lens 128 --batch 2 --beam 2"
    argv += f" --new-tokens 3 --repeats 1 --skip-exactness --memory-gib 4 --max-batch 3 --profile-decode --output {out}"
    assert bench.main(argv.split()) == 0
    report = json.loads(out.read_text())
    assert report == json.loads(capsys.readouterr().out)
    rows = {row["variant"]: row for row in report["comparison"]}
    assert list(rows) == ["pyramidion", "blockwise", "vanilla"]
    for variant, row in rows.items():
        assert all(field in row for field in ROW_FIELDS), (variant, row)
        assert row["new_tokens"] == 3 and row["repeats"] == 1 and "error" not in row
        others = [base for base in ("blockwise", "vanilla") if base != variant]
        assert all(f"speedup_vs_{base}" in row and f"speedup_vs_{base}" in row["largest_batch"] for base in others)
        assert row["largest_batch"]["batch"] == 3 and row["largest_batch"]["capped"]  # 4 GiB: the cap binds
    assert len({row["weights_checksum"] for row in rows.values()}) == 1  # one seed, shared parameters
    # the pyramid pools 128 -> 32 slots: a quarter of the others' cross-attention cache
    assert rows["pyramidion"]["encoder_width"] == 32 and rows["blockwise"]["encoder_width"] == 128
    assert rows["pyramidion"]["cross_attention_cache_bytes"] * 4 == rows["vanilla"]["cross_attention_cache_bytes"]
    profile = report["decode_profile"]
    assert profile["variant"] == "pyramidion" and profile["rows"] == 4 and profile["steps"] == 4
    parts = ("self_attention", "cross_attention", "ffn", "output_projection", "beam_bookkeeping")
    assert all(profile["ms_per_step"][part] > 0 for part in parts)
    assert not list(tmp_path.glob("*.tmp"))  # rewritten atomically


@pytest.mark.parametrize("flag", [["--memory-gib", "3"], ["--src-lens", "8192"], ["--profile-decode"]])
def test_comparison_flags_without_variants_are_refused(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(flag)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().endswith(f"error: {flag[0]}: only with --variants")


def test_first_step_decodes_one_row_per_source_and_the_search_is_unchanged():
    """Step 0's beams all hold <s>: one decoder row per source, its logits repeated over the beams."""
    model = bench.tiny_model(0)
    src, lengths = bench.tiny_sources(0)
    opts = SearchOptions(beam=4, nbest=4, min_len=1, max_len_b=3)
    uncached = generate(model, src, lengths, SearchOptions(**{**vars(opts), "use_cache": False}))
    rows, inner = [], model.decode_step
    model.decode_step = lambda prev, encoder_out, cache=None: (
        rows.append(prev.size(0)) or inner(prev, encoder_out, cache)
    )
    cached = generate(model, src, lengths, opts)
    assert rows[:2] == [3, 12]  # 3 sources, then 3 x 4 beams
    assert [[h.tokens for h in s] for s in cached] == [[h.tokens for h in s] for s in uncached]
