"""Preemption, pretrain -> fine-tune, activation checkpointing, and inputs refused before any step."""

import signal
import subprocess
import sys

import pytest
import yaml

from pyramidion_ds.checkpoint import CheckpointDir
from pyramidion_ds.errors import EXIT_PREEMPTED

from ds_helpers import ROOT, run_deepspeed, subprocess_env, tensorboard_scalars


def config(tmp_path, name, data_dir, **sections):
    cfg = {
        "model": {"preset": "debug"},
        "data": {"data": str(data_dir), "max_tokens": 2048, "num_workers": 0},
        "train": {
            "save_dir": str(tmp_path / name),
            "deepspeed_config": str(ROOT / "ds_configs/zero2_cpu.json"),
            "lr": 2e-3,
            "log_interval": 1,
        },
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def train_single(args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "pyramidion_ds.cli.train", *args],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=ROOT,
        timeout=timeout,
    )


def test_sigusr1_saves_and_exits_for_requeue_then_resume_finishes(synthetic_bin, tmp_path):
    cfg = config(tmp_path, "run", synthetic_bin, train={"max_update": 400})
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyramidion_ds.cli.train", cfg],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=subprocess_env(),
        cwd=ROOT,
    )
    output = []
    for line in proc.stdout:  # wait until training runs, then signal like SLURM does before a time limit
        output.append(line)
        if "train | update 3 " in line:
            proc.send_signal(signal.SIGUSR1)
            break
    output.extend(proc.stdout)
    assert proc.wait(timeout=120) == EXIT_PREEMPTED, "".join(output)[-3000:]
    info = CheckpointDir(tmp_path / "run").latest_complete()
    assert info is not None and 3 <= info.update < 400
    assert "received SIGUSR1" in "".join(output)

    resumed = train_single([cfg, "--train.max_update", str(info.update + 3)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    losses = tensorboard_scalars(tmp_path / "run" / "tensorboard", "train/loss")
    assert max(losses) == info.update + 3


def weights(run_dir):
    from pyramidion_ds.checkpoint.weights import init_source

    return init_source(run_dir).state_dict()


def test_pretrain_gap_sentences_then_finetune_with_init_from(synthetic_bin, tmp_path):
    pre = config(tmp_path, "pre", synthetic_bin, data={"task": "gap_sentences"}, train={"max_update": 6})
    run_deepspeed([pre])
    assert CheckpointDir(tmp_path / "pre").latest_complete().update == 6
    # at lr 1e-7 the weights must stay where --init-from put them: ZeRO keeps an fp32 master copy taken at
    # deepspeed.initialize, and loaded weights must reach it, or the first step puts the random init back
    # (ZeRO-3: tests/cluster/test_slurm_train.py::test_pretrain_then_finetune_with_dependency_and_init_from)
    fine = config(
        tmp_path,
        "fine",
        synthetic_bin,
        train={"max_update": 4, "activation_checkpointing": "stage", "lr": 1e-7, "warmup_updates": 0},
    )
    run_deepspeed([fine, "--init-from", str(tmp_path / "pre")])
    log = (tmp_path / "fine" / "train.log").read_text()
    assert f"initialized weights from {tmp_path / 'pre'}" in log
    assert "checkpointing=stage" in log
    assert sorted(tensorboard_scalars(tmp_path / "fine" / "tensorboard", "train/loss")) == [1, 2, 3, 4]
    before, after = weights(tmp_path / "pre"), weights(tmp_path / "fine")
    drift = max(float((after[name] - before[name]).abs().max()) for name in before)
    assert drift < 1e-4, f"weights moved by {drift} in 4 updates at lr 1e-7: the initialisation came back"

    # another architecture is refused before any step, naming the difference
    other = config(
        tmp_path,
        "other",
        synthetic_bin,
        model={"preset": "debug", "d_model": 32},
        train={"max_update": 2, "init_from": str(tmp_path / "pre")},
    )
    proc = train_single([other])
    assert proc.returncode == 2
    assert "is another architecture: model.d_model is 64 there, 32 here" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--data.data", "/nonexistent/bin"], "has no meta.json"),
        (["--model.vocab_size", "999"], "but the data's sentencepiece model has"),
    ],
)
def test_bad_inputs_stop_before_anything_is_written(synthetic_bin, tmp_path, overrides, message):
    cfg = config(tmp_path, "run", synthetic_bin, train={"max_update": 2})
    proc = train_single([cfg, *overrides])
    assert proc.returncode == 2 and message in proc.stderr
    assert not (tmp_path / "run").exists()


def test_run_dir_of_another_model_is_refused(synthetic_bin, tmp_path):
    cfg = config(tmp_path, "run", synthetic_bin, train={"max_update": 1})
    assert train_single([cfg]).returncode == 0
    proc = train_single([cfg, "--model.encoder_layers", "2"])
    assert proc.returncode == 2 and "holds checkpoints of another model" in proc.stderr
    # same parameters, another computation: refused before anything is written, nothing deleted
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file() and "tensorboard" not in p.parts}
    for overrides, problem in (
        (["--model.variant", "blockwise"], "model.variant is 'pyramidion' there, 'blockwise' here"),
        (["--model.pooling_schedule", "[512, 256, 256]"], "encoder widths"),
        (["--model.chunk_size", "128"], "model.chunk_size is 64 there, 128 here"),
    ):
        proc = train_single([cfg, *overrides, "--train.keep_last_checkpoints", "1", "--train.max_update", "3"])
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert problem in proc.stderr and f"--train.init_from {tmp_path / 'run'}" in proc.stderr
        after = {
            p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file() and "tensorboard" not in p.parts
        }
        assert after == before


def test_repeated_nonfinite_loss_stops_naming_the_update(synthetic_bin, tmp_path):
    # an absurd learning rate without clipping blows the weights up after the first update
    cfg = config(
        tmp_path,
        "run",
        synthetic_bin,
        train={"max_update": 40, "lr": 1.0e6, "clip_norm": 0.0, "max_nonfinite_steps": 2, "label_smoothing": 0.0},
    )
    proc = train_single([cfg])
    assert proc.returncode == 1
    assert "non-finite loss or gradients for 2 consecutive updates at update 2; stopping without saving" in proc.stderr
    assert "non-finite loss at update 2; update skipped (1/2)" in proc.stderr
    assert CheckpointDir(tmp_path / "run").latest_complete() is None


def test_init_from_another_vocabulary_is_refused(synthetic_bin, tmp_path):
    """Same vocabulary size, other pieces: the sentencepiece hash tells them apart."""
    from pyramidion_ds.data.synthetic import write_corpus

    paths = write_corpus(tmp_path / "raw", {"train": 40, "valid": 4}, seed=7, min_words=80, max_words=200)
    other_bin = tmp_path / "other-bin"
    files = ",".join(f"{split}={path}" for split, path in paths.items())
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyramidion_ds.cli.preprocess",
            "--source-files",
            files,
            "--destdir",
            str(other_bin),
            "--spm-vocab-size",
            "256",
            "--spm-model-type",
            "bpe",
            "--max-source-positions",
            "512",
            "--max-target-positions",
            "128",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    pre = config(tmp_path, "pre", synthetic_bin, train={"max_update": 1})
    assert train_single([pre]).returncode == 0
    fine = config(tmp_path, "fine", other_bin, train={"max_update": 1, "init_from": str(tmp_path / "pre")})
    proc = train_single([fine])
    assert proc.returncode == 2
    assert "used another sentencepiece vocabulary" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "fine").exists()  # refused before anything was written
