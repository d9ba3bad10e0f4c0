"""Training hooks: Tucker refresh once per optimizer step (immediate and deferred), retrieval
statistics, metrics, and the Megatron-LM wrappers installed on stand-in `megatron.training` modules.

    python -m pytest -q tests/megatron_lm/test_hooks.py
"""

import sys
import types
import warnings
from types import SimpleNamespace

import pytest
import torch

from megatron_ultramem.megatron_lm import hooks as hooks_mod
from megatron_ultramem.megatron_lm.hooks import UltraMemTrainingHooks
from megatron_ultramem.reference import leading_singular_vectors

sys.path.insert(0, __file__.rsplit("/megatron_lm/", 1)[0])
from helpers import small_config  # noqa: E402  (tests/helpers.py)


@pytest.fixture
def layer(megatron_world):
    from megatron_ultramem.layer import UltraMemLayer

    torch.manual_seed(0)
    layer = UltraMemLayer(small_config(), layer_index=1)
    layer.set_layer_number(2)
    return layer


def perturb(layer):
    with torch.no_grad():
        layer.cores.add_(torch.randn_like(layer.cores))


def fresh_u(layer):
    return leading_singular_vectors(layer.cores.detach().sum(1), layer.tucker_u)[0]


def test_step_wrapper_refreshes_after_successful_steps(layer):
    hooks = UltraMemTrainingHooks(log_stats=False).attach(layer)
    results = iter([(True, 1.0, 0), (False, None, None)])
    optimizer = SimpleNamespace(step=lambda: next(results), param_groups=[])
    hooks.wrap_optimizer(optimizer)
    hooks.wrap_optimizer(optimizer)  # idempotent
    perturb(layer)
    assert not torch.allclose(layer.tucker_u, fresh_u(layer))
    assert optimizer.step() == (True, 1.0, 0)
    assert torch.allclose(layer.tucker_u, fresh_u(layer)) and hooks.steps == 1
    before = layer.tucker_u.clone()
    perturb(layer)
    optimizer.step()  # skipped update (e.g. fp16 overflow): no refresh
    assert torch.equal(layer.tucker_u, before) and hooks.steps == 1


def test_deferred_refresh_runs_once_before_the_next_forward(layer):
    hooks = UltraMemTrainingHooks(log_stats=False).attach([layer], defer_refresh=True)
    perturb(layer)
    stale = layer.tucker_u.clone()
    hooks.on_step()
    assert torch.equal(layer.tucker_u, stale)  # parameters may not have arrived yet
    x = torch.randn(3, 2, layer.D)
    layer(x)
    assert torch.allclose(layer.tucker_u, fresh_u(layer))
    assert not layer._forward_pre_hooks  # one-shot hook removed
    hooks.on_step()
    hooks.on_step()  # a second step before any forward: still one hook
    assert len(layer._forward_pre_hooks) == 1
    hooks.close()
    assert not layer._forward_pre_hooks


def test_recorder_statistics_against_a_direct_computation(layer):
    from megatron_ultramem.reference import virtual_to_physical

    hooks = UltraMemTrainingHooks(log_stats=True, per_layer_logging=True).attach(layer)
    assert hasattr(layer, "retrieval_stats") or id(layer) in hooks._recorders
    x = torch.randn(5, 3, layer.D)
    layer.eval()
    with torch.no_grad():
        layer(x)
        virtual, scores = type(layer).retrieve(layer, x.reshape(-1, layer.D))  # unwrapped
    rows, _ = virtual_to_physical(virtual, layer.permutation, layer.N)
    summed = scores.sum(-1).reshape(15, layer.H, layer.m)
    metrics = hooks.collect()
    m = metrics[2]
    assert m["touched_fraction"] == pytest.approx(rows.unique().numel() / layer.N)
    assert m["top1_score"] == pytest.approx(float(summed.max(-1).values.mean()), rel=1e-5)
    assert m["topm_score"] == pytest.approx(float(summed.min(-1).values.mean()), rel=1e-5)
    assert m["aux"] == pytest.approx(float(layer.tucker_aux_loss()))
    assert torch.allclose(m["sv"], torch.linalg.svdvals(layer.cores.detach().sum(1)))
    scalars = hooks.scalars(metrics)
    assert scalars["ultramem/touched_fraction/layer_2"] == m["touched_fraction"]
    assert "ultramem/singular_values/layer_2/head_1/sv_2" in scalars
    again = hooks.collect()[2]  # statistics were reset by the previous collect
    assert "touched_fraction" not in again
    hooks.close()
    assert "retrieve" not in vars(layer)


# ---------------------------------------------------------------------- Megatron-LM wrappers
class Writer:
    def __init__(self):
        self.scalars = {}

    def add_scalar(self, name, value, step):
        self.scalars[name] = (value, step)


