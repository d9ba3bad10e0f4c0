"""The main job: train a small Megatron-Core GPT with UltraMem layers on the embedded corpus.

`python -m megatron_ultramem` (or the `megatron-ultramem` console script) with no arguments trains
on CPU in a few minutes and writes `loss_curve.png` and `metrics.json` under `--output-dir`.
Runs single-process (gloo, world size 1) or under torchrun with tensor/expert parallelism.

The loop is Megatron's training step on CPU: GPTModel from the UltraMem block spec, Megatron's
DistributedDataParallel, its forward-backward schedule (which scales the Tucker aux loss through
the plugin's schedule hook), Megatron's optimizer with the value table in its own param group
(fp32, or `--bf16` through Float16Module with fp32 main params; `--use-distributed-optimizer`),
the value-LR scheduler, and the Tucker SVD refresh once per optimizer step. `--save/--load` write
and resume Megatron dist_checkpointing checkpoints (checkpointing.py: a SHA-256 manifest verified
before loading, `--ckpt-step N` for an older iteration; a larger `--train-iters` extends the run and
its LR schedule). `--data-path PREFIX` trains on a Megatron indexed dataset instead of the embedded
corpus.

The --ultramem-* flags are Megatron-LM's (megatron_lm/arguments.py, one definition) with the small
model's defaults (ULTRAMEM_DEFAULTS). Every argument is checked before any work (validate_args): a
bad one ends the program with one line naming it and the allowed values, exit status 2 (cli.py).
`python -m megatron_ultramem` itself is __main__.py, which also dispatches `--compare`.
"""

import argparse
import functools
import itertools
import json
import math
import os
import platform
import socket
import time
from typing import Dict, List, Optional

import torch

from .cli import ArgumentParser, check_writable, fail, float_in, int_at_least

DEFAULTS = dict(
    num_layers=4,
    hidden_size=128,
    num_attention_heads=4,
    ffn_hidden_size=256,
    seq_length=128,
    micro_batch_size=16,
    train_iters=250,
    lr=3e-3,
    min_lr=3e-4,
    weight_decay=0.1,
    eval_interval=50,
    eval_iters=4,
    seed=1234,
)

MAX_WARMUP = 20
"""--warmup-iters default: min(MAX_WARMUP, --train-iters // 10)."""

