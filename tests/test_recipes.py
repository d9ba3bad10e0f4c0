"""Today's MoE recipes through sizing + convert: exact counts, bytes per token, quoting, validation.

Each recipe's arguments are the model-defining flags of a public recipe (the source is cited per
recipe; runtime, data and logging flags left out). For each recipe and mode the test checks, with
numbers computed here independently of megatron_ultramem/sizing.py:
  - the MoE blocks' total and activated parameters (the formula below, from the recipe's numbers),
  - the converted model's memory counts, recomputed from the emitted --ultramem-* flags alone, equal
    to the plan's and within the rounding bound of the MoE's (n and m are integers),
  - bytes per token at decoding batch 1 and 8,
  - every emitted value survives the shell: shlex round trip, `bash -n`, and bash's own word
    splitting of the quoted line,
  - the emitted flags pass UltraMemConfig (with Megatron's TransformerConfig checks) and the
    plugin's validate_ultramem_args (both megatron-core versions), and Megatron-LM's own
    parse_args + validate_args (megatron.training, megatron-core 0.19),
  - a layout that cannot match (dense layers sharing --ffn-hidden-size with the memory slots) gives
    the layouts that can, each checked the same way.

python -m pytest -q tests/test_recipes.py
"""

import argparse
import contextlib
import io
import math
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import pytest

from megatron_ultramem import sizing
from megatron_ultramem.megatron_lm.convert import moe_to_ultramem_argv
from megatron_ultramem.sizing import NoMatch


@dataclass
class Recipe:
    name: str
    source: str
    args: str
    world_size: int
    # independently known numbers of one MoE block (from the recipe; see the formula in moe_counts)
    D: int
    experts: int
    topk: int
    F: int  # expert FFN
    S: int  # shared expert FFN (0: none)
    gated: bool
    moe_layers: List[int]  # 0-based MoE layer indices
    dense_ffn: int
    hybrid: bool = False
    parallel_fits: bool = True  # mode parallel has a solution (else: NoMatch with options)
    notes: Dict[str, str] = field(default_factory=dict)


