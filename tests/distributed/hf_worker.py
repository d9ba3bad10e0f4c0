"""Hugging Face export of checkpoints saved at several layouts, and imports loaded at several
layouts, under torchrun (gloo, CPU, 4 ranks):

    torchrun --standalone --nproc_per_node 4 tests/distributed/hf_worker.py DIR

DIR is a shared scratch directory. When DIR/load holds the imports that tests/test_export_hf.py
prepares (`prepare_load_dir`, one process: import_hf runs as one), they are loaded too.

1. GPTModel, placements 'parallel', 'replace' and 'skip', each with other GPT options
   (LayerNorm/RMSNorm, GELU exact/tanh-fused/SwiGLU, MHA/GQA, QK layernorm, RoPE base, percent,
   interleaving, interpolation and Llama-3 scaling, learned absolute positions, tied/untied
   embeddings, biases on/off). Each model is saved the way Megatron-LM's pretrain_gpt.py saves it
   (`{'args', 'checkpoint_version', 'iteration', 'model'}` through dist_checkpointing into
   iter_XXXXXXX, and the tracker file) and exported by rank 0 with `export_hf.export`:
   - TP=2 x EP=2: HF logits == the saving model's (gathered) logits;
   - TP=1: HF logits == the model's; greedy generate() for 32 tokens (HF's KV-cache decoding)
     == greedy decoding with the Megatron model (rank 0: the model is whole on every rank; one
     forward over the generated sequence, see greedy_agrees);
   - TP=2 x PP=2: the stages load the TP=1 checkpoint and save again; the export of that
     checkpoint is bitwise the TP=1 one's (same weights, so the same logits). Megatron syncs tied
     embeddings across pipeline stages on CUDA only (`.cuda()` in LanguageModule), so a tied
     case is checked at PP=2 through an untied copy of it (the tied checkpoint has the same keys:
     the last stage's output layer is a replica of `embedding.word_embeddings.weight`).
2. HybridModel (megatron-core 0.19+): '*E*E' (memories replace the E layers) and '*-*-'
   (memories beside the '-' MLPs): TP=2 x EP=2 (logits), TP=1 (logits, greedy), and PP=2 with
   '|' in the pattern (bitwise the TP=1 export).
Both are saved at one layout after the other (TP=2 x EP=2 for every model, then TP=1, then
TP=2 x PP=2: one parallel-state setup per layout, whose process groups are most of its cost).
3. Loading imports with megatron.training (0.19+ with cpu_compat's `enable(training_loop=True)`,
   whose patch puts the loader's `torch.tensor(..., device='cuda')` on the CPU; DIR/load):
   `megatron.training.checkpointing.load_checkpoint` (Megatron-LM's own loader, its argument
   checks included; the model's weights are overwritten with noise first) fills the model that
   `python -m megatron_ultramem.pretrain` builds (`pretrain.model_provider`) at TP=2 from an
   `import_hf --for pretrain` checkpoint, and the model Megatron-LM's pretrain_gpt.py builds with
   the plugin's --spec (plain TransformerConfig: stacked layer keys, every layer having a memory)
   at TP=1 from an `import_hf --for megatron-lm` checkpoint; logits == the HF model's.

Tolerance: fp32 logits, absolute 1e-4 (|logits| < 10 here): Megatron sums TP partial products and
computes attention with baddbmm, the HF model with matmul in another order: differences are a few
float32 ulps of the hidden states (measured <= 2e-6); a misplaced weight changes logits by > 1e-2.
Only rank 0 loads the HF model; each rank prints nothing but rank 0's summary lines.
"""

import argparse
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore")
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # Megatron-LM asserts it with TP > 1

from megatron.core import parallel_state as ps  # noqa: E402

from megatron_ultramem import cpu_compat  # noqa: E402

from helpers import small_config  # noqa: E402

ATOL = 1e-4
VOCAB, SEQ, MAX_POS, NEW = 40, 12, 64, 32


def rank() -> int:
    return torch.distributed.get_rank()


T0 = time.perf_counter()


