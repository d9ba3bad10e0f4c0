"""Megatron-LM command-line flags for UltraMem, and their validation.

`add_ultramem_args(parser)` is an `extra_args_provider`: it adds one `--ultramem-*` flag per
`ultramem_*` field of UltraMemConfig (flag = field name with dashes, default = the field's default,
help = the field's docstring), so Megatron-LM's `core_transformer_config_from_args(args,
config_class=UltraMemConfig)` copies them, plus two logging switches that are not config fields.

`validate_ultramem_args(args)` checks the flags with UltraMemConfig's own rules (one source of truth)
and the conflicts with the rest of Megatron-LM's arguments; every error names the flag and the
allowed values.
"""

import argparse
import ast
import dataclasses
import functools
import importlib.util
import inspect
import re
from typing import Callable, Dict, List, Optional

from ..warn import warn_user

SPEC_MODULE = "megatron_ultramem.megatron_lm"
SPEC_NAME = "ultramem_block_spec"
SPEC_FLAG = f"--spec {SPEC_MODULE} {SPEC_NAME}"
HYBRID_SPEC_NAME = "ultramem_hybrid_stack_spec"
HYBRID_SPEC_FLAG = f"--spec {SPEC_MODULE} {HYBRID_SPEC_NAME}"
"""The HybridModel stack spec (pretrain_hybrid.py, megatron-core 0.19+)."""
SPEC_NAMES = (SPEC_NAME, HYBRID_SPEC_NAME)

# Flags of the plugin that are not UltraMemConfig fields (logging only).
LOGGING_FLAGS = ("ultramem_log_stats", "ultramem_per_layer_logging")


def _config_class():
    from ..config import UltraMemConfig

    return UltraMemConfig


def ultramem_fields() -> List[dataclasses.Field]:
    """The `ultramem_*` dataclass fields of UltraMemConfig, in declaration order."""
    return [f for f in dataclasses.fields(_config_class()) if f.name.startswith("ultramem_")]


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


@functools.lru_cache(maxsize=1)
def _field_docs() -> Dict[str, str]:
    """Field docstrings of UltraMemConfig (the string right under each field), for --help."""
    cls = _config_class()
    try:
        tree = ast.parse(inspect.getsource(inspect.getmodule(cls)))
    except (OSError, TypeError):
        return {}
    docs = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls.__name__:
            body = node.body
            for stmt, nxt in zip(body, body[1:]):
                if (
                    isinstance(stmt, ast.AnnAssign)
                    and isinstance(stmt.target, ast.Name)
                    and isinstance(nxt, ast.Expr)
                    and isinstance(getattr(nxt, "value", None), ast.Constant)
                    and isinstance(nxt.value.value, str)
                ):
                    docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _layers_type(text: str):
    """--ultramem-layers: an int N, or a pattern string checked later against --num-layers."""
    text = text.strip()
    return int(text) if text.lstrip("-").isdigit() else text


def _choices() -> Dict[str, tuple]:
    from .. import config as cfg

    return {
        "ultramem_mode": cfg.MODES,
        "ultramem_init": cfg.INITS,
        "ultramem_score_activation": cfg.SCORE_ACTIVATIONS,
        "ultramem_impl": cfg.IMPLS,
    }


def _numeric_types() -> Dict[str, Callable]:
    """argparse types of the numeric fields: the allowed range in the message, nan/inf refused
    (the same bounds as UltraMemConfig.validate_ultramem)."""
    from ..cli import float_in, int_at_least

    positive = int_at_least(1)
    return {
        **{name: positive for name in (
            "ultramem_num_keys", "ultramem_key_dim", "ultramem_value_dim", "ultramem_expansion",
            "ultramem_tucker_rank", "ultramem_num_cores", "ultramem_num_heads", "ultramem_topm")},
        "ultramem_seed": int_at_least(0),
        "ultramem_aux_loss_alpha": float_in(0.0),
        "ultramem_aux_loss_tau": float_in(0.0),
        "ultramem_value_lr_mult": float_in(0.0, low_open=True),
        "ultramem_value_lr_decay_rate": float_in(0.0, low_open=True),
    }  # fmt: skip


