"""Size UltraMem layers that match a MoE model's parameters, and plan its conversion.

One code path for `python -m megatron_ultramem.sizing` (a report) and
`python -m megatron_ultramem.megatron_lm.convert` (the rewritten Megatron-LM arguments): both read
the MoE model from its Megatron flags (`moe_model_from_argv`), plan the conversion
(`plan_conversion`) and print the same flags (`Plan.megatron_args`).

Counts (ULTRAMEM.md notation; s = sqrt(E), n' = s * n, N = n^2; c = 3 for SwiGLU, 2 otherwise):
    memory:    query 2*K*D | keys 2*H*n'*K*r | cores H*h*r*r | LayerNorms 4*2*K | values N*Dv
               | out D*E*Dv; activated per token: everything but the values, plus H*m rows of Dv
    MoE block: experts * c*D*F + router D*experts (+ shared expert c*D*S, + its gate D);
               activated: top-k experts + router (+ shared expert)
Linear biases (Megatron's --add-bias-linear) are not counted; the memory has none.

Placements (`ultramem_mode`), per MoE layer of the model:
- 'parallel' (UltraMemV2): the MoE block becomes a dense MLP of F_d plus a memory beside it.
  * When every MLP layer is a MoE layer, F_d is free: with H and m fixed,
        total:     c*D*F_d + fixed(n) + n^2*Dv  = P_moe
        activated: c*D*F_d + fixed(n) + H*m*Dv  = A_moe
    give n^2 = (P_moe - A_moe)/Dv + H*m and F_d from the activated equation (rounded to a
    multiple). A shared expert is then part of that dense MLP (it is one: every token uses it).
  * When the model keeps dense layers (DeepSeek's first-k-dense, Llama-4's interleaving, a
    hybrid pattern's '-' layers), they and the memory layers share --ffn-hidden-size, so F_d is
    the dense layers' size and the memory gets the rest of the MoE block: (P - c*D*F_d,
    A - c*D*F_d), solved as in 'replace'. Recipes whose dense FFN equals the activated experts
    (DeepSeek-V3: 18432 = 9 x 2048) leave only the router's D*experts: no memory fits that, and
    the planner offers the layouts that do fit (see NoMatch).
- 'replace': the memory alone takes the MoE block's place (router, experts and shared expert):
  n from the total, m from the activated count, more heads H while m > min(n', KERNEL_MAX_M).

m is never above KERNEL_MAX_M (the Triton top-m kernels' limit, kernels/topm.py MAX_M: above it
the layer would run the slow reference path): a solved m is brought under it by more heads, a
given m above it is refused.

Expert parallelism: the value table is column-sharded over TP x EP. 'replace' keeps --num-experts,
the --moe-* flags and --expert-model-parallel-size (every MoE block is replaced, so no expert is
built, and Megatron-LM accepts EP > 1 only with --num-experts); 'parallel' needs the MoE blocks
gone, so EP is dropped and each table is sharded over TP only. The plan's notes say which, with
the value-table bytes per GPU.

Bytes read per token at decoding batch B (upper bound: no two tokens share a row or an expert): the
MoE reads the router, the shared expert and min(B*k, experts) experts per batch; a memory reads
everything but the values once per batch plus min(B*H*m, N) value rows. Divided by B. Equal
activated parameters mean equal bytes at B = 1.

Standard library only, so that the launch scripts run it without torch or Megatron.

CLI:
    python -m megatron_ultramem.sizing [--mode parallel|replace] [--ultramem-topm 64 ...] [--json] \\
        <the MoE model's Megatron flags: --hidden-size 4096 --num-layers 32 --num-experts 8 ...>
"""

import json
import math
import shlex
import sys
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

from .cli import ArgumentParser, BadInput, float_in, int_at_least, int_list, run_main
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

KERNEL_MAX_M = 1024
"""The largest m the Triton top-m kernels take (kernels/topm.py MAX_M; a test keeps them equal)."""

MAX_HEADS = 4096
DEFAULT_BATCH_SIZES = (1, 8, 64, 512, 4096)

SPEC_MODULE = "megatron_ultramem.megatron_lm"
GPT_SPEC, HYBRID_SPEC = "ultramem_block_spec", "ultramem_hybrid_stack_spec"
KNOB_FLAGS = {
    "--ultramem-key-dim": "key_dim",
    "--ultramem-num-heads": "num_heads",
    "--ultramem-topm": "topm",
    "--ultramem-expansion": "expansion",
    "--ultramem-tucker-rank": "tucker_rank",
    "--ultramem-num-cores": "num_cores",
    "--ultramem-value-dim": "value_dim",
}
"""Sizing knobs: given (as an option or in the MoE arguments) they pin that value."""


class NoFit(ValueError):
    """No memory of the requested shape matches the budget (the message says why)."""


class NoMatch(ValueError):
    """The requested layout has no solution; `options` are the layouts that do (each a Plan)."""

    def __init__(self, reason: str, options: List["Option"]):
        super().__init__(reason)
        self.reason, self.options = reason, options


# ---------------------------------------------------------------------- layer patterns
def layer_pattern(value: Union[int, str, Sequence[int]], num_layers: int, name: str) -> List[int]:
    """0/1 per layer, spelled like Megatron's --moe-layer-freq (see patterns.parse_layer_pattern)."""
    return parse_layer_pattern(value, num_layers, name, allow_empty=True)


def _pattern_text(pattern: Sequence[int]) -> str:
    return "[" + ",".join(map(str, pattern)) + "]"


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
    shared_expert_gate: bool = False  # [--moe-shared-expert-gate]: a [1, D] gate weight

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
            "shared_expert": c * D * self.shared_expert_ffn_hidden_size
            + (D if self.shared_expert_gate and self.shared_expert_ffn_hidden_size else 0),
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
    """One memory slot matched to one MoE block (size_ultramem_like_moe's result)."""

    mode: str
    moe: MoEShape
    ultramem: UltraMemShape
    layers: List[int]
    notes: List[str] = field(default_factory=list)

    def megatron_args(self) -> List[str]:
        """--ultramem-* flags (and --ffn-hidden-size in mode 'parallel') for Megatron-LM."""
        u = self.ultramem
        freq = self.moe.moe_layer_freq
        layers = str(freq) if not isinstance(freq, list) else _pattern_text(freq)
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