MLM = "NVIDIA/Megatron-LM@core_v0.19.0"
RECIPES = [
    Recipe(
        "mixtral_8x7b",
        f"{MLM} examples/mixtral/train_mixtral_8x7b_distributed.sh (MODEL_ARGS, MOE_ARGS, "
        "MODEL_PARALLEL_ARGS)",
        "--use-mcore-models --disable-bias-linear --seq-length 4096 --max-position-embeddings 32768 "
        "--num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336 --num-attention-heads 32 "
        "--init-method-std 0.01 --attention-dropout 0.0 --hidden-dropout 0.0 --normalization RMSNorm "
        "--position-embedding-type rope --swiglu --untie-embeddings-and-output-weights "
        "--group-query-attention --num-query-groups 8 --no-masked-softmax-fusion "
        "--no-position-embedding --rotary-base 1000000 --num-experts 8 --moe-router-topk 2 "
        "--moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 1e-2 --moe-grouped-gemm "
        "--moe-token-dispatcher-type alltoall --overlap-param-gather --overlap-grad-reduce "
        "--tensor-model-parallel-size 1 --pipeline-model-parallel-size 4 "
        "--expert-model-parallel-size 8 --use-distributed-optimizer --sequence-parallel",
        world_size=32, D=4096, experts=8, topk=2, F=14336, S=0, gated=True,
        moe_layers=list(range(32)), dense_ffn=14336,
    ),
    Recipe(
        "qwen3_30b_a3b",
        f"{MLM} examples/post_training/modelopt/conf/Qwen/Qwen3-30B-A3B.sh (MODEL_ARGS); TP 4 / EP 2 "
        "from examples/rl/model_configs/qwen3_30b_a3b_moe.sh",
        "--disable-bias-linear --untie-embeddings-and-output-weights --position-embedding-type rope "
        "--no-rope-fusion --normalization RMSNorm --swiglu --num-layers 48 --hidden-size 2048 "
        "--ffn-hidden-size 6144 --num-attention-heads 32 --group-query-attention "
        "--num-query-groups 4 --kv-channels 128 --qk-layernorm --num-experts 128 "
        "--moe-ffn-hidden-size 768 --moe-router-topk 8 --moe-router-dtype fp32 "
        "--moe-aux-loss-coeff 1e-3 --moe-token-dispatcher-type alltoall "
        "--moe-router-load-balancing-type aux_loss --seq-length 4096 --max-position-embeddings 40960 "
        "--use-mcore-models --rotary-percent 1.0 --rotary-base 1000000 --no-bias-swiglu-fusion "
        "--sequence-parallel --tensor-model-parallel-size 4 --expert-model-parallel-size 2",
        world_size=8, D=2048, experts=128, topk=8, F=768, S=0, gated=True,
        moe_layers=list(range(48)), dense_ffn=6144,
    ),
    Recipe(
        "deepseek_v3",
        f"{MLM} examples/megatron_fsdp/sbatch_mfsdp_deepseek_v3.sh (PRETRAIN_ARGS: model, MoE, MLA "
        "and parallel flags; DeepSeek-V3's architecture, first 3 layers dense)",
        "--tensor-model-parallel-size 1 --expert-model-parallel-size 8 "
        "--expert-tensor-parallel-size 1 --use-mcore-models --sequence-parallel --disable-bias-linear "
        "--seq-length 4096 --num-layers 61 --hidden-size 7168 --ffn-hidden-size 18432 "
        "--num-attention-heads 128 --kv-channels 128 --max-position-embeddings 4096 "
        "--position-embedding-type rope --rotary-base 10000 --normalization RMSNorm "
        "--norm-epsilon 1e-6 --swiglu --untie-embeddings-and-output-weights "
        "--multi-latent-attention --attention-dropout 0.0 --hidden-dropout 0.0 --qk-layernorm "
        "--num-experts 256 --moe-layer-freq [0]*3+[1]*58 --moe-ffn-hidden-size 2048 "
        "--moe-shared-expert-intermediate-size 2048 --moe-router-load-balancing-type seq_aux_loss "
        "--moe-router-topk 8 --moe-router-pre-softmax --moe-grouped-gemm --moe-aux-loss-coeff 1e-4 "
        "--moe-router-group-topk 4 --moe-router-num-groups 8 --moe-router-topk-scaling-factor 2.5 "
        "--moe-router-score-function sigmoid --moe-router-enable-expert-bias "
        "--moe-router-bias-update-rate 1e-3 --moe-router-dtype fp32 --q-lora-rank 1536 "
        "--kv-lora-rank 512 --qk-head-dim 128 --qk-pos-emb-head-dim 64 --v-head-dim 128 "
        "--rotary-scaling-factor 40 --mscale 1.0 --mscale-all-dim 1.0 --mtp-num-layers 1 "
        "--mtp-loss-scaling-factor 0.1",
        world_size=64, D=7168, experts=256, topk=8, F=2048, S=2048, gated=True,
        moe_layers=list(range(3, 61)), dense_ffn=18432, parallel_fits=False,
    ),
    Recipe(
        "deepseek_v2_lite",
        f"{MLM} examples/post_training/modelopt/conf/deepseek-ai/DeepSeek-V2-Lite.sh (MODEL_ARGS)",
        "--attention-dropout 0.0 --hidden-dropout 0.0 --disable-bias-linear "
        "--untie-embeddings-and-output-weights --position-embedding-type rope --no-rope-fusion "
        "--normalization RMSNorm --norm-epsilon 1e-6 --swiglu --num-layers 27 --hidden-size 2048 "
        "--ffn-hidden-size 10944 --num-attention-heads 16 --kv-channels 16 --multi-latent-attention "
        "--kv-lora-rank 512 --v-head-dim 128 --qk-head-dim 128 --qk-layernorm "
        "--qk-pos-emb-head-dim 64 --num-experts 64 --moe-layer-freq ([0]+[1]*26) "
        "--moe-ffn-hidden-size 1408 --moe-grouped-gemm --moe-router-score-function softmax "
        "--moe-router-topk 6 --moe-router-topk-scaling-factor 1.0 --moe-router-pre-softmax "
        "--moe-shared-expert-intermediate-size 2816 --moe-aux-loss-coeff 1e-3 "
        "--moe-token-dispatcher-type alltoall --moe-token-drop-policy probs "
        "--moe-router-load-balancing-type seq_aux_loss --seq-length 1024 "
        "--max-position-embeddings 1024 --attention-softmax-in-fp32 --use-mcore-models "
        "--rotary-percent 1.0 --rotary-base 10000 --rotary-scaling-factor 40 --mscale 0.707 "
        "--mscale-all-dim 0.707",
        world_size=8, D=2048, experts=64, topk=6, F=1408, S=2816, gated=True,
        moe_layers=list(range(1, 27)), dense_ffn=10944, parallel_fits=False,
    ),
    Recipe(
        "kimi_k2",
        f"{MLM} examples/post_training/modelopt/conf/moonshotai/Kimi-K2-Instruct.sh (MODEL_ARGS)",
        "--disable-bias-linear --untie-embeddings-and-output-weights --position-embedding-type rope "
        "--no-rope-fusion --normalization RMSNorm --swiglu --num-layers 61 --hidden-size 7168 "
        "--ffn-hidden-size 18432 --num-attention-heads 64 --kv-channels 128 "
        "--multi-latent-attention --kv-lora-rank 512 --v-head-dim 128 --q-lora-rank 1536 "
        "--qk-head-dim 128 --qk-layernorm --qk-pos-emb-head-dim 64 --num-experts 384 "
        "--moe-layer-freq [0]*1+[1]*60 --moe-ffn-hidden-size 2048 --moe-router-dtype fp32 "
        "--moe-router-score-function sigmoid --moe-router-bias-update-rate 1e-3 "
        "--moe-router-enable-expert-bias --moe-router-topk 8 --moe-router-pre-softmax "
        "--moe-router-topk-scaling-factor 2.827 --moe-shared-expert-overlap "
        "--moe-shared-expert-intermediate-size 2048 --moe-aux-loss-coeff 1e-4 "
        "--moe-router-load-balancing-type seq_aux_loss --moe-token-dispatcher-type alltoall "
        "--moe-token-drop-policy probs --seq-length 4096 --max-position-embeddings 131072 "
        "--use-mcore-models --rotary-base 50000 --rotary-percent 1.0 --rotary-scaling-factor 32 "
        "--mscale 1.0 --mscale-all-dim 1.0 --recompute-activations --moe-layer-recompute "
        "--sequence-parallel",
        world_size=8, D=7168, experts=384, topk=8, F=2048, S=2048, gated=True,
        moe_layers=list(range(1, 61)), dense_ffn=18432, parallel_fits=False,
    ),
    Recipe(
        "llama4_maverick",
        "NVIDIA-NeMo/Megatron-Bridge src/megatron/bridge/models/llama/llama_provider.py "
        "(Llama4ModelProvider, Llama4Experts128ModelProvider: moe_layer_freq [0,1]*24) and "
        "src/megatron/bridge/recipes/llama/llama4_e128.py (TP 4, ETP 4, EP 128), as Megatron-LM flags",
        "--num-layers 48 --hidden-size 5120 --ffn-hidden-size 16384 --num-attention-heads 40 "
        "--group-query-attention --num-query-groups 8 --disable-bias-linear --swiglu "
        "--normalization RMSNorm --position-embedding-type rope --rotary-base 500000 "
        "--seq-length 8192 --max-position-embeddings 8192 --num-experts 128 --moe-router-topk 1 "
        "--moe-ffn-hidden-size 8192 --moe-shared-expert-intermediate-size 8192 "
        "--moe-layer-freq ([0,1]*24) --moe-router-score-function sigmoid "
        "--moe-token-dispatcher-type alltoall --moe-grouped-gemm --moe-shared-expert-overlap "
        "--tensor-model-parallel-size 4 --expert-tensor-parallel-size 4 "
        "--expert-model-parallel-size 128 --sequence-parallel",
        world_size=512, D=5120, experts=128, topk=1, F=8192, S=8192, gated=True,
        moe_layers=list(range(1, 48, 2)), dense_ffn=16384, parallel_fits=False,
    ),
    Recipe(
        "interleaved_freq2",
        "Llama-4-Maverick's shape (above) with Megatron-LM's integer spelling --moe-layer-freq 2 "
        "(layers 0, 2, 4, ... MoE), TP 1, EP 8",
        "--num-layers 48 --hidden-size 5120 --ffn-hidden-size 16384 --num-attention-heads 40 "
        "--group-query-attention --num-query-groups 8 --disable-bias-linear --swiglu "
        "--normalization RMSNorm --seq-length 8192 --max-position-embeddings 8192 "
        "--num-experts 128 --moe-router-topk 1 --moe-ffn-hidden-size 8192 "
        "--moe-shared-expert-intermediate-size 8192 --moe-layer-freq 2 "
        "--moe-router-score-function sigmoid --expert-model-parallel-size 8",
        world_size=8, D=5120, experts=128, topk=1, F=8192, S=8192, gated=True,
        moe_layers=list(range(0, 48, 2)), dense_ffn=16384, parallel_fits=False,
    ),
    Recipe(
        "llama4_scout",
        "NVIDIA-NeMo/Megatron-Bridge src/megatron/bridge/models/llama/llama_provider.py "
        "(Llama4ModelProvider, Llama4Experts16ModelProvider: every layer MoE), as Megatron-LM flags",
        "--num-layers 48 --hidden-size 5120 --ffn-hidden-size 16384 --num-attention-heads 40 "
        "--group-query-attention --num-query-groups 8 --disable-bias-linear --swiglu "
        "--normalization RMSNorm --seq-length 8192 --max-position-embeddings 8192 "
        "--num-experts 16 --moe-router-topk 1 --moe-ffn-hidden-size 8192 "
        "--moe-shared-expert-intermediate-size 8192 --moe-router-score-function sigmoid "
        "--tensor-model-parallel-size 4 --expert-model-parallel-size 16",
        world_size=64, D=5120, experts=16, topk=1, F=8192, S=8192, gated=True,
        moe_layers=list(range(48)), dense_ffn=16384,
    ),
    Recipe(
        "nemotron3_nano_hybrid",
        f"{MLM} examples/post_training/modelopt/conf/nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16.sh "
        "(MODEL_ARGS without the fused-kernel and runtime flags)",
        "--num-experts 128 --moe-router-topk 6 --moe-aux-loss-coeff 1e-4 "
        "--moe-router-topk-scaling-factor 2.5 --moe-router-score-function sigmoid "
        "--moe-router-enable-expert-bias --moe-router-dtype fp32 "
        "--moe-router-load-balancing-type seq_aux_loss --moe-shared-expert-intermediate-size 3712 "
        "--mamba-num-heads 64 --mamba-head-dim 64 "
        "--hybrid-layer-pattern MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME "
        "--use-mcore-models --untie-embeddings-and-output-weights --disable-bias-linear "
        "--init-method-std 0.0173 --position-embedding-type none --squared-relu --hidden-size 2688 "
        "--num-attention-heads 32 --group-query-attention --num-query-groups 2 "
        "--ffn-hidden-size 1856 --kv-channels 128 --normalization RMSNorm --seq-length 8192 "
        "--max-position-embeddings 8192",
        world_size=8, D=2688, experts=128, topk=6, F=1856, S=3712, gated=False,
        moe_layers=[i for i, s in enumerate("MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME")
                    if s == "E"],  # fmt: skip
        dense_ffn=1856, hybrid=True,
    ),
]
IDS = [r.name for r in RECIPES]