ULTRAMEM_DEFAULTS = dict(
    ultramem_layers="[0,1,0,1]",
    ultramem_skip_units="0:1,2:3",
    ultramem_num_keys=32,
    ultramem_key_dim=32,
    ultramem_topm=16,
    ultramem_seed=None,  # None: --seed
)
"""The main job's defaults where they differ from UltraMemConfig's (a 4-layer 128-wide model; the
README's flag table lists both columns). Every other --ultramem-* flag has the config default."""


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default (the --ultramem-* helps already carry theirs)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default:" in text or action.default in (None, argparse.SUPPRESS, False) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    from .megatron_lm.arguments import add_ultramem_args

    d = DEFAULTS
    pos, nonneg = int_at_least(1), int_at_least(0)
    p = ArgumentParser(
        prog="python -m megatron_ultramem",
        description="Train a small Megatron-Core GPT with UltraMem memory layers on the embedded "
        "corpus (CPU, a few minutes). Writes loss_curve.png and metrics.json to --output-dir.",
        formatter_class=_HelpFormatter,
        allow_abbrev=False,
    )
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=pos, default=d["num_layers"])
    g.add_argument("--hidden-size", type=pos, default=d["hidden_size"])
    g.add_argument("--num-attention-heads", type=pos, default=d["num_attention_heads"])
    g.add_argument("--ffn-hidden-size", type=pos, default=d["ffn_hidden_size"],
                   help="dense MLP size (mode parallel: also the MLP beside each memory)")  # fmt: skip
    g.add_argument("--seq-length", type=pos, default=d["seq_length"])
    # the same --ultramem-* flags as Megatron-LM's scripts (one definition: arguments.py)
    add_ultramem_args(p, defaults=ULTRAMEM_DEFAULTS, logging_flags=False)
    g = p.add_argument_group("training")
    g.add_argument("--train-iters", type=pos, default=d["train_iters"],
                   help="optimizer steps; resuming with a larger value extends the run (the LR "
                   "schedule then decays to the new end)")  # fmt: skip
    g.add_argument("--micro-batch-size", type=pos, default=d["micro_batch_size"])
    g.add_argument("--lr", type=float_in(0.0, low_open=True), default=d["lr"])
    g.add_argument("--min-lr", type=float_in(0.0), default=d["min_lr"], help="must be <= --lr")
    g.add_argument("--warmup-iters", type=nonneg, default=None,
                   help=f"linear LR warmup steps, < --train-iters (default: min({MAX_WARMUP}, "
                   "--train-iters // 10); when resuming, the checkpoint's)")  # fmt: skip
    g.add_argument("--weight-decay", type=float_in(0.0), default=d["weight_decay"])
    g.add_argument("--eval-interval", type=pos, default=d["eval_interval"])
    g.add_argument("--eval-iters", type=pos, default=d["eval_iters"], help="validation batches")
    g.add_argument("--seed", type=nonneg, default=d["seed"])
    g.add_argument("--clip-grad", type=float_in(0.0), default=1.0, help="gradient-norm clipping (0: off)")
    g.add_argument("--bf16", action="store_true",
                   help="Megatron mixed precision: bf16 model (Float16Module), fp32 main params")
    g.add_argument("--grad-reduce-in-fp32", action=argparse.BooleanOptionalAction, default=False,
                   help="reduce gradients in fp32 (Megatron's --accumulate-allreduce-grads-in-fp32)")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="Megatron's DistributedOptimizer (optimizer state sharded over data parallel)")
    g.add_argument("--tensor-model-parallel-size", type=pos, default=1,
                   help="under torchrun: must divide the world size")  # fmt: skip
    g.add_argument("--expert-model-parallel-size", type=pos, default=1,
                   help="under torchrun: splits each value table's columns over TP x EP")  # fmt: skip
    g.add_argument("--threads", type=pos, default=None, help="torch intra-op threads (default: torch's)")
    g.add_argument("--data-backend", default="torch", choices=["torch", "dali"],
                   help="input pipeline: Megatron's sampler + torch DataLoader, or NVIDIA DALI "
                   "(pip install 'megatron-ultramem[dali]')")
    g.add_argument("--data-path", default=None, metavar="PREFIX",
                   help="train on a Megatron indexed dataset (PREFIX.bin + PREFIX.idx, e.g. written "
                   "by Megatron-LM's tools/preprocess_data.py) instead of the embedded corpus; "
                   "validation uses the --split share of its documents")
    g.add_argument("--split", default="95,5,0",
                   help="train,valid,test shares of --data-path's documents (Megatron-LM's --split)")
    g.add_argument("--data-workers", type=nonneg, default=0, help="loader worker processes")
    g.add_argument("--data-prefetch", type=pos, default=2, help="prefetch depth (batches)")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--save", default=None, metavar="DIR", help="write checkpoints to DIR")
    g.add_argument("--save-interval", type=pos, default=None, help="iterations between checkpoints")
    g.add_argument("--load", default=None, metavar="DIR",
                   help="resume from the latest checkpoint in DIR (with --save DIR: resume if "
                   "there is one, else start); its manifest (sizes, SHA-256) is verified first")
    g.add_argument("--ckpt-step", type=pos, default=None, metavar="N",
                   help="with --load: resume from iteration N instead of the latest")
    from .hf.folder import output_folder_arg

    g.add_argument("--export-hf", default=None, metavar="DIR", type=output_folder_arg,
                   help="at the end, write the trained model as a Hugging Face folder (see "
                   "python -m megatron_ultramem.export_hf)")
    g = p.add_argument_group("comparison")
    g.add_argument("--compare", action="store_true",
                   help="train this UltraMem model and a MoE of matched total and activated "
                   "parameters one after the other (same data order, same seed) and write "
                   "compare_loss_curve.png and compare_metrics.json to --output-dir (each model's "
                   "own files go to --output-dir/ultramem and --output-dir/moe)")
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", default="ultramem_run")
    g.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    g.add_argument("--log-interval", type=pos, default=None,
                   help="print the loss every N steps (default: at each evaluation)")
    return p


