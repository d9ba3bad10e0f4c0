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


def _write_token_dataset(prefix, num_docs=300, max_id=1000, seed=0):
    """A Megatron indexed dataset the way Megatron-LM's preprocessing tool writes one: uint16
    token ids (a vocabulary above 256, like a BPE tokenizer's), one sequence per document."""
    import numpy
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = numpy.random.default_rng(seed)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=numpy.uint16)
    period = rng.integers(0, max_id, size=7)  # a repeated motif: learnable in a few steps
    for _ in range(num_docs):
        n = int(rng.integers(20, 80))
        doc = numpy.resize(period, n).astype(numpy.uint16)
        doc[rng.integers(0, n)] = max_id  # the largest id occurs
        builder.add_document(doc, [doc.size])
    builder.finalize(f"{prefix}.idx")


def test_main_job_on_a_megatron_indexed_dataset(tmp_path):
    prefix = str(tmp_path / "tokens")
    _write_token_dataset(prefix)
    proc = _run(
        ["--data-path", prefix, "--train-iters", "6", "--eval-interval", "3", "--eval-iters", "1",
         "--warmup-iters", "1", "--micro-batch-size", "4", "--seq-length", "32", "--no-progress"],
        tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "ultramem_run" / "metrics.json").read_text())
    assert metrics["args"]["data_info"]["max_token_id"] == 1000
    losses = list(metrics["train_loss"].values())
    # vocabulary 1001 padded to 1024: an untrained model starts near ln(1024) = 6.93
    assert abs(losses[0] - 6.93) < 0.5 and losses[-1] < losses[0]
    assert metrics["valid_loss"]


@pytest.mark.parametrize("damage", ["missing", "no_idx", "garbage_idx", "truncated_bin"])
def test_main_job_refuses_a_bad_data_path(tmp_path, damage):
    prefix = str(tmp_path / "tokens")
    if damage != "missing":
        _write_token_dataset(prefix, num_docs=20)
    if damage == "no_idx":
        os.remove(prefix + ".idx")
    elif damage == "garbage_idx":
        with open(prefix + ".idx", "wb") as f:
            f.write(b"not an index at all")
    elif damage == "truncated_bin":
        with open(prefix + ".bin", "r+b") as f:
            f.truncate(10)
    proc = _run(["--data-path", prefix, "--no-progress"], tmp_path)
    assert proc.returncode != 0
    assert "--data-path" in proc.stderr and prefix in proc.stderr
    assert "Traceback" not in proc.stderr  # a message, not a crash
    expected = {"missing": ".bin not found", "no_idx": ".idx not found",
                "garbage_idx": "not a readable Megatron indexed dataset",
                "truncated_bin": "truncated or mismatched"}[damage]  # fmt: skip
    assert expected in proc.stderr
    assert not (tmp_path / "ultramem_run").exists()  # refused before any work


def test_main_job_refuses_a_bad_split(tmp_path):
    prefix = str(tmp_path / "tokens")
    _write_token_dataset(prefix, num_docs=20)
    proc = _run(["--data-path", prefix, "--split", "100,0,0", "--no-progress"], tmp_path)
    assert proc.returncode != 0 and "--split" in proc.stderr and "Traceback" not in proc.stderr
