"""benchmarks/gpu_check.py --dry-run: the GPU session's prepared script, run end to end on CPU.

The dry run executes every section's code (correctness checks on tiny shapes under the Triton
interpreter, the copy, the kernel timing table, the layer decode/train comparison and the
pretrain argument check) so that a device session does not spend its minutes on a script error.
Timings under the interpreter are meaningless and not checked.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu_check"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--dry-run",
         "--out", str(out), "--budget-s", "5000"],  # no section skipped for time on a slow CPU
        capture_output=True, text=True, timeout=1500, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    result = json.loads((out / "gpu_check.json").read_text())
    checks = result["checks"]
    assert len(checks) >= 40 and all(c["ok"] for c in checks), [
        c for c in checks if not c["ok"]
    ]
    names = " ".join(c["name"] for c in checks)
    for needle in ("gather", "split=", "topm tiled", "topm register", "topm paths", "ties"):
        assert needle in names, needle
    assert not [s for s in result["skipped"] if "time budget" in s], result["skipped"]
    assert result["copy_bw"] and result["speed"]
    kernels = {r["kernel"] for r in result["speed"]}
    assert kernels >= {"gather fwd", "gather bwd", "gather fwd decode", "topm phase 2"}
    try:
        import megatron.core  # noqa: F401

        decode = result["layer"]["decode"]
        assert decode and {"dense", "moe", "ultramem"} <= set(decode[0])
        assert result["layer"]["train"]["ultramem"]["fwd_bwd_ms"] > 0
    except ImportError:
        assert any("layer" in s for s in result["skipped"])
    assert result["pretrain"]["status"]  # run, or a clear 'not run' line
    md = (out / "gpu_check.md").read_text()
    for heading in ("## Targets", "## Kernels", "## Pretrain"):
        assert heading in md, heading
