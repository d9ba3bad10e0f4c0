"""`python -m megatron_ultramem.import_hf --hf HF_DIR --save CKPT_DIR`: a folder written by
`export_hf` back into a Megatron distributed checkpoint.

    python -m megatron_ultramem.import_hf --hf ultramem_hf --save ckpt_pretrain --for pretrain
    python -m megatron_ultramem.import_hf --hf ultramem_hf --save ckpt_main --for main-job -- --train-iters 500

--for pretrain (the default for models not trained by the main job): a Megatron-LM "release"
    checkpoint (latest_checkpointed_iteration.txt = release, release/ with the model and the
    Megatron-LM arguments that describe it) that `python -m megatron_ultramem.pretrain` and
    Megatron-LM's scripts with the plugin's --spec load with `--load CKPT_DIR` (a release
    checkpoint loads the model only: optimizer and RNG start fresh) at any TP x EP x PP layout.
--for megatron-lm: the same release checkpoint for Megatron-LM's pretrain_gpt.py / pretrain_hybrid.py
    with the plugin's --spec. They build the model with a plain TransformerConfig, whose
    TransformerBlock stacks identical layers under one checkpoint key (`decoder.layers.<name>`
    with a leading layer axis) when every layer has a memory; the plugin's pretrain (an
    UltraMemConfig) always keys layers one by one. For every other model the two are the same.
--for main-job (the default for the main job's exports): the main job's checkpoint at iteration 0
    (model, a fresh optimizer and LR schedule, the run's flags), which `python -m
    megatron_ultramem --load CKPT_DIR <the flags it prints>` resumes from: it trains from the
    imported weights. Flags after `--` are the main job's (e.g. --train-iters, --lr,
    --tensor-model-parallel-size); those defining the model come from the folder.
Tensors are written whole from one process; dist_checkpointing reshards them when loaded.
Errors: one line on stderr, exit code 2, nothing written.
"""

import argparse
import copy
import os
import shutil
import sys
from typing import Dict, List, Optional

import torch

from .cli import ArgumentParser, fail
from .export_hf import UsageError
from .hf import checkpoint, folder, mapping

TARGETS = ("pretrain", "megatron-lm", "main-job")
MAIN_JOB_MODEL_FLAGS = (
    "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "seq_length",
    "ultramem_mode", "ultramem_layers", "ultramem_skip_units", "ultramem_num_keys",
    "ultramem_key_dim", "ultramem_value_dim", "ultramem_expansion", "ultramem_tucker_rank",
    "ultramem_num_cores", "ultramem_num_heads", "ultramem_topm",
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m megatron_ultramem.import_hf",
                description="Write a Megatron distributed checkpoint from a folder written by "
                "megatron_ultramem.export_hf.")  # fmt: skip
    p.add_argument("--hf", required=True, metavar="HF_DIR")
    p.add_argument("--save", required=True, metavar="CKPT_DIR")
    p.add_argument("--for", dest="target", choices=TARGETS, default=None,
                   help="which job loads it: pretrain (python -m megatron_ultramem.pretrain), megatron-lm "
                   "(Megatron-LM's pretrain_gpt.py / pretrain_hybrid.py with the plugin's --spec), main-job "
                   "(python -m megatron_ultramem); default: main-job for the main job's exports, else pretrain")
    p.add_argument("--force", action="store_true", help="replace a non-empty --save directory")
    return p


# ----------------------------------------------------------------------------- the model
def ultramem_settings(cfg) -> Dict:
    """ultramem_mode / _layers / _skip_units of the folder's model (recorded at export, else read
    off the block kinds)."""
    saved = dict((cfg.megatron or {}).get("ultramem") or {})
    if saved.get("ultramem_mode"):
        return {k: saved.get(k) for k in ("ultramem_mode", "ultramem_layers", "ultramem_skip_units")}
    kinds, sinks = cfg.layer_mlp, cfg.memory_sink
    if any(s is not None for s in sinks):
        units = ",".join(f"{i}:{sinks[i] if sinks[i] is not None else i}" for i, k in enumerate(kinds) if "memory" in k)
        return {"ultramem_mode": "skip", "ultramem_layers": 1, "ultramem_skip_units": units}
    mode = "replace" if any(k == "memory" for k in kinds) else "parallel"
    return {"ultramem_mode": mode, "ultramem_layers": str([int("memory" in k) for k in kinds]),
            "ultramem_skip_units": None}  # fmt: skip


