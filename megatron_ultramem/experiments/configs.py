"""Matched configurations: dense, Megatron-Core MoE, PKM, UltraMem and its ablations.

Every variant is the same GPT (same attention, embeddings, norms, layer count); only the MLP slot of
every layer differs. The MoE is the anchor; the others are sized against it with
`sizing.size_ultramem_like_moe` (mode 'parallel': a dense MLP of `F_d` beside the memory, UltraMemV2
style) so that each has the MoE's total parameters and its activated parameters per token:

| name              | MLP slot                                                              |
|-------------------|-----------------------------------------------------------------------|
| dense             | MLP with F = activated(MoE) / (2 D): same activated, fewer total      |
| moe               | Megatron-Core MoELayer, top-k of `num_experts`, allgather dispatcher  |
| pkm               | memory with E=1, r=1, h=1, softmax scores (product-key memory)        |
| ultramem          | memory with the paper's E=4, r=2, h=2, raw scores (scaled-down K, m)  |
| ultramem_no_ive   | ultramem with E=1                                                     |
| ultramem_no_tdqkr | ultramem with r=1                                                     |
| ultramem_no_mcs   | ultramem with h=1                                                     |

Counting (one source: `analytic_counts` from the shapes chosen here, checked against
`measured_counts` taken from the built Megatron models):
- total parameters: sum of numel over the model's unique parameters: input embedding and LM head
  untied (GPTModel's default), no linear biases (`add_bias_linear=False` everywhere).
- activated parameters per token: everything except the (num_experts - k) experts a token does not
  use and the N - H*m value rows it does not read (embedding table counted whole, as usual).
- forward FLOPs per token: 2 x multiply-accumulates of every matmul a token takes part in:
  attention projections, the causal attention core (D * (s+1) per layer: QK^T and PV over s/2 keys
  on average), the LM head, the router and k experts (MoE), and for a memory its query, the row and
  column key scores (2 H n' K r), phase-1 projections (2 H n' r), phase-2 rescoring of the m x m grid
  (H (m r^2 + m^2 r)), per-core winner scores (H m h (r^2 + r)), pooling (H m Dv), output
  projection (D E Dv) and its dense MLP. Norms, top-k, softmax and activations are not counted.

Matching tolerance (asserted by `check_matched`): the integer sizes (n keys per side and the dense
F_d) cannot hit the MoE's counts exactly; every non-dense variant must be within `TOTAL_TOL` of the
MoE's total parameters, and every variant within `ACTIVE_TOL` of its activated parameters and
`FLOPS_TOL` of its FLOPs per token (the memory's retrieval MACs beyond its parameters - phase 1 and 2
and per-core scores - are what makes FLOPs differ a little more than activated parameters).
"""

import argparse
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import torch

from .. import cpu_compat, sizing
from ..sizing import MoEShape, UltraMemShape

TOTAL_TOL = 0.01
"""Model-wide total parameters of a memory variant vs the MoE: relative, |a - b| / b."""
ACTIVE_TOL = 0.01
"""Model-wide activated parameters per token vs the MoE."""
FLOPS_TOL = 0.03
"""Model-wide forward FLOPs per token vs the MoE."""


@dataclass(frozen=True)
class ModelSize:
    """The shared GPT and the MoE anchor; memory knobs are the paper's defaults scaled down."""

    num_layers: int = 4
    hidden_size: int = 128
    num_attention_heads: int = 4
    seq_length: int = 128
    vocab_size: int = 256
    num_experts: int = 8
    topk: int = 2
    expert_ffn_hidden_size: int = 256
    key_dim: int = 32  # K (paper 192 at D=1024 -> D/4 here)
    num_heads: int = 2  # H (paper 2)
    topm: int = 16  # m (paper 80 at N ~ 650k rows; here N ~ 6k)
    value_dim: Optional[int] = None  # Dv: D/2 ("half vdim")
    ffn_multiple_of: int = 1  # F_d granularity: 1 keeps the activated match tight at small D

    @property
    def Dv(self) -> int:
        return self.value_dim or self.hidden_size // 2


QUICK_SIZE = ModelSize(
    num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=64,
    num_experts=8, topk=2, expert_ffn_hidden_size=128, key_dim=16, topm=8,
)  # fmt: skip
"""Tiny size for CI (`--quick`)."""