def _check_torchrun_env() -> int:
    """The world size torchrun's environment announces (1 without it); a stray RANK is refused."""
    names = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    given = [n for n in names if n in os.environ]
    if not given:
        return 1
    missing = [n for n in names if n not in os.environ]
    if missing:
        fail(
            f"{', '.join(f'{n}={os.environ[n]}' for n in given)} set in the environment but not "
            f"{', '.join(missing)}: run under torchrun (which sets all four), or unset {', '.join(given)}"
        )
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except ValueError:
        fail(f"RANK={os.environ['RANK']} / WORLD_SIZE={os.environ['WORLD_SIZE']}: expected integers")
    if world < 1 or not 0 <= rank < world:
        fail(f"RANK={rank} with WORLD_SIZE={world}: expected 0 <= RANK < WORLD_SIZE")
    return world


def validate_args(args) -> None:
    """Refuse bad values before any work starts: one line naming the flag, exit status 2.

    Also resolves what depends on other flags or on the checkpoint: --warmup-iters (None ->
    min(20, --train-iters // 10), or the checkpoint's when resuming), args.resume_iteration (the
    verified checkpoint iteration to load, or None), args.data_info (--data-path).
    """
    world = _check_torchrun_env()
    if args.hidden_size % args.num_attention_heads:
        fail(
            f"--hidden-size ({args.hidden_size}) must be divisible by --num-attention-heads "
            f"({args.num_attention_heads})"
        )
    if args.min_lr > args.lr:
        fail(f"--min-lr {args.min_lr} must be <= --lr {args.lr}")
    if args.warmup_iters is not None and args.warmup_iters >= args.train_iters:
        fail(f"--warmup-iters must be in [0, --train-iters) = [0, {args.train_iters}), got {args.warmup_iters}")
    if args.ultramem_mode == "skip" and args.ultramem_layers != ULTRAMEM_DEFAULTS["ultramem_layers"]:
        fail(
            f"--ultramem-layers {args.ultramem_layers} has no effect with --ultramem-mode skip, "
            "whose memories come from --ultramem-skip-units: drop it, or use --ultramem-mode "
            "parallel/replace"
        )
    if args.ultramem_mode != "skip" and args.ultramem_skip_units != ULTRAMEM_DEFAULTS["ultramem_skip_units"]:
        fail(
            f"--ultramem-skip-units {args.ultramem_skip_units} has no effect with --ultramem-mode "
            f"{args.ultramem_mode}: allowed only with --ultramem-mode skip"
        )
    tp, ep = args.tensor_model_parallel_size, args.expert_model_parallel_size
    if world % tp or world % ep:
        fail(
            f"--tensor-model-parallel-size {tp} and --expert-model-parallel-size {ep} must divide "
            f"the world size {world} ({'WORLD_SIZE' if world > 1 else 'one process without torchrun'})"
        )
    if args.save_interval is not None and args.save is None:
        fail("--save-interval needs --save DIR")
    if args.ckpt_step is not None and args.load is None:
        fail("--ckpt-step needs --load DIR")
    _check_writable(args.output_dir, "--output-dir")
    if args.save is not None:
        _check_writable(args.save, "--save")
    if args.data_backend == "dali":
        import importlib.util

        if importlib.util.find_spec("nvidia.dali") is None:
            fail(
                "--data-backend dali needs NVIDIA DALI: pip install 'megatron-ultramem[dali]' "
                "(nvidia-dali-cuda130; nvidia-dali-cuda120 for CUDA 12 drivers); allowed without "
                "it: --data-backend torch"
            )
    args.data_info = None
    if args.data_path is not None:
        shares = args.split.split(",")
        try:
            values = [float(x) for x in shares]
        except ValueError:
            values = []
        if len(values) != 3 or not all(map(math.isfinite, values)) or min(values) < 0 \
                or values[0] <= 0 or values[1] <= 0:  # fmt: skip
            fail(
                f"--split must be three non-negative shares train,valid,test with train "
                f"and valid > 0 (e.g. 95,5,0), got {args.split!r}"
            )
        from .data_pipeline import inspect_indexed_prefix

        try:
            args.data_info = inspect_indexed_prefix(args.data_path, "--data-path")
        except ValueError as err:
            fail(str(err))
    _resolve_checkpoint(args)
    if args.warmup_iters is None:
        args.warmup_iters = min(MAX_WARMUP, args.train_iters // 10)
    make_config(args)  # UltraMemConfig's own validation of the --ultramem-* flags (nothing built)


def _resolve_checkpoint(args) -> None:
    """args.resume_iteration: the checkpoint iteration --load resumes from (verified against its
    manifest), or None; refuses a damaged or mismatched checkpoint naming the file or flag."""
    from . import checkpointing

    args.resume_iteration = None
    if args.load is None:
        return
    if not os.path.isdir(args.load):
        fail(f"--load {args.load}: no such directory")
    try:
        found = checkpointing.resolve_iteration(args.load, args.ckpt_step)
    except checkpointing.CheckpointError as err:
        fail(f"--load {args.load}: {err}")
    if found is None:
        if os.path.abspath(args.load) != os.path.abspath(args.save or ""):
            fail(
                f"--load {args.load}: no checkpoint there (no {args.load}/"
                "latest_checkpointed_iteration.txt); pass the --save directory of an earlier run"
            )
        return
    saved = checkpointing.read_state(args.load, found)["run_config"]
    if found >= args.train_iters:
        fail(
            f"--train-iters {args.train_iters}: the checkpoint in --load {args.load} is at "
            f"iteration {found}, so there is nothing to train; allowed: --train-iters > {found}"
        )
    if args.warmup_iters is None:  # the schedule the run was started with
        args.warmup_iters = saved.get("warmup_iters")
    try:
        checkpointing.check_run_config(saved, run_config(args), args.load, RUN_CONFIG_EXCLUDED)
    except checkpointing.CheckpointError as err:
        fail(str(err))
    args.resume_iteration = found


def _check_writable(path: str, flag: str) -> None:
    check_writable(path, flag)


RUN_CONFIG_EXCLUDED = {
    "output_dir", "no_progress", "load", "save", "save_interval", "threads", "data_workers",
    "data_prefetch", "data_backend", "log_interval", "eval_interval", "eval_iters", "data_info",
    "train_iters", "ckpt_step", "resume_iteration", "compare", "export_hf",
}  # fmt: skip
"""Flags that change neither the model nor the order or content of its updates up to the
checkpoint. --train-iters may grow on resume: the run is extended, the LR schedule decays to the
new end from there on."""


def run_config(args) -> Dict:
    """The flags a checkpoint must match to be resumed (the model, the data order, the schedule)."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in RUN_CONFIG_EXCLUDED}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(tp: int = 1, ep: int = 1, seed: int = 1234) -> None:
    """gloo process group (torchrun's env or a single local process) + Megatron's parallel state.

    A parallel state of the same sizes is kept, not rebuilt: each new one creates Megatron's ~50
    gloo groups, and the old groups' threads live on and poll (measured: 66 -> 117 -> 168 threads
    over three calls; an experiments process that trained 4 runs spent 8% of its CPU time in them,
    growing with every run)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from . import cpu_compat

    cpu_compat.enable()
    if not torch.distributed.is_initialized():
        if "RANK" in os.environ:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            torch.distributed.init_process_group(backend)
        else:
            torch.distributed.init_process_group(
                "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
            )
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    world = torch.distributed.get_world_size()
    if world % tp or world % ep:
        fail(
            f"world size {world} must be divisible by --tensor-model-parallel-size ({tp}) "
            f"and --expert-model-parallel-size ({ep})"
        )
    initialized = parallel_state.model_parallel_is_initialized()
    if not (initialized and _parallel_sizes(parallel_state) == (tp, ep, 1, 1)):  # else kept (docstring)
        if initialized:
            parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, expert_model_parallel_size=ep
        )
    model_parallel_cuda_manual_seed(seed)


