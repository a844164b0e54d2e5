"""Every shipped DeepSpeed JSON parses in DeepSpeed and in our merge; contradictions fail by name."""

import json
from pathlib import Path

import pytest

from pyramidion_ds.config import ConfigError, load_config
from pyramidion_ds.engine import (
    ds_config_path,
    precision_of,
    read_ds_config,
    resolve_ds_config,
    shipped_ds_configs,
    zero_stage,
)

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "ds_configs").glob("*.json"))


def test_the_issue_set_is_shipped():
    names = {p.stem for p in SHIPPED}
    assert {
        "zero0_bf16",
        "zero1_bf16",
        "zero2_bf16",
        "zero3_bf16",
        "zero3_offload_optimizer",
        "zero3_offload_all",
        "zero2_cpu",
        "zero3_cpu",
    } <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_configs_parse_in_deepspeed(path):
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = load_config(None, ["--data.max_sentences", "2", "--train.update_freq", "3"])
    ds = resolve_ds_config(read_ds_config(path), cfg, world_size=1, source=path.name)
    parsed = DeepSpeedConfig(ds)
    assert parsed.zero_optimization_stage == zero_stage(ds)
    assert parsed.train_micro_batch_size_per_gpu == 2 and parsed.gradient_accumulation_steps == 3
    assert parsed.bfloat16_config.enabled == (precision_of(ds) == "bf16")
    assert parsed.float16_config.enabled == (precision_of(ds) == "fp16")
    assert "auto" not in json.dumps(ds)


def write(tmp_path, data):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    "data, overrides, message",
    [
        ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, [], "both true"),
        (
            {"bf16": {"enabled": True}},
            ["--train.precision", "fp16"],
            "bf16.enabled=true contradicts train.precision=fp16",
        ),
        ({"gradient_accumulation_steps": 4}, [], "gradient_accumulation_steps=4 contradicts train.update_freq=1"),
        (
            {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2},
            ["--data.max_sentences", "2"],
            "train_batch_size=16 contradicts",
        ),
        (
            {"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}},
            [],
            "zero_optimization.offload_param is a stage-3 option but zero_optimization.stage is 2",
        ),
        ({"zero_optimization": {"stage": 5}}, [], "expected 0, 1, 2 or 3"),
        ({"optimizer": {"type": "Adam"}}, [], "'optimizer' block is not used"),
        ({"zero_optimisation": {"stage": 2}}, [], "unknown key 'zero_optimisation'"),
        ({"gradient_clipping": 0.5}, [], "gradient_clipping=0.5 contradicts train.clip_norm=1.0"),
    ],
)
def test_contradictions_fail_by_name(tmp_path, data, overrides, message):
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError) as err:
        resolve_ds_config(read_ds_config(write(tmp_path, data)), cfg, world_size=2, source="ds.json")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_auto_precision_follows_the_json(tmp_path):
    cfg = load_config(None)
    assert precision_of(resolve_ds_config({"bf16": {"enabled": True}}, cfg, 1)) == "bf16"
    assert precision_of(resolve_ds_config({}, cfg, 1)) == "fp32"


def test_batch_size_multiplies_out_with_world_size():
    cfg = load_config(None, ["--data.max_sentences", "4", "--train.update_freq", "2"])
    ds = resolve_ds_config({"train_batch_size": 32}, cfg, world_size=4)
    assert ds["train_batch_size"] == 32 and ds["train_micro_batch_size_per_gpu"] == 4


def test_shipped_names_resolve_from_any_directory(tmp_path, monkeypatch):
    assert sorted(shipped_ds_configs()) == [p.stem for p in SHIPPED]
    monkeypatch.chdir(tmp_path)  # not the checkout: ds_configs/ is not under the working directory
    for name in ("zero3_bf16", "zero3_bf16.json"):
        path = ds_config_path(name)
        assert path.is_absolute() and path.name == "zero3_bf16.json"
        assert read_ds_config(name) == json.loads((ROOT / "ds_configs" / "zero3_bf16.json").read_text())
    default = load_config(None).train.deepspeed_config
    assert default == "zero2_cpu" and ds_config_path(default).name == "zero2_cpu.json"


def test_an_existing_path_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "zero3_bf16.json").write_text('{"zero_optimization": {"stage": 1}}')
    assert ds_config_path("zero3_bf16.json") == Path("zero3_bf16.json")  # relative to the working directory
    assert zero_stage(read_ds_config("zero3_bf16.json")) == 1
    assert zero_stage(read_ds_config("zero3_bf16")) == 3  # no file of that name here: the shipped one
    assert ds_config_path(str(ROOT / "ds_configs" / "zero2_cpu.json")) == ROOT / "ds_configs" / "zero2_cpu.json"


@pytest.mark.parametrize("given", ["zero9_bf16", "zero9_bf16.json", "ds_configs/zero3_bf16.json"])
def test_unknown_name_lists_the_shipped_ones(tmp_path, monkeypatch, given):
    monkeypatch.chdir(tmp_path)  # a path that is not a file, or a name not shipped: one line with the names
    with pytest.raises(ConfigError) as err:
        read_ds_config(given)
    message = str(err.value)
    assert "\n" not in message and f"'{given}' does not exist" in message
    assert all(p.stem in message for p in SHIPPED)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_ds_config(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 2,}}')
    with pytest.raises(ConfigError, match="not valid JSON at line 1"):
        read_ds_config(bad)
