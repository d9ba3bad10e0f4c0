"""Reading a Megatron distributed checkpoint without building the model, and filling a model's
sharded state dict from global tensors.

Three writers are recognized, by what the checkpoint directory holds:
- the main job (`python -m megatron_ultramem --save DIR`): `ultramem_state.json` with the run's
  flags; the model is rebuilt from them exactly as the main job builds it (train.make_config);
- Megatron-LM's `pretrain_gpt.py` / `pretrain_hybrid.py` with the plugin's `--spec`, and the
  plugin's `python -m megatron_ultramem.pretrain` (torch_dist format): the parsed arguments in the
  checkpoint's common state;
and the layout is irrelevant: dist_checkpointing stores every tensor as pieces of its global
tensor, which are read back whole (the model's tensors only, not the optimizer's).
"""

import contextlib
import io
import json
import os
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

TRACKER = "latest_checkpointed_iteration.txt"
MAIN_JOB_STATE = "ultramem_state.json"
MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")


class CheckpointError(ValueError):
    """A checkpoint path that cannot be exported (missing, partial, not a Megatron checkpoint)."""


@dataclass
class Source:
    """What a checkpoint holds: the model description, where it came from, the tokenizer."""

    path: str  # the iteration directory
    writer: str  # "main_job" or "megatron_lm"
    iteration: object  # int, or "release"
    desc: Dict
    tokenizer: Dict = field(default_factory=dict)  # {"type": ..., files / names}
    run_config: Optional[Dict] = None  # the main job's flags
    args: object = None  # Megatron-LM's Namespace


def resolve(load: str, iteration: Optional[int] = None):
    """(iteration directory, iteration) of --load DIR: a save directory with the tracker file, or
    an iteration directory itself."""
    if not os.path.exists(load):
        raise CheckpointError(f"--load {load}: no such directory")
    if not os.path.isdir(load):
        raise CheckpointError(f"--load {load}: not a directory")
    tracker = os.path.join(load, TRACKER)
    if iteration is not None:
        path = os.path.join(load, f"iter_{iteration:07d}")
        if not os.path.isdir(path):
            have = sorted(d for d in os.listdir(load) if d.startswith("iter_") and not d.endswith(".tmp"))
            raise CheckpointError(
                f"--iteration {iteration}: {load} holds no iter_{iteration:07d} "
                f"(it holds: {', '.join(have) or 'none'})"
            )
        return path, iteration
    if os.path.isfile(tracker):
        text = open(tracker).read().strip()
        name = "release" if text == "release" else (f"iter_{int(text):07d}" if text.isdigit() else None)
        if name is None or not os.path.isdir(os.path.join(load, name)):
            raise CheckpointError(
                f"--load {load}: {TRACKER} says {text!r} but {os.path.join(load, name or text)} "
                "is missing: the checkpoint is partial"
            )
        return os.path.join(load, name), ("release" if text == "release" else int(text))
    if os.path.isfile(os.path.join(load, "metadata.json")):
        return load, None
    raise CheckpointError(
        f"--load {load}: no {TRACKER} and no metadata.json: not a Megatron checkpoint directory "
        "(pass the --save directory of a run, or one of its iter_* directories)"
    )


def _is_dist_checkpoint(path: str) -> bool:
    from megatron.core import dist_checkpointing

    try:
        return dist_checkpointing.check_is_distributed_checkpoint(path)
    except Exception:
        return False


def _verify_manifest(load: str, path: str) -> None:
    """A checkpoint with the main job's manifest.json (sizes and SHA-256 of its files) is verified
    as the main job's --load verifies it: a missing, truncated or changed file is named."""
    from .. import checkpointing

    name = os.path.basename(os.path.normpath(path))
    if not os.path.isfile(os.path.join(path, checkpointing.MANIFEST)) or not name.startswith("iter_"):
        return
    try:
        checkpointing.verify_checkpoint(os.path.dirname(os.path.normpath(path)), int(name[len("iter_"):]))
    except (checkpointing.CheckpointError, ValueError) as err:
        raise CheckpointError(f"--load {load}: {err}; export another iteration with --iteration N") from None


def read_source(load: str, iteration: Optional[int] = None) -> Source:
    """Identify the writer and describe the model; reads no tensor data."""
    path, it = resolve(load, iteration)
    if not _is_dist_checkpoint(path):
        raise CheckpointError(
            f"--load {load}: {path} is not a torch_dist distributed checkpoint (metadata.json "
            "missing or unreadable); save with --ckpt-format torch_dist"
        )
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise CheckpointError(f"--load {load}: {path}/.metadata is missing: the checkpoint is partial")
    _verify_manifest(load, path)
    state = os.path.join(path, MAIN_JOB_STATE)
    if os.path.isfile(state):
        try:
            with open(state) as f:
                meta = json.load(f)
            run_config = meta["run_config"]
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"--load {load}: {state} is unreadable ({err}): the checkpoint is damaged") from None
        return _main_job_source(path, it if it is not None else meta.get("iteration"), run_config)
    from megatron.core import dist_checkpointing

    try:
        common = dist_checkpointing.load_common_state_dict(path)
    except Exception as err:
        raise CheckpointError(
            f"--load {load}: the common state of {path} is unreadable ({type(err).__name__}): the checkpoint is partial or damaged"
        ) from None
    args = common.get("args") if isinstance(common, dict) else None
    if args is None:
        raise CheckpointError(
            f"--load {load}: {path} has neither {MAIN_JOB_STATE} (the main job's) nor Megatron-LM's "
            "saved arguments: cannot tell which model it holds"
        )
    from .mapping import desc_from_args

    if getattr(args, "ckpt_format", "torch_dist") not in ("torch_dist", None):
        raise CheckpointError(f"--load {load}: --ckpt-format {args.ckpt_format}; only torch_dist is read")
    return Source(path=path, writer="megatron_lm", iteration=it if it is not None else common.get("iteration"),
                  desc=desc_from_args(args), tokenizer=_megatron_lm_tokenizer(args), args=args)  # fmt: skip


