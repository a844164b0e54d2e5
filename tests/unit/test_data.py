"""Data pipeline: shards round-trip, batching, the sharded resumable sampler, denoising, bad input.

One tiny sentencepiece model (vocab 250) and one small binarized synthetic corpus are built once per
session (in-process, a second or two) and shared by every test here.
"""

import json
import pickle
import shutil

import numpy as np
import pytest
import torch

from pyramidion_ds.config import DenoisingConfig
from pyramidion_ds.data import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    DenoisingDataset,
    ShardedBatchSampler,
    SummarizationDataset,
    collate,
    load_spm,
    make_batches,
    spm_sha256,
    vocab_size,
)
from pyramidion_ds.data.binarize import preprocess, read_meta
from pyramidion_ds.data.denoise import permute_sentences, sentence_end_table, text_infill
from pyramidion_ds.data.indexed import ShardReader
from pyramidion_ds.data.sources import file_sources, parse_mapping
from pyramidion_ds.data.synthetic import make_example, write_corpus
from pyramidion_ds.errors import DataError

SPM = dict(vocab_size=250, sample_size=100_000, character_coverage=1.0)  # every digit: exact round trip


@pytest.fixture(scope="session")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    write_corpus(root, {"train": 40, "valid": 6}, min_words=200, max_words=500)
    return root


