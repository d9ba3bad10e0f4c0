"""Rewrite a MoE model's Megatron-LM arguments into the UltraMem model of the same size.

    python -m megatron_ultramem.megatron_lm.convert [--mode parallel|replace] \\
        [--ultramem-topm 64 ...] [--format lines|shell|json|report] -- <MoE pretrain_gpt.py arguments>

The plan (which layers, which memory, what happens to the MoE flags) is `sizing.plan_conversion`,
the same one `python -m megatron_ultramem.sizing` prints; this module only rewrites the argument
list around it. Everything not named below is passed through in order.

- added: `Plan.megatron_args()`: `--spec megatron_ultramem.megatron_lm ultramem_block_spec` (or
  `ultramem_hybrid_stack_spec` for a `--hybrid-layer-pattern` model) and the --ultramem-* flags;
  mode 'parallel' also --ffn-hidden-size (the dense MLP beside each memory; the dense layers' size
  when the model has dense layers) and, for a hybrid model, the pattern with E turned into '-';
- dropped and re-added: --spec and any flag that the plan sets (a --ultramem-* sizing knob given in
  the MoE arguments pins that value in the plan, then appears once);
- mode 'parallel' drops --num-experts, every --moe-* flag, --expert-model-parallel-size,
  --expert-tensor-parallel-size and --overlap-moe-expert-parallel-comm (with their values): the
  memory sits beside a dense MLP, and Megatron-LM takes EP > 1 only with --num-experts;
- mode 'replace' keeps them (the memories replace every MoE block, so no expert is built, and EP
  keeps splitting each value table's columns over TP x EP); --expert-tensor-parallel-size is dropped
  only when it differs from the TP size (UltraMem needs them equal).
What the plan decided about EP, shared experts and dense layers is printed as `note:` lines on
stderr (formats lines/shell; in the JSON and the report too). A layout with no solution prints the
layouts that fit, with their numbers and the options that select them, and exits with status 2.

Imports only the standard library and `megatron_ultramem.sizing` (the launch scripts call it).
"""

import json
import shlex
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from ..cli import ArgumentParser, BadInput, run_main
from ..sizing import (
    KNOB_FLAGS,
    NoMatch,
    Plan,
    _last,
    add_plan_options,
    moe_model_from_argv,
    options_report,
    plan_from_argv,
    report,
    split_flags,
)

__all__ = ["moe_to_ultramem_argv", "split_flags", "rewrite_argv", "main"]

MOE_PREFIXES = ("--moe-",)
MOE_FLAGS = {
    "--num-experts",
    "--expert-model-parallel-size",
    "--expert-tensor-parallel-size",
    "--overlap-moe-expert-parallel-comm",
}


def rewrite_argv(argv: Sequence[str], plan: Plan) -> List[str]:
    """`argv` with the plan applied (see the module doc)."""
    items = split_flags(argv)
    user_layers = _last(items, "--ultramem-layers")
    if user_layers is not None and user_layers != plan.layers_text:
        raise BadInput(
            f"--ultramem-layers {user_layers!r} in the MoE arguments: the converter puts the "
            f"memories where the sizing counts them ({plan.layers_text!r}); remove it (or choose "
            "fewer memories with --moe-layers-per-memory)"
        )
    generated = plan.megatron_args()
    replaced = {t for t in generated if t.startswith("--")} | {"--spec", "--ultramem-mode"}
    replaced |= set(KNOB_FLAGS) | {"--hybrid-layer-pattern", "--hybrid-override-pattern"}
    out: List[str] = []
    for flag, values in items:
        if not flag:
            out += values
            continue
        if flag in replaced:
            continue
        moe_flag = flag in MOE_FLAGS or flag.startswith(MOE_PREFIXES)
        if moe_flag and not plan.keep_moe_flags:
            continue
        if flag == "--expert-tensor-parallel-size" and plan.drop_etp:
            continue
        out += [flag, *values]
    return out + generated


def moe_to_ultramem_argv(
    argv: Sequence[str],
    mode: Optional[str] = None,
    overrides: Optional[Dict[str, int]] = None,
    ffn_multiple_of: int = 64,
    moe_layers_per_memory: int = 1,
) -> Tuple[List[str], Plan]:
    """MoE pretrain_gpt.py arguments -> (UltraMem arguments, the plan behind them).

    `overrides`: sizing knobs by keyword (key_dim, num_heads, topm, expansion, tucker_rank,
    num_cores, value_dim, dense_ffn_hidden_size) on top of --ultramem-* flags found in `argv`.
    Raises BadInput (bad arguments) or NoMatch (no layout of that mode fits; `.options` fit).
    """
    options = build_parser().parse_args([])
    options.mode = mode
    options.ffn_multiple_of = ffn_multiple_of
    options.moe_layers_per_memory = moe_layers_per_memory
    for key, value in (overrides or {}).items():
        setattr(options, key, value)
    _, plan = plan_from_argv(options, argv)
    return rewrite_argv(argv, plan), plan


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="python -m megatron_ultramem.megatron_lm.convert",
        usage="%(prog)s [options] -- MOE_ARGS...",
        description="MoE Megatron-LM arguments -> UltraMem arguments of the same total and "
        "activated parameters. Put the MoE arguments after '--'.",
        allow_abbrev=False,
    )
    add_plan_options(p)
    p.add_argument(
        "--format",
        choices=("lines", "shell", "json", "report"),
        default="lines",
        help="lines: one argument per line (for bash mapfile; default); shell: one quoted line; "
        "json: arguments and plan; report: the sizing report",
    )
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        build_parser().parse_known_args(argv)  # --help, or an option's own error, first
        raise BadInput(
            "put the MoE model's Megatron-LM arguments after '--', e.g. convert --mode replace -- "
            "--num-layers 32 --hidden-size 4096 --num-experts 8 ..."
        )
    cut = argv.index("--")
    args = build_parser().parse_args(argv[:cut])
    moe_args = argv[cut + 1 :]
    try:
        _, plan = plan_from_argv(args, moe_args)
    except NoMatch as err:
        print(options_report(moe_model_from_argv(moe_args), err), file=sys.stderr)
        choices = "; ".join(f"[{i}] {' '.join(o.choose)}" for i, o in enumerate(err.options, 1))
        raise BadInput(
            f"{err.reason}; "
            + (f"choose a layout that fits (numbers above): {choices}" if choices else
               "no other layout fits: lower --ultramem-key-dim / --ultramem-value-dim")  # fmt: skip
        ) from None
    out = rewrite_argv(moe_args, plan)
    if args.format == "lines":
        bad = [t for t in out if "\n" in t]
        if bad:
            raise BadInput(f"argument {bad[0]!r} contains a newline: use --format shell or json")
        print("\n".join(out))
    elif args.format == "shell":
        print(shlex.join(out))
    elif args.format == "json":
        print(json.dumps({"argv": out, "sizing": plan.as_dict()}, indent=2))
    else:
        print(report(plan))
    if args.format in ("lines", "shell"):
        for note in plan.notes:
            print(f"note: {note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
