"""Pretraining objectives on real text (PubMed articles): what each hides and what its target holds.

One vocabulary trained on ``../shared/data/pubmed_sample.jsonl`` with ``<mask>`` and 100 sentinels, then
BART infilling, PEGASUS gap sentences and T5 span corruption read back through their datasets, at the
positions a long-document run uses (4,096 source tokens, 256 target tokens).
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from pyramidion_ds.config import load_config
from pyramidion_ds.config.data import GapSentencesConfig, SpanCorruptionConfig
from pyramidion_ds.data import EOS_ID, GapSentencesDataset, SpanCorruptionDataset, load_spm, pretraining_dataset
from pyramidion_ds.data.binarize import preprocess
from pyramidion_ds.data.denoise import (
    SENTINEL_FORMAT,
    gap_sentences,
    sentence_bounds,
    sentence_end_table,
    sentence_importance,
    span_corruption,
    span_counts,
)
from pyramidion_ds.data.sources import file_sources
from pyramidion_ds.errors import DataError

MAX_SOURCE, MAX_TARGET = 4096, 256
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(scope="module")
def pubmed_bin(tmp_path_factory):
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    shared_data = SHARED_DATA
    out = tmp_path_factory.mktemp("pubmed_bin")
    symbols = ("<mask>",) + tuple(SENTINEL_FORMAT.format(k) for k in range(100))
    preprocess(
        file_sources({"train": str(shared_data / "pubmed_sample.jsonl")}, unlabeled=True),
        out,
        spm_options=dict(vocab_size=2000, sample_size=200_000, character_coverage=1.0, user_symbols=symbols),
        unlabeled=True,
        progress=False,
    )
    return out


def body_of(dataset, i):
    """The document as the objective saw it: cut to the encoder's positions, without ``</s>``."""
    document = dataset.source[int(dataset.indices[i])]
    return document[: min(len(document), dataset.max_source_positions) - 1]


def sentences(tokens, table):
    bounds = sentence_bounds(tokens, table)
    return [tokens[bounds[s] : bounds[s + 1]].tolist() for s in range(len(bounds) - 1)]


# --- PEGASUS gap sentences ---------------------------------------------------------------------------


def test_gap_sentences_hide_the_most_representative_sentences_and_generate_them(pubmed_bin):
    cfg = GapSentencesConfig(ratio=0.3, score_noise=0.0)
    ds = GapSentencesDataset(pubmed_bin, "train", MAX_SOURCE, MAX_TARGET, cfg, seed=3)
    proc = load_spm(pubmed_bin)
    mask_id = proc.PieceToId("<mask>")
    table = sentence_end_table(proc)
    long_documents = 0
    for i in range(len(ds)):
        item, body = ds[i], body_of(ds, i)
        source, target = item["source"].numpy(), item["target"].numpy()
        assert source[-1] == EOS_ID and target[-1] == EOS_ID
        assert len(source) <= ds.src_sizes[i] and len(target) <= MAX_TARGET
        original = sentences(body, table)
        _, _, chosen = gap_sentences(
            body,
            sentence_end=table,
            mask_id=mask_id,
            ratio=0.3,
            score_noise=0.0,
            max_target_tokens=MAX_TARGET - 1,
            rng=np.random.default_rng(0),
        )
        # the target is the chosen sentences, in document order
        assert target[:-1].tolist() == [t for s in chosen for t in original[s]]
        # the source is the document with one <mask> in place of each of them, nothing else changed
        rebuilt = [[mask_id] if s in set(chosen.tolist()) else original[s] for s in range(len(original))]
        assert source[:-1].tolist() == [t for piece in rebuilt for t in piece]
        assert int((source == mask_id).sum()) == len(chosen)
        # they are the best-scoring sentences: every sentence left out either scores lower than the worst
        # chosen one or would not have fit the target
        scores = sentence_importance(body, sentence_bounds(body, table))
        if len(original) >= 20:
            long_documents += 1
            worst_chosen = scores[chosen].min()
            room = MAX_TARGET - 1 - sum(len(original[s]) for s in chosen)
            for s in set(range(len(original))) - set(chosen.tolist()):
                assert scores[s] <= worst_chosen or len(original[s]) > room
    assert long_documents > 20


def test_gap_sentences_fill_the_ratio_when_the_target_has_room(pubmed_bin):
    ds = GapSentencesDataset(pubmed_bin, "train", 512, 1024, GapSentencesConfig(ratio=0.3, score_noise=0.0))
    proc = load_spm(pubmed_bin)
    table, mask_id = sentence_end_table(proc), proc.PieceToId("<mask>")
    for i in range(10):
        body = body_of(ds, i)
        num_sentences = len(sentence_bounds(body, table)) - 1
        source = ds[i]["source"].numpy()
        assert int((source == mask_id).sum()) == int(np.ceil(0.3 * num_sentences))


