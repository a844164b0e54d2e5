"""Beam search vs exhaustive search, KV cache vs none, n-gram blocking, sampling, ROUGE, explain page."""

import html.parser
import math

import pytest
import torch

from pyramidion_ds.bench.generate import EXACTNESS_SETTINGS, tiny_model, tiny_sources
from pyramidion_ds.checkpoint.export import write_safetensors
from pyramidion_ds.generate.explain import render_page, write_explain_page
from pyramidion_ds.generate.rouge import ROUGE_TYPES, rouge_scores, split_sentences
from pyramidion_ds.generate.search import SearchOptions, exhaustive_search, generate


@pytest.mark.parametrize("setting", EXACTNESS_SETTINGS)
def test_beam_search_equals_exhaustive_search(setting):
    model = tiny_model(0)
    src, lengths = tiny_sources(0)
    opts = SearchOptions(beam=85, nbest=5, max_len_a=0.0, max_len_b=3, **setting)  # 85 = every sequence
    beam, exact = generate(model, src, lengths, opts), exhaustive_search(model, src, lengths, opts)
    for x, y in zip(beam, exact, strict=True):
        assert [h.tokens for h in x] == [h.tokens for h in y]
        assert [h.score for h in x] == pytest.approx([h.score for h in y], abs=1e-5)
        assert sum(x[0].positional_scores) / len(x[0].tokens) ** opts.lenpen == pytest.approx(x[0].score, abs=1e-5)


def test_kv_cache_changes_nothing_and_lengths_are_respected():
    model = tiny_model(1)
    src, lengths = tiny_sources(1)
    opts = SearchOptions(beam=3, nbest=3, min_len=2, max_len_a=0.5, max_len_b=1)
    cached = generate(model, src, lengths, opts)
    opts.use_cache = False
    plain = generate(model, src, lengths, opts)
    assert [[h.tokens for h in s] for s in cached] == [[h.tokens for h in s] for s in plain]
    for hyps, n in zip(cached, lengths.tolist(), strict=True):
        assert len(hyps) == 3
        for h in hyps:
            assert h.tokens[-1] == 2 and 2 not in h.tokens[:-1]
            assert 2 <= len(h.tokens) - 1 <= int(0.5 * n + 1)
            assert 0 not in h.tokens and 1 not in h.tokens


@pytest.mark.parametrize("sampling", [False, True])
def test_static_cache_gives_the_same_hypotheses(sampling):
    """The fixed-shape cache (the CUDA-graph path, run eagerly here) decodes exactly as the growing one,
    including sources that finish at different steps (the cache shrinks and drops their rows)."""
    model = tiny_model(1)
    src, lengths = tiny_sources(1)
    results = []
    for static in (False, True):
        opts = SearchOptions(
            beam=3,
            nbest=3,
            min_len=1,
            max_len_a=0.5,
            max_len_b=1,
            sampling=sampling,
            static_cache=static,
            generator=torch.Generator().manual_seed(0),
        )
        results.append(generate(model, src, lengths, opts))
    dynamic, static = results
    assert [[h.tokens for h in s] for s in static] == [[h.tokens for h in s] for s in dynamic]
    for x, y in zip(static, dynamic, strict=True):
        assert [h.score for h in x] == pytest.approx([h.score for h in y], abs=1e-5)
    assert len({len(s[0].tokens) for s in dynamic}) > 1  # sources did finish at different lengths


def test_no_repeat_ngram_blocking():
    model = tiny_model(0)
    src, lengths = tiny_sources(0)
    hyps = generate(model, src, lengths, SearchOptions(beam=4, min_len=8, max_len_b=10, no_repeat_ngram_size=2))
    for (h,) in hyps:
        grams = list(zip(h.tokens, h.tokens[1:], strict=False))
        assert len(grams) == len(set(grams)), h.tokens


def test_sampling_is_seeded():
    model = tiny_model(0)
    src, lengths = tiny_sources(0)

    def draw(seed):
        opts = SearchOptions(
            beam=4, nbest=4, sampling=True, temperature=1.5, max_len_b=6, generator=torch.Generator().manual_seed(seed)
        )
        return [[h.tokens for h in s] for s in generate(model, src, lengths, opts)]

    assert draw(3) == draw(3)
    assert all(len(s) >= 1 for s in draw(3))


