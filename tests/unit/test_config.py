"""Config loading, dotted overrides, presets and one-line errors."""

import subprocess
import sys

import pytest
import yaml

from pyramidion_ds.config import (
    MODEL_PRESETS,
    Config,
    ConfigError,
    config_from_dict,
    load_config,
    save_resolved,
    shipped_configs,
    to_dict,
)


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_defaults_are_the_debug_preset():
    cfg = Config()
    for key, value in MODEL_PRESETS["debug"].items():
        assert getattr(cfg.model, key) == value


@pytest.mark.parametrize("preset", sorted(MODEL_PRESETS))
def test_presets_fill_sizes(tmp_path, preset):
    cfg = load_config(write(tmp_path, f"model: {{preset: {preset}}}"))
    for key, value in MODEL_PRESETS[preset].items():
        assert getattr(cfg.model, key) == value


def test_base_and_large_are_the_stated_sizes():
    base, large = MODEL_PRESETS["base"], MODEL_PRESETS["large"]
    assert (base["d_model"], base["num_heads"], base["ffn_dim"], base["encoder_layers"], base["decoder_layers"]) == (
        512,
        8,
        2048,
        6,
        6,
    )
    assert (
        large["d_model"],
        large["num_heads"],
        large["ffn_dim"],
        large["encoder_layers"],
        large["decoder_layers"],
    ) == (1024, 16, 4096, 12, 12)


def test_explicit_field_beats_preset(tmp_path):
    cfg = load_config(write(tmp_path, "model: {preset: base, d_model: 256, num_heads: 4}"))
    assert cfg.model.d_model == 256 and cfg.model.ffn_dim == 2048


def test_overrides_are_typed_like_yaml(tmp_path):
    cfg = load_config(
        write(tmp_path, "model: {chunk_size: 64}"),
        [
            "--model.chunk_size",
            "256",
            "--train.lr=3e-4",
            "--train.adam_betas",
            "[0.9, 0.95]",
            "--model.sort_back",
            "true",
        ],
    )
    assert cfg.model.chunk_size == 256
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.adam_betas == [0.9, 0.95]
    assert cfg.model.sort_back is True


def test_nested_section_override():
    cfg = load_config(None, ["--data.denoising.mask_ratio", "0.25"])
    assert cfg.data.denoising.mask_ratio == 0.25


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("model: {chunk_sise: 3}", [], "unknown config key 'model.chunk_sise'; did you mean 'model.chunk_size'?"),
        ("modle: {}", [], "unknown config key 'modle'; did you mean 'model'?"),
        ("", ["--model.chunk_size", "-3"], "model.chunk_size: got -3, expected a value >= 1"),
        ("", ["--model.variant", "pyramid"], "model.variant: got 'pyramid', expected one of"),
        ("train: {lr: fast}", [], "train.lr: got 'fast', expected a number"),
        ("model: {d_model: 66, num_heads: 4}", [], "model.d_model: got 66, expected a multiple of model.num_heads"),
        ("model: 3", [], "model: got 3, expected a mapping"),
        ("", ["--model.pooling_schedule", "{0: 2048, 7: 512}"], "layer 7 does not exist"),
        ("model: {scorer_input: foo}", [], "model.scorer_input: got 'foo', expected one of hidden, layer_norm"),
        ("train: {scorer_lr_scale: 0}", [], "train.scorer_lr_scale: got 0.0, expected a value > 0.0"),
        ("", ["model.chunk_size", "3"], "unexpected argument 'model.chunk_size'"),
        ("", ["--model.chunk_size"], "missing value"),
    ],
)
def test_errors_name_the_key(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text) if text else None, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_malformed_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+, column \d+"):
        load_config(write(tmp_path, "model: {a: 1\nb: [2\n"))
    with pytest.raises(ConfigError, match="neither a file nor a shipped config"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"model: {variant: \xe9}\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(str(bad))


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["--model.preset", "base", "--model.pooling_schedule", "{0: 2048, 1: 512}"])
    path = save_resolved(cfg, tmp_path / "run")
    again = config_from_dict(yaml.safe_load(path.read_text()))
    assert to_dict(again) == to_dict(cfg)
    assert again.model.encoder_widths() == [2048, 512, 512, 512, 512, 512]
    assert not list((tmp_path / "run").glob(".*tmp"))


