"""Checkpoints of the main job: Megatron's dist_checkpointing, written so that a crash never breaks
resuming, with a manifest that catches a damaged checkpoint before it is loaded.

Layout of a save directory (Megatron-LM's names, so the tracker reads like theirs):

    DIR/latest_checkpointed_iteration.txt   the last complete checkpoint's iteration
    DIR/iter_0000100/                       dist_checkpointing of the model and the optimizer
                     ultramem_state.json    iteration, consumed samples, scheduler, run config
                     rng_rank{r}.pt         each rank's torch CPU RNG and Megatron's tracker states
                     manifest.json          size and SHA-256 of every other file in the directory

Atomicity: a checkpoint is written into `iter_N.tmp` and renamed to `iter_N` after every rank has
finished writing (a barrier) and rank 0 has written the manifest, then the tracker file is
replaced (write-then-rename). A process killed at any point leaves either the previous tracker
(and maybe a `.tmp` directory, ignored and overwritten by the next save), or the new one pointing
at a complete directory.

Damage: `resolve_iteration` (called by the main job's argument check, before any work) verifies the
manifest of the iteration to load: a missing, resized or changed file is refused with its name and
the newest intact iteration, which `--ckpt-step N` then loads. A checkpoint records the flags that
define the model and the data order (`run_config`); loading into a run whose flags differ is
refused before training, naming each differing flag.
"""

import hashlib
import json
import os
import re
import shutil
from typing import Dict, List, Optional

import torch

TRACKER = "latest_checkpointed_iteration.txt"
STATE = "ultramem_state.json"
MANIFEST = "manifest.json"
_ITER_RE = re.compile(r"^iter_(\d{7})$")


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
        where = iteration_dir(root, int(text)) if text.isdigit() else "it"
        raise CheckpointError(
            f"{path} says {text!r}, but {where} is not a checkpoint directory: the checkpoint "
            f"folder is damaged; {_suggest(root)}"
        )
    return int(text)


def iterations(root: str) -> List[int]:
    """Iterations with a complete (renamed) checkpoint directory under `root`, ascending."""
    found = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        match = _ITER_RE.match(name)
        if match and os.path.isdir(os.path.join(root, name)):
            found.append(int(match.group(1)))
    return sorted(found)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(directory: str) -> List[str]:
    out = []
    for base, _, names in os.walk(directory):
        for name in names:
            rel = os.path.relpath(os.path.join(base, name), directory)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def write_manifest(directory: str) -> None:
    """manifest.json: {"files": {relative path: {"size", "sha256"}}} of every file in `directory`."""
    files = {
        rel: {"size": os.path.getsize(os.path.join(directory, rel)),
              "sha256": _sha256(os.path.join(directory, rel))}
        for rel in _files(directory)
    }  # fmt: skip
    _replace_text(os.path.join(directory, MANIFEST), json.dumps({"format": 1, "files": files}, indent=1))


def verify_checkpoint(root: str, iteration: int) -> None:
    """Raise CheckpointError naming the first missing, resized or changed file of a checkpoint."""
    directory = iteration_dir(root, iteration)
    name = os.path.basename(directory)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{name} is not there")
    try:
        with open(os.path.join(directory, MANIFEST)) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"{name}/{MANIFEST} is missing or unreadable ({type(err).__name__}): the checkpoint "
            "cannot be verified (damaged, or written before checkpoints had manifests)"
        ) from None
    for rel, entry in sorted(files.items()):
        path = os.path.join(directory, rel)
        if not os.path.isfile(path):
            raise CheckpointError(f"{name}/{rel} is missing")
        size = os.path.getsize(path)
        if size != entry["size"]:
            raise CheckpointError(
                f"{name}/{rel} is {size:,} bytes, the manifest says {entry['size']:,} (truncated or "
                "overwritten)"
            )
        if _sha256(path) != entry["sha256"]:
            raise CheckpointError(f"{name}/{rel} does not match its SHA-256 in the manifest (damaged)")


def newest_intact(root: str, below: Optional[int] = None) -> Optional[int]:
    """The newest iteration (below `below`, if given) whose checkpoint verifies, or None."""
    for it in reversed(iterations(root)):
        if below is not None and it >= below:
            continue
        try:
            verify_checkpoint(root, it)
            return it
        except CheckpointError:
            continue
    return None


def _suggest(root: str, below: Optional[int] = None) -> str:
    intact = newest_intact(root, below)
    if intact is None:
        return "no intact checkpoint is left: train from scratch (without --load)"
    return f"the newest intact checkpoint is iteration {intact}: resume from it with --ckpt-step {intact}"


def resolve_iteration(root: str, step: Optional[int] = None) -> Optional[int]:
    """The verified iteration to resume from: `step`, or the tracker's; None when `root` holds no
    checkpoint (and no step is asked for). Raises CheckpointError with the file and the newest
    intact iteration when the checkpoint is damaged."""
    if step is None:
        step = latest_iteration(root)
        if step is None:
            return None
    elif step not in iterations(root):
        have = ", ".join(map(str, iterations(root))) or "none"
        raise CheckpointError(f"--ckpt-step {step}: no iteration {step} there (available: {have})")
    try:
        verify_checkpoint(root, step)
    except CheckpointError as err:
        raise CheckpointError(f"checkpoint iteration {step} is damaged: {err}; {_suggest(root, step)}") from None
    return step


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
        write_manifest(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _replace_text(os.path.join(root, TRACKER), str(iteration))
    _barrier()
    return final


def read_state(root: str, iteration: int) -> Dict:
    """The checkpoint's ultramem_state.json (verify_checkpoint first: this trusts the file)."""
    with open(os.path.join(iteration_dir(root, iteration), STATE)) as f:
        return json.load(f)


def check_run_config(saved: Dict, current: Dict, where: str, ignore=()) -> None:
    """Refuse a checkpoint written with other model/data flags, naming each of them (keys in
    `ignore` may differ)."""
    diff = [
        f"--{k.replace('_', '-')}: checkpoint {saved.get(k)!r}, this run {current.get(k)!r}"
        for k in sorted(set(saved) | set(current))
        if k not in ignore and saved.get(k) != current.get(k)
    ]
    if diff:
        raise CheckpointError(
            f"--load {where} was written by a run with other settings ({'; '.join(diff)}): resume "
            "with the same flags or train from scratch"
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
