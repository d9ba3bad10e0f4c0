"""The main job: train a small Megatron-Core GPT with UltraMem layers on the embedded corpus.

`python -m megatron_ultramem` (or the `megatron-ultramem` console script) with no arguments trains
on CPU in a few minutes and writes `loss_curve.png` and `metrics.json` under `--output-dir`.
Runs single-process (gloo, world size 1) or under torchrun with tensor/expert parallelism.

The loop is Megatron's shape on CPU: GPTModel from the UltraMem block spec, torch AdamW (Megatron's
optimizer classes need CUDA) with the value table in its own param group, Megatron's
OptimizerParamScheduler (the value group's LR follows it times the decaying value-LR multiplier),
the Tucker SVD refresh once per optimizer step, and the Tucker aux loss injected through Megatron's
MoEAuxLossAutoScaler.
"""

import argparse
import itertools
import json
import math
import os
import platform
import socket
import time
from typing import Dict, List, Optional

import torch

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
    warmup_iters=20,
    weight_decay=0.1,
    eval_interval=50,
    eval_iters=4,
    seed=1234,
    ultramem_mode="parallel",
    ultramem_layers="[0,1,0,1]",
    ultramem_skip_units="0:1,2:3",
    ultramem_num_keys=32,
    ultramem_key_dim=32,
    ultramem_expansion=4,
    ultramem_tucker_rank=2,
    ultramem_num_cores=2,
    ultramem_num_heads=2,
    ultramem_topm=16,
    ultramem_value_lr_mult=4.0,
)


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = argparse.ArgumentParser(
        prog="python -m megatron_ultramem",
        description="Train a small Megatron-Core GPT with UltraMem memory layers on the embedded "
        "corpus (CPU, a few minutes). Writes loss_curve.png and metrics.json to --output-dir.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=d["num_layers"])
    g.add_argument("--hidden-size", type=int, default=d["hidden_size"])
    g.add_argument("--num-attention-heads", type=int, default=d["num_attention_heads"])
    g.add_argument("--ffn-hidden-size", type=int, default=d["ffn_hidden_size"])
    g.add_argument("--seq-length", type=int, default=d["seq_length"])
    g = p.add_argument_group("ultramem")
    g.add_argument("--ultramem-mode", default=d["ultramem_mode"], choices=["replace", "parallel", "skip"])
    g.add_argument("--ultramem-layers", default=d["ultramem_layers"],
                   help="layer pattern for replace/parallel: int N, or a 0/1 list like [0,1,0,1]")
    g.add_argument("--ultramem-skip-units", default=d["ultramem_skip_units"],
                   help='skip units "i:j,..." for --ultramem-mode skip')
    g.add_argument("--ultramem-num-keys", type=int, default=d["ultramem_num_keys"], help="n")
    g.add_argument("--ultramem-key-dim", type=int, default=d["ultramem_key_dim"], help="K")
    g.add_argument("--ultramem-value-dim", type=int, default=None, help="Dv (default hidden/2)")
    g.add_argument("--ultramem-expansion", type=int, default=d["ultramem_expansion"], help="E")
    g.add_argument("--ultramem-tucker-rank", type=int, default=d["ultramem_tucker_rank"], help="r")
    g.add_argument("--ultramem-num-cores", type=int, default=d["ultramem_num_cores"], help="h")
    g.add_argument("--ultramem-num-heads", type=int, default=d["ultramem_num_heads"], help="H")
    g.add_argument("--ultramem-topm", type=int, default=d["ultramem_topm"], help="m")
    g.add_argument("--ultramem-value-lr-mult", type=float, default=d["ultramem_value_lr_mult"])
    g.add_argument("--ultramem-impl", default="auto", choices=["auto", "reference", "triton"])
    g = p.add_argument_group("training")
    g.add_argument("--train-iters", type=int, default=d["train_iters"])
    g.add_argument("--micro-batch-size", type=int, default=d["micro_batch_size"])
    g.add_argument("--lr", type=float, default=d["lr"])
    g.add_argument("--min-lr", type=float, default=d["min_lr"])
    g.add_argument("--warmup-iters", type=int, default=d["warmup_iters"])
    g.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    g.add_argument("--eval-interval", type=int, default=d["eval_interval"])
    g.add_argument("--eval-iters", type=int, default=d["eval_iters"])
    g.add_argument("--seed", type=int, default=d["seed"])
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-model-parallel-size", type=int, default=1)
    g.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    g.add_argument("--data-backend", default="torch", choices=["torch", "dali"],
                   help="input pipeline: Megatron's sampler + torch DataLoader, or NVIDIA DALI "
                   "(pip install 'megatron-ultramem[dali]')")
    g.add_argument("--data-path", default=None, metavar="PREFIX",
                   help="train on a Megatron indexed dataset (PREFIX.bin + PREFIX.idx, e.g. written "
                   "by Megatron-LM's tools/preprocess_data.py) instead of the embedded corpus; "
                   "validation uses the --split share of its documents")
    g.add_argument("--split", default="95,5,0",
                   help="train,valid,test shares of --data-path's documents (Megatron-LM's --split)")
    g.add_argument("--data-workers", type=int, default=0, help="loader worker processes")
    g.add_argument("--data-prefetch", type=int, default=2, help="prefetch depth (batches)")
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", default="ultramem_run")
    g.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    return p


def validate_args(args) -> None:
    """Reject bad values before any work starts; each message names the flag."""
    positive = [
        "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "seq_length",
        "train_iters", "micro_batch_size", "eval_interval", "eval_iters",
    ]
    for name in positive:
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.hidden_size % args.num_attention_heads:
        raise SystemExit(
            f"error: --hidden-size ({args.hidden_size}) must be divisible by "
            f"--num-attention-heads ({args.num_attention_heads})"
        )
    if args.lr <= 0 or args.min_lr < 0 or args.min_lr > args.lr:
        raise SystemExit(f"error: need 0 <= --min-lr <= --lr and --lr > 0 (got {args.min_lr}, {args.lr})")
    if args.data_workers < 0 or args.data_prefetch < 1:
        raise SystemExit(
            f"error: --data-workers must be >= 0 and --data-prefetch >= 1 "
            f"(got {args.data_workers}, {args.data_prefetch})"
        )
    if args.data_backend == "dali":
        import importlib.util

        if importlib.util.find_spec("nvidia.dali") is None:
            raise SystemExit(
                "error: --data-backend dali needs NVIDIA DALI: pip install 'megatron-ultramem[dali]' "
                "(nvidia-dali-cuda130; nvidia-dali-cuda120 for CUDA 12 drivers)"
            )
    if args.data_path is not None:
        shares = args.split.split(",")
        try:
            values = [float(x) for x in shares]
        except ValueError:
            values = []
        if len(values) != 3 or min(values) < 0 or values[0] <= 0 or values[1] <= 0:
            raise SystemExit(
                f"error: --split must be three non-negative shares train,valid,test with train "
                f"and valid > 0 (e.g. 95,5,0), got {args.split!r}"
            )
        from .data_pipeline import inspect_indexed_prefix

        try:
            args.data_info = inspect_indexed_prefix(args.data_path, "--data-path")
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
    if args.warmup_iters < 0 or args.warmup_iters >= args.train_iters:
        raise SystemExit(
            f"error: --warmup-iters must be in [0, --train-iters) = [0, {args.train_iters}), "
            f"got {args.warmup_iters}"
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(tp: int = 1, ep: int = 1, seed: int = 1234) -> None:
    """gloo process group (torchrun's env or a single local process) + Megatron's parallel state."""
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
        raise SystemExit(
            f"error: world size {world} must be divisible by --tensor-model-parallel-size ({tp}) "
            f"and --expert-model-parallel-size ({ep})"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, expert_model_parallel_size=ep
    )
    model_parallel_cuda_manual_seed(seed)


def make_config(args, **overrides):
    """UltraMemConfig from parsed main-job arguments."""
    from . import cpu_compat
    from .config import UltraMemConfig

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
        ultramem_mode=args.ultramem_mode,
        ultramem_layers=args.ultramem_layers,
        ultramem_skip_units=args.ultramem_skip_units if args.ultramem_mode == "skip" else None,
        ultramem_num_keys=args.ultramem_num_keys,
        ultramem_key_dim=args.ultramem_key_dim,
        ultramem_value_dim=args.ultramem_value_dim,
        ultramem_expansion=args.ultramem_expansion,
        ultramem_tucker_rank=args.ultramem_tucker_rank,
        ultramem_num_cores=args.ultramem_num_cores,
        ultramem_num_heads=args.ultramem_num_heads,
        ultramem_topm=args.ultramem_topm,
        ultramem_value_lr_mult=args.ultramem_value_lr_mult,
        ultramem_impl=args.ultramem_impl,
        ultramem_seed=args.seed,
    )
    fields.update(overrides)
    try:
        return UltraMemConfig(**fields)
    except ValueError as err:
        flag = str(err).split(" ")[0].replace("_", "-")
        raise SystemExit(f"error: --{flag}: {err}") from None


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


def train(args) -> Dict:
    """Run the main job; returns the metrics dict that is also written to metrics.json."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron.core import parallel_state

    from . import data_pipeline
    from .optim import UltraMemParamScheduler, param_groups

    validate_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    init_distributed(args.tensor_model_parallel_size, args.expert_model_parallel_size, args.seed)
    rank = torch.distributed.get_rank()
    torch.manual_seed(args.seed)
    config = make_config(args)
    model = build_model(config, vocab_size(args), args.seq_length)
    layers = memory_layers(model)

    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    mbs = args.micro_batch_size
    train_ds, valid_ds = build_datasets(args, rank, dp_size)
    train_batches = data_pipeline.build_train_iterator(
        args.data_backend, train_ds, mbs, consumed_samples=0, dp_rank=dp_rank, dp_size=dp_size,
        num_workers=args.data_workers, prefetch=args.data_prefetch,
    )
    valid = list(itertools.islice(
        data_pipeline.build_train_iterator("torch", valid_ds, mbs, 0, dp_rank, dp_size), args.eval_iters
    ))

    optimizer = torch.optim.AdamW(
        param_groups(model, args.weight_decay, config.ultramem_value_weight_decay),
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    scheduler = UltraMemParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.warmup_iters,
        lr_decay_steps=args.train_iters,
        lr_decay_style="cosine",
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters,
        wd_incr_style="constant",
        value_lr_mult=config.ultramem_value_lr_mult,
        value_lr_decay_rate=config.ultramem_value_lr_decay_rate,
    )
    assert isinstance(scheduler, OptimizerParamScheduler)
    # One micro-batch per step: the aux-loss gradient has the main loss's scale (1 / microbatches).
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            val = sum(lm_loss(model, batch).item() for batch in valid) / len(valid)
        model.train()
        return val

    os.makedirs(args.output_dir, exist_ok=True)
    n_params = sum(p.numel() for p in model.parameters())
    n_values = sum(p.numel() for p in model.parameters() if getattr(p, "is_ultramem_value", False))
    tokens_per_step = args.micro_batch_size * args.seq_length
    steps, losses, eval_steps, eval_losses = [], [], [], []
    progress = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=args.train_iters, desc="ultramem", unit="step", dynamic_ncols=True)
    start = time.perf_counter()
    model.train()
    scheduler.step(1)  # Megatron steps the scheduler after each iteration; start at step 1 LR
    for step in range(1, args.train_iters + 1):
        loss = lm_loss(model, next(train_batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step(1)
        for layer in layers:
            layer.refresh_tucker_vectors()
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"non-finite loss {loss.item()} at step {step}")
        steps.append(step)
        losses.append(loss.item())
        if step % args.eval_interval == 0 or step == args.train_iters:
            eval_steps.append(step)
            eval_losses.append(evaluate())
        if progress is not None:
            elapsed = time.perf_counter() - start
            progress.set_postfix(
                loss=f"{loss.item():.3f}",
                val=f"{eval_losses[-1]:.3f}" if eval_losses else "-",
                tok_s=f"{step * tokens_per_step / elapsed:,.0f}",
                gnorm=f"{float(grad_norm):.2f}",
            )
            progress.update(1)
        elif rank == 0 and eval_steps and eval_steps[-1] == step:
            elapsed = time.perf_counter() - start
            print(
                f"step {step}/{args.train_iters} loss {loss.item():.3f} val {eval_losses[-1]:.3f} "
                f"tok/s {step * tokens_per_step / elapsed:,.0f}",
                flush=True,
            )
    wall = time.perf_counter() - start
    if progress is not None:
        progress.close()

    metrics = {
        "final_train_loss": sum(losses[-10:]) / len(losses[-10:]),
        "final_valid_loss": eval_losses[-1],
        "initial_train_loss": losses[0],
        "train_iters": args.train_iters,
        "tokens_per_second": args.train_iters * tokens_per_step / wall,
        "wall_seconds": wall,
        "parameters": n_params,
        "value_table_parameters": n_values,
        "memory_layers": len(layers),
        "train_loss": dict(zip(steps, losses)),
        "valid_loss": dict(zip(eval_steps, eval_losses)),
        "args": vars(args),
        "versions": _versions(),
    }
    if rank == 0:
        png = os.path.join(args.output_dir, "loss_curve.png")
        title = f"GPT {args.num_layers}L/{args.hidden_size}d + UltraMem ({args.ultramem_mode})"
        _atomic_write(png, lambda tmp: _plot(tmp, steps, losses, eval_steps, eval_losses, title))
        _atomic_write(
            os.path.join(args.output_dir, "metrics.json"),
            lambda tmp: open(tmp, "w").write(json.dumps(metrics, indent=2, default=str)),
        )
        print(
            f"done: {args.train_iters} steps in {wall:.1f}s, {metrics['tokens_per_second']:,.0f} tok/s, "
            f"train loss {losses[0]:.3f} -> {metrics['final_train_loss']:.3f}, "
            f"valid loss {metrics['final_valid_loss']:.3f}; wrote {png} and metrics.json",
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


def main(argv: Optional[List[str]] = None) -> Dict:
    args = build_parser().parse_args(argv)
    _quiet_megatron()
    return train(args)