def log(*a):
    if rank() == 0:
        print(*a, f"[{time.perf_counter() - T0:.1f} s; rank 0 CPU {time.process_time():.1f} s]", flush=True)


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
    apply_layernorm_1p=False, hybrid_layer_pattern=None, add_position_embedding=True,
    make_vocab_size_divisible_by=8, seq_length=SEQ, softmax_scale=None,
    ultramem_num_keys=5, ultramem_key_dim=6, ultramem_value_dim=12, ultramem_expansion=4,
    ultramem_tucker_rank=2, ultramem_num_cores=2, ultramem_num_heads=2, ultramem_topm=7,
    ultramem_score_activation="none", ultramem_skip_units=None,
)  # fmt: skip
"""Megatron-LM's argument names and defaults for what the test models use (what
pretrain_gpt.py saves in the checkpoint as `args`)."""

# Each case: (TransformerConfig fields, GPTModel arguments, the same model as Megatron-LM arguments)
CASES = {
    "parallel": (
        dict(ultramem_mode="parallel", ultramem_layers="[0,1,1,0]"),
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

# 3. the model of the load checks: every layer with a memory beside its MLP (Megatron-LM's block
# then stacks the layers' keys), tied embeddings (Megatron-LM's default), Megatron-LM's flags
LOAD_ARGS = dict(BASE_ARGS, ultramem_mode="parallel", ultramem_layers=1, padded_vocab_size=48,
                 untie_embeddings_and_output_weights=False)  # fmt: skip
LOAD_FLAGS = [
    "--num-layers", "4", "--hidden-size", "24", "--num-attention-heads", "4", "--ffn-hidden-size", "40",
    "--seq-length", str(SEQ), "--max-position-embeddings", str(MAX_POS), "--micro-batch-size", "1",
    "--train-iters", "1", "--lr", "1e-3", "--transformer-impl", "local", "--use-cpu-initialization",
    "--no-persist-layer-norm", "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion",
    "--no-bias-gelu-fusion", "--no-bias-dropout-fusion", "--no-rope-fusion",
    "--position-embedding-type", "rope", "--tokenizer-type", "NullTokenizer", "--vocab-size", "47",
    "--make-vocab-size-divisible-by", "8", "--distributed-backend", "gloo", "--hidden-dropout", "0",
    "--attention-dropout", "0", "--seed", "1234", "--ultramem-mode", "parallel", "--ultramem-layers", "1",
    "--ultramem-num-keys", "5", "--ultramem-key-dim", "6", "--ultramem-value-dim", "12",
    "--ultramem-topm", "7", "--ultramem-num-heads", "2", "--ultramem-num-cores", "2",
    "--ultramem-tucker-rank", "2", "--ultramem-expansion", "4",
]  # fmt: skip
"""LOAD_ARGS as Megatron-LM flags (NullTokenizer: vocabulary 47 + its end-of-document token = 48,
a multiple of 8 x TP for TP = 1 and 2, so the padded vocabulary is 48 at both)."""


def build_gpt(case, tp=1, ep=1, pp=1, pre=True, post=True, untied=False):
    from megatron.core.models.gpt import GPTModel

    from megatron_ultramem.specs import get_ultramem_decoder_block_spec

    cfg_kw, model_kw, _ = CASES[case]
    cfg = small_config(
        num_layers=4, ultramem_value_dim=12, tensor_model_parallel_size=tp,
        expert_model_parallel_size=ep, pipeline_model_parallel_size=pp, ultramem_impl="auto",
        **({"pipeline_dtype": torch.float32} if pp > 1 else {}), **cfg_kw,
    )  # fmt: skip
    spec = get_ultramem_decoder_block_spec(cfg, use_transformer_engine=False)
    if untied:
        model_kw = dict(model_kw, share_embeddings_and_output_weights=False)
    torch.manual_seed(0)
    return GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=VOCAB,
                    max_sequence_length=MAX_POS, pre_process=pre, post_process=post,
                    parallel_output=False, **model_kw).eval()  # fmt: skip


def case_args(case, untied=False, **more):
    ns = argparse.Namespace(**{**BASE_ARGS, **CASES[case][2], **more})
    if untied:
        ns.untie_embeddings_and_output_weights = True
    return ns


def perturb(model, seed=7):
    """Move every parameter off its init (biases and norms included) the same way on every rank,
    so replicated copies stay identical; then refresh the Tucker vectors from the cores."""
    from megatron_ultramem.layer import UltraMemLayer

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for m in model.modules():
            if isinstance(m, UltraMemLayer):
                m.refresh_tucker_vectors()
    return model


def tokens(n=SEQ, vocab=VOCAB):
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(3))


