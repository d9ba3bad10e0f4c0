"""Multi-rank tests: each runs tests/distributed/worker.py under torchrun (gloo, CPU).

The worker compares every rank's slice with the single-rank layer on the same global batch and the
same global weights (see its docstring for each scenario and tolerance).
"""

import os
import subprocess
import sys

import pytest

WORKER = os.path.join(os.path.dirname(__file__), "worker.py")


@pytest.mark.parametrize(
    "nproc,scenario",
    [(2, "layouts2"), (4, "layouts4"), (4, "checkpoint"), (2, "train2"), (4, "hybrid"), (2, "pipeline"), (2, "optimizer"), (2, "gradnorm"), (2, "tpsync")],
)
def test_torchrun(nproc, scenario):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        # --standalone: a local rendezvous on a free port, so parallel runs do not collide
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
         WORKER, scenario],
        capture_output=True, text=True, timeout=900, env=env,
    )
    out = proc.stdout + proc.stderr
    print("\n".join(l for l in out.splitlines() if l.startswith(("ok ", "PASSED"))))
    assert proc.returncode == 0 and f"PASSED {scenario}" in out, out[-6000:]
