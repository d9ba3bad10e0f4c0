"""Every kernel compiles for sm_90 (Hopper) through Triton's real pipeline, without a GPU.

Runs tests/kernels/compile_sm90.py in a subprocess (TRITON_INTERPRET must be unset when the kernel
modules are imported, and this session's conftest sets it). Catches what the interpreter accepts
but the compiler refuses: e.g. a variable whose tile shape differs between the branches of an
`if` (seen while writing the tiled phase-2 kernel). Also asserts no local-memory spill arrays.
"""

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")

HERE = os.path.dirname(os.path.abspath(__file__))


def test_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # a cold compile, not a cached one
    out = tmp_path / "usage.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "compile_sm90.py"), "--json", str(out)],
        capture_output=True, text=True, timeout=1200, env=env,
    )  # fmt: skip
    if proc.returncode != 0 and not out.exists():
        pytest.fail(proc.stderr[-4000:])
    results = json.loads(out.read_text())
    failed = [r for r in results if not r["ok"]]
    assert not failed, failed
    assert len(results) >= 20
    for r in results:  # registers within Hopper's 255 per thread; no spilled arrays in local memory
        assert 0 < r["reg"] <= 255 and r.get("local", 0) == 0, r