def megatron_logits(model, ids):
    """[batch, seq, vocab] fp32 logits (the full vocabulary: gathered over TP when sharded)."""
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    s = ids.shape[1]
    mask = torch.ones(1, 1, s, s, dtype=torch.bool).triu(1)
    pos = torch.arange(s)[None].expand(ids.shape[0], s)
    with torch.no_grad():
        out = model(ids, pos, mask).float()
        if ps.get_tensor_model_parallel_world_size() > 1 and getattr(model, "parallel_output", False):
            out = gather_from_tensor_model_parallel_region(out)
    return out


def greedy_agrees(model, ids, generated):
    """Greedy decoding with the Megatron model gives `generated` (ids + new tokens): one forward
    over `generated`, whose argmax after each prefix must be the next token. By induction on the
    steps this is the same test as decoding token by token, without the per-token forwards."""
    logits = megatron_logits(model, generated)
    return torch.equal(logits[:, ids.shape[1] - 1 : -1].argmax(-1), generated[:, ids.shape[1] :])


def save_megatron_lm(model, root, args_ns, iteration=7):
    """The checkpoint layout of Megatron-LM's save_checkpoint with --ckpt-format torch_dist (a
    collective). Returns the iteration directory."""
    from megatron.core import dist_checkpointing

    path = os.path.join(root, f"iter_{iteration:07d}")
    if rank() == 0:
        os.makedirs(path)
    torch.distributed.barrier()
    state = {"args": args_ns, "checkpoint_version": 3.0, "iteration": iteration,
             "model": model.sharded_state_dict()}  # fmt: skip
    dist_checkpointing.save(state, path)
    torch.distributed.barrier()
    if rank() == 0:
        with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(iteration))
    torch.distributed.barrier()
    return path


def export_hf(root, out, load=True):
    """Rank 0 exports `root` to `out` (several shards + index) and (load) reads it back with
    transformers (trust_remote_code); other ranks get None."""
    from megatron_ultramem.export_hf import export

    hf = None
    if rank() == 0:
        export(root, out, quiet=True, max_shard_size="20KB")
        if load:
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    torch.distributed.barrier()
    return hf


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(ids).logits


def hf_greedy(hf, ids, new=NEW):
    with torch.no_grad():
        return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, pad_token_id=0)  # fmt: skip


def check(name, got, want):
    err = (got - want).abs().max().item()
    if not err <= ATOL:
        raise AssertionError(f"{name}: max |logits difference| {err:.3e} > {ATOL}")
    if not (want[:, 1:] - want[:, :-1]).abs().max() > 1e-2:
        raise AssertionError(f"{name}: the Megatron logits barely change along the sequence")
    return err


def same_weights(a, b):
    """The safetensors of folders a and b hold the same tensors, bit for bit."""
    from megatron_ultramem.hf.folder import read_weights

    wa, wb = read_weights(a), read_weights(b)
    return wa.keys() == wb.keys() and all(
        wa[k].dtype == wb[k].dtype and torch.equal(wa[k].view(torch.uint8), wb[k].view(torch.uint8))
        for k in wa
    )


def compare_saving_model(name, model, hf, ids, greedy=False):
    """Every rank runs the Megatron model (collectives); rank 0 compares with the HF model and,
    with `greedy` (only where the model is whole on each rank: TP=1), decodes with both."""
    want = megatron_logits(model, ids)
    msg = ""
    if rank() == 0:
        msg = f"HF logits == Megatron's (max diff {check(name, hf_logits(hf, ids), want):.1e})"
        if greedy:
            g_hf = hf_greedy(hf, ids)
            if not greedy_agrees(model, ids, g_hf):
                raise AssertionError(f"{name}: greedy tokens differ from the Megatron model's\n{g_hf}")
            msg += f"; greedy generate() == Megatron greedy for {NEW} tokens"
    torch.distributed.barrier()
    return msg


def build_hybrid(mode, layers, pattern, tp=1, ep=1, pp=1, pre=True, post=True):
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    from megatron_ultramem.hybrid import get_ultramem_hybrid_stack_spec

    cfg = small_config(num_layers=4, ultramem_mode=mode, ultramem_layers=layers,
                       ultramem_value_dim=12, tensor_model_parallel_size=tp,
                       expert_model_parallel_size=ep, pipeline_model_parallel_size=pp,
                       ultramem_impl="auto", **({"pipeline_dtype": torch.float32} if pp > 1 else {}))  # fmt: skip
    torch.manual_seed(0)
    return HybridModel(config=cfg, hybrid_stack_spec=get_ultramem_hybrid_stack_spec(False),
                       vocab_size=VOCAB, max_sequence_length=MAX_POS, hybrid_layer_pattern=pattern,
                       position_embedding_type="rope", pre_process=pre, post_process=post,
                       parallel_output=False).eval()  # fmt: skip