# ---------------------------------------------------------------------- one memory
def _fixed_params(D, K, H, n, E, r, h, Dv) -> int:
    """Memory parameters other than the values (all read/activated for every token)."""
    s = math.isqrt(E)
    return 2 * K * D + 2 * H * s * n * K * r + H * h * r * r + 8 * K + D * E * Dv


def _solve_num_keys(target_total: float, D, K, H, E, r, h, Dv) -> int:
    """n with fixed(n) + n^2*Dv closest to target_total (positive root of the quadratic)."""
    s = math.isqrt(E)
    a, b = Dv, 2 * H * s * K * r
    c = 2 * K * D + H * h * r * r + 8 * K + D * E * Dv - target_total
    disc = b * b - 4 * a * c
    if c >= 0 or disc < 0:
        raise NoFit(
            f"the parameter budget {target_total:,.0f} is smaller than a memory's fixed parts "
            f"({c + target_total:,.0f} with H={H}, K={K}, E={E}, Dv={Dv})"
        )
    root = (-b + math.sqrt(disc)) / (2 * a)
    candidates = {max(1, math.floor(root)), max(1, math.ceil(root))}
    return min(
        candidates,
        key=lambda n: abs(_fixed_params(D, K, H, n, E, r, h, Dv) + n * n * Dv - target_total),
    )


def _round_to(x: float, multiple: int) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


def _resolve(D: int, key_dim, expansion, tucker_rank, num_cores, value_dim) -> Tuple[int, ...]:
    K = key_dim or DEFAULTS["ultramem_key_dim"]
    E = expansion or DEFAULTS["ultramem_expansion"]
    r = tucker_rank or DEFAULTS["ultramem_tucker_rank"]
    h = num_cores or DEFAULTS["ultramem_num_cores"]
    Dv = value_dim or D // 2
    if math.isqrt(E) ** 2 != E:
        raise BadInput(f"--ultramem-expansion (E) must be a perfect square (1, 4, 9, 16, ...), got {E}")
    if Dv % h:
        raise BadInput(
            f"--ultramem-value-dim (Dv={Dv}) must be divisible by --ultramem-num-cores (h={h}): "
            f"allowed h are the divisors of {Dv}"
        )
    return K, E, r, h, Dv


def solve_memory(
    total: float,
    active: float,
    D: int,
    *,
    K: int,
    E: int,
    r: int,
    h: int,
    Dv: int,
    num_heads: Optional[int] = None,
    topm: Optional[int] = None,
    dense_ffn_hidden_size: int = 0,
    gated: bool = False,
) -> Tuple[UltraMemShape, List[str]]:
    """A memory with `total` parameters and `active` activated ones (the dense MLP beside it, if
    any, is already taken out of both budgets; it is only recorded in the shape).

    n comes from the total; then m from the activated count, raising H (unless given) until
    m <= min(n', KERNEL_MAX_M); with m given and H free, H is the one that matches best.
    Raises NoFit when no H works (the activated budget is below the fixed parts, or H is pinned).
    """
    s = math.isqrt(E)
    notes: List[str] = []

    def shape(H, n, m):
        return UltraMemShape(D, K, H, n, E, r, h, Dv, m, dense_ffn_hidden_size, gated)

    if topm and not num_heads:  # m pinned: the H whose activated count is closest
        best = None
        for H in range(1, MAX_HEADS + 1):
            n = _solve_num_keys(total, D, K, H, E, r, h, Dv)
            act = _fixed_params(D, K, H, n, E, r, h, Dv) + H * topm * Dv
            err = abs(act - active)
            if best is None or err < best[0]:
                best = (err, H, n)
            if act > active:
                break
        _, H, n = best
        if topm > s * n:
            raise NoFit(f"--ultramem-topm {topm} exceeds the keys per side n' = {s * n}")
        if H != DEFAULTS["ultramem_num_heads"]:
            notes.append(f"num_heads solved to {H} for the activated budget at topm={topm}")
        return shape(H, n, topm), notes
    heads = [num_heads] if num_heads else range(DEFAULTS["ultramem_num_heads"], MAX_HEADS + 1)
    reason = ""
    for H in heads:
        n = _solve_num_keys(total, D, K, H, E, r, h, Dv)
        fixed = _fixed_params(D, K, H, n, E, r, h, Dv)
        m = topm or round((active - fixed) / (H * Dv))
        if m < 1:
            raise NoFit(
                f"the activated budget {active:,.0f} is below a memory's fixed activated parts "
                f"({fixed + H * Dv:,} at H={H}, m=1: query 2*K*D, keys 2*H*n'*K*r, out D*E*Dv)"
            )
        limit = min(s * n, KERNEL_MAX_M)
        if m <= limit:
            if not num_heads and H != DEFAULTS["ultramem_num_heads"]:
                notes.append(
                    f"num_heads raised to {H} so that topm={m} <= min(n'={s * n}, the kernels' "
                    f"{KERNEL_MAX_M})"
                )
            return shape(H, n, m), notes
        reason = (
            f"topm would be {m}, above min(n'={s * n}, the Triton kernels' limit {KERNEL_MAX_M})"
        )
        if num_heads or topm:
            break
    pinned = f"--ultramem-num-heads {num_heads}" if num_heads else f"up to {MAX_HEADS} heads"
    raise NoFit(f"no memory with {pinned} fits: {reason}; raise --ultramem-num-heads")


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
    max_heads: int = MAX_HEADS,  # kept for callers; the solver's bound is MAX_HEADS
) -> Sizing:
    """One memory slot with the total and activated parameters of one MoE block (module doc).

    Mode 'parallel' with `dense_ffn_hidden_size` None solves F_d (H, m fixed: given or the
    defaults); with it given, the memory takes the rest of the block as in 'replace'.
    Raises NoFit (a ValueError) when nothing fits.
    """
    if mode not in ("parallel", "replace"):
        raise BadInput(f"--mode must be 'parallel' or 'replace', got {mode!r}")
    D, c = moe.hidden_size, moe.mlp_coeff
    K, E, r, h, Dv = _resolve(D, key_dim, expansion, tucker_rank, num_cores, value_dim)
    P, A = moe.total_params, moe.active_params
    if topm and topm > KERNEL_MAX_M:
        raise BadInput(
            f"--ultramem-topm {topm} is above the Triton kernels' limit (m <= {KERNEL_MAX_M}, "
            f"kernels/topm.py MAX_M; the layer would fall back to the reference path): allowed "
            f"1..{KERNEL_MAX_M}"
        )

    if mode == "parallel" and dense_ffn_hidden_size is None:
        H = num_heads or DEFAULTS["ultramem_num_heads"]
        m = topm or DEFAULTS["ultramem_topm"]
        n = max(1, round(math.sqrt(max(0.0, (P - A) / Dv + H * m))))
        fixed = _fixed_params(D, K, H, n, E, r, h, Dv)
        F_d = (A - fixed - H * m * Dv) / (c * D)
        if F_d < ffn_multiple_of / 2:
            raise NoFit(
                f"the activated budget {A:,} leaves no room for a dense MLP beside a memory with "
                f"{fixed + H * m * Dv:,} activated parameters (H={H}, m={m})"
            )
        if m > min(math.isqrt(E) * n, KERNEL_MAX_M):
            raise NoFit(
                f"topm={m} exceeds min(keys per side n'={math.isqrt(E) * n}, {KERNEL_MAX_M})"
            )
        shape = UltraMemShape(D, K, H, n, E, r, h, Dv, m, _round_to(F_d, ffn_multiple_of), moe.gated)
        return Sizing(mode, moe, shape, moe.layers, [])

    F_d = dense_ffn_hidden_size if mode == "parallel" else 0
    mlp = c * D * F_d
    shape, notes = solve_memory(
        P - mlp, A - mlp, D, K=K, E=E, r=r, h=h, Dv=Dv, num_heads=num_heads, topm=topm,
        dense_ffn_hidden_size=F_d, gated=moe.gated,
    )  # fmt: skip
    return Sizing(mode, moe, shape, moe.layers, notes)


