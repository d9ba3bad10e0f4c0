"""UltraMem's once-per-step work and logging inside Megatron-LM's training loop, without patching it.

What runs where (Megatron-LM core_r0.16.0 `megatron/training/training.py`; the loop's source is not
touched, module attributes it looks up at call time are wrapped):

    get_megatron_optimizer / get_megatron_muon_optimizer
        -> the value tables get their own param group (optim.value_config_overrides), and the
           returned optimizer's `step` refreshes the Tucker vectors after every successful update.
    get_optimizer_param_scheduler
        -> the scheduler becomes an optim.UltraMemParamScheduler (value-table LR multiplier).
    training_log (called every iteration on every rank)
        -> at every --tensorboard-log-interval: Tucker aux loss, singular values of each head's
           summed core, fraction of the value table touched since the last log, mean top-1 and
           top-m scores, value LR, written to Megatron's TensorBoard / W&B writers.
    initialize.validate_args
        -> also runs validate_ultramem_args.

Every wrapper is a pass-through unless `--spec` selects the UltraMem spec, so installing the hooks
is harmless for other models. Patching follows STYLE.md: idempotent (marker attribute), reversible
(original kept as `__wrapped__`, `uninstall_megatron_lm_hooks()`), done before the model is built.

Tucker refresh timing. `refresh_tucker_vectors()` must see the updated cores. Without
--overlap-param-gather the optimizer step leaves the model parameters updated, and the refresh runs
right after it. With --overlap-param-gather (DistributedOptimizer) the updated parameters arrive
through an all-gather that Megatron's DDP waits for in a forward pre-hook; the refresh then runs in a
one-shot forward pre-hook registered after the step, i.e. after DDP's own hook, before the layer's
next forward.

Retrieval statistics protocol. A layer may provide

    retrieval_stats(reset: bool = True) -> dict with
        'touched':         bool tensor [N], physical value rows selected since the last reset
        'top1_score_sum':  sum over (token, head) of the best summed score (tensor or float)
        'topm_score_sum':  sum over (token, head) of the m-th best summed score
        'num_queries':     number of (token, head) pairs summed

(all for this rank; the logger reduces across ranks: OR of 'touched', sums of the rest). Layers
without it get a `RetrievalStatsRecorder` that wraps the instance's `retrieve` to collect the same.
"""

import contextlib
import functools
import inspect
from typing import Dict, Iterable, List, Optional

import torch

from ..optim import UltraMemParamScheduler, add_value_config_overrides, is_value_group
from ..warn import warn_user
from .arguments import add_ultramem_args, chain_args_providers, ultramem_spec_in_use

_MARK = "_ultramem_hook"
TRACKER_NAME = "ultramem_tucker_loss"  # the name UltraMemLayer gives Megatron's aux-loss tracker


# ---------------------------------------------------------------------- layers
def find_ultramem_layers(model) -> List[torch.nn.Module]:
    """UltraMemLayer modules in a module or a list of model chunks (DDP/Float16 wrappers included)."""
    from ..layer import UltraMemLayer

    chunks = model if isinstance(model, (list, tuple)) else [model]
    layers, seen = [], set()
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, UltraMemLayer) and id(module) not in seen:
                seen.add(id(module))
                layers.append(module)
    return layers


def _layer_id(layer) -> int:
    """1-based global layer number (set by TransformerLayer), else layer_index + 1."""
    number = getattr(layer, "layer_number", None)
    return int(number) if number is not None else int(getattr(layer, "layer_index", 0)) + 1


def refresh_tucker_vectors(layers: Iterable[torch.nn.Module]) -> Dict[int, torch.Tensor]:
    """Call refresh_tucker_vectors() on every layer; {layer number: singular values [H, r]}."""
    return {_layer_id(layer): layer.refresh_tucker_vectors() for layer in layers}


def _update_successful(result) -> bool:
    # Megatron optimizers return (update_successful, grad_norm, num_zeros_in_grad); torch ones
    # return None (or the closure's loss).
    if isinstance(result, tuple) and result and isinstance(result[0], bool):
        return result[0]
    return True


