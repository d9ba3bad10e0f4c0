"""Run an unmodified Megatron-LM `pretrain_gpt.py` (or `pretrain_hybrid.py`) with UltraMem.

    torchrun --nproc_per_node 8 -m megatron_ultramem.megatron_lm.pretrain_gpt \
        --megatron-lm /path/to/Megatron-LM \
        <pretrain_gpt.py arguments> \
        --spec megatron_ultramem.megatron_lm ultramem_block_spec --ultramem-mode parallel ...
    torchrun ... -m megatron_ultramem.megatron_lm.pretrain_gpt --megatron-lm /path/to/Megatron-LM \
        --megatron-lm-script pretrain_hybrid.py <pretrain_hybrid.py arguments> \
        --spec megatron_ultramem.megatron_lm ultramem_hybrid_stack_spec ...     (core_v0.19+)

The Megatron-LM checkout comes from `--megatron-lm PATH` (taken out of the argument list) or the
environment variable MEGATRON_LM_PATH; `--megatron-lm-script NAME` picks the script (default
pretrain_gpt.py). With megatron-core 0.19 installed, `python -m megatron_ultramem.pretrain` does the
same job without a checkout. Before the script runs:
 1. the checkout goes first on sys.path (its `megatron.training`, `gpt_builders`, `model_provider`;
    its `megatron.core` too, so training code and core match);
 2. `install_megatron_lm_hooks(register_args=True)`: every `parse_args` of megatron.training adds
    the --ultramem-* flags (pretrain_gpt.py passes no extra_args_provider of ours), and the
    optimizer / scheduler / logging / validation hooks are installed (see hooks.py);
 3. the script runs as `__main__` via runpy, with sys.argv[0] set to its path.
Nothing of Megatron is imported before step 1.
"""

import os
import runpy
import sys
from typing import List, Optional, Sequence, Tuple

from ..cli import fail

ENV_VAR = "MEGATRON_LM_PATH"


def split_megatron_lm_path(argv: Sequence[str]) -> Tuple[Optional[str], List[str]]:
    """Take `--megatron-lm PATH` / `--megatron-lm=PATH` out of argv; fall back to $MEGATRON_LM_PATH."""
    path, rest = _take_option(argv, "--megatron-lm")
    return path or os.environ.get(ENV_VAR), rest


def _take_option(argv: Sequence[str], flag: str) -> Tuple[Optional[str], List[str]]:
    """(value of `flag VALUE` / `flag=VALUE`, argv without it)."""
    rest, value = [], None
    argv = list(argv)
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == flag:
            if i + 1 >= len(argv):
                fail(f"{flag} needs a value: a path (a Megatron-LM checkout or a script name)")
            value, i = argv[i + 1], i + 2
            continue
        if token.startswith(flag + "="):
            value, i = token.split("=", 1)[1], i + 1
            continue
        rest.append(token)
        i += 1
    return value, rest


def resolve_script(path: Optional[str], script: str = "pretrain_gpt.py") -> str:
    """The script's path in the checkout; refuses (exit status 2) a missing or wrong checkout."""
    if not path:
        fail(
            f"Megatron-LM checkout not given: pass --megatron-lm PATH or set {ENV_VAR} "
            "(a clone of github.com/NVIDIA/Megatron-LM, e.g. branch core_r0.16.0)"
        )
    root = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(root):
        fail(f"--megatron-lm {path}: no such directory (a Megatron-LM checkout)")
    if os.path.basename(script) != script or not script.endswith(".py"):
        fail(f"--megatron-lm-script {script}: expected a script name in the checkout, e.g. pretrain_gpt.py or pretrain_hybrid.py")
    full = os.path.join(root, script)
    if not os.path.isfile(full):
        fail(f"--megatron-lm {path}: {full} not found: is {path} a Megatron-LM checkout (allowed scripts: pretrain_gpt.py, pretrain_hybrid.py)?")
    return full


def prepare(path: str, script: str = "pretrain_gpt.py") -> str:
    """Steps 1 and 2; returns the script path."""
    script = resolve_script(path, script)
    root = os.path.dirname(script)
    if "megatron" in sys.modules and root not in sys.path:
        # `megatron` is a namespace package: once imported it would keep the wrong `megatron.core`.
        raise RuntimeError(
            "megatron was imported before the Megatron-LM checkout was put on sys.path"
        )
    if root not in sys.path:
        sys.path.insert(0, root)
    from .hooks import install_megatron_lm_hooks

    install_megatron_lm_hooks(register_args=True)
    return script


def main(argv: Optional[Sequence[str]] = None) -> None:
    path, rest = split_megatron_lm_path(sys.argv[1:] if argv is None else argv)
    name, rest = _take_option(rest, "--megatron-lm-script")
    script = prepare(path, name or "pretrain_gpt.py")
    sys.argv = [script, *rest]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
