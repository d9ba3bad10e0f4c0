"""The Triton kernels compiled for sm_90 (Hopper) as real launches compile them, without a GPU.

Runs tests/kernels/compile_sm90.py in subprocesses (TRITON_INTERPRET must be unset when the kernel
modules are imported, and this session's conftest sets it):
- `--quick`: every launch variant of the gather kernels at the shapes that reach them (training
  and decode sizes, bf16 and fp32, Dv a multiple of 16 and not, every gradient destination),
  specialized by Triton's JIT binder (divisibility attributes) and compiled through ptxas; each
  must pass the checks: no spills, no barrier or shared-memory op between row loads, row loads as
  wide as the shape allows (16 bytes), no int32 address products, bytes in flight per SM >= the
  H100 SXM bandwidth-latency product (the results file marks the H200's). A representative set
  per test run (the training and decode shapes of both paths, bf16 and fp32, Dv = 1000; every
  gather kernel); the full list with more shapes and the phase-2 kernels is what
  benchmarks/results/kernels_sm90_compile.md records (`--md`, not run here).
- `--self-check`: the checks' negative controls, so that a clean table means something: the
  int32-offset lint flags `ptr + s * n` with an int32 index (the split reduce's old overflow) and
  not its int64 form, and the real split reduce's TTIR multiplies in i64 (a wrap itself needs a
  > 2^31-element workspace: 8 GB, not feasible under the interpreter); the pre-#16 forward
  pattern (a 1-D row broadcast into the one-hot tile) fails on barriers / shared memory between
  row loads; a bf16 row load at Dv = 1000 without the kernels' ALIGN rounding fails on 2-byte
  loads where 16 are possible (and passes with it); the real forward capped at 32 registers
  fails on spills.
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


def test_checks_fail_on_their_defects():
    proc = _run("--self-check", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["int32"] and not res["int64"], res  # the lint can fail, and passes the fix
    assert not res["split_reduce"] and res["split_reduce_i64_product"], res
    ctl = {name: " | ".join(f) for name, f in res["controls"].items()}
    assert "barrier between row loads" in ctl["broadcast row"], ctl
    assert "shared-memory ops in the row-load loop" in ctl["broadcast row"], ctl
    assert "row loads of 2 B where 16 B vectors are possible" in ctl["unaligned row"], ctl
    assert "row loads of" not in ctl["aligned row"] and "barrier" not in ctl["aligned row"], ctl
    assert "spills" in ctl["spilling fwd"], ctl
