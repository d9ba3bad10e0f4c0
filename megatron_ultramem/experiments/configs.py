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
| ultramem_no_value_lr_decay | ultramem with a constant 1x value LR (rho0 = 1)              |
| ultramem_prev_init | ultramem with the uncalibrated paper init (values x winner RMS)      |
| ultramem_n{n}     | ultramem with n keys per side at the MoE's activated parameters       |
|                   | (memory-size scaling: F_d absorbs the key tables' change; `scaling_variants`) |

"The previous init" is the paper init as it was before the calibration (values ~ N(0, E/(2 m H L))
without dividing by the winners' RMS score; output variance 20-46x the 1/(2L) target). There is no
config switch for it: `build_model` multiplies each built layer's values by
`UltraMemLayer.winner_score_rms()`, which is exactly the factor the calibrated init divided by
(the same calibration batch, the same retrieval parameters, the same value draw).

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
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

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
    value_lr_mult: Optional[float] = None  # rho0; None: the main job's default (train.DEFAULTS)
    init: str = "paper"  # "paper" (calibrated) | "paper_uncalibrated" (the previous init)
    config_overrides: Tuple[Tuple[str, object], ...] = ()
    """Further UltraMemConfig fields of a memory variant, e.g. (("ultramem_init", "reference"),)."""


HEADLINE = ("ultramem", "moe")
"""The pair the closing comparison is about."""

QUALITY = ("ultramem", "moe", "pkm", "dense")
"""The quality sweep's variants (`experiments quality`)."""

ABLATIONS = (
    "ultramem_no_ive", "ultramem_no_tdqkr", "ultramem_no_mcs", "ultramem_no_value_lr_decay",
    "ultramem_prev_init",
)  # fmt: skip
"""The ablations (`experiments ablations`), each against `ultramem`."""

PAPER_TABLE2 = {
    "ultramem_no_ive": ("IVE", -0.017),
    "ultramem_no_tdqkr": ("TDQKR", -0.008),
    "ultramem_no_mcs": ("MCS", -0.003),
    "ultramem_no_value_lr_decay": ("value LR decay", -0.022),
    "ultramem_prev_init": ("improved init", -0.003),
}
"""The paper's Table 2 val-loss change from adding each feature (ULTRAMEM.md). 'improved init' is
the paper's init vs PKM's, the nearest row to calibrated vs uncalibrated init (not the same change)."""


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
        out.append(Variant(name, "ultramem", f"{desc}: {_describe_memory(u)}",
                           u.dense_ffn_hidden_size, ultramem=u, score_activation=act))  # fmt: skip
    base = next(v for v in out if v.name == "ultramem")
    out.append(replace(base, name="ultramem_no_value_lr_decay", value_lr_mult=1.0,
                       description=f"UltraMem with a constant 1x value LR (rho0 = 1): "
                       f"{_describe_memory(base.ultramem)}"))  # fmt: skip
    out.append(replace(base, name="ultramem_prev_init", init="paper_uncalibrated",
                       description="UltraMem with the previous (uncalibrated) paper init, values "
                       f"x winner RMS: {_describe_memory(base.ultramem)}"))  # fmt: skip
    return out


def _describe_memory(u: UltraMemShape) -> str:
    return (
        f"n={u.num_keys} (N={u.num_values}), K={u.key_dim}, H={u.num_heads}, m={u.topm}, "
        f"Dv={u.value_dim}, beside a dense MLP F_d={u.dense_ffn_hidden_size}"
    )


def memory_at_moe_active(size: ModelSize, num_keys: int, E: int = 4, r: int = 2, h: int = 2) -> UltraMemShape:
    """The ultramem variant's memory with `num_keys` keys per side and the dense MLP beside it
    sized so that the slot keeps the MoE's activated parameters: F_d = (A_moe - activated memory) /
    (2 D) (the formula of sizing.size_ultramem_like_moe, with n given instead of solved)."""
    moe = moe_shape(size)
    D = size.hidden_size
    bare = UltraMemShape(D, size.key_dim, size.num_heads, num_keys, E, r, h, size.Dv, size.topm, 0)
    F_d = round((moe.active_params - bare.active_params) / (moe.mlp_coeff * D))
    if F_d < 1:
        raise ValueError(f"num_keys={num_keys}: the key tables alone exceed the MoE's activated budget")
    return replace(bare, dense_ffn_hidden_size=F_d)


def scaling_variants(size: ModelSize, num_keys: Sequence[int]) -> List[Variant]:
    """UltraMem (E=4, r=2, h=2) with n keys per side for each n, at the MoE's activated parameters
    and FLOPs per token; total parameters grow with N = n^2. The n of the matched `ultramem`
    variant gives that variant itself (same shape, so its runs are shared)."""
    base = variant_by_name(size, "ultramem")
    out = []
    for n in num_keys:
        u = memory_at_moe_active(size, n)
        if u == base.ultramem:
            out.append(base)
            continue
        out.append(Variant(f"ultramem_n{n}", "ultramem", f"UltraMem n={n}: {_describe_memory(u)}",
                           u.dense_ffn_hidden_size, ultramem=u))  # fmt: skip
    return out


def variant_by_name(size: ModelSize, name: str) -> Variant:
    for v in matched_variants(size):
        if v.name == name:
            return v
    if name.startswith("ultramem_n") and name[len("ultramem_n"):].isdigit():
        return scaling_variants(size, [int(name[len("ultramem_n"):])])[0]
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
    return transformer_config(size.num_layers, size.hidden_size, size.num_attention_heads,
                              variant.ffn_hidden_size, variant.moe if variant.kind == "moe" else None)  # fmt: skip


def transformer_config(num_layers: int, hidden_size: int, num_attention_heads: int,
                       ffn_hidden_size: int, moe: Optional[MoEShape] = None, **overrides):  # fmt: skip
    """A dense (moe None) or MoE GPT's TransformerConfig: the fields train.make_config sets, minus
    ultramem_*; `moe.moe_layer_freq` says which layers get the MoE (the others a dense MLP of
    `ffn_hidden_size`)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = dict(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        ffn_hidden_size=ffn_hidden_size,
        add_bias_linear=False,
        sequence_parallel=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # plain (unfused) paths everywhere, so every variant runs the same code on CPU and GPU
        **{**cpu_compat.CPU_CONFIG, "use_cpu_initialization": not torch.cuda.is_available()},
    )
    if moe is not None:
        fields.update(
            num_moe_experts=moe.num_experts,
            moe_router_topk=moe.topk,
            moe_ffn_hidden_size=moe.expert_ffn_hidden_size,
            moe_layer_freq=moe.moe_layer_freq,
            moe_token_dispatcher_type="allgather",
            moe_router_load_balancing_type="aux_loss",
            moe_aux_loss_coeff=1e-2,  # Megatron-LM's usual setting (its default 0 disables it)
            moe_grouped_gemm=False,  # SequentialMLP: grouped GEMM needs CUDA
        )
    fields.update(overrides)
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
    if variant.value_lr_mult is not None:
        args.ultramem_value_lr_mult = variant.value_lr_mult
    return train.make_config(
        args, add_bias_linear=False, ultramem_score_activation=variant.score_activation,
        **dict(variant.config_overrides),
    )  # fmt: skip


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
        model = train.build_model(config, size.vocab_size, size.seq_length)
        if variant.init == "paper_uncalibrated":
            uncalibrate_init(model)
        return model, config
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


@torch.no_grad()
def uncalibrate_init(model: torch.nn.Module) -> List[float]:
    """Turn a freshly built model's calibrated paper init into the previous one: each memory
    layer's values times its `winner_score_rms()` (the factor the calibration divided the value
    std by; retrieval does not read the values, so the factor is the one used at init). Returns
    the factors. Precondition: right after building, before any training step."""
    from ..layer import UltraMemLayer

    factors = []
    for layer in model.modules():
        if isinstance(layer, UltraMemLayer):
            if layer.config.ultramem_init != "paper":
                raise ValueError("uncalibrate_init needs ultramem_init='paper'")
            factors.append(layer.winner_score_rms())
            layer.values.mul_(factors[-1])
    return factors


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


def check_matched(counts: Dict[str, Dict[str, int]], total_tol: float = TOTAL_TOL,
                  flops_tol: float = FLOPS_TOL) -> List[str]:  # fmt: skip
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
        assert _rel(c["flops"], ref["flops"]) <= flops_tol, (name, c, ref)
        if name == "dense":
            assert c["total"] < ref["total"], (name, c, ref)
        else:
            assert _rel(c["total"], ref["total"]) <= total_tol, (name, c, ref)
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