# ---------------------------------------------------------------------- the MoE model
def split_flags(argv: Sequence[str]) -> List[Tuple[str, List[str]]]:
    """[(flag, [values])] in order; `--flag=value` becomes ('--flag', ['value']). Tokens before the
    first flag come as ('', [tokens]). A token starting with '--' is a flag unless it is a number."""
    items: List[Tuple[str, List[str]]] = []
    for token in argv:
        if _is_flag(token):
            if "=" in token:
                flag, value = token.split("=", 1)
                items.append((flag, [value]))
            else:
                items.append((token, []))
        elif items:
            items[-1][1].append(token)
        else:
            items.append(("", [token]))
    return items


def _is_flag(token: str) -> bool:
    if not token.startswith("--") or token == "--":
        return False
    try:
        float(token)
        return False
    except ValueError:
        return True


def _last(items, flag, default=None):
    """The last value of `flag` (True for a flag given without a value), or `default`."""
    values = [v for f, v in items if f == flag]
    if not values:
        return default
    return values[-1][0] if values[-1] else True


def _int_flag(items, flag: str, default=None, minimum: int = 1, required: bool = False):
    value = _last(items, flag)
    if value is None:
        if required:
            raise BadInput(f"the MoE arguments have no {flag}: it is required (an integer >= {minimum})")
        return default
    if value is True:
        raise BadInput(f"{flag} needs a value: an integer >= {minimum}")
    try:
        number = int(value)
    except ValueError:
        raise BadInput(f"{flag} {value!r}: expected an integer >= {minimum}") from None
    if number < minimum:
        raise BadInput(f"{flag} {number}: expected an integer >= {minimum}")
    return number


@dataclass(frozen=True)
class MoEModel:
    """A MoE model's MLP slots and parallel layout, read from its Megatron-LM arguments."""

    moe: MoEShape  # one MoE block; moe.moe_layer_freq is the 0/1 list of MoE layers
    ffn_hidden_size: int  # --ffn-hidden-size: the dense MLPs
    dense_layers: Tuple[int, ...]  # 0/1 per layer: a dense MLP (GPT: the non-MoE layers; hybrid: '-')
    layer_freq_text: str = "1"  # --moe-layer-freq as given
    hybrid_pattern: Optional[str] = None  # --hybrid-layer-pattern as given (None: GPTModel)
    hybrid_flag: str = "--hybrid-layer-pattern"  # or --hybrid-override-pattern, as given
    tensor_parallel: int = 1
    expert_parallel: int = 1
    expert_tensor_parallel: Optional[int] = None
    pipeline_parallel: int = 1
    mtp_layers: int = 0

    @property
    def moe_layers(self) -> List[int]:
        return list(self.moe.moe_layer_freq)

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layers)

    @property
    def num_dense_layers(self) -> int:
        return sum(self.dense_layers)


HYBRID_FLAGS = ("--hybrid-layer-pattern", "--hybrid-override-pattern")


