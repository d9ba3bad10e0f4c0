"""The main job command runs a few steps and writes valid outputs."""

import json
import os
import subprocess
import sys

import pytest


def _run(args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "megatron_ultramem", *args],
        cwd=cwd, capture_output=True, text=True, timeout=600,
    )


@pytest.mark.parametrize("mode,backend", [("parallel", "torch"), ("skip", "dali")])
def test_main_job_short_run(tmp_path, mode, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali", reason="pip install 'megatron-ultramem[dali]'")
    proc = _run(
        ["--train-iters", "6", "--eval-interval", "3", "--eval-iters", "1", "--warmup-iters", "2",
         "--micro-batch-size", "4", "--seq-length", "32", "--ultramem-mode", mode,
         "--data-backend", backend, "--no-progress"],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "ultramem_run"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_iters"] == 6 and len(metrics["train_loss"]) == 6
    assert metrics["memory_layers"] == 2
    losses = list(metrics["train_loss"].values())
    assert all(0 < l < 10 for l in losses)
    # byte-level LM starts near ln(256) = 5.55 and must go down in 6 steps at lr 3e-3
    assert losses[0] > losses[-1]
    png = (out / "loss_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert not [p for p in os.listdir(out) if ".tmp" in p]  # atomic writes left nothing behind


def test_main_job_bad_flag_is_refused_before_work(tmp_path):
    proc = _run(["--ultramem-topm", "1000", "--no-progress"], tmp_path)
    assert proc.returncode != 0
    assert "--ultramem-topm" in proc.stderr and "allowed 1..64" in proc.stderr
    assert not (tmp_path / "ultramem_run").exists()


def test_help_lists_options(tmp_path):
    proc = _run(["--help"], tmp_path)
    assert proc.returncode == 0 and "--ultramem-mode" in proc.stdout and "--train-iters" in proc.stdout
