"""Size an UltraMem configuration that matches a MoE configuration's parameters.

Given a MoE model (hidden size D, experts, top-k, expert FFN size F, MoE layer pattern), find the
UltraMem memory layers with the same total parameters and the same activated parameters per token,
and report how many bytes each reads per token at decoding batch sizes B.

Counts per memory layer (ULTRAMEM.md notation; s = sqrt(E), n' = s * n, N = n^2):
    query 2*K*D | keys 2*H*n'*K*r | cores H*h*r*r | LayerNorms 4*2*K | values N*Dv | out D*E*Dv
    activated per token: everything but the values, plus H*m value rows of Dv.
Per MoE layer (c = 3 for gated/SwiGLU experts, 2 otherwise):
    experts * c*D*F + router D*experts (+ a shared expert c*D*S); activated: top-k experts + router
    (+ shared expert).

Two placements, like `ultramem_mode`:
- 'parallel' (default; UltraMemV2, the drop-in for a MoE block): each MoE block becomes a dense MLP
  of `ffn_hidden_size` F_d plus a memory beside it. With H and m fixed, the two equations
      total:     c*D*F_d + fixed(n) + n^2*Dv  = P_moe
      activated: c*D*F_d + fixed(n) + H*m*Dv  = A_moe
  give n^2 = (P_moe - A_moe)/Dv + H*m, then F_d from the activated one (rounded to a multiple).
  When F_d is given (or fixed because dense layers share --ffn-hidden-size), m is solved instead.
- 'replace': the memory alone replaces the MoE block: n from the total, m from the activated count
  (with more heads H when m would exceed n', unless H is given).

Bytes read per token at decoding batch B (one layer, upper bound: no two tokens share a row or an
expert): MoE reads the router and min(B*k, experts) experts per batch; UltraMem reads everything but
the values once per batch plus min(B*H*m, N) value rows. Divided by B.

This module imports only the standard library, so the launch scripts can call it without loading
torch or Megatron.

CLI:
    python -m megatron_ultramem.sizing --hidden-size 4096 --num-experts 8 --moe-router-topk 2 \
        --ffn-hidden-size 14336 --num-layers 32 --swiglu [--mode parallel|replace] [--json]
"""

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Union

from .patterns import parse_layer_pattern

# Defaults of UltraMemConfig's fields (tests check that they stay equal; this module must not import
# megatron.core, which config.py does).
DEFAULTS = {
    "ultramem_key_dim": 128,
    "ultramem_num_heads": 2,
    "ultramem_topm": 32,
    "ultramem_expansion": 4,
    "ultramem_tucker_rank": 2,
    "ultramem_num_cores": 2,
}

DEFAULT_BATCH_SIZES = (1, 8, 64, 512, 4096)


# ---------------------------------------------------------------------- layer patterns
def layer_pattern(value: Union[int, str, Sequence[int]], num_layers: int, name: str) -> List[int]:
    """0/1 per layer, spelled like Megatron's --moe-layer-freq (see patterns.parse_layer_pattern)."""
    return parse_layer_pattern(value, num_layers, name, allow_empty=True)


# ---------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class MoEShape:
    """A MoE model's MoE blocks (Megatron flag names in brackets)."""

    hidden_size: int  # D [--hidden-size]
    num_experts: int  # [--num-experts]
    topk: int  # k [--moe-router-topk]
    expert_ffn_hidden_size: int  # F [--moe-ffn-hidden-size, else --ffn-hidden-size]
    num_layers: int  # [--num-layers]
    gated: bool = False  # SwiGLU experts [--swiglu]
    moe_layer_freq: Union[int, str, List[int]] = 1  # [--moe-layer-freq]
    shared_expert_ffn_hidden_size: int = 0  # S [--moe-shared-expert-intermediate-size]

    @property
    def mlp_coeff(self) -> int:
        return 3 if self.gated else 2

    @property
    def layers(self) -> List[int]:
        return layer_pattern(self.moe_layer_freq, self.num_layers, "moe_layer_freq")

    @property
    def num_moe_layers(self) -> int:
        return sum(self.layers)

    def breakdown(self) -> Dict[str, int]:
        D, c = self.hidden_size, self.mlp_coeff
        return {
            "expert": c * D * self.expert_ffn_hidden_size,
            "router": D * self.num_experts,
            "shared_expert": c * D * self.shared_expert_ffn_hidden_size,
        }

    @property
    def total_params(self) -> int:
        """Per MoE layer."""
        b = self.breakdown()
        return self.num_experts * b["expert"] + b["router"] + b["shared_expert"]

    @property
    def active_params(self) -> int:
        """Per MoE layer, per token."""
        b = self.breakdown()
        return self.topk * b["expert"] + b["router"] + b["shared_expert"]

    def bytes_per_token(self, batch: int, bytes_per_param: float = 2.0) -> float:
        b = self.breakdown()
        read = (
            b["router"]
            + b["shared_expert"]
            + min(batch * self.topk, self.num_experts) * b["expert"]
        )
        return bytes_per_param * read / batch