# ---------------------------------------------------------------------- independent counts
def moe_block(r: Recipe):
    """(total, activated) of one MoE block: experts x c*D*F + router D*experts + shared c*D*S."""
    c = 3 if r.gated else 2
    expert = c * r.D * r.F
    shared = c * r.D * r.S
    router = r.D * r.experts
    return r.experts * expert + router + shared, r.topk * expert + router + shared


def test_headline_moe_counts():
    """The MoE parameter counts of two recipes against their published sizes: DeepSeek-V3's 58
    MoE blocks are 656.6B of its 671B parameters (the rest: MLA attention ~11.4B, 3 dense MLPs
    1.2B, embeddings 1.9B) and 23.1B of its 37B activated; Mixtral 8x7B's 32 blocks 45.1B of 46.7B
    (2 x 5.6B = 11.3B of its 12.9B activated)."""
    by = {r.name: r for r in RECIPES}
    total, active = moe_block(by["deepseek_v3"])
    assert 58 * total == 656_569_532_416 and 58 * active == 23_095_410_688
    total, active = moe_block(by["mixtral_8x7b"])
    assert 32 * total == 45_098_205_184 and 32 * active == 11_275_337_728


def flags_of(argv: List[str]) -> argparse.Namespace:
    """The converted model's settings read back from its argument list (last value wins)."""
    p = argparse.ArgumentParser(allow_abbrev=False)
    for flag in ("--num-layers", "--hidden-size", "--ffn-hidden-size", "--num-experts",
                 "--moe-ffn-hidden-size", "--moe-router-topk", "--moe-shared-expert-intermediate-size",
                 "--tensor-model-parallel-size", "--expert-model-parallel-size",
                 "--expert-tensor-parallel-size", "--pipeline-model-parallel-size",
                 "--num-attention-heads", "--ultramem-num-keys", "--ultramem-key-dim",
                 "--ultramem-value-dim", "--ultramem-expansion", "--ultramem-tucker-rank",
                 "--ultramem-num-cores", "--ultramem-num-heads", "--ultramem-topm"):  # fmt: skip
        p.add_argument(flag, type=int)
    for flag in ("--moe-layer-freq", "--ultramem-mode", "--ultramem-layers", "--hybrid-layer-pattern",
                 "--moe-router-score-function"):  # fmt: skip
        p.add_argument(flag)
    p.add_argument("--spec", nargs=2)
    p.add_argument("--swiglu", action="store_true")
    p.add_argument("--moe-router-pre-softmax", action="store_true")
    ns, _ = p.parse_known_args(argv)
    return ns


