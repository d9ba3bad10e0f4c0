"""Checkpoints of the main job: Megatron's dist_checkpointing, written so that a crash never breaks
resuming.

Layout of a save directory (Megatron-LM's names, so the tracker reads like theirs):

    DIR/latest_checkpointed_iteration.txt   the last complete checkpoint's iteration
    DIR/iter_0000100/                       dist_checkpointing of the model and the optimizer
                     ultramem_state.json    iteration, consumed samples, scheduler, run config
                     rng_rank{r}.pt         each rank's torch CPU RNG and Megatron's tracker states

Atomicity: a checkpoint is written into `iter_N.tmp` and renamed to `iter_N` after every rank has
finished writing (a barrier), then the tracker file is replaced (write-then-rename). A process
killed at any point leaves either the previous tracker (and maybe a `.tmp` directory, ignored and
overwritten by the next save), or the new one pointing at a complete directory.

A checkpoint records the flags that define the model and the data order (`run_config`); loading
into a run whose flags differ is refused before training, naming each differing flag.
"""

import json
import os
import shutil
from typing import Dict, Optional

import torch

TRACKER = "latest_checkpointed_iteration.txt"
STATE = "ultramem_state.json"


class CheckpointError(ValueError):
    """A --load directory that cannot be resumed from (missing, incomplete, another config)."""


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _replace_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest_iteration(root: str) -> Optional[int]:
    """The tracker's iteration, or None when `root` holds no complete checkpoint."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    if not text.isdigit() or not os.path.isdir(iteration_dir(root, int(text))):
        raise CheckpointError(
            f"{path} says {text!r}, but {iteration_dir(root, int(text)) if text.isdigit() else 'it'} "
            "is not a checkpoint directory: the checkpoint folder is damaged"
        )
    return int(text)


def save_checkpoint(root: str, iteration: int, model, optimizer, scheduler, extra: Dict) -> str:
    """Write checkpoint `iteration` under `root` atomically (a collective: call on every rank)."""
    from megatron.core import dist_checkpointing

    final, tmp = iteration_dir(root, iteration), iteration_dir(root, iteration) + ".tmp"
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
        os.makedirs(tmp)
    _barrier()
    model_sd = model.sharded_state_dict()
    state = {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd)}
    dist_checkpointing.save(state, tmp)
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.save(
        {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()},
        os.path.join(tmp, f"rng_rank{_rank()}.pt"),
    )
    if _rank() == 0:
        meta = dict(extra, iteration=iteration, scheduler=scheduler.state_dict())
        with open(os.path.join(tmp, STATE), "w") as f:
            json.dump(meta, f, indent=1, default=str)
    _barrier()  # every rank's shards are on disk
    if _rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _replace_text(os.path.join(root, TRACKER), str(iteration))
    _barrier()
    return final


def read_state(root: str, iteration: int) -> Dict:
    with open(os.path.join(iteration_dir(root, iteration), STATE)) as f:
        return json.load(f)


def check_run_config(saved: Dict, current: Dict, where: str) -> None:
    """Refuse a checkpoint written with other model/data flags, naming each of them."""
    diff = [
        f"--{k.replace('_', '-')}: checkpoint {saved.get(k)!r}, this run {current.get(k)!r}"
        for k in sorted(set(saved) | set(current))
        if saved.get(k) != current.get(k)
    ]
    if diff:
        raise CheckpointError(
            f"--load {where} was written by a run with other settings; resume with the same "
            "flags or train from scratch:\n  " + "\n  ".join(diff)
        )


def load_checkpoint(root: str, iteration: int, model, optimizer, scheduler) -> Dict:
    """Restore model, optimizer, scheduler and RNG from checkpoint `iteration`; returns its state."""
    from megatron.core import dist_checkpointing
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    path = iteration_dir(root, iteration)
    model_sd = model.sharded_state_dict()
    state = dist_checkpointing.load(
        {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True)},
        path,
    )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    meta = read_state(root, iteration)
    scheduler.load_state_dict(meta["scheduler"])
    rng_path = os.path.join(path, f"rng_rank{_rank()}.pt")
    if os.path.isfile(rng_path):
        rng = torch.load(rng_path, weights_only=False)
        torch.set_rng_state(rng["torch"])
        get_cuda_rng_tracker().set_states(rng["tracker"])
    return meta