@dataclass(frozen=True)
class Variant:
    """One configuration of the MLP slot."""

    name: str
    kind: str  # "dense" | "moe" | "ultramem"
    description: str
    ffn_hidden_size: int  # dense MLP (dense: the slot; ultramem: F_d beside the memory)
    moe: Optional[MoEShape] = None
    ultramem: Optional[UltraMemShape] = None
    score_activation: str = "none"


HEADLINE = ("ultramem", "moe")
"""The pair run with several seeds."""


def moe_shape(size: ModelSize) -> MoEShape:
    return MoEShape(
        hidden_size=size.hidden_size,
        num_experts=size.num_experts,
        topk=size.topk,
        expert_ffn_hidden_size=size.expert_ffn_hidden_size,
        num_layers=size.num_layers,
        gated=False,
        moe_layer_freq=1,
    )


def _memory_like_moe(size: ModelSize, moe: MoEShape, E: int, r: int, h: int) -> UltraMemShape:
    s = sizing.size_ultramem_like_moe(
        moe,
        "parallel",
        key_dim=size.key_dim,
        num_heads=size.num_heads,
        topm=size.topm,
        expansion=E,
        tucker_rank=r,
        num_cores=h,
        value_dim=size.Dv,
        ffn_multiple_of=size.ffn_multiple_of,
    )
    return s.ultramem


def matched_variants(size: ModelSize = ModelSize()) -> List[Variant]:
    """All configurations, the MoE first. Sizes come from `sizing.size_ultramem_like_moe`."""
    moe = moe_shape(size)
    D = size.hidden_size
    dense_ffn = round(moe.active_params / (moe.mlp_coeff * D))
    out = [
        Variant("moe", "moe", f"Megatron-Core MoE, top-{moe.topk} of {moe.num_experts} experts "
                f"(F={moe.expert_ffn_hidden_size}), allgather dispatcher",
                moe.expert_ffn_hidden_size, moe=moe),
        Variant("dense", "dense", f"dense MLP F={dense_ffn} (MoE's activated, fewer total)",
                dense_ffn),
    ]  # fmt: skip
    memories = [
        ("ultramem", "UltraMem E=4 r=2 h=2 (paper defaults, scaled down)", 4, 2, 2, "none"),
        ("pkm", "PKM: E=1 r=1 h=1, softmax scores", 1, 1, 1, "softmax"),
        ("ultramem_no_ive", "UltraMem without IVE (E=1)", 1, 2, 2, "none"),
        ("ultramem_no_tdqkr", "UltraMem without TDQKR (r=1)", 4, 1, 2, "none"),
        ("ultramem_no_mcs", "UltraMem without MCS (h=1)", 4, 2, 1, "none"),
    ]
    for name, desc, E, r, h, act in memories:
        u = _memory_like_moe(size, moe, E, r, h)
        desc = (
            f"{desc}: n={u.num_keys} (N={u.num_values}), K={u.key_dim}, H={u.num_heads}, "
            f"m={u.topm}, Dv={u.value_dim}, beside a dense MLP F_d={u.dense_ffn_hidden_size}"
        )
        out.append(Variant(name, "ultramem", desc, u.dense_ffn_hidden_size, ultramem=u,
                           score_activation=act))  # fmt: skip
    return out


def variant_by_name(size: ModelSize, name: str) -> Variant:
    for v in matched_variants(size):
        if v.name == name:
            return v
    raise KeyError(f"unknown variant {name!r}: choose from {[v.name for v in matched_variants(size)]}")


# ---------------------------------------------------------------------- analytic counts
def _memory_retrieval_macs(u: UltraMemShape) -> int:
    """Per-token MACs of retrieval beyond those equal to a parameter count (see module doc)."""
    H, m, r, h, n_side = u.num_heads, u.topm, u.tucker_rank, u.num_cores, u.keys_per_side
    return 2 * H * n_side * r + H * (m * r * r + m * m * r) + H * m * h * (r * r + r)


