"""Imported checkpoints train: pyramidion-import a tiny PEGASUS- and BART-shaped checkpoint as a `pyramidion`
(pooling) model, binarize with the imported tokenizer (pyramidion-preprocess --spm-model EXPORT), and fine-tune
with --init-from under the real DeepSpeed launcher on 2 CPU ranks: ZeRO-3 for both families; the loss falls.
One run per family; the command-line path (pyramidion-import, preprocess, train) is the user's."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml

from pyramidion_ds.checkpoint.export import EXPORT_WEIGHTS

from ds_helpers import ROOT, run_deepspeed, subprocess_env, tensorboard_scalars

pytest.importorskip("transformers")

import hf_tiny  # noqa: E402 (after the skip: it needs transformers)


def cli(module: str, *args: str):
    proc = subprocess.run(
        [sys.executable, "-m", f"pyramidion_ds.cli.{module}", *args],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("family", ["pegasus", "bart"])
def test_imported_model_trains_under_zero3(family, tmp_path):
    from pyramidion_ds.data.synthetic import write_corpus

    hf_dir = hf_tiny.build(tmp_path / "hf", family, max_position_embeddings=96)
    export = tmp_path / "export"
    # 192 source positions: BART's 96 learned positions are copied out (LED), PEGASUS's computed
    cli("import_hf", str(hf_dir), str(export), "--max-source-positions", "192", "--pooling-schedule", "[192, 96]")
    raw = write_corpus(tmp_path / "raw", {"train": 32, "valid": 4}, seed=0, min_words=60, max_words=150)
    data = tmp_path / "bin"
    files = ",".join(f"{split}={path}" for split, path in raw.items())
    cli(
        "preprocess",
        *("--source-files", files, "--destdir", str(data), "--spm-model", str(export), "--workers", "1"),
        *("--max-source-positions", "192", "--max-target-positions", "96"),
    )
    cfg = yaml.safe_load((export / "config.yaml").read_text())
    assert cfg["model"]["variant"] == "pyramidion" and cfg["model"]["max_source_positions"] == 192
    cfg["data"].update(data=str(data), max_tokens=1024, num_workers=0)
    cfg["train"].update(
        save_dir=str(tmp_path / "run"),
        deepspeed_config=str(ROOT / "ds_configs/zero3_cpu.json"),
        lr=3e-3,
        warmup_updates=2,
        max_update=12,
        log_interval=1,
    )
    config = tmp_path / "fine.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run_deepspeed([str(config), "--init-from", str(export)])
    log = (tmp_path / "run" / "train.log").read_text()
    assert f"initialized weights from {export}" in log and "ZeRO-3" in log, log[-2000:]
    losses = tensorboard_scalars(tmp_path / "run" / "tensorboard", "train/loss")
    assert sorted(losses) == list(range(1, 13))
    first, last = [losses[i] for i in (1, 2, 3)], [losses[i] for i in (10, 11, 12)]
    assert sum(last) < 0.95 * sum(first), losses
    # the trained run consolidates into an export generation loads: the frozen logits bias and the
    # imported tokenizer (with its vocabulary identity) come through ZeRO-3's shards and the run dir
    from safetensors.torch import load_file

    from pyramidion_ds.checkpoint.export import consolidate, load_export
    from pyramidion_ds.data.spm import spm_identity

    _, _, tok = load_export(consolidate(tmp_path / "run", tmp_path / "trained"))
    bias = "embed_tokens.final_logits_bias"
    assert torch.equal(
        load_file(str(tmp_path / "trained" / EXPORT_WEIGHTS))[bias], load_file(str(export / EXPORT_WEIGHTS))[bias]
    )
    assert spm_identity(tmp_path / "trained") == spm_identity(export) == spm_identity(data)
    assert tok.eos_id() == cfg["model"]["eos_id"]
