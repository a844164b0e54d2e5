"""pyramidion-preprocess end to end: every input layout gives the same shards; bad input is one line.

Runs the command's ``main`` in-process (the console script is a thin wrapper; ``tests/unit/test_cli.py``
runs it as a subprocess) except for one real subprocess with 2 workers.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from pyramidion_ds.cli.preprocess import PROG, main
from pyramidion_ds.data import DenoisingDataset, SummarizationDataset, load_spm
from pyramidion_ds.data.synthetic import write_corpus

SPLITS = {"train": 30, "valid": 4, "test": 4}
TSV_NAMES = {"train": "train", "valid": "dev-0", "test": "test-A"}
SHARD_FILES = [
    f"{split}.{side}.{ext}" for split in SPLITS for side in ("source", "target") for ext in ("bin", "idx", "json")
]


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(["--quiet", *map(str, args)])
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """The same corpus as jsonl, parquet, the original release's TSVs and a local HF dataset folder."""
    root = tmp_path_factory.mktemp("layouts")
    paths = write_corpus(root / "jsonl", SPLITS, min_words=200, max_words=400)
    for split, path in paths.items():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        (root / "parquet").mkdir(exist_ok=True)
        pd.DataFrame(rows).drop(columns=["salient_spans"]).to_parquet(root / "parquet" / f"{split}.parquet")
        folder = root / "tsv" / TSV_NAMES[split]
        folder.mkdir(parents=True)
        (folder / "in.tsv").write_text("".join(r["document"] + "\n" for r in rows))
        (folder / "expected.tsv").write_text("".join(r["summary"] + "\n" for r in rows))
        hub = root / "hub"
        hub.mkdir(exist_ok=True)
        hf_split = {"valid": "validation"}.get(split, split)
        (hub / f"{hf_split}.jsonl").write_text(
            "".join(json.dumps({"article": r["document"], "abstract": r["summary"]}) + "\n" for r in rows)
        )
    return root


@pytest.fixture(scope="module")
def tsv_out(layouts, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "tsv"
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "--quiet",
                "--tsv-dir",
                str(layouts / "tsv"),
                "--destdir",
                str(out),
                "--spm-vocab-size",
                "200",
                "--max-source-positions",
                "300",
                "--max-target-positions",
                "64",
            ]
        )
    assert exit_info.value.code == 0
    return out


def files_of(path):
    return {name: (path / name).read_bytes() for name in SHARD_FILES}


def test_tsv_layout_writes_every_split(tsv_out):
    meta = json.loads((tsv_out / "meta.json").read_text())
    assert list(meta["splits"]) == ["train", "valid", "test"]
    assert meta["splits"]["train"]["counts"]["examples"] == 30
    assert meta["splits"]["train"]["counts"]["truncated_source"] == 30
    for split, info in meta["splits"].items():  # lengths before the cut say how much the limits cut off
        targets = SummarizationDataset(tsv_out, split, 300, 64).tgt_sizes
        assert info["counts"]["truncated_target"] == (targets == 64).sum() > 0, split
        assert info["lengths"]["source"]["median"] > 300 and info["lengths"]["target"]["max"] > 64, split
    ds = SummarizationDataset(tsv_out, "valid", 300, 64)
    assert len(ds) == 4 and ds.example_id(0) == "valid-0"


@pytest.mark.parametrize("layout", ["jsonl", "parquet", "hub"])
def test_every_layout_gives_identical_shards(layout, layouts, tsv_out, tmp_path, capsys):
    common = [
        "--destdir",
        tmp_path / "out",
        "--spm-model",
        tsv_out / "spm.model",
        "--max-source-positions",
        300,
        "--max-target-positions",
        64,
    ]
    if layout == "hub":
        args = ["--source-dataset", layouts / "hub", "--document-column", "article", "--summary-column", "abstract"]
    else:
        ext = "jsonl" if layout == "jsonl" else "parquet"
        args = ["--source-files", ",".join(f"{s}={layouts / layout / f'{s}.{ext}'}" for s in SPLITS)]
    code, out, err = run_cli(capsys, *args, *common)
    assert code == 0, err
    assert "split  input  examples  empty_skipped  truncated_source" in out
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    for split, info in meta["splits"].items():  # the summary line says what was cut, per split
        counts, target = info["counts"], info["lengths"]["target"]
        assert (
            f"{PROG}: {split}: cut {counts['truncated_source']} of {counts['examples']} sources to 300 pieces (" in out
        )
        assert (
            f"cut {counts['truncated_target']} of {counts['examples']} targets to 64 pieces (median "
            f"{target['median']}, p95 {target['p95']}, max {target['max']} before)" in out
        )
    assert files_of(tmp_path / "out") == files_of(tsv_out)