@dataclass(frozen=True)
class UltraMemShape:
    """One memory layer (and, in mode 'parallel', the dense MLP beside it)."""

    hidden_size: int  # D
    key_dim: int  # K
    num_heads: int  # H
    num_keys: int  # n
    expansion: int  # E
    tucker_rank: int  # r
    num_cores: int  # h
    value_dim: int  # Dv
    topm: int  # m
    dense_ffn_hidden_size: int = 0  # F_d (0: no dense MLP in the slot)
    gated: bool = False

    @property
    def keys_per_side(self) -> int:
        return math.isqrt(self.expansion) * self.num_keys

    @property
    def num_values(self) -> int:
        return self.num_keys**2

    def breakdown(self) -> Dict[str, int]:
        D, K, H, E = self.hidden_size, self.key_dim, self.num_heads, self.expansion
        r, h, Dv = self.tucker_rank, self.num_cores, self.value_dim
        return {
            "query": 2 * K * D,
            "keys": 2 * H * self.keys_per_side * K * r,
            "cores": H * h * r * r,
            "layernorms": 4 * 2 * K,
            "values": self.num_values * Dv,
            "out": D * E * Dv,
            "dense_mlp": (3 if self.gated else 2) * D * self.dense_ffn_hidden_size,
        }

    @property
    def total_params(self) -> int:
        return sum(self.breakdown().values())

    @property
    def active_params(self) -> int:
        return (
            self.total_params
            - self.breakdown()["values"]
            + self.num_heads * self.topm * self.value_dim
        )

    def bytes_per_token(self, batch: int, bytes_per_param: float = 2.0) -> float:
        b = self.breakdown()
        rows = min(batch * self.num_heads * self.topm, self.num_values)
        read = self.total_params - b["values"] + rows * self.value_dim
        return bytes_per_param * read / batch


@dataclass
class Sizing:
    """The result: the MoE, the matching UltraMem layer, where it goes, and the Megatron flags."""

    mode: str
    moe: MoEShape
    ultramem: UltraMemShape
    layers: List[int]
    notes: List[str] = field(default_factory=list)

    def megatron_args(self) -> List[str]:
        """--ultramem-* flags (and --ffn-hidden-size in mode 'parallel') for Megatron-LM."""
        u = self.ultramem
        freq = self.moe.moe_layer_freq
        layers = str(freq) if not isinstance(freq, list) else "[" + ",".join(map(str, freq)) + "]"
        args = [
            "--ultramem-mode", self.mode,
            "--ultramem-layers", layers,
            "--ultramem-num-keys", str(u.num_keys),
            "--ultramem-key-dim", str(u.key_dim),
            "--ultramem-value-dim", str(u.value_dim),
            "--ultramem-expansion", str(u.expansion),
            "--ultramem-tucker-rank", str(u.tucker_rank),
            "--ultramem-num-cores", str(u.num_cores),
            "--ultramem-num-heads", str(u.num_heads),
            "--ultramem-topm", str(u.topm),
        ]  # fmt: skip
        if self.mode == "parallel":
            args += ["--ffn-hidden-size", str(u.dense_ffn_hidden_size)]
        return args

    def as_dict(self, batch_sizes=DEFAULT_BATCH_SIZES, bytes_per_param: float = 2.0) -> dict:
        L = self.moe.num_moe_layers
        return {
            "mode": self.mode,
            "moe": asdict(self.moe),
            "ultramem": asdict(self.ultramem),
            "moe_layers": L,
            "per_layer": {
                "moe": {
                    **self.moe.breakdown(),
                    "total": self.moe.total_params,
                    "active": self.moe.active_params,
                },
                "ultramem": {
                    **self.ultramem.breakdown(),
                    "total": self.ultramem.total_params,
                    "active": self.ultramem.active_params,
                },
            },
            "model": {
                "moe_total": L * self.moe.total_params,
                "moe_active": L * self.moe.active_params,
                "ultramem_total": L * self.ultramem.total_params,
                "ultramem_active": L * self.ultramem.active_params,
            },
            "bytes_per_token_per_layer": {
                str(b): {
                    "moe": self.moe.bytes_per_token(b, bytes_per_param),
                    "ultramem": self.ultramem.bytes_per_token(b, bytes_per_param),
                }
                for b in batch_sizes
            },
            "megatron_args": self.megatron_args(),
            "notes": self.notes,
        }


