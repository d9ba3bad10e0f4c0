"""Hugging Face export of checkpoints saved at several layouts, under torchrun (gloo, CPU).

    torchrun --standalone --nproc_per_node 4 tests/distributed/hf_worker.py gpt
    torchrun --standalone --nproc_per_node 4 tests/distributed/hf_worker.py hybrid

For each model (placements 'parallel', 'replace' and 'skip', each with other GPT options:
LayerNorm/RMSNorm, GELU exact/tanh-fused/SwiGLU, MHA/GQA, QK layernorm, RoPE base, percent,
interleaving, interpolation and Llama-3 scaling, learned absolute positions, tied/untied
embeddings, biases on/off) and layout (TP=2 x EP=2, TP=2 x PP=2, TP=1), the model is saved the
way Megatron-LM's pretrain_gpt.py saves it (`{'args', 'checkpoint_version', 'iteration', 'model'}`
through dist_checkpointing into iter_XXXXXXX, and the tracker file), exported with
`megatron_ultramem.export_hf`, loaded with transformers' AutoModelForCausalLM
(trust_remote_code), and its logits are compared with the Megatron model that saved it (TP x EP:
the saving model itself, logits gathered; PP: the single-stage model loaded from the checkpoint).
Greedy generate() for 32 tokens is compared with a greedy loop over the Megatron model.

Tolerance: fp32 logits, absolute 1e-4 (|logits| < 10 here): Megatron sums TP partial products and
computes attention with baddbmm, the HF model with matmul in another order: differences are a few
float32 ulps of the hidden states (measured <= 2e-6); a misplaced weight changes logits by > 1e-2.
"""

import argparse
import os
import sys
import tempfile
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
warnings.filterwarnings("ignore")

from megatron.core import parallel_state as ps  # noqa: E402

from megatron_ultramem import cpu_compat  # noqa: E402

from helpers import small_config  # noqa: E402

ATOL = 1e-4
VOCAB, SEQ, MAX_POS, NEW = 40, 12, 64, 32


def log(*a):
    if torch.distributed.get_rank() == 0:
        print(*a, flush=True)


def setup(tp=1, ep=1, pp=1):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 expert_model_parallel_size=ep)  # fmt: skip
    model_parallel_cuda_manual_seed(1234)


BASE_ARGS = dict(
    num_layers=4, hidden_size=24, num_attention_heads=4, ffn_hidden_size=40, kv_channels=None,
    normalization="LayerNorm", norm_epsilon=1e-5, add_bias_linear=True, add_qkv_bias=False,
    qk_layernorm=False, group_query_attention=False, num_query_groups=1, swiglu=False,
    bias_gelu_fusion=False, bias_swiglu_fusion=False, position_embedding_type="rope",
    rotary_base=10000, rotary_percent=1.0, rotary_interleaved=False,
    rotary_seq_len_interpolation_factor=None, use_rope_scaling=False, rope_scaling_factor=8.0,
    untie_embeddings_and_output_weights=True, padded_vocab_size=VOCAB,
    max_position_embeddings=MAX_POS, tokenizer_type="NullTokenizer", ckpt_format="torch_dist",
    num_experts=None, multi_latent_attention=False, apply_residual_connection_post_layernorm=False,
    apply_layernorm_1p=False, hybrid_layer_pattern=None,
    ultramem_num_keys=5, ultramem_key_dim=6, ultramem_value_dim=12, ultramem_expansion=4,
    ultramem_tucker_rank=2, ultramem_num_cores=2, ultramem_num_heads=2, ultramem_topm=7,
    ultramem_score_activation="none", ultramem_skip_units=None,
)  # fmt: skip
"""Megatron-LM's argument names and defaults for what the test models use (what
pretrain_gpt.py saves in the checkpoint as `args`)."""

# Each case: (TransformerConfig fields, GPTModel arguments, the same model as Megatron-LM arguments)
CASES = {
    "parallel": (
        dict(ultramem_mode="parallel", ultramem_layers="[0,1,1,0]", seq_len_interpolation_factor=None),
        dict(position_embedding_type="rope", share_embeddings_and_output_weights=True,
             rope_scaling=True, rope_scaling_factor=8.0, seq_len_interpolation_factor=2.0),
        dict(ultramem_mode="parallel", ultramem_layers="[0,1,1,0]", untie_embeddings_and_output_weights=False,
             use_rope_scaling=True, rotary_seq_len_interpolation_factor=2.0),
    ),
    "replace": (
        dict(ultramem_mode="replace", ultramem_layers="[1,0,1,0]", normalization="RMSNorm",
             gated_linear_unit=True, activation_func=F.silu, num_query_groups=2, qk_layernorm=True,
             add_bias_linear=False, rotary_interleaved=True, ultramem_score_activation="softmax"),
        dict(position_embedding_type="rope", rotary_base=500, rotary_percent=0.5,
             share_embeddings_and_output_weights=False),
        dict(ultramem_mode="replace", ultramem_layers="[1,0,1,0]", normalization="RMSNorm", swiglu=True,
             group_query_attention=True, num_query_groups=2, qk_layernorm=True, add_bias_linear=False,
             rotary_interleaved=True, rotary_base=500, rotary_percent=0.5,
             ultramem_score_activation="softmax"),
    ),
    "skip": (
        dict(ultramem_mode="skip", ultramem_skip_units="0:1,2:2", bias_activation_fusion=True,
             add_qkv_bias=True),
        dict(position_embedding_type="learned_absolute", share_embeddings_and_output_weights=False),
        dict(ultramem_mode="skip", ultramem_skip_units="0:1,2:2", bias_gelu_fusion=True,
             add_qkv_bias=True, position_embedding_type="learned_absolute"),
    ),
}