def main_job_args(run_config: Dict):
    """The main job's argparse Namespace for a saved run_config (defaults for flags it lacks)."""
    from .. import train

    args = train.build_parser().parse_args([])
    for k, v in run_config.items():
        setattr(args, k, v)
    return args


def _main_job_source(path: str, iteration, run_config: Dict) -> Source:
    from .. import train
    from .mapping import desc_from_config

    args = main_job_args(run_config)
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):  # make_config refuses through cli.fail: one line
            config = train.make_config(args)
    except SystemExit:
        reason = said.getvalue().strip().removeprefix("error: ")
        raise CheckpointError(f"{path}: the main job's saved flags do not build a model ({reason})") from None
    desc = desc_from_config(
        config, vocab_size=None, max_sequence_length=args.seq_length,
        position_embedding_type="rope", share_embeddings=False,
    )  # as train.build_model builds GPTModel; vocab from the embedding's shape
    tokenizer = {"type": "bytes"} if getattr(args, "data_path", None) is None else {}
    return Source(path=path, writer="main_job", iteration=iteration, desc=desc,
                  tokenizer=tokenizer, run_config=run_config)  # fmt: skip


def _megatron_lm_tokenizer(args) -> Dict:
    kind = getattr(args, "tokenizer_type", None)
    if kind == "GPT2BPETokenizer":
        return {"type": kind, "vocab_file": args.vocab_file, "merge_file": args.merge_file}
    if kind == "HuggingFaceTokenizer":
        return {"type": kind, "model": args.tokenizer_model}
    return {"type": kind} if kind else {}


def _ensure_process_group() -> None:
    """dist_checkpointing's loader asks torch.distributed for the rank: a one-process gloo group
    when none exists (the export and import run as one process)."""
    if torch.distributed.is_available() and not torch.distributed.is_initialized():
        from ..train import _free_port

        torch.distributed.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
        )


def tensor_metadata(path: str) -> Dict[str, object]:
    """{checkpoint key: torch DCP TensorStorageMetadata (size, dtype)} of the model's tensors."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        md = FileSystemReader(path).read_metadata()
    except Exception as err:
        raise CheckpointError(f"--load: {path}/.metadata is unreadable ({type(err).__name__}): the checkpoint is damaged") from None
    return {k: m for k, m in md.state_dict_metadata.items()
            if isinstance(m, TensorStorageMetadata) and k.startswith(MODEL_PREFIXES)}  # fmt: skip


def read_model_tensors(source: Source) -> Dict[str, torch.Tensor]:
    """Every model tensor of the checkpoint, whole (global shapes), keyed by checkpoint key.

    torch.distributed.checkpoint reads the pieces every rank wrote into whole tensors, in this
    process alone (no process group: the export also runs inside a multi-rank job's rank 0).
    The optimizer's tensors are not read."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load

    meta = tensor_metadata(source.path)
    if not meta:
        raise CheckpointError(f"{source.path} holds no model tensors (embedding.*, decoder.*)")
    state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in meta.items()}
    try:
        dcp_load(state, storage_reader=FileSystemReader(source.path), no_dist=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise CheckpointError(
            f"--load: reading the tensors of {source.path} failed ({type(err).__name__}: {first}): "
            "the checkpoint is partial or damaged"
        ) from None
    return state


def fill_sharded_state_dict(sharded_sd, tensors: Dict[str, torch.Tensor]) -> None:
    """Copy this rank's piece of each global tensor into a model's sharded state dict (any TP x EP x
    PP layout: each ShardedTensor says which slice of its global tensor it holds). A key Megatron
    stacks over layers (`decoder.layers.<name>`, a prepended layer axis) is assembled from the
    per-layer tensors."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    for sh in nested_values(sharded_sd):
        if not isinstance(sh, ShardedTensor):
            continue
        t = tensors.get(sh.key)
        if t is None and sh.key.startswith("decoder.layers.") and sh.prepend_axis_num:
            rest = sh.key[len("decoder.layers."):]
            layer = sh.global_offset[0]
            t = tensors.get(f"decoder.layers.{layer}.{rest}")
            if t is not None:
                t = t.unsqueeze(0).expand(sh.global_shape[0], *t.shape)
        if t is None:
            raise KeyError(f"no tensor for {sh.key}")
        if tuple(t.shape) != tuple(sh.global_shape):
            raise ValueError(f"{sh.key}: tensor {tuple(t.shape)} vs model {tuple(sh.global_shape)}")
        piece = t[sh.global_slice()]
        if sh.flattened_range is not None:
            piece = piece.flatten()[sh.flattened_range]
        with torch.no_grad():
            sh.data.copy_(piece.to(sh.data.dtype))