def _argparse_kwargs(f: dataclasses.Field, default=dataclasses.MISSING) -> dict:
    """add_argument keywords of one field; `default` replaces the field's default."""
    default = f.default if default is dataclasses.MISSING else default
    help_text = _field_docs().get(f.name, "").replace("%", "%%")
    if isinstance(default, bool):
        shown = "on" if default else "off"
    elif default is None:
        shown = "--seed" if f.name == "ultramem_seed" else "None"
    else:
        shown = default
    kwargs = {"default": default, "dest": f.name, "help": f"{help_text} (default: {shown})"}
    choices = _choices()
    numeric = _numeric_types()
    if f.name in choices:
        return {**kwargs, "type": str, "choices": choices[f.name]}
    if f.name == "ultramem_layers":
        return {**kwargs, "type": _layers_type, "metavar": "N|PATTERN"}
    if f.name == "ultramem_skip_units":
        return {**kwargs, "type": str, "metavar": '"i:j,i:j,..."'}
    if f.name in numeric:
        return {**kwargs, "type": numeric[f.name], "metavar": f.name.split("_", 1)[1].upper()}
    if isinstance(f.default, bool):
        return {**kwargs, "action": argparse.BooleanOptionalAction}
    if isinstance(f.default, (int, float, str)):
        return {**kwargs, "type": type(f.default)}
    raise TypeError(
        f"UltraMemConfig.{f.name} has no command-line flag rule (default {f.default!r}): add one in "
        "megatron_ultramem/megatron_lm/arguments.py"
    )