def moe_model_from_argv(argv: Sequence[str]) -> MoEModel:
    """The MoE model described by Megatron-LM arguments (Megatron's defaults where absent).

    Raises BadInput naming the flag for a missing or malformed value.
    """
    items = split_flags(argv)
    D = _int_flag(items, "--hidden-size", required=True)
    if _last(items, "--num-experts") is None:
        raise BadInput(
            "the arguments have no --num-experts: not a MoE model, nothing to convert (a dense GPT "
            "takes memories with --ultramem-mode parallel --ultramem-layers ... directly)"
        )
    experts = _int_flag(items, "--num-experts", minimum=1)
    topk = _int_flag(items, "--moe-router-topk", default=2)
    if topk > experts:
        raise BadInput(f"--moe-router-topk {topk}: expected an integer in 1..{experts} (--num-experts)")
    ffn = _int_flag(items, "--ffn-hidden-size", default=4 * D)
    expert_ffn = _int_flag(items, "--moe-ffn-hidden-size", default=ffn)
    shared = _int_flag(items, "--moe-shared-expert-intermediate-size", default=0, minimum=0)
    parallel = {
        flag: _int_flag(items, flag, default=1)
        for flag in ("--tensor-model-parallel-size", "--expert-model-parallel-size",
                     "--pipeline-model-parallel-size")
    }  # fmt: skip
    etp = _int_flag(items, "--expert-tensor-parallel-size", default=None)
    mtp = _int_flag(items, "--mtp-num-layers", default=0, minimum=0)
    gated = bool(_last(items, "--swiglu", False))

    hybrid_flag = next((f for f in HYBRID_FLAGS if _last(items, f) is not None), None)
    if hybrid_flag:
        pattern = _last(items, hybrid_flag)
        if pattern is True or not pattern:
            raise BadInput(f"{hybrid_flag} needs a value: a layer pattern such as \"M*EM*E\"")
        main = pattern.split("/")[0].replace("|", "")
        layers = _int_flag(items, "--num-layers", default=len(main))
        if len(main) != layers:
            raise BadInput(
                f"{hybrid_flag} {pattern!r} has {len(main)} layers but --num-layers is {layers}: "
                "give one symbol per layer"
            )
        moe_layers = [1 if s == "E" else 0 for s in main]
        dense = tuple(1 if s == "-" else 0 for s in main)
        if not any(moe_layers):
            raise BadInput(f"{hybrid_flag} {pattern!r} has no E (MoE) layer: nothing to convert")
        freq_text = "1"
    else:
        layers = _int_flag(items, "--num-layers", required=True)
        freq = _last(items, "--moe-layer-freq", "1")
        if freq is True:
            raise BadInput("--moe-layer-freq needs a value: an int N or a pattern like \"[0]*3+[1]*58\"")
        try:
            moe_layers = layer_pattern(int(freq) if freq.strip().isdigit() else freq, layers,
                                       "--moe-layer-freq")  # fmt: skip
        except ValueError as err:
            raise BadInput(str(err)) from None
        if not any(moe_layers):
            raise BadInput(f"--moe-layer-freq {freq!r} selects no MoE layer: nothing to convert")
        dense = tuple(1 - x for x in moe_layers)
        freq_text = freq
        pattern = None
    moe = MoEShape(
        hidden_size=D, num_experts=experts, topk=topk, expert_ffn_hidden_size=expert_ffn,
        num_layers=layers, gated=gated, moe_layer_freq=moe_layers,
        shared_expert_ffn_hidden_size=shared,
        shared_expert_gate=bool(_last(items, "--moe-shared-expert-gate", False)),
    )  # fmt: skip
    return MoEModel(
        moe=moe, ffn_hidden_size=ffn, dense_layers=dense, layer_freq_text=freq_text,
        hybrid_pattern=pattern, hybrid_flag=hybrid_flag or HYBRID_FLAGS[0], tensor_parallel=parallel["--tensor-model-parallel-size"],
        expert_parallel=parallel["--expert-model-parallel-size"], expert_tensor_parallel=etp,
        pipeline_parallel=parallel["--pipeline-model-parallel-size"], mtp_layers=mtp,
    )  # fmt: skip


def knobs_from_argv(argv: Sequence[str]) -> Dict[str, int]:
    """--ultramem-* sizing knobs found in Megatron-LM arguments (they pin those values)."""
    items = split_flags(argv)
    return {
        key: _int_flag(items, flag)
        for flag, key in KNOB_FLAGS.items()
        if _last(items, flag) is not None
    }