def memory_counts(ns, gated: bool):
    """(total, activated) of one converted slot from its flags: query 2KD, keys 2*H*sqrt(E)*n*K*r,
    cores H*h*r^2, norms 8K, values n^2*Dv, out D*E*Dv, plus (parallel) the dense MLP c*D*F."""
    D, K, H, n = ns.hidden_size, ns.ultramem_key_dim, ns.ultramem_num_heads, ns.ultramem_num_keys
    E, r, h, Dv, m = (ns.ultramem_expansion, ns.ultramem_tucker_rank, ns.ultramem_num_cores,
                      ns.ultramem_value_dim, ns.ultramem_topm)  # fmt: skip
    s = math.isqrt(E)
    fixed = 2 * K * D + 2 * H * s * n * K * r + H * h * r * r + 8 * K + D * E * Dv
    mlp = (3 if gated else 2) * D * ns.ffn_hidden_size if ns.ultramem_mode == "parallel" else 0
    return fixed + n * n * Dv + mlp, fixed + H * m * Dv + mlp


def memory_layers_of(ns, r: Recipe) -> List[int]:
    """0-based layers holding a memory, from --ultramem-layers (read over the hybrid pattern)."""
    from megatron_ultramem.patterns import parse_layer_pattern

    if r.hybrid:
        pattern = ns.hybrid_layer_pattern
        symbol = "E" if ns.ultramem_mode == "replace" else "-"
        chosen = parse_layer_pattern(_int_or(ns.ultramem_layers), len(pattern))
        return [i for i, s in enumerate(pattern) if s == symbol and chosen[i]]
    chosen = parse_layer_pattern(_int_or(ns.ultramem_layers), ns.num_layers)
    return [i for i, x in enumerate(chosen) if x]