def hybrid_pattern(cfg) -> Optional[str]:
    if all(cfg.layer_attention) and "none" not in cfg.layer_mlp:
        return None
    return "".join("*" if a else ("E" if k == "memory" else "-") for a, k in zip(cfg.layer_attention, cfg.layer_mlp))


def megatron_args(cfg) -> argparse.Namespace:
    """The Megatron-LM arguments that build this model (saved as the checkpoint's `args`)."""
    gqa = cfg.num_key_value_heads != cfg.num_attention_heads
    um = ultramem_settings(cfg)
    recorded = {k: v for k, v in ((cfg.megatron or {}).get("args") or {}).items() if k in mapping.RECORDED_ARGS}
    # Megatron-LM's defaults where nothing is recorded (add_position_embedding is True unless
    # --no-position-embedding, whatever --position-embedding-type says)
    recorded = {"add_position_embedding": True, "make_vocab_size_divisible_by": 128,
                "tokenizer_type": None, "seq_length": cfg.max_position_embeddings, **recorded}  # fmt: skip
    return argparse.Namespace(
        num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads, group_query_attention=gqa,
        num_query_groups=cfg.num_key_value_heads if gqa else 1,
        kv_channels=cfg.head_dim if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads else None,
        ffn_hidden_size=cfg.intermediate_size,
        normalization="RMSNorm" if cfg.norm_type == "rmsnorm" else "LayerNorm",
        norm_epsilon=cfg.norm_eps, swiglu=cfg.gated_mlp and cfg.hidden_act == "silu",
        bias_gelu_fusion=cfg.hidden_act == "gelu_tanh", bias_swiglu_fusion=cfg.gated_mlp,
        add_bias_linear=cfg.linear_bias, add_qkv_bias=cfg.qkv_bias and not cfg.linear_bias,
        qk_layernorm=cfg.qk_layernorm, softmax_scale=cfg.attention_scale,
        position_embedding_type=cfg.position_embedding_type,
        rotary_base=cfg.rope_theta, rotary_percent=cfg.rotary_percent,
        rotary_interleaved=cfg.rotary_interleaved,
        rotary_seq_len_interpolation_factor=cfg.rope_interpolation_factor,
        use_rope_scaling=cfg.rope_llama3_scaling_factor is not None,
        rope_scaling_factor=cfg.rope_llama3_scaling_factor or 8.0,
        untie_embeddings_and_output_weights=not cfg.tie_word_embeddings,
        padded_vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_position_embeddings,
        hybrid_layer_pattern=hybrid_pattern(cfg), ckpt_format="torch_dist", vocab_file=None,
        data_parallel_random_init=False, **recorded,
        ultramem_num_keys=cfg.ultramem_num_keys, ultramem_key_dim=cfg.ultramem_key_dim,
        ultramem_value_dim=cfg.ultramem_value_dim, ultramem_expansion=cfg.ultramem_expansion,
        ultramem_tucker_rank=cfg.ultramem_tucker_rank, ultramem_num_cores=cfg.ultramem_num_cores,
        ultramem_num_heads=cfg.ultramem_num_heads, ultramem_topm=cfg.ultramem_topm,
        ultramem_score_activation=cfg.ultramem_score_activation, **um,
    )  # fmt: skip


