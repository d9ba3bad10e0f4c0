"""The Triton kernels compiled for sm_90 (Hopper) as real launches compile them, without a GPU.

Runs tests/kernels/compile_sm90.py in subprocesses (TRITON_INTERPRET must be unset when the kernel
modules are imported, and this session's conftest sets it):
- `--quick`: every launch variant of the gather kernels at the shapes that reach them (training
  and decode sizes, bf16 and fp32, Dv a multiple of 16 and not, every gradient destination),
  specialized by Triton's JIT binder (divisibility attributes) and compiled through ptxas; each
  must pass the checks: no spills, no barrier or shared-memory op between row loads, row loads as
  wide as the shape allows (16 bytes), no int32 address products, bytes in flight per SM >= the
  H200 bandwidth-latency product. ~1-2 min of CPU (17 variants; the full list with the phase-2
  kernels, 35 variants, is what benchmarks/results/kernels_sm90_compile.md records: ~4 min of
  CPU, not run here).
- `--self-check`: the int32-offset lint flags `ptr + s * n` with an int32 index (the split
  reduce's old overflow) and not its int64 form, and the real split reduce's TTIR multiplies in
  i64 (a wrap itself needs a > 2^31-element workspace: 8 GB, not feasible under the interpreter).
"""

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "compile_sm90.py")


def _run(*args, timeout):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          timeout=timeout, env=env)  # fmt: skip


def test_gather_launch_variants_compile_clean_for_sm90(tmp_path):
    out = tmp_path / "variants.json"
    proc = _run("--quick", "--json", str(out), timeout=1800)
    if not out.exists():
        pytest.fail(proc.stderr[-4000:])
    results = json.loads(out.read_text())
    failed = [(r["variant"], r["failures"]) for r in results if not r["ok"]]
    assert not failed, failed
    kernels = {r["kernel"] for r in results}
    assert kernels == {"_gather_pool_fwd_kernel", "_split_reduce_kernel", "_segment_sum_kernel",
                       "_segment_fixup_kernel", "_gather_pool_bwd_kernel"}, kernels  # fmt: skip
    for r in results:  # the checks saw real row loads, 16 bytes wide where Dv / h allows it
        assert r["row_loads"] and r["registers"] <= 255, r
        if r["expected_row_width"] == 16:
            assert set(r["row_loads"]) == {"16"}, r
    # the variants really differ by what the JIT specializes on (Dv % 16, dtypes, LOAD_OLD...)
    assert len(results) >= 15


def test_int32_offset_lint_and_split_reduce():
    proc = _run("--self-check", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["int32"] and not res["int64"], res  # the lint can fail, and passes the fix
    assert not res["split_reduce"] and res["split_reduce_i64_product"], res
