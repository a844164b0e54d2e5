"""Checksums, safe unpickling, vocabulary identity, DeepSpeed's own config validation (no processes)."""

import hashlib
import json
import os
import zipfile

import numpy as np
import pytest
import torch

from pyramidion_ds.checkpoint import CheckpointDir, CheckpointError, tag_for
from pyramidion_ds.checkpoint.consolidate import consolidated_state_dict
from pyramidion_ds.checkpoint.safe_load import safe_torch_load
from pyramidion_ds.config import ConfigError
from pyramidion_ds.data.spm import file_sha256, same_vocabulary, spm_identity, train_spm


class Payload:
    """What a crafted checkpoint pickles: unpickling it would create ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def save_zero0(ckpt: CheckpointDir, update: int, module: dict) -> str:
    """A ZeRO-0 checkpoint as the trainer lays it out (model states + manifest with checksums)."""
    tag = tag_for(update)
    (ckpt.root / tag).mkdir(parents=True)
    torch.save({"module": module, "rng": np.random.get_state()}, ckpt.root / tag / "mp_rank_00_model_states.pt")
    ckpt.finalize(tag, update=update, world_size=1, extra={"zero_stage": 0})
    return tag


def forge_manifest(ckpt: CheckpointDir, tag: str) -> None:
    """Rewrite the manifest so it agrees with the files on disk, as an attacker (or a bug) would."""
    manifest = json.loads((ckpt.root / tag / "manifest.json").read_text())
    for name in manifest["files"]:
        path = ckpt.root / tag / name
        manifest["files"][name] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    (ckpt.root / tag / "manifest.json").write_text(json.dumps(manifest))


# ------------------------------------------------------------------------------------------ checksums


def test_corruption_of_the_right_size_falls_back_when_verified(tmp_path):
    ckpt = CheckpointDir(tmp_path)
    older = save_zero0(ckpt, 10, {"w": torch.ones(4)})
    newer = save_zero0(ckpt, 20, {"w": torch.full((4,), 2.0)})
    shard = ckpt.root / newer / "mp_rank_00_model_states.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed
    shard.write_bytes(bytes(data))
    assert ckpt.latest_complete(warn=lambda m: None).tag == newer  # sizes alone cannot tell
    warnings = []
    info = ckpt.latest_complete(warn=warnings.append, verify=True)
    assert info.tag == older
    assert any("mp_rank_00_model_states.pt does not match the sha256" in w for w in warnings)
    assert any(f"falling back to '{older}'" in w for w in warnings)
    assert torch.equal(consolidated_state_dict(info)["w"], torch.ones(4))


def test_manifest_without_checksums_still_loads_with_a_note(tmp_path):
    ckpt = CheckpointDir(tmp_path)
    tag = save_zero0(ckpt, 10, {"w": torch.ones(2)})
    manifest = json.loads((ckpt.root / tag / "manifest.json").read_text())
    manifest["files"] = {name: entry["size"] for name, entry in manifest["files"].items()}  # older format
    (ckpt.root / tag / "manifest.json").write_text(json.dumps(manifest))
    warnings = []
    assert ckpt.latest_complete(warn=warnings.append, verify=True).tag == tag
    assert any("records no checksums" in w for w in warnings)


def test_identity_of_a_checkpoint_is_its_manifest(tmp_path):
    one, two = CheckpointDir(tmp_path / "a"), CheckpointDir(tmp_path / "b")
    save_zero0(one, 10, {"w": torch.ones(2)})
    save_zero0(two, 10, {"w": torch.zeros(2)})  # same tag, same sizes, other weights
    assert one.info(tag_for(10)).manifest_sha256 != two.info(tag_for(10)).manifest_sha256


# ------------------------------------------------------------------------------------------ unpickling


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_crafted_pickle_runs_nothing(tmp_path, zip_format):
    marker = tmp_path / "pwned"
    ckpt = CheckpointDir(tmp_path / "run")
    tag = save_zero0(ckpt, 10, {"w": torch.ones(2)})
    shard = ckpt.root / tag / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "x": Payload(marker)}, shard, _use_new_zipfile_serialization=zip_format)
    forge_manifest(ckpt, tag)
    info = ckpt.latest_complete(warn=lambda m: None, verify=True)
    with pytest.raises(CheckpointError, match="refusing to load .*could run code"):
        consolidated_state_dict(info)
    with pytest.raises(CheckpointError, match="refusing to load"):
        safe_torch_load(shard)
    assert not marker.exists()
    if zip_format:  # read without unpickling: names the offending global
        with pytest.raises(CheckpointError, match="system"):
            info.check_pickles()


def test_real_state_loads_with_the_allow_list(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    path = tmp_path / "state.pt"
    state = {
        "rng": np.random.get_state(),
        "scaler": LossScaler(1.0),
        "dynamic": DynamicLossScaler(2.0**16, 1000, 1.0, 2, False),
        "stage": ZeroStageEnum.gradients,
        "flat": [torch.arange(3.0)],
        "plain": {"a": (1, "b", 2.5)},
    }
    torch.save(state, path)
    loaded = safe_torch_load(path)
    assert loaded["stage"] == ZeroStageEnum.gradients and isinstance(loaded["scaler"], LossScaler)
    assert np.array_equal(loaded["rng"][1], state["rng"][1]) and loaded["plain"] == state["plain"]


def test_no_unsafe_load_left_in_the_package():
    root = os.path.join(os.path.dirname(__file__), "..", "..", "pyramidion_ds")
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                text = open(os.path.join(folder, name), encoding="utf-8").read()
                assert "weights_only=False" not in text, name
                assert "get_fp32_state_dict_from_zero_checkpoint" not in text, name


# ------------------------------------------------------------------------------------------ vocabulary


def test_vocabulary_identity_is_what_the_model_is(tmp_path):
    texts = [
        f"the {w} moved {i} crates of {w}s to port {i % 7} on friday ."
        for i, w in enumerate(["agent", "clerk", "pilot", "trader", "miner", "baker", "judge", "nurse"] * 30)
    ]
    first = train_spm(texts, tmp_path / "a", vocab_size=60)
    second = train_spm(texts, tmp_path / "b", vocab_size=60)  # another temporary path for the text
    other = train_spm(texts[::3] + ["zebra quartz vortex jumps"] * 20, tmp_path / "c", vocab_size=60)
    assert file_sha256(first) != file_sha256(second)  # the file records where its training text was
    assert spm_identity(first) == spm_identity(second)
    assert spm_identity(first) != spm_identity(other)
    # a record from before identities existed: the run dir's own spm.model settles it
    old_record = {"spm_sha256": file_sha256(first)}
    assert same_vocabulary(old_record, spm_identity(second), file_sha256(second), first) is True
    assert same_vocabulary(old_record, spm_identity(other), file_sha256(other), first) is False
    assert same_vocabulary(old_record, spm_identity(second), file_sha256(second), None) is False
    assert same_vocabulary({}, spm_identity(first), file_sha256(first)) is None


def test_identity_refuses_a_file_that_is_no_model(tmp_path):
    from pyramidion_ds.errors import DataError

    (tmp_path / "spm.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a sentencepiece model"):
        spm_identity(tmp_path / "spm.model")


# ------------------------------------------------------------------------------------------ DeepSpeed JSON


@pytest.mark.parametrize(
    "zero, message",
    [
        (
            {"stage": 2, "overlap_com": True},
            "unknown key 'zero_optimization.overlap_com'; did you mean 'overlap_comm'?",
        ),
        ({"stage": 3, "offload_optimizer": {"device": "gpu"}}, "zero_optimization.offload_optimizer.device: "),
    ],
)
def test_deepspeed_parser_errors_are_one_line_naming_the_key(zero, message):
    from pyramidion_ds.engine import validate_ds_config

    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": zero}
    with pytest.raises(ConfigError) as err:
        validate_ds_config(ds, source="x.json")
    assert str(err.value).startswith("x.json: ") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_checksums_are_those_of_the_bytes_on_disk(tmp_path):
    ckpt = CheckpointDir(tmp_path)
    tag = save_zero0(ckpt, 1, {"w": torch.ones(3)})
    manifest = json.loads((ckpt.root / tag / "manifest.json").read_text())
    entry = manifest["files"]["mp_rank_00_model_states.pt"]
    data = (ckpt.root / tag / "mp_rank_00_model_states.pt").read_bytes()
    assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert zipfile.is_zipfile(ckpt.root / tag / "mp_rank_00_model_states.pt")


def test_deepspeed_files_are_hashed_while_written_and_loaded_safely(tmp_path):
    from pyramidion_ds.checkpoint.files import checkpoint_files

    files = checkpoint_files()
    path = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    files.save({"optimizer_state_dict": {"flat": torch.randn(1000)}}, str(path))
    size, sha = files.written[str(path)]
    assert (size, sha) == (path.stat().st_size, file_sha256(path)) and files.error is None
    assert torch.equal(
        files.load(str(path))["optimizer_state_dict"]["flat"], torch.load(path)["optimizer_state_dict"]["flat"]
    )
    torch.save({"x": Payload(tmp_path / "pwned")}, path)
    with pytest.raises(CheckpointError):
        files.load(str(path))
    assert not (tmp_path / "pwned").exists()


def test_a_tag_saved_again_is_incomplete_until_finalized(tmp_path):
    ckpt = CheckpointDir(tmp_path)
    older = save_zero0(ckpt, 10, {"w": torch.ones(2)})
    again = save_zero0(ckpt, 20, {"w": torch.ones(2)})
    ckpt.begin(again)  # a --no-resume retrain reaches update 20 again and starts writing its shards
    assert ckpt.problem(again) is not None
    assert ckpt.latest_complete(warn=lambda m: None).tag == older