def _parallel_sizes(ps) -> tuple:
    """(TP, EP, PP, CP) of Megatron's current parallel state."""
    return (ps.get_tensor_model_parallel_world_size(), ps.get_expert_model_parallel_world_size(),
            ps.get_pipeline_model_parallel_world_size(), ps.get_context_parallel_world_size())  # fmt: skip


def make_config(args, **overrides):
    """UltraMemConfig from parsed main-job arguments (every --ultramem-* flag; the memory's seed
    is --ultramem-seed, or --seed when that is not given). A value the config refuses ends the
    program with the flag named (exit status 2)."""
    from . import cpu_compat
    from .config import UltraMemConfig
    from .megatron_lm.arguments import ultramem_fields_from_args

    ultramem = ultramem_fields_from_args(args)
    if ultramem["ultramem_seed"] is None:
        ultramem["ultramem_seed"] = args.seed
    if args.ultramem_mode == "skip":
        ultramem.pop("ultramem_layers")  # units come from --ultramem-skip-units
    else:
        ultramem["ultramem_skip_units"] = None
    fields = dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=args.ffn_hidden_size,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        sequence_parallel=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        **({} if torch.cuda.is_available() else cpu_compat.CPU_CONFIG),
        **ultramem,
        bf16=args.bf16,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
    )
    fields.update(overrides)
    try:
        return UltraMemConfig(**fields)
    except (ValueError, AssertionError) as err:
        fail(_flagify(str(err), args))


