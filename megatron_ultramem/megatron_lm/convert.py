"""Rewrite a MoE model's Megatron-LM arguments into the UltraMem model of the same size.

    python -m megatron_ultramem.megatron_lm.convert [--mode parallel|replace] \
        [--ultramem-topm 64 ...] [--format lines|shell|json] -- <MoE pretrain_gpt.py arguments>

What changes (everything else is passed through in order):
- dropped: --num-experts, every --moe-* flag, --expert-model-parallel-size,
  --expert-tensor-parallel-size, --overlap-moe-expert-parallel-comm (with their values);
- dropped and re-added: --spec (-> megatron_ultramem.megatron_lm ultramem_block_spec), any
  --ultramem-* flag given in the MoE arguments (kept as given; also pins that knob in the sizing);
- added: the --ultramem-* flags of `sizing.size_ultramem_like_moe` for the MoE blocks read from the
  arguments (--hidden-size, --num-layers, --ffn-hidden-size, --moe-ffn-hidden-size, --num-experts,
  --moe-router-topk, --moe-layer-freq, --moe-shared-expert-intermediate-size, --swiglu), placed on
  the MoE layers (--ultramem-layers = --moe-layer-freq);
- mode 'parallel': --ffn-hidden-size becomes the dense MLP size beside each memory. When the MoE
  pattern leaves dense layers they share --ffn-hidden-size, so it is kept and the memory is sized
  around it (topm solved) instead.

Imports only the standard library and `megatron_ultramem.sizing` (the launch scripts call it).
"""

import argparse
import json
import re
import shlex
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from ..sizing import MoEShape, Sizing, report, size_ultramem_like_moe

