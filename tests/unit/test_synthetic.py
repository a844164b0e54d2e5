"""The synthetic corpus: deterministic, long, and its summary is exactly the planted sentences."""

import json
import re

import pytest

from pyramidion_ds.data.synthetic import _AGENTS, make_corpus, make_example, write_corpus


def test_deterministic_and_independent_of_corpus_size():
    a = make_corpus(5, seed=3)
    b = make_corpus(8, seed=3)
    assert a == b[:5]
    assert make_example(2, seed=4) != make_example(2, seed=3)
    assert make_example(0, split="train") != make_example(0, split="valid")


@pytest.mark.parametrize("lo, hi", [(1500, 2500), (3000, 3200)])
def test_lengths(lo, hi):
    for ex in make_corpus(10, seed=1, min_words=lo, max_words=hi):
        words = len(ex.document.split())
        assert lo <= words <= hi + 60  # a sentence and the planted ones may run past the target


def test_summary_is_exactly_the_planted_sentences_in_order():
    for ex in make_corpus(20, seed=7, num_salient=(2, 6)):
        planted = [ex.document[s:e] for s, e in ex.salient_spans]
        assert 2 <= len(planted) <= 6
        assert ex.summary == " ".join(planted)
        assert [s for s, _ in ex.salient_spans] == sorted(s for s, _ in ex.salient_spans)
        # every sentence that names an agent is a planted one, and only those
        sentences = re.findall(r"[^.]+ \.", ex.document)
        salient = [s.strip() for s in sentences if any(agent in s for agent in _AGENTS)]
        assert salient == planted


def test_write_corpus(tmp_path):
    paths = write_corpus(tmp_path / "syn", {"train": 3, "valid": 2}, seed=0, min_words=100, max_words=200)
    rows = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    assert len(rows) == 3 and set(rows[0]) == {"id", "document", "summary", "salient_spans"}
    assert not list((tmp_path / "syn").glob(".*"))


def test_bad_lengths():
    with pytest.raises(ValueError, match="min_words"):
        make_example(0, min_words=10, max_words=5)
