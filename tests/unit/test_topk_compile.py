"""Compile budget of the Triton top-k kernels for sm_80 and sm_90, checked without a GPU.

For each width (n → k) the launchers run on meta tensors inside :func:`topk_triton.record_launches`, so the
exact launches of a forward + backward are known (kernel, grid, arguments, meta-parameters) without running
one. Each launch's specialization is computed by Triton's own binder for the target (as the JIT does on a
GPU: 16-byte-aligned pointers, integers divisible by 16 or equal to 1; the plan kernels opt out of both), every
distinct one is compiled once with ``triton.compile`` for ``GPUTarget("cuda", arch, 32)``, and its PTX goes
through Triton's bundled ``ptxas -v`` for registers and spill bytes. Budgets: 0 bytes of spills, shared memory
within the per-block limit (163 KiB on sm_80, 227 KiB on sm_90), ≤ 20 s of compile CPU time per kernel
(process + ptxas; wall time is printed, not asserted: the machine may be loaded).

The default suite compiles a subset (8192 → 2048, bf16, d = 512, default options: six kernels per
architecture); ``pytest -m compile_budget tests/unit/test_topk_compile.py`` compiles the full matrix (every
width 512 … 65,536, both dtypes, all option sets; a separate step of ``.ci/run``) and writes its report to
``$PYRAMIDION_TOPK_COMPILE_REPORT`` when set (``docs/results/topk_compile_report.json`` was made that way).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import resource
import subprocess
import tempfile
import time

import pytest
import torch

triton = pytest.importorskip("triton")

#: architecture → per-block shared memory limit in bytes
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
COMPILE_BUDGET_S = 20.0
BATCH = 4
#: n → k per width: the halving schedule (n/2), the benchmark's quarter (n/4); and the presets' and
#: benchmarks' other shapes (the GPU tests' 1000 → 300 and 4096 → 100, a 16-round 65,536 → 1)
FULL_SHAPES = [(2**e, 2**e // q) for e in range(9, 17) for q in (2, 4)] + [(1000, 300), (4096, 100), (65536, 1)]
FULL_MIX = [("bf16", 512), ("bf16", 64), ("fp32", 512), ("fp32", 64), ("bf16", 1024)]
FULL_OPTIONS = [(flip, back) for flip in (True, False) for back in (False, True)]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def launches_of(n, k, dtype, dim, flip_right, sort_back):
    """Every launch of one forward + backward at B=4, plain top-k and score_pool (meta tensors: recorded, not run)."""
    from pyramidion_ds.model import topk_triton

    return topk_triton.planned_launches(BATCH, n, k, dim, DTYPES[dtype], flip_right, sort_back)


@functools.cache
def _binder(fn, arch):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from pyramidion_ds.model import topk_triton

    kernel = topk_triton._kernel(fn)
    backend = make_backend(GPUTarget("cuda", arch, 32))
    return backend, create_function_from_signature(kernel.signature, kernel.params, backend)


def specialization(arch, fn, args, meta):
    """What the JIT would compile for these arguments on ``arch``: (key, ASTSource, options)."""
    from triton.compiler import ASTSource
    from triton.runtime.jit import MockTensor

    from pyramidion_ds.model import topk_triton

    kernel = topk_triton._kernel(fn)
    backend, binder = _binder(fn, arch)
    # fresh CUDA allocations are 256-byte aligned; MockTensor's data_ptr() is 0
    mocked = [MockTensor(a.dtype) if isinstance(a, torch.Tensor) else a for a in args]
    bound, spec, options = binder(*mocked, **meta)
    options, signature, constexprs, attrs = kernel._pack_args(backend, options, bound, spec, options)
    key = (fn.__name__, arch, repr(spec), repr(sorted(options.__dict__.items())))
    return key, ASTSource(kernel, signature, constexprs, attrs), options


def ptxas_figures(ptx, arch, workdir):
    """Registers and spill bytes from the bundled ``ptxas -v``."""
    from triton.backends.nvidia.compiler import get_ptxas

    path = os.path.join(workdir, "kernel.ptx")
    with open(path, "w") as handle:
        handle.write(ptx)
    gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
    log = subprocess.run(
        [get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", path, "-o", os.devnull],
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    registers = max(int(v) for v in re.findall(r"Used (\d+) registers", log))
    spills = sum(int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log))
    return registers, spills


def compile_one(source, options, arch, workdir):
    from triton.backends.compiler import GPUTarget

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu, wall = time.process_time(), time.perf_counter()
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options.__dict__)
    wall = time.perf_counter() - wall
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = time.process_time() - cpu + (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
    registers, spills = ptxas_figures(compiled.asm["ptx"], arch, workdir)
    return {
        "registers": registers,
        "spill_bytes": spills,
        "shared_bytes": compiled.metadata.shared,
        "num_warps": compiled.metadata.num_warps,
        "compile_cpu_s": round(cpu, 2),
        "compile_wall_s": round(wall, 2),
    }


def check_matrix(shapes, mixes, option_sets, archs=(80, 90)):
    """Compile every distinct kernel the shapes launch; returns the report (one row per arch, shape, kernel)."""
    compiled, rows = {}, []
    with tempfile.TemporaryDirectory() as workdir:
        previous = os.environ.get("TRITON_CACHE_DIR")
        os.environ["TRITON_CACHE_DIR"] = os.path.join(workdir, "cache")  # measure compiles, not cache hits
        try:
            configs = [
                (n, k, dtype, dim, *options) for n, k in shapes for dtype, dim in mixes for options in option_sets
            ]
            recorded = [launches_of(*config) for config in configs]
            for arch in archs:
                for (n, k, dtype, dim, flip_right, sort_back), launches in zip(configs, recorded, strict=True):
                    for fn, grid, args, meta in launches:
                        key, source, options = specialization(arch, fn, args, meta)
                        if key not in compiled:
                            compiled[key] = compile_one(source, options, arch, workdir)
                            compiled[key]["variant"] = len(compiled)
                        rows.append(
                            {
                                "arch": f"sm_{arch}",
                                "n": n,
                                "k": k,
                                "dtype": dtype,
                                "d": dim,
                                "flip_right": flip_right,
                                "sort_back": sort_back,
                                "kernel": fn.__name__,
                                "grid": list(grid),
                                "programs_per_row": math.prod(grid) // BATCH,
                                **compiled[key],
                            }
                        )
        finally:
            if previous is None:
                os.environ.pop("TRITON_CACHE_DIR")
            else:
                os.environ["TRITON_CACHE_DIR"] = previous
    return {"triton": triton.__version__, "batch": BATCH, "distinct_kernels": len(compiled), "rows": rows}


def assert_within_budget(report):
    for row in report["rows"]:
        where = f"{row['kernel']} {row['arch']} n={row['n']} k={row['k']} {row['dtype']} d={row['d']}"
        assert row["spill_bytes"] == 0, f"{where}: {row['spill_bytes']} bytes of spills ({row})"
        limit = SHARED_LIMIT[int(row["arch"][3:])]
        assert row["shared_bytes"] <= limit, f"{where}: {row['shared_bytes']} B of shared memory > {limit}"
        assert row["compile_cpu_s"] <= COMPILE_BUDGET_S, f"{where}: compiled in {row['compile_cpu_s']} CPU s"


VARIANT_FIELDS = ("registers", "spill_bytes", "shared_bytes", "num_warps", "compile_cpu_s", "compile_wall_s")


def compact(report) -> dict:
    """The report as written: each distinct compiled kernel once, and per architecture, width and kernel the
    variants launched and the programs per row (B=4; default options, bf16, d=512)."""
    variants, widths = {}, {}
    for row in report["rows"]:
        variants[row["variant"]] = {
            "variant": row["variant"],
            "arch": row["arch"],
            "kernel": row["kernel"],
            **{key: row[key] for key in VARIANT_FIELDS},
        }
        entry = widths.setdefault(
            (row["arch"], row["n"], row["k"], row["kernel"]),
            {"arch": row["arch"], "n": row["n"], "k": row["k"], "kernel": row["kernel"], "variants": set()},
        )
        entry["variants"].add(row["variant"])
        if (row["dtype"], row["d"], row["flip_right"], row["sort_back"]) == ("bf16", 512, True, False):
            entry["programs_per_row"] = min(entry.get("programs_per_row", math.inf), row["programs_per_row"])
    for entry in widths.values():
        entry["variants"] = sorted(entry["variants"])
    return {
        "triton": report["triton"],
        "batch": report["batch"],
        "budgets": {"spill_bytes": 0, "shared_bytes": SHARED_LIMIT, "compile_cpu_s": COMPILE_BUDGET_S},
        "distinct_kernels": report["distinct_kernels"],
        "launches_checked": len(report["rows"]),
        "variants": sorted(variants.values(), key=lambda v: v["variant"]),
        "widths": list(widths.values()),
    }


KERNELS = (
    "_plan_round",
    "_plan_compose",
    "_plan_subtree",
    "_plan_reverse",
    "_mix_forward",
    "_mix_backward",
    "_score_forward",
    "_score_backward",
)


def summary(report) -> str:
    """Markdown, per width and architecture: registers and programs per row of each kernel (B=4, bf16, d=512,
    default options), and over every variant the width launches (both dtypes, d 64/512/1024, all options) the
    total spills, the largest shared memory and the longest compile."""
    table = compact(report)
    variants = {v["variant"]: v for v in table["variants"]}
    default = {}
    for row in report["rows"]:
        if (row["dtype"], row["d"], row["flip_right"], row["sort_back"]) == ("bf16", 512, True, False):
            default[(row["n"], row["k"], row["arch"], row["kernel"])] = row["registers"]
    names = " / ".join(name.lstrip("_") for name in KERNELS)
    lines = [
        f"| n → k | arch | registers: {names} | programs per row: {names} | spills (B) | shared (B, max) "
        "| compile CPU s (max) |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = {}
    for entry in table["widths"]:
        rows.setdefault((entry["n"], entry["k"], entry["arch"]), {})[entry["kernel"]] = entry
    for (n, k, arch), entries in sorted(rows.items(), key=lambda item: (item[0][0], -item[0][1], item[0][2])):
        used = [variants[v] for entry in entries.values() for v in entry["variants"]]
        registers = " / ".join(str(default.get((n, k, arch, name), "-")) for name in KERNELS)
        programs = " / ".join(str(entries.get(name, {}).get("programs_per_row", "-")) for name in KERNELS)
        lines.append(
            f"| {n} → {k} | {arch} | {registers} | {programs} | {sum(v['spill_bytes'] for v in used)} "
            f"| {max(v['shared_bytes'] for v in used)} | {max(v['compile_cpu_s'] for v in used)} |"
        )
    return "\n".join(lines)


def _emit(report, name):
    target = os.environ.get("PYRAMIDION_TOPK_COMPILE_REPORT")
    if target:
        with open(target, "w") as handle:
            json.dump(compact(report), handle, indent=1)
            handle.write("\n")
    variants = {row["variant"]: row for row in report["rows"]}
    print(f"\n{name}: {report['distinct_kernels']} distinct kernels compiled, {len(report['rows'])} launches checked")
    for row in sorted(variants.values(), key=lambda r: (r["arch"], r["kernel"])):
        print(
            f"  {row['arch']} {row['kernel']:>14}: {row['registers']} registers, {row['spill_bytes']} B spills, "
            f"{row['shared_bytes']} B shared, {row['num_warps']} warps, compile {row['compile_cpu_s']} CPU s "
            f"({row['compile_wall_s']} s wall)"
        )
    print(summary(report))


def _skip_without_ptxas():
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        path = get_ptxas(90).path
    except Exception as err:  # pragma: no cover - depends on the install
        pytest.skip(f"no bundled ptxas: {err}")
    if not os.path.exists(path):  # pragma: no cover
        pytest.skip(f"no bundled ptxas at {path}")


def test_kernels_within_budget_at_8192_lanes(capsys):
    """Default suite: the kernels B=4, 8192 → 2048, bf16, d=512 launches, for sm_80 and sm_90."""
    from pyramidion_ds.model import topk_triton

    if topk_triton.interpreted():
        pytest.skip("this process runs triton's interpreter")
    _skip_without_ptxas()
    report = check_matrix([(8192, 2048)], [("bf16", 512)], [(True, False)])
    with capsys.disabled():
        _emit(report, "top-k kernels, 8192 → 2048")
    # the plain top-k's six kernels and score_pool's (two of its own, the plan kernels' scorer variants), per arch
    assert {row["kernel"] for row in report["rows"]} == set(KERNELS)
    assert {row["arch"] for row in report["rows"]} == {"sm_80", "sm_90"}
    assert_within_budget(report)


@pytest.mark.compile_budget
def test_kernels_within_budget_every_width(capsys):
    """The full matrix: widths 512 … 65,536, both dtypes, every option set, sm_80 and sm_90."""
    from pyramidion_ds.model import topk_triton

    if topk_triton.interpreted():
        pytest.skip("this process runs triton's interpreter")
    _skip_without_ptxas()
    report = check_matrix(FULL_SHAPES, FULL_MIX, FULL_OPTIONS)
    with capsys.disabled():
        _emit(report, "top-k kernels, every width")

    # one compiled plan kernel per architecture and option set serves every width: the variants every width
    # launches are those of one single-round (8192 → 4096) and one two-round (8192 → 2048) width
    def plan_variants(rows):
        return {(row["kernel"], row["variant"]) for row in rows if row["kernel"].startswith("_plan")}

    representatives = [row for row in report["rows"] if (row["n"], row["k"]) in {(8192, 4096), (8192, 2048)}]
    assert plan_variants(report["rows"]) == plan_variants(representatives)
    assert_within_budget(report)
