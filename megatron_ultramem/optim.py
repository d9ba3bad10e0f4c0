"""The value table's own learning rate (ULTRAMEM.md, "Value learning rate").

lr_V(step) = lr(step) * value_lr_multiplier(step), with

    value_lr_multiplier(step) = 1 + (rho0 - 1) * max(0, 1 - step / (rate * max_steps))

(rho0 = `ultramem_value_lr_mult`, rate = `ultramem_value_lr_decay_rate`). Under Adam a gradient scale
does nothing, so the values must sit in their own optimizer param group(s) whose LR is multiplied.
This module gives that in the three places it is needed:

- `param_groups(model, ...)`: groups for a plain torch optimizer (the plugin's own training job:
  torch AdamW + Megatron's OptimizerParamScheduler, or `UltraMemParamScheduler`).
- `value_config_overrides(...)` / `add_value_config_overrides(...)`: `config_overrides` entries for
  Megatron-Core's `get_megatron_optimizer` (0.16+: `{ParamKey: ParamGroupOverride}`), which give the
  values their own group in the Float16/FP32 optimizer and in DistributedOptimizer alike.
- `UltraMemParamScheduler`: an `OptimizerParamScheduler` that multiplies the LR of every group flagged
  `ultramem_value` and saves/restores the multiplier's settings in its state_dict.

The flag is read in one place (`is_value_group`); the parameter tag (`is_ultramem_value`, set by
UltraMemLayer on `values`) is read in one place (`is_value_param`).
"""

from typing import Dict, Iterable, List, Optional, Union

import torch

VALUE_PARAM_ATTR = "is_ultramem_value"
"""Attribute UltraMemLayer sets on its value table (`values.is_ultramem_value = True`)."""

VALUE_GROUP_KEY = "ultramem_value"
"""Param-group key that marks a group holding value tables (read by UltraMemParamScheduler)."""

__all__ = [
    "VALUE_PARAM_ATTR",
    "VALUE_GROUP_KEY",
    "value_lr_multiplier",
    "is_value_param",
    "is_value_group",
    "param_groups",
    "value_config_overrides",
    "add_value_config_overrides",
    "UltraMemParamScheduler",
]


def value_lr_multiplier(step: float, rho0: float, rate: float, max_steps: float) -> float:
    """1 + (rho0 - 1) * max(0, 1 - step / (rate * max_steps)): rho0 at step 0, 1 from rate*max_steps.

    `step` and `max_steps` are in the same unit (Megatron-LM's scheduler counts samples).
    """
    if rate <= 0 or max_steps <= 0:
        raise ValueError(
            f"value_lr_multiplier needs rate > 0 and max_steps > 0, got {rate}, {max_steps}"
        )
    return 1.0 + (rho0 - 1.0) * max(0.0, 1.0 - float(step) / (rate * max_steps))


def is_value_param(param: torch.Tensor) -> bool:
    """True for UltraMem value tables (the tag set where the parameter is created)."""
    return bool(getattr(param, VALUE_PARAM_ATTR, False))


def is_value_group(group: dict) -> bool:
    """True for param groups that hold UltraMem value tables."""
    return bool(group.get(VALUE_GROUP_KEY, False))


def _no_weight_decay(name: str, param: torch.Tensor) -> bool:
    # Megatron's standard rule (get_standard_config_overrides): biases and 1-D tensors (norms).
    return param.dim() == 1 or name.endswith(".bias")