def add_ultramem_args(
    parser: argparse.ArgumentParser,
    defaults: Optional[Dict[str, object]] = None,
    logging_flags: bool = True,
) -> argparse.ArgumentParser:
    """extra_args_provider for Megatron-LM: adds the `--ultramem-*` flags and returns the parser.

    The one definition of the flags, shared by Megatron-LM's scripts, `python -m
    megatron_ultramem.pretrain` and the main job (`python -m megatron_ultramem`). `defaults`
    ({field: value}) replaces field defaults (the main job's small model); `logging_flags=False`
    leaves out the two Megatron-LM logging switches. Every help text ends with the default.

    Idempotent: a parser that already has them (the patch and the entry point both registered the
    provider) is returned unchanged.
    """
    if "--ultramem-mode" in getattr(parser, "_option_string_actions", {}):
        return parser
    defaults = dict(defaults or {})
    group = parser.add_argument_group(
        "UltraMem", f"UltraMem memory layers; active with {SPEC_FLAG} (megatron-ultramem)"
    )
    for f in ultramem_fields():
        group.add_argument(
            flag_name(f.name), **_argparse_kwargs(f, defaults.pop(f.name, dataclasses.MISSING))
        )
    if defaults:
        raise TypeError(f"add_ultramem_args: no such UltraMem field(s) {sorted(defaults)}")
    if not logging_flags:
        return parser
    group.add_argument(
        "--ultramem-log-stats",
        dest="ultramem_log_stats",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Log retrieval statistics (fraction of the value table touched, mean top-1/top-m "
        "scores) next to the Tucker aux loss and singular values. (default: on)",
    )
    group.add_argument(
        "--ultramem-per-layer-logging",
        dest="ultramem_per_layer_logging",
        action="store_true",
        help="Also log the aux loss and retrieval statistics of each memory layer. (default: off)",
    )
    return parser


def chain_args_providers(*providers: Optional[Callable]) -> Callable:
    """One extra_args_provider that runs several in order (None entries are skipped)."""
    active = [p for p in providers if p is not None]

    def provider(parser):
        for p in active:
            parser = p(parser)
        return parser

    return provider


# ---------------------------------------------------------------------- reading the flags
def ultramem_spec_in_use(args) -> bool:
    """True when --spec selects a spec from this package."""
    spec = getattr(args, "spec", None)
    return bool(spec) and str(spec[0]).split(".")[0] == SPEC_MODULE.split(".")[0]


def ultramem_fields_from_args(args) -> Dict[str, object]:
    """{field: value} of every ultramem_* field; missing flags take the field default."""
    return {f.name: getattr(args, f.name, f.default) for f in ultramem_fields()}


def _changed_flags(args) -> List[str]:
    return [
        flag_name(f.name)
        for f in ultramem_fields()
        if hasattr(args, f.name) and getattr(args, f.name) != f.default
    ]


class _ArgsViewBase:
    """The args namespace seen through UltraMemConfig's validation methods (no TransformerConfig
    is built: that needs the whole Megatron-LM argument translation)."""

    def __init__(self, args):
        object.__setattr__(self, "_args", args)
        object.__setattr__(self, "_local", {})

    def __getattr__(self, name):
        local = object.__getattribute__(self, "_local")
        if name in local:
            return local[name]
        args = object.__getattribute__(self, "_args")
        if hasattr(args, name):
            return getattr(args, name)
        defaults = _config_defaults()
        if name in defaults:  # a config field Megatron-LM has no flag for: the field default
            return defaults[name]
        raise AttributeError(name)

    def __setattr__(self, name, value):  # validate_ultramem fills ultramem_value_dim: keep it local
        self._local[name] = value


@functools.lru_cache(maxsize=1)
def _config_defaults() -> Dict[str, object]:
    out = {}
    for f in dataclasses.fields(_config_class()):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


@functools.lru_cache(maxsize=1)
def _args_view_class():
    cls = _config_class()
    borrowed = (
        "ultramem_expansion_side",
        "ultramem_keys_per_side",
        "ultramem_num_values",
        "validate_ultramem",
        "_validate_training_features",
        "_validate_skip_units",
        "ultramem_layer_pattern",
        "ultramem_skip_unit_list",
        "ultramem_layer_stages",
    )
    return type("_ArgsView", (_ArgsViewBase,), {name: cls.__dict__[name] for name in borrowed})


def _ArgsView(args):
    return _args_view_class()(args)


_FIELD_RE = re.compile(r"\bultramem_([a-z_]+[a-z])\b")


def _flagify(message: str) -> str:
    """'ultramem_topm (m=..)' -> '--ultramem-topm (m=..)' in error messages."""
    fields = {f.name for f in ultramem_fields()}

    def sub(match):
        name = match.group(0)
        return flag_name(name) if name in fields else name

    return _FIELD_RE.sub(sub, message)


def moe_layer_pattern(args) -> List[int]:
    """0/1 per layer: which layers are MoE layers under --num-experts / --moe-layer-freq."""
    if not getattr(args, "num_experts", None):
        return [0] * args.num_layers
    from ..sizing import layer_pattern

    return layer_pattern(getattr(args, "moe_layer_freq", 1), args.num_layers, "--moe-layer-freq")


def memory_layer_pattern(args) -> List[int]:
    """0/1 per layer: layers whose MLP slot holds a memory (skip mode: the units' source blocks)."""
    view = _ArgsView(args)
    if args.ultramem_mode == "skip":
        sources = {i for i, _ in view.ultramem_skip_unit_list()}
        return [1 if i in sources else 0 for i in range(args.num_layers)]
    return view.ultramem_layer_pattern()


def validate_ultramem_args(args) -> None:
    """Check the --ultramem-* flags and their conflicts with other Megatron-LM flags.

    Raises ValueError naming the flag and the allowed values. Without the UltraMem spec the flags do
    nothing; changed flags then only give a warning.
    """
    if not ultramem_spec_in_use(args):
        changed = _changed_flags(args)
        if changed:
            warn_user(
                f"{', '.join(changed)} given but --spec does not select the UltraMem spec, so they "
                f"have no effect: add {SPEC_FLAG}"
            )
        return
    try:
        _ArgsView(args).validate_ultramem()
    except ValueError as err:
        raise ValueError(_flagify(str(err))) from None

    spec = list(args.spec)
    if len(spec) != 2 or spec[0] != SPEC_MODULE or spec[1] not in SPEC_NAMES:
        raise ValueError(
            f"--spec {' '.join(spec)}: the UltraMem specs are spelled {SPEC_FLAG} (GPT) and "
            f"{HYBRID_SPEC_FLAG} (HybridModel)"
        )
    if spec[1] == HYBRID_SPEC_NAME:
        _validate_hybrid_args(args)
    impl = getattr(args, "transformer_impl", "transformer_engine")
    if impl not in ("transformer_engine", "local"):
        raise ValueError(
            f"--transformer-impl {impl} is not supported with --spec {' '.join(spec)}; allowed: "
            "transformer_engine, local"
            + (
                " (with inference_optimized Megatron's model builders use their own inference "
                "layer spec and drop --spec: the model would have no memory layers)"
                if impl == "inference_optimized"
                else ""
            )
        )
    _refuse_switches_that_break_memories(args, spec)
    if impl == "transformer_engine" and importlib.util.find_spec("transformer_engine") is None:
        raise ValueError(
            "--transformer-impl transformer_engine (Megatron-LM's default) but transformer_engine "
            "is not installed: install it (GPU machines) or pass --transformer-impl local"
        )
    for flag, name in (
        ("--use-legacy-models", "use_legacy_models"),
        ("--experimental-attention-variant", "experimental_attention_variant"),
        ("--heterogeneous-layers-config-path", "heterogeneous_layers_config_path"),
        ("--yaml-cfg", "yaml_cfg"),
    ):
        if getattr(args, name, None):
            raise ValueError(
                f"{flag} cannot be combined with {SPEC_FLAG}: the UltraMem block spec is built "
                "from Megatron's standard GPT layer specs"
            )

    if spec[1] == HYBRID_SPEC_NAME:
        return  # MoE layers are the pattern's E symbols, checked in _validate_hybrid_args
    # MoE: a memory replaces a MoE block ('replace') or runs beside a dense MLP ('parallel', 'skip').
    moe = moe_layer_pattern(args)
    if any(moe) and args.ultramem_mode in ("parallel", "skip"):
        memory = memory_layer_pattern(args)
        clash = [i for i, (a, b) in enumerate(zip(moe, memory)) if a and b]
        if args.ultramem_mode == "skip":
            sinks = {j for _, j in _ArgsView(args).ultramem_skip_unit_list()}
            clash = sorted(set(clash) | {j for j in sinks if moe[j]})
        if clash:
            where = (
                "--ultramem-layers" if args.ultramem_mode == "parallel" else "--ultramem-skip-units"
            )
            raise ValueError(
                f"--ultramem-mode {args.ultramem_mode} puts a memory beside the dense MLP of layers "
                f"{clash} (0-based), but --num-experts {args.num_experts} with --moe-layer-freq "
                f"{getattr(args, 'moe_layer_freq', 1)} makes them MoE layers. Allowed: "
                "--ultramem-mode replace (the memory replaces those MoE blocks), other layers in "
                f"{where}, or no --num-experts (dense MLPs everywhere)"
            )


MUON_OPTIMIZERS = ("muon", "dist_muon", "adaptive_muon")
"""--optimizer values that orthogonalize 2-D parameters unless tagged `use_muon = False`."""
ELEMENTWISE_OPTIMIZERS = ("adam", "sgd", "lion")
"""--optimizer values that update each element on its own (a sparse table's rows stay independent)."""


def _refuse_switches_that_break_memories(args, spec) -> None:
    """Megatron-LM switches under which a memory layer would build and train, but wrongly, without
    an error: refused before any work, naming the flag and what is allowed."""
    spec_flag = f"--spec {' '.join(spec)}"
    if getattr(args, "inference_fuse_tp_communication", False):
        raise ValueError(
            f"--inference-fuse-tp-communication cannot be combined with {spec_flag}: the fused "
            "layer hands the residual to mlp.linear_fc2 and skips the MLP's bias-dropout-add, which "
            "a memory layer in the MLP slot does not take; allowed: leave it off"
        )
    tp = getattr(args, "tensor_model_parallel_size", 1) or 1
    etp = getattr(args, "expert_tensor_parallel_size", None) or tp
    for flag, name, size, size_flag in (
        ("--tensor-parallel-num-weight-shards", "tensor_parallel_num_weight_shards", tp,
         "--tensor-model-parallel-size"),
        ("--expert-tensor-parallel-num-weight-shards", "expert_tensor_parallel_num_weight_shards",
         etp, "--expert-tensor-parallel-size"),
    ):  # fmt: skip
        shards = getattr(args, name, None)
        if shards is not None and shards != size:
            raise ValueError(
                f"{flag} {shards} cannot be combined with {spec_flag}: generalized tensor "
                "parallelism (weight rematerialization) would shard Megatron's linears, the "
                "memory's output projection among them, over a weight-shard group the memory does "
                "not know, while its value table stays column-sharded over tensor x expert "
                f"parallelism only; allowed: leave it unset or equal to {size_flag} ({size})"
            )
    optimizer = getattr(args, "optimizer", "adam") or "adam"
    from .. import compat

    allowed = ELEMENTWISE_OPTIMIZERS + (MUON_OPTIMIZERS if compat.muon_honours_use_muon() else ())
    if optimizer not in allowed:
        why = (
            f"megatron-core {compat.megatron_core_version()} does not honour the value table's "
            "`use_muon = False` tag (0.20 does), so Muon would orthogonalize the table's updates"
            if optimizer in MUON_OPTIMIZERS
            else "it preconditions every 2-D parameter as a matrix, the value table included"
        )
        raise ValueError(
            f"--optimizer {optimizer} cannot be combined with {spec_flag}: {why}; allowed: "
            + ", ".join(allowed)
        )


def _validate_hybrid_args(args) -> None:
    """The hybrid spec's own rules (hybrid.validate_hybrid_pattern) on --hybrid-layer-pattern."""
    pattern = getattr(args, "hybrid_layer_pattern", None) or getattr(
        args, "hybrid_override_pattern", None
    )
    if not pattern:
        raise ValueError(
            f"{HYBRID_SPEC_FLAG} needs --hybrid-layer-pattern (e.g. \"*E*E\" with --ultramem-mode "
            "replace, or \"*-*-\" with --ultramem-mode parallel)"
        )
    from ..hybrid import validate_hybrid_pattern

    try:
        validate_hybrid_pattern(_ArgsView(args), pattern)
    except ValueError as err:
        message = _flagify(str(err)).replace("hybrid layer pattern", "--hybrid-layer-pattern")
        raise ValueError(message) from None
