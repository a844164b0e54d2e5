"""Nothing lost, nothing run: checks before the first write, checksummed checkpoints with fallback, no code
from a run dir, a full disk in one line, an export cache keyed by the checkpoint, a rerun of the same
corpus that resumes. One 2-rank training run per module; the tests copy it."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pyramidion_ds.checkpoint import CheckpointDir, tag_for
from pyramidion_ds.data.spm import file_sha256

from ds_helpers import ROOT, run_deepspeed, subprocess_env


def config(tmp_path, name, data_dir, **train):
    cfg = {
        "model": {"preset": "debug"},
        "data": {"data": str(data_dir), "max_tokens": 2048, "num_workers": 0},
        "train": {
            "save_dir": str(tmp_path / name),
            "deepspeed_config": str(ROOT / "ds_configs/zero2_cpu.json"),
            "lr": 2e-3,
            "log_interval": 1,
            "save_interval_updates": 1,
            **train,
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def cli(module, args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", f"pyramidion_ds.cli.{module}", *args],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=ROOT,
        timeout=timeout,
    )


def last_line(proc) -> str:
    return proc.stderr.strip().splitlines()[-1]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def preprocess(raw: Path, dest: Path, *extra):
    files = ",".join(f"{split}={raw / f'{split}.jsonl'}" for split in ("train", "valid", "test"))
    proc = cli(
        "preprocess",
        [
            "--source-files",
            files,
            "--destdir",
            str(dest),
            "--spm-vocab-size",
            "256",
            "--workers",
            "1",
            "--max-source-positions",
            "512",
            "--max-target-positions",
            "128",
            "--quiet",
            *extra,
        ],
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return dest


@pytest.fixture(scope="module")
def base_run(synthetic_bin, tmp_path_factory):
    """2 ranks, ZeRO-2, checkpoints at updates 1 and 2."""
    root = tmp_path_factory.mktemp("integrity")
    run_deepspeed([config(root, "run", synthetic_bin, max_update=2)])
    return root / "run"


def copy_run(base_run, tmp_path, name="run") -> Path:
    shutil.copytree(base_run, tmp_path / name)
    return tmp_path / name


def test_corrupt_newest_checkpoint_is_skipped_on_resume(base_run, synthetic_bin, tmp_path):
    run = copy_run(base_run, tmp_path)
    shard = run / "checkpoints" / tag_for(2) / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum tells
    shard.write_bytes(bytes(data))
    # and the trainer before died holding the run dir (kill -9): its lock is taken over, and train.log says so
    (run / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": 4242, "started": 0}) + "\n")
    proc = run_deepspeed([config(tmp_path, "run", synthetic_bin, max_update=2)])
    log = (run / "train.log").read_text()
    assert f"taking over the lock of {run} left by a trainer that is gone (host {socket.gethostname()}, pid 4242" in log
    assert f"{shard.name} does not match the sha256" in proc.stdout + proc.stderr + log
    assert f"falling back to '{tag_for(1)}'" in log and f"resumed from {run / 'checkpoints' / tag_for(1)}" in log
    info = CheckpointDir(run).latest_complete(warn=lambda m: None, verify=True)
    assert info.tag == tag_for(2) and info.checksum_problem() is None  # saved anew, whole


def test_resume_with_another_vocabulary_writes_nothing(base_run, synthetic_bin, tmp_path):
    run = copy_run(base_run, tmp_path)
    other = preprocess(synthetic_bin.parent / "raw", tmp_path / "other-bin", "--spm-model-type", "bpe")
    before = snapshot(run)
    proc = cli("train", [config(tmp_path, "run", other, max_update=3)])
    assert proc.returncode == 2
    line = last_line(proc)
    assert "was trained with another sentencepiece vocabulary" in line
    assert "--no-resume" in line and "another train.save_dir" in line
    assert snapshot(run) == before  # spm.model, config.yaml, ds_config.json untouched


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("truncated_bin", "index points past the data file"),
        ("missing_header", "missing shard header"),
        ("zero_typo", "unknown key 'zero_optimization.overlap_com'; did you mean 'overlap_comm'?"),
    ],
)
def test_bad_input_is_refused_before_the_first_write(synthetic_bin, tmp_path, breakage, message):
    data, ds = tmp_path / "bin", ROOT / "ds_configs/zero2_cpu.json"
    shutil.copytree(synthetic_bin, data)
    if breakage == "truncated_bin":
        path = data / "valid.source.bin"
        path.write_bytes(path.read_bytes()[:100])
    elif breakage == "missing_header":
        (data / "train.target.json").unlink()
    else:
        raw = json.loads(ds.read_text())
        raw["zero_optimization"]["overlap_com"] = True
        ds = tmp_path / "typo.json"
        ds.write_text(json.dumps(raw))
    proc = cli("train", [config(tmp_path, "run", data, max_update=1, deepspeed_config=str(ds))])
    assert proc.returncode == 2 and message in last_line(proc), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_crafted_run_dir_runs_nothing(base_run, synthetic_bin, tmp_path):
    run = copy_run(base_run, tmp_path)
    marker = tmp_path / "pwned"
    tag = tag_for(2)
    shard = run / "checkpoints" / tag / "mp_rank_00_model_states.pt"
    state = torch.load(shard, weights_only=False)  # our own file, trusted here
    state["payload"] = Payload(marker)
    torch.save(state, shard)
    manifest_path = run / "checkpoints" / tag / "manifest.json"
    manifest = json.loads(manifest_path.read_text())  # consistent, as an attacker would write it
    manifest["files"][shard.name] = {"size": shard.stat().st_size, "sha256": file_sha256(shard)}
    manifest_path.write_text(json.dumps(manifest))

    runs = {
        "consolidate": cli("generate", ["--consolidate", str(run), "--export-dir", str(tmp_path / "export")]),
        "init_from": cli("train", [config(tmp_path, "fine", synthetic_bin, max_update=1), "--init-from", str(run)]),
        "resume": cli("train", [config(tmp_path, "run", synthetic_bin, max_update=3)]),
    }
    for what, proc in runs.items():
        assert proc.returncode == 2, (what, proc.stderr[-2000:])
        assert "refusing to load" in last_line(proc) and "system" in last_line(proc), (what, last_line(proc))
    assert not marker.exists()
    assert not (tmp_path / "export").exists() and not (tmp_path / "fine").exists()


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MiB tmpfs: room for one debug ZeRO-2 checkpoint (3.5 MB) but not two."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)], capture_output=True)


def test_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(synthetic_bin, tmp_path, small_disk):
    proc = cli("train", [config(small_disk, "run", synthetic_bin, max_update=2)])
    run = small_disk / "run"
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    line = last_line(proc)
    assert f"saving checkpoint {tag_for(2)} at update 2 failed: no space left on device" in line
    assert f"latest complete checkpoint: {tag_for(1)}" in line
    assert line.split("| ")[-1] in (run / "train.log").read_text()
    ckpt = CheckpointDir(run)
    assert ckpt.read_pointer("latest") == tag_for(1) and ckpt.tags() == [tag_for(1)]  # partial one removed
    from pyramidion_ds.checkpoint.weights import init_source

    assert init_source(run).state_dict()  # the previous checkpoint still loads


def test_rerun_on_the_same_corpus_resumes_and_generates_and_a_retrain_reexports(synthetic_bin, tmp_path):
    """The quick start twice: preprocessing again gives another spm.model file (it records the temporary
    path of its training text) but the same vocabulary; training resumes (done at once), generation
    works. A --no-resume retrain to the same tag gets a fresh export, not the cached one."""
    from safetensors.torch import load_file

    cfg = config(tmp_path, "run", synthetic_bin, max_update=1)
    assert cli("train", [cfg]).returncode == 0
    gen = ["--gen-subset", "test", "--beam", "2", "--max-len-b", "5", "--batch-size", "4", "--no-progress-bar"]
    first = cli("generate", [str(tmp_path / "run"), *gen, "--results-path", str(tmp_path / "g1")])
    assert first.returncode == 0, first.stderr[-2000:]

    again = preprocess(synthetic_bin.parent / "raw", tmp_path / "bin-again")
    assert file_sha256(again / "spm.model") != file_sha256(synthetic_bin / "spm.model")
    cfg_again = config(tmp_path, "run", again, max_update=1)
    rerun = cli("train", [cfg_again])
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resumed from" in rerun.stderr
    second = cli(
        "generate", [str(tmp_path / "run"), "--data", str(again), *gen, "--results-path", str(tmp_path / "g2")]
    )
    assert second.returncode == 0, second.stderr[-2000:]

    export = tmp_path / "run" / "export" / tag_for(1)
    old_weights = load_file(str(export / "model.safetensors"))
    retrain = cli("train", [cfg_again, "--no-resume", "--train.seed", "9"])
    assert retrain.returncode == 0, retrain.stderr[-2000:]
    from pyramidion_ds.checkpoint.export import export_for

    assert export_for(tmp_path / "run") == export
    meta = json.loads((export / "export.json").read_text())
    assert meta["checkpoint_sha256"] == CheckpointDir(tmp_path / "run").info(tag_for(1)).manifest_sha256
    new_weights = load_file(str(export / "model.safetensors"))
    assert any(not torch.equal(old_weights[name], new_weights[name]) for name in old_weights)