def test_rouge_self_is_one_and_matches_the_library():
    from rouge_score import rouge_scorer

    hyp = "The cats were running home. Dogs barked at them!\nThen it rained."
    ref = "A cat ran home. The dogs were barking. It rained later."
    assert split_sentences(hyp) == "The cats were running home.\nDogs barked at them!\nThen it rained."
    self_scores = rouge_scores([hyp], [hyp])
    for t in ROUGE_TYPES:
        assert self_scores[t]["fmeasure"] == pytest.approx(1.0)
    ours = rouge_scores([hyp, ref], [ref, ref])
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    lib = [scorer.score(ref, hyp), scorer.score(ref, ref)]
    for t in ("rouge1", "rouge2", "rougeL"):
        assert ours[t]["fmeasure"] == pytest.approx((lib[0][t].fmeasure + lib[1][t].fmeasure) / 2)
    lsum = scorer.score(split_sentences(ref), split_sentences(hyp))["rougeLsum"].fmeasure
    assert ours["rougeLsum"]["fmeasure"] == pytest.approx((lsum + 1.0) / 2)
    assert 0 < ours["rouge1"]["recall"] < 1


class _SpanCounter(html.parser.HTMLParser):
    VOID = {"meta", "br", "img", "hr", "input", "link"}

    def __init__(self):
        super().__init__()
        self.stack, self.tokens, self.errors = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "span" and "tok" in attrs.get("class", "").split():
            assert "background" in attrs["style"] and attrs["data-stage"].isdigit()
            self.tokens.append(int(attrs["data-stage"]))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


class _Pieces:
    def IdToPiece(self, i):
        return ["<s>", "<pad>", "</s>", "<unk>", "\u2581a<b>", "&c", "\u2581d"][i]


def test_explain_page_is_valid_html_with_one_span_per_token(tmp_path):
    model = tiny_model(0)
    src, lengths = tiny_sources(0)
    ids = src[0, : int(lengths[0])].tolist()
    path = write_explain_page(
        model, _Pieces(), ids, 8, tmp_path / "p.html", title="doc <0>", hypothesis="a & b", reference=None
    )
    parser = _SpanCounter()
    parser.feed(path.read_text())
    parser.close()
    assert not parser.errors and parser.stack == []
    assert len(parser.tokens) == len(ids)
    stages = len(model.encode(src[:1, :16], lengths[:1]).pooling)
    assert max(parser.tokens) == stages and min(parser.tokens) == 0
    for num_stages, words in ((1, "(1 top-k pooling)"), (3, "(3 top-k poolings)")):
        assert words in render_page(["a"], [0], [0.5], num_stages, title="t", hypothesis="h", reference=None)


def test_streamed_safetensors_round_trip(tmp_path):
    from safetensors.torch import load_file

    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7), "c": torch.randn(2, 2, 2)}
    write_safetensors(tmp_path / "m.safetensors", tensors, torch.bfloat16, {"tag": "x"})
    back = load_file(str(tmp_path / "m.safetensors"))
    assert back["a"].dtype == torch.bfloat16 and back["b"].dtype == torch.int64
    torch.testing.assert_close(back["a"], tensors["a"].bfloat16())
    assert torch.equal(back["b"], tensors["b"]) and math.isclose(
        float(back["c"].float().sum()), float(tensors["c"].bfloat16().float().sum())
    )