def _int_or(text):
    return int(text) if str(text).isdigit() else text


def has_dense_layers(r: Recipe) -> bool:
    """A dense MLP layer in the model: GPT layers outside the MoE pattern, a hybrid's '-'."""
    if r.hybrid:
        return "-" in flags_of(shlex.split(r.args)).hybrid_layer_pattern
    return len(r.moe_layers) < flags_of(shlex.split(r.args)).num_layers


def check_plan(r: Recipe, out: List[str], plan) -> None:
    """Everything the module doc lists, for one converted argument list."""
    ns = flags_of(out)
    total, active = moe_block(r)
    L = len(r.moe_layers)
    # the MoE side of the plan equals the independent count
    t = plan.totals()
    assert (t["moe_total"], t["moe_active"]) == (L * total, L * active)
    # memories sit on the MoE layers (one per J of them), nowhere else
    layers = memory_layers_of(ns, r)
    J = L // len(layers)
    assert layers == r.moe_layers[::J] and layers == [i for i, x in enumerate(plan.memory_layers) if x]
    # the converted counts, from the flags alone
    mem_total, mem_active = memory_counts(ns, r.gated)
    mlp_only = (3 if r.gated else 2) * r.D * ns.ffn_hidden_size if ns.ultramem_mode == "parallel" else 0
    rest = (L - len(layers)) * mlp_only
    assert (t["ultramem_total"], t["ultramem_active"]) == (
        len(layers) * mem_total + rest, len(layers) * mem_active + rest)
    # within the rounding of the integers the solver picked: n (total; one step of n changes it by
    # (2n+1)*Dv + 2*H*sqrt(E)*K*r), m (activated; one step: H*Dv), and a solved F_d (rounded to 64)
    n, Dv, H = ns.ultramem_num_keys, ns.ultramem_value_dim, ns.ultramem_num_heads
    key_step = 2 * H * math.isqrt(ns.ultramem_expansion) * ns.ultramem_key_dim * ns.ultramem_tucker_rank
    free_fd = ns.ultramem_mode == "parallel" and not has_dense_layers(r)
    mlp_step = (3 if r.gated else 2) * r.D * 32 if free_fd else 0
    assert abs(t["ultramem_total"] - L * total) <= len(layers) * ((2 * n + 1) * Dv + key_step + mlp_step)
    assert abs(t["ultramem_active"] - L * active) <= len(layers) * (H * Dv + key_step + mlp_step)
    # bytes per token (2 bytes/param), summed over the former MoE layers: batch 1 reads exactly the
    # activated parameters; batch 8 reads the router, the shared expert and min(8k, experts)
    # experts once, and a memory its non-value parameters once plus min(8*H*m, n^2) rows
    c = 3 if r.gated else 2
    b1 = plan.bytes_per_token(1)
    assert b1 == {"moe": 2.0 * L * active, "ultramem": 2.0 * t["ultramem_active"]}
    b8 = plan.bytes_per_token(8)
    moe8 = (r.D * r.experts + c * r.D * r.S + min(8 * r.topk, r.experts) * c * r.D * r.F) * 2 / 8
    rows = min(8 * H * ns.ultramem_topm, n * n)
    mem8 = (mem_total - n * n * Dv + rows * Dv) * 2 / 8
    assert b8["moe"] == pytest.approx(L * moe8, rel=1e-12)
    assert b8["ultramem"] == pytest.approx(len(layers) * mem8 + rest * 2 / 8, rel=1e-12)
    # m within the Triton kernels' limit and the virtual grid
    from megatron_ultramem.kernels.topm import MAX_M

    assert sizing.KERNEL_MAX_M == MAX_M
    assert 1 <= ns.ultramem_topm <= min(MAX_M, math.isqrt(ns.ultramem_expansion) * n)
    # the spec and EP: replace keeps the experts' flags and EP, parallel drops them
    assert ns.spec == ["megatron_ultramem.megatron_lm",
                       "ultramem_hybrid_stack_spec" if r.hybrid else "ultramem_block_spec"]  # fmt: skip
    src = flags_of(shlex.split(r.args))
    if ns.ultramem_mode == "replace":
        assert ns.num_experts == r.experts
        assert ns.expert_model_parallel_size == src.expert_model_parallel_size
        assert any("expert" in note for note in plan.notes)
    else:
        assert ns.num_experts is None and ns.expert_model_parallel_size is None
        if (src.expert_model_parallel_size or 1) > 1:
            assert any("--expert-model-parallel-size" in note and "dropped" in note for note in plan.notes)
    # dense layers keep their FFN (and the memory slots share it); without dense layers, mode
    # parallel solves the MLP beside each memory
    if ns.ultramem_mode == "replace" or has_dense_layers(r):
        assert ns.ffn_hidden_size == r.dense_ffn
    check_shell(out)
    check_config(r, out)


