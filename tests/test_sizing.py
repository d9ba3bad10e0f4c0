"""Sizing helper: parameter counts against hand-computed numbers, and the solver's equations.

python -m pytest -q tests/test_sizing.py
"""

import json
import math
import shlex

import pytest

from megatron_ultramem import sizing
from megatron_ultramem.sizing import MoEShape, UltraMemShape, size_ultramem_like_moe

MIXTRAL = MoEShape(
    hidden_size=4096, num_experts=8, topk=2, expert_ffn_hidden_size=14336, num_layers=32, gated=True
)


def test_small_memory_layer_counts_by_hand():
    # D=8 K=4 H=2 n=3 E=4 (s=2, n'=6) r=2 h=2 Dv=4 m=2
    u = UltraMemShape(8, 4, 2, 3, 4, 2, 2, 4, 2)
    assert u.keys_per_side == 6 and u.num_values == 9
    assert u.breakdown() == {
        "query": 64,  # 2*4*8
        "keys": 192,  # 2*2*6*4*2
        "cores": 16,  # 2*2*2*2
        "layernorms": 32,  # 4 norms x (weight + bias) x 4
        "values": 36,  # 9*4
        "out": 128,  # 8*4*4
        "dense_mlp": 0,
    }
    assert u.total_params == 468
    assert u.active_params == 468 - 36 + 2 * 2 * 4  # + H*m value rows of Dv
    # batch 1: everything but the values + H*m rows; batch 3: rows capped at N = 9
    assert u.bytes_per_token(1, 2.0) == 2 * (432 + 16)
    assert u.bytes_per_token(3, 1.0) == (432 + 9 * 4) / 3


def test_dense_mlp_beside_memory_counts():
    gated = UltraMemShape(8, 4, 2, 3, 4, 2, 2, 4, 2, dense_ffn_hidden_size=5, gated=True)
    plain = UltraMemShape(8, 4, 2, 3, 4, 2, 2, 4, 2, dense_ffn_hidden_size=5, gated=False)
    assert gated.breakdown()["dense_mlp"] == 3 * 8 * 5
    assert plain.breakdown()["dense_mlp"] == 2 * 8 * 5
    assert gated.active_params - gated.total_params == -36 + 16


def test_moe_counts_by_hand():
    moe = MoEShape(
        hidden_size=8, num_experts=4, topk=2, expert_ffn_hidden_size=16, num_layers=2, gated=True
    )
    assert moe.breakdown() == {"expert": 384, "router": 32, "shared_expert": 0}  # 3*8*16, 8*4
    assert moe.total_params == 4 * 384 + 32
    assert moe.active_params == 2 * 384 + 32
    plain = MoEShape(8, 4, 2, 16, 2, gated=False, shared_expert_ffn_hidden_size=4)
    assert plain.breakdown()["expert"] == 2 * 8 * 16
    assert plain.total_params == 4 * 256 + 32 + 2 * 8 * 4
    assert plain.active_params == 2 * 256 + 32 + 2 * 8 * 4
    # batch 1 reads router + k experts; batch >= experts/k reads every expert once
    assert moe.bytes_per_token(1, 2.0) == 2 * (32 + 2 * 384)
    assert moe.bytes_per_token(8, 1.0) == (32 + 4 * 384) / 8


def _hand_total(D, K, H, n, E, r, h, Dv, F, c):
    s = math.isqrt(E)
    return (
        2 * K * D
        + 2 * H * s * n * K * r
        + H * h * r * r
        + 8 * K
        + n * n * Dv
        + D * E * Dv
        + c * D * F
    )


