"""pyramidion-import: tiny random PEGASUS and BART checkpoints (transformers' config classes, saved to a temp
dir, no download) import into a `vanilla` Pyramidion that computes the same encoder output, logits and
generated tokens, with a tokenizer that gives the same ids as transformers' on the PubMed sample."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import hf_tiny  # noqa: E402 (after the skip: it needs transformers)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """{"pegasus": dir, "bart": dir}: tiny random checkpoints with their tokenizers, as save_pretrained writes."""
    root = tmp_path_factory.mktemp("hf")
    return {family: hf_tiny.build(root, family) for family in ("pegasus", "bart")}


@pytest.fixture(scope="module")
def imported(hf_dirs, tmp_path_factory):
    from pyramidion_ds.checkpoint.export import load_export
    from pyramidion_ds.checkpoint.hf_import import import_hf

    out = {}
    for family, hf_dir in hf_dirs.items():
        export = import_hf(hf_dir, tmp_path_factory.mktemp("export") / family, variant="vanilla")
        model, cfg, tok = load_export(export)
        hf_model = transformers.AutoModelForSeq2SeqLM.from_pretrained(hf_dir).eval()
        hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
        out[family] = (model, cfg, tok, hf_model, hf_tok, export)
    return out


def padded_batch(cfg, lengths=(17, 9, 13)):
    gen = torch.Generator().manual_seed(1)
    src = torch.full((len(lengths), max(lengths)), cfg.model.pad_id)
    for row, n in enumerate(lengths):
        src[row, : n - 1] = torch.randint(110, cfg.model.vocab_size, (n - 1,), generator=gen)
        src[row, n - 1] = cfg.model.eos_id
    return src, src.ne(cfg.model.pad_id)


@pytest.mark.parametrize("family", ["pegasus", "bart"])
def test_encoder_and_logits_equal_transformers(imported, family):
    model, cfg, _, hf_model, _, _ = imported[family]
    src, mask = padded_batch(cfg)
    tgt = torch.randint(110, cfg.model.vocab_size, (3, 7), generator=torch.Generator().manual_seed(2))
    prev = torch.cat([torch.full((3, 1), cfg.model.start_id), tgt[:, :-1]], dim=1)
    with torch.no_grad():
        ours_enc = model.encode(src, mask.sum(1))
        ours_logits = model(src, mask.sum(1), prev)
        ref = hf_model(input_ids=src, attention_mask=mask.long(), decoder_input_ids=prev)
    assert cfg.model.start_id == hf_model.config.decoder_start_token_id
    diff_enc = (ours_enc.hidden - ref.encoder_last_hidden_state)[mask].abs().max().item()
    assert diff_enc <= 1e-5, diff_enc
    diff_logits = (ours_logits - ref.logits).abs().max().item()
    assert diff_logits <= 1e-5, diff_logits


class FairseqLengthLimit(transformers.LogitsProcessor):
    """Our length rule (fairseq's) for transformers' generate: at the last step only </s> is allowed and keeps
    its log-probability (transformers' forced_eos_token_id would score it 0)."""

    def __init__(self, last_input_length: int, eos: int):
        self.last_input_length, self.eos = last_input_length, eos

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.last_input_length:
            eos = scores[:, self.eos].clone()
            scores[:] = -float("inf")
            scores[:, self.eos] = eos
        return scores


@pytest.mark.parametrize("family", ["pegasus", "bart"])
@pytest.mark.parametrize("beam", [1, 3])
def test_generation_equals_transformers(imported, family, beam):
    """Every hypothesis of the beam (tokens and length-normalised score), and greedy's tokens, as transformers'
    model.generate with the same settings."""
    from pyramidion_ds.generate.search import SearchOptions, generate

    model, cfg, _, hf_model, _, _ = imported[family]
    src, mask = padded_batch(cfg)
    m = cfg.model
    max_len = 12
    opts = SearchOptions(beam=beam, nbest=beam, lenpen=1.0, min_len=1, max_len_a=0.0, max_len_b=max_len)
    with torch.no_grad():
        ours = generate(model, src, mask.sum(1), opts)
        ref = hf_model.generate(
            input_ids=src,
            attention_mask=mask.long(),
            num_beams=beam,
            num_return_sequences=beam,
            do_sample=False,
            length_penalty=1.0,
            early_stopping=True,
            max_new_tokens=max_len + 1,
            min_new_tokens=1,
            logits_processor=transformers.LogitsProcessorList([FairseqLengthLimit(max_len + 1, m.eos_id)]),
            forced_bos_token_id=None,
            forced_eos_token_id=None,
            bad_words_ids=[[m.pad_id], [m.bos_id]],  # we never generate <pad> nor <s>
            no_repeat_ngram_size=0,
            decoder_start_token_id=m.start_id,
            eos_token_id=m.eos_id,
            pad_token_id=m.pad_id,
            output_scores=True,
            return_dict_in_generate=True,
        )
    for source, hypotheses in enumerate(ours):
        for rank, hypothesis in enumerate(hypotheses):
            row = source * beam + rank
            expected = [t for t in ref.sequences[row, 1:].tolist() if t != m.pad_id]
            assert hypothesis.tokens == expected, (source, rank, hypothesis.tokens, expected)
            if beam > 1:
                assert abs(hypothesis.score - float(ref.sequences_scores[row])) < 1e-4, (source, rank)


@pytest.mark.parametrize("family", ["pegasus", "bart"])
def test_tokenization_equals_transformers(imported, family):
    from pyramidion_ds.data.spm import decode_text
    from pyramidion_ds.data.tokenizer import encode_source

    _, cfg, tok, _, hf_tok, _ = imported[family]
    texts = hf_tiny.sample_texts()
    for text in texts:
        ours = encode_source(tok, text) + [tok.eos_id()]
        assert ours == hf_tok(text)["input_ids"], text[:80]
    ids = tok.EncodeAsIds(texts[0])
    assert decode_text(tok, ids) == hf_tok.decode(ids, skip_special_tokens=True)
    assert tok.GetPieceSize() == cfg.model.vocab_size


def test_vocabulary_identity_of_imports(imported):
    from pyramidion_ds.data.spm import spm_identity, spm_sha256

    ids = {family: spm_identity(entry[5]) for family, entry in imported.items()}
    assert len(set(ids.values())) == 2
    meta = json.loads((imported["bart"][5] / "export.json").read_text())
    assert meta["spm_identity"] == ids["bart"] and meta["spm_sha256"] == spm_sha256(imported["bart"][5])


def test_unsupported_architecture_and_missing_files(hf_dirs, tmp_path):
    import shutil

    from pyramidion_ds.checkpoint.hf_import import import_hf
    from pyramidion_ds.errors import UsageError

    t5 = tmp_path / "t5"
    t5.mkdir()
    (t5 / "config.json").write_text(json.dumps({"architectures": ["T5ForConditionalGeneration"]}))
    with pytest.raises(UsageError, match="unsupported architecture T5ForConditionalGeneration"):
        import_hf(t5, tmp_path / "out-t5" / "new" / "export")  # the parents it made are removed too
    no_weights = tmp_path / "pegasus-no-weights"
    shutil.copytree(hf_dirs["pegasus"], no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(UsageError, match="no model.safetensors nor pytorch_model.bin"):
        import_hf(no_weights, tmp_path / "out-nw")
    no_spm = tmp_path / "pegasus-no-spm"
    shutil.copytree(hf_dirs["pegasus"], no_spm)
    (no_spm / "spiece.model").unlink()
    with pytest.raises(UsageError, match="no spiece.model"):
        import_hf(no_spm, tmp_path / "out-ns")
    assert not any(p.name.startswith("out") or p.name.startswith(".out") for p in tmp_path.iterdir())


def test_cli_help_and_one_line_errors(tmp_path, capsys):
    from pyramidion_ds.cli.import_hf import main

    with pytest.raises(SystemExit) as exit_help:
        main(["--help"])
    assert exit_help.value.code == 0 and capsys.readouterr().out.startswith("usage: pyramidion-import")
    with pytest.raises(SystemExit) as exit_error:
        main([str(tmp_path / "missing"), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_error.value.code == 2 and err.count("\n") == 1 and "is not a directory" in err
    assert not (tmp_path / "out").exists()


def test_bin_checkpoint_imports_like_safetensors(hf_dirs, imported, tmp_path):
    """pytorch_model.bin (read with weights_only) gives the same export as model.safetensors."""
    import shutil

    from safetensors.torch import load_file

    from pyramidion_ds.checkpoint.hf_import import import_hf

    hf_bin = tmp_path / "bart-bin"
    shutil.copytree(hf_dirs["bart"], hf_bin)
    torch.save(load_file(str(hf_bin / "model.safetensors")), hf_bin / "pytorch_model.bin")
    (hf_bin / "model.safetensors").unlink()
    ours = load_file(str(import_hf(hf_bin, tmp_path / "export", variant="vanilla") / "model.safetensors"))
    reference = load_file(str(imported["bart"][5] / "model.safetensors"))
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[name], reference[name]) for name in ours)


def test_import_options_join_the_architecture_check():
    """An import's options must match for --init-from/resume; configs saved before them mean the defaults."""
    from pyramidion_ds.config import ModelConfig
    from pyramidion_ds.config.core import to_dict
    from pyramidion_ds.train.preflight import architecture_mismatch

    ours = to_dict(ModelConfig())
    old = {key: value for key, value in ours.items() if key not in ("scale_embedding", "layernorm_embedding")}
    assert architecture_mismatch(old, ours) is None
    bart_like = {**ours, "layernorm_embedding": True}
    assert architecture_mismatch(bart_like, ours) == "model.layernorm_embedding is True there, False here"


def test_positions_beyond_the_checkpoint(hf_dirs, tmp_path):
    """BART's learned table (offset 2 dropped) is repeated out to max_source_positions, as LED did; PEGASUS's
    sinusoidal positions are computed for any length exactly as transformers computes them."""
    from safetensors.torch import load_file

    from pyramidion_ds.checkpoint.hf_import import import_hf
    from pyramidion_ds.model.layers import PositionEmbedding

    export = import_hf(hf_dirs["bart"], tmp_path / "bart", variant="vanilla", max_source_positions=150)
    table = load_file(str(hf_dirs["bart"] / "model.safetensors"))["model.encoder.embed_positions.weight"][2:]
    ours = load_file(str(export / "model.safetensors"))["encoder.positions.weight"]
    assert ours.shape == (150, table.size(1))
    assert torch.equal(ours[:64], table) and torch.equal(ours[64:128], table) and torch.equal(ours[128:], table[:22])
    reference = transformers.models.pegasus.modeling_pegasus.PegasusSinusoidalPositionalEmbedding(300, 32)
    assert torch.allclose(PositionEmbedding(300, 32, False, "sinusoidal_pegasus").table, reference.create_weight())


def test_a_tensor_the_importer_does_not_map_is_refused(hf_dirs, tmp_path):
    """An architecture variant with extra weights (mBART's final encoder LayerNorm) is not silently dropped."""
    import shutil

    from safetensors.torch import load_file, save_file

    from pyramidion_ds.checkpoint.hf_import import import_hf
    from pyramidion_ds.errors import UsageError

    mbart_like = tmp_path / "mbart-like"
    shutil.copytree(hf_dirs["bart"], mbart_like)
    state = load_file(str(mbart_like / "model.safetensors"))
    state["model.encoder.layer_norm.weight"] = torch.ones(32)
    save_file(state, str(mbart_like / "model.safetensors"))
    with pytest.raises(UsageError, match="tensor 'encoder.layer_norm.weight' that a plain bart checkpoint does not"):
        import_hf(mbart_like, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family, name", [("pegasus", "spm.model"), ("bart", "bpe.json"), ("bart", "")])
def test_preprocess_takes_the_import_by_dir_or_file(imported, tmp_path, family, name):
    from pyramidion_ds.data.binarize import prepare_spm
    from pyramidion_ds.data.spm import spm_identity

    export = imported[family][5]
    prepare_spm(tmp_path / "bin", {}, spm_model=str(export / name if name else export))
    assert spm_identity(tmp_path / "bin") == spm_identity(export)