# ---------------------------------------------------------------------- solver
def _fixed_params(D, K, H, n, E, r, h, Dv) -> int:
    """Memory parameters other than the values (all read/activated for every token)."""
    s = math.isqrt(E)
    return 2 * K * D + 2 * H * s * n * K * r + H * h * r * r + 8 * K + D * E * Dv


def _solve_num_keys(target_total: int, D, K, H, E, r, h, Dv) -> int:
    """n with fixed(n) + n^2*Dv closest to target_total (positive root of the quadratic)."""
    s = math.isqrt(E)
    a, b = Dv, 2 * H * s * K * r
    c = 2 * K * D + H * h * r * r + 8 * K + D * E * Dv - target_total
    disc = b * b - 4 * a * c
    if c >= 0 or disc < 0:
        raise ValueError(
            f"the parameter budget {target_total:,} is smaller than a memory layer's fixed parts "
            f"({c + target_total:,}): lower --ultramem-key-dim/--ultramem-value-dim"
        )
    root = (-b + math.sqrt(disc)) / (2 * a)
    candidates = {max(1, math.floor(root)), max(1, math.ceil(root))}
    return min(
        candidates,
        key=lambda n: abs(_fixed_params(D, K, H, n, E, r, h, Dv) + n * n * Dv - target_total),
    )


def _round_to(x: float, multiple: int) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


def size_ultramem_like_moe(
    moe: MoEShape,
    mode: str = "parallel",
    *,
    key_dim: Optional[int] = None,
    num_heads: Optional[int] = None,
    topm: Optional[int] = None,
    expansion: Optional[int] = None,
    tucker_rank: Optional[int] = None,
    num_cores: Optional[int] = None,
    value_dim: Optional[int] = None,
    dense_ffn_hidden_size: Optional[int] = None,
    ffn_multiple_of: int = 64,
    max_heads: int = 1024,
) -> Sizing:
    """UltraMem layer with the total and activated parameters of one MoE layer (see module doc).

    Unset knobs take UltraMemConfig's defaults (value_dim: D/2). In mode 'parallel' the dense MLP
    size is solved (rounded to `ffn_multiple_of`) unless given; when the MoE pattern leaves dense
    layers, they share --ffn-hidden-size with the memory layers, so the dense size is fixed to the
    MoE model's --ffn-hidden-size only if the caller passes it (convert.py does).
    """
    if mode not in ("parallel", "replace"):
        raise ValueError(f"mode must be 'parallel' or 'replace', got {mode!r}")
    D = moe.hidden_size
    K = key_dim or DEFAULTS["ultramem_key_dim"]
    E = expansion or DEFAULTS["ultramem_expansion"]
    r = tucker_rank or DEFAULTS["ultramem_tucker_rank"]
    h = num_cores or DEFAULTS["ultramem_num_cores"]
    Dv = value_dim or D // 2
    if math.isqrt(E) ** 2 != E:
        raise ValueError(f"expansion (E) must be a perfect square, got {E}")
    if Dv % h:
        raise ValueError(f"value_dim (Dv={Dv}) must be divisible by num_cores (h={h})")
    c = moe.mlp_coeff
    P, A = moe.total_params, moe.active_params
    notes = []

    if mode == "parallel" and dense_ffn_hidden_size is None:
        H = num_heads or DEFAULTS["ultramem_num_heads"]
        m = topm or DEFAULTS["ultramem_topm"]
        n = max(1, round(math.sqrt((P - A) / Dv + H * m)))
        fixed = _fixed_params(D, K, H, n, E, r, h, Dv)
        F_d = (A - fixed - H * m * Dv) / (c * D)
        if F_d < ffn_multiple_of / 2:
            raise ValueError(
                f"the activated budget {A:,} leaves no room for a dense MLP beside a memory with "
                f"{fixed + H * m * Dv:,} activated parameters: use mode 'replace' or smaller "
                "--ultramem-topm/--ultramem-num-heads"
            )
        F_d = _round_to(F_d, ffn_multiple_of)
        if m > math.isqrt(E) * n:
            raise ValueError(f"topm={m} exceeds keys per side n'={math.isqrt(E) * n}")
        shape = UltraMemShape(D, K, H, n, E, r, h, Dv, m, F_d, moe.gated)
        return Sizing(mode, moe, shape, moe.layers, notes)

    F_d = dense_ffn_hidden_size if mode == "parallel" else 0
    mlp = c * D * F_d
    P_mem, A_mem = P - mlp, A - mlp
    heads = [num_heads] if num_heads else range(DEFAULTS["ultramem_num_heads"], max_heads + 1)
    for H in heads:
        n = _solve_num_keys(P_mem, D, K, H, E, r, h, Dv)
        fixed = _fixed_params(D, K, H, n, E, r, h, Dv)
        if topm:
            m = topm
        else:
            m = round((A_mem - fixed) / (H * Dv))
            if m < 1:
                raise ValueError(
                    f"the activated budget {A_mem:,} is below the memory's fixed activated parts "
                    f"({fixed + H * Dv:,} with m=1): use mode 'parallel' or smaller "
                    "--ultramem-key-dim/--ultramem-value-dim"
                )
        if m <= math.isqrt(E) * n:
            if not num_heads and H != DEFAULTS["ultramem_num_heads"]:
                notes.append(f"num_heads raised to {H} so that topm={m} <= n'={math.isqrt(E) * n}")
            shape = UltraMemShape(D, K, H, n, E, r, h, Dv, m, F_d, moe.gated)
            return Sizing(mode, moe, shape, moe.layers, notes)
        if num_heads or topm:
            break
    raise ValueError(
        f"no configuration with topm <= keys per side: the activated budget needs more value rows "
        f"than {'H=' + str(num_heads) if num_heads else 'up to ' + str(max_heads) + ' heads'} can "
        "select; raise --ultramem-num-heads or use mode 'parallel'"
    )


