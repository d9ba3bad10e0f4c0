"""Shared fixtures: a gloo world of size 1 with Megatron's parallel state, on CPU.

Multi-rank tests live in tests/distributed and run their own torchrun processes.
"""

import os
import socket

import pytest
import torch

# Triton reads this when a kernel module is imported: set it before any test imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest-xdist workers (pyproject's `-n auto`): split the cores between them, so that two workers
# on CI's 2 cores do not each run 2 intra-op threads.
# Subprocesses (the main job, torchrun workers, benchmarks) inherit OMP_NUM_THREADS.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(_threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per core, at most 4. The suite is mostly small single-threaded tests
    and subprocesses; each worker holds torch + Megatron-Core (about 1 GB), so a many-core machine
    gains little from more."""
    return max(1, min(4, os.cpu_count() or 1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def megatron_world():
    """torch.distributed (gloo, world 1) + parallel_state (TP=1, EP=1) + CPU compat + RNG tracker."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_ultramem import cpu_compat

    cpu_compat.enable()
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)
    yield


# ---------------------------------------------------------------------- a main-job checkpoint
TINY_RUN = [
    "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2", "--ffn-hidden-size", "64",
    "--seq-length", "16", "--micro-batch-size", "2", "--train-iters", "2", "--eval-interval", "2",
    "--eval-iters", "1", "--ultramem-layers", "[0,1]", "--ultramem-num-keys", "8",
    "--ultramem-key-dim", "8", "--ultramem-topm", "4", "--no-progress", "--threads", "1",
]  # fmt: skip
"""A main job small enough to run in seconds; its checkpoints (iterations 1 and 2) serve the
checkpoint tests and the bad-input table's damaged-checkpoint rows."""


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """(directory with iterations 1 and 2 of TINY_RUN, the flags it was written with)."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("tiny_checkpoint")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_ultramem", *TINY_RUN, "--save", str(root / "ck"),
         "--save-interval", "1", "--output-dir", str(root / "out")],
        capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(root / "ck"), list(TINY_RUN)


@pytest.fixture(scope="session")
def tiny_export(tiny_checkpoint, tmp_path_factory):
    """(the Hugging Face folder of tiny_checkpoint's latest iteration, a `--for pretrain` import of
    it: a Megatron-LM-style release checkpoint). Needs the `hf` extra."""
    pytest.importorskip("transformers", reason="pip install -e '.[hf]'")
    from megatron_ultramem.export_hf import export
    from megatron_ultramem.import_hf import import_hf

    root = tmp_path_factory.mktemp("tiny_export")
    export(tiny_checkpoint[0], str(root / "hf"), quiet=True)
    import_hf(str(root / "hf"), str(root / "pre"), "pretrain", quiet=True)
    return str(root / "hf"), str(root / "pre")