# ---------------------------------------------------------------------- retrieval statistics
class RetrievalStatsRecorder:
    """Collects the retrieval-statistics protocol for a layer that does not implement it.

    Wraps the layer instance's `retrieve` (the class is untouched; `stop()` restores it) and records
    which physical rows the winners map to and the best / m-th best summed score per (token, head).
    Cost per forward: one scatter into a [N] mask and two reductions over [T, H, m].
    """

    def __init__(self, layer):
        self.layer = layer
        self._touched = None
        self._sums = None  # [top1 sum, top-m sum, count], float64 on the layer's device
        original = layer.retrieve

        @functools.wraps(original)
        def retrieve(x):
            virtual, scores = original(x)
            self.record(virtual, scores)
            return virtual, scores

        retrieve.__wrapped__ = original
        self._original = original
        layer.retrieve = retrieve

    def stop(self) -> None:
        if self.layer.__dict__.get("retrieve") is not None:
            del self.layer.retrieve

    @torch.no_grad()
    def record(self, virtual: torch.Tensor, scores: torch.Tensor) -> None:
        """virtual [T, H*m] indices, scores [T, H*m, h] per-core scores of the winners."""
        from ..reference import virtual_to_physical

        layer = self.layer
        if self._touched is None:
            self._touched = torch.zeros(layer.N, dtype=torch.bool, device=virtual.device)
            self._sums = torch.zeros(3, dtype=torch.float64, device=virtual.device)
        rows, _ = virtual_to_physical(virtual, layer.permutation, layer.N)
        self._touched[rows.reshape(-1)] = True
        summed = scores.float().sum(-1).reshape(-1, layer.H, layer.m)  # [T, H, m]
        self._sums[0] += summed.amax(-1).sum().double()
        self._sums[1] += summed.amin(-1).sum().double()
        self._sums[2] += summed.shape[0] * summed.shape[1]

    def retrieval_stats(self, reset: bool = True) -> dict:
        device = self.layer.values.device
        touched = (
            self._touched
            if self._touched is not None
            else torch.zeros(self.layer.N, dtype=torch.bool, device=device)
        )
        sums = (
            self._sums
            if self._sums is not None
            else torch.zeros(3, dtype=torch.float64, device=device)
        )
        stats = {
            "touched": touched.clone(),
            "top1_score_sum": sums[0].clone(),
            "topm_score_sum": sums[1].clone(),
            "num_queries": sums[2].clone(),
        }
        if reset and self._touched is not None:
            self._touched.zero_()
            self._sums.zero_()
        return stats