def test_two_worker_subprocess_matches(layouts, tsv_out, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyramidion_ds.cli.preprocess",
            "--tsv-dir",
            layouts / "tsv",
            "--destdir",
            tmp_path / "out",
            "--spm-model",
            tsv_out / "spm.model",
            "--workers",
            "2",
            "--max-source-positions",
            "300",
            "--max-target-positions",
            "64",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "binarize train" in proc.stderr  # progress bars on the long steps
    assert files_of(tmp_path / "out") == files_of(tsv_out)


def test_sigterm_stops_the_workers_and_removes_the_temporary_dir(tsv_out, tmp_path):
    """SIGTERM to the command (as `kill PID` sends it) while its 2 workers binarize: one line, exit 143, no
    DESTDIR.tmp-XXXX left, no worker left running without its parent."""
    import signal

    import psutil

    line = json.dumps({"document": "agent marisol moved 31 bronze bells to osaka on saturday . " * 30, "summary": "s"})
    (tmp_path / "big.jsonl").write_text((line + "\n") * 10000)
    destdir = tmp_path / "out"
    command = [sys.executable, "-m", "pyramidion_ds.cli.preprocess", "--source-files", f"train={tmp_path}/big.jsonl"]
    stderr_file = tmp_path.parent / f"{tmp_path.name}.stderr"  # a pipe would stay open while orphans live
    with stderr_file.open("w") as stderr_fh:
        proc = subprocess.Popen(
            [*command, "--destdir", destdir, "--spm-model", tsv_out / "spm.model", "--workers", "2", "--quiet"],
            stderr=stderr_fh,
        )
    workers = []
    while proc.poll() is None and not (len(workers) == 2 and list(tmp_path.glob("out.tmp-*"))):
        workers = psutil.Process(proc.pid).children()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=60)
    _, alive = psutil.wait_procs(workers, timeout=10)
    for worker in alive:  # leave no orphan behind when this fails
        worker.kill()
    stderr = stderr_file.read_text()
    assert code == 143 and not alive, (code, alive, stderr)
    assert stderr.splitlines() == [
        f"pyramidion-preprocess: error: stopped by SIGTERM: worker processes stopped, temporary directory removed, "
        f"{destdir} left as it was"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.jsonl"]


def test_unlabeled_for_denoising(layouts, tsv_out, tmp_path, capsys):
    code, _, err = run_cli(
        capsys,
        "--source-files",
        f"train={layouts / 'jsonl' / 'train.jsonl'}",
        "--unlabeled",
        "--destdir",
        tmp_path / "out",
        "--spm-model",
        tsv_out / "spm.model",
    )
    assert code == 0, err
    assert not (tmp_path / "out" / "train.target.bin").exists()
    ds = DenoisingDataset(tmp_path / "out", "train", 512, 512, seed=0)
    mask = load_spm(tmp_path / "out").PieceToId("<mask>")
    assert len(ds) == 30 and (ds[0]["source"] == mask).any()
    with pytest.raises(Exception, match="has no target side"):
        SummarizationDataset(tmp_path / "out", "train", 512, 512)


def test_drop_instead_of_truncate(layouts, tsv_out, tmp_path, capsys):
    code, out, _ = run_cli(
        capsys,
        "--tsv-dir",
        layouts / "tsv",
        "--destdir",
        tmp_path / "out",
        "--spm-model",
        tsv_out / "spm.model",
        "--max-source-positions",
        "900",
        "--no-truncate-source",
    )
    assert code == 0
    counts = json.loads((tmp_path / "out" / "meta.json").read_text())["splits"]["train"]["counts"]
    assert counts["dropped_too_long"] > 0 and counts["truncated_source"] == 0
    assert counts["examples"] + counts["dropped_too_long"] == 30


def bad_inputs(root):
    (root / "latin1.jsonl").write_bytes(b'{"document": "caf\xe9 ok", "summary": "x"}\n')
    (root / "cols.jsonl").write_text('{"text": "a b", "summary": "a"}\n')
    (root / "empty.jsonl").write_text('{"document": "", "summary": "a"}\n')
    tsv = root / "tsv" / "train"
    tsv.mkdir(parents=True)
    (tsv / "in.tsv").write_text("one\ntwo\n")
    (tsv / "expected.tsv").write_text("1\n")
    return [
        (["--source-files", f"train={root / 'latin1.jsonl'}"], "latin1.jsonl: line 1: not valid UTF-8 (byte 0xe9"),
        (
            ["--source-files", f"train={root / 'cols.jsonl'}"],
            "no column 'document' (columns: text, summary); set --document-column",
        ),
        (["--source-files", f"train={root / 'empty.jsonl'}"], "no examples left (1 empty, 0 too long)"),
        (["--source-files", f"train={root / 'missing.jsonl'}"], "missing.jsonl: no such file"),
        (["--tsv-dir", root / "tsv"], "expected.tsv: 1 lines, but"),
        (["--tsv-dir", root / "tsv", "--source-files", "train=x"], "give exactly one input"),
        (["--source-files", "train"], "--source-files: got 'train', expected SPLIT=VALUE"),
    ]


def test_bad_input_is_one_line_exit_2(tmp_path, tsv_out, capsys):
    for args, message in bad_inputs(tmp_path):
        code, _, err = run_cli(capsys, *args, "--destdir", tmp_path / "out", "--spm-model", tsv_out / "spm.model")
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, (args, err)
        assert lines[0].startswith("pyramidion-preprocess: error: ") and message in lines[0], (message, err)
        assert not (tmp_path / "out" / "meta.json").exists()
        assert not list((tmp_path / "out").glob("*.bin")) if (tmp_path / "out").exists() else True


def test_swapped_spm_model_rejected_on_reuse(tmp_path, layouts, capsys):
    import sentencepiece as spm

    prefix = tmp_path / "plain"
    text = tmp_path / "t.txt"
    text.write_text((layouts / "tsv" / "train" / "in.tsv").read_text())
    spm.SentencePieceTrainer.Train(input=str(text), model_prefix=str(prefix), vocab_size=150, minloglevel=2)
    code, _, err = run_cli(
        capsys, "--tsv-dir", layouts / "tsv", "--destdir", tmp_path / "out", "--spm-model", f"{prefix}.model"
    )
    assert code == 2 and "special ids bos=1 (expected 0), pad=-1 (expected 1)" in err


# --- the destination: written atomically, replaced only when asked --------------------------------


def snapshot(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def leftovers(parent, name):
    return sorted(
        p.name for p in parent.iterdir() if p.name.startswith(f"{name}.tmp-") or p.name.startswith(f"{name}.old-")
    )


def test_existing_destdir_needs_overwrite_and_is_replaced_whole(layouts, tsv_out, tmp_path, capsys):
    dest = tmp_path / "bin"
    shutil.copytree(tsv_out, dest)
    before = snapshot(dest)
    code, _, err = run_cli(
        capsys,
        "--source-files",
        f"train={layouts / 'jsonl' / 'train.jsonl'}",
        "--destdir",
        dest,
        "--spm-model",
        tsv_out / "spm.model",
    )
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "already exists and is not empty; pass --overwrite to replace it" in err
    assert snapshot(dest) == before
    # with --overwrite: only the new splits remain (no stale valid/test shards), nothing left beside it
    code, _, err = run_cli(
        capsys,
        "--source-files",
        f"train={layouts / 'jsonl' / 'train.jsonl'}",
        "--destdir",
        dest,
        "--spm-model",
        tsv_out / "spm.model",
        "--overwrite",
    )
    assert code == 0, err
    assert not list(dest.glob("valid.*")) and not list(dest.glob("test.*"))
    assert list(json.loads((dest / "meta.json").read_text())["splits"]) == ["train"]
    assert leftovers(tmp_path, "bin") == []
    # an empty directory (made by a job script, say) is fine without --overwrite
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(
        capsys,
        "--source-files",
        f"train={layouts / 'jsonl' / 'train.jsonl'}",
        "--destdir",
        tmp_path / "empty",
        "--spm-model",
        tsv_out / "spm.model",
    )
    assert code == 0 and (tmp_path / "empty" / "meta.json").is_file(), err
    (tmp_path / "plain").mkdir()  # the data-bin gets the permissions of a plain mkdir (umask), not 0700
    assert dest.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777


def test_a_failing_rerun_leaves_the_old_data_bin_intact(layouts, tsv_out, tmp_path, capsys):
    dest = tmp_path / "bin"
    shutil.copytree(tsv_out, dest)
    before = snapshot(dest)
    (tmp_path / "empty_docs.jsonl").write_text('{"document": " ", "summary": "a"}\n')
    # fails after the spm model was copied and while binarizing: the old data-bin must not notice
    code, _, err = run_cli(
        capsys,
        "--source-files",
        f"train={tmp_path / 'empty_docs.jsonl'}",
        "--destdir",
        dest,
        "--spm-model",
        tsv_out / "spm.model",
        "--overwrite",
    )
    assert code == 2 and "no examples left (1 empty, 0 too long)" in err
    assert snapshot(dest) == before and leftovers(tmp_path, "bin") == []
    SummarizationDataset(dest, "valid", 300, 64)  # still usable

    # an interrupt (Ctrl-C) half-way through a split: the same
    from pyramidion_ds.data.binarize import preprocess
    from pyramidion_ds.data.sources import SplitSource, file_sources

    real = file_sources({"train": str(layouts / "jsonl" / "train.jsonl")})["train"]

    def interrupted():
        for i, record in enumerate(real.records()):
            if i == 10:
                raise KeyboardInterrupt
            yield record

    with pytest.raises(KeyboardInterrupt):
        preprocess(
            {"train": SplitSource("train", "interrupted", real.num_rows, interrupted)},
            dest,
            spm_model=str(tsv_out / "spm.model"),
            progress=False,
            overwrite=True,
        )
    assert snapshot(dest) == before and leftovers(tmp_path, "bin") == []


def can_write(directory):
    try:
        os.rmdir(tempfile.mkdtemp(dir=directory))
        return True
    except OSError:
        return False


def test_unwritable_destdir_is_one_line(layouts, tsv_out, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    if can_write(read_only):  # root ignores permission bits: try a directory the kernel refuses
        read_only = Path("/sys")
    if can_write(read_only):
        pytest.skip("no read-only directory to try")
    cases = [
        (tmp_path / "a_file", "is a file, expected a directory"),
        (tmp_path / "a_file" / "bin", "a_file is a file, not a directory"),
        (read_only / "bin", f"cannot write in {read_only}"),
    ]
    for dest, message in cases:
        code, _, err = run_cli(
            capsys,
            "--source-files",
            f"train={layouts / 'jsonl' / 'train.jsonl'}",
            "--destdir",
            dest,
            "--spm-model",
            tsv_out / "spm.model",
        )
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0], (dest, err)
    assert (tmp_path / "a_file").read_text() == "x"


def test_bad_rows_and_empty_files_are_one_line(tmp_path, tsv_out, capsys):
    (tmp_path / "num.jsonl").write_text('{"document": "fine", "summary": "ok"}\n{"document": 3, "summary": "x"}\n')
    (tmp_path / "cut.jsonl").write_text('{"document": "fine", "summary": "ok"}\n{"document": "c", "summ\n')
    (tmp_path / "empty.jsonl").write_text("")
    cases = [
        ("num.jsonl", "num.jsonl: line 2: field 'document' is a number (3), expected text"),
        ("cut.jsonl", "cut.jsonl: line 2: not valid JSON"),
        ("empty.jsonl", "empty.jsonl: empty file"),
    ]
    for name, message in cases:
        code, _, err = run_cli(
            capsys,
            "--source-files",
            f"train={tmp_path / name}",
            "--destdir",
            tmp_path / "out",
            "--spm-model",
            tsv_out / "spm.model",
        )
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0], (name, err)
        assert not (tmp_path / "out").exists()


def test_raw_summaries_are_kept_for_scoring(layouts, tsv_out):
    rows = [json.loads(line) for line in (layouts / "jsonl" / "valid.jsonl").read_text().splitlines()]
    kept = [json.loads(line) for line in (tsv_out / "valid.summaries.jsonl").read_text().splitlines()]
    assert kept == [{"id": f"valid-{i}", "summary": r["summary"]} for i, r in enumerate(rows)]
    assert json.loads((tsv_out / "meta.json").read_text())["splits"]["valid"]["summaries"] == "valid.summaries.jsonl"


def test_overwrite_never_replaces_a_directory_that_is_not_a_data_bin(layouts, tsv_out, tmp_path, capsys):
    dest = tmp_path / "project"
    shutil.copytree(tsv_out, dest)
    (dest / "notes.txt").write_text("mine")
    before = snapshot(dest)
    code, _, err = run_cli(
        capsys,
        "--source-files",
        f"train={layouts / 'jsonl' / 'train.jsonl'}",
        "--destdir",
        dest,
        "--spm-model",
        tsv_out / "spm.model",
        "--overwrite",
    )
    assert code == 2 and "holds 'notes.txt' that pyramidion-preprocess did not write; refusing to replace it" in err
    assert snapshot(dest) == before