SPEC = ["megatron_ultramem.megatron_lm", "ultramem_block_spec"]
DROP_PREFIXES = ("--moe-",)
DROP_FLAGS = {
    "--num-experts",
    "--expert-model-parallel-size",
    "--expert-tensor-parallel-size",
    "--overlap-moe-expert-parallel-comm",
    "--spec",
}
# Knobs the sizing solves or fixes; given in the MoE argv they pin that value.
SIZING_KNOBS = {
    "--ultramem-key-dim": "key_dim",
    "--ultramem-num-heads": "num_heads",
    "--ultramem-topm": "topm",
    "--ultramem-expansion": "expansion",
    "--ultramem-tucker-rank": "tucker_rank",
    "--ultramem-num-cores": "num_cores",
    "--ultramem-value-dim": "value_dim",
}
_NUMBER = re.compile(r"^-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _is_value(token: str) -> bool:
    return not token.startswith("--") or bool(_NUMBER.match(token))


def split_flags(argv: Sequence[str]) -> List[Tuple[str, List[str]]]:
    """[(flag, [values])] in order; `--flag=value` becomes ('--flag', ['value']). Tokens before the
    first flag come as ('', [tokens])."""
    items: List[Tuple[str, List[str]]] = []
    for token in argv:
        if token.startswith("--") and not _NUMBER.match(token):
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


def _last(items, flag, default=None):
    values = [v for f, v in items if f == flag]
    if not values:
        return default
    return values[-1][0] if values[-1] else True


def moe_shape_from_argv(argv: Sequence[str]) -> MoEShape:
    """The MoE blocks described by Megatron-LM arguments (Megatron's defaults where absent)."""
    items = split_flags(argv)

    def need(flag):
        value = _last(items, flag)
        if value is None:
            raise ValueError(f"the MoE arguments have no {flag}")
        return value

    hidden = int(need("--hidden-size"))
    ffn = int(_last(items, "--ffn-hidden-size", 4 * hidden))
    return MoEShape(
        hidden_size=hidden,
        num_experts=int(need("--num-experts")),
        topk=int(_last(items, "--moe-router-topk", 2)),
        expert_ffn_hidden_size=int(_last(items, "--moe-ffn-hidden-size", ffn)),
        num_layers=int(need("--num-layers")),
        gated=bool(_last(items, "--swiglu", False)),
        moe_layer_freq=_last(items, "--moe-layer-freq", 1),
        shared_expert_ffn_hidden_size=int(_last(items, "--moe-shared-expert-intermediate-size", 0)),
    )


def moe_to_ultramem_argv(
    argv: Sequence[str],
    mode: str = "parallel",
    overrides: Optional[Dict[str, int]] = None,
    ffn_multiple_of: int = 64,
) -> Tuple[List[str], Sizing]:
    """MoE pretrain_gpt.py arguments -> (UltraMem arguments, the sizing behind them).

    `overrides`: sizing knobs by keyword (key_dim, num_heads, topm, expansion, tucker_rank,
    num_cores, value_dim, dense_ffn_hidden_size) on top of --ultramem-* flags found in `argv`.
    """
    items = split_flags(argv)
    moe = moe_shape_from_argv(argv)
    knobs = {}
    for flag, key in SIZING_KNOBS.items():
        value = _last(items, flag)
        if value is not None:
            knobs[key] = int(value)
    knobs.update(overrides or {})
    user_mode = _last(items, "--ultramem-mode")
    if user_mode is not None:
        mode = user_mode
    if mode == "parallel" and "dense_ffn_hidden_size" not in knobs and not all(moe.layers):
        # Dense layers keep --ffn-hidden-size, and memory layers share it.
        knobs["dense_ffn_hidden_size"] = int(_last(items, "--ffn-hidden-size", 4 * moe.hidden_size))
    sizing = size_ultramem_like_moe(moe, mode, ffn_multiple_of=ffn_multiple_of, **knobs)

    generated = sizing.megatron_args()
    user_layers = _last(items, "--ultramem-layers")
    if user_layers is not None:  # the user's placement wins over "memory where the MoE blocks were"
        generated[generated.index("--ultramem-layers") + 1] = user_layers
    generated_flags = {t for t in generated if t.startswith("--")}
    out: List[str] = []
    for flag, values in items:
        if not flag:
            out += values
            continue
        if flag in DROP_FLAGS or flag.startswith(DROP_PREFIXES) or flag in generated_flags:
            continue
        out += [flag, *values]
    out += ["--spec", *SPEC, *generated]
    return out, sizing


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m megatron_ultramem.megatron_lm.convert",
        description="MoE Megatron-LM arguments -> UltraMem arguments of the same total and "
        "activated parameters. Put the MoE arguments after '--'.",
    )
    p.add_argument("--mode", choices=("parallel", "replace"), default="parallel")
    p.add_argument(
        "--format",
        choices=("lines", "shell", "json", "report"),
        default="lines",
        help="lines: one argument per line (for bash mapfile); shell: one quoted line; "
        "json: arguments and sizing; report: the sizing report",
    )
    for flag in SIZING_KNOBS:
        p.add_argument(flag, type=int, dest=SIZING_KNOBS[flag])
    p.add_argument("--dense-ffn-hidden-size", type=int)
    p.add_argument("--ffn-multiple-of", type=int, default=64)
    p.add_argument("moe_args", nargs=argparse.REMAINDER)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    moe_args = list(args.moe_args)
    if moe_args and moe_args[0] == "--":
        moe_args = moe_args[1:]
    overrides = {
        key: getattr(args, key)
        for key in list(SIZING_KNOBS.values()) + ["dense_ffn_hidden_size"]
        if getattr(args, key) is not None
    }
    try:
        out, sizing = moe_to_ultramem_argv(moe_args, args.mode, overrides, args.ffn_multiple_of)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.format == "lines":
        print("\n".join(out))
    elif args.format == "shell":
        print(shlex.join(out))
    elif args.format == "json":
        print(json.dumps({"argv": out, "sizing": sizing.as_dict()}, indent=2))
    else:
        print(report(sizing))
    return 0


if __name__ == "__main__":
    sys.exit(main())