def build_target_model(args: argparse.Namespace, megatron_lm: bool = False):
    """GPTModel / HybridModel at TP = EP = PP = 1 as the plugin's pretrain builds it from these
    arguments, or (megatron_lm) as Megatron-LM's pretrain_gpt.py builds it with the plugin's --spec:
    a plain TransformerConfig for the block, which stacks the layers' checkpoint keys when they are
    all alike. Weights are left uninitialized: they are filled from the folder."""
    import torch.nn.functional as F

    from .config import UltraMemConfig
    from .cpu_compat import CPU_CONFIG

    a = vars(args)
    fields = dict(
        num_layers=a["num_layers"], hidden_size=a["hidden_size"],
        num_attention_heads=a["num_attention_heads"],
        num_query_groups=a["num_query_groups"] if a["group_query_attention"] else None,
        kv_channels=a["kv_channels"], ffn_hidden_size=a["ffn_hidden_size"],
        normalization=a["normalization"], layernorm_epsilon=a["norm_epsilon"],
        gated_linear_unit=a["swiglu"], activation_func=F.silu if a["swiglu"] else F.gelu,
        bias_activation_fusion=a["bias_gelu_fusion"] if not a["swiglu"] else a["bias_swiglu_fusion"],
        add_bias_linear=a["add_bias_linear"], add_qkv_bias=a["add_qkv_bias"],
        qk_layernorm=a["qk_layernorm"], rotary_interleaved=a["rotary_interleaved"],
        softmax_scale=a["softmax_scale"], perform_initialization=False,
        hidden_dropout=0.0, attention_dropout=0.0, **CPU_CONFIG,
        **{k: v for k, v in a.items() if k.startswith("ultramem_")},
    )  # fmt: skip
    config = UltraMemConfig(**fields)
    common = dict(vocab_size=a["padded_vocab_size"], max_sequence_length=a["max_position_embeddings"],
                  position_embedding_type=a["position_embedding_type"])  # fmt: skip
    if a["hybrid_layer_pattern"]:
        from megatron.core.models.hybrid.hybrid_model import HybridModel

        from .hybrid import get_ultramem_hybrid_stack_spec

        return HybridModel(config=config, hybrid_stack_spec=get_ultramem_hybrid_stack_spec(),
                           hybrid_layer_pattern=a["hybrid_layer_pattern"],
                           share_embeddings_and_output_weights=not a["untie_embeddings_and_output_weights"],
                           rotary_base=a["rotary_base"], rotary_percent=a["rotary_percent"], **common)  # fmt: skip
    from megatron.core.models.gpt import GPTModel

    if megatron_lm:
        from megatron.core.transformer.transformer_config import TransformerConfig

        from .megatron_lm.spec import build_block_spec

        spec = build_block_spec(config, "local")  # TE's checkpoint keys are the same (keys map)
        config = TransformerConfig(**{k: v for k, v in fields.items() if not k.startswith("ultramem_")})
    else:
        from .specs import get_ultramem_decoder_block_spec

        spec = get_ultramem_decoder_block_spec(config)
    return GPTModel(
        config=config, transformer_layer_spec=spec,
        share_embeddings_and_output_weights=not a["untie_embeddings_and_output_weights"],
        rotary_base=a["rotary_base"], rotary_percent=a["rotary_percent"],
        seq_len_interpolation_factor=a["rotary_seq_len_interpolation_factor"],
        rope_scaling=a["use_rope_scaling"], rope_scaling_factor=a["rope_scaling_factor"], **common,
    )  # fmt: skip


def _init_world() -> None:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from . import cpu_compat

    cpu_compat.enable()
    checkpoint._ensure_process_group()
    if torch.distributed.get_world_size() != 1:
        raise UsageError("import_hf runs as one process (the checkpoint it writes loads at any layout)")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)


# ----------------------------------------------------------------------------- writers
def write_pretrain(cfg, hf: Dict[str, torch.Tensor], tmp: str, megatron_lm: bool = False) -> List[str]:
    from megatron.core import dist_checkpointing

    args = megatron_args(cfg)
    model = build_target_model(args, megatron_lm)
    sd = model.sharded_state_dict()
    checkpoint.fill_sharded_state_dict(sd, mapping.hf_to_megatron(hf, cfg))
    path = os.path.join(tmp, "release")
    os.makedirs(path)
    dist_checkpointing.save({"args": args, "checkpoint_version": 3.0, "iteration": 0, "model": sd}, path)
    with open(os.path.join(tmp, checkpoint.TRACKER), "w") as f:
        f.write("release")
    return ["--load", "<CKPT_DIR>"]


def given_flags(extra: List[str], names) -> List[str]:
    """The argparse names (dest) of `names` that `extra` sets (`--flag value` or `--flag=value`)."""
    words = {a.split("=", 1)[0] for a in extra if a.startswith("--")}
    return [k for k in names if f"--{k.replace('_', '-')}" in words]