@pytest.fixture
def fake_megatron(monkeypatch, layer):
    """Stand-ins for the megatron.training functions the hooks wrap."""
    from megatron_ultramem import compat
    from megatron_ultramem.megatron_lm.arguments import SPEC_MODULE, SPEC_NAME

    state = SimpleNamespace(
        args=SimpleNamespace(
            spec=[SPEC_MODULE, SPEC_NAME],
            ultramem_value_lr_mult=4.0,
            ultramem_value_lr_decay_rate=1.0,
            ultramem_value_weight_decay=False,
            ultramem_log_stats=True,
            ultramem_per_layer_logging=False,
            overlap_param_gather=False,
            tensorboard_log_interval=2,
            tensorboard_dir="/tb",
        ),
        overrides=None,
        writer=Writer(),
        logged=[],
        validated=[],
    )

    def get_megatron_optimizer(
        config, model_chunks, config_overrides=None, use_gloo_process_groups=True
    ):
        state.overrides = config_overrides
        groups = [{"params": [layer.values], "lr": 1.0, "ultramem_value": True}]
        return SimpleNamespace(step=lambda: (True, 0.0, 0), param_groups=groups)

    def get_optimizer_param_scheduler(optimizer):
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        return OptimizerParamScheduler(
            optimizer, 0.0, 1.0, 0.1, 0, 100, "linear", 0.0, 0.0, 100, "constant"
        )

    def training_log(loss_dict, total_loss_dict, learning_rate, iteration, loss_scale=1.0):
        state.logged.append(iteration)
        return "original"

    def validate_args(args, defaults={}):
        state.validated.append(args)

    modules = {
        "megatron.training": types.ModuleType("megatron.training"),
        "megatron.training.training": types.ModuleType("megatron.training.training"),
        "megatron.training.initialize": types.ModuleType("megatron.training.initialize"),
        "megatron.training.global_vars": types.ModuleType("megatron.training.global_vars"),
    }
    modules["megatron.training"].get_args = lambda: state.args
    t = modules["megatron.training.training"]
    t.get_megatron_optimizer = get_megatron_optimizer
    t.get_optimizer_param_scheduler = get_optimizer_param_scheduler
    t.training_log = training_log
    modules["megatron.training.initialize"].validate_args = validate_args
    modules["megatron.training.global_vars"].get_tensorboard_writer = lambda: state.writer
    modules["megatron.training.global_vars"].get_wandb_writer = lambda: None
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    state.modules = modules
    state.tracker = compat.aux_loss_entries()  # the live dict on every version
    yield state
    hooks_mod.uninstall_megatron_lm_hooks()


def test_megatron_lm_wrappers(fake_megatron, layer, monkeypatch):
    from megatron.core.optimizer import AdamOptimizerConfig

    from megatron_ultramem.megatron_lm import arguments

    from megatron_ultramem.optim import UltraMemParamScheduler

    s = fake_megatron
    t = s.modules["megatron.training.training"]
    original_log = t.training_log
    # get_megatron_muon_optimizer (core_r0.16 only) and arguments.validate_args (0.19+) are absent
    # here, as one or the other is in every release: not worth a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        installed = hooks_mod.install_megatron_lm_hooks()
    assert "megatron.training.training.get_megatron_optimizer" in installed
    assert hooks_mod.install_megatron_lm_hooks() == installed  # idempotent
    assert t.training_log.__wrapped__ is original_log

    optimizer = t.get_megatron_optimizer(AdamOptimizerConfig(lr=1.0), [layer])
    assert any(getattr(k, "attr", None) == "is_ultramem_value" for k in s.overrides)
    assert len(s.overrides) >= 2  # Megatron's standard overrides are kept
    perturb(layer)
    optimizer.step()
    assert torch.allclose(layer.tucker_u, fresh_u(layer))

    scheduler = t.get_optimizer_param_scheduler(optimizer)
    assert isinstance(scheduler, UltraMemParamScheduler) and scheduler.value_lr_max_steps == 100
    assert optimizer.param_groups[0]["lr"] == pytest.approx(4.0)  # rho0 * max_lr at step 0

    checked = []
    monkeypatch.setattr(arguments, "validate_ultramem_args", checked.append)
    s.modules["megatron.training.initialize"].validate_args(s.args)
    assert s.validated == [s.args] and checked == [s.args]  # Megatron's checks, then ours

    from megatron_ultramem import compat

    compat.record_aux_loss("ultramem_tucker_loss", torch.tensor(1.0), 1, 3)  # a stale entry
    assert "ultramem_tucker_loss" in s.tracker
    layer.train()
    layer(torch.randn(2, 2, layer.D))
    assert t.training_log({}, {}, 1.0, 1) == "original"
    assert "ultramem_tucker_loss" not in s.tracker and not s.writer.scalars  # not a log iteration
    t.training_log({}, {}, 1.0, 2)
    assert s.logged == [1, 2]
    assert s.writer.scalars["ultramem/tucker_aux_loss"][1] == 2
    assert s.writer.scalars["ultramem/value_learning_rate"][0] == pytest.approx(4.0)
    assert s.writer.scalars["ultramem/touched_fraction"][0] > 0

    hooks_mod.uninstall_megatron_lm_hooks()
    assert t.training_log is original_log