def test_parallel_mode_matches_mixtral_total_and_active():
    s = size_ultramem_like_moe(MIXTRAL, "parallel")
    u = s.ultramem
    P = 8 * 3 * 4096 * 14336 + 4096 * 8
    A = 2 * 3 * 4096 * 14336 + 4096 * 8
    assert (MIXTRAL.total_params, MIXTRAL.active_params) == (P, A)
    assert (u.key_dim, u.num_heads, u.topm, u.expansion, u.value_dim) == (128, 2, 32, 4, 2048)
    total = _hand_total(4096, 128, 2, u.num_keys, 4, 2, 2, 2048, u.dense_ffn_hidden_size, 3)
    assert total == u.total_params
    assert u.active_params == total - u.num_keys**2 * 2048 + 2 * 32 * 2048
    # n from total - active = (n^2 - H*m) * Dv, rounded; F_d rounded to 64 (<= 32*3*D params)
    assert u.num_keys == round(math.sqrt((P - A) / 2048 + 64))
    assert u.dense_ffn_hidden_size % 64 == 0
    assert abs(u.active_params - A) <= 32 * 3 * 4096
    assert abs(u.total_params - P) / P < 2e-3
    assert u.topm <= u.keys_per_side


def test_replace_mode_raises_heads_until_topm_fits():
    s = size_ultramem_like_moe(MIXTRAL, "replace")
    u = s.ultramem
    assert u.dense_ffn_hidden_size == 0
    assert u.topm <= u.keys_per_side
    assert abs(u.total_params - MIXTRAL.total_params) / MIXTRAL.total_params < 2e-3
    assert abs(u.active_params - MIXTRAL.active_params) / MIXTRAL.active_params < 2e-3
    assert u.num_heads > 2 and s.notes  # a top-2 of 8 big experts needs many value rows
    with pytest.raises(ValueError, match="num-heads"):
        size_ultramem_like_moe(MIXTRAL, "replace", num_heads=2)


def test_fixed_dense_size_solves_topm():
    moe = MoEShape(1024, 8, 2, 2816, 4, gated=True, moe_layer_freq="([0]+[1])*2")
    s = size_ultramem_like_moe(moe, "parallel", dense_ffn_hidden_size=2816)
    assert s.ultramem.dense_ffn_hidden_size == 2816
    assert s.layers == [0, 1, 0, 1]
    assert abs(s.ultramem.active_params - moe.active_params) / moe.active_params < 1e-2


def test_budget_too_small_is_a_clear_error():
    tiny = MoEShape(64, 4, 2, 128, 4, gated=True)
    with pytest.raises(ValueError, match="activated budget"):
        size_ultramem_like_moe(tiny, "parallel")


