"""The benchmark scripts run here in their smoke modes and write their reports."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "script,args,needle",
    [
        ("bench_kernels.py", ["--smoke"], "gather"),
        ("bench_data.py", ["--smoke", "--backends", "torch"], "torch"),
        ("bench_decode.py", ["--smoke"], "UltraMem / MoE"),
    ],
)
def test_benchmark_smoke(tmp_path, script, args, needle):
    out = tmp_path / "report.md"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", script), *args, "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert needle in text and "|" in text  # a markdown table with the measured rows
