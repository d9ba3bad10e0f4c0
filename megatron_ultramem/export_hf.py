"""`python -m megatron_ultramem.export_hf --load CKPT_DIR --out HF_DIR`: a Megatron checkpoint of
an UltraMem model as a Hugging Face folder.

    python -m megatron_ultramem.export_hf --load ultramem_ckpt --out ultramem_hf
    python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('ultramem_hf', trust_remote_code=True)"

Reads a torch_dist checkpoint written by the main job (`python -m megatron_ultramem --save`), by
`python -m megatron_ultramem.pretrain`, or by Megatron-LM's pretrain_gpt.py / pretrain_hybrid.py
with the plugin's --spec, saved at any TP x EP x PP layout (the tensors are read whole), and
writes config.json, model.safetensors (sharded past --max-shard-size), configuration_ultramem.py
and modeling_ultramem.py (trust_remote_code) and the run's tokenizer files. The model is checked
against what the Hugging Face model computes first: an option it does not implement is refused,
naming the option. Errors: one line on stderr, exit code 2, nothing written (the folder is built
under a temporary name and renamed at the end).
"""

import argparse
import os
import shutil
import sys
import time
from typing import List, Optional

import torch

from .cli import ArgumentParser, BadInput, fail
from .hf import checkpoint, folder, mapping

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UsageError(BadInput):
    """A bad argument or input: cli.fail prints it as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m megatron_ultramem.export_hf",
        description="Export a Megatron checkpoint of an UltraMem GPT/HybridModel as a Hugging Face "
        "folder (trust_remote_code). Reads any TP x EP x PP layout.",
    )
    p.add_argument("--load", required=True, metavar="CKPT_DIR",
                   help="a --save directory (latest_checkpointed_iteration.txt) or an iter_* directory")
    p.add_argument("--out", required=True, metavar="HF_DIR", help="the folder to write")
    p.add_argument("--iteration", type=int, default=None, help="export this iteration (default: the latest)")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="weights' dtype (auto: as saved); the permutation stays integer")
    p.add_argument("--max-shard-size", default="5GB", help="split model.safetensors past this size")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    return p


def export(load: str, out: str, iteration: Optional[int] = None, dtype: str = "auto",
           max_shard_size: str = "5GB", force: bool = False, quiet: bool = False) -> dict:
    """Export checkpoint `load` to folder `out`; returns a summary. Raises UsageError (nothing
    written) for bad input."""
    start = time.perf_counter()
    try:
        shard_bytes = folder.parse_size(max_shard_size)
    except ValueError as err:
        raise UsageError(f"--max-shard-size: {err}") from None
    if iteration is not None and iteration < 0:
        raise UsageError(f"--iteration must be >= 0, got {iteration}")
    try:
        folder.check_output(out, force)
        source = checkpoint.read_source(load, iteration)
    except (folder.FolderError, checkpoint.CheckpointError) as err:
        raise UsageError(str(err)) from None
    desc = dict(source.desc)
    try:
        if desc.get("vocab_size") is None:  # the main job's: from the embedding's global shape
            meta = checkpoint.tensor_metadata(source.path)
            if "embedding.word_embeddings.weight" not in meta:
                raise UsageError(f"--load {load}: the checkpoint has no embedding.word_embeddings.weight")
            desc["vocab_size"] = meta["embedding.word_embeddings.weight"].size[0]
        kwargs = mapping.hf_config_dict(desc)
    except mapping.UnsupportedModel as err:
        raise UsageError(f"--load {load}: {err}") from None
    except checkpoint.CheckpointError as err:
        raise UsageError(str(err)) from None
    from .hf.configuration_ultramem import UltraMemGPTConfig

    try:
        tensors = checkpoint.read_model_tensors(source)
    except checkpoint.CheckpointError as err:
        raise UsageError(str(err)) from None
    tensors = mapping.unstack_layers(tensors, desc["num_layers"])
    if not any(".values" in k for k in tensors):
        raise UsageError(f"--load {load}: the checkpoint holds no memory-layer tensors (*.values)")
    config = UltraMemGPTConfig(**kwargs)
    try:
        hf = mapping.megatron_to_hf(tensors.get, config)
    except KeyError as err:
        raise UsageError(f"--load {load}: {err.args[0]} (the checkpoint does not match its saved flags)") from None
    float_dtype = None if dtype == "auto" else DTYPES[dtype]
    if float_dtype is not None:
        hf = {k: (v.to(float_dtype) if v.is_floating_point() else v) for k, v in hf.items()}
    saved = {v.dtype for v in hf.values() if v.is_floating_point()}
    config.megatron = {
        "writer": source.writer,
        "iteration": source.iteration,
        "checkpoint": os.path.basename(os.path.abspath(source.path)),
        **({"run_config": source.run_config} if source.run_config is not None else {}),
        "ultramem": {k: v for k, v in desc.items() if k.startswith("ultramem_")},
        "hybrid_layer_pattern": desc.get("hybrid_layer_pattern"),
        **({"args": mapping.recorded_args(source.args)} if source.args is not None else {}),
    }
    config.auto_map = dict(folder.AUTO_MAP)
    config.architectures = ["UltraMemGPTForCausalLM"]
    if len(saved) == 1:
        import transformers

        field = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        setattr(config, field, str(next(iter(saved))).replace("torch.", ""))

    tmp = folder.temp_sibling(out)
    try:
        config.to_json_file(os.path.join(tmp, "config.json"))
        folder.copy_remote_code(tmp)
        files = folder.write_weights(tmp, hf, shard_bytes)
        from .hf.tokenizer import write_tokenizer

        note = write_tokenizer(source.tokenizer, tmp)
        folder.publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - start
    summary = {
        "out": out, "files": files, "tensors": len(hf), "writer": source.writer,
        "iteration": source.iteration, "seconds": seconds, "tokenizer_note": note,
        "bytes": sum(v.numel() * v.element_size() for v in hf.values()),
    }  # fmt: skip
    if not quiet:
        print(f"wrote {out}: {len(hf)} tensors, {summary['bytes'] / 1e6:.1f} MB in {len(files)} file(s), "
              f"from the {source.writer} checkpoint (iteration {source.iteration}) in {seconds:.1f} s")  # fmt: skip
        if note:
            print(f"tokenizer: {note}")
    return summary


# ----------------------------------------------------------------------------- the main job
def export_after_training(args, step: int, model, optimizer, scheduler) -> None:
    """The main job's --export-hf DIR: export the trained model (a collective: every rank calls).

    The final state is exported from the run's --save checkpoint of this step when there is one;
    otherwise it is first written, through the main job's own checkpointing, to a temporary
    directory next to DIR that is removed afterwards."""
    from . import checkpointing, train

    save = getattr(args, "save", None)
    have = save is not None and os.path.isdir(checkpointing.iteration_dir(save, step))
    root = save if have else f"{os.path.abspath(args.export_hf)}.ckpt.tmp"
    if not have:
        checkpointing.save_checkpoint(root, step, model, optimizer, scheduler, {
            "run_config": train.run_config(args), "consumed_samples": None, "history": None,
        })  # fmt: skip
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    try:
        if rank == 0:
            export(checkpointing.iteration_dir(root, step), args.export_hf)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        if not have and rank == 0:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)  # a bad flag: one line, exit 2
    try:
        export(args.load, args.out, args.iteration, args.dtype, args.max_shard_size, args.force)
    except UsageError as err:
        fail(str(err))
    return 0


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    sys.exit(main())