class Model:
    """One model of the save checks: build(tp, ep, pp, pre, post) -> Megatron model; its
    Megatron-LM arguments; which layouts it is saved at."""

    def __init__(self, name, build, ns, tp2ep2=True, pp2=True, staged_build=None, staged_ns=None):
        self.name, self.build, self.ns, self.tp2ep2, self.pp2 = name, build, ns, tp2ep2, pp2
        self.staged_build, self.staged_ns = staged_build or build, staged_ns or ns
        self.single_dir = self.single_hf = None


def models():
    from megatron_ultramem import compat

    out = []
    for case in CASES:
        tied = CASES[case][1].get("share_embeddings_and_output_weights", False)
        out.append(Model(case, lambda *a, case=case: build_gpt(case, *a), case_args(case), pp2=not tied))
        if tied:  # the pipeline checks use an untied copy (see the module doc)
            out.append(Model(f"{case} (untied)", lambda *a, case=case: build_gpt(case, *a, untied=True),
                             case_args(case, untied=True), tp2ep2=False))  # fmt: skip
    if compat._minor(compat.megatron_core_version()) < (0, 19):
        log(f"ok HybridModel skipped: megatron-core {compat.megatron_core_version()} has none")
        return out
    for mode, pattern, staged, layers in (("replace", "*E*E", "*E|*E", 1), ("parallel", "*-*-", "*-|*-", "[0,1,0,1]")):
        ns = argparse.Namespace(**{**BASE_ARGS, "hybrid_layer_pattern": pattern, "ultramem_mode": mode,
                                   "ultramem_layers": layers})  # fmt: skip
        out.append(Model(
            f"HybridModel {mode} ({pattern})", lambda *a, m=mode, l=layers, p=pattern: build_hybrid(m, l, p, *a), ns,
            staged_build=lambda *a, m=mode, l=layers, p=staged: build_hybrid(m, l, p, *a),
            staged_ns=argparse.Namespace(**{**vars(ns), "hybrid_layer_pattern": staged}),
        ))  # fmt: skip
    return out


def scenario_saves(base):
    """Every model at TP=2 x EP=2, then TP=1, then TP=2 x PP=2 (one parallel-state setup per
    layout: creating the process groups is most of a setup's cost)."""
    ids = tokens()
    todo = models()
    setup(2, 2, 1)
    for i, m in enumerate(todo):
        if not m.tp2ep2:
            continue
        model = perturb(m.build(2, 2, 1))
        root = os.path.join(base, f"model{i}_tp2ep2")
        save_megatron_lm(model, root, m.ns)
        hf = export_hf(root, root + "_hf")
        log(f"ok {m.name} saved at TP=2 EP=2: " + compare_saving_model(f"{m.name} TP=2 EP=2", model, hf, ids))
    setup(1, 1, 1)  # data parallel over the 4 ranks
    for i, m in enumerate(todo):
        model = perturb(m.build(1, 1, 1), seed=8)
        root = os.path.join(base, f"model{i}_tp1")
        m.single_dir, m.single_hf = save_megatron_lm(model, root, m.ns), root + "_hf"
        hf = export_hf(root, m.single_hf)
        msg = compare_saving_model(f"{m.name} TP=1", model, hf, ids, greedy=m.tp2ep2)
        log(f"ok {m.name} saved at TP=1: {msg}")
    from megatron.core import dist_checkpointing

    setup(2, 1, 2)
    stage = ps.get_pipeline_model_parallel_rank()
    for i, m in enumerate(todo):
        if not m.pp2:
            continue
        # the stages load the TP=1 checkpoint and save again: the export is the TP=1 export
        model = m.staged_build(2, 1, 2, stage == 0, stage == 1)
        state = dist_checkpointing.load(model.sharded_state_dict(), m.single_dir)
        model.load_state_dict(state, strict=False)  # strict=False: the local layers' _extra_state
        root = os.path.join(base, f"model{i}_tp2pp2")
        save_megatron_lm(model, root, m.staged_ns)
        export_hf(root, root + "_hf", load=False)
        if rank() == 0 and not same_weights(root + "_hf", m.single_hf):
            raise AssertionError(f"{m.name}: the export of the TP=2 x PP=2 checkpoint differs from the TP=1 one's")
        torch.distributed.barrier()
        log(f"ok {m.name} saved at TP=2 PP=2: export == the TP=1 export, bit for bit")


