"""User-facing warnings also go through logging, once, from rank 0 (megatron_ultramem/warn.py),
so launchers that silence Python warnings still show them."""

import subprocess
import sys

# What Megatron-LM's pretrain_gpt.py / pretrain_hybrid.py do on ranks other than 0, plus the
# PYTHONWARNINGS=ignore many launch scripts export: no Python warning is shown at all.
SILENCED = """
import warnings
warnings.filterwarnings("ignore", category=UserWarning)
warnings.showwarning = lambda *a, **k: None
from megatron_ultramem import compat
from megatron_ultramem.megatron_lm.arguments import add_ultramem_args, validate_ultramem_args
import argparse
compat.check_version("0.99.0")
compat._WARNED.clear()
compat.check_version("0.99.0")   # the same message again: logged once
args = add_ultramem_args(argparse.ArgumentParser()).parse_args(["--ultramem-topm", "9"])
args.spec = None
validate_ultramem_args(args)     # flags without the spec
"""


def run(rank):
    env = {"PYTHONWARNINGS": "ignore", "RANK": str(rank), "PATH": "/usr/bin:/bin"}
    import os

    env["PYTHONPATH"] = os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", SILENCED], capture_output=True, text=True,
                          timeout=300, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def test_warnings_are_logged_once_on_rank_0():
    err = run(0)
    lines = err.splitlines()
    version = [line for line in lines if "megatron-core 0.99.0 is installed" in line]
    assert len(version) == 1  # logged once although warned twice
    assert any("--ultramem-topm given but --spec does not select" in line for line in lines)
    assert "UserWarning" not in err  # the Python warnings themselves stayed silenced


def test_other_ranks_log_nothing():
    err = run(1)
    assert "0.99.0" not in err and "--ultramem-topm" not in err
