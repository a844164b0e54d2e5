"""pyramidion-generate on a real ZeRO-3 run dir (2 CPU ranks): consolidation, export, 1 vs 2 processes,
bad input. One tiny training run per session; everything else reuses it."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from pyramidion_ds.checkpoint import CheckpointDir
from pyramidion_ds.checkpoint.consolidate import consolidated_state_dict
from pyramidion_ds.checkpoint.export import consolidate, load_export, write_safetensors
from pyramidion_ds.generate.inputs import from_data_dir
from pyramidion_ds.generate.runner import collate_sources
from pyramidion_ds.generate.search import SearchOptions, generate

from ds_helpers import BIN, ROOT, free_port, gather_zero3_params, run_deepspeed, subprocess_env


@pytest.fixture(scope="session")
def zero3_run(synthetic_bin, tmp_path_factory):
    root = tmp_path_factory.mktemp("gen_zero3")
    cfg = {
        "model": {"preset": "debug", "variant": "pyramidion", "dropout": 0.1},
        "data": {"data": str(synthetic_bin), "max_tokens": 2048, "num_workers": 0},
        "train": {
            "save_dir": str(root / "run"),
            "deepspeed_config": str(ROOT / "ds_configs" / "zero3_cpu.json"),
            "lr": 2e-3,
            "warmup_updates": 3,
            "log_interval": 1,
            "seed": 3,
            "max_update": 4,
        },
    }
    (root / "c.yaml").write_text(yaml.safe_dump(cfg))
    run_deepspeed([str(root / "c.yaml")])
    return root


@pytest.fixture(scope="session")
def random_export(zero3_run, tmp_path_factory):
    """An export of a random model with peaky outputs (the 4-update model says the same thing for every
    document), so that merging results in input order is really tested."""
    from pyramidion_ds.config import load_config, to_dict
    from pyramidion_ds.model import PyramidionModel

    out = tmp_path_factory.mktemp("random_export")
    cfg = load_config(str(zero3_run / "run" / "config.yaml"))
    torch.manual_seed(5)
    model = PyramidionModel(cfg.model)
    with torch.no_grad():
        model.embed_tokens.weight.mul_(6.0)
    write_safetensors(out / "model.safetensors", model.state_dict(), torch.float32)
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    shutil.copyfile(zero3_run / "run" / "spm.model", out / "spm.model")
    return out


def generate_cli(args, nproc=1):
    if nproc == 1:
        cmd = [sys.executable, "-m", "pyramidion_ds.cli.generate", *args]
    else:
        cmd = [
            str(BIN / "deepspeed"),
            "--num_gpus",
            str(nproc),
            "--master_port",
            str(free_port()),
            "--module",
            "pyramidion_ds.cli.generate",
            *args,
        ]
    return subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=300)


def test_consolidated_export_equals_gathered_zero3_parameters(zero3_run, tmp_path):
    proc = generate_cli(["--consolidate", str(zero3_run / "run"), "--export-dir", str(tmp_path / "export")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == [str(tmp_path / "export")]  # not DeepSpeed's "Reconstructed fp32 ..."
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    meta = json.loads((tmp_path / "export" / "export.json").read_text())
    assert meta["tag"] == "update_0000004" and meta["zero_stage"] == 3 and meta["world_size"] == 2
    gathered = gather_zero3_params(zero3_run / "c.yaml", tmp_path / "gathered.pt")
    assert gathered["update"] == 4 and set(gathered["params"]) == set(exported)
    for name, tensor in gathered["params"].items():
        torch.testing.assert_close(exported[name], tensor, rtol=0, atol=0, msg=name)


def test_export_generates_like_the_in_memory_model(zero3_run, synthetic_bin):
    from pyramidion_ds.model import PyramidionModel

    export = consolidate(zero3_run / "run")  # the cached location: RUN/export/<tag>
    assert export == zero3_run / "run" / "export" / "update_0000004"
    model, cfg, spm = load_export(export)
    memory = PyramidionModel(cfg.model)
    memory.load_state_dict(consolidated_state_dict(CheckpointDir(zero3_run / "run").latest_complete()), strict=False)
    memory.eval()
    examples = from_data_dir(synthetic_bin, "test", cfg.model.max_source_positions, spm, 2).examples[:4]
    src, lengths = collate_sources(examples, 1, cfg.model.chunk_size, cfg.model.max_source_positions, "cpu")
    opts = SearchOptions(beam=3, nbest=2, max_len_b=12, lenpen=1.5)
    a, b = generate(model, src, lengths, opts), generate(memory, src, lengths, opts)
    assert [[(h.tokens, h.score) for h in s] for s in a] == [[(h.tokens, h.score) for h in s] for s in b]


def test_two_processes_give_the_outputs_of_one(random_export, synthetic_bin, tmp_path):
    common = [
        str(random_export),
        "--data",
        str(synthetic_bin),
        "--gen-subset",
        "test",
        "--beam",
        "3",
        "--nbest",
        "2",
        "--max-len-b",
        "10",
        "--batch-size",
        "2",
        "--no-repeat-ngram-size",
        "3",
        "--no-progress-bar",
    ]
    one = generate_cli(common + ["--results-path", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    selection = tmp_path / "two" / "selection.json"
    two = generate_cli(
        common + ["--results-path", str(tmp_path / "two"), "--explain", "2", "--selection-report", str(selection)],
        nproc=2,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "world size 2" in two.stderr
    a = (tmp_path / "one" / "generate-test.txt").read_text()
    assert a == (tmp_path / "two" / "generate-test.txt").read_text()
    assert len((tmp_path / "one" / "test.hyp").read_text().splitlines()) == 8
    scores = [line.split("\t")[1] for line in a.splitlines() if line.startswith("H-")]
    assert len(scores) == 16 and len(set(scores)) > 8  # every document scores its own way: order matters
    rouge = json.loads((tmp_path / "two" / "rouge-test.json").read_text())
    assert rouge["count"] == 8 and set(rouge) >= {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    assert "ROUGE-Lsum" in two.stdout
    assert sorted(p.name for p in (tmp_path / "two" / "explain-test").iterdir()) == ["000000.html", "000001.html"]
    # the selection figure of the 8 documents, per pooling layer (the last = the encoder output)
    report = json.loads(selection.read_text())
    assert (
        report["documents"] == 8 and report["final_layer"] == "layer2" and set(report["layers"]) == {"layer1", "layer2"}
    )
    final = report["layers"]["layer2"]
    assert 0 <= final["control"] <= 1 and 0 <= final["all"] <= final["lead"] + 1
    low, high = final["lift_ci95"]
    assert low <= final["lift"] <= high and "selection (8 documents, layer2)" in two.stderr


def run_main(capsys, args):
    from pyramidion_ds.cli.generate import main

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr()


def test_bad_input_is_one_line(zero3_run, random_export, tmp_path, capsys):
    # a run dir whose only checkpoint lost its manifest
    broken = tmp_path / "broken"
    shutil.copytree(zero3_run / "run", broken, ignore=shutil.ignore_patterns("export"))
    for manifest in (broken / "checkpoints").rglob("manifest.json"):
        manifest.unlink()
    code, out = run_main(capsys, [str(broken), "--input", "x.txt"])
    assert code == 2 and "holds no complete checkpoint" in out.err.strip().splitlines()[-1]
    assert "Traceback" not in out.err

    docs = tmp_path / "docs.txt"
    docs.write_text("agent haddad moved crates\n\nsecond\n")
    code, out = run_main(capsys, [str(random_export), "--input", str(docs)])
    assert code == 2 and out.err.strip().endswith("line 2: empty document")

    # config that does not match the weights: the tensor is named
    bad = tmp_path / "bad_export"
    shutil.copytree(random_export, bad)
    cfg = yaml.safe_load((bad / "config.yaml").read_text())
    cfg["model"]["ffn_dim"] = 96
    (bad / "config.yaml").write_text(yaml.safe_dump(cfg))
    code, out = run_main(capsys, [str(bad), "--input", str(docs)])
    assert code == 2 and "tensor 'encoder.layers.0.ffn.fc1.weight'" in out.err.splitlines()[-1]

    # too long: truncated with a count, still generates
    docs.write_text(("word " * 700).strip() + "\nshort text\n")
    code, out = run_main(
        capsys, [str(random_export), "--input", str(docs), "--max-len-b", "3", "--hard-topk", "--no-progress-bar"]
    )
    assert code == 0
    assert "truncated 1 of 2 sources to 512 tokens" in out.err
    assert out.out.count("H-") == 2
