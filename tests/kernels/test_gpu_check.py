"""benchmarks/gpu_check.py --dry-run: the GPU session's prepared script, run end to end on CPU.

The dry run executes every section's code (correctness checks on tiny shapes under the Triton
interpreter, the sync check with the op recorder, the copy, the kernel timing table, the layer
decode/train comparison and the pretrain argument check) so that a device session does not spend
its minutes on a script error, and shows the section budget. Timings under the interpreter are
meaningless and not checked.
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
    env = dict(os.environ, ULTRAMEM_POISON_OUTPUTS="1")  # the script must turn it off itself
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--dry-run",
         "--out", str(out), "--budget-s", "20000"],  # no section cut for time on a slow CPU
        capture_output=True, text=True, timeout=2400, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    result = json.loads((out / "gpu_check.json").read_text())
    checks = result["checks"]
    assert len(checks) >= 40 and all(c["ok"] for c in checks), [
        c for c in checks if not c["ok"]
    ]
    names = " ".join(c["name"] for c in checks)
    for needle in ("gather", "split=", "bf16 main_grad", "hot row", "topm tiled", "topm register",
                   "topm paths", "ties"):  # fmt: skip
        assert needle in names, needle
    assert not [s for s in result["skipped"] if "time budget" in s], result["skipped"]
    # the section budget: every section planned, run, within the 100%
    budget = {e["section"]: e for e in result["budget"]}
    assert list(budget) == ["correctness", "sync", "speed", "layer", "pretrain"], budget
    assert all(e["status"] == "ran" for e in budget.values()), budget
    assert result["copy_bw"] and result["speed"]
    kernels = {r["kernel"] for r in result["speed"]}
    assert kernels >= {"gather fwd", "gather bwd fp32 main_grad", "gather bwd bf16 main_grad",
                       "gather fwd decode", "topm phase 2"}, kernels  # fmt: skip
    try:
        import megatron.core  # noqa: F401

        decode = result["layer"]["decode"]
        assert decode and {"dense", "moe", "ultramem"} <= set(decode[0])
        assert result["layer"]["train"]["ultramem"]["fwd_bwd_ms"] > 0
        assert any(c["name"].startswith("sync: training step") for c in checks)
    except ImportError:
        assert any("layer" in s for s in result["skipped"])
    assert result["pretrain"]["status"]  # run, or a clear 'not run' line
    md = (out / "gpu_check.md").read_text()
    for heading in ("## Targets", "## Section budget", "## Kernels", "## Pretrain"):
        assert heading in md, heading
    log = (out / "gpu_check.log").read_text()
    assert "[section] pretrain" in log and "| section | share |" in log
