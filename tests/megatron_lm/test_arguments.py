"""--ultramem-* flags: one per UltraMemConfig field, copied like Megatron-LM copies config fields, and
validated with errors that name the flag.

    python -m pytest -q tests/megatron_lm/test_arguments.py
"""

import argparse
import dataclasses
import warnings
from types import SimpleNamespace

import pytest

from megatron_ultramem.config import UltraMemConfig
from megatron_ultramem.megatron_lm.arguments import (
    SPEC_MODULE,
    SPEC_NAME,
    add_ultramem_args,
    chain_args_providers,
    validate_ultramem_args,
)

ULTRAMEM_FIELDS = [f for f in dataclasses.fields(UltraMemConfig) if f.name.startswith("ultramem_")]


def parser():
    p = argparse.ArgumentParser(allow_abbrev=False)
    return add_ultramem_args(p)


def megatron_like(**overrides):
    """The Megatron-LM arguments the validation reads, with Megatron's defaults."""
    args = parser().parse_args([])
    base = dict(
        num_layers=4,
        hidden_size=64,
        spec=[SPEC_MODULE, SPEC_NAME],
        transformer_impl="local",
        num_experts=None,
        moe_layer_freq=1,
        recompute_granularity=None,
        pipeline_model_parallel_size=1,
        tensor_model_parallel_size=1,
        expert_model_parallel_size=1,
        expert_tensor_parallel_size=None,
        use_legacy_models=False,
        experimental_attention_variant=None,
        heterogeneous_layers_config_path=None,
        yaml_cfg=None,
        ultramem_num_keys=8,
        ultramem_key_dim=16,
        ultramem_topm=4,
    )
    base.update(overrides)
    for k, v in base.items():
        setattr(args, k, v)
    return args


def test_one_flag_per_field_with_the_field_default():
    p = parser()
    actions = {a.dest: a for a in p._actions}
    for f in ULTRAMEM_FIELDS:
        flag = "--" + f.name.replace("_", "-")
        assert flag in p._option_string_actions, flag
        assert actions[f.name].default == f.default, f.name
        assert actions[f.name].help, f"{flag} has no help text"
    args = p.parse_args([])
    assert {f.name: getattr(args, f.name) for f in ULTRAMEM_FIELDS} == {
        f.name: f.default for f in ULTRAMEM_FIELDS
    }


def test_megatron_style_copy_reaches_every_field():
    # core_transformer_config_from_args: `for f in fields(config_class): if hasattr(args, f.name)`
    argv = (
        "--ultramem-mode replace --ultramem-layers [0,1]*2 --ultramem-num-keys 9 --ultramem-topm 5 "
        "--ultramem-value-dim 48 --ultramem-aux-loss-alpha 0 --ultramem-init reference "
        "--ultramem-value-weight-decay --ultramem-deterministic --ultramem-impl reference "
        "--ultramem-value-lr-mult 10 --ultramem-value-lr-decay-rate 0.5 --ultramem-seed 7"
    ).split()
    args = parser().parse_args(argv)
    copied = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(UltraMemConfig)
        if hasattr(args, f.name)
    }
    assert set(copied) == {f.name for f in ULTRAMEM_FIELDS}
    assert copied["ultramem_mode"] == "replace" and copied["ultramem_layers"] == "[0,1]*2"
    assert copied["ultramem_num_keys"] == 9 and copied["ultramem_value_dim"] == 48
    assert (
        copied["ultramem_value_weight_decay"] is True and copied["ultramem_deterministic"] is True
    )
    assert copied["ultramem_value_lr_mult"] == 10.0 and copied["ultramem_aux_loss_alpha"] == 0.0
    config = UltraMemConfig(num_layers=4, hidden_size=64, num_attention_heads=4, **copied)
    assert config.ultramem_layer_pattern() == [0, 1, 0, 1]


def test_flag_types():
    p = parser()
    assert p.parse_args(["--ultramem-layers", "3"]).ultramem_layers == 3
    assert p.parse_args(["--no-ultramem-value-weight-decay"]).ultramem_value_weight_decay is False
    assert p.parse_args(["--ultramem-skip-units", "2:5,6:9"]).ultramem_skip_units == "2:5,6:9"
    assert p.parse_args([]).ultramem_log_stats is True
    assert p.parse_args(["--no-ultramem-log-stats"]).ultramem_log_stats is False
    with pytest.raises(SystemExit):
        p.parse_args(["--ultramem-mode", "sideways"])