# ---------------------------------------------------------------------- the plan
@dataclass
class Plan:
    """How a MoE model becomes an UltraMem model: one memory slot shape, where the slots go, and
    what happens to the MoE flags. `megatron_args()` is what sizing prints and convert appends."""

    model: MoEModel
    mode: str
    memory: UltraMemShape  # one slot (mode 'parallel': the memory + its dense MLP of F_d)
    memory_layers: List[int]  # 0/1 per decoder layer
    ffn_hidden_size: int  # --ffn-hidden-size after the conversion
    keep_moe_flags: bool  # 'replace': --num-experts, --moe-*, EP stay
    drop_etp: bool = False
    notes: List[str] = field(default_factory=list)

    @property
    def ultramem(self) -> UltraMemShape:
        return self.memory

    @property
    def moe(self) -> MoEShape:
        return self.model.moe

    @property
    def num_memories(self) -> int:
        return sum(self.memory_layers)

    @property
    def shards(self) -> int:
        """Ranks each value table's columns are split over (TP x EP when EP is kept)."""
        ep = self.model.expert_parallel if self.keep_moe_flags else 1
        return self.model.tensor_parallel * ep

    @property
    def hybrid_pattern(self) -> Optional[str]:
        """--hybrid-layer-pattern after the conversion ('parallel': former E layers become '-')."""
        pattern = self.model.hybrid_pattern
        if pattern is None or self.mode == "replace":
            return pattern
        return pattern.replace("E", "-")

    @property
    def layers_text(self) -> str:
        """--ultramem-layers: the MoE pattern as given when the memories sit on every MoE layer."""
        if self.model.hybrid_pattern is not None:
            if self.mode == "replace" and self.memory_layers == self.model.moe_layers:
                return "1"  # read over the pattern: every E layer
            if self.mode == "parallel" and not any(self.model.dense_layers) and \
                    self.memory_layers == self.model.moe_layers:  # fmt: skip
                return "1"  # every '-' layer of the rewritten pattern is a former E layer
            return _pattern_text(self.memory_layers)
        if self.memory_layers == self.model.moe_layers:
            return self.model.layer_freq_text
        return _pattern_text(self.memory_layers)

    def megatron_args(self) -> List[str]:
        """The flags that make the converted model: --spec, --ultramem-*, in mode 'parallel'
        --ffn-hidden-size, and a hybrid model's pattern (mode 'parallel': E turned into '-')."""
        u = self.memory
        spec = HYBRID_SPEC if self.model.hybrid_pattern is not None else GPT_SPEC
        args = [
            "--spec", SPEC_MODULE, spec,
            "--ultramem-mode", self.mode,
            "--ultramem-layers", self.layers_text,
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
            args += ["--ffn-hidden-size", str(self.ffn_hidden_size)]
        if self.model.hybrid_pattern is not None:
            args += [self.model.hybrid_flag, self.hybrid_pattern]
        return args

    # model-wide numbers over the former MoE layers (attention, embeddings, dense layers unchanged)
    def _mlp_only(self) -> int:
        """Parameters of a former MoE layer without a memory (mode 'parallel': its dense MLP)."""
        if self.mode != "parallel":
            return 0
        return self.model.moe.mlp_coeff * self.model.moe.hidden_size * self.ffn_hidden_size

    def totals(self) -> Dict[str, int]:
        moe, L, M = self.model.moe, self.model.num_moe_layers, self.num_memories
        rest = (L - M) * self._mlp_only()
        return {
            "moe_total": L * moe.total_params,
            "moe_active": L * moe.active_params,
            "ultramem_total": M * self.memory.total_params + rest,
            "ultramem_active": M * self.memory.active_params + rest,
        }

    def bytes_per_token(self, batch: int, bytes_per_param: float = 2.0) -> Dict[str, float]:
        """Bytes one token reads at decoding batch `batch`, summed over the former MoE layers."""
        L, M = self.model.num_moe_layers, self.num_memories
        rest = (L - M) * bytes_per_param * self._mlp_only() / batch
        return {
            "moe": L * self.model.moe.bytes_per_token(batch, bytes_per_param),
            "ultramem": M * self.memory.bytes_per_token(batch, bytes_per_param) + rest,
        }

    def value_bytes_per_gpu(self, bytes_per_param: float = 2.0) -> float:
        """Value-table bytes on one GPU: the tables split over TP (x EP) and PP stages (even)."""
        total = self.num_memories * self.memory.num_values * self.memory.value_dim
        return bytes_per_param * total / (self.shards * self.model.pipeline_parallel)

    def as_dict(self, batch_sizes=DEFAULT_BATCH_SIZES, bytes_per_param: float = 2.0) -> dict:
        moe, u = self.model.moe, self.memory
        return {
            "mode": self.mode,
            "moe": asdict(moe),
            "ultramem": asdict(u),
            "moe_layers": self.model.num_moe_layers,
            "memory_layers": self.memory_layers,
            "per_layer": {
                "moe": {**moe.breakdown(), "total": moe.total_params, "active": moe.active_params},
                "ultramem": {**u.breakdown(), "total": u.total_params, "active": u.active_params},
            },
            "model": self.totals(),
            "bytes_per_token": {str(b): self.bytes_per_token(b, bytes_per_param) for b in batch_sizes},
            "bytes_per_token_per_layer": {
                str(b): {
                    "moe": moe.bytes_per_token(b, bytes_per_param),
                    "ultramem": u.bytes_per_token(b, bytes_per_param),
                }
                for b in batch_sizes
            },
            "value_bytes_per_gpu": self.value_bytes_per_gpu(bytes_per_param),
            "megatron_args": self.megatron_args(),
            "notes": self.notes,
        }


@dataclass
class Option:
    """A layout that fits when the requested one does not: the plan, and the sizing/convert
    options that select it."""

    label: str
    plan: Plan
    choose: List[str]


def _pick_cores_and_dv(D: int, knobs: Dict, shards: int, with_ep: bool, notes: List[str]) -> Tuple[int, int]:
    """h and Dv that the TP (x EP) column sharding accepts; refuses given ones that do not."""
    h = knobs.get("num_cores")
    Dv = knobs.get("value_dim")
    where = "--tensor-model-parallel-size" + (" x --expert-model-parallel-size" if with_ep else "")
    if h is None:
        h = DEFAULTS["ultramem_num_cores"]
        if shards % h and h % shards:
            h = 1
            notes.append(f"num_cores set to 1: h=2 and the {shards} table shards must divide one another")
    elif shards % h and h % shards:
        raise BadInput(
            f"--ultramem-num-cores {h} and the {shards} value-table shards ({where}) must divide "
            "one another, so that each rank holds whole Tucker-core slices: allowed h divide or "
            f"are multiples of {shards}"
        )
    step = shards * h // math.gcd(shards, h)
    if Dv is None:
        Dv = D // 2
        if Dv % step:
            Dv = max(step, Dv // step * step)
            notes.append(f"value_dim {D // 2} rounded to {Dv}, a multiple of {step} (h={h}, {shards} shards)")
    elif Dv % step:
        raise BadInput(
            f"--ultramem-value-dim {Dv} must be divisible by --ultramem-num-cores ({h}) and by the "
            f"{shards} value-table shards ({where}): allowed Dv are multiples of {step}"
        )
    return h, Dv


def _check_knobs(knobs: Dict) -> None:
    for key, value in knobs.items():
        flag = "--" + ("dense-ffn-hidden-size" if key == "dense_ffn_hidden_size" else
                       "ultramem-" + key.replace("_", "-"))  # fmt: skip
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise BadInput(f"{flag} {value!r}: expected an integer >= 1")
    E = knobs.get("expansion")
    if E and math.isqrt(E) ** 2 != E:
        raise BadInput(f"--ultramem-expansion {E}: E must be a perfect square (1, 4, 9, 16, ...)")
    m = knobs.get("topm")
    if m and m > KERNEL_MAX_M:
        raise BadInput(
            f"--ultramem-topm {m} is above the Triton kernels' limit (kernels/topm.py MAX_M; the "
            f"layer would fall back to the reference path): allowed 1..{KERNEL_MAX_M}"
        )


def plan_conversion(
    model: MoEModel,
    mode: str = "parallel",
    knobs: Optional[Dict[str, int]] = None,
    *,
    moe_layers_per_memory: int = 1,
    ffn_multiple_of: int = 64,
    offer_options: bool = True,
) -> Plan:
    """The UltraMem model with the MoE model's total and activated parameters (module doc).

    `knobs`: key_dim, num_heads, topm, expansion, tucker_rank, num_cores, value_dim,
    dense_ffn_hidden_size. `moe_layers_per_memory` J > 1 (mode 'parallel' with the dense MLP size
    fixed): one memory per J MoE layers with their pooled budget, the others a dense MLP only.
    Raises BadInput for a bad knob, NoMatch (with the layouts that fit) when nothing of the
    requested layout matches.
    """
    if mode not in ("parallel", "replace"):
        raise BadInput(f"--mode {mode!r}: allowed parallel, replace (skip units do not map to MoE blocks)")
    knobs = dict(knobs or {})
    _check_knobs(knobs)
    moe, D = model.moe, model.moe.hidden_size
    L = model.num_moe_layers
    notes: List[str] = []
    keep = mode == "replace"
    shards = model.tensor_parallel * (model.expert_parallel if keep else 1)
    h, Dv = _pick_cores_and_dv(D, knobs, shards, keep, notes)
    K, E, r, h, Dv = _resolve(D, knobs.get("key_dim"), knobs.get("expansion"),
                              knobs.get("tucker_rank"), h, Dv)  # fmt: skip
    J = moe_layers_per_memory
    if J < 1 or L % J:
        raise BadInput(
            f"--moe-layers-per-memory {J}: expected a divisor of the {L} MoE layers "
            f"({', '.join(str(d) for d in range(1, L + 1) if L % d == 0)})"
        )

    pinned = knobs.get("dense_ffn_hidden_size")
    if mode == "replace" and pinned:
        raise BadInput("--dense-ffn-hidden-size applies to mode parallel only (replace has no dense MLP in the slot)")
    if mode == "parallel" and pinned is None and model.num_dense_layers:
        pinned = model.ffn_hidden_size  # dense layers keep their FFN, and the memory slots share it
    if J > 1 and (mode != "parallel" or pinned is None):
        raise BadInput(
            "--moe-layers-per-memory > 1 needs mode parallel with the dense MLP size fixed (dense "
            "layers in the model, or --dense-ffn-hidden-size)"
        )
    common = dict(key_dim=K, expansion=E, tucker_rank=r, num_cores=h, value_dim=Dv,
                  num_heads=knobs.get("num_heads"), topm=knobs.get("topm"))  # fmt: skip
    memory_layers = model.moe_layers
    try:
        if mode == "parallel" and pinned is None:
            sized = size_ultramem_like_moe(moe, "parallel", ffn_multiple_of=ffn_multiple_of, **common)
            u, solver_notes = sized.ultramem, sized.notes
            ffn = u.dense_ffn_hidden_size
            if moe.shared_expert_ffn_hidden_size:
                notes.append(
                    f"the shared expert (S={moe.shared_expert_ffn_hidden_size}) is a dense MLP every "
                    f"token uses: it is part of the dense MLP beside each memory (F_d={ffn})"
                )
        else:
            F_d = pinned if mode == "parallel" else 0
            mlp = moe.mlp_coeff * D * F_d
            u, solver_notes = solve_memory(
                J * (moe.total_params - mlp), J * (moe.active_params - mlp), D, K=K, E=E, r=r, h=h,
                Dv=Dv, num_heads=knobs.get("num_heads"), topm=knobs.get("topm"),
                dense_ffn_hidden_size=F_d, gated=moe.gated,
            )  # fmt: skip
            ffn = pinned if mode == "parallel" else model.ffn_hidden_size
            if J > 1:
                idx = [i for i, x in enumerate(model.moe_layers) if x]
                chosen = set(idx[::J])
                memory_layers = [1 if i in chosen else 0 for i in range(moe.num_layers)]
                notes.append(
                    f"one memory per {J} MoE layers ({len(chosen)} memories, each with the budget "
                    f"of {J} MoE blocks); the other former MoE layers keep only the dense MLP"
                )
            if mode == "parallel":
                notes.append(
                    f"dense layers keep --ffn-hidden-size {ffn}, and the memory layers' dense MLP "
                    f"shares it (Megatron has one --ffn-hidden-size): each memory gets the MoE "
                    f"block minus that MLP"
                    + (", the shared expert included" if moe.shared_expert_ffn_hidden_size else "")
                )
            elif moe.shared_expert_ffn_hidden_size:
                notes.append(
                    f"the memory replaces the whole MoE block: router, experts and the shared "
                    f"expert (S={moe.shared_expert_ffn_hidden_size}) are in its budget"
                )
    except NoFit as err:
        options = _options(model, mode, knobs, J, ffn_multiple_of) if offer_options else []
        raise NoMatch(f"no UltraMem layout of mode {mode} matches: {err}", options) from None
    notes = solver_notes + notes
    plan = Plan(model, mode, u, memory_layers, ffn, keep_moe_flags=keep, notes=notes)
    _layout_notes(plan)
    return plan


def _layout_notes(plan: Plan) -> None:
    model, notes = plan.model, plan.notes
    t, e = model.tensor_parallel, model.expert_parallel
    gib = plan.value_bytes_per_gpu() / 2**30
    if plan.keep_moe_flags:
        notes.append(
            "--num-experts and the --moe-* flags stay (every MoE block is replaced, so no expert "
            "is built)"
            + (f"; expert parallelism kept: --expert-model-parallel-size {e} splits each value "
               f"table's {plan.memory.value_dim} columns over TP x EP = {t} x {e} ranks"
               if e > 1 else "")  # fmt: skip
        )
        etp = model.expert_tensor_parallel
        if etp is not None and etp != t:
            plan.drop_etp = True
            notes.append(
                f"--expert-tensor-parallel-size {etp} dropped: UltraMem needs it equal to "
                f"--tensor-model-parallel-size ({t}), its Megatron default"
            )
    elif e > 1:
        notes.append(
            f"--expert-model-parallel-size {e} dropped (Megatron-LM allows EP > 1 only with "
            f"--num-experts, and mode parallel needs the MoE blocks gone): the data-parallel size "
            f"is unchanged, each value table is split over TP = {t} only, {e}x the per-GPU "
            "share with EP; --mode replace keeps EP"
        )
    notes.append(
        f"value tables: {plan.num_memories} x {plan.memory.num_values:,} rows x "
        f"{plan.memory.value_dim} = {plan.num_memories * plan.memory.num_values * plan.memory.value_dim:,} "
        f"parameters, {gib:,.2f} GiB in bf16 per GPU at {plan.shards}-way column split and "
        f"{model.pipeline_parallel} pipeline stage(s) (optimizer state not included)"
    )
    if model.hybrid_pattern is not None:
        notes.append(
            "HybridModel: the spec is ultramem_hybrid_stack_spec (megatron-core 0.19+, "
            "pretrain_hybrid.py or python -m megatron_ultramem.pretrain)"
            + ("; E layers become '-' (dense MLP + memory)" if plan.mode == "parallel" else "")
        )
    if model.mtp_layers:
        notes.append(
            f"--mtp-num-layers {model.mtp_layers}: the MTP layers are not converted and not counted "
            + ("(they stay MoE layers)" if plan.keep_moe_flags else
               f"(their MoE block becomes a dense MLP of {plan.ffn_hidden_size})")  # fmt: skip
        )


def _options(model: MoEModel, mode: str, knobs: Dict, J: int, multiple: int) -> List[Option]:
    """Layouts that fit when the requested one does not, each solved by plan_conversion."""
    D = model.moe.hidden_size
    out: List[Option] = []
    seen = set()

    def attempt(label, new_mode, new_knobs, per_memory=1, choose=()):
        try:
            plan = plan_conversion(model, new_mode, new_knobs, moe_layers_per_memory=per_memory,
                                   ffn_multiple_of=multiple, offer_options=False)  # fmt: skip
        except (NoMatch, BadInput):
            return False
        key = (plan.mode, plan.memory, tuple(plan.memory_layers))
        if key not in seen:
            seen.add(key)
            out.append(Option(label, plan, list(choose)))
        return True

    base = {k: v for k, v in knobs.items() if k != "dense_ffn_hidden_size"}
    if mode == "parallel":
        attempt("the memory takes the whole MoE block's place (mode replace)", "replace", base,
                choose=["--mode", "replace"])  # fmt: skip
        wide = dict(base, value_dim=D)
        attempt(f"mode replace with wider value rows (Dv = D = {D}: fewer rows, fewer heads)",
                "replace", wide, choose=["--mode", "replace", "--ultramem-value-dim", str(D)])  # fmt: skip
        L = model.num_moe_layers
        pinned = knobs.get("dense_ffn_hidden_size") or (model.num_dense_layers and model.ffn_hidden_size)
        if pinned:
            for j in (d for d in range(max(2, J + 1), L + 1) if L % d == 0):
                if attempt(f"fewer, larger memories: one per {j} MoE layers", "parallel", knobs, j,
                           ["--moe-layers-per-memory", str(j)]):  # fmt: skip
                    break
            K0 = knobs.get("key_dim") or DEFAULTS["ultramem_key_dim"]
            Dv0 = knobs.get("value_dim") or D // 2
            for K, Dv in ((K0 // 2, Dv0), (K0 // 2, Dv0 // 2), (K0 // 4, Dv0 // 4),
                          (K0 // 4, Dv0 // 8), (K0 // 8, Dv0 // 16)):  # fmt: skip
                if K < 8 or Dv < 16:
                    continue
                small = dict(knobs, key_dim=K, value_dim=Dv)
                if attempt(f"a smaller memory per layer (K={K}, Dv={Dv})", "parallel", small, J,
                           ["--ultramem-key-dim", str(K), "--ultramem-value-dim", str(Dv)]):  # fmt: skip
                    break
    else:
        if "num_heads" in knobs or "topm" in knobs:
            free = {k: v for k, v in base.items() if k not in ("num_heads", "topm")}
            attempt("mode replace with H and m solved", "replace", free,
                    choose=["(drop --ultramem-num-heads / --ultramem-topm)"])  # fmt: skip
        attempt(f"wider value rows (Dv = D = {D})", "replace", dict(base, value_dim=D),
                choose=["--ultramem-value-dim", str(D)])  # fmt: skip
        attempt("mode parallel", "parallel", base, choose=["--mode", "parallel"])
    return out


# ---------------------------------------------------------------------- report
def _fmt(x: float) -> str:
    return f"{x:,.0f}"


def _bytes(x: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(x) < 1024 or unit == "GiB":
            return f"{x:,.1f} {unit}" if unit != "B" else f"{x:,.0f} B"
        x /= 1024
    return f"{x:,.1f} GiB"


def _diff(a: float, b: float) -> str:
    return f"{100.0 * (a - b) / b:+.3f}%"


def _layer_ranges(pattern: Sequence[int]) -> str:
    """[0,0,0,1,1,1] -> '3-5'; [0,1]*4 -> '1-7 step 2'."""
    idx = [i for i, x in enumerate(pattern) if x]
    steps = {b - a for a, b in zip(idx, idx[1:])}
    if len(idx) > 2 and len(steps) == 1 and steps != {1}:
        return f"{idx[0]}-{idx[-1]} step {steps.pop()}"
    out, start = [], None
    for i, x in enumerate(list(pattern) + [0]):
        if x and start is None:
            start = i
        if not x and start is not None:
            out.append(f"{start}" if start == i - 1 else f"{start}-{i - 1}")
            start = None
    return ",".join(out) or "none"


def _moe_lines(model: MoEModel) -> List[str]:
    moe = model.moe
    mb = moe.breakdown()
    kind = f"hybrid pattern {model.hybrid_pattern!r}" if model.hybrid_pattern else "GPT"
    dense = (
        f"; {model.num_dense_layers} dense (layers {_layer_ranges(model.dense_layers)}, "
        f"--ffn-hidden-size {model.ffn_hidden_size})"
        if model.num_dense_layers
        else ""
    )
    return [
        f"MoE model ({kind}): {moe.num_layers} layers, {model.num_moe_layers} MoE (layers "
        f"{_layer_ranges(model.moe_layers)}){dense}; D={moe.hidden_size}, "
        f"{'SwiGLU' if moe.gated else 'non-gated'} MLPs",
        f"MoE block: {moe.num_experts} experts x {moe.mlp_coeff}*D*F (F={moe.expert_ffn_hidden_size}) = "
        f"{_fmt(mb['expert'])}, router {_fmt(mb['router'])}"
        + (f", shared expert {_fmt(mb['shared_expert'])} (S={moe.shared_expert_ffn_hidden_size})"
           if mb["shared_expert"] else "")  # fmt: skip
        + f"; top-{moe.topk}",
        f"  per MoE layer: total {_fmt(moe.total_params)}, activated/token {_fmt(moe.active_params)}",
    ]


def _plan_lines(plan: Plan, batch_sizes, bytes_per_param: float, brief: bool = False) -> List[str]:
    u, moe = plan.memory, plan.model.moe
    lines = [
        f"UltraMem (mode {plan.mode}, memories in layers {_layer_ranges(plan.memory_layers)}): "
        f"D={u.hidden_size} K={u.key_dim} H={u.num_heads} n={u.num_keys} (N={_fmt(u.num_values)} "
        f"rows, n'={u.keys_per_side}) E={u.expansion} r={u.tucker_rank} h={u.num_cores} "
        f"Dv={u.value_dim} m={u.topm}"
        + (f", dense MLP ffn_hidden_size={u.dense_ffn_hidden_size}" if u.dense_ffn_hidden_size else ""),
    ]
    if not brief:
        lines.append(
            "  per memory: " + ", ".join(f"{k} {_fmt(v)}" for k, v in u.breakdown().items() if v)
        )
    if plan.num_memories == plan.model.num_moe_layers:
        lines.append(
            f"  per layer: total {_fmt(u.total_params)} ({_diff(u.total_params, moe.total_params)} "
            f"vs MoE), activated/token {_fmt(u.active_params)} "
            f"({_diff(u.active_params, moe.active_params)} vs MoE)"
        )
    t = plan.totals()
    lines.append(
        f"Model-wide over the {plan.model.num_moe_layers} MoE layers: MoE total {_fmt(t['moe_total'])}"
        f" / activated {_fmt(t['moe_active'])}; UltraMem total {_fmt(t['ultramem_total'])} "
        f"({_diff(t['ultramem_total'], t['moe_total'])}) / activated {_fmt(t['ultramem_active'])} "
        f"({_diff(t['ultramem_active'], t['moe_active'])}); attention, embeddings and dense "
        "layers unchanged"
    )
    if brief:
        b1 = plan.bytes_per_token(1, bytes_per_param)
        lines.append(
            f"  bytes per token at batch 1: MoE {_bytes(b1['moe'])}, UltraMem {_bytes(b1['ultramem'])}"
        )
        return lines
    lines.append(
        f"Bytes read per token over those layers, {bytes_per_param:g} bytes/param (upper bound: no "
        "reuse between tokens of a batch):"
    )
    lines.append(f"  {'batch':>6}  {'MoE':>12}  {'UltraMem':>12}  {'MoE/UltraMem':>12}")
    for b in batch_sizes:
        x = plan.bytes_per_token(b, bytes_per_param)
        lines.append(
            f"  {b:>6}  {_bytes(x['moe']):>12}  {_bytes(x['ultramem']):>12}  "
            f"{x['moe'] / x['ultramem']:>12.2f}"
        )
    return lines


def report(plan: Plan, batch_sizes=DEFAULT_BATCH_SIZES, bytes_per_param: float = 2.0) -> str:
    lines = _moe_lines(plan.model) + _plan_lines(plan, batch_sizes, bytes_per_param)
    lines += [f"note: {note}" for note in plan.notes]
    lines.append("Megatron-LM flags: " + shlex.join(plan.megatron_args()))
    return "\n".join(lines)


def options_report(model: MoEModel, err: NoMatch, bytes_per_param: float = 2.0) -> str:
    lines = _moe_lines(model) + [f"{err.reason}."]
    if not err.options:
        lines.append("No other layout fits either: lower --ultramem-key-dim / --ultramem-value-dim.")
        return "\n".join(lines)
    lines.append(f"Layouts that fit ({len(err.options)}); select one with the options shown:")
    for i, option in enumerate(err.options, 1):
        lines.append(f"[{i}] {option.label}: {' '.join(option.choose)}")
        lines += ["    " + line for line in _plan_lines(option.plan, (1,), bytes_per_param, brief=True)]
        lines.append("    Megatron-LM flags: " + shlex.join(option.plan.megatron_args()))
    return "\n".join(lines)


# ---------------------------------------------------------------------- CLI (shared with convert)
MOE_FLAGS_READ = (
    "--hidden-size, --num-layers, --num-experts, --moe-router-topk, --ffn-hidden-size, "
    "--moe-ffn-hidden-size, --moe-layer-freq, --moe-shared-expert-intermediate-size, "
    "--moe-shared-expert-gate, --swiglu, --hybrid-layer-pattern, --tensor-model-parallel-size, "
    "--expert-model-parallel-size, --expert-tensor-parallel-size, --pipeline-model-parallel-size, "
    "--mtp-num-layers"
)


def add_plan_options(p) -> None:
    """The options sizing and convert share (everything else is the MoE model's Megatron flags)."""
    p.add_argument("--mode", choices=("parallel", "replace"), default=None,
                   help="parallel (default; UltraMemV2: dense MLP + memory) or replace (the memory "
                   "alone takes the MoE block's place). --ultramem-mode in the MoE arguments "
                   "counts as this option")  # fmt: skip
    for flag, key in KNOB_FLAGS.items():
        p.add_argument(flag, type=int_at_least(1), dest=key, help=f"pin {key} (default: solved)")
    p.add_argument("--dense-ffn-hidden-size", type=int_at_least(1),
                   help="mode parallel: fix the dense MLP beside each memory")  # fmt: skip
    p.add_argument("--moe-layers-per-memory", type=int_at_least(1), default=1,
                   help="mode parallel with dense layers: one memory per J MoE layers, with their "
                   "pooled budget (default 1)")  # fmt: skip
    p.add_argument("--ffn-multiple-of", type=int_at_least(1), default=64,
                   help="round a solved dense MLP size to this multiple (default 64)")


def plan_from_argv(options, moe_argv: Sequence[str]) -> Tuple[MoEModel, Plan]:
    """Plan the conversion of `moe_argv` with the shared options (raises BadInput / NoMatch)."""
    model = moe_model_from_argv(moe_argv)
    knobs = knobs_from_argv(moe_argv)
    knobs.update({k: getattr(options, k) for k in KNOB_FLAGS.values() if getattr(options, k) is not None})
    if options.dense_ffn_hidden_size is not None:
        knobs["dense_ffn_hidden_size"] = options.dense_ffn_hidden_size
    in_argv = _last(split_flags(moe_argv), "--ultramem-mode")
    if in_argv is not None and in_argv not in ("parallel", "replace"):
        raise BadInput(f"--ultramem-mode {in_argv!r} in the MoE arguments: allowed parallel, replace")
    if options.mode and in_argv and options.mode != in_argv:
        raise BadInput(
            f"--mode {options.mode} disagrees with --ultramem-mode {in_argv} in the MoE arguments: "
            "give one of them"
        )
    mode = options.mode or in_argv or "parallel"
    return model, plan_conversion(
        model, mode, knobs, moe_layers_per_memory=options.moe_layers_per_memory,
        ffn_multiple_of=options.ffn_multiple_of,
    )  # fmt: skip


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="python -m megatron_ultramem.sizing",
        description="UltraMem configuration with the total and activated parameters of a MoE "
        "model given by its Megatron-LM flags (the same planner as "
        "megatron_ultramem.megatron_lm.convert).",
        epilog=f"Megatron flags read: {MOE_FLAGS_READ} (others are ignored).",
        allow_abbrev=False,
    )
    add_plan_options(p)
    p.add_argument("--bytes-per-param", type=float_in(0, low_open=True), default=2.0,
                   help="2 for bf16 (default)")  # fmt: skip
    p.add_argument("--batch-sizes", type=int_list(1), default=list(DEFAULT_BATCH_SIZES),
                   help="decoding batch sizes of the bytes table (default 1,8,64,512,4096)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print a JSON document instead of a report")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, moe_argv = build_parser().parse_known_args(argv)
    moe_argv = [a for a in moe_argv if a != "--"]
    try:
        model, plan = plan_from_argv(args, moe_argv)
    except NoMatch as err:
        model = moe_model_from_argv(moe_argv)
        if args.json:
            print(json.dumps({"no_match": err.reason, "options": [
                {"label": o.label, "choose": o.choose, **o.plan.as_dict(args.batch_sizes, args.bytes_per_param)}
                for o in err.options]}, indent=2))  # fmt: skip
        else:
            print(options_report(model, err, args.bytes_per_param))
        return 0
    if args.json:
        print(json.dumps(plan.as_dict(args.batch_sizes, args.bytes_per_param), indent=2))
    else:
        print(report(plan, args.batch_sizes, args.bytes_per_param))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
