"""Every difference between the megatron-core releases this plugin supports, behind one small shim.

Tested releases: 0.16.1 and 0.19.2 (CI runs the suite on both). Code elsewhere in the package calls
these functions instead of checking versions itself; each shim says which releases differ and how,
and tests/test_compat.py pins each difference on the installed release.

Shims:
  MLP slot specs     0.16-0.17 spell a layer's MLP/MoE submodule as `ModuleSpec(module=MLP|MoELayer,
                     submodules=...)`, built with `build_module(spec, config=, tp_group=|pg_collection=)`.
                     0.18+ spell them as `functools.partial` builders (the `MlpBuilder` protocol:
                     `partial(MLP.as_mlp_submodule, submodules=...)`, `partial(MoELayer, submodules=...)`)
                     called as `mlp(config=, pg_collection=, is_mtp_layer=, name=)`.
                     -> mlp_spec_class, mlp_spec_submodules, with_mlp_submodules, build_mlp
  process groups     0.18+ hand custom MLP-slot modules a `pg_collection`; earlier releases hand them
                     only `config`, so the groups come from parallel_state.  -> process_groups
  aux-loss tracker   0.18+ record MoE metrics through `get_moe_metrics_tracker()`; the legacy
                     `save_to_aux_losses_tracker` / `get_moe_layer_wise_logging_tracker` are deprecated
                     wrappers there (the latter returns a copy, so popping from it does nothing).
                     -> record_aux_loss, discard_aux_loss
  Muon exclusion     0.20 (Megatron-LM main) routes parameters tagged `use_muon = False` to Muon's
                     scalar optimizer (Adam) and out of the layer-wise optimizer's buffers; 0.16-0.19
                     read no such tag (every 2-D non-embedding parameter, the value table included,
                     is orthogonalized).  -> muon_honours_use_muon
  version check      importing the package on an untested release warns once.  -> check_version
"""

import copy
import functools
from typing import Optional

from .warn import warn_user

TESTED_VERSIONS = ("0.16.1", "0.19.2")
"""megatron-core releases the test suite runs on (pyproject: megatron-core>=0.16,<0.20)."""


def megatron_core_version() -> str:
    """The installed megatron-core release, read from the package metadata (importing megatron here
    would break the Megatron-LM entry point, which puts a checkout on sys.path first)."""
    from importlib import metadata

    try:
        return metadata.version("megatron-core")
    except metadata.PackageNotFoundError:  # a source checkout on sys.path
        return "unknown"


def _minor(version: str):
    parts = version.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


_WARNED = []


def check_version(version: Optional[str] = None) -> bool:
    """True when `version` (default: the installed megatron-core) is a tested minor release.

    Warns once per process otherwise, naming the tested releases.
    """
    version = version or megatron_core_version()
    tested = {_minor(v) for v in TESTED_VERSIONS}
    ok = _minor(version) in tested
    if not ok and not _WARNED:
        _WARNED.append(version)
        warn_user(
            f"megatron-ultramem is tested with megatron-core {' and '.join(TESTED_VERSIONS)}; "
            f"megatron-core {version} is installed and may not work",
            stacklevel=2,
        )
    return ok


# ---------------------------------------------------------------------- MLP slot specs
def _builder_func(spec):
    """The callable a partial wraps, unwrapping nested partials and bound classmethods."""
    func = spec
    while isinstance(func, functools.partial):
        func = func.func
    return getattr(func, "__self__", func)  # MLP.as_mlp_submodule -> MLP


def mlp_spec_class(spec) -> Optional[type]:
    """The module class an MLP-slot spec builds: ModuleSpec.module, a partial's class, or a class."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    if spec is None:
        return None
    if isinstance(spec, ModuleSpec):
        return spec.module if isinstance(spec.module, type) else None
    target = _builder_func(spec)
    return target if isinstance(target, type) else None


def mlp_spec_submodules(spec):
    """The submodules dataclass of an MLP-slot spec (None when it has none)."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(spec, ModuleSpec):
        return spec.submodules
    if isinstance(spec, functools.partial):
        return spec.keywords.get("submodules")
    return None