# ---------------------------------------------------------------------- report
def _fmt(x: float) -> str:
    return f"{x:,.0f}"


def _bytes(x: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(x) < 1024 or unit == "GiB":
            return f"{x:,.1f} {unit}" if unit != "B" else f"{x:,.0f} B"
        x /= 1024
    return f"{x:,.1f} GiB"


def report(sizing: Sizing, batch_sizes=DEFAULT_BATCH_SIZES, bytes_per_param: float = 2.0) -> str:
    moe, u = sizing.moe, sizing.ultramem
    L = moe.num_moe_layers
    lines = []
    mb = moe.breakdown()
    lines.append(
        f"MoE block ({L} of {moe.num_layers} layers): {moe.num_experts} experts x "
        f"{moe.mlp_coeff}*D*F = {_fmt(mb['expert'])}, router {_fmt(mb['router'])}"
        + (f", shared expert {_fmt(mb['shared_expert'])}" if mb["shared_expert"] else "")
    )
    lines.append(
        f"  per layer: total {_fmt(moe.total_params)}, activated/token {_fmt(moe.active_params)}"
    )
    lines.append(
        f"UltraMem (mode {sizing.mode}): D={u.hidden_size} K={u.key_dim} H={u.num_heads} "
        f"n={u.num_keys} (N={_fmt(u.num_values)} rows, n'={u.keys_per_side}) E={u.expansion} "
        f"r={u.tucker_rank} h={u.num_cores} Dv={u.value_dim} m={u.topm}"
        + (
            f", dense MLP ffn_hidden_size={u.dense_ffn_hidden_size}"
            if u.dense_ffn_hidden_size
            else ""
        )
    )
    lines.append(
        "  per layer: " + ", ".join(f"{k} {_fmt(v)}" for k, v in u.breakdown().items() if v)
    )

    def diff(a, b):
        return f"{100.0 * (a - b) / b:+.3f}%"

    total_diff = diff(u.total_params, moe.total_params)
    active_diff = diff(u.active_params, moe.active_params)
    lines.append(
        f"  per layer: total {_fmt(u.total_params)} ({total_diff} vs MoE), "
        f"activated/token {_fmt(u.active_params)} ({active_diff} vs MoE)"
    )
    lines.append(
        f"Model-wide over the {L} layers: MoE total {_fmt(L * moe.total_params)} / activated "
        f"{_fmt(L * moe.active_params)}; UltraMem total {_fmt(L * u.total_params)} / activated "
        f"{_fmt(L * u.active_params)} (attention, embeddings and dense layers unchanged)"
    )
    lines.append(
        f"Bytes read per token, one layer, {bytes_per_param:g} bytes/param (upper bound: no reuse "
        "between tokens of a batch):"
    )
    lines.append(f"  {'batch':>6}  {'MoE':>12}  {'UltraMem':>12}  {'MoE/UltraMem':>12}")
    for b in batch_sizes:
        mo, ul = moe.bytes_per_token(b, bytes_per_param), u.bytes_per_token(b, bytes_per_param)
        lines.append(f"  {b:>6}  {_bytes(mo):>12}  {_bytes(ul):>12}  {mo / ul:>12.2f}")
    for note in sizing.notes:
        lines.append(f"note: {note}")
    lines.append("Megatron-LM flags: " + " ".join(sizing.megatron_args()))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m megatron_ultramem.sizing",
        description="UltraMem configuration with the total and activated parameters of a MoE.",
    )
    p.add_argument("--hidden-size", type=int, required=True)
    p.add_argument("--num-experts", type=int, required=True)
    p.add_argument("--moe-router-topk", type=int, default=2, help="Megatron's default: 2")
    p.add_argument("--ffn-hidden-size", type=int, default=None, help="default 4 * hidden size")
    p.add_argument(
        "--moe-ffn-hidden-size", type=int, default=None, help="default --ffn-hidden-size"
    )
    p.add_argument("--num-layers", type=int, required=True)
    p.add_argument("--moe-layer-freq", default="1")
    p.add_argument("--moe-shared-expert-intermediate-size", type=int, default=0)
    p.add_argument("--swiglu", action="store_true", help="gated experts: 3*D*F each, else 2*D*F")
    p.add_argument("--mode", choices=("parallel", "replace"), default="parallel")
    p.add_argument("--ultramem-key-dim", type=int)
    p.add_argument("--ultramem-num-heads", type=int)
    p.add_argument("--ultramem-topm", type=int)
    p.add_argument("--ultramem-expansion", type=int)
    p.add_argument("--ultramem-tucker-rank", type=int)
    p.add_argument("--ultramem-num-cores", type=int)
    p.add_argument("--ultramem-value-dim", type=int)
    p.add_argument(
        "--dense-ffn-hidden-size", type=int, help="mode parallel: fix the dense MLP size"
    )
    p.add_argument("--ffn-multiple-of", type=int, default=64)
    p.add_argument("--bytes-per-param", type=float, default=2.0, help="2 for bf16")
    p.add_argument("--batch-sizes", default=",".join(map(str, DEFAULT_BATCH_SIZES)))
    p.add_argument("--json", action="store_true", help="print a JSON document instead of a report")
    return p


