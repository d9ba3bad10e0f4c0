"""`--spec megatron_ultramem.megatron_lm ultramem_block_spec` without Megatron-LM installed.

Megatron-LM's lookup is megatron.core's `import_module((MODULE, NAME))`: `__import__(MODULE,
fromlist=[NAME])` then `vars(module)[NAME]`. The parsed arguments come from a fake
`megatron.training.get_args` (monkeypatched module), as Megatron-LM would provide them.

    python -m pytest -q tests/megatron_lm/test_spec_lookup.py
"""

import inspect
import sys
import types
from types import SimpleNamespace

import pytest
import torch

import megatron_ultramem.megatron_lm as pkg
from megatron_ultramem.megatron_lm import spec as spec_mod
from megatron_ultramem import compat
from megatron_ultramem.cpu_compat import CPU_CONFIG

SPEC = ("megatron_ultramem.megatron_lm", "ultramem_block_spec")


def megatron_args(**overrides):
    """A parsed-arguments namespace with the names Megatron-LM uses."""
    from megatron_ultramem.megatron_lm.arguments import add_ultramem_args
    import argparse

    args = add_ultramem_args(argparse.ArgumentParser()).parse_args([])
    fields = dict(
        num_layers=4,
        hidden_size=24,
        num_attention_heads=4,
        ffn_hidden_size=40,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        **CPU_CONFIG,  # CPU init, fused CUDA/apex kernels off
        spec=list(SPEC),
        transformer_impl="local",
        normalization="LayerNorm",
        qk_l2_norm=False,
        num_experts=None,
        pipeline_model_parallel_size=1,
        tensor_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None,
        recompute_granularity=None,
        ultramem_mode="parallel",
        ultramem_layers="[0,1,0,1]",
        ultramem_num_keys=5,
        ultramem_key_dim=6,
        ultramem_value_dim=10,
        ultramem_topm=7,
        ultramem_impl="reference",
    )
    fields.update(overrides)
    for k, v in fields.items():
        setattr(args, k, v)
    return args


@pytest.fixture
def fake_get_args(monkeypatch):
    """Installs a fake `megatron.training` whose get_args returns holder['args']."""
    holder = {"args": megatron_args()}
    fake = types.ModuleType("megatron.training")
    fake.get_args = lambda: holder["args"]
    monkeypatch.setitem(sys.modules, "megatron.training", fake)
    # megatron-core >= 0.17 ships megatron.training: once any test imported its `arguments`, a
    # `from megatron.training.arguments import ...` finds that real module despite the fake package
    # above. None in sys.modules makes that import fail as it does without Megatron-LM.
    monkeypatch.setitem(sys.modules, "megatron.training.arguments", None)
    pkg.reset_spec_cache()
    yield holder
    pkg.reset_spec_cache()


def lookup():
    from megatron.core.transformer.spec_utils import import_module

    return import_module(SPEC)


def mlp_modules(block):
    # compat.mlp_spec_class: ModuleSpec.module (0.16) or the class a 0.18+ builder partial makes
    return [compat.mlp_spec_class(s.submodules.mlp) for s in block.layer_specs]


def test_lookup_builds_lazily_and_caches(fake_get_args):
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    obj = lookup()
    assert isinstance(obj, TransformerBlockSubmodules) and isinstance(
        obj, spec_mod.UltraMemBlockSpec
    )
    assert "not built yet" in repr(obj)  # nothing read before the model needs it
    assert lookup() is obj and vars(pkg)["ultramem_block_spec"] is obj
    assert mlp_modules(obj) == [
        MLP,
        spec_mod.UltraMemSlotFromArgs,
        MLP,
        spec_mod.UltraMemSlotFromArgs,
    ]
    slot = obj.layer_specs[1].submodules.mlp
    assert slot.params["ultramem_fields"]["ultramem_num_keys"] == 5
    assert slot.params["mixed_layers"] is True
    from megatron.core.models.gpt.gpt_layer_specs import LNImpl

    assert obj.layer_norm is LNImpl  # --transformer-impl local


def test_replace_mode_and_validation(fake_get_args):
    fake_get_args["args"] = megatron_args(ultramem_mode="replace", ultramem_layers=1)
    obj = lookup()
    assert mlp_modules(obj) == [spec_mod.UltraMemLayerFromArgs] * 4
    assert obj.layer_specs[0].submodules.mlp.params["mixed_layers"] is False
    pkg.reset_spec_cache()
    fake_get_args["args"] = megatron_args(ultramem_topm=99)
    with pytest.raises(ValueError, match="--ultramem-topm"):
        lookup().layer_specs