def main_job_args_for(cfg, extra: List[str]):
    """The main job's flags for this model: the export's recorded flags (or the defaults), the
    model's architecture from the folder, then `extra`. Refuses a model the main job cannot build
    and extra flags that contradict the folder's model."""
    from . import train

    want = {
        "num_layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_attention_heads, "ffn_hidden_size": cfg.intermediate_size,
        "seq_length": cfg.max_position_embeddings, "ultramem_num_keys": cfg.ultramem_num_keys,
        "ultramem_key_dim": cfg.ultramem_key_dim, "ultramem_value_dim": cfg.ultramem_value_dim,
        "ultramem_expansion": cfg.ultramem_expansion, "ultramem_tucker_rank": cfg.ultramem_tucker_rank,
        "ultramem_num_cores": cfg.ultramem_num_cores, "ultramem_num_heads": cfg.ultramem_num_heads,
        "ultramem_topm": cfg.ultramem_topm, **ultramem_settings(cfg),
    }  # fmt: skip
    fixed = dict(norm_type="layernorm", hidden_act="gelu", gated_mlp=False, qkv_bias=True,
                 linear_bias=True, qk_layernorm=False, position_embedding_type="rope",
                 rope_theta=10000.0, rotary_percent=1.0, rotary_interleaved=False,
                 rope_interpolation_factor=None, rope_llama3_scaling_factor=None,
                 tie_word_embeddings=False, ultramem_score_activation="none")  # fmt: skip
    for k, v in fixed.items():
        if getattr(cfg, k) != v:
            raise UsageError(f"--for main-job: the main job builds {k}={v!r}, the folder's model has "
                             f"{getattr(cfg, k)!r}; use --for pretrain")  # fmt: skip
    if cfg.num_key_value_heads != cfg.num_attention_heads or hybrid_pattern(cfg):
        raise UsageError("--for main-job: the main job builds a GPT with multi-head attention; use --for pretrain")
    run_config = dict((cfg.megatron or {}).get("run_config") or {})
    args = checkpoint.main_job_args(run_config)
    parser = train.build_parser()
    parser.error = lambda message: (_ for _ in ()).throw(UsageError(f"main job flags after --: {message}"))
    given = parser.parse_args(extra)
    for k in given_flags(extra, vars(given)):
        v = getattr(given, k)
        if k in want and v != want[k] and str(v) != str(want[k]):
            raise UsageError(f"--{k.replace('_', '-')} {v}: the folder's model has {want[k]!r}")
        setattr(args, k, v)
    for k, v in want.items():
        setattr(args, k, v)
    if args.ultramem_mode != "skip":  # validate_args allows each only with its own mode
        args.ultramem_skip_units = train.ULTRAMEM_DEFAULTS["ultramem_skip_units"]
    else:
        args.ultramem_layers = train.ULTRAMEM_DEFAULTS["ultramem_layers"]
    vocab = 256 if args.data_path is None else None
    if vocab is not None and cfg.vocab_size != vocab:
        raise UsageError(f"--for main-job: the embedded corpus has 256 tokens, the folder's model "
                         f"{cfg.vocab_size}; pass the run's --data-path after --")  # fmt: skip
    return args


def validated_main_job_args(args):
    """The main job's own checks (train.validate_args: cli.fail, one line, exit 2) on a one-process
    copy of `args`: one process writes the checkpoint, and the TP/EP layout in the flags is the
    loading job's to check against its world. The fields validate_args resolves (warmup, data
    info) are copied back to `args`; returns the copy (TP = EP = 1) that builds the model."""
    from . import train

    local = copy.copy(args)
    local.tensor_model_parallel_size = local.expert_model_parallel_size = 1
    train.validate_args(local)
    args.warmup_iters, args.data_info = local.warmup_iters, local.data_info
    train.make_config(args)  # the model at the flags' TP x EP (heads, value table): refused naming the flag
    return local


