"""Value-table learning rate: the multiplier's formula, the param groups, the scheduler (with resume),
and the Megatron-Core optimizer overrides.

    python -m pytest -q tests/test_optim.py
"""

import math

import pytest
import torch

from megatron_ultramem.optim import (
    UltraMemParamScheduler,
    is_value_group,
    param_groups,
    value_config_overrides,
    value_lr_multiplier,
)


def formula(step, rho0, rate, max_steps):  # ULTRAMEM.md, written out independently
    return 1 + (rho0 - 1) * max(0.0, 1 - step / (rate * max_steps))


@pytest.mark.parametrize("rho0,rate", [(4.0, 1.0), (10.0, 0.5), (1.0, 1.0), (0.5, 2.0)])
def test_multiplier_formula(rho0, rate):
    for step in (0, 1, 37, 250, 499, 500, 1000, 5000):
        assert value_lr_multiplier(step, rho0, rate, 1000) == pytest.approx(
            formula(step, rho0, rate, 1000)
        )
    assert value_lr_multiplier(0, rho0, rate, 1000) == pytest.approx(rho0)
    assert value_lr_multiplier(rate * 1000, rho0, rate, 1000) == pytest.approx(1.0)
    assert value_lr_multiplier(10 * rate * 1000, rho0, rate, 1000) == pytest.approx(1.0)


def test_multiplier_rejects_bad_settings():
    with pytest.raises(ValueError):
        value_lr_multiplier(0, 4.0, 0.0, 100)
    with pytest.raises(ValueError):
        value_lr_multiplier(0, 4.0, 1.0, 0)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)  # weight decays, bias does not
        self.norm = torch.nn.LayerNorm(3)  # 1-D: no decay
        self.values = torch.nn.Parameter(torch.zeros(5, 2))
        self.values.is_ultramem_value = True
        self.frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)


def test_param_groups_split_values():
    m = Tiny()
    groups = param_groups(m, weight_decay=0.1)
    assert [len(g["params"]) for g in groups] == [1, 3, 1]
    decay, no_decay, values = groups
    assert (
        decay["params"][0] is m.lin.weight
        and decay["weight_decay"] == 0.1
        and decay["wd_mult"] == 1.0
    )
    assert {id(p) for p in no_decay["params"]} == {
        id(m.lin.bias),
        id(m.norm.weight),
        id(m.norm.bias),
    }
    assert no_decay["wd_mult"] == 0.0 and not is_value_group(no_decay)
    assert values["params"][0] is m.values and is_value_group(values)
    assert values["weight_decay"] == 0.0 and values["wd_mult"] == 0.0
    on = param_groups([m], weight_decay=0.1, value_weight_decay=True)[-1]
    assert on["weight_decay"] == 0.1 and on["wd_mult"] == 1.0
    half = param_groups(m, weight_decay=0.1, value_weight_decay=0.05)[-1]
    assert half["weight_decay"] == 0.05 and half["wd_mult"] == pytest.approx(0.5)
    torch.optim.AdamW(groups, lr=1e-3)  # a torch optimizer accepts them as they are


def base_lr(step, max_lr=1e-3, min_lr=1e-4, warmup=10, decay=100):
    """Megatron's warmup + cosine schedule, written out independently (init_lr 0)."""
    if step <= warmup:
        return max_lr * step / warmup
    if step > decay:
        return min_lr
    ratio = (step - warmup) / (decay - warmup)
    return min_lr + 0.5 * (math.cos(math.pi * ratio) + 1) * (max_lr - min_lr)


def make(model=None, **kw):
    model = model or Tiny()
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=0.0)
    sched = UltraMemParamScheduler(
        opt,
        init_lr=0.0,
        max_lr=1e-3,
        min_lr=1e-4,
        lr_warmup_steps=10,
        lr_decay_steps=100,
        lr_decay_style="cosine",
        start_wd=0.1,
        end_wd=0.1,
        wd_incr_steps=100,
        wd_incr_style="constant",
        value_lr_mult=kw.pop("value_lr_mult", 4.0),
        value_lr_decay_rate=kw.pop("value_lr_decay_rate", 0.5),
        **kw,
    )
    return opt, sched


def lrs(opt):
    return [(is_value_group(g), g["lr"], g["weight_decay"]) for g in opt.param_groups]


def test_scheduler_multiplies_value_groups_only():
    opt, sched = make()
    for step in range(0, 130):
        if step:
            sched.step(1)
        for is_value, lr, wd in lrs(opt):
            want = base_lr(step) * (formula(step, 4.0, 0.5, 100) if is_value else 1.0)
            assert lr == pytest.approx(want, rel=1e-12, abs=1e-18), (step, is_value)
        assert [wd for _, _, wd in lrs(opt)] == pytest.approx([0.1, 0.0, 0.0])
    assert sched.value_lr_max_steps == 100  # default: lr_decay_steps


