"""Small builders shared by tests."""

import os
import subprocess
import sys

import torch

from megatron_ultramem.config import UltraMemConfig
from megatron_ultramem.cpu_compat import CPU_CONFIG


def small_config(dtype=torch.float32, **overrides) -> UltraMemConfig:
    """A tiny config with deliberately odd sizes (D=24, K=6, n=5 -> n'=10, m=7, Dv=10)."""
    fields = dict(
        num_layers=3,
        hidden_size=24,
        num_attention_heads=4,
        ffn_hidden_size=40,
        params_dtype=dtype,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        **CPU_CONFIG,
        ultramem_num_keys=5,
        ultramem_key_dim=6,
        ultramem_value_dim=10,
        ultramem_expansion=4,
        ultramem_tucker_rank=2,
        ultramem_num_cores=2,
        ultramem_num_heads=2,
        ultramem_topm=7,
        ultramem_impl="reference",
    )
    fields.update(overrides)
    return UltraMemConfig(**fields)


def run_experiments(args, cwd, timeout=600):
    """`python -m megatron_ultramem.experiments *args` in `cwd` with this checkout importable
    (timeout: a guard only: a loaded 2-core machine needs minutes)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "megatron_ultramem.experiments", *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip
