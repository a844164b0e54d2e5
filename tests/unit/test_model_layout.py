"""Fused attention projections, and checkpoints written before them.

``tests/data/pre_fused_export`` is a real export dir written by the code before the fusion (separate
``q_proj``/``k_proj``/``v_proj``; ``tests/data/make_pre_fused_export.py`` says how), with the logits that
code computed for a fixed input. Every loader must take it and give the same logits.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pyramidion_ds.checkpoint.export import load_export
from pyramidion_ds.config.model import ModelConfig
from pyramidion_ds.engine import load_full_state_dict
from pyramidion_ds.errors import UsageError
from pyramidion_ds.model import PyramidionModel

FIXTURE = Path(__file__).resolve().parent.parent / "data" / "pre_fused_export"


def _expected():
    return load_file(str(FIXTURE / "expected.safetensors"))


def _logits(model, expected):
    with torch.no_grad():
        return model(expected["src_tokens"], expected["src_lengths"], expected["prev_output_tokens"])


def _fixture_model():
    from pyramidion_ds.checkpoint.export import _run_config

    return PyramidionModel(_run_config(FIXTURE).model).eval()


def test_fixture_has_the_old_layout():
    names = set(load_file(str(FIXTURE / "model.safetensors")))
    assert "encoder.layers.0.self_attn.q_proj.weight" in names
    assert "decoder.layers.0.encoder_attn.k_proj.bias" in names
    assert not any("qkv_proj" in name or "kv_proj" in name for name in names)


def test_old_export_loads_and_gives_the_old_logits():
    model, cfg, spm = load_export(FIXTURE)
    expected = _expected()
    assert torch.allclose(_logits(model, expected), expected["logits"], atol=1e-5, rtol=1e-5)
    names = set(model.state_dict())
    assert "encoder.layers.0.self_attn.qkv_proj.weight" in names
    assert "decoder.layers.1.encoder_attn.kv_proj.weight" in names
    assert "decoder.layers.1.encoder_attn.q_proj.weight" in names
    assert not any(".k_proj." in name or ".v_proj." in name for name in names)


def test_load_state_dict_strict_converts_through_the_hook():
    model = _fixture_model()
    model.load_state_dict(load_file(str(FIXTURE / "model.safetensors")), strict=True)
    expected = _expected()
    assert torch.allclose(_logits(model, expected), expected["logits"], atol=1e-5, rtol=1e-5)


def test_engine_loader_converts_old_names():
    """--init-from and resume on another world size go through load_full_state_dict."""
    model = _fixture_model()
    load_full_state_dict(model, load_file(str(FIXTURE / "model.safetensors")), zero3=False)
    expected = _expected()
    assert torch.allclose(_logits(model, expected), expected["logits"], atol=1e-5, rtol=1e-5)


def test_upgrade_is_idempotent_on_the_new_layout():
    model = _fixture_model()
    state = model.state_dict()
    upgraded = model.upgrade_state_dict(state)
    assert upgraded.keys() == state.keys() and all(upgraded[k] is state[k] for k in state)


def test_incomplete_old_projection_set_is_reported(tmp_path):
    from pyramidion_ds.checkpoint.export import write_safetensors

    export = tmp_path / "export"
    shutil.copytree(FIXTURE, export)
    state = load_file(str(FIXTURE / "model.safetensors"))
    del state["encoder.layers.1.self_attn.v_proj.weight"]
    write_safetensors(export / "model.safetensors", state, torch.float32)
    with pytest.raises(
        UsageError,
        match=r"tensor 'encoder\.layers\.1\.self_attn\.qkv_proj\.weight' of the "
        r"configured model is missing",
    ):
        load_export(export)


def test_fused_projections_cut_the_parameter_tensors():
    """base: 269 parameter tensors with separate projections; 4 fewer per self-attention, 2 per cross."""
    model = PyramidionModel(ModelConfig(preset="base", vocab_size=100))
    assert len(list(model.parameters())) == 269 - 4 * (6 + 6) - 2 * 6


def test_resuming_a_pre_fusion_zero_checkpoint_is_refused_with_the_way_out():
    """Its flat optimizer partitions would load without error into the permuted parameter order."""
    from pyramidion_ds.checkpoint.manifest import stale_layout_problem

    checkpoint = FIXTURE.parent / "pre_fused_zero2" / "old"
    problem = stale_layout_problem(checkpoint)
    assert problem is not None and "\n" not in problem
    assert "written before the attention projections were fused" in problem
    assert f"--train.init_from {checkpoint.parent.parent}" in problem


def test_a_checkpoint_of_the_fused_layout_resumes(tmp_path):
    from pyramidion_ds.checkpoint.manifest import stale_layout_problem

    model = _fixture_model()
    torch.save(
        {"module": model.state_dict(), "param_shapes": [{n: p.shape for n, p in model.named_parameters()}]},
        tmp_path / "mp_rank_00_model_states.pt",
    )
    assert stale_layout_problem(tmp_path) is None


def test_a_run_saved_before_the_centred_scorer_keeps_its_scorer():
    """A saved model config lists every field, so one without ``scorer_centre`` predates it and meant the
    uncentred scorer: exports load that way (the logits above), and resuming such a run with the new
    default is refused in one line instead of silently changing what its weights compute."""
    from pyramidion_ds.config import to_dict
    from pyramidion_ds.train.preflight import computation_mismatch

    current = ModelConfig(preset="debug", variant="pyramidion", vocab_size=50)
    saved = {k: v for k, v in to_dict(current).items() if k != "scorer_centre"}
    assert computation_mismatch(saved, current) == "model.scorer_centre is False there, True here"
    current.scorer_centre = False
    assert computation_mismatch(saved, current) is None
    assert computation_mismatch(to_dict(current), current) is None