def check_shell(out: List[str]) -> None:
    """The emitted line, pasted into bash, gives back exactly these words."""
    line = shlex.join(out)
    assert shlex.split(line) == out
    proc = subprocess.run(["bash", "-n", "-c", f"true {line}"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run(["bash", "-c", f"printf '%s\\0' {line}"], capture_output=True)
    assert proc.stdout.split(b"\0")[:-1] == [w.encode() for w in out]


# ---------------------------------------------------------------------- validation
def _ultramem_namespace(out: List[str]) -> argparse.Namespace:
    """The --ultramem-* flags parsed the way Megatron-LM parses them (add_ultramem_args)."""
    from megatron_ultramem.megatron_lm.arguments import add_ultramem_args

    p = argparse.ArgumentParser(allow_abbrev=False)
    add_ultramem_args(p)
    ns, _ = p.parse_known_args(out)
    return ns


def check_config(r: Recipe, out: List[str]) -> None:
    """UltraMemConfig (TransformerConfig's own checks included) and the plugin's
    validate_ultramem_args accept the converted model."""
    import torch

    from megatron_ultramem.config import UltraMemConfig, ultramem_fields_of
    from megatron_ultramem.megatron_lm.arguments import validate_ultramem_args

    ns = flags_of(out)
    um = _ultramem_namespace(out)
    fields = {k: v for k, v in vars(um).items() if k.startswith("ultramem_") and
              k not in ("ultramem_log_stats", "ultramem_per_layer_logging")}  # fmt: skip
    num_layers = ns.num_layers or len(ns.hybrid_layer_pattern)
    pp = ns.pipeline_model_parallel_size or 1
    moe = {}
    if ns.num_experts:
        freq = ns.moe_layer_freq or 1
        if r.hybrid:
            freq = [1 if s == "E" else 0 for s in ns.hybrid_layer_pattern]
        elif isinstance(_int_or(freq), str):
            from megatron_ultramem.patterns import parse_layer_pattern

            freq = parse_layer_pattern(freq, num_layers)
        moe = dict(num_moe_experts=ns.num_experts, moe_router_topk=ns.moe_router_topk,
                   moe_ffn_hidden_size=ns.moe_ffn_hidden_size or ns.ffn_hidden_size,
                   moe_shared_expert_intermediate_size=ns.moe_shared_expert_intermediate_size,
                   moe_layer_freq=_int_or(freq), moe_grouped_gemm=False,
                   moe_router_pre_softmax=ns.moe_router_pre_softmax,
                   moe_router_score_function=ns.moe_router_score_function or "softmax")  # fmt: skip
    config = UltraMemConfig(
        num_layers=num_layers, hidden_size=ns.hidden_size, num_attention_heads=ns.num_attention_heads,
        ffn_hidden_size=ns.ffn_hidden_size, gated_linear_unit=ns.swiglu, add_bias_linear=False,
        tensor_model_parallel_size=ns.tensor_model_parallel_size or 1,
        expert_model_parallel_size=ns.expert_model_parallel_size or 1,
        sequence_parallel=(ns.tensor_model_parallel_size or 1) > 1,  # Megatron: MoE + TP needs SP
        pipeline_model_parallel_size=pp, pipeline_dtype=torch.bfloat16 if pp > 1 else None,
        **moe, **fields,
    )  # fmt: skip
    assert ultramem_fields_of(config)["ultramem_topm"] == ns.ultramem_topm
    if r.hybrid:
        # the pattern the spec reads: memories exactly on the former MoE layers
        layers = memory_layers_of(ns, r)
        assert layers == r.moe_layers
        from megatron_ultramem import compat

        if compat.megatron_core_version() < "0.19":
            return  # HybridModel's validation needs megatron-core 0.19 (its hybrid module)
    args = argparse.Namespace(
        **vars(um), spec=ns.spec, transformer_impl="local", num_layers=num_layers,
        num_experts=ns.num_experts, moe_layer_freq=_int_or(ns.moe_layer_freq or 1),
        hybrid_layer_pattern=ns.hybrid_layer_pattern, hidden_size=ns.hidden_size,
        num_attention_heads=ns.num_attention_heads, ffn_hidden_size=ns.ffn_hidden_size,
        tensor_model_parallel_size=ns.tensor_model_parallel_size or 1,
        expert_model_parallel_size=ns.expert_model_parallel_size or 1,
        pipeline_model_parallel_size=pp,
    )  # fmt: skip
    validate_ultramem_args(args)


def _have_megatron_training() -> bool:
    try:
        from megatron.training.arguments import parse_args, validate_args  # noqa: F401
    except ImportError:
        return False
    return True


RUNTIME = ["--transformer-impl", "local", "--micro-batch-size", "1", "--train-iters", "10",
           "--lr", "1e-4", "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "1024"]  # fmt: skip


def check_megatron_lm(r: Recipe, out: List[str], monkeypatch) -> None:
    """Megatron-LM's own parse_args (with the plugin's flags) and validate_args, then the plugin's
    validation on Megatron's namespace (megatron-core 0.19: megatron.training ships with it).

    validate_args reads the GPU's compute capability (grouped GEMM, TP stream settings): it is
    answered as an H100's (9.0), the recipes' hardware, with Megatron-LM's required
    CUDA_DEVICE_MAX_CONNECTIONS=1 for TP on it."""
    import torch
    from megatron.training import arguments as mlm

    from megatron_ultramem.megatron_lm.arguments import add_ultramem_args, validate_ultramem_args

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))
    monkeypatch.setattr(mlm, "get_device_arch_version", lambda: 9)
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    saved = sys.argv
    sys.argv = ["pretrain_gpt.py", *out, *RUNTIME]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            args = mlm.parse_args(extra_args_provider=add_ultramem_args)
            args.world_size = r.world_size
            mlm.validate_args(args)
    finally:
        sys.argv = saved
    validate_ultramem_args(args)
    assert args.ultramem_topm == flags_of(out).ultramem_topm


# ---------------------------------------------------------------------- the tests
@pytest.mark.parametrize("recipe", RECIPES, ids=IDS)
@pytest.mark.parametrize("mode", ["parallel", "replace"])
def test_recipe_conversion(recipe, mode):
    argv = shlex.split(recipe.args)
    if mode == "parallel" and not recipe.parallel_fits:
        with pytest.raises(NoMatch) as info:
            moe_to_ultramem_argv(argv, mode=mode)
        options = info.value.options
        # the dense layers' FFN equals the activated experts + shared expert here, so the memory's
        # budget is the router alone, below any memory's query and output projections
        assert "below a memory's fixed activated parts" in info.value.reason
        assert options and options[0].choose == ["--mode", "replace"]
        for option in options:
            out, plan = moe_to_ultramem_argv(
                argv, **_choose(option.choose, mode))
            assert plan.memory == option.plan.memory
            check_plan(recipe, out, plan)
        return
    out, plan = moe_to_ultramem_argv(argv, mode=mode)
    check_plan(recipe, out, plan)
    # sizing prints the same flags (one planner)
    text = _sizing_report(argv + (["--mode", mode]))
    assert text.splitlines()[-1] == "Megatron-LM flags: " + shlex.join(plan.megatron_args())
    assert out[-len(plan.megatron_args()):] == plan.megatron_args()


def _choose(choose: List[str], mode: str) -> dict:
    """moe_to_ultramem_argv keywords from an option's sizing/convert options."""
    p = argparse.ArgumentParser()
    p.add_argument("--mode", default=mode)
    p.add_argument("--ultramem-value-dim", type=int)
    p.add_argument("--ultramem-key-dim", type=int)
    p.add_argument("--moe-layers-per-memory", type=int, default=1)
    ns = p.parse_args(choose)
    overrides = {k: v for k, v in (("value_dim", ns.ultramem_value_dim),
                                   ("key_dim", ns.ultramem_key_dim)) if v}  # fmt: skip
    return dict(mode=ns.mode, overrides=overrides, moe_layers_per_memory=ns.moe_layers_per_memory)


def _sizing_report(argv: List[str]) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert sizing.main(argv) == 0
    return buf.getvalue().strip()


@pytest.mark.parametrize("recipe", [r for r in RECIPES if not r.hybrid], ids=[r.name for r in RECIPES if not r.hybrid])
def test_megatron_lm_accepts_the_converted_flags(recipe, monkeypatch):
    """Megatron-LM's parse_args + validate_args (megatron-core 0.19's megatron.training) on each
    converted GPT recipe, both modes (an option that fits where parallel does not). On 0.16, which
    has no megatron.training, the config-level checks of test_recipe_conversion are what runs."""
    if not _have_megatron_training():
        # megatron-core 0.16: check_config (TransformerConfig + UltraMemConfig + the plugin's
        # validation) is the Megatron validation available; run it on both modes here too
        for mode in ("parallel", "replace"):
            out = _converted(recipe, mode)
            check_config(recipe, out)
        return
    for mode in ("parallel", "replace"):
        check_megatron_lm(recipe, _converted(recipe, mode), monkeypatch)


def test_megatron_lm_accepts_the_converted_hybrid_flags(monkeypatch):
    """The hybrid recipe through Megatron-LM's arguments (0.19; HybridModel does not exist in 0.16,
    where the pattern and config checks of test_recipe_conversion run instead)."""
    recipe = next(r for r in RECIPES if r.hybrid)
    for mode in ("parallel", "replace"):
        out = _converted(recipe, mode)
        if _have_megatron_training():
            check_megatron_lm(recipe, out, monkeypatch)
        else:
            check_config(recipe, out)


def _converted(recipe: Recipe, mode: str) -> List[str]:
    argv = shlex.split(recipe.args)
    try:
        return moe_to_ultramem_argv(argv, mode=mode)[0]
    except NoMatch as err:
        return moe_to_ultramem_argv(argv, **_choose(err.options[0].choose, mode))[0]


def test_sizing_cli_and_convert_agree_on_every_recipe(capsys):
    """One code path: sizing's printed flags are the tail of convert's output for each recipe and
    mode (the options of a NoMatch too)."""
    from megatron_ultramem.megatron_lm import convert

    for recipe in RECIPES:
        for mode in ("parallel", "replace"):
            argv = shlex.split(recipe.args)
            assert sizing.main(["--mode", mode, *argv]) == 0
            report = capsys.readouterr().out
            code = _exit_code(convert.main, ["--mode", mode, "--format", "shell", "--", *argv])  # fmt: skip
            captured = capsys.readouterr()
            if "Layouts that fit" in report:
                assert code == 2 and "choose a layout that fits" in captured.err
                flags = [l.split("Megatron-LM flags: ", 1)[1] for l in report.splitlines()
                         if "Megatron-LM flags: " in l]  # fmt: skip
                assert flags and all(f in captured.err for f in flags)
            else:
                assert code == 0
                flags = report.splitlines()[-1].split("Megatron-LM flags: ", 1)[1]
                assert captured.out.strip().endswith(flags)
                assert all(f"note: {n}" in captured.err for n in
                           [l[6:] for l in report.splitlines() if l.startswith("note: ")])  # fmt: skip


def _exit_code(main, argv) -> int:
    """What `python -m ...` exits with (cli.run_main turns a BadInput into exit status 2)."""
    from megatron_ultramem.cli import run_main

    try:
        return run_main(main, argv)
    except SystemExit as err:
        return err.code


def test_counts_formulas_match_built_modules(megatron_world):
    """The formulas behind every number above, against modules Megatron-Core builds: an
    UltraMemLayer (odd sizes) and a MoE layer with a shared expert and its gate."""
    import torch
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_ultramem import compat
    from megatron_ultramem.layer import UltraMemLayer
    from megatron_ultramem.sizing import MoEShape, UltraMemShape
    from tests.helpers import small_config

    config = small_config(ultramem_num_keys=7, ultramem_key_dim=6, ultramem_value_dim=10,
                          ultramem_expansion=9, ultramem_num_heads=3, ultramem_topm=5)  # fmt: skip
    layer = UltraMemLayer(config, layer_index=0)
    shape = UltraMemShape(24, 6, 3, 7, 9, 2, 2, 10, 5)
    assert sum(p.numel() for p in layer.parameters()) == shape.total_params
    for gated in (False, True):
        moe_config = TransformerConfig(
            num_layers=1, hidden_size=24, num_attention_heads=4, ffn_hidden_size=40,
            num_moe_experts=5, moe_router_topk=2, moe_ffn_hidden_size=12,
            moe_shared_expert_intermediate_size=20, moe_shared_expert_gate=True,
            gated_linear_unit=gated, add_bias_linear=False, use_cpu_initialization=True,
            params_dtype=torch.float32, moe_token_dispatcher_type="allgather",
        )  # fmt: skip
        spec = get_gpt_layer_local_spec(num_experts=5, moe_grouped_gemm=False).submodules.mlp
        moe = compat.build_mlp(spec, moe_config)  # a ModuleSpec (0.16) or a builder (0.19)
        shape = MoEShape(24, 5, 2, 12, 1, gated=gated, shared_expert_ffn_hidden_size=20,
                         shared_expert_gate=True)  # fmt: skip
        assert sum(p.numel() for p in moe.parameters()) == shape.total_params