def test_megatron_args_and_cli(capsys):
    s = size_ultramem_like_moe(MIXTRAL, "parallel")
    args = s.megatron_args()
    assert args[args.index("--ultramem-num-keys") + 1] == str(s.ultramem.num_keys)
    assert args[args.index("--ffn-hidden-size") + 1] == str(s.ultramem.dense_ffn_hidden_size)
    argv = (
        "--hidden-size 4096 --num-experts 8 --moe-router-topk 2 --ffn-hidden-size 14336 "
        "--num-layers 32 --swiglu"
    )
    assert sizing.main(argv.split() + ["--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ultramem"]["num_keys"] == s.ultramem.num_keys
    assert doc["model"]["moe_total"] == 32 * MIXTRAL.total_params
    assert doc["bytes_per_token_per_layer"]["1"]["moe"] == 2 * MIXTRAL.active_params
    assert sizing.main(argv.split()) == 0
    out = capsys.readouterr().out
    assert "Megatron-LM flags: --spec megatron_ultramem.megatron_lm ultramem_block_spec --ultramem-mode parallel" in out


def test_defaults_and_patterns_agree_with_config():
    import dataclasses

    from megatron_ultramem.config import UltraMemConfig, parse_layer_pattern

    fields = {f.name: f.default for f in dataclasses.fields(UltraMemConfig)}
    for name, value in sizing.DEFAULTS.items():
        assert fields[name] == value, name
    for spec in (1, 2, 3, "2", "[0,1,1,0,1,0]", "([1]*2+[0])*2"):
        assert sizing.layer_pattern(spec, 6, "x") == parse_layer_pattern(spec, 6)


def test_solved_topm_stays_under_the_kernel_limit():
    """Mode replace on Mixtral needs ~1.0e5 value rows per token: H rises until m <= 1024 (the
    Triton kernels' limit, kernels/topm.py MAX_M), never a larger m that would fall back to the
    reference path. A given m above the limit is refused."""
    from megatron_ultramem.cli import BadInput
    from megatron_ultramem.kernels.topm import MAX_M

    s = size_ultramem_like_moe(MIXTRAL, "replace")
    u = s.ultramem
    assert u.topm <= MAX_M == sizing.KERNEL_MAX_M
    # one head fewer would need m above the limit (the smallest H that fits)
    fixed = sizing._fixed_params(4096, 128, u.num_heads - 1, u.num_keys, 4, 2, 2, 2048)
    assert (MIXTRAL.active_params - fixed) / ((u.num_heads - 1) * 2048) > MAX_M
    with pytest.raises(BadInput, match="allowed 1..1024"):
        size_ultramem_like_moe(MIXTRAL, "replace", topm=MAX_M + 1)


def test_topm_pinned_solves_heads():
    """m given, H free: the H whose activated count is closest to the MoE's."""
    s = size_ultramem_like_moe(MIXTRAL, "replace", topm=512)
    u = s.ultramem
    assert u.topm == 512
    best = min(range(1, 400), key=lambda H: abs(
        sizing._fixed_params(4096, 128, H, sizing._solve_num_keys(MIXTRAL.total_params, 4096, 128, H, 4, 2, 2, 2048),
                             4, 2, 2, 2048) + H * 512 * 2048 - MIXTRAL.active_params))  # fmt: skip
    assert u.num_heads == best


def test_dense_layers_pin_the_mlp_and_options_replace_the_error(capsys):
    """The issue's DeepSeek-V3 shape: dense layers keep --ffn-hidden-size 18432, which equals the
    activated experts + shared expert, so mode parallel leaves the memory only the router's
    7168*256 parameters; sizing prints the layouts that fit (exit 0) with their flags quoted."""
    argv = shlex.split(
        "--num-layers 61 --hidden-size 7168 --ffn-hidden-size 18432 --moe-ffn-hidden-size 2048 "
        "--num-experts 256 --moe-router-topk 8 --moe-shared-expert-intermediate-size 2048 "
        '--moe-layer-freq "([0]*3+[1]*58)" --swiglu'
    )
    assert sizing.main(argv) == 0
    out = capsys.readouterr().out
    assert "activated budget 1,835,008 is below" in out and "Layouts that fit" in out
    assert "--ultramem-layers '([0]*3+[1]*58)'" in out  # quoted: pastes into bash
    assert "--ffn-hidden-size 13504" not in out  # the dense layers are never shrunk
    model = sizing.moe_model_from_argv(argv)
    plan = sizing.plan_conversion(model, "replace")
    assert plan.ffn_hidden_size == 18432 and plan.memory.topm <= sizing.KERNEL_MAX_M


def test_ep_kept_in_replace_and_dropped_in_parallel():
    argv = shlex.split("--num-layers 4 --hidden-size 1024 --num-experts 8 --moe-router-topk 2 "
                       "--swiglu --ffn-hidden-size 2816 --expert-model-parallel-size 4 "
                       "--tensor-model-parallel-size 2")  # fmt: skip
    model = sizing.moe_model_from_argv(argv)
    replace = sizing.plan_conversion(model, "replace")
    assert replace.keep_moe_flags and replace.shards == 8 and replace.memory.value_dim % 8 == 0
    assert any("TP x EP = 2 x 4" in n for n in replace.notes)
    parallel = sizing.plan_conversion(model, "parallel")
    assert not parallel.keep_moe_flags and parallel.shards == 2
    assert any("--expert-model-parallel-size 4 dropped" in n for n in parallel.notes)
    # bytes per GPU: the tables split 8 ways vs 2 ways
    assert parallel.value_bytes_per_gpu() / parallel.num_memories / parallel.memory.num_values == pytest.approx(
        2.0 * parallel.memory.value_dim / 2)  # fmt: skip
    from megatron_ultramem.cli import BadInput

    with pytest.raises(BadInput, match="--ultramem-value-dim 511 must be divisible"):
        sizing.plan_conversion(model, "parallel", {"value_dim": 511})