def test_a_missing_hook_target_is_named(fake_megatron):
    del fake_megatron.modules["megatron.training.training"].training_log
    with pytest.warns(UserWarning, match=r"not installed: megatron\.training\.training\.training_log$"):
        hooks_mod.install_megatron_lm_hooks()


def test_wrappers_pass_through_for_other_models(fake_megatron, layer):
    from megatron.core.optimizer import AdamOptimizerConfig

    s = fake_megatron
    s.args.spec = None
    t = s.modules["megatron.training.training"]
    hooks_mod.install_megatron_lm_hooks()
    optimizer = t.get_megatron_optimizer(AdamOptimizerConfig(lr=1.0), [layer])
    assert s.overrides is None and not hasattr(optimizer.step, "__wrapped__")
    assert type(t.get_optimizer_param_scheduler(optimizer)).__name__ == "OptimizerParamScheduler"


def test_memories_leave_the_moe_layer_count_of_training_log(fake_megatron, layer):
    """Megatron-LM's training_log averages the MoE metrics over the MoE layers it counts from the
    flags (--moe-layer-freq; the E symbols of --hybrid-layer-pattern); while it runs, the flags
    count only the layers that still hold a MoE."""
    from megatron_ultramem.megatron_lm.arguments import add_ultramem_args
    import argparse

    seen = []
    t = fake_megatron.modules["megatron.training.training"]

    def training_log(loss_dict, total_loss_dict, learning_rate, iteration, loss_scale=1.0):
        a = fake_megatron.args
        seen.append((a.num_experts, a.moe_layer_freq, a.hybrid_layer_pattern))

    t.training_log = training_log
    hooks_mod.install_megatron_lm_hooks()
    base = vars(add_ultramem_args(argparse.ArgumentParser()).parse_args([]))
    cases = [
        # GPT, MoE every layer, memories replace the MoE of layers 1 and 3 (0-based)
        (dict(spec=["megatron_ultramem.megatron_lm", "ultramem_block_spec"], num_layers=4,
              num_experts=8, moe_layer_freq=1, hybrid_layer_pattern=None,
              ultramem_mode="replace", ultramem_layers="[0,1,0,1]"),
         (8, [1, 0, 1, 0], None)),
        # HybridModel: E layers 1 and 5 of the main pattern become memories; the MTP part stays
        (dict(spec=["megatron_ultramem.megatron_lm", "ultramem_hybrid_stack_spec"], num_layers=6,
              num_experts=8, moe_layer_freq=1, hybrid_layer_pattern="*E*E|*E/*E",
              ultramem_mode="replace", ultramem_layers="[0,1,0,0,0,1]"),
         (8, 1, "*-*E|*-/*E")),
        # every MoE replaced: no MoE metrics at all (0.20 raises on zero MoE layers)
        (dict(spec=["megatron_ultramem.megatron_lm", "ultramem_block_spec"], num_layers=4,
              num_experts=8, moe_layer_freq=[1, 1, 0, 0], hybrid_layer_pattern=None,
              ultramem_mode="replace", ultramem_layers="[1,1,0,0]"),
         (None, [0, 0, 0, 0], None)),
        # parallel memories sit beside dense MLPs: nothing to change
        (dict(spec=["megatron_ultramem.megatron_lm", "ultramem_block_spec"], num_layers=4,
              num_experts=8, moe_layer_freq=[1, 0, 1, 0], hybrid_layer_pattern=None,
              ultramem_mode="parallel", ultramem_layers="[0,1,0,1]"),
         (8, [1, 0, 1, 0], None)),
    ]  # fmt: skip
    for fields, during in cases:
        args = SimpleNamespace(**{**base, "ultramem_num_keys": 8, "ultramem_key_dim": 16,
                                  "ultramem_topm": 4, "tensorboard_dir": None, **fields})  # fmt: skip
        fake_megatron.args = args
        t.training_log({}, {}, 1.0, 1)
        assert seen[-1] == during
        # restored after the call
        assert (args.num_experts, args.moe_layer_freq, args.hybrid_layer_pattern) == (
            fields["num_experts"], fields["moe_layer_freq"], fields["hybrid_layer_pattern"])