def param_groups(
    model: Union[torch.nn.Module, Iterable[torch.nn.Module]],
    weight_decay: float,
    value_weight_decay: Union[bool, float] = False,
) -> List[Dict]:
    """Param groups for a torch optimizer, with the value tables in their own group.

    Groups (empty ones are left out), in this order:
      1. weight-decayed params ('wd_mult' 1.0);
      2. biases and 1-D params, no weight decay ('wd_mult' 0.0);
      3. value tables ('ultramem_value': True), weight decay per `value_weight_decay`: False -> 0
         (default: each row sees few updates), True -> `weight_decay`, a float -> that value.

    Each group carries 'weight_decay' for a bare torch optimizer and 'wd_mult' for Megatron's
    OptimizerParamScheduler, which sets weight_decay = wd(step) * wd_mult on every step.
    Precondition: call before building the optimizer; `model` may be one module or a list of chunks.
    """
    modules = [model] if isinstance(model, torch.nn.Module) else list(model)
    decay, no_decay, values = [], [], []
    seen = set()
    for module in modules:
        for name, param in module.named_parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if is_value_param(param):
                values.append(param)
            elif _no_weight_decay(name, param):
                no_decay.append(param)
            else:
                decay.append(param)
    if isinstance(value_weight_decay, bool):
        value_wd = weight_decay if value_weight_decay else 0.0
    else:
        value_wd = float(value_weight_decay)
    if weight_decay > 0:
        value_wd_mult = value_wd / weight_decay
    else:
        value_wd_mult = 0.0 if value_wd == 0 else 1.0
    groups = [
        {"params": decay, "weight_decay": weight_decay, "wd_mult": 1.0, VALUE_GROUP_KEY: False},
        {"params": no_decay, "weight_decay": 0.0, "wd_mult": 0.0, VALUE_GROUP_KEY: False},
        {
            "params": values,
            "weight_decay": value_wd,
            "wd_mult": value_wd_mult,
            VALUE_GROUP_KEY: True,
        },
    ]
    return [g for g in groups if g["params"]]


# ---------------------------------------------------------------------- Megatron-Core optimizer
def value_config_overrides(value_lr_mult: float, value_weight_decay: bool = False) -> Dict:
    """`config_overrides` entries for `get_megatron_optimizer` that give the values their own group.

    Returns {ParamKey(attr='is_ultramem_value'): ParamGroupOverride(...)} (megatron-core >= 0.16), or
    {} when no separate group is needed (rho0 == 1 and the values decay like other matrices).

    The override sets, on the value group:
      'ultramem_value': True  -- read by UltraMemParamScheduler;
      'wd_mult': 0.0          -- unless value_weight_decay;
      'lr_mult': rho0         -- Megatron 0.16-0.18 match saved and current param groups on
                                 (wd_mult, lr_mult, is_expert_parallel, is_decoupled_lr) when loading
                                 a checkpoint; a value group equal to another group on those keys
                                 would be loaded into the wrong group (and lose its flag). The
                                 schedulers of megatron-core 0.16-0.19 do not read lr_mult.
    With rho0 == 1 the multiplier is 1 at every step and the values need no flag: they get only the
    no-weight-decay override, which is the exact override Megatron already gives biases and norms,
    so they join that group instead of making a look-alike one.
    """
    from megatron.core.optimizer import ParamKey
    from megatron.core.optimizer_param_scheduler import ParamGroupOverride

    key = ParamKey(attr=VALUE_PARAM_ATTR)
    if float(value_lr_mult) == 1.0:
        return {} if value_weight_decay else {key: ParamGroupOverride(wd_mult=0.0)}
    override = ParamGroupOverride(lr_mult=float(value_lr_mult))
    override[VALUE_GROUP_KEY] = True
    if not value_weight_decay:
        override["wd_mult"] = 0.0
    return {key: override}


def add_value_config_overrides(
    config_overrides: Optional[Dict],
    optimizer_config,
    value_lr_mult: float,
    value_weight_decay=False,
) -> Dict:
    """Megatron's overrides (the standard ones when `config_overrides` is None) plus the value group.

    `get_megatron_optimizer(config, model, config_overrides=None)` falls back to
    `get_standard_config_overrides(config)`; this returns that default explicitly, so adding the
    value override does not silently drop Megatron's no-weight-decay rule for biases and norms.
    """
    if config_overrides is None:
        from megatron.core.optimizer import get_standard_config_overrides

        config_overrides = get_standard_config_overrides(config=optimizer_config)
    merged = dict(config_overrides)
    merged.update(value_config_overrides(value_lr_mult, value_weight_decay))
    return merged


# ---------------------------------------------------------------------- scheduler
def _scheduler_base():
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler


