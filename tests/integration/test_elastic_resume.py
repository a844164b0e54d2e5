"""Elastic resume under the real DeepSpeed launcher (CPU, gloo): a 2-rank run saved at update 2 continues on
1 and 3 ranks, and from ZeRO-2 under ZeRO-3, through DeepSpeed's universal checkpoint.

One uninterrupted 2-rank reference per ZeRO stage (module fixtures, 2 ranks x update_freq 3 = 6 micro-batches
per update, one epoch in 6 updates, a checkpoint after every update); each resume starts from a copy of the
reference's run dir cut back to update 2, and is compared with it: the losses of the updates after the
resume, the data position reached at the end of the epoch, and the consolidated Adam moments one update
after the resume (the saved moments carried on; later, Adam's division by tiny second moments makes
float-order noise grow, so one update is where "the same moments" is testable at 1e-6). The refusals run
the trainer in one process, without the launcher: they stop in the checks."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pyramidion_ds.checkpoint import CheckpointDir, tag_for, universal
from pyramidion_ds.checkpoint.safe_load import safe_torch_load

from ds_helpers import ROOT, run_deepspeed, subprocess_env, tensorboard_scalars

SAVED, LAST = 2, 6  # the resumes start at update SAVED; every run ends at update LAST


def write_config(path: Path, data_dir, save_dir, ds_config: str, **train) -> str:
    cfg = {
        # no dropout: the ranks' dropout streams differ between world sizes
        "model": {"preset": "debug", "variant": "pyramidion", "dropout": 0.0},
        "data": {"data": str(data_dir), "max_tokens": 1024, "num_workers": 0},
        "train": {
            "save_dir": str(save_dir),
            "deepspeed_config": str(ROOT / "ds_configs" / ds_config),
            "lr": 2e-3,
            "warmup_updates": 2,
            "log_interval": 1,
            "seed": 3,
            "update_freq": 3,
            "max_update": LAST,
            "total_num_update": LAST,
            "save_interval_updates": 1,
            "keep_last_checkpoints": 0,
            **train,
        },
    }
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture(scope="module")
def references(synthetic_bin, tmp_path_factory):
    """ZeRO stage -> the run dir of an uninterrupted 2-rank run (checkpoints at 2, 4, 6)."""
    root = tmp_path_factory.mktemp("elastic")
    runs = {}
    for stage in (2, 3):
        run = root / f"zero{stage}"
        run_deepspeed([write_config(root / f"zero{stage}.yaml", synthetic_bin, run, f"zero{stage}_cpu.json")])
        runs[stage] = run
    return runs


def cut_back(reference: Path, dest: Path, update: int = SAVED) -> Path:
    """A copy of ``reference`` as it was right after saving ``update`` (later checkpoints and logs gone)."""
    shutil.copytree(reference, dest, symlinks=True)
    for tag in CheckpointDir(dest).tags():
        if tag > tag_for(update):
            shutil.rmtree(dest / "checkpoints" / tag)
    (dest / "checkpoints" / "latest").write_text(tag_for(update))
    shutil.rmtree(dest / "tensorboard")
    (dest / "train.log").unlink()
    return dest


def client_state(info) -> dict:
    name = next(n for n in universal.MODEL_STATES if (info.path / n).is_file())
    return safe_torch_load(info.path / name, map_location="cpu")


def consolidated(run: Path, update: int, name: str) -> dict:
    """``param -> tensor`` of a checkpoint's ``fp32`` / ``exp_avg`` / ``exp_avg_sq`` (universal)."""
    info = CheckpointDir(run).info(tag_for(update))
    if not universal.ready(info):
        universal.convert(info, workers=1)
    return universal.load_states(info, name)