def write_main_job(cfg, hf: Dict[str, torch.Tensor], tmp: str, extra: List[str]) -> List[str]:
    from . import checkpointing, train

    args = main_job_args_for(cfg, extra)
    local = validated_main_job_args(args)
    torch.manual_seed(args.seed)
    config = train.make_config(local)
    vocab = train.vocab_size(local) if getattr(local, "data_info", None) else cfg.vocab_size
    model = train.build_model(config, vocab, args.seq_length)
    checkpoint.fill_sharded_state_dict(model.sharded_state_dict(), mapping.hf_to_megatron(hf, cfg))
    model, _, optimizer, scheduler = train.wrap_for_training(args, config, model, optimizer_args=local)
    # A fresh Adam state written out (zero moments), because the main job's resume path loads the
    # optimizer with the model and asks for every state tensor. Its step cannot be 0: Megatron's
    # FP32Optimizer / Float16OptimizerWithFloat16Params save the per-parameter step only when it
    # is truthy (`if step:` in sharded_state_dict), and torch's Adam then fails on a loaded state
    # that has moments but no step. float32's smallest normal number is truthy, and Adam's first
    # increment rounds tiny + 1 to exactly 1.0: the first update is bit for bit a fresh Adam's
    # (tests/test_export_hf.py). The distributed optimizer keeps the step in its param groups and
    # gets the same value back. (The main job has no model-only load, like Megatron-LM's
    # --no-load-optim, that would let the optimizer state be left out instead.)
    optimizer.sharded_state_dict(model.sharded_state_dict(), is_loading=True)  # Megatron's init_state_fn
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                if inner.state[p]:
                    inner.state[p].setdefault("step", torch.tensor(torch.finfo(torch.float32).tiny))
    scheduler.step(0)
    extra_state = {"run_config": train.run_config(args), "consumed_samples": 0,
                   "history": {"steps": [], "losses": [], "eval_steps": [], "eval_losses": []}}  # fmt: skip
    checkpointing.save_checkpoint(tmp, 0, model, optimizer, scheduler, extra_state)
    # the model- and data-defining flags that differ from the defaults, then the user's own flags
    # (--train-iters and the like are not in run_config: they may change on resume)
    flags = []
    defaults = vars(train.build_parser().parse_args([]))
    config = train.run_config(args)
    for k in given_flags(extra, config):
        config.pop(k)
    for k, v in sorted(config.items()):
        if v != defaults.get(k) and v is not None and not isinstance(v, bool):
            flags += [f"--{k.replace('_', '-')}", str(v)]
        elif v is True and defaults.get(k) is False:
            flags.append(f"--{k.replace('_', '-')}")
    return flags + list(extra) + ["--load", "<CKPT_DIR>"]


def import_hf(hf_dir: str, save: str, target: Optional[str] = None, force: bool = False,
              extra: Optional[List[str]] = None, quiet: bool = False) -> List[str]:
    """Write the checkpoint; returns the flags that load it. UsageError: nothing written."""
    extra = list(extra or [])
    try:
        folder.check_output(save, force, "--save")
        cfg, hf = folder.read_folder(hf_dir)
    except folder.FolderError as err:
        raise UsageError(str(err)) from None
    if target is None:
        target = "main-job" if (cfg.megatron or {}).get("writer") == "main_job" else "pretrain"
    if extra and target != "main-job":
        raise UsageError(f"flags after -- are the main job's: they need --for main-job (got {' '.join(extra)})")
    missing = [e.hf for e in mapping.tensor_plan(cfg) if any(n not in hf for n in e.hf)]
    if missing:
        raise UsageError(f"--hf {hf_dir}: the weights lack {', '.join(missing[0])} (and {len(missing) - 1} more)")
    if target == "main-job":
        validated_main_job_args(main_job_args_for(cfg, extra))  # refuse before any work
    _init_world()
    tmp = folder.temp_sibling(save)
    try:
        if target == "main-job":
            flags = write_main_job(cfg, hf, tmp, extra)
        else:
            flags = write_pretrain(cfg, hf, tmp, megatron_lm=target == "megatron-lm")
        folder.publish(tmp, save)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    flags = [save if f == "<CKPT_DIR>" else f for f in flags]
    if not quiet:
        job = {"main-job": "python -m megatron_ultramem", "pretrain": "python -m megatron_ultramem.pretrain <your arguments>",
               "megatron-lm": "pretrain_gpt.py --spec megatron_ultramem.megatron_lm ultramem_block_spec <your arguments>"}[target]
        print(f"wrote {save} ({target}); load it with: {job} {' '.join(flags)}")
    return flags


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    args = build_parser().parse_args(argv)  # a bad flag: one line, exit 2
    try:
        import_hf(args.hf, args.save, args.target, args.force, extra)
    except UsageError as err:
        fail(str(err))
    return 0


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    sys.exit(main())