def megatron_lm_gpt(args):
    """GPTModel as Megatron-LM's pretrain_gpt.py builds it with the plugin's --spec object:
    a plain TransformerConfig from the arguments and the spec's block for them."""
    from megatron.core.models.gpt import GPTModel
    from megatron.training.arguments import core_transformer_config_from_args

    from megatron_ultramem.megatron_lm.spec import block_spec_from_args

    return GPTModel(
        config=core_transformer_config_from_args(args), transformer_layer_spec=block_spec_from_args(args),
        vocab_size=args.padded_vocab_size, max_sequence_length=args.max_position_embeddings,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base,
        rotary_percent=args.rotary_percent,
    )  # fmt: skip


def training_loop_patch() -> bool:
    import inspect

    return "training_loop" in inspect.signature(cpu_compat.enable).parameters


def scenario_load(base):
    """Imports loaded by megatron.training's load_checkpoint (megatron-core 0.19+)."""
    from megatron_ultramem import compat

    d = os.path.join(base, "load")
    if not os.path.isdir(d):
        log("ok load checks skipped: no imports prepared in DIR/load")
        return
    if compat._minor(compat.megatron_core_version()) < (0, 19):
        log(f"ok load checks skipped: megatron-core {compat.megatron_core_version()} has no megatron.training")
        return
    if not training_loop_patch():
        log("ok load checks skipped: this cpu_compat lacks enable(training_loop=True) (issue 20), which "
            "megatron.training's checkpoint loader needs on CPU")  # fmt: skip
        return
    cpu_compat.enable(training_loop=True)  # its torch.tensor(..., device='cuda') calls, on the CPU
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.training import get_args
    from megatron.training.checkpointing import load_checkpoint
    from megatron.training.global_vars import destroy_global_vars

    from megatron_ultramem import pretrain as P

    ids = tokens(vocab=47)
    want = None
    if rank() == 0:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(os.path.join(d, "hf"), trust_remote_code=True).eval()
        want = hf_logits(hf, ids)
    world = torch.distributed.get_world_size()
    for builder, ckpt, tp in (("pretrain", "pretrain", 2), ("megatron-lm", "megatron_lm", 1)):
        destroy_global_vars()  # megatron.training's globals, set again by each parse
        destroy_num_microbatches_calculator()
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        args = P.parse_args(LOAD_FLAGS + ["--tensor-model-parallel-size", str(tp), "--global-batch-size",
                                          str(world // tp), "--load", os.path.join(d, ckpt)])  # fmt: skip
        ps.initialize_model_parallel(tp)
        model_parallel_cuda_manual_seed(args.seed)
        model = P.model_provider() if builder == "pretrain" else megatron_lm_gpt(get_args())
        stacked = not getattr(model.decoder.config, "hetereogenous_dist_checkpoint", False)
        assert stacked == (builder == "megatron-lm"), builder  # what each import was written for
        torch.manual_seed(5)
        with torch.no_grad():  # not the imported weights: the load has to replace every one
            for p in model.parameters():
                p.normal_()
        iteration, _ = load_checkpoint([model], None, None)
        got = megatron_logits(model.eval(), ids)
        if rank() == 0:
            err = check(f"{ckpt} at TP={tp}", got, want)
            form = "stacked" if stacked else "per-layer"
            log(f"ok import --for {builder} loaded by megatron.training's load_checkpoint into the model "
                f"{'pretrain' if builder == 'pretrain' else 'pretrain_gpt.py --spec'} builds at TP={tp} "
                f"({form} layer keys, iteration {iteration}): logits == HF (max diff {err:.1e})")  # fmt: skip
        torch.distributed.barrier()


def main():
    cpu_compat.enable()
    torch.distributed.init_process_group("gloo")
    base = sys.argv[1]
    for name in sys.argv[2:] or ("saves", "load"):
        start = time.perf_counter()
        globals()[f"scenario_{name}"](base)
        torch.distributed.barrier()
        log(f"time {name}: {time.perf_counter() - start:.1f} s")
    log("PASSED")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