# ---------------------------------------------------------------------- the per-run state
class UltraMemTrainingHooks:
    """Tucker refresh after each optimizer step, and the UltraMem metrics for the logs.

    Usable outside Megatron-LM too: `hooks.attach(model)`, `hooks.wrap_optimizer(optimizer)` (or call
    `hooks.on_step()` after each step), `hooks.log(iteration, writer)`.
    """

    def __init__(self, log_stats: bool = True, per_layer_logging: bool = False):
        self.log_stats = log_stats
        self.per_layer_logging = per_layer_logging
        self.layers: List[torch.nn.Module] = []
        self.optimizer = None
        self.scheduler = None
        self.defer_refresh = False
        self._recorders: Dict[int, RetrievalStatsRecorder] = {}
        self._pending: Dict[int, object] = {}  # id(layer) -> one-shot pre-hook handle
        self.steps = 0

    # --------------------------------------------------------------- wiring
    def attach(self, model, defer_refresh: Optional[bool] = None) -> "UltraMemTrainingHooks":
        """Find the memory layers of `model` (a module or model chunks). Call once the model exists."""
        if defer_refresh is not None:
            self.defer_refresh = defer_refresh
        known = {id(layer) for layer in self.layers}
        for layer in find_ultramem_layers(model):
            if id(layer) in known:
                continue
            self.layers.append(layer)
            if self.log_stats and not hasattr(layer, "retrieval_stats"):
                self._recorders[id(layer)] = RetrievalStatsRecorder(layer)
        return self

    def wrap_optimizer(self, optimizer):
        """Make `optimizer.step()` call `on_step` after every successful update (idempotent)."""
        self.optimizer = optimizer
        step = optimizer.step
        if getattr(step, _MARK, False):
            return optimizer

        @functools.wraps(step)
        def wrapped(*args, **kwargs):
            result = step(*args, **kwargs)
            if _update_successful(result):
                self.on_step()
            return result

        setattr(wrapped, _MARK, True)
        wrapped.__wrapped__ = step
        optimizer.step = wrapped
        return optimizer

    def on_step(self) -> None:
        """The once-per-optimizer-step work: refresh every layer's Tucker vectors."""
        self.steps += 1
        if not self.defer_refresh:
            refresh_tucker_vectors(self.layers)
            return
        for layer in self.layers:
            if id(layer) not in self._pending:
                self._pending[id(layer)] = layer.register_forward_pre_hook(self._deferred_refresh)

    def _deferred_refresh(self, layer, args):
        handle = self._pending.pop(id(layer), None)
        if handle is not None:
            handle.remove()
        layer.refresh_tucker_vectors()

    # --------------------------------------------------------------- metrics
    def _local_metrics(self) -> Dict[int, dict]:
        out = {}
        for layer in self.layers:
            entry = {}
            with torch.no_grad():
                if hasattr(layer, "tucker_aux_loss"):
                    entry["aux"] = layer.tucker_aux_loss().detach().float().reshape(())
                entry["sv"] = torch.linalg.svdvals(layer.cores.detach().float().sum(1))  # [H, r]
            if self.log_stats:
                source = (
                    layer if hasattr(layer, "retrieval_stats") else self._recorders.get(id(layer))
                )
                if source is not None:
                    entry["stats"] = source.retrieval_stats(reset=True)
            out[_layer_id(layer)] = entry
        return out

    def collect(self) -> Dict[int, dict]:
        """Metrics of every memory layer of the model, reduced over all ranks (a collective: call on
        every rank). {layer number: {'aux', 'sv' [H, r], 'touched_fraction', 'top1_score',
        'topm_score'}} with plain floats / CPU tensors."""
        local = self._local_metrics()
        dist = torch.distributed
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        shapes = {n: (tuple(e["sv"].shape), int(self._num_values(n))) for n, e in local.items()}
        if distributed:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, shapes)
            for part in gathered:
                shapes.update(part)
        numbers = sorted(shapes)
        if not numbers:
            return {}
        (H, r), N = next(iter(shapes.values()))
        device = self._device()
        L = len(numbers)
        maxed = torch.zeros(L, 1 + H * r, device=device)  # aux, sv: replicated -> MAX
        summed = torch.zeros(L, 3, dtype=torch.float64, device=device)
        touched = torch.zeros(L, N, dtype=torch.uint8, device=device)
        has_aux = torch.zeros(L, device=device)
        for i, n in enumerate(numbers):
            e = local.get(n)
            if e is None:
                continue
            if "aux" in e:
                maxed[i, 0] = e["aux"].to(device)
                has_aux[i] = 1
            maxed[i, 1:] = e["sv"].reshape(-1).to(device)
            s = e.get("stats")
            if s is not None:
                touched[i] = s["touched"].to(device=device, dtype=torch.uint8)
                summed[i, 0] = torch.as_tensor(s["top1_score_sum"], dtype=torch.float64)
                summed[i, 1] = torch.as_tensor(s["topm_score_sum"], dtype=torch.float64)
                summed[i, 2] = torch.as_tensor(s["num_queries"], dtype=torch.float64)
        if distributed:
            for t in (maxed, touched, has_aux):
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
            dist.all_reduce(summed)
        maxed, summed, touched, has_aux = maxed.cpu(), summed.cpu(), touched.cpu(), has_aux.cpu()
        result = {}
        for i, n in enumerate(numbers):
            entry = {"sv": maxed[i, 1:].reshape(H, r)}
            if has_aux[i] > 0:
                entry["aux"] = float(maxed[i, 0])
            count = float(summed[i, 2])
            if self.log_stats and count > 0:
                entry["touched_fraction"] = float(touched[i].float().mean())
                entry["top1_score"] = float(summed[i, 0]) / count
                entry["topm_score"] = float(summed[i, 1]) / count
            result[n] = entry
        return result

    def _num_values(self, number: int) -> int:
        for layer in self.layers:
            if _layer_id(layer) == number:
                return layer.N
        raise KeyError(number)

    def _device(self) -> torch.device:
        for layer in self.layers:
            return layer.cores.device
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def value_learning_rate(self) -> Optional[float]:
        if self.optimizer is None:
            return None
        for group in getattr(self.optimizer, "param_groups", []):
            if is_value_group(group):
                return float(group["lr"])
        return None

    def scalars(self, metrics: Dict[int, dict]) -> Dict[str, float]:
        """TensorBoard/W&B names and values for `collect()`'s result."""
        out = {}
        if not metrics:
            return out
        for key, name in (
            ("aux", "tucker_aux_loss"),
            ("touched_fraction", "touched_fraction"),
            ("top1_score", "top1_score"),
            ("topm_score", "topm_score"),
        ):
            values = {n: e[key] for n, e in metrics.items() if key in e}
            if not values:
                continue
            out[f"ultramem/{name}"] = sum(values.values()) / len(values)
            if self.per_layer_logging:
                for n, v in values.items():
                    out[f"ultramem/{name}/layer_{n}"] = v
        for n, e in metrics.items():
            sv = e["sv"]
            for head in range(sv.shape[0]):
                for k in range(sv.shape[1]):
                    out[f"ultramem/singular_values/layer_{n}/head_{head}/sv_{k + 1}"] = float(
                        sv[head, k]
                    )
        lr = self.value_learning_rate()
        if lr is not None:
            out["ultramem/value_learning_rate"] = lr
        return out

    def log(self, iteration: int, writer=None, wandb_writer=None) -> Dict[str, float]:
        """Collect (collective) and write the scalars; returns them."""
        values = self.scalars(self.collect())
        if writer is not None:
            for name, value in values.items():
                writer.add_scalar(name, value, iteration)
        if wandb_writer is not None and values:
            wandb_writer.log(values, iteration)
        return values

    def close(self) -> None:
        for recorder in self._recorders.values():
            recorder.stop()
        self._recorders.clear()
        for handle in self._pending.values():
            handle.remove()
        self._pending.clear()