def test_gen_subset_and_input_score_against_the_same_raw_summaries(shared_data, tmp_path, caplog, capsys):
    """References of a binarized split are the raw summaries preprocess kept, not the decoded targets
    (cut to max_target_positions, and ⁇ where the vocabulary cannot spell a character): the same
    hypotheses get the same ROUGE from --gen-subset as from --input on the same jsonl."""
    import json

    from pyramidion_ds.config import GenerationConfig
    from pyramidion_ds.data import load_spm
    from pyramidion_ds.data.binarize import preprocess
    from pyramidion_ds.data.sources import file_sources
    from pyramidion_ds.errors import DataError
    from pyramidion_ds.generate.inputs import from_data_dir, from_file
    from pyramidion_ds.generate.runner import Result, write_outputs

    rows = [json.loads(line) for line in (shared_data / "pubmed_sample.jsonl").read_text().splitlines()[:12]]
    path = tmp_path / "test.jsonl"
    path.write_text(
        "".join(
            json.dumps({"id": r["id"], "document": r["document"][:3000], "summary": r["summary"]}) + "\n" for r in rows
        )
    )
    out = tmp_path / "bin"
    preprocess(
        file_sources({"train": str(path), "test": str(path)}),
        out,
        progress=False,
        max_target_positions=48,
        spm_options=dict(vocab_size=256, sample_size=20_000, byte_fallback=False),
    )
    spm = load_spm(out)
    gen = GenerationConfig()

    def rouge(inputs):
        results = [
            Result(
                e.index,
                e.id,
                len(e.source),
                e.reference,
                [
                    {
                        "text": " ".join(rows[e.index]["document"].split()[:60]),
                        "tokens": [],
                        "score": 0.0,
                        "positional_scores": [],
                    }
                ],
            )
            for e in inputs.examples
        ]
        return write_outputs(results, gen, "test", 0.0)

    subset, given = from_data_dir(out, "test", 512, spm, 2), from_file(path, 512, spm, 2)
    references = [r["summary"] for r in rows]
    assert [e.reference for e in subset.examples] == [e.reference for e in given.examples] == references
    assert [e.id for e in subset.examples] == [e.id for e in given.examples]
    assert rouge(subset) == rouge(given)
    printed = [line for line in capsys.readouterr().out.splitlines() if line]  # multi-line summaries: one T- line
    assert all(line[:2] in ("T-", "H-", "P-") or line.startswith("test: ROUGE") for line in printed)
    # summaries that are not those of the shards (another run's file): refused
    kept = (out / "test.summaries.jsonl").read_text()
    (out / "test.summaries.jsonl").write_text("".join(kept.splitlines(keepends=True)[::-1]))
    with pytest.raises(DataError, match="test.summaries.jsonl: 12 summaries that are not those of the 12 examples"):
        from_data_dir(out, "test", 512, spm, 2)
    # a data dir written before preprocess kept the summaries: decoded targets, with a warning
    (out / "test.summaries.jsonl").unlink()
    with caplog.at_level("WARNING"):
        legacy = from_data_dir(out, "test", 512, spm, 2)
    assert "no test.summaries.jsonl" in caplog.text
    decoded = [e.reference for e in legacy.examples]
    assert all(len(r) < len(x["summary"]) for r, x in zip(decoded, rows, strict=True))  # cut to 48 tokens
    assert rouge(legacy)["rouge1"]["recall"] != rouge(given)["rouge1"]["recall"]


def test_non_finite_and_out_of_range_generation_settings_are_refused():
    from pyramidion_ds.config import ConfigError, GenerationConfig
    from pyramidion_ds.config.core import build

    for key, value, message in [
        ("lenpen", float("nan"), "generation.lenpen: got nan, expected a finite number"),
        ("lenpen", "nan", "generation.lenpen: got nan"),  # as YAML gives it
        ("max_len_a", float("inf"), "generation.max_len_a: got inf, expected a finite"),
        ("temperature", float("nan"), "generation.temperature: got nan"),
        ("beam", 0, "generation.beam: got 0, expected a value >= 1"),
        ("min_len", -1, "generation.min_len: got -1, expected a value >= 0"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            build(GenerationConfig, {key: value}, prefix="generation.")


@pytest.mark.parametrize(
    "flag", [["--lenpen", "nan"], ["--beam", "0"], ["--max-len-a", "inf"], ["--temperature", "-1"]]
)
def test_generation_flags_are_checked_before_any_work(flag, tmp_path, capsys):
    from pyramidion_ds.cli.generate import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "no_such_run"), "--input", str(tmp_path / "x.txt"), *flag])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1
    assert lines[0].startswith("pyramidion-generate: error: generation.")