def build_gpt(case, tp=1, ep=1, pp=1, pre=True, post=True):
    from megatron.core.models.gpt import GPTModel

    from megatron_ultramem.specs import get_ultramem_decoder_block_spec

    cfg_kw, model_kw, _ = CASES[case]
    cfg_kw = {k: v for k, v in cfg_kw.items() if k != "seq_len_interpolation_factor"}
    cfg = small_config(
        num_layers=4, ultramem_value_dim=12, tensor_model_parallel_size=tp,
        expert_model_parallel_size=ep, pipeline_model_parallel_size=pp, ultramem_impl="auto",
        **({"pipeline_dtype": torch.float32} if pp > 1 else {}), **cfg_kw,
    )  # fmt: skip
    spec = get_ultramem_decoder_block_spec(cfg, use_transformer_engine=False)
    torch.manual_seed(0)
    return GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=VOCAB,
                    max_sequence_length=MAX_POS, pre_process=pre, post_process=post,
                    parallel_output=False, **model_kw).eval()  # fmt: skip


def perturb(model):
    """Move every parameter off its init (biases and norms included) the same way on every rank,
    so replicated copies stay identical; then refresh the Tucker vectors from the cores."""
    from megatron_ultramem.layer import UltraMemLayer

    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for m in model.modules():
            if isinstance(m, UltraMemLayer):
                m.refresh_tucker_vectors()


def tokens_and_mask(n=SEQ):
    ids = torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(3))
    return ids


def megatron_logits(model, ids):
    s = ids.shape[1]
    mask = torch.ones(1, 1, s, s, dtype=torch.bool).triu(1)
    pos = torch.arange(s)[None].expand(ids.shape[0], s)
    with torch.no_grad():
        return model(ids, pos, mask).float()


def megatron_greedy(model, ids, new=NEW):
    for _ in range(new):
        nxt = megatron_logits(model, ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    return ids


def save_megatron_lm(model, root, args_ns, iteration=7):
    """The checkpoint layout of Megatron-LM's save_checkpoint with --ckpt-format torch_dist."""
    from megatron.core import dist_checkpointing

    path = os.path.join(root, f"iter_{iteration:07d}")
    if torch.distributed.get_rank() == 0:
        os.makedirs(path)
    torch.distributed.barrier()
    state = {"args": args_ns, "checkpoint_version": 3.0, "iteration": iteration,
             "model": model.sharded_state_dict()}  # fmt: skip
    dist_checkpointing.save(state, path)
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(iteration))
    torch.distributed.barrier()
    return path


def shared_tmpdir():
    root = [tempfile.mkdtemp() if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(root, src=0)
    return root[0]


def export_and_load(root, name):
    """Rank 0 exports, every rank loads the folder (transformers, trust_remote_code)."""
    from transformers import AutoModelForCausalLM

    from megatron_ultramem.export_hf import export

    out = os.path.join(os.path.dirname(root), f"{os.path.basename(root)}_{name}_hf")
    if torch.distributed.get_rank() == 0:
        export(root, out, quiet=True, max_shard_size="20KB")  # several shards + index
    torch.distributed.barrier()
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    return hf, out


def check(name, got, want):
    err = (got - want).abs().max().item()
    if not err <= ATOL:
        raise AssertionError(f"{name}: max |logits difference| {err:.3e} > {ATOL}")
    return err


def hf_greedy(hf, ids, new=NEW):
    with torch.no_grad():
        return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, pad_token_id=0)  # fmt: skip


