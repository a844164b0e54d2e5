"""tools/experiments/pooling_learns: planted spans -> piece positions, selection recall against encoder output,
the real split, the targets, the probe's oracle scorer; and the arrow that must never exist (package -> experiment).

The experiment's folder is on sys.path (conftest.py), so its scripts import as they do when run."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from pyramidion_ds.config import load_config
from pyramidion_ds.data.spm import load_spm, train_spm
from pyramidion_ds.data.synthetic import make_corpus
from pyramidion_ds.model import PyramidionModel

import probe_copy
import run
from report import check_targets
from selection import measure_selection, piece_offsets, salient_token_mask, selection_counts

PACKAGE = Path(__file__).resolve().parents[3] / "pyramidion_ds"


@pytest.fixture(scope="module")
def spm_and_docs(tmp_path_factory):
    """A real sentencepiece model trained on a few synthetic documents (vocabulary small enough that
    salient words split into several pieces), plus the documents."""
    docs = make_corpus(6, seed=5, min_words=300, max_words=400, num_salient=(2, 3))
    out = tmp_path_factory.mktemp("spm")
    train_spm(
        [d.document for d in docs] + ["naïve café ünïcode"],
        out,
        vocab_size=200,
        model_type="bpe",
        character_coverage=1.0,
    )
    return load_spm(out), docs


def test_piece_offsets_are_character_offsets_and_ids_match_encoding(spm_and_docs):
    spm, docs = spm_and_docs
    for text in [docs[0].document, "naïve café . agent haddad moved 7 ünïcode"]:
        ids, begins, ends = piece_offsets(spm, text)
        assert ids == spm.EncodeAsIds(text)
        assert len(ids) == len(begins) == len(ends)
        for piece_id, b, e in zip(ids, begins, ends, strict=True):
            surface = text[b:e]
            piece = spm.IdToPiece(piece_id).replace("\u2581", " ")
            if piece_id != spm.unk_id():
                assert surface.lstrip() == piece.lstrip(), (surface, piece)


def test_salient_pieces_are_exactly_the_planted_sentences(spm_and_docs):
    spm, docs = spm_and_docs
    for doc in docs:
        ids, begins, ends = piece_offsets(spm, doc.document)
        mask = salient_token_mask(begins, ends, doc.salient_spans)
        # the marked pieces decode to the planted sentences, in order, and nothing else
        decoded = spm.DecodeIds([i for i, m in zip(ids, mask, strict=True) if m])
        assert decoded.split() == doc.summary.split()
        # each planted sentence is one contiguous run of pieces
        runs = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])) == 1)
        assert len(runs) == len(doc.salient_spans)


def test_salient_mask_boundaries():
    # pieces: "▁a"(0,1) "▁b"(1,3) "▁c"(3,5) "▁d"(5,7) with the span covering "b c" = chars [2, 5)
    begins, ends = np.array([0, 1, 3, 5]), np.array([1, 3, 5, 7])
    assert salient_token_mask(begins, ends, [(2, 5)]).tolist() == [False, True, True, False]
    assert salient_token_mask(begins, ends, []).tolist() == [False] * 4


def test_selection_counts():
    salient = np.array([False, True, True, True, False])
    assert selection_counts(salient, [1, 3, 4]) == (2, 3)
    assert selection_counts(salient, [5, 0]) == (0, 3)  # </s> / out of range ignored
    assert selection_counts(salient, range(5)) == (3, 3)


def _model(variant, spm):
    cfg = load_config(
        None,
        [
            "--model.preset",
            "debug",
            "--model.variant",
            variant,
            "--model.vocab_size",
            str(spm.GetPieceSize()),
            "--model.max_source_positions",
            "1024",
            "--model.pooling_schedule",
            "[1024, 256, 128]",
            "--model.chunk_size",
            "64",
        ],
    )
    torch.manual_seed(0)
    return PyramidionModel(cfg.model).eval()


def test_measure_selection_without_pooling_keeps_everything(spm_and_docs):
    spm, docs = spm_and_docs
    records = [d.to_json() for d in docs[:3]]
    result = measure_selection(_model("blockwise", spm), spm, records, pad_to_multiple=64, batch_size=2)
    assert result["recall"] == 1.0 and result["salient_truncated"] == 0
    assert result["salient_tokens"] > 0 and result["documents"] == 3


def test_measure_selection_follows_the_scorer(spm_and_docs):
    """Scorers that rate planted pieces highest keep them all; rating them lowest keeps almost none.

    The encoder layers are made the identity and the (zeroed) position table flags the planted
    positions of one document in dimension 0, which every scorer reads with weight ``sign``."""
    spm, docs = spm_and_docs
    model = _model("pyramidion", spm)
    with torch.no_grad():
        for p in model.encoder.layers.parameters():
            p.zero_()
        model.embed_tokens.weight.zero_()

    def recall(doc, sign):
        _, begins, ends = piece_offsets(spm, doc.document)
        flags = torch.from_numpy(salient_token_mask(begins, ends, doc.salient_spans)).float()
        with torch.no_grad():
            model.encoder.positions.table.zero_()
            model.encoder.positions.table[: len(flags), 0] = flags
            for scorer in model.encoder.scorers:
                scorer.weight.zero_()
                scorer.bias.zero_()
                scorer.weight[0, 0] = 8.0 * sign
        return measure_selection(model, spm, [doc.to_json()], pad_to_multiple=64)

    for doc in docs[:3]:
        keep = recall(doc, +1.0)
        assert keep["recall"] == 1.0, keep
        assert keep["chance_recall"] < 0.5 and keep["precision"] > 0.5
        assert recall(doc, -1.0)["recall"] < 0.2


def test_real_split_is_deterministic(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("pubmed_sample.jsonl", "qmsum_sample.jsonl"):
        (data / name).write_text(
            "".join(json.dumps({"id": str(i), "document": f"d{i}", "summary": f"s{i}"}) + "\n" for i in range(20))
        )
    paths = run.make_real(tmp_path / "raw", data)
    counts = {split: len(path.read_text().splitlines()) for split, path in paths.items()}
    assert counts == {"train": 32, "valid": 4, "test": 4}
    assert [run.split_of(i) for i in range(3)] == ["test", "valid", "train"]


def test_missing_real_data_is_one_line_before_anything_is_written(tmp_path):
    out = tmp_path / "real"
    with pytest.raises(SystemExit) as exit_info:
        run.main(["--task", "real", "--out", str(out), "--real-data", str(tmp_path / "nowhere")])
    message = str(exit_info.value)
    assert message.startswith(f"{run.PROG}: error: --real-data {tmp_path / 'nowhere'}: no pubmed_sample.jsonl")
    assert "\n" not in message and not out.exists()


def test_each_task_finds_its_config_beside_the_runner():
    for task, spec in run.TASKS.items():
        path = run.config_path(spec)
        assert path.is_file() and path.parent == Path(run.__file__).resolve().parent / "configs", task
        load_config(str(path))


def test_targets():
    rows = {
        "pyramidion": {
            "rouge": {"rougeL": 0.95},
            "selection": {"recall": 0.85},
            "final_valid_loss": 1.0,
            "step_s_bench": 1.0,
        },
        "blockwise": {"final_valid_loss": 1.0, "step_s_bench": 2.0},
    }
    met = {t["target"]: t["met"] for t in check_targets(rows, "synthetic")}
    assert met == {
        "ROUGE-L >= 0.9": True,
        "selection recall >= 0.9": False,
        "valid loss <= 1.05 x blockwise": True,
        "step faster than blockwise (interleaved bench)": True,
    }
    assert check_targets(rows, "real") == []
    assert set(run.VARIANTS) == {"vanilla", "blockwise", "transpooler", "pyramidion"}


@pytest.mark.parametrize("scorer_input", ["hidden", "layer_norm"])
def test_probe_oracle_scorer_keeps_every_planted_piece_unmixed(spm_and_docs, scorer_input):
    """probe_copy.py --selection oracle: the claim its conclusions rest on (whatever the scorers read:
    configs/synthetic.yaml sets model.scorer_input=layer_norm)."""
    probe = probe_copy
    spm, docs = spm_and_docs
    cfg = load_config(
        None,
        [
            "--model.preset",
            "debug",
            "--model.variant",
            "pyramidion",
            "--model.vocab_size",
            str(spm.GetPieceSize()),
            "--model.max_source_positions",
            "1024",
            "--model.pooling_schedule",
            "[1024, 128, 128]",
            "--model.chunk_size",
            "64",
            "--model.scorer_input",
            scorer_input,
        ],
    )
    torch.manual_seed(0)
    model = PyramidionModel(cfg.model).eval()
    oracles = [probe.OracleScorer(linear) for linear in model.encoder.scorers]
    model.encoder.scorers = torch.nn.ModuleList(oracles)
    examples = probe.encode_records([d.to_json() for d in docs[:3]], spm, cfg.model)
    batch = probe.batch_of(examples, cfg.model, 64)
    for oracle in oracles:
        oracle.salient = batch["salient"]
    with torch.no_grad():
        out = model.encode(batch["src_tokens"], batch["src_lengths"])
    (info,) = out.pooling
    for row, example in enumerate(examples):
        planted = set(torch.nonzero(example["salient"]).flatten().tolist())
        assert planted and len(planted) < 128
        kept = out.source_positions[row][out.mask[row]].tolist()
        assert planted <= set(kept)
        slots = [i for i, p in enumerate(out.source_positions[row].tolist()) if out.mask[row, i] and p in planted]
        # a planted piece wins its pairs outright: its slot's pooled score stays ~1 (nothing mixed in)
        assert info.pooled_scores[row, slots].min() > 0.999


def test_the_package_never_imports_the_experiment():
    """The experiment depends one way on pyramidion_ds: nothing under the package imports its scripts."""
    experiment_import = re.compile(
        r"^\s*(?:from|import)\s+(?:run|report|selection|probe_copy|compare_learn|"
        r"pooling_learns|tools)\b",
        re.MULTILINE,
    )
    offenders = [
        f"{path.relative_to(PACKAGE)}: {match.group(0).strip()}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for match in experiment_import.finditer(path.read_text(encoding="utf-8"))
    ]
    assert PACKAGE.is_dir() and not offenders, offenders