def moe_shape_from_args(args) -> MoEShape:
    ffn = args.ffn_hidden_size or 4 * args.hidden_size
    return MoEShape(
        hidden_size=args.hidden_size,
        num_experts=args.num_experts,
        topk=args.moe_router_topk,
        expert_ffn_hidden_size=args.moe_ffn_hidden_size or ffn,
        num_layers=args.num_layers,
        gated=args.swiglu,
        moe_layer_freq=args.moe_layer_freq,
        shared_expert_ffn_hidden_size=args.moe_shared_expert_intermediate_size or 0,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    moe = moe_shape_from_args(args)
    try:
        sizing = size_ultramem_like_moe(
            moe,
            args.mode,
            key_dim=args.ultramem_key_dim,
            num_heads=args.ultramem_num_heads,
            topm=args.ultramem_topm,
            expansion=args.ultramem_expansion,
            tucker_rank=args.ultramem_tucker_rank,
            num_cores=args.ultramem_num_cores,
            value_dim=args.ultramem_value_dim,
            dense_ffn_hidden_size=args.dense_ffn_hidden_size,
            ffn_multiple_of=args.ffn_multiple_of,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if args.json:
        print(json.dumps(sizing.as_dict(batch_sizes, args.bytes_per_param), indent=2))
    else:
        print(report(sizing, batch_sizes, args.bytes_per_param))
    return 0


if __name__ == "__main__":
    sys.exit(main())