def test_scheduler_resume_gives_the_same_lrs():
    opt_a, sched_a = make(value_lr_max_steps=80)
    for _ in range(37):
        sched_a.step(1)
    state = sched_a.state_dict()
    assert state["ultramem_value_lr_mult"] == 4.0 and state["ultramem_value_lr_max_steps"] == 80
    opt_b, sched_b = make(value_lr_max_steps=80)
    sched_b.load_state_dict(state)
    assert lrs(opt_b) == lrs(opt_a)
    for _ in range(20):
        sched_a.step(1)
        sched_b.step(1)
        assert lrs(opt_b) == lrs(opt_a)


def test_resume_takes_checkpoint_settings_unless_overridden():
    opt_a, sched_a = make(value_lr_mult=10.0)
    for _ in range(5):
        sched_a.step(1)
    opt_b, sched_b = make(value_lr_mult=2.0)  # use_checkpoint_opt_param_scheduler=True (default)
    sched_b.load_state_dict(sched_a.state_dict())
    assert sched_b.value_lr_mult == 10.0 and lrs(opt_b) == lrs(opt_a)
    opt_c, sched_c = make(
        value_lr_mult=2.0,
        override_opt_param_scheduler=True,
        use_checkpoint_opt_param_scheduler=False,
    )
    sched_c.load_state_dict(sched_a.state_dict())
    assert sched_c.value_lr_mult == 2.0
    value_lr = [lr for v, lr, _ in lrs(opt_c) if v][0]
    assert value_lr == pytest.approx(base_lr(5) * formula(5, 2.0, 0.5, 100))


def test_from_scheduler_keeps_base_schedule():
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    opt = torch.optim.AdamW(param_groups(Tiny(), 0.1), lr=0.0)
    base = OptimizerParamScheduler(
        opt, 0.0, 1e-3, 1e-4, 10, 100, "cosine", 0.1, 0.1, 100, "constant"
    )
    for _ in range(30):
        base.step(1)
    sched = UltraMemParamScheduler.from_scheduler(base, 4.0, 1.0, value_lr_max_steps=200)
    assert sched.num_steps == 30
    for is_value, lr, _ in lrs(opt):
        assert lr == pytest.approx(base_lr(30) * (formula(30, 4.0, 1.0, 200) if is_value else 1.0))


def test_megatron_param_groups_give_values_their_own_group(megatron_world):
    from megatron.core.optimizer import AdamOptimizerConfig, _get_param_groups
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    from megatron_ultramem.optim import add_value_config_overrides

    m = Tiny()
    config = AdamOptimizerConfig(lr=1e-3, min_lr=1e-4, weight_decay=0.1)
    groups = _get_param_groups([m], config, add_value_config_overrides(None, config, 4.0))
    value_groups = [g for g in groups if is_value_group(g)]
    assert len(value_groups) == 1 and value_groups[0]["params"] == [m.values]
    assert value_groups[0]["wd_mult"] == 0.0 and value_groups[0]["lr_mult"] == 4.0
    # Megatron matches checkpointed groups on these keys (0.16: 4 keys; 0.19 adds the override
    # keys and treats a missing key as None): each group must be unique on them.
    idents = [tuple(g.get(k) for k in param_group_identifier_keys) for g in groups]
    assert len(set(idents)) == len(idents)
    # Megatron's own no-weight-decay rule is kept (default overrides filled in).
    bias_group = next(g for g in groups if any(p is m.lin.bias for p in g["params"]))
    assert bias_group["wd_mult"] == 0.0
    # With value weight decay on, the group decays like the other matrices.
    groups = _get_param_groups([m], config, add_value_config_overrides(None, config, 4.0, True))
    assert next(g for g in groups if is_value_group(g))["wd_mult"] == 1.0


def test_multiplier_one_needs_no_separate_group(megatron_world):
    from megatron.core.optimizer import AdamOptimizerConfig, _get_param_groups

    from megatron_ultramem.optim import add_value_config_overrides

    m = Tiny()
    config = AdamOptimizerConfig(lr=1e-3, weight_decay=0.1)
    assert value_config_overrides(1.0, value_weight_decay=True) == {}
    groups = _get_param_groups([m], config, add_value_config_overrides(None, config, 1.0))
    assert not any(is_value_group(g) for g in groups)
    group = next(g for g in groups if any(p is m.values for p in g["params"]))
    assert any(p is m.lin.bias for p in group["params"])  # joined the no-weight-decay group
