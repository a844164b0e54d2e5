"""The selection figure (data/selection.py) on hand-made documents: known kept positions, known shares."""

import math

import pytest
import torch

from pyramidion_ds.data.selection import (
    batch_documents,
    content_words,
    corpus_rows,
    document_rows,
    piece_hits,
    piece_words,
    summarize,
)

# "▁the ▁cell s ▁grow . ▁in ▁<dig> ▁mice" : 9 pieces, words: the cells grow in <dig> mice
SOURCE = ["▁the", "▁cell", "s", "▁grow", ".", "▁in", "▁", "<dig>", "▁mice"]


def test_words_and_content_words():
    words = piece_words(SOURCE)
    assert words[1] == words[2] == "cells" and words[3] == words[4] == "grow" and words[7] == "<dig>"
    # stopwords, punctuation, placeholders and 1-letter words are not content words
    assert content_words(["▁The", "▁Cells", ",", "▁of", "▁<cit>", "▁a", "▁x", "▁grow", "!"]) == {"cells", "grow"}


def test_piece_hits_skip_punctuation_pieces():
    hits = piece_hits(SOURCE, {"cells", "grow", "mice"})
    # ▁cell s ▁grow ▁mice hit; the "." after grow has no letter; "the", "in", "<dig>" are not reference words
    assert hits.tolist() == [False, True, True, True, False, False, False, False, True]


def test_document_rows_known_shares_and_control():
    own, other = {"cells", "grow"}, {"mice", "grow"}
    # layer 1 keeps positions 1, 3, 6, 8 (and 99 beyond the source, and a repeat, both ignored); layer 2 keeps 1, 3
    first, second = document_rows(SOURCE, [[1, 3, 6, 8, 99, 3], [1, 3]], own, other)
    # own: hits at 1, 2, 3 -> all = 3/9; kept 1, 3, 6, 8 -> 2/4; lead = first 4 pieces -> 3/4
    assert first["kept"] == 4
    assert first["own"] == pytest.approx(0.5) and first["all"] == pytest.approx(3 / 9)
    assert first["lead"] == pytest.approx(0.75)
    # control (the other reference): hits at 3 (grow) and 8 (mice) -> kept 3, 8 of 4 -> 2/4; all 2/9
    assert first["control"] == pytest.approx(0.5) and first["control_all"] == pytest.approx(2 / 9)
    assert first["lift"] == pytest.approx((0.5 - 3 / 9) - (0.5 - 2 / 9))
    assert second["own"] == 1.0 and second["control"] == 0.5 and second["lead"] == pytest.approx(0.5)


def test_corpus_controls_with_the_next_document_and_interval():
    ref_a, ref_b = ["▁cells", "▁grow"], ["▁mice"]
    rows = corpus_rows([SOURCE, SOURCE], [[[1, 3]], [[8]]], [ref_a, ref_b])
    # doc 0 keeps its own reference's words; doc 1 keeps "mice", its own; each control is the other's
    assert rows[0][0]["own"] == 1.0 and rows[0][0]["control"] == 0.0
    assert rows[1][0]["own"] == 1.0 and rows[1][0]["control"] == 0.0
    summary = summarize(rows * 5, ["layer3"], samples=200)
    figures = summary["layers"]["layer3"]
    assert summary["documents"] == 10 and figures["lift"] > 0.5
    low, high = figures["lift_ci95"]
    assert 0 < low <= figures["lift"] <= high
    assert corpus_rows([SOURCE], [[[1]]], [ref_a]) == []  # one document has no control


def test_kept_positions_from_an_encoded_batch():
    class Info:  # PoolingInfo's two fields read here
        source_positions = torch.tensor([[4, 0, 2], [1, 0, 0]])
        mask = torch.tensor([[True, True, False], [True, True, False]])

    docs = batch_documents(
        [Info()],
        torch.tensor([[5, 6, 7, 8, 2], [9, 2, 1, 1, 1]]),
        torch.tensor([5, 2]),
        torch.tensor([[4, 2, 1]] * 2),
        {1, 2},
    )
    assert docs[0] == ([5, 6, 7, 8, 2], [[4, 0]], [4]) and docs[1] == ([9, 2], [[1, 0]], [4])
    assert math.isnan(document_rows([], [[0]], set(), set())[0]["own"])