def analytic_counts(variant: Variant, size: ModelSize) -> Dict[str, int]:
    """total, active (per token) and forward flops (per token) from the chosen shapes."""
    D, L, V, s = size.hidden_size, size.num_layers, size.vocab_size, size.seq_length
    common_layer = 4 * D * D + 2 * D + 2 * D  # qkv + proj, input LN, pre-MLP LN (weight + bias)
    common = 2 * V * D + L * common_layer + 2 * D  # embedding + LM head (untied), final LN
    common_macs = L * (4 * D * D + D * (s + 1)) + V * D
    if variant.kind == "dense":
        slot_total = slot_active = slot_macs = 2 * D * variant.ffn_hidden_size
    elif variant.kind == "moe":
        m = variant.moe
        slot_total, slot_active = m.total_params, m.active_params
        slot_macs = m.active_params
    else:
        u = variant.ultramem
        b = u.breakdown()
        slot_total, slot_active = u.total_params, u.active_params
        # query, keys (scores), cores are not MACs per token; values -> H*m*Dv pooling MACs
        slot_macs = (
            b["query"] + b["keys"] + u.num_heads * u.topm * u.value_dim + b["out"]
            + b["dense_mlp"] + _memory_retrieval_macs(u)
        )  # fmt: skip
    return {
        "total": common + L * slot_total,
        "active": common + L * slot_active,
        "flops": 2 * (common_macs + L * slot_macs),
    }


# ---------------------------------------------------------------------- building
def base_args(size: ModelSize, seed: int) -> argparse.Namespace:
    """The main job's arguments (train.build_parser defaults) set to this size."""
    from .. import train

    args = train.build_parser().parse_args([])
    args.num_layers = size.num_layers
    args.hidden_size = size.hidden_size
    args.num_attention_heads = size.num_attention_heads
    args.seq_length = size.seq_length
    args.seed = seed
    args.ultramem_mode = "parallel"
    args.ultramem_layers = 1  # a memory in every layer, where the MoE had experts
    return args