def scenario_gpt():
    from megatron.core import dist_checkpointing

    ids = tokens_and_mask()
    base = shared_tmpdir()
    for case in CASES:
        ns = argparse.Namespace(**{**BASE_ARGS, **CASES[case][2]})
        tied = CASES[case][1].get("share_embeddings_and_output_weights", False)
        # (Megatron syncs tied embeddings across pipeline stages on CUDA only: PP with untied ones)
        for tp, ep, pp in ((2, 2, 1), (1, 1, 1)) if tied else ((2, 2, 1), (2, 1, 2), (1, 1, 1)):
            layout = f"TP={tp} EP={ep} PP={pp}"
            setup(tp, ep, pp)
            rank = ps.get_pipeline_model_parallel_rank()
            model = build_gpt(case, tp, ep, pp, pre=rank == 0, post=rank == pp - 1)
            perturb(model) if pp == 1 else None
            root = os.path.join(base, f"{case}_{tp}{ep}{pp}")
            if pp > 1:  # the stages hold slices of the single-stage model's perturbed weights
                setup(1, 1, 1)
                full = build_gpt(case)
                perturb(full)
                single = os.path.join(base, f"{case}_single")
                save_megatron_lm(full, single, ns)
                setup(tp, ep, pp)
                sd = model.sharded_state_dict()
                model.load_state_dict(dist_checkpointing.load(sd, os.path.join(single, "iter_0000007")), strict=False)
            save_megatron_lm(model, root, ns)
            hf, out = export_and_load(root, "out")
            if pp == 1:
                want, ref = megatron_logits(model, ids), model
            else:  # the single-stage model, loaded from the PP-saved checkpoint
                setup(1, 1, 1)
                ref = build_gpt(case)
                st = dist_checkpointing.load(ref.sharded_state_dict(), os.path.join(root, "iter_0000007"))
                ref.load_state_dict(st, strict=False)
                want = megatron_logits(ref, ids)
            with torch.no_grad():
                got = hf(ids).logits
            err = check(f"{case} {layout}", got, want)
            msg = f"ok {case} saved at {layout}: HF logits == Megatron's (max diff {err:.1e})"
            if (tp, ep, pp) == (2, 2, 1) or pp > 1:
                g_meg = megatron_greedy(ref, ids)
                g_hf = hf_greedy(hf, ids)
                if not torch.equal(g_meg, g_hf):
                    raise AssertionError(f"{case} {layout}: greedy tokens differ\n{g_meg}\n{g_hf}")
                msg += f"; greedy generate() == Megatron greedy for {NEW} tokens"
            n_files = len([f for f in os.listdir(out) if f.endswith(".safetensors")])
            log(msg + f" ({n_files} safetensors shards)")
            torch.distributed.barrier()


def scenario_hybrid():
    """HybridModel (megatron-core 0.19+): '*E*E' with memories replacing E, '*-*-' with memories
    beside the '-' MLPs, saved at TP=2 x EP=2."""
    from megatron_ultramem import compat

    if compat._minor(compat.megatron_core_version()) < (0, 19):
        log(f"ok HybridModel skipped: megatron-core {compat.megatron_core_version()} has none")
        return
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    from megatron_ultramem.hybrid import get_ultramem_hybrid_stack_spec

    ids = tokens_and_mask()
    base = shared_tmpdir()
    for mode, pattern, layers in (("replace", "*E*E", 1), ("parallel", "*-*-", "[0,1,0,1]")):
        setup(2, 2)
        cfg = small_config(num_layers=4, ultramem_mode=mode, ultramem_layers=layers,
                           ultramem_value_dim=12, tensor_model_parallel_size=2,
                           expert_model_parallel_size=2, ultramem_impl="auto")  # fmt: skip
        torch.manual_seed(0)
        model = HybridModel(config=cfg, hybrid_stack_spec=get_ultramem_hybrid_stack_spec(False),
                            vocab_size=VOCAB, max_sequence_length=MAX_POS, hybrid_layer_pattern=pattern,
                            position_embedding_type="rope", parallel_output=False).eval()  # fmt: skip
        perturb(model)
        ns = argparse.Namespace(**{**BASE_ARGS, "num_layers": 4, "hybrid_layer_pattern": pattern,
                                   "ultramem_mode": mode, "ultramem_layers": layers})  # fmt: skip
        root = os.path.join(base, mode)
        save_megatron_lm(model, root, ns)
        hf, _ = export_and_load(root, "out")
        with torch.no_grad():
            got = hf(ids).logits
        err = check(f"hybrid {mode}", got, megatron_logits(model, ids))
        g_meg, g_hf = megatron_greedy(model, ids), hf_greedy(hf, ids)
        if not torch.equal(g_meg, g_hf):
            raise AssertionError(f"hybrid {mode}: greedy tokens differ")
        log(f"ok HybridModel {mode} ({pattern}) saved at TP=2 EP=2: HF logits == Megatron's "
            f"(max diff {err:.1e}); greedy generate() == Megatron greedy for {NEW} tokens")  # fmt: skip


def main():
    cpu_compat.enable()
    torch.distributed.init_process_group("gloo")
    scenario = sys.argv[1]
    globals()[f"scenario_{scenario}"]()
    torch.distributed.barrier()
    log(f"PASSED {scenario}")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