def _flagify(message: str, args) -> str:
    """Config field names in a message -> the main job's flags ('ultramem_topm' -> '--ultramem-topm')."""
    import re

    names = set(vars(args))

    def sub(match):
        name = match.group(0)
        return "--" + name.replace("_", "-") if name in names else name

    return re.sub(r"\b[a-z]+(?:_[a-z]+)+\b", sub, message)


def build_model(config, vocab_size: int, seq_length: int):
    """GPTModel with the UltraMem block spec (local modules on CPU, TE when installed on GPU)."""
    from megatron.core.models.gpt import GPTModel

    from .specs import get_ultramem_decoder_block_spec

    spec = get_ultramem_decoder_block_spec(config, use_transformer_engine=None)
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab_size,
        max_sequence_length=seq_length,
        position_embedding_type="rope",
    )


def memory_layers(model) -> List[torch.nn.Module]:
    from .layer import UltraMemLayer

    return [m for m in model.modules() if isinstance(m, UltraMemLayer)]


def _causal_mask(seq: int) -> torch.Tensor:
    return torch.ones(1, 1, seq, seq, dtype=torch.bool).triu(1)


def vocab_size(args) -> int:
    """The embedded corpus's 256 bytes, or --data-path's largest token id + 1 rounded up to a
    multiple of 128 (Megatron-LM's --make-vocab-size-divisible-by default; TP splits the vocab)."""
    info = getattr(args, "data_info", None)
    if info is None:
        from .data import VOCAB_SIZE

        return VOCAB_SIZE
    multiple = 128 * args.tensor_model_parallel_size
    return -(-(info["max_token_id"] + 1) // multiple) * multiple


def build_datasets(args, rank: int, dp_size: int):
    """(train, valid) GPTDatasets: the embedded corpus written as indexed datasets (rank 0 writes,
    atomically), or the --split shares of --data-path."""
    from . import data, data_pipeline

    train_samples = args.train_iters * args.micro_batch_size * dp_size
    valid_samples = args.eval_iters * args.micro_batch_size * dp_size
    if args.data_path is None:
        corpus = data.make_corpus(seed=args.seed)
        cache = os.path.join(args.output_dir, "data_cache", f"corpus_seed{args.seed}")
        if rank == 0:  # atomic and idempotent
            data_pipeline.write_indexed_corpus(corpus.train, os.path.join(cache, "train"))
            data_pipeline.write_indexed_corpus(corpus.valid, os.path.join(cache, "valid"))
        torch.distributed.barrier()
        return tuple(
            data_pipeline.build_gpt_dataset(
                os.path.join(cache, split), args.seq_length, n, args.seed, split=split
            )
            for split, n in (("train", train_samples), ("valid", valid_samples))
        )
    tokenizer = data_pipeline.IdTokenizer(vocab_size(args))
    cache = os.path.join(args.output_dir, "data_cache", "gpt_index")  # not beside the user's data
    return tuple(
        data_pipeline.build_gpt_dataset(
            args.data_path, args.seq_length, n, args.seed, split=split, path_to_cache=cache,
            tokenizer=tokenizer, split_shares=args.split,
        )  # fmt: skip
        for split, n in (("train", train_samples), ("valid", valid_samples))
    )


def lm_loss(model, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Masked mean next-token loss of a GPTDataset micro-batch (tokens, labels, ... are [b, s])."""
    tokens, labels, loss_mask = batch["tokens"], batch["labels"], batch["loss_mask"]
    mask = batch.get("attention_mask")
    if mask is None:
        mask = _causal_mask(tokens.shape[1])
    per_token = model(tokens, batch["position_ids"], mask, labels=labels).float()  # [b, s]
    return (per_token * loss_mask).sum() / loss_mask.sum()


def _plot(path: str, steps, losses, eval_steps, eval_losses, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, label="train", lw=1)
    if eval_steps:
        ax.plot(eval_steps, eval_losses, "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/byte)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def _atomic_write(path: str, write) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def wrap_for_training(args, config, model, optimizer_args=None):
    """The main job's training stack around a built model: Float16Module under --bf16, Megatron's
    DDP (--grad-reduce-in-fp32, --use-distributed-optimizer) and build_optimizer's optimizer and
    scheduler (from `optimizer_args`, default `args`). Returns (model, ddp, optimizer, scheduler),
    model being the Float16Module when wrapped."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    if args.bf16:
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(config, model)
    ddp = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(
            grad_reduce_in_fp32=args.grad_reduce_in_fp32,
            use_distributed_optimizer=args.use_distributed_optimizer,
        ),
        model,
    )
    optimizer, scheduler = build_optimizer(optimizer_args or args, config, ddp)
    return model, ddp, optimizer, scheduler


def build_optimizer(args, config, ddp_model):
    """Megatron's optimizer (fp32, or bf16 with fp32 main params; DistributedOptimizer on request)
    with the value tables in their own param group, and the value-LR scheduler."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from .optim import UltraMemParamScheduler, add_value_config_overrides

    opt_config = OptimizerConfig(
        optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, clip_grad=args.clip_grad,
        bf16=args.bf16, params_dtype=config.params_dtype,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )  # fmt: skip
    overrides = add_value_config_overrides(
        None, opt_config, config.ultramem_value_lr_mult, config.ultramem_value_weight_decay
    )
    optimizer = get_megatron_optimizer(opt_config, [ddp_model], config_overrides=overrides)
    scheduler = UltraMemParamScheduler(
        optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=args.warmup_iters, lr_decay_steps=args.train_iters,
        lr_decay_style="cosine", start_wd=args.weight_decay, end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters, wd_incr_style="constant",
        value_lr_mult=config.ultramem_value_lr_mult,
        value_lr_decay_rate=config.ultramem_value_lr_decay_rate,
        # a resumed run takes this run's schedule (run_config guarantees that everything but
        # --train-iters equals the checkpoint's): extending --train-iters extends the decay
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True,
    )  # fmt: skip
    return optimizer, scheduler


def forward_step(data_iterator, model):
    """Megatron's forward_step_func for the GPT: per-token losses and the loss function."""
    batch = next(data_iterator)
    tokens = batch["tokens"]
    mask = batch.get("attention_mask")
    if mask is None:
        mask = _causal_mask(tokens.shape[1])
    output = model(tokens, batch["position_ids"], mask, labels=batch["labels"])  # [b, s]
    return output, functools.partial(masked_loss_sum, batch["loss_mask"])


def masked_loss_sum(loss_mask: torch.Tensor, output: torch.Tensor):
    """(summed masked loss, token count, report): the schedule divides by the token count."""
    mask = loss_mask.reshape(-1).float()
    loss = (output.reshape(-1).float() * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.stack([loss.detach(), mask.sum()])}


def train(args, build=None, at_end=None) -> Dict:
    """Run the main job; returns the metrics dict that is also written to metrics.json.

    Megatron's training step: DistributedDataParallel (grad buffers, finalize_model_grads), the
    forward-backward schedule with one micro-batch, Megatron's optimizer (fp32, or bf16 through
    Float16Module with fp32 main params), the value-LR scheduler, then the Tucker refresh.

    `build(args) -> (config, model, name)` replaces the UltraMem model built from the flags (the
    --compare mode trains its MoE through this loop); it runs where the default model is built,
    after the seed is set, and its config must carry what build_optimizer reads.

    `at_end(args, step, model, optimizer, scheduler)` runs on every rank after the last step
    (__main__ passes the --export-hf export: train.py does not import the export, which reads
    checkpoints through this module).
    """
    validate_args(args)
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from . import checkpointing, data_pipeline
    from .optim import is_value_group

    if args.threads:
        torch.set_num_threads(args.threads)
    init_distributed(args.tensor_model_parallel_size, args.expert_model_parallel_size, args.seed)
    rank = torch.distributed.get_rank()
    torch.manual_seed(args.seed)
    if build is None:
        config = make_config(args)
        model = build_model(config, vocab_size(args), args.seq_length)
        name = f"UltraMem ({args.ultramem_mode})"
    else:
        config, model, name = build(args)
    layers = memory_layers(model)
    n_params = sum(p.numel() for p in model.parameters())
    n_values = sum(p.numel() for p in model.parameters() if getattr(p, "is_ultramem_value", False))
    if rank == 0:
        print(
            f"model: GPT {args.num_layers}L/{args.hidden_size}d + {name}, {n_params:,} parameters "
            f"on this rank ({n_values:,} in value tables, {len(layers)} memory layers)",
            flush=True,
        )
    model, ddp, optimizer, scheduler = wrap_for_training(args, config, model)
    config.finalize_model_grads_func = finalize_model_grads  # DP/TP grad reductions, once a step
    config.grad_scale_func = optimizer.scale_loss

    # resume (validate_args verified the checkpoint's manifest and flags)
    start_step = 1
    history = {"steps": [], "losses": [], "eval_steps": [], "eval_losses": [], "lrs": [],
               "value_lrs": []}  # fmt: skip
    resumed_from = args.resume_iteration
    if resumed_from is not None:
        meta = checkpointing.load_checkpoint(args.load, resumed_from, model, optimizer, scheduler)
        start_step = resumed_from + 1
        history.update(meta["history"])
        for layer in layers:
            layer.refresh_tucker_vectors()

    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    mbs = args.micro_batch_size
    train_ds, valid_ds = build_datasets(args, rank, dp_size)
    train_batches = data_pipeline.build_train_iterator(
        args.data_backend, train_ds, mbs, consumed_samples=(start_step - 1) * mbs * dp_size,
        dp_rank=dp_rank, dp_size=dp_size, num_workers=args.data_workers, prefetch=args.data_prefetch,
    )  # fmt: skip
    valid = list(itertools.islice(
        data_pipeline.build_train_iterator("torch", valid_ds, mbs, 0, dp_rank, dp_size), args.eval_iters
    ))  # fmt: skip
    forward_backward = get_forward_backward_func()

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            val = sum(lm_loss(model, batch).item() for batch in valid) / len(valid)
        model.train()
        return val

    def group_lr(value: bool) -> Optional[float]:
        groups = [g for g in optimizer.param_groups if is_value_group(g) == value]
        return groups[0]["lr"] if groups else None

    tokens_per_step = args.micro_batch_size * args.seq_length
    steps, losses, lrs = history["steps"], history["losses"], history["lrs"]
    eval_steps, eval_losses = history["eval_steps"], history["eval_losses"]
    if start_step == 1:  # the untrained model's validation loss: the start of the same measure
        eval_steps.append(0)
        eval_losses.append(evaluate())
    progress = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=args.train_iters, initial=start_step - 1, desc="ultramem",
                        unit="step", dynamic_ncols=True)  # fmt: skip
    start = time.perf_counter()
    ddp.train()
    if start_step == 1:
        scheduler.step(1)  # Megatron steps the scheduler after each iteration; start at step 1 LR
    for step in range(start_step, args.train_iters + 1):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        lrs.append(group_lr(False))
        history["value_lrs"].append(group_lr(True))
        reports = forward_backward(
            forward_step_func=forward_step, data_iterator=train_batches, model=[ddp],
            num_microbatches=1, seq_length=args.seq_length, micro_batch_size=mbs,
            forward_only=False,
        )  # fmt: skip
        ok, grad_norm, _ = optimizer.step()
        scheduler.step(1)
        if ok:
            for layer in layers:
                layer.refresh_tucker_vectors()
        loss_sum, count = reports[0]["lm loss"].tolist()
        loss = loss_sum / count
        if not math.isfinite(loss):
            raise RuntimeError(f"non-finite loss {loss} at step {step}")
        steps.append(step)
        losses.append(loss)
        if step % args.eval_interval == 0 or step == args.train_iters:
            eval_steps.append(step)
            eval_losses.append(evaluate())
        if args.save is not None and args.save_interval and step % args.save_interval == 0:
            checkpointing.save_checkpoint(args.save, step, model, optimizer, scheduler, {
                "run_config": run_config(args), "consumed_samples": step * mbs * dp_size,
                "train_iters": args.train_iters, "history": history,
            })  # fmt: skip
            if rank == 0 and progress is None:
                print(f"saved checkpoint iteration {step} to {args.save}", flush=True)
        elapsed = time.perf_counter() - start
        rate = (step - start_step + 1) * tokens_per_step / elapsed
        if progress is not None:
            progress.set_postfix(
                loss=f"{loss:.3f}", val=f"{eval_losses[-1]:.3f}" if eval_losses else "-",
                tok_s=f"{rate:,.0f}", gnorm=f"{float(grad_norm or 0):.2f}",
            )  # fmt: skip
            progress.update(1)
        elif rank == 0 and (
            (args.log_interval and step % args.log_interval == 0)
            or (not args.log_interval and eval_steps and eval_steps[-1] == step)
        ):
            val = f" val {eval_losses[-1]:.3f}" if eval_steps and eval_steps[-1] == step else ""
            print(f"step {step}/{args.train_iters} loss {loss:.4f}{val} tok/s {rate:,.0f}", flush=True)
    wall = time.perf_counter() - start
    if at_end is not None:
        at_end(args, args.train_iters, model, optimizer, scheduler)
    if progress is not None:
        progress.close()
    trained = args.train_iters - start_step + 1
    window = min(10, max(1, len(losses) // 5))  # first and last windows never overlap

    metrics = {
        "final_train_loss": sum(losses[-window:]) / window,
        "first_train_loss": sum(losses[:window]) / window,
        "train_loss_window": window,
        "final_valid_loss": eval_losses[-1],
        "initial_valid_loss": eval_losses[0] if eval_steps and eval_steps[0] == 0 else None,
        "initial_train_loss": losses[0],
        "train_iters": args.train_iters,
        "resumed_from_iteration": resumed_from,
        "tokens_per_second": trained * tokens_per_step / wall if trained else None,
        "wall_seconds": wall,
        "parameters": n_params,
        "value_table_parameters": n_values,
        "model": name,
        "memory_layers": len(layers),
        "train_loss": dict(zip(steps, losses)),
        "valid_loss": dict(zip(eval_steps, eval_losses)),
        "learning_rate": dict(zip(steps, lrs)),
        "value_learning_rate": dict(zip(steps, history["value_lrs"])),
        "args": vars(args),
        "versions": _versions(),
    }
    if rank == 0:
        os.makedirs(args.output_dir, exist_ok=True)
        png = os.path.join(args.output_dir, "loss_curve.png")
        title = f"GPT {args.num_layers}L/{args.hidden_size}d + {name}"
        _atomic_write(png, lambda tmp: _plot(tmp, steps, losses, eval_steps, eval_losses, title))
        _atomic_write(
            os.path.join(args.output_dir, "metrics.json"),
            lambda tmp: open(tmp, "w").write(json.dumps(metrics, indent=2, default=str)),
        )
        valid_text = (
            f"validation loss {metrics['initial_valid_loss']:.3f} (untrained) -> "
            if metrics["initial_valid_loss"] is not None
            else "validation loss "
        ) + f"{metrics['final_valid_loss']:.3f} (step {args.train_iters})"
        print(
            f"done: {args.train_iters} steps in {wall:.1f}s"
            + (f" (resumed after {resumed_from})" if resumed_from else "")
            + (f", {metrics['tokens_per_second']:,.0f} tok/s" if trained else "")
            + f"; {valid_text}; train loss, mean of {window} step{'s' * (window > 1)}, "
            f"{metrics['first_train_loss']:.3f} "
            f"(first) -> {metrics['final_train_loss']:.3f} (last); wrote {png} and metrics.json",
            flush=True,
        )
    return metrics


def _versions() -> Dict[str, str]:
    import megatron.core

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "megatron_core": getattr(megatron.core, "__version__", "unknown"),
        "machine": platform.machine(),
        "processor": platform.processor() or "unknown",
        "cpus": str(os.cpu_count()),
    }


def _quiet_megatron() -> None:
    """Megatron warns at import about missing apex/TE and logs every custom MLP-slot module as an
    'Unknown MLP type'; both are expected here, so the main job keeps its console for the run."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("megatron.core.transformer.transformer_layer").setLevel(logging.ERROR)


def parse_args(argv: Optional[List[str]] = None):
    """The main job's arguments (one-line errors, exit status 2, on a bad flag)."""
    return build_parser().parse_args(argv)