def _transformer_config(size: ModelSize, variant: Variant, seed: int):
    """Config of a dense or MoE variant: the fields train.make_config sets, minus ultramem_*."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = dict(
        num_layers=size.num_layers,
        hidden_size=size.hidden_size,
        num_attention_heads=size.num_attention_heads,
        ffn_hidden_size=variant.ffn_hidden_size,
        add_bias_linear=False,
        sequence_parallel=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # plain (unfused) paths everywhere, so every variant runs the same code on CPU and GPU
        **{**cpu_compat.CPU_CONFIG, "use_cpu_initialization": not torch.cuda.is_available()},
    )
    if variant.kind == "moe":
        m = variant.moe
        fields.update(
            num_moe_experts=m.num_experts,
            moe_router_topk=m.topk,
            moe_ffn_hidden_size=m.expert_ffn_hidden_size,
            moe_token_dispatcher_type="allgather",
            moe_router_load_balancing_type="aux_loss",
            moe_aux_loss_coeff=1e-2,  # Megatron-LM's usual setting (its default 0 disables it)
            moe_grouped_gemm=False,  # SequentialMLP: grouped GEMM needs CUDA
        )
    return TransformerConfig(**fields)


def _ultramem_config(size: ModelSize, variant: Variant, seed: int):
    from .. import train

    u = variant.ultramem
    args = base_args(size, seed)
    args.ffn_hidden_size = u.dense_ffn_hidden_size
    args.ultramem_num_keys = u.num_keys
    args.ultramem_key_dim = u.key_dim
    args.ultramem_value_dim = u.value_dim
    args.ultramem_expansion = u.expansion
    args.ultramem_tucker_rank = u.tucker_rank
    args.ultramem_num_cores = u.num_cores
    args.ultramem_num_heads = u.num_heads
    args.ultramem_topm = u.topm
    return train.make_config(
        args, add_bias_linear=False, ultramem_score_activation=variant.score_activation
    )


def build_config(variant: Variant, size: ModelSize, seed: int = 1234):
    if variant.kind == "ultramem":
        return _ultramem_config(size, variant, seed)
    return _transformer_config(size, variant, seed)


def build_model(variant: Variant, size: ModelSize, seed: int = 1234):
    """(GPTModel, config). Precondition: train.init_distributed() ran (parallel state, RNG)."""
    from .. import train

    torch.manual_seed(seed)
    config = build_config(variant, size, seed)
    if variant.kind == "ultramem":
        return train.build_model(config, size.vocab_size, size.seq_length), config
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=size.vocab_size,
        max_sequence_length=size.seq_length,
        position_embedding_type="rope",
    )
    return model, config


# ---------------------------------------------------------------------- measured counts
def _unique_params(module: torch.nn.Module) -> Dict[int, torch.nn.Parameter]:
    return {id(p): p for p in module.parameters()}


def measured_counts(model: torch.nn.Module, seq_length: int) -> Dict[str, int]:
    """total / active / flops per token read off a built GPTModel's modules and parameter shapes.

    total: sum of numel over unique parameters. active: total minus the experts a token skips
    (MoELayer: (experts - topk) x one expert's numel) and the value rows it skips (UltraMemLayer:
    values.numel() - H*m*Dv). flops: 2 x MACs from the weight shapes of every linear a token uses
    (see module doc), the LM head, and the attention core from the config.
    """
    from megatron.core.transformer.attention import Attention
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from ..layer import UltraMemLayer

    params = _unique_params(model)
    total = sum(p.numel() for p in params.values())
    skipped = 0
    macs = model.output_layer.weight.numel()  # LM head: V x D per token
    moe_expert_mlps = set()
    for mod in model.modules():
        if isinstance(mod, MoELayer):
            experts = list(mod.experts.local_experts)
            one = sum(p.numel() for p in experts[0].parameters())
            k = mod.config.moe_router_topk
            skipped += (len(experts) - k) * one
            macs += mod.router.weight.numel() + k * one
            moe_expert_mlps.update(id(e) for e in experts)
        elif isinstance(mod, UltraMemLayer):
            Dv = mod.values.shape[1]
            skipped += mod.values.numel() - mod.H * mod.m * Dv
            H, m, r, h, n_side = mod.H, mod.m, mod.r, mod.h, mod.n_side
            macs += (
                mod.query_weight.numel() + mod.keys_row.numel() + mod.keys_col.numel()
                + 2 * H * n_side * r + H * (m * r * r + m * m * r) + H * m * h * (r * r + r)
                + H * m * Dv + mod.linear_out.weight.numel()
            )  # fmt: skip
        elif isinstance(mod, MLP) and id(mod) not in moe_expert_mlps:
            macs += mod.linear_fc1.weight.numel() + mod.linear_fc2.weight.numel()
        elif isinstance(mod, Attention):
            D = mod.config.hidden_size
            macs += mod.linear_qkv.weight.numel() + mod.linear_proj.weight.numel()
            macs += D * (seq_length + 1)  # QK^T and PV, each D*(s+1)/2 MACs (causal mean)
    return {"total": total, "active": total - skipped, "flops": 2 * macs}


# ---------------------------------------------------------------------- matching check
def _rel(a: float, b: float) -> float:
    return abs(a - b) / b


def check_matched(counts: Dict[str, Dict[str, int]]) -> List[str]:
    """Assert the matching (module doc) on {variant: counts}; return the table as lines."""
    ref = counts["moe"]
    lines = [
        "| variant | total params | vs MoE | activated/token | vs MoE | fwd FLOPs/token | vs MoE |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, c in counts.items():
        lines.append(
            f"| {name} | {c['total']:,} | {100 * (c['total'] / ref['total'] - 1):+.2f}% "
            f"| {c['active']:,} | {100 * (c['active'] / ref['active'] - 1):+.2f}% "
            f"| {c['flops']:,} | {100 * (c['flops'] / ref['flops'] - 1):+.2f}% |"
        )
    for name, c in counts.items():
        assert _rel(c["active"], ref["active"]) <= ACTIVE_TOL, (name, c, ref)
        assert _rel(c["flops"], ref["flops"]) <= FLOPS_TOL, (name, c, ref)
        if name == "dense":
            assert c["total"] < ref["total"], (name, c, ref)
        else:
            assert _rel(c["total"], ref["total"]) <= TOTAL_TOL, (name, c, ref)
    return lines


def describe(size: ModelSize) -> Tuple[List[Variant], Dict[str, Dict[str, int]], List[str]]:
    """Variants, their analytic counts and the checked comparison table (no model is built)."""
    variants = matched_variants(size)
    counts = {v.name: analytic_counts(v, size) for v in variants}
    return variants, counts, check_matched(counts)


def main(argv=None) -> int:
    """`python -m megatron_ultramem.experiments configs`: print and check the matched configs."""
    p = argparse.ArgumentParser(prog="python -m megatron_ultramem.experiments configs")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--build", action="store_true", help="also build each model and compare counts")
    args = p.parse_args(argv)
    size = QUICK_SIZE if args.quick else ModelSize()
    variants, counts, lines = describe(size)
    print(f"size: {asdict(size)}")
    for v in variants:
        print(f"- {v.name}: {v.description}")
    print("\n".join(lines))
    if args.build:
        from .. import train

        train.init_distributed(seed=1234)
        for v in variants:
            model, _ = build_model(v, size)
            got = measured_counts(model, size.seq_length)
            status = "OK" if got == counts[v.name] else f"MISMATCH analytic {counts[v.name]}"
            print(f"built {v.name}: {got} {status}")
    return 0