@pytest.mark.parametrize(
    "stage,ranks,target",
    [(2, 1, 2), (2, 3, 2), (3, 1, 3), (3, 3, 3), (2, 2, 3)],
    ids=["zero2-2to1", "zero2-2to3", "zero3-2to1", "zero3-2to3", "zero2to3-2ranks"],
)
def test_resume_on_another_world_size_or_stage_continues_exactly(
    references, synthetic_bin, tmp_path, stage, ranks, target
):
    reference = references[stage]
    run = cut_back(reference, tmp_path / "run")
    cfg = write_config(tmp_path / "c.yaml", synthetic_bin, run, f"zero{target}_cpu.json")
    run_deepspeed([cfg], nproc=ranks)

    log = (run / "train.log").read_text()
    layout = [f"{2} ranks -> {ranks}"] if ranks != 2 else []
    layout += [f"ZeRO-{stage} -> ZeRO-{target}"] if stage != target else []
    assert f"on another layout ({', '.join(layout)}): converted" in log, log[-3000:]
    assert f"update_freq 3 -> {6 // ranks}" in log if ranks != 2 else "update_freq 3 ->" not in log
    assert f"resumed from {run / 'checkpoints' / tag_for(SAVED)} at update {SAVED}" in log
    converted = run / "checkpoints" / tag_for(SAVED) / "universal"
    assert json.loads((converted / "manifest.json").read_text())["files"]  # checksummed like every checkpoint

    # the updates after the resume: the uninterrupted run's losses (same global batch; fp32)
    expected = tensorboard_scalars(reference / "tensorboard", "train/loss")
    got = tensorboard_scalars(run / "tensorboard", "train/loss")
    assert sorted(got) == list(range(SAVED + 1, LAST + 1))
    assert [got[u] for u in sorted(got)] == pytest.approx([expected[u] for u in sorted(got)], rel=1e-4)

    # the data position: the same epoch and global position, so the same examples (none twice, none skipped)
    final, resumed = CheckpointDir(reference).latest_complete(), CheckpointDir(run).latest_complete()
    assert resumed.update == final.update == LAST and resumed.world_size == ranks
    want, have = client_state(final)["sampler"], client_state(resumed)["sampler"]
    assert (have["epoch"], have["global_position"]) == (want["epoch"], want["global_position"])

    # Adam's moments continued from the saved ones (reset moments would be off by up to 0.9 x their size)
    for name, tolerance in (("exp_avg", 1e-6), ("exp_avg_sq", 1e-6), ("fp32", 1e-4)):
        a, b = consolidated(reference, SAVED + 1, name), consolidated(run, SAVED + 1, name)
        assert set(a) == set(b) and a
        worst = max(float((a[k].reshape(-1) - b[k].reshape(-1)).abs().max()) for k in a)  # ZeRO-3's are flat
        assert worst <= tolerance, (name, worst)


def cli_train(*args):
    return subprocess.run(
        [sys.executable, "-m", "pyramidion_ds.cli.train", *map(str, args)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=ROOT,
        timeout=300,
    )


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_refused_resumes_leave_the_run_dir_byte_identical(references, synthetic_bin, tmp_path):
    run = cut_back(references[2], tmp_path / "run", update=LAST)
    cfg = write_config(tmp_path / "c.yaml", synthetic_bin, run, "zero2_cpu.json", max_update=LAST + 2)
    before = snapshot(run)

    # a world size that cannot keep the global batch of 6 micro-batches: refused, the ones that can named
    proc = cli_train(cfg, "--check-only", "--world-size", 4)
    assert proc.returncode == 2
    assert "4 ranks cannot keep that global batch" in proc.stderr and "resume on 1, 2, 3, 6 ranks" in proc.stderr
    # what a resume will do is told before anything starts
    proc = cli_train(cfg, "--check-only", "--world-size", 3, "--train.deepspeed_config", "zero3_cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "on another layout (2 ranks -> 3, ZeRO-2 -> ZeRO-3): converting it" in proc.stdout

    # ZeRO-0 has no universal loader: refused in one line, nothing rewritten (config.yaml, ds_config.json)
    proc = cli_train(cfg, "--train.deepspeed_config", ROOT / "ds_configs" / "zero0_bf16.json")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "needs ZeRO stage 1, 2 or 3 on both sides" in proc.stderr.strip().splitlines()[-1]
    assert snapshot(run) == before

    # a shard in torch's legacy (non-zip) format that would run code: refused by the checks, not at load
    # time after the run dir's description was rewritten
    shard = run / "checkpoints" / tag_for(LAST) / "mp_rank_00_model_states.pt"
    state = safe_torch_load(shard, map_location="cpu")
    state["payload"] = _Payload(tmp_path / "pwned")
    import torch

    torch.save(state, shard, _use_new_zipfile_serialization=False)
    manifest_path = shard.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    from pyramidion_ds.data.spm import file_sha256

    manifest["files"][shard.name] = {"size": shard.stat().st_size, "sha256": file_sha256(shard)}
    manifest_path.write_text(json.dumps(manifest))
    before = snapshot(run)
    proc = cli_train(cfg, "--model.dropout", 0.2)  # would be written to config.yaml if the checks passed
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "refusing to load" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "pwned").exists()
    assert snapshot(run) == before


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))
