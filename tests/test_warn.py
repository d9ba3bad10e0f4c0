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
compat.check_version("0.99.0")
compat._WARNED.clear()
compat.check_version("0.99.0")   # the same message again: logged once
"""


def run(*ranks):
    """The script under RANK=r for each r, concurrently; returns their stderr texts."""
    import os

    env = {"PYTHONWARNINGS": "ignore", "PATH": "/usr/bin:/bin"}
    env["PYTHONPATH"] = os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")
    procs = [subprocess.Popen([sys.executable, "-c", SILENCED], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=dict(env, RANK=str(r)))
             for r in ranks]  # fmt: skip
    errs = []
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        errs.append(err)
    return errs


def test_warnings_are_logged_once_on_rank_0_only():
    err, other = run(0, 1)
    version = [line for line in err.splitlines() if "megatron-core 0.99.0 is installed" in line]
    assert len(version) == 1  # logged once although warned twice
    assert "UserWarning" not in err  # the Python warnings themselves stayed silenced
    assert "0.99.0" not in other  # rank 1 logs nothing


def test_flag_warning_goes_to_the_log(caplog, monkeypatch):
    import argparse
    import logging
    import warnings

    from megatron_ultramem import warn
    from megatron_ultramem.megatron_lm.arguments import add_ultramem_args, validate_ultramem_args

    monkeypatch.setattr(warn, "_LOGGED", set())
    args = add_ultramem_args(argparse.ArgumentParser()).parse_args(["--ultramem-topm", "9"])
    args.spec = None
    with warnings.catch_warnings(record=True), caplog.at_level(logging.WARNING, "megatron_ultramem"):
        warnings.simplefilter("always")
        validate_ultramem_args(args)
        validate_ultramem_args(args)
    logged = [r for r in caplog.records if "--ultramem-topm given but --spec" in r.getMessage()]
    assert len(logged) == 1 and logged[0].levelno == logging.WARNING