def test_provider_is_idempotent_and_chains():
    p = argparse.ArgumentParser()
    calls = []

    def other(parser):
        calls.append(1)
        parser.add_argument("--other", type=int, default=3)
        return parser

    provider = chain_args_providers(None, other, add_ultramem_args, add_ultramem_args)
    assert provider(p) is p and calls == [1]
    args = p.parse_args(["--other", "4", "--ultramem-topm", "9"])
    assert (args.other, args.ultramem_topm) == (4, 9)


def test_validation_errors_name_flags_and_allowed_values():
    cases = [
        (dict(ultramem_topm=40), r"--ultramem-topm \(m=40\).*allowed 1\.\.16"),
        (dict(ultramem_expansion=3), r"--ultramem-expansion \(E\) must be a perfect square"),
        (dict(ultramem_layers="[0,1]"), r"--ultramem-layers has 2 entries but num_layers is 4"),
        (dict(ultramem_value_dim=33), r"--ultramem-value-dim \(Dv=33\).*--ultramem-num-cores"),
        (dict(ultramem_mode="skip"), r"--ultramem-skip-units must name at least one unit"),
        (
            dict(transformer_impl="inference_optimized"),
            r"--transformer-impl inference_optimized.*allowed",
        ),
        (
            dict(spec=[SPEC_MODULE, "other"]),
            r"spelled --spec megatron_ultramem.megatron_lm ultramem_block_spec",
        ),
        (dict(yaml_cfg="x.yaml"), r"--yaml-cfg cannot be combined"),
    ]
    for overrides, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            validate_ultramem_args(megatron_like(**overrides))
    validate_ultramem_args(megatron_like())  # the defaults above are valid


def test_transformer_engine_without_te_says_use_local():
    pytest.importorskip("megatron.core")
    import importlib.util

    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("transformer_engine is installed here")
    with pytest.raises(ValueError, match="--transformer-impl local"):
        validate_ultramem_args(megatron_like(transformer_impl="transformer_engine"))


def test_moe_conflicts():
    # parallel memory on MoE layers: refused, naming both flags and the ways out
    with pytest.raises(
        ValueError, match=r"--ultramem-mode parallel.*layers \[0, 2\].*--num-experts 8"
    ):
        validate_ultramem_args(megatron_like(num_experts=8, ultramem_layers=2))
    with pytest.raises(ValueError, match="--ultramem-mode replace"):
        validate_ultramem_args(
            megatron_like(num_experts=8, moe_layer_freq=[1, 1, 0, 0], ultramem_layers="[0,1,1,0]")
        )
    # replace on MoE layers is the intended swap
    validate_ultramem_args(megatron_like(num_experts=8, ultramem_mode="replace", ultramem_layers=1))
    # parallel memory on the dense layers of a mixed model is fine
    validate_ultramem_args(
        megatron_like(num_experts=8, moe_layer_freq=[1, 0, 1, 0], ultramem_layers="[0,1,0,1]")
    )
    validate_ultramem_args(
        megatron_like(num_experts=8, moe_layer_freq="([1]+[0])*2", ultramem_layers="[0,1,0,1]")
    )
    # skip units whose source or sink is a MoE layer
    with pytest.raises(ValueError, match="--ultramem-skip-units"):
        validate_ultramem_args(
            megatron_like(
                num_experts=8,
                moe_layer_freq=[0, 0, 0, 1],
                ultramem_mode="skip",
                ultramem_skip_units="0:3",
            )
        )
    validate_ultramem_args(
        megatron_like(
            num_experts=8,
            moe_layer_freq=[0, 1, 0, 1],
            ultramem_mode="skip",
            ultramem_skip_units="0:2",
        )
    )


def test_parallel_layout_rules_reach_the_flags():
    # Rules the config checks from Megatron's own parallel flags (names unchanged: not ultramem_*).
    with pytest.raises(
        ValueError, match=r"--ultramem-value-dim \(Dv=30\).*tensor_model_parallel_size"
    ):
        validate_ultramem_args(
            megatron_like(ultramem_value_dim=30, ultramem_num_cores=1, tensor_model_parallel_size=4)
        )


def test_without_the_spec_flags_only_warn():
    args = megatron_like(spec=None, ultramem_topm=1000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        validate_ultramem_args(args)
    assert any("--ultramem-topm" in str(w.message) and "--spec" in str(w.message) for w in caught)
    validate_ultramem_args(
        SimpleNamespace(spec=["megatron.core.models.gpt", "x"])
    )  # nothing to say
