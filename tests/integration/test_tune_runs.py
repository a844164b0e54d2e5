"""The tuner's choice for a small 'GPU' budget (debug preset, 2 CPU ranks) trains under the DeepSpeed launcher."""

import json

import pytest
import yaml

from ds_helpers import run_deepspeed


def test_tuned_configuration_runs_on_two_cpu_ranks(synthetic_bin, tmp_path, capsys):
    from pyramidion_ds.cli.tune import main
    from pyramidion_ds.tune.plan import override_flags

    out = tmp_path / "tuned"
    # ~24 MiB per rank: too small for 8 sequences without checkpointing, so the tuner must trade
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "--preset",
                "debug",
                "--device",
                "cpu",
                "--precision",
                "fp32",
                "--gpus-per-node",
                "2",
                "--gpu-mem-gib",
                "0.026",
                "--global-batch-size",
                "16",
                "--data",
                str(synthetic_bin),
                "--out",
                str(out),
            ]
        )
    printed = capsys.readouterr().out
    assert exit_.value.code == 0, printed
    chosen = json.loads((out / "plan.json").read_text())["chosen"]
    assert chosen["micro_batch"] * chosen["update_freq"] * 2 >= 16
    assert not (chosen["micro_batch"] == 8 and chosen["checkpointing"] == "off"), "budget should bind"

    overrides = yaml.safe_load((out / "trainer_overrides.yaml").read_text())
    run = tmp_path / "run"
    cfg = {
        "model": {"preset": "debug", "variant": "pyramidion"},
        "data": {"data": str(synthetic_bin), "num_workers": 0},
        "train": {"save_dir": str(run), "max_update": 3, "log_interval": 1, "lr": 1e-3},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    run_deepspeed([str(tmp_path / "c.yaml"), *override_flags(overrides)])
    log = (run / "train.log").read_text()
    assert "update 3" in log
    assert f"ZeRO-{chosen['stage']}" in log and f"checkpointing={chosen['checkpointing']}" in log
    assert json.loads((run / "ds_config.json").read_text())["train_micro_batch_size_per_gpu"] == chosen["micro_batch"]