def discard_tracker_entry() -> None:
    """Remove UltraMem's entry from Megatron's MoE aux-loss tracker.

    UltraMemLayer reports its aux loss there (as MoE layers do), but Megatron only reduces, logs and
    clears that tracker for MoE models, and logs every entry divided by the number of MoE layers.
    The hooks log the aux loss themselves, so the entry is dropped each iteration before
    training_log runs.
    """
    from .. import compat

    compat.discard_aux_loss(TRACKER_NAME)


# ---------------------------------------------------------------------- Megatron-LM wrappers
_HOOKS: Optional[UltraMemTrainingHooks] = None
_INSTALLED: List[tuple] = []  # (module, attribute) pairs, for uninstall


def active_hooks() -> Optional[UltraMemTrainingHooks]:
    """The hooks of the current Megatron-LM run (None before install)."""
    return _HOOKS


def _megatron_args():
    try:
        from megatron.training import get_args

        return get_args()
    except (ImportError, AssertionError):
        return None


def _enabled(args) -> bool:
    return args is not None and ultramem_spec_in_use(args)


def _ensure_hooks(args) -> UltraMemTrainingHooks:
    global _HOOKS
    if _HOOKS is None:
        _HOOKS = UltraMemTrainingHooks(
            log_stats=getattr(args, "ultramem_log_stats", True),
            per_layer_logging=getattr(args, "ultramem_per_layer_logging", False),
        )
    return _HOOKS


