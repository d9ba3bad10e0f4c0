"""The Tucker auxiliary loss's gradient scale under Megatron's pipeline schedules.

UltraMemLayer attaches its aux loss with Megatron's `MoEAuxLossAutoScaler`: identity in forward;
in backward it adds `scale * d(aux)/d(cores)`, where `scale` is a process-wide value that must
match how the schedule scales the main loss's gradient. Megatron's `forward_step_calc_loss` sets it
(the fp16/bf16 loss scale, divided by the number of micro-batches unless
`calculate_per_token_loss`) only when `config.num_moe_experts` is set. In a model without MoE the
scale would stay at its last value (or unset), so the aux gradient would be neither averaged over
micro-batches nor multiplied by the loss scale.

`install_schedule_hook()` wraps `megatron.core.pipeline_parallel.schedules.forward_step_calc_loss`
(megatron-core 0.16 and 0.19 alike; their pipeline and combined-1F1B schedules look it up at call
time) so that, after Megatron's own code, a config without MoE experts gets the scale Megatron gives
MoE models. With MoE experts Megatron has already set the same value, and nothing is changed.
UltraMemLayer installs it when it is built. Idempotent (a marker attribute), reversible
(`uninstall_schedule_hook()`), no effect outside the schedules.

A training loop of its own (the main job runs one micro-batch per step in fp32) sets the scale with
`set_aux_loss_scale`.
"""

import functools
import inspect

import torch

_MARK = "_ultramem_aux_scale_hook"


def set_aux_loss_scale(scale) -> None:
    """Scale of the aux-loss gradient for the next backward passes (what the schedules set)."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    scale = torch.as_tensor(scale, dtype=torch.float32)
    current = MoEAuxLossAutoScaler.main_loss_backward_scale  # set_loss_scale copies into it
    MoEAuxLossAutoScaler.set_loss_scale(scale.reshape(current.shape if current is not None else 1))


def megatron_aux_loss_scale(config, num_microbatches: int, cp_group_size=None, device=None):
    """The scale Megatron's schedules give MoE aux losses (forward_step_calc_loss)."""
    ones = torch.ones(1, device=device)
    scale = config.grad_scale_func(ones) if config.grad_scale_func is not None else ones
    if config.calculate_per_token_loss:
        return scale
    return scale * (cp_group_size or 1) / num_microbatches


def _wrap(original):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def forward_step_calc_loss(*args, **kwargs):
        result = original(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        config = bound.arguments["config"]
        if getattr(config, "num_moe_experts", None) is None:
            output = bound.arguments["output_tensor"]
            device = output.device if isinstance(output, torch.Tensor) else None
            set_aux_loss_scale(
                megatron_aux_loss_scale(
                    config,
                    bound.arguments["num_microbatches"],
                    bound.arguments.get("cp_group_size"),
                    device,
                )
            )
        return result

    setattr(forward_step_calc_loss, _MARK, True)
    forward_step_calc_loss.__wrapped__ = original
    return forward_step_calc_loss


def install_schedule_hook() -> None:
    """Wrap schedules.forward_step_calc_loss (see the module docstring). Idempotent."""
    from megatron.core.pipeline_parallel import schedules

    if not getattr(schedules.forward_step_calc_loss, _MARK, False):
        schedules.forward_step_calc_loss = _wrap(schedules.forward_step_calc_loss)


def uninstall_schedule_hook() -> None:
    from megatron.core.pipeline_parallel import schedules

    if getattr(schedules.forward_step_calc_loss, _MARK, False):
        schedules.forward_step_calc_loss = schedules.forward_step_calc_loss.__wrapped__
