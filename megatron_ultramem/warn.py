"""The plugin's user-facing warnings, seen under launchers that silence Python warnings.

`warn_user(message)` issues a `UserWarning` (tests and callers can catch or filter it as usual) AND
logs the message once per process at WARNING level on the `megatron_ultramem` logger, from global
rank 0 only. Why both: Megatron-LM's `pretrain_gpt.py` / `pretrain_hybrid.py` ignore UserWarning,
FutureWarning and DeprecationWarning on every rank but 0 (and replace `warnings.showwarning` there),
launch scripts commonly export `PYTHONWARNINGS=ignore`, and Python shows a warning once per call
site, so a warning alone can go unseen; a log record goes where the job's logs go. Rank 0 only,
once: a message about the run would otherwise be printed by every one of thousands of ranks.
"""

import logging
import os
import warnings

logger = logging.getLogger("megatron_ultramem")

_LOGGED = set()


def _global_rank() -> int:
    """torch.distributed's rank once initialized, else torchrun's RANK (0 outside a launcher)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def warn_user(message: str, stacklevel: int = 2) -> None:
    """warnings.warn(message) for the caller, plus one log record on rank 0 (see module doc)."""
    warnings.warn(message, UserWarning, stacklevel=stacklevel + 1)
    if message in _LOGGED or _global_rank() != 0:
        return
    _LOGGED.add(message)
    logger.warning("%s", message)
