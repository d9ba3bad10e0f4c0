"""A Hugging Face model folder: written atomically (a temporary sibling folder renamed at the end),
read back as (config, state dict). Weights are safetensors, sharded with an index past a size."""

import json
import os
import re
import shutil
from typing import Dict, List, Tuple

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REMOTE_CODE = ("configuration_ultramem.py", "modeling_ultramem.py")
AUTO_MAP = {
    "AutoConfig": "configuration_ultramem.UltraMemGPTConfig",
    "AutoModel": "modeling_ultramem.UltraMemGPTModel",
    "AutoModelForCausalLM": "modeling_ultramem.UltraMemGPTForCausalLM",
}
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


class FolderError(ValueError):
    """An output folder that cannot be written, or an input folder that cannot be read."""


def parse_size(text: str) -> int:
    """'5GB', '200MB', '1.5GiB', '4096' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B?)\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"{text!r} is not a size (e.g. 5GB, 200MB, 1048576)")
    unit = m.group(2).upper().rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    size = int(float(m.group(1)) * base**power)
    if size < 1:
        raise ValueError(f"{text!r} is not a positive size")
    return size


def check_output(out: str, force: bool, flag: str = "--out", hint: str = "pass --force to replace it") -> None:
    """Refuse before any work: an existing non-empty folder without --force, a file in the way,
    or a parent where nothing can be written. Creates nothing."""
    path = os.path.abspath(out)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise FolderError(f"{flag} {out}: exists and is not a directory")
        if os.listdir(path) and not force:
            raise FolderError(f"{flag} {out}: exists and is not empty ({hint})")
    parent = os.path.dirname(path)
    probe = parent
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise FolderError(f"{flag} {out}: {probe} is not a writable directory")


def output_folder_arg(text: str) -> str:
    """argparse type of the main job's --export-hf DIR: refused at parse time (exit 2, before any
    training) when it is not empty or cannot be written."""
    import argparse

    try:
        check_output(text, force=False, flag="--export-hf", hint="empty it or name another folder")
    except FolderError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def temp_sibling(out: str) -> str:
    path = os.path.abspath(out)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def publish(tmp: str, out: str) -> None:
    """Move the finished temporary folder to `out` (replacing an old one: --force was checked)."""
    path = os.path.abspath(out)
    if os.path.isdir(path):
        old = f"{tmp}.old"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def write_weights(folder: str, tensors: Dict[str, torch.Tensor], max_shard_bytes: int) -> List[str]:
    """safetensors files in `tensors`' order; one file, or shards plus the index of transformers."""
    from safetensors.torch import save_file

    shards: List[Dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(folder, WEIGHTS), metadata={"format": "pt"})
        return [WEIGHTS]
    names, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
        names.append(name)
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(folder, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names + [INDEX]


def weight_files(folder: str) -> List[str]:
    index = os.path.join(folder, INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    if os.path.isfile(os.path.join(folder, WEIGHTS)):
        return [WEIGHTS]
    raise FolderError(f"{folder}: no {WEIGHTS} and no {INDEX}")


def read_weights(folder: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for name in weight_files(folder):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise FolderError(f"{folder}: {name} is missing (the index names it)")
        try:
            out.update(load_file(path))
        except Exception as err:
            raise FolderError(f"{path} is not a readable safetensors file ({err})") from None
    return out


def copy_remote_code(folder: str) -> None:
    for name in REMOTE_CODE:
        shutil.copyfile(os.path.join(HERE, name), os.path.join(folder, name))


def read_config(folder: str):
    """The folder's UltraMemGPTConfig (read with this package's class, no remote code run)."""
    from .configuration_ultramem import UltraMemGPTConfig

    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FolderError(f"--hf {folder}: no config.json (not a Hugging Face model folder)")
    with open(path) as f:
        try:
            raw = json.load(f)
        except ValueError as err:
            raise FolderError(f"--hf {folder}: config.json is not JSON ({err})") from None
    if raw.get("model_type") != UltraMemGPTConfig.model_type:
        raise FolderError(
            f"--hf {folder}: model_type {raw.get('model_type')!r} is not {UltraMemGPTConfig.model_type!r} "
            "(only folders written by megatron_ultramem.export_hf can be imported)"
        )
    keep = {k: v for k, v in raw.items() if k not in ("auto_map", "architectures", "transformers_version", "model_type")}
    try:
        return UltraMemGPTConfig(**keep)
    except (TypeError, ValueError) as err:
        raise FolderError(f"--hf {folder}: config.json does not describe a model ({err})") from None


def read_folder(folder: str) -> Tuple[object, Dict[str, torch.Tensor]]:
    if not os.path.isdir(folder):
        raise FolderError(f"--hf {folder}: no such directory")
    return read_config(folder), read_weights(folder)
