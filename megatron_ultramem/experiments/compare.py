"""`python -m megatron_ultramem --compare`: the main job's UltraMem model against a matched MoE.

    python -m megatron_ultramem --compare [main-job flags] [--output-dir DIR]

Both models are trained by the main job itself (train.train: Megatron DDP, schedule and
optimizer), one after the other, with the same flags: the same seed, hence the same data order
(GPTDataset's shuffle is seeded by --seed) and the same initialization of everything the two
models share (embeddings, attention, norms). The MoE replaces each memory layer's MLP slot by a
Megatron-Core MoE (allgather dispatcher, aux-loss load balancing, coefficient 0.01, scaled by
Megatron's schedule) sized by `moe_like_ultramem` to the slot's total and activated parameters;
the other layers keep the dense MLP of --ffn-hidden-size. The counts are measured on both built
models and the model-wide totals and activated parameters asserted within 1%.

Writes to --output-dir: compare_loss_curve.png (both train and validation curves),
compare_metrics.json ({"ultramem": ..., "moe": ..., "matched": ..., ...}), and each model's own
loss_curve.png and metrics.json under ultramem/ and moe/. Time budget: two main-job runs, each
within the main job's 5 minutes on 2 CPU cores, so 10 minutes for the command.
"""

import copy
import json
import os
import time
from typing import Dict, Tuple

import torch

from .. import sizing
from ..sizing import MoEShape, UltraMemShape

BUDGET_SECONDS = 600
"""Two main-job runs of at most 300 s each."""

MATCH_TOL = 0.01
"""Model-wide total and activated parameters of the MoE vs the UltraMem model: relative."""


def ultramem_slot(args) -> UltraMemShape:
    """The memory slot the flags describe (memory + the dense MLP beside it in mode 'parallel')."""
    return UltraMemShape(
        hidden_size=args.hidden_size, key_dim=args.ultramem_key_dim,
        num_heads=args.ultramem_num_heads, num_keys=args.ultramem_num_keys,
        expansion=args.ultramem_expansion, tucker_rank=args.ultramem_tucker_rank,
        num_cores=args.ultramem_num_cores, value_dim=args.ultramem_value_dim or args.hidden_size // 2,
        topm=args.ultramem_topm,
        dense_ffn_hidden_size=args.ffn_hidden_size if args.ultramem_mode == "parallel" else 0,
    )  # fmt: skip


def moe_like_ultramem(args, max_experts: int = 64) -> Tuple[MoEShape, Dict[str, float]]:
    """The MoE block (top-1 or top-2, ungated experts, in the memory layers' places) whose total
    and activated parameters are closest to one memory slot's: min over (k, experts, F) of the
    larger relative error. Returns the shape and the two errors."""
    slot = ultramem_slot(args)
    P, A, D = slot.total_params, slot.active_params, args.hidden_size
    pattern = sizing.layer_pattern(args.ultramem_layers, args.num_layers, "--ultramem-layers")
    best = None
    for k in (1, 2):
        for e in range(k + 1, max_experts + 1):
            f_total = (P - D * e) / (2 * D * e)
            f_active = (A - D * e) / (2 * D * k)
            lo, hi = sorted((f_total, f_active))
            for F in range(max(1, int(lo)), int(hi) + 2):
                m = MoEShape(D, e, k, F, args.num_layers, gated=False, moe_layer_freq=pattern)
                err = max(abs(m.total_params / P - 1), abs(m.active_params / A - 1))
                if best is None or err < best[0]:
                    best = (err, m)
    err, moe = best
    return moe, {"slot_total": abs(moe.total_params / P - 1), "slot_active": abs(moe.active_params / A - 1)}


def _check_args(args) -> None:
    from ..cli import fail

    if args.ultramem_mode == "skip":
        fail("--compare needs --ultramem-mode parallel or replace (a MoE block takes one layer's "
             "slot; a skip unit spans layers)")  # fmt: skip
    for flag in ("save", "load", "export_hf"):
        if getattr(args, flag, None) is not None:
            fail(f"--compare does not take --{flag.replace('_', '-')} (it trains two models)")
    if args.tensor_model_parallel_size != 1 or args.expert_model_parallel_size != 1:
        fail("--compare runs with --tensor-model-parallel-size 1 and --expert-model-parallel-size 1")


def _check_matched(u: Dict[str, int], m: Dict[str, int]) -> Dict[str, float]:
    """MoE vs UltraMem model-wide counts (relative); total and activated within MATCH_TOL."""
    rel = {k: m[k] / u[k] - 1 for k in ("total", "active", "flops")}
    for k in ("total", "active"):
        if abs(rel[k]) > MATCH_TOL:
            raise AssertionError(
                f"--compare: MoE {k} {m[k]:,} not within {MATCH_TOL:.0%} of UltraMem's {u[k]:,}"
            )
    return rel