def test_virtual_pipeline_is_refused_in_object_form(fake_get_args):
    fake_get_args["args"] = megatron_args(virtual_pipeline_model_parallel_size=2)
    with pytest.raises(ValueError, match="virtual pipeline"):
        lookup().layer_specs


def test_transformer_impl_selects_te_or_local(monkeypatch):
    seen = {}

    def fake_builder(config, use_transformer_engine=None, **kw):
        seen["te"] = use_transformer_engine
        from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

        return TransformerBlockSubmodules(layer_specs=[], layer_norm=None)

    monkeypatch.setattr(spec_mod, "get_ultramem_decoder_block_spec", fake_builder)
    config = spec_mod._config_from_namespace(megatron_args())
    spec_mod.build_block_spec(config, "transformer_engine")
    assert seen["te"] is True
    spec_mod.build_block_spec(config, "local")
    assert seen["te"] is False
    with pytest.raises(ValueError, match="allowed: transformer_engine, local"):
        spec_mod.build_block_spec(config, "inference_optimized")


def test_callable_form_of_megatron_019(fake_get_args):
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
    from megatron.core.transformer.transformer_config import TransformerConfig

    obj = lookup()
    # 0.19: `if "vp_stage" in inspect.signature(spec).parameters: spec(model_config, vp_stage=..)`
    assert "vp_stage" in inspect.signature(obj).parameters
    plain = TransformerConfig(
        num_layers=4,
        hidden_size=24,
        num_attention_heads=4,
        ffn_hidden_size=40,
        transformer_impl="local",
    )  # Megatron-LM copies --transformer-impl into the config
    block = obj(SimpleNamespace(transformer=plain), vp_stage=None)
    assert type(block) is TransformerBlockSubmodules
    assert mlp_modules(block)[1] is spec_mod.UltraMemSlotFromArgs
    # An UltraMemConfig inside the model config is used as is (no arguments needed).
    um = spec_mod.ensure_ultramem_config(
        plain,
        dict(
            ultramem_mode="replace",
            ultramem_layers=2,
            ultramem_num_keys=5,
            ultramem_key_dim=6,
            ultramem_value_dim=10,
            ultramem_topm=7,
        ),
    )
    previous = spec_mod.set_args_provider(
        lambda: (_ for _ in ()).throw(AssertionError("read args"))
    )
    try:
        block = obj(SimpleNamespace(transformer=um))
    finally:
        spec_mod.set_args_provider(previous)
    assert mlp_modules(block)[0] is spec_mod.UltraMemLayerFromArgs


def test_gpt_model_from_plain_config_runs_forward_backward(fake_get_args, megatron_world):
    """What Megatron-LM's gpt_builder does: a plain TransformerConfig plus the looked-up spec."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_ultramem.config import UltraMemConfig
    from megatron_ultramem.layer import UltraMemLayer

    a = fake_get_args["args"]
    plain = TransformerConfig(
        num_layers=a.num_layers,
        hidden_size=a.hidden_size,
        num_attention_heads=4,
        ffn_hidden_size=40,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        **CPU_CONFIG,  # CPU init, fused CUDA/apex kernels off
    )
    torch.manual_seed(0)
    model = GPTModel(plain, lookup(), vocab_size=32, max_sequence_length=8)
    layers = [m for m in model.modules() if isinstance(m, UltraMemLayer)]
    assert sorted(layer.layer_number for layer in layers) == [2, 4]
    assert all(isinstance(layer.config, UltraMemConfig) for layer in layers)
    assert layers[0].config is layers[1].config  # one upgraded config per model config
    assert layers[0].config.hidden_size == plain.hidden_size
    assert plain.hetereogenous_dist_checkpoint is True  # mixed layers: no stacked checkpoint keys
    tokens = torch.randint(0, 32, (2, 8))
    pos = torch.arange(8).expand(2, 8)
    loss = model(tokens, pos, None, labels=tokens).mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(
        layer.values.grad is not None and layer.values.grad.abs().sum() > 0 for layer in layers
    )


def test_args_provider_hook_without_fake_module(monkeypatch):
    # No megatron.training at all (megatron-core <= 0.16 without a Megatron-LM checkout); from 0.17
    # on the package ships it, so hide it: a None entry makes the import raise ImportError.
    monkeypatch.setitem(sys.modules, "megatron.training", None)
    monkeypatch.setitem(sys.modules, "megatron.training.arguments", None)
    args = megatron_args(ultramem_mode="replace", ultramem_layers=2)
    previous = spec_mod.set_args_provider(lambda: args)
    pkg.reset_spec_cache()
    try:
        assert mlp_modules(lookup())[0] is spec_mod.UltraMemLayerFromArgs
    finally:
        spec_mod.set_args_provider(previous)
        pkg.reset_spec_cache()


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError):
        pkg.no_such_spec  # noqa: B018