def test_derived_multiples_follow_the_model_and_compile_and_are_not_saved(tmp_path):
    cfg = load_config(None, ["--model.chunk_size", "32"])
    assert (cfg.source_pad_multiple, cfg.batch_size_multiple, cfg.target_pad_multiple) == (32, 1, 1)
    cfg = load_config(None, ["--train.compile", "true"])
    assert (cfg.source_pad_multiple, cfg.batch_size_multiple, cfg.target_pad_multiple) == (64, 8, 64)
    cfg = load_config(
        None,
        [
            "--train.compile",
            "true",
            "--data.pad_to_multiple",
            "16",
            "--data.required_batch_size_multiple",
            "2",
            "--data.target_pad_to_multiple",
            "4",
        ],
    )
    assert (cfg.source_pad_multiple, cfg.batch_size_multiple, cfg.target_pad_multiple) == (16, 2, 4)
    saved = yaml.safe_load(save_resolved(load_config(), tmp_path).read_text())["data"]
    keys = ("pad_to_multiple", "required_batch_size_multiple", "target_pad_to_multiple")
    assert [saved[key] for key in keys] == [0, 0, 0]


def test_every_shipped_config_loads():
    shipped = shipped_configs()
    assert "debug" in shipped
    for name in shipped:
        load_config(name)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)


def test_cli_typo_is_one_line_and_nonzero():
    proc = run_cli("pyramidion_ds.cli.train", "debug", "--model.chunk_sise", "3")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "pyramidion-train: error: unknown config key 'model.chunk_sise'; did you mean 'model.chunk_size'?"
    )


def test_cli_help_lists_config_keys():
    proc = run_cli("pyramidion_ds.cli.train", "--help")
    assert proc.returncode == 0
    assert "--model.chunk_size" in proc.stdout and "--deepspeed_config" in proc.stdout


def test_yaml_off_keeps_its_word(tmp_path):
    # YAML 1.1 reads a bare `off` as false; a field whose choices say "off" gets "off" back
    cfg = load_config(write(tmp_path, "train: {activation_checkpointing: off}"))
    assert cfg.train.activation_checkpointing == "off"
    cfg = load_config(None, ["--train.activation_checkpointing", "off"])
    assert cfg.train.activation_checkpointing == "off"


def test_pooling_settings_of_a_variant_without_pooling_are_dropped_and_named():
    cfg = load_config(
        None,
        [
            "--model.variant",
            "blockwise",
            "--model.pooling_schedule",
            "[512, 128, 32]",
            "--model.topk_base",
            "1000",
            "--model.scorer_input",
            "layer_norm",
        ],
    )
    assert cfg.model.drop_unused_pooling() == ["model.pooling_schedule", "model.topk_base", "model.scorer_input"]
    assert cfg.model.pooling_schedule is None and cfg.model.topk_base == 20.0
    assert cfg.model.scorer_input == "hidden" and cfg.model.drop_unused_pooling() == []
    kept = load_config(None, ["--model.variant", "transpooler", "--model.pooling_schedule", "[512, 128, 32]"])
    assert kept.model.drop_unused_pooling() == [] and kept.model.pooling_schedule == [512, 128, 32]


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--train.lr", "nan"),
        ("--train.clip_norm", "inf"),
        ("--data.denoising.mask_ratio", "nan"),
        ("--generation.lenpen", "-inf"),
    ],
)
def test_non_finite_numbers_are_refused_in_every_section(flag, value):
    with pytest.raises(ConfigError, match=rf"^{flag[2:]}: got '?{value}'?, expected a finite number$"):
        load_config(None, [flag, value])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            [
                "--model.max_source_positions",
                "150",
                "--model.pooling_schedule",
                "[150, 64, 64]",
                "--model.chunk_size",
                "100",
            ],
            "model.chunk_size: got 100, expected a divisor of model.max_source_positions (150): sources are padded "
            "to a multiple of it, so one of 150 tokens would become 200",
        ),
        (
            ["--data.pad_to_multiple", "48"],
            "data.pad_to_multiple: got 48, expected a divisor of model.max_source_positions (1024)",
        ),
    ],
)
def test_source_padding_past_the_models_length_is_a_config_error(overrides, message):
    """Found with the config, not as a ValueError on the first long batch after the run dir was written."""
    with pytest.raises(ConfigError) as err:
        load_config("debug", overrides)
    assert str(err.value).startswith(message)