class UltraMemParamScheduler(_scheduler_base()):
    """Megatron's OptimizerParamScheduler with the value-table LR multiplier.

    Every param group flagged 'ultramem_value' gets lr = base_lr(step) * value_lr_multiplier(step);
    other groups are scheduled exactly as by OptimizerParamScheduler.

    Args (beyond OptimizerParamScheduler's):
        value_lr_mult: rho0, the multiplier at step 0 (UltraMemConfig.ultramem_value_lr_mult).
        value_lr_decay_rate: rate; the multiplier reaches 1 at step rate * value_lr_max_steps.
        value_lr_max_steps: max_steps in the scheduler's unit (Megatron-LM counts samples: use
            train_iters * global_batch_size); None means lr_decay_steps.

    state_dict() adds the three settings; load_state_dict() restores them with the same
    use-checkpoint / override semantics as the base class, then recomputes every group's LR, so a
    resumed run has the LRs of the run that saved.
    """

    def __init__(
        self,
        optimizer,
        *args,
        value_lr_mult: float = 4.0,
        value_lr_decay_rate: float = 1.0,
        value_lr_max_steps: Optional[float] = None,
        **kwargs,
    ):
        # The base __init__ calls self.step(0), which needs the multiplier settings.
        self._init_value_lr(value_lr_mult, value_lr_decay_rate, value_lr_max_steps)
        super().__init__(optimizer, *args, **kwargs)
        if self.value_lr_max_steps is None:
            self.value_lr_max_steps = self.lr_decay_steps  # what step(0) above already used

    def _init_value_lr(self, value_lr_mult, value_lr_decay_rate, value_lr_max_steps):
        if value_lr_mult <= 0:
            raise ValueError(f"value_lr_mult (rho0) must be > 0, got {value_lr_mult}")
        if value_lr_decay_rate <= 0:
            raise ValueError(f"value_lr_decay_rate must be > 0, got {value_lr_decay_rate}")
        if value_lr_max_steps is not None and value_lr_max_steps <= 0:
            raise ValueError(f"value_lr_max_steps must be > 0, got {value_lr_max_steps}")
        self.value_lr_mult = float(value_lr_mult)
        self.value_lr_decay_rate = float(value_lr_decay_rate)
        self.value_lr_max_steps = value_lr_max_steps

    @classmethod
    def from_scheduler(
        cls,
        scheduler,
        value_lr_mult: float,
        value_lr_decay_rate: float = 1.0,
        value_lr_max_steps: Optional[float] = None,
    ) -> "UltraMemParamScheduler":
        """An UltraMemParamScheduler with the state and settings of an existing scheduler.

        Used by the Megatron-LM hook, which receives the scheduler Megatron built from its own
        arguments; copying its attributes keeps every base setting without re-deriving it.
        """
        new = cls.__new__(cls)
        new.__dict__.update(scheduler.__dict__)
        new._init_value_lr(value_lr_mult, value_lr_decay_rate, value_lr_max_steps)
        if new.value_lr_max_steps is None:
            new.value_lr_max_steps = new.lr_decay_steps
        new.step(0)
        return new

    def value_lr_multiplier(self) -> float:
        """The multiplier at the current step."""
        max_steps = self.value_lr_max_steps
        if max_steps is None:  # only while the base __init__ runs its first step(0)
            max_steps = self.lr_decay_steps
        return value_lr_multiplier(
            self.num_steps, self.value_lr_mult, self.value_lr_decay_rate, max_steps
        )

    def get_lr(self, param_group: dict) -> float:
        lr = super().get_lr(param_group)
        if is_value_group(param_group):
            lr = lr * self.value_lr_multiplier()
        return lr

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["ultramem_value_lr_mult"] = self.value_lr_mult
        state["ultramem_value_lr_decay_rate"] = self.value_lr_decay_rate
        state["ultramem_value_lr_max_steps"] = self.value_lr_max_steps
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        # Set the multiplier first: the base class ends with self.step(num_steps), which
        # recomputes every group's LR with it.
        if "ultramem_value_lr_mult" in state_dict:
            self.value_lr_mult = self._check_and_set(
                self.value_lr_mult, state_dict["ultramem_value_lr_mult"], "value LR multiplier"
            )
            self.value_lr_decay_rate = self._check_and_set(
                self.value_lr_decay_rate,
                state_dict["ultramem_value_lr_decay_rate"],
                "value LR decay rate",
            )
            self.value_lr_max_steps = self._check_and_set(
                self.value_lr_max_steps,
                state_dict["ultramem_value_lr_max_steps"],
                "value LR max steps",
            )
        super().load_state_dict(state_dict)