def _wrap_get_optimizer(original):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def get_optimizer(*args, **kwargs):
        margs = _megatron_args()
        if not _enabled(margs):
            return original(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        if "config_overrides" in signature.parameters:
            bound.arguments["config_overrides"] = add_value_config_overrides(
                bound.arguments.get("config_overrides"),
                bound.arguments["config"],
                margs.ultramem_value_lr_mult,
                margs.ultramem_value_weight_decay,
            )
        else:
            warn_user(
                f"megatron-ultramem: {original.__name__} takes no config_overrides; the value "
                "tables share the LR of the other parameters"
            )
        optimizer = original(*bound.args, **bound.kwargs)
        hooks = _ensure_hooks(margs)
        model = bound.arguments.get("model_chunks", bound.arguments.get("model"))
        hooks.attach(model, defer_refresh=bool(getattr(margs, "overlap_param_gather", False)))
        hooks.wrap_optimizer(optimizer)
        return optimizer

    return get_optimizer


def _wrap_get_scheduler(original):
    @functools.wraps(original)
    def get_optimizer_param_scheduler(optimizer, *args, **kwargs):
        scheduler = original(optimizer, *args, **kwargs)
        margs = _megatron_args()
        if not _enabled(margs):
            return scheduler
        # max_steps = the whole run in the scheduler's unit (samples): wd_incr_steps is
        # train_iters * global_batch_size (or train_samples) in Megatron-LM.
        scheduler = UltraMemParamScheduler.from_scheduler(
            scheduler,
            margs.ultramem_value_lr_mult,
            margs.ultramem_value_lr_decay_rate,
            value_lr_max_steps=scheduler.wd_incr_steps,
        )
        _ensure_hooks(margs).scheduler = scheduler
        return scheduler

    return get_optimizer_param_scheduler


def memories_in_moe_layers(args) -> List[int]:
    """0-based layers that Megatron-LM's training_log counts as MoE layers but that hold a memory.

    training_log averages the MoE metrics (load-balancing loss, z-loss, ...) over the MoE layers it
    counts from the flags: `--moe-layer-freq` over `--num-layers` for GPT, the `E` symbols of
    `--hybrid-layer-pattern` for HybridModel. With `--ultramem-mode replace` some of those layers
    hold a memory instead and contribute nothing, so the average would be too small.
    """
    if getattr(args, "ultramem_mode", None) != "replace":
        return []  # parallel / skip: memories sit beside dense MLPs only (validated)
    from .arguments import _ArgsView, memory_layer_pattern, moe_layer_pattern

    if _hybrid_pattern(args):
        from ..hybrid import validate_hybrid_pattern

        return validate_hybrid_pattern(_ArgsView(args), _hybrid_pattern(args))
    if not getattr(args, "num_experts", None):
        return []
    moe, memory = moe_layer_pattern(args), memory_layer_pattern(args)
    return [i for i, (a, b) in enumerate(zip(moe, memory)) if a and b]


@contextlib.contextmanager
def moe_layer_count_without_memories(args):
    """While the block runs, the flags training_log counts MoE layers from leave out the memories.

    GPT: `args.moe_layer_freq` becomes the 0/1 list of the remaining MoE layers. HybridModel: the
    memories' `E` symbols in `args.hybrid_layer_pattern` become `-` (counted as dense MLP layers,
    which is what the memory's slot is in Megatron's FLOP terms too). With no MoE layer left,
    `args.num_experts` is None, so training_log reports no MoE metrics (megatron-core 0.20 raises
    "MoE metrics require at least one MoE layer" otherwise). Everything is restored afterwards.
    """
    memories = memories_in_moe_layers(args) if getattr(args, "num_experts", None) else []
    if not memories:
        yield
        return
    saved = {k: getattr(args, k) for k in ("moe_layer_freq", "hybrid_layer_pattern", "num_experts")
             if hasattr(args, k)}  # fmt: skip
    try:
        pattern = _hybrid_pattern(args)
        if pattern:
            args.hybrid_layer_pattern = _without_memories(pattern, set(memories))
            left = args.hybrid_layer_pattern.split("/")[0].count("E")
        else:
            from .arguments import moe_layer_pattern

            moe = moe_layer_pattern(args)
            args.moe_layer_freq = [0 if i in memories else m for i, m in enumerate(moe)]
            left = sum(args.moe_layer_freq)
        if left == 0:
            args.num_experts = None
        yield
    finally:
        for k, v in saved.items():
            setattr(args, k, v)


def _hybrid_pattern(args) -> Optional[str]:
    """--hybrid-layer-pattern when the HybridModel spec is in use, else None."""
    from .arguments import HYBRID_SPEC_NAME

    if list(getattr(args, "spec", None) or [])[-1:] != [HYBRID_SPEC_NAME]:
        return None
    return getattr(args, "hybrid_layer_pattern", None)


def _without_memories(pattern: str, memories) -> str:
    """The hybrid pattern with the main part's `E` at the memory layers (0-based, '|' skipped) as
    `-`; the MTP part after '/' is kept."""
    main, sep, mtp = pattern.partition("/")
    out, layer = [], 0
    for symbol in main:
        if symbol == "|":
            out.append(symbol)
            continue
        out.append("-" if layer in memories and symbol == "E" else symbol)
        layer += 1
    return "".join(out) + sep + mtp


def _wrap_training_log(original):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def training_log(*args, **kwargs):
        margs = _megatron_args()
        if _enabled(margs):
            discard_tracker_entry()
            iteration = signature.bind(*args, **kwargs).arguments.get("iteration")
            interval = getattr(margs, "tensorboard_log_interval", 1) or 1
            writes = getattr(margs, "tensorboard_dir", None) or getattr(
                margs, "wandb_project", None
            )
            if (
                _HOOKS is not None
                and writes
                and iteration is not None
                and iteration % interval == 0
            ):
                from megatron.training.global_vars import get_tensorboard_writer, get_wandb_writer

                _HOOKS.log(iteration, get_tensorboard_writer(), get_wandb_writer())
            with moe_layer_count_without_memories(margs):
                return original(*args, **kwargs)
        return original(*args, **kwargs)

    return training_log


def _wrap_validate_args(original):
    @functools.wraps(original)
    def validate_args(args, *rest, **kwargs):
        result = original(args, *rest, **kwargs)
        from .arguments import validate_ultramem_args

        validate_ultramem_args(args)
        return result

    return validate_args


def _wrap_parse_args(original):
    @functools.wraps(original)
    def parse_args(extra_args_provider=None, *args, **kwargs):
        return original(
            chain_args_providers(extra_args_provider, add_ultramem_args), *args, **kwargs
        )

    return parse_args


_TARGETS = (
    ("megatron.training.training", "get_megatron_optimizer", _wrap_get_optimizer),
    ("megatron.training.training", "get_megatron_muon_optimizer", _wrap_get_optimizer),
    ("megatron.training.training", "get_optimizer_param_scheduler", _wrap_get_scheduler),
    ("megatron.training.training", "training_log", _wrap_training_log),
    # core_r0.16 initialize_megatron calls initialize's imported validate_args; 0.19's
    # parse_and_validate_args (pretrain_gpt.py / pretrain_hybrid.py) calls arguments.validate_args.
    ("megatron.training.initialize", "validate_args", _wrap_validate_args),
    ("megatron.training.arguments", "validate_args", _wrap_validate_args),
)


_OPTIONAL = (
    # core_r0.16 only: 0.19+ build Muon through get_megatron_optimizer
    ("megatron.training.training.get_megatron_muon_optimizer",),
    # validate_args: imported into initialize (core_r0.16), called from arguments (0.19+)
    ("megatron.training.initialize.validate_args", "megatron.training.arguments.validate_args"),
)
"""Groups of _TARGETS of which a release has at least one (a lone entry: may be absent)."""


def _patch(module, name, make_wrapper) -> bool:
    original = getattr(module, name, None)
    if original is None:
        return False
    if getattr(original, _MARK, False):
        return True
    wrapper = make_wrapper(original)
    setattr(wrapper, _MARK, True)
    wrapper.__wrapped__ = original
    setattr(module, name, wrapper)
    _INSTALLED.append((module, name))
    return True


def install_megatron_lm_hooks(register_args: bool = False) -> List[str]:
    """Install the wrappers listed in the module docstring; returns the ones installed.

    register_args=True also makes every `parse_args` of megatron.training add the --ultramem-*
    flags (what the no-patch entry point needs; the patch passes extra_args_provider instead).
    Call after Megatron-LM is importable and before `pretrain()`. Idempotent.
    """
    import importlib
    import sys

    installed, missing = [], []
    for module_name, name, make_wrapper in _TARGETS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            missing.append(f"{module_name}.{name}")
            continue
        (installed if _patch(module, name, make_wrapper) else missing).append(
            f"{module_name}.{name}"
        )
    # A release has only some of the alternatives (_OPTIONAL): missing only if none is there.
    for group in _OPTIONAL:
        absent = [t for t in group if t in missing]
        if len(group) == 1 or len(absent) < len(group):
            missing = [t for t in missing if t not in absent]
    if register_args:
        arguments = importlib.import_module("megatron.training.arguments")
        original = getattr(arguments.parse_args, "__wrapped__", None) or arguments.parse_args
        # Modules that did `from megatron.training.arguments import parse_args` hold their own
        # reference: patch every loaded megatron module that holds the original.
        for module_name, module in list(sys.modules.items()):
            if (
                module_name.startswith("megatron.")
                and getattr(module, "parse_args", None) is original
            ):
                _patch(module, "parse_args", _wrap_parse_args)
                installed.append(f"{module_name}.parse_args")
    if missing:
        warn_user(
            "megatron-ultramem: these Megatron-LM functions were not found, their UltraMem hooks "
            f"are not installed: {', '.join(missing)}"
        )
    return installed


def uninstall_megatron_lm_hooks() -> None:
    """Restore every wrapped function and detach the hooks from the model."""
    global _HOOKS
    while _INSTALLED:
        module, name = _INSTALLED.pop()
        setattr(module, name, getattr(module, name).__wrapped__)
    if _HOOKS is not None:
        _HOOKS.close()
        _HOOKS = None