@pytest.fixture(scope="session")
def data_dir(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("bin")
    sources = file_sources({"train": str(raw / "train.jsonl"), "valid": str(raw / "valid.jsonl")})
    preprocess(sources, out, spm_options=SPM, progress=False)
    return out


def fresh_copy(data_dir, tmp_path):
    dest = tmp_path / "copy"
    shutil.copytree(data_dir, dest)
    return dest


# --- shards ------------------------------------------------------------------------------------------


def test_round_trip_text_shards_tokens_text(data_dir):
    sp = load_spm(data_dir)
    assert (sp.bos_id(), sp.pad_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert sp.IdToPiece(4) == "<mask>"
    ds = SummarizationDataset(data_dir, "train", 100_000, 100_000)
    assert len(ds) == 40
    for i in (0, 17, 39):
        example = make_example(i, min_words=200, max_words=500, split="train")
        item = ds[i]
        assert item["id"] == i and ds.example_id(i) == example.id
        assert item["source"].dtype == torch.long and item["source"][-1] == EOS_ID
        assert sp.DecodeIds(item["source"][:-1].tolist()) == example.document
        assert sp.DecodeIds(item["target"][:-1].tolist()) == example.summary
    assert ds.src_sizes[5] == len(ds[5]["source"]) and ds.tgt_sizes[5] == len(ds[5]["target"])


def test_headers_and_meta(data_dir):
    meta = read_meta(data_dir)
    assert meta["vocab_size"] == vocab_size(data_dir) == 250
    assert meta["spm_sha256"] == spm_sha256(data_dir) and meta["dtype"] == "uint16"
    assert meta["splits"]["train"]["counts"]["examples"] == 40
    header = json.loads((data_dir / "train.source.json").read_text())
    assert header["num_examples"] == 40 and header["spm_sha256"] == meta["spm_sha256"]
    reader = ShardReader(data_dir / "train.source")
    assert header["num_tokens"] == int(reader.sizes.sum()) and header["lengths"]["max"] == reader.sizes.max()
    assert (data_dir / "train.source.bin").stat().st_size == 2 * header["num_tokens"]


def test_read_time_truncation_and_dropping(data_dir):
    ds = SummarizationDataset(data_dir, "train", 64, 16)
    assert ds.src_sizes.max() == 64 and ds.tgt_sizes.max() == 16
    item = ds[3]
    assert len(item["source"]) == 64 and item["source"][-1] == EOS_ID and item["target"][-1] == EOS_ID
    full = SummarizationDataset(data_dir, "train", 100_000, 100_000)
    limit = int(np.median(full.src_sizes))
    kept = SummarizationDataset(data_dir, "train", limit, 100, truncate=False)
    assert len(kept) == int((full.src_sizes <= limit).sum()) and kept.num_dropped == 40 - len(kept)
    assert all(len(kept[i]["source"]) <= limit for i in range(len(kept)))


def test_dataset_pickles_for_workers(data_dir):
    ds = SummarizationDataset(data_dir, "valid", 128, 32)
    ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.source._tokens is None  # maps are re-opened in the worker, not copied
    assert torch.equal(clone[2]["source"], ds[2]["source"])
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate, num_workers=1)
    assert sum(len(b["ids"]) for b in loader) == len(ds)


# --- collate -----------------------------------------------------------------------------------------


def test_collate_fairseq_layout():
    samples = [
        {"id": 7, "source": torch.tensor([5, 6, 7, EOS_ID]), "target": torch.tensor([9, 10, EOS_ID])},
        {"id": 2, "source": torch.tensor([8, EOS_ID]), "target": torch.tensor([11, EOS_ID])},
    ]
    batch = collate(samples, pad_to_multiple=8)
    assert batch["ids"].tolist() == [7, 2] and batch["src_lengths"].tolist() == [4, 2]
    assert batch["src_tokens"].tolist() == [[5, 6, 7, EOS_ID] + [PAD_ID] * 4, [8, EOS_ID] + [PAD_ID] * 6]
    assert batch["target"].tolist() == [[9, 10, EOS_ID], [11, EOS_ID, PAD_ID]]
    assert batch["prev_output_tokens"].tolist() == [[BOS_ID, 9, 10], [BOS_ID, 11, PAD_ID]]
    assert batch["ntokens"] == 5
    assert collate(samples)["src_tokens"].shape == (2, 4)


# --- batching and sampling ---------------------------------------------------------------------------


def sizes(n=203, seed=0):
    return np.random.default_rng(seed).integers(10, 500, n)


@pytest.mark.parametrize("pad", [0, 64])
def test_make_batches_respects_budget_and_covers_once(pad):
    src = sizes()
    batches = make_batches(src, max_tokens=2048, max_sentences=16, pad_to_multiple=pad, seed=3, epoch=1)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(src)))
    for batch in batches:
        longest = max(src[batch])
        padded = -(-longest // pad) * pad if pad else longest
        assert len(batch) * padded <= 2048 and len(batch) <= 16
    assert batches == make_batches(src, max_tokens=2048, max_sentences=16, pad_to_multiple=pad, seed=3, epoch=1)
    assert batches != make_batches(src, max_tokens=2048, max_sentences=16, pad_to_multiple=pad, seed=3, epoch=2)


def test_make_batches_mixes_lengths_inside_a_padded_length():
    # 1,000 examples of 97-256 tokens: with padding to 128, two buckets; a batch never straddles them
    # more than once, so padding costs what exact-length sorting costs, but its members are drawn across
    # the bucket instead of being neighbours in length
    src = np.random.default_rng(1).integers(97, 257, 1000)
    batches = make_batches(src, max_sentences=4, pad_to_multiple=128, seed=0, epoch=0)
    padded = -(-src // 128) * 128
    assert sum(len(set(padded[b])) > 1 for b in batches) <= 1
    spread = [int(src[b].max() - src[b].min()) for b in batches if len(set(padded[b])) == 1]
    assert np.median(spread) > 30  # exact-length sorting: 0 or 1
    exact = make_batches(src, max_sentences=4, pad_to_multiple=0, seed=0, epoch=0)
    assert np.median([int(src[b].max() - src[b].min()) for b in exact]) <= 1


def test_make_batches_errors():
    with pytest.raises(DataError, match="max_tokens or max_sentences"):
        make_batches([3])
    with pytest.raises(DataError, match="example 1 has 900 source tokens"):
        make_batches([10, 900], max_tokens=512)


def test_sampler_two_ranks_cover_every_example_once_each_epoch():
    src = sizes()

    def fn(epoch):
        return make_batches(src, max_tokens=1500, seed=1, epoch=epoch)

    for epoch in (0, 1):
        ranks = [ShardedBatchSampler(fn, rank=r, world_size=2, seed=1) for r in range(2)]
        for sampler in ranks:
            sampler.set_epoch(epoch)
        per_rank = [list(sampler) for sampler in ranks]
        assert len(per_rank[0]) == len(per_rank[1]) > 0
        seen = sorted(i for batches in per_rank for b in batches for i in b)
        assert seen == list(range(len(src)))
    # an odd number of batches is evened out by splitting, still exactly once

    def odd(epoch):
        return [[0, 1, 2], [3], [4, 5]]

    shares = [list(ShardedBatchSampler(odd, rank=r, world_size=2)) for r in range(2)]
    assert len(shares[0]) == len(shares[1]) == 2
    assert sorted(i for s in shares for b in s for i in b) == list(range(6))


def test_sampler_global_position_continues_on_another_world_size():
    """2 ranks x update_freq 3 saved after 2 updates, resumed as 1 x 6 and 3 x 2: the epoch's remaining
    batches are exactly the ones the 2-rank run had not handed out, none repeated or skipped."""
    src = sizes(150)

    def fn(epoch):
        return make_batches(src, max_tokens=600, seed=5, epoch=epoch)

    saving = [ShardedBatchSampler(fn, rank=r, world_size=2, seed=5, update_freq=3) for r in range(2)]
    done = []
    for sampler in saving:
        sampler.set_epoch(1)
        it = iter(sampler)
        done += [next(it) for _ in range(6)]  # 2 updates x 3 micro-batches
    state = saving[0].state_dict()
    assert state["global_position"] == 12
    everything = sorted(map(tuple, saving[0].epoch_batches(1) + saving[1].epoch_batches(1)))
    for world, update_freq in ((1, 6), (3, 2)):
        rest = []
        for rank in range(world):
            sampler = ShardedBatchSampler(fn, rank=rank, world_size=world, seed=5, update_freq=update_freq)
            sampler.load_state_dict(state)
            sampler.set_epoch(1)
            assert sampler.position == 12 // world
            rest += list(sampler)
        assert sorted(map(tuple, done + rest)) == everything
    with pytest.raises(DataError, match="not a multiple of the world size 5"):
        ShardedBatchSampler(fn, rank=0, world_size=5, seed=5, update_freq=1).load_state_dict(state)


def test_sampler_resumes_exactly():
    src = sizes(150)

    def fn(epoch):
        return make_batches(src, max_tokens=1000, seed=5, epoch=epoch)

    full = ShardedBatchSampler(fn, rank=1, world_size=2, seed=5)
    full.set_epoch(2)
    expected = list(full)
    sampler = ShardedBatchSampler(fn, rank=1, world_size=2, seed=5)
    sampler.set_epoch(2)
    it = iter(sampler)
    consumed = [next(it) for _ in range(4)]
    state = sampler.state_dict()
    assert state == {"epoch": 2, "position": 4, "global_position": 8, "micro_batches_per_update": 2}
    resumed = ShardedBatchSampler(fn, rank=1, world_size=2, seed=5)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the same epoch keeps the position
    assert consumed + list(resumed) == expected
    resumed.set_epoch(3)
    assert (
        resumed.state_dict()["epoch"] == 3
        and resumed.state_dict()["position"] == 0
        and len(list(resumed)) == len(resumed)
    )


# --- denoising ---------------------------------------------------------------------------------------


def test_text_infill_hides_the_ratio_with_one_mask_per_span():
    tokens = np.arange(100, 1100)
    noised, hidden = text_infill(tokens, mask_id=4, mask_ratio=0.3, poisson_lambda=3.0, rng=np.random.default_rng(0))
    assert hidden == 300
    kept = noised[noised != 4]
    assert len(kept) == 700 and np.all(np.diff(kept) > 0)  # survivors keep their order
    spans = int((noised == 4).sum())
    assert 60 < spans < 160  # ~300 / 3 spans


def test_permutation_keeps_the_sentences(data_dir):
    sp = load_spm(data_dir)
    table = sentence_end_table(sp)
    tokens = np.array(sp.EncodeAsIds(make_example(0, min_words=200, max_words=300).document))
    out = permute_sentences(tokens, table, 1.0, np.random.default_rng(1))
    assert sorted(out.tolist()) == sorted(tokens.tolist()) and not np.array_equal(out, tokens)


def test_denoising_dataset_deterministic_and_ratio(data_dir):
    cfg = DenoisingConfig(mask_ratio=0.3, poisson_lambda=3.0, permute_sentences=1.0)
    a = DenoisingDataset(data_dir, "train", 400, 300, cfg, seed=11)
    b = DenoisingDataset(data_dir, "train", 400, 300, cfg, seed=11)
    c = DenoisingDataset(data_dir, "train", 400, 300, cfg, seed=12)
    assert torch.equal(a[3]["source"], b[3]["source"]) and not torch.equal(a[3]["source"], c[3]["source"])
    a.set_epoch(1)
    assert not torch.equal(a[3]["source"], b[3]["source"])
    b.set_epoch(1)
    assert torch.equal(a[3]["source"], b[3]["source"])
    mask_id = load_spm(data_dir).PieceToId("<mask>")
    hidden_share = []
    for i in range(len(a)):
        item = a[i]
        assert item["source"][-1] == EOS_ID and item["target"][-1] == EOS_ID
        assert len(item["source"]) <= a.src_sizes[i] and len(item["target"]) == a.tgt_sizes[i]
        body = len(item["source"]) - 1
        original = int(a.src_sizes[i]) - 1
        masks = int((item["source"] == mask_id).sum())
        hidden_share.append((original - (body - masks)) / original)
    assert abs(np.mean(hidden_share) - 0.3) < 0.01


# --- bad input ---------------------------------------------------------------------------------------


def test_swapped_vocabulary_is_refused(data_dir, tmp_path, raw):
    bad = fresh_copy(data_dir, tmp_path)
    header = json.loads((bad / "train.source.json").read_text())
    header["spm_sha256"] = "0" * 64
    (bad / "train.source.json").write_text(json.dumps(header))
    with pytest.raises(
        DataError,
        match=r"train.source.json: built with spm model 000000000000, but the "
        r"vocabulary in use is",
    ):
        SummarizationDataset(bad, "train", 128, 32)
    other = tmp_path / "other"
    preprocess(
        file_sources({"train": str(raw / "valid.jsonl")}), other, spm_options=dict(SPM, vocab_size=200), progress=False
    )
    shutil.copy(other / "spm.model", bad / "spm.model")
    with pytest.raises(DataError, match="meta.json: built with spm model .* but spm.model is"):
        SummarizationDataset(bad, "valid", 128, 32)


def test_index_past_data_and_missing_header(data_dir, tmp_path):
    bad = fresh_copy(data_dir, tmp_path)
    with open(bad / "valid.source.bin", "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(
        DataError,
        match=r"valid.source.idx: index points past the data file \(offset \d+ > 50 "
        r"tokens in valid.source.bin\)",
    ):
        SummarizationDataset(bad, "valid", 128, 32)
    (bad / "train.target.json").unlink()
    with pytest.raises(DataError, match="train.target.json: missing shard header"):
        SummarizationDataset(bad, "train", 128, 32)
    with pytest.raises(DataError, match=r"no split 'test' \(splits: train, valid\)"):
        SummarizationDataset(bad, "test", 128, 32)


def test_shard_files_that_do_not_belong_together_are_refused(data_dir, tmp_path):
    bad = fresh_copy(data_dir, tmp_path)
    # an index copied from another shard with the same number of examples
    shutil.copy(bad / "valid.target.idx", bad / "valid.source.idx")
    with pytest.raises(DataError, match=r"valid.source.idx: last offset \d+, expected \d+ \(the header's num_tokens"):
        SummarizationDataset(bad, "valid", 128, 32)
    shutil.copy(data_dir / "valid.source.idx", bad / "valid.source.idx")
    # the same last offset, but example boundaries moved: examples no longer end with </s>
    offsets = np.fromfile(bad / "valid.source.idx", dtype=np.int64)
    offsets[2] += 1
    offsets.tofile(bad / "valid.source.idx")
    with pytest.raises(DataError, match=r"valid.source.bin: example 1 \(of 6; 1 in all\) does not end with </s>"):
        SummarizationDataset(bad, "valid", 128, 32)
    shutil.copy(data_dir / "valid.source.idx", bad / "valid.source.idx")
    # tokens appended to the data file
    with open(bad / "valid.target.bin", "ab") as fh:
        fh.write(np.array([5, 6, EOS_ID], dtype=np.uint16).tobytes())
    with pytest.raises(
        DataError,
        match=r"valid.target.bin: \d+ bytes, expected \d+ \(\d+ uint16 tokens, as its "
        r"header says\)",
    ):
        SummarizationDataset(bad, "valid", 128, 32)
    SummarizationDataset(bad, "train", 128, 32)  # the other split is untouched and still opens


def test_a_number_or_a_bad_line_is_one_error_naming_the_row(tmp_path):
    cases = {
        "num.jsonl": (
            '{"document": "fine text", "summary": "ok"}\n{"document": 42, "summary": "x"}\n',
            r"num.jsonl: line 2: field 'document' is a number \(42\), expected text",
        ),
        "sum.jsonl": ('{"document": "fine text", "summary": ["a"]}\n', r"line 1: field 'summary' is a list"),
        "broken.jsonl": (
            '{"document": "a", "summary": "b"}\n\n{"document": "c", \n',
            r"broken.jsonl: line 3: not valid JSON \(Expecting property name",
        ),
        "array.jsonl": ('["a", "b"]\n', r"array.jsonl: line 1: a list, expected a JSON object per line"),
        "empty.jsonl": ("", r"empty.jsonl: empty file, expected one JSON object per line"),
        "blank.jsonl": ("\n  \n", r"blank.jsonl: empty file, expected one JSON object per line"),
        "empty.csv": ("", r"empty.csv: empty file, expected examples with columns .document. and .summary."),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=message):
            sources = file_sources({"train": str(tmp_path / name)})
            list(sources["train"].records())
    # csv/parquet cells are typed by the reader (a column of numbers stays numbers): refused when the row is
    # read, named by row
    (tmp_path / "num.csv").write_text("document,summary\n7,ok\n8,x\n")
    records = file_sources({"train": str(tmp_path / "num.csv")})["train"].records()
    with pytest.raises(DataError, match=r"num.csv: row 1: column 'document' is a number \(7\), expected text"):
        next(records)


def test_empty_documents_are_counted_skips(tmp_path, data_dir):
    rows = [
        {"id": "a", "document": "the board met .", "summary": "met ."},
        {"id": "b", "document": "   ", "summary": "nothing"},
        {"id": "c", "document": "the panel met .", "summary": ""},
        {"id": "d", "document": None, "summary": "x"},
        {"id": "e", "document": "the staff met on monday .", "summary": "staff met ."},
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    meta = preprocess(
        file_sources({"train": str(path)}), tmp_path / "out", spm_model=str(data_dir / "spm.model"), progress=False
    )
    counts = meta["splits"]["train"]["counts"]
    assert counts["input"] == 5 and counts["examples"] == 2 and counts["empty_skipped"] == 3
    ds = SummarizationDataset(tmp_path / "out", "train", 64, 64)
    assert [ds.example_id(i) for i in range(len(ds))] == ["a", "e"]


def test_bad_files_and_columns(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"document": "fine", "summary": "ok"}\n{"document": "caf\xe9", "summary": "x"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 2: not valid UTF-8 \(byte 0xe9 at column 18\)"):
        file_sources({"train": str(path)})
    path.write_text('{"article": "a b c", "abstract": "a"}\n')
    with pytest.raises(
        DataError,
        match=r"no column 'document' \(columns: article, abstract\); "
        r"set --document-column",
    ):
        file_sources({"train": str(path)})
    assert file_sources({"train": str(path)}, document_column="article", summary_column="abstract")
    with pytest.raises(DataError, match="no such file"):
        file_sources({"train": str(tmp_path / "nope.jsonl")})
    with pytest.raises(DataError, match="unknown split 'dev'"):
        parse_mapping("dev=x.jsonl", "--source-files")


# --- the real samples --------------------------------------------------------------------------------


def test_real_samples_pubmed_and_qmsum(shared_data, tmp_path):
    pubmed = file_sources({"train": str(shared_data / "pubmed_sample.jsonl")})
    meta = preprocess(
        pubmed,
        tmp_path / "pubmed",
        spm_options=dict(vocab_size=1000, sample_size=20_000),
        max_source_positions=2048,
        max_target_positions=256,
        progress=False,
    )
    counts = meta["splits"]["train"]["counts"]
    assert counts["examples"] == 50 and counts["truncated_source"] > 0
    # byte fallback (on by default): characters the 1,000 pieces cannot spell still round-trip, no ⁇
    assert meta["byte_fallback"] is True
    sp = load_spm(tmp_path / "pubmed")
    pieces = "".join(sp.IdToPiece(i) for i in range(sp.GetPieceSize()))
    rows = [json.loads(line) for line in (shared_data / "pubmed_sample.jsonl").read_text().splitlines()]
    texts = [r["document"] for r in rows] + [r["summary"] for r in rows]
    outside = [t for t in texts if any(c not in pieces for c in set(t) - set(" \n\t"))]
    assert len(outside) >= 20
    for text in outside:
        decoded = sp.DecodeIds(sp.EncodeAsIds(text))
        assert "\u2047" not in decoded and decoded == " ".join(text.split())  # sentencepiece folds whitespace
    qmsum = file_sources({"valid": str(shared_data / "qmsum_sample.jsonl")})
    meta = preprocess(
        qmsum,
        tmp_path / "qmsum",
        spm_model=str(tmp_path / "pubmed" / "spm.model"),
        max_source_positions=8192,
        max_target_positions=256,
        workers=2,
        progress=False,
    )
    counts = meta["splits"]["valid"]["counts"]
    assert counts["examples"] == 70 and counts["truncated_source"] > 30
    sp = load_spm(tmp_path / "qmsum")
    ds = SummarizationDataset(tmp_path / "qmsum", "valid", 100_000, 100_000)
    row = json.loads((shared_data / "qmsum_sample.jsonl").read_text().splitlines()[4])
    expected = sp.EncodeAsIds(row["document"])[:8191] + [EOS_ID]
    assert ds[4]["source"].tolist() == expected
    assert ds.tgt_sizes.max() <= 256


def test_byte_fallback_needs_room_in_the_vocabulary(tmp_path, caplog):
    from pyramidion_ds.data.binarize import has_byte_fallback
    from pyramidion_ds.data.spm import train_spm

    texts = [make_example(i, min_words=200, max_words=300).document for i in range(20)]
    with caplog.at_level("WARNING"):
        train_spm(texts, tmp_path / "auto", vocab_size=200)  # the default: off, with a warning, when too small
    assert "has no room for byte fallback's 256 byte pieces" in caplog.text
    assert not has_byte_fallback(load_spm(tmp_path / "auto"))
    with pytest.raises(
        DataError, match="byte fallback takes 256 pieces: raise --spm-vocab-size or pass --no-spm-byte-fallback"
    ):
        train_spm(texts, tmp_path / "on", vocab_size=200, byte_fallback=True)
    caplog.clear()
    train_spm(texts, tmp_path / "big", vocab_size=400)
    assert has_byte_fallback(load_spm(tmp_path / "big")) and not caplog.text


def test_generated_byte_pieces_that_spell_no_character_are_dropped(tmp_path):
    """A small model emits byte pieces out of order (a lead byte alone, a stray continuation byte):
    sentencepiece would print U+FFFD for each; the summary keeps only what the pieces spell."""
    from pyramidion_ds.data.spm import decode_text, train_spm

    texts = [make_example(i, min_words=200, max_words=300).document for i in range(20)]
    train_spm(texts, tmp_path / "spm", vocab_size=400)
    sp = load_spm(tmp_path / "spm")
    byte = {b: sp.PieceToId(f"<0x{b:02X}>") for b in range(256)}
    text = "the caf\u00e9 met \u2603 today"
    ids = sp.EncodeAsIds(text)
    assert any(sp.IsByte(i) for i in ids) and decode_text(sp, ids) == sp.DecodeIds(ids) == text
    the, met = sp.EncodeAsIds("the"), sp.EncodeAsIds("met")
    broken = the + [byte[0xE2]] + met + [byte[0x9C], byte[0xC3], byte[0xA9], byte[0xF0], byte[0x9F]]
    assert "\ufffd" in sp.DecodeIds(broken)
    assert decode_text(sp, broken) == sp.DecodeIds(the + met) + "\u00e9" == "the met\u00e9"


def test_a_killed_tokenizer_worker_is_an_error_not_a_hang(data_dir):
    import os
    import signal

    from pyramidion_ds.data.binarize import _Encoder

    encoder = _Encoder(2, (str(data_dir / "spm.model"), "uint16", 512, 128, True))
    try:
        chunks = [[("a", "some text here .", "a summary .")]] * 8
        first = next(encoder.map(iter(chunks[:1])))  # workers are up and working
        assert first[0][0] == "ok"
        # real workers, really killed: all of them, so no surviving worker can finish the chunks before the
        # pool notices (killing one idle worker raced with its sibling doing all the work: 1 run in 3 passed
        # without an error, correctly, since nothing was lost)
        for process in list(encoder.pool._processes.values()):
            os.kill(process.pid, signal.SIGKILL)
            process.join()
        with pytest.raises(DataError, match="tokenizer worker process died"):
            list(encoder.map(iter(chunks)))
    finally:
        encoder.close()


def test_a_pool_with_a_dead_worker_closes(data_dir):
    """The other workers ignore SIGTERM (a group-wide SIGTERM is the main process's to handle), so the pool's
    own SIGTERM cannot stop them once a worker died: close() must, or preprocess waits forever."""
    import os
    import signal
    import threading
    import time

    from pyramidion_ds.data.binarize import _Encoder

    encoder = _Encoder(2, (str(data_dir / "spm.model"), "uint16", 512, 128, True))
    list(encoder.map(iter([[("a", "some text here .", "a summary .")]] * 4)))  # both workers up
    os.kill(next(iter(encoder.pool._processes)), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while not encoder.pool._broken and time.monotonic() < deadline:
        time.sleep(0.05)
    assert encoder.pool._broken
    closing = threading.Thread(target=encoder.close, daemon=True)
    closing.start()
    closing.join(timeout=30)
    assert not closing.is_alive(), "close() hangs on the surviving worker"


def test_compressed_jsonl_is_read_and_a_damaged_one_is_named(tmp_path):
    """SumPubMed ships as train.jsonl.gz: read as it is; a cut-off archive or an unknown type is one line."""
    import bz2
    import gzip

    rows = [
        {"id": "a", "document": "caf\u00e9 met . it rained .", "summary": "met ."},
        {"id": "b", "document": "the board met .", "summary": "board ."},
    ]
    text = "".join(json.dumps(r) + "\n" for r in rows).encode()
    (tmp_path / "t.jsonl.gz").write_bytes(gzip.compress(text))
    (tmp_path / "t.jsonl.bz2").write_bytes(bz2.compress(text))
    for name in ("t.jsonl.gz", "t.jsonl.bz2"):
        records = list(file_sources({"train": str(tmp_path / name)})["train"].records())
        assert records == [(r["id"], r["document"], r["summary"]) for r in rows]
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(text)[:30])
    with pytest.raises(DataError, match=r"cut.jsonl.gz: cannot be decompressed .*expected a complete gzip file"):
        file_sources({"train": str(tmp_path / "cut.jsonl.gz")})
    (tmp_path / "t.parquet.gz").write_bytes(b"x")
    with pytest.raises(DataError, match=r"unknown file type '.parquet.gz', expected one of .jsonl"):
        file_sources({"train": str(tmp_path / "t.parquet.gz")})
