"""pyramidion-train under the real DeepSpeed launcher, 2 CPU processes (gloo): ZeRO-2 and ZeRO-3."""

import subprocess
import sys

import pytest
import torch
import yaml

from pyramidion_ds.checkpoint import CheckpointDir
from pyramidion_ds.checkpoint.consolidate import consolidated_state_dict

from ds_helpers import ROOT, gather_zero3_params, run_deepspeed, subprocess_env, tensorboard_scalars


def write_config(path, data_dir, save_dir, ds_config, **train):
    cfg = {
        "model": {"preset": "debug", "variant": "pyramidion", "dropout": 0.1},
        "data": {"data": str(data_dir), "max_tokens": 2048, "num_workers": 0},
        "train": {
            "save_dir": str(save_dir),
            "deepspeed_config": str(ROOT / "ds_configs" / ds_config),
            "lr": 2e-3,
            "warmup_updates": 3,
            "log_interval": 1,
            "seed": 3,
            **train,
        },
    }
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_zero2_trains_and_loss_goes_down(synthetic_bin, tmp_path):
    run = tmp_path / "run"
    cfg = write_config(
        tmp_path / "c.yaml", synthetic_bin, run, "zero2_cpu.json", max_update=40, validate_interval_updates=20
    )
    proc = run_deepspeed([cfg])
    log = (run / "train.log").read_text()
    assert "launcher=deepspeed world_size=2" in proc.stderr + proc.stdout + log
    losses = tensorboard_scalars(run / "tensorboard", "train/loss")
    assert sorted(losses) == list(range(1, 41))
    first, last = [losses[i] for i in range(1, 6)], [losses[i] for i in range(36, 41)]
    assert sum(last) / 5 < 0.8 * sum(first) / 5, losses
    assert tensorboard_scalars(run / "tensorboard", "valid/loss")
    # the validation + save after update 20 is named in the next interval's line and left out of its tokens/s
    assert list(tensorboard_scalars(run / "tensorboard", "train/validate_save_s")) == [21]
    # the selection figure of the last pooling (data/selection.py) at both validations, with its baselines
    for figure in ("own", "all", "lead", "control", "control_all", "lift"):
        values = tensorboard_scalars(run / "tensorboard", f"selection/layer2_{figure}")
        assert sorted(values) == [20, 40] and all(-1 <= v <= 1 for v in values.values()), (figure, values)
    assert "selection/layer2_lift" in log
    for tag in ("train/lr", "train/grad_norm", "train/tokens_per_s", "train/peak_mem_gib", "pooling/layer1_kept_score"):
        assert len(tensorboard_scalars(run / "tensorboard", tag)) == 40, tag
    for name in ("config.yaml", "ds_config.json", "spm.model"):
        assert (run / name).is_file()
    info = CheckpointDir(run).latest_complete()
    assert info.update == 40 and info.world_size == 2


def test_zero3_resume_is_exact_and_consolidation_matches(synthetic_bin, tmp_path):
    common = dict(max_update=12, total_num_update=12, save_interval_updates=6)
    full = tmp_path / "full"
    run_deepspeed([write_config(tmp_path / "full.yaml", synthetic_bin, full, "zero3_cpu.json", **common)])
    split = tmp_path / "split"
    split_cfg = write_config(tmp_path / "split.yaml", synthetic_bin, split, "zero3_cpu.json", **common)
    run_deepspeed([split_cfg, "--train.max_update", "6"])
    run_deepspeed([split_cfg])
    assert "resumed from" in (split / "train.log").read_text()

    a = tensorboard_scalars(full / "tensorboard", "train/loss")
    b = tensorboard_scalars(split / "tensorboard", "train/loss")
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert [b[i] for i in range(7, 13)] == pytest.approx([a[i] for i in range(7, 13)], rel=1e-6, abs=1e-7)

    # consolidated fp32 weights == parameters gathered from a live ZeRO-3 engine that resumed the run
    gathered = gather_zero3_params(tmp_path / "full.yaml", tmp_path / "gathered.pt")
    assert gathered["update"] == 12
    consolidated = consolidated_state_dict(CheckpointDir(full).latest_complete())
    assert set(gathered["params"]) <= set(consolidated)
    for name, tensor in gathered["params"].items():
        torch.testing.assert_close(consolidated[name], tensor, rtol=0, atol=0, msg=name)


def test_zero3_fused_scorer_trains_like_the_torch_path(synthetic_bin, tmp_path):
    """The encoder's pooling fused into Triton kernels (score_pool; here in Triton's interpreter on the CPU
    ranks) under ZeRO-3: the scorers' parameters are gathered inside their module's forward and re-gathered for
    the backward, so the run's losses and gradient norms are the torch path's to float32 rounding."""
    pytest.importorskip("triton")
    common = dict(max_update=4, total_num_update=4)
    runs = {}
    for backend in ("torch", "triton"):
        run = tmp_path / backend
        cfg = write_config(tmp_path / f"{backend}.yaml", synthetic_bin, run, "zero3_cpu.json", **common)
        env = {"PYRAMIDION_TOPK": backend, "TRITON_INTERPRET": "1" if backend == "triton" else "0"}
        run_deepspeed([cfg, "--model.dropout", "0"], env=env)
        runs[backend] = {tag: tensorboard_scalars(run / "tensorboard", f"train/{tag}") for tag in ("loss", "grad_norm")}
    for tag in ("loss", "grad_norm"):
        torch_path, fused = runs["torch"][tag], runs["triton"][tag]
        assert sorted(torch_path) == sorted(fused) == [1, 2, 3, 4], (tag, torch_path, fused)
        assert [fused[i] for i in range(1, 5)] == pytest.approx([torch_path[i] for i in range(1, 5)], rel=1e-4), tag


def test_bad_ds_config_fails_before_training(synthetic_bin, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}')
    cfg = write_config(tmp_path / "c.yaml", synthetic_bin, tmp_path / "run", str(bad), max_update=2)
    proc = subprocess.run(
        [sys.executable, "-m", "pyramidion_ds.cli.train", cfg],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "zero_optimization.offload_param is a stage-3 option" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run" / "checkpoints").exists()