def with_mlp_submodules(spec, submodules):
    """A copy of an MLP-slot spec (either form) with other submodules."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(spec, ModuleSpec):
        spec = copy.copy(spec)
        spec.submodules = submodules
        return spec
    if isinstance(spec, functools.partial):
        return functools.partial(spec.func, *spec.args, **{**spec.keywords, "submodules": submodules})
    raise TypeError(f"cannot set submodules on MLP spec {spec!r}")


def build_mlp(spec, config, pg_collection=None, is_mtp_layer: bool = False, name=None):
    """Build an MLP/MoE submodule the way the installed TransformerLayer would.

    ModuleSpec form (0.16-0.17): MoE classes take `pg_collection`, dense MLPs `tp_group`.
    Builder form (0.18+): `spec(config=, pg_collection=, is_mtp_layer=, name=)`.
    """
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    pg_collection = pg_collection or default_pg_collection()
    if isinstance(spec, (ModuleSpec, type)):
        from megatron.core.transformer.moe.moe_layer import MoELayer

        cls = mlp_spec_class(spec) if isinstance(spec, ModuleSpec) else spec
        if cls is not None and issubclass(cls, MoELayer):
            return build_module(spec, config=config, pg_collection=pg_collection)
        return build_module(spec, config=config, tp_group=pg_collection.tp)
    return spec(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer, name=name)


# ---------------------------------------------------------------------- process groups
def default_pg_collection():
    """Megatron's process groups from parallel_state (what a module gets when none are passed)."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection.use_mpu_process_groups()


def process_groups(pg_collection=None):
    """(tp, ep, expt_dp) groups: from `pg_collection` when given (0.18+ pass one to MLP-slot
    modules), else from parallel_state; None when model parallelism is not initialized."""
    if pg_collection is not None and all(
        getattr(pg_collection, a, None) is not None for a in ("tp", "ep")
    ):
        return pg_collection.tp, pg_collection.ep, getattr(pg_collection, "expt_dp", None)
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    return (
        parallel_state.get_tensor_model_parallel_group(),
        parallel_state.get_expert_model_parallel_group(),
        parallel_state.get_expert_data_parallel_group(),
    )


# ---------------------------------------------------------------------- Muon exclusion
def muon_honours_use_muon() -> bool:
    """True when Megatron's Muon keeps `param.use_muon = False` parameters out of orthogonalization
    and out of the layer-wise optimizer's Muon buffers: megatron-core 0.20+, whose emerging-optimizer
    registry routes by `_is_muon_excluded` (tests/test_compat.py pins both effects)."""
    try:
        from megatron.core.optimizer import emerging_optimizers
    except ImportError:  # 0.16: no emerging-optimizer registry
        return False
    return hasattr(emerging_optimizers, "_is_muon_excluded")


# ---------------------------------------------------------------------- aux-loss tracker
def _metrics_tracker():
    try:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    except ImportError:
        return None
    return get_moe_metrics_tracker()


def _entry_values(entry):
    values = getattr(entry, "values", None)  # 0.18+: a MetricEntry; before: a dict
    return entry["values"] if isinstance(entry, dict) else values


def record_aux_loss(name: str, value, layer_number: int, num_layers: int) -> None:
    """Report a per-layer loss to Megatron's MoE metrics tracker (for its logging).

    An entry sized for another model's layer count (a second model in the same process) is
    replaced: Megatron's tracker sizes an entry once, on its first record.
    """
    entry = aux_loss_entries().get(name)
    if entry is not None and _entry_values(entry).numel() != num_layers:
        discard_aux_loss(name)
    tracker = _metrics_tracker()
    if tracker is not None:
        tracker.record(name=name, value=value, layer_number=layer_number, num_layers=num_layers)
        return
    from megatron.core.transformer.moe.moe_utils import save_to_aux_losses_tracker

    save_to_aux_losses_tracker(name, value, layer_number, num_layers)


def aux_loss_entries() -> dict:
    """The tracker's entries by name ({name: entry}); an entry's `values` are per layer."""
    tracker = _metrics_tracker()
    if tracker is not None:
        return tracker.metrics
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    return get_moe_layer_wise_logging_tracker()


def discard_aux_loss(name: str) -> None:
    """Remove one entry from Megatron's MoE metrics tracker."""
    aux_loss_entries().pop(name, None)
