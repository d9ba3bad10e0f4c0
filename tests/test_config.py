"""Config validation: each bad value gives an error naming the field and the allowed values."""

import pytest
import torch

from megatron_ultramem.config import parse_layer_pattern, parse_skip_units

from helpers import small_config


@pytest.mark.parametrize(
    "overrides,pattern",
    [
        (dict(ultramem_expansion=8), r"ultramem_expansion \(E\) must be a perfect square \(1, 4, 9"),
        (dict(ultramem_topm=11), r"ultramem_topm \(m=11\) must be <= .* n' = sqrt\(E\) \* n = 10: allowed 1..10"),
        (dict(ultramem_value_dim=9), r"ultramem_value_dim \(Dv=9\) must be divisible by ultramem_num_cores \(h=2\)"),
        (dict(ultramem_mode="sideways"), r"ultramem_mode must be one of 'replace', 'parallel', 'skip'"),
        (dict(ultramem_init="xavier"), r"ultramem_init must be one of 'paper', 'reference'"),
        (dict(ultramem_score_activation="relu"), r"ultramem_score_activation must be one of 'none', 'softmax'"),
        (dict(ultramem_impl="cuda"), r"ultramem_impl must be one of 'auto', 'reference', 'triton'"),
        (dict(ultramem_num_heads=0), r"ultramem_num_heads must be a positive integer"),
        (dict(ultramem_tucker_rank=1.5), r"ultramem_tucker_rank must be a positive integer"),
        (dict(ultramem_aux_loss_alpha=-1.0), r"ultramem_aux_loss_alpha must be >= 0"),
        (dict(ultramem_value_lr_mult=0.0), r"ultramem_value_lr_mult \(rho0\) must be > 0"),
        (dict(ultramem_mode="skip", ultramem_skip_units="1:3"), r"unit 1:3 points past the last layer \(num_layers=3, allowed block indices 0..2\)"),
        (dict(ultramem_mode="skip", ultramem_skip_units="2:1"), r"unit 2:1 needs 0 <= i <= j"),
        (dict(ultramem_mode="skip", ultramem_skip_units="0:1,0:2"), r"block 0 is the source of two units"),
        (dict(ultramem_mode="skip", ultramem_skip_units="0-1"), r'"0-1" is not "i:j"'),
        (dict(ultramem_mode="skip"), r"ultramem_skip_units must name at least one unit"),
        (dict(ultramem_mode="skip", ultramem_skip_units="0:1", recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1), r"does not support recompute_granularity='full'"),
        (dict(ultramem_layers="[1,0]"), r"ultramem_layers has 2 entries but num_layers is 3"),
        (dict(ultramem_layers="[1,2,0]"), r"ultramem_layers entries must be 0 or 1"),
        (dict(ultramem_layers="__import__('os')"), r"is not a layer pattern"),
        (dict(ultramem_layers=0), r"ultramem_layers as an int must be >= 1"),
        (dict(ultramem_layers="[0]*3"), r"selects no layer"),
        (dict(tensor_model_parallel_size=4), r"ultramem_value_dim \(Dv=10\) must be divisible by tensor_model_parallel_size x expert_model_parallel_size = 4 x 1"),
        (dict(tensor_model_parallel_size=3, num_attention_heads=3, ultramem_value_dim=12), r"ultramem_num_cores \(h=2\) and tensor_model_parallel_size x expert_model_parallel_size \(3\) must divide one another"),
        (dict(tensor_model_parallel_size=2, expert_tensor_parallel_size=1), r"expert_tensor_parallel_size \(1\) must equal tensor_model_parallel_size \(2\)"),
        # issue 11, bug 2: skip units under selective recompute / chunking / CUDA graphs
        (dict(ultramem_mode="skip", ultramem_skip_units="0:1", recompute_granularity="selective", recompute_modules=["mlp"]), r"recompute_modules containing 'mlp': block i's slot would run under no_grad"),
        (dict(ultramem_mode="skip", ultramem_skip_units="0:1", recompute_granularity="selective", recompute_modules=["layernorm"]), r"recompute_modules containing 'layernorm': block i's pre-MLP norm output is freed"),
        (dict(ultramem_mode="skip", ultramem_skip_units="0:1", mlp_chunks_for_prefill=2), r"needs mlp_chunks_for_prefill=1"),
        (dict(ultramem_mode="skip", ultramem_skip_units="0:1", cuda_graph_impl="local"), r"cannot run under CUDA graphs"),
        # a unit across a pipeline stage boundary names the unit and both stages
        (dict(ultramem_mode="skip", ultramem_skip_units="0:1,1:2", num_layers=4, pipeline_model_parallel_size=2, pipeline_dtype=torch.float32), r"unit 1:2 crosses a pipeline stage boundary: block 1 is in stage 0 and block 2 in stage 1"),
        (dict(ultramem_mode="skip", ultramem_skip_units="0:1", num_layers=4, pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2, pipeline_dtype=torch.float32), r"unit 0:1 crosses a pipeline stage boundary: block 0 is in stage 0 and block 1 in stage 1"),
    ],
)
def test_bad_values_are_refused_with_named_field(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        small_config(**overrides)


def test_defaults_and_derived_sizes():
    cfg = small_config(ultramem_value_dim=None, ultramem_expansion=9)
    assert cfg.ultramem_value_dim == 12  # hidden_size // 2
    assert cfg.ultramem_keys_per_side == 15 and cfg.ultramem_num_values == 25


def test_layer_patterns_follow_moe_layer_freq():
    assert parse_layer_pattern(2, 5) == [1, 0, 1, 0, 1]
    assert parse_layer_pattern("([0]*2+[1])*2", 6) == [0, 0, 1, 0, 0, 1]
    assert parse_layer_pattern([0, 1], 2) == [0, 1]
    assert parse_skip_units("2:5, 6:9,10:13,14:17", 20) == [(2, 5), (6, 9), (10, 13), (14, 17)]
    assert parse_skip_units([(0, 0)], 1) == [(0, 0)]


def test_skip_units_inside_one_pipeline_stage_are_allowed():
    cfg = small_config(
        num_layers=4, ultramem_mode="skip", ultramem_skip_units="0:1,2:3",
        pipeline_model_parallel_size=2, pipeline_dtype=torch.float32,
    )  # fmt: skip
    assert cfg.ultramem_layer_stages() == [(0, 0), (0, 0), (1, 0), (1, 0)]
    vpp = small_config(
        num_layers=4, ultramem_mode="skip", ultramem_skip_units="0:0,2:2",
        pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2,
        pipeline_dtype=torch.float32,
    )  # fmt: skip
    assert vpp.ultramem_layer_stages() == [(0, 0), (1, 0), (0, 1), (1, 1)]


def test_fp8_with_layernorm_recompute_is_refused():
    # TransformerConfig itself needs Transformer Engine >= 2.6 for this combination, so the
    # fields are set on a built config and the plugin's own check is run on them.
    cfg = small_config()
    cfg.fp8, cfg.recompute_granularity, cfg.recompute_modules = "hybrid", "selective", ["layernorm"]
    with pytest.raises(ValueError, match=r"recompute_modules with 'layernorm' and fp8/fp4 .* linear_fc1"):
        cfg.validate_ultramem()


def test_chunked_training_mlp_with_aux_loss_is_refused():
    import dataclasses

    from megatron_ultramem.config import UltraMemConfig

    from megatron_ultramem import compat

    if "mlp_chunks_for_training" not in {f.name for f in dataclasses.fields(UltraMemConfig)}:
        # megatron-core 0.16 has no mlp_chunks_for_training; 0.19 has it (pinned here)
        assert compat._minor(compat.megatron_core_version()) < (0, 19)
        return
    with pytest.raises(ValueError, match=r"mlp_chunks_for_training=2 .* aux loss again"):
        small_config(mlp_chunks_for_training=2)
    small_config(mlp_chunks_for_training=2, ultramem_aux_loss_alpha=0.0)  # allowed without it