def test_gap_sentence_noise_changes_the_choice_by_epoch_and_seed_only(pubmed_bin):
    cfg = GapSentencesConfig(ratio=0.3, score_noise=0.2)
    a = GapSentencesDataset(pubmed_bin, "train", MAX_SOURCE, MAX_TARGET, cfg, seed=1)
    b = GapSentencesDataset(pubmed_bin, "train", MAX_SOURCE, MAX_TARGET, cfg, seed=1)
    assert all(torch.equal(a[i]["target"], b[i]["target"]) for i in range(5))
    b.set_epoch(1)
    assert any(not torch.equal(a[i]["target"], b[i]["target"]) for i in range(5))


# --- T5 span corruption -------------------------------------------------------------------------------


def test_span_corruption_sentinels_put_the_document_back_together(pubmed_bin):
    cfg = SpanCorruptionConfig(noise_density=0.15, mean_noise_span_length=3.0, max_sentinels=100)
    ds = SpanCorruptionDataset(pubmed_bin, "train", MAX_SOURCE, MAX_TARGET, cfg, seed=5)
    proc = load_spm(pubmed_bin)
    sentinels = [proc.PieceToId(SENTINEL_FORMAT.format(k)) for k in range(100)]
    assert ds.sentinel_ids.tolist() == sentinels
    densities = []
    for i in range(len(ds)):
        item, body = ds[i], body_of(ds, i)
        source, target = item["source"].numpy()[:-1], item["target"].numpy()
        assert target[-1] == EOS_ID and len(target) <= MAX_TARGET
        target = target[:-1]
        used = [t for t in source.tolist() if t in sentinels]
        assert used == sentinels[: len(used)] and len(used) >= 1  # S0, S1, ... in order, once each
        # the target lists every sentinel, each followed by its span
        spans, current = {}, None
        for token in target.tolist():
            if token in sentinels:
                current = token
                spans[current] = []
            else:
                spans[current].append(token)
        assert list(spans) == used and all(spans[s] for s in used)
        rebuilt = [t for token in source.tolist() for t in (spans[token] if token in spans else [token])]
        assert rebuilt == body.tolist()
        hidden = sum(len(v) for v in spans.values())
        densities.append(hidden / len(body))
        # long documents hide fewer than 15% so that sentinels and spans fit the decoder
        assert hidden + len(used) <= MAX_TARGET - 1
    densities = np.array(densities)
    short = np.array([len(body_of(ds, i)) for i in range(len(ds))]) * 0.15 < 150
    assert np.all(np.abs(densities[short] - 0.15) < 0.02)  # T5's density where it fits
    assert np.all(densities[~short] < 0.15) and (~short).sum() > 10


def test_span_counts_respect_density_sentinels_and_target():
    assert span_counts(1000, 0.15, 3.0, 100, 511) == (150, 50)
    hidden, spans = span_counts(4000, 0.15, 3.0, 100, 511)  # 600 wanted, 100 sentinels max
    assert spans == 100 and hidden == 300 and hidden + spans <= 511
    hidden, spans = span_counts(4000, 0.15, 3.0, 100, 255)
    assert hidden + spans <= 255 and abs(hidden / spans - 3.0) < 0.1
    assert span_counts(1, 0.15, 3.0, 100, 255) == (0, 0)
    source, target = span_corruption(
        np.arange(10, 12),
        sentinel_ids=np.array([4]),
        noise_density=0.15,
        mean_span=3.0,
        max_target_tokens=255,
        rng=np.random.default_rng(0),
    )
    assert source.tolist() == [10, 4] and target.tolist() == [4, 11]  # two tokens: one kept, one hidden


def test_span_corruption_without_sentinels_names_the_flag(tmp_path, shared_data):
    out = tmp_path / "bin"
    preprocess(
        file_sources({"train": str(shared_data / "pubmed_sample.jsonl")}, unlabeled=True),
        out,
        spm_options=dict(vocab_size=400, sample_size=50_000, character_coverage=1.0),
        unlabeled=True,
        progress=False,
    )
    with pytest.raises(
        DataError,
        match=r"no sentinel pieces \(<extra_id_0>, \.\.\.\) for data.task "
        r"span_corruption; re-run pyramidion-preprocess with --spm-sentinels 100",
    ):
        SpanCorruptionDataset(out, "train", MAX_SOURCE, MAX_TARGET)


# --- selection by config ------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["denoising", "gap_sentences", "span_corruption"])
def test_data_task_selects_the_objective(pubmed_bin, task):
    cfg = load_config(
        None, ["--data.task", task, "--data.gap_sentences.ratio", "0.2", "--data.span_corruption.noise_density", "0.1"]
    )
    ds = pretraining_dataset(cfg.data.task, pubmed_bin, "train", MAX_SOURCE, MAX_TARGET, cfg.data, seed=0)
    assert (
        type(ds).__name__
        == {
            "denoising": "DenoisingDataset",
            "gap_sentences": "GapSentencesDataset",
            "span_corruption": "SpanCorruptionDataset",
        }[task]
    )
    if task != "denoising":
        assert ds.cfg == getattr(cfg.data, task)
    item = ds[0]
    assert item["source"][-1] == EOS_ID and item["target"][-1] == EOS_ID
    assert len(item["target"]) <= MAX_TARGET