def compare(args) -> Dict:
    """Train both models (see the module doc); returns the comparison written to JSON."""
    from .. import train
    from . import configs

    _check_args(args)
    train.validate_args(args)
    moe, slot_err = moe_like_ultramem(args)
    counts = {}

    def build_ultramem(a):
        config = train.make_config(a)
        model = train.build_model(config, train.vocab_size(a), a.seq_length)
        counts["ultramem"] = configs.measured_counts(model, a.seq_length)
        return config, model, f"UltraMem ({a.ultramem_mode})"

    def build_moe(a):
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

        config = configs.transformer_config(
            a.num_layers, a.hidden_size, a.num_attention_heads, a.ffn_hidden_size, moe,
            bf16=a.bf16, params_dtype=torch.bfloat16 if a.bf16 else torch.float32,
        )  # fmt: skip
        # what train.build_optimizer reads; a MoE has no value table (neutral settings)
        config.ultramem_value_lr_mult = 1.0
        config.ultramem_value_weight_decay = False
        config.ultramem_value_lr_decay_rate = 1.0
        model = GPTModel(
            config=config,
            transformer_layer_spec=get_gpt_decoder_block_spec(config, use_transformer_engine=False),
            vocab_size=train.vocab_size(a),
            max_sequence_length=a.seq_length,
            position_embedding_type="rope",
        )
        counts["moe"] = configs.measured_counts(model, a.seq_length)
        _check_matched(counts["ultramem"], counts["moe"])  # before spending the MoE's minutes
        name = f"MoE top-{moe.topk} of {moe.num_experts} (F={moe.expert_ffn_hidden_size})"
        return config, model, name

    out = args.output_dir
    t0 = time.perf_counter()
    results = {}
    for name, build in (("ultramem", build_ultramem), ("moe", build_moe)):
        run_args = copy.copy(args)
        run_args.output_dir = os.path.join(out, name)
        print(f"--compare: training {name} -> {run_args.output_dir}", flush=True)
        results[name] = train.train(run_args, build=build)
        results[name]["counts"] = counts[name]
    wall = time.perf_counter() - t0
    rel = _check_matched(counts["ultramem"], counts["moe"])
    summary = {
        "ultramem": results["ultramem"],
        "moe": results["moe"],
        "moe_shape": {"num_experts": moe.num_experts, "topk": moe.topk,
                      "expert_ffn_hidden_size": moe.expert_ffn_hidden_size,
                      "moe_layer_freq": moe.moe_layer_freq, "aux_loss_coeff": 0.01},  # fmt: skip
        "matched": {"moe_vs_ultramem_relative": rel, "per_slot_relative_error": slot_err,
                    "tolerance": MATCH_TOL},  # fmt: skip
        "same_seed_and_data_order": {"seed": args.seed, "train_iters": args.train_iters,
                                     "micro_batch_size": args.micro_batch_size},  # fmt: skip
        "valid_loss_ultramem_minus_moe": results["ultramem"]["final_valid_loss"]
        - results["moe"]["final_valid_loss"],
        "wall_seconds": wall,
        "budget_seconds": BUDGET_SECONDS,
    }
    os.makedirs(out, exist_ok=True)
    png = os.path.join(out, "compare_loss_curve.png")
    _plot(png, results, f"GPT {args.num_layers}L/{args.hidden_size}d: UltraMem vs matched MoE "
          f"(seed {args.seed}, same data order)")  # fmt: skip
    path = os.path.join(out, "compare_metrics.json")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2, default=str)
    os.replace(tmp, path)
    d = summary["valid_loss_ultramem_minus_moe"]
    print(f"--compare done in {wall:.0f}s (budget {BUDGET_SECONDS}s): valid loss UltraMem "
          f"{results['ultramem']['final_valid_loss']:.4f}, MoE {results['moe']['final_valid_loss']:.4f} "
          f"(UltraMem - MoE {d:+.4f}, one seed); wrote {png} and {path}", flush=True)  # fmt: skip
    return summary


def _plot(path: str, results: Dict[str, Dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (name, r) in enumerate(results.items()):
        steps = [int(k) for k in r["train_loss"]]
        ax.plot(steps, list(r["train_loss"].values()), color=f"C{i}", lw=0.8, alpha=0.6,
                label=f"{r['model']}: train")  # fmt: skip
        ax.plot([int(k) for k in r["valid_loss"]], list(r["valid_loss"].values()), "o-", color=f"C{i}",
                label=f"{r['model']}: validation (final {r['final_valid_loss']:.4f})")  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/byte)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
