"""Megatron <-> Hugging Face: the model description and the tensor names.

A Megatron model is described by a flat dict `desc` of TransformerConfig field names (plus
`vocab_size`, `max_sequence_length`, `position_embedding_type`, `rotary_base`, `rotary_percent`,
`seq_len_interpolation_factor`, `rope_scaling`, `rope_scaling_factor`, `share_embeddings`,
`hybrid_layer_pattern`, the GPTModel / HybridModel arguments). `desc_from_config` builds it from an
UltraMemConfig (the main job, tests), `desc_from_args` from Megatron-LM's parsed arguments (saved
in a checkpoint's common state). `hf_config_dict` turns it into UltraMemGPTConfig fields and
refuses, naming the option, anything the Hugging Face model does not compute.

Tensors are global (unsharded) and keyed by their distributed-checkpoint keys. `megatron_to_hf` and
`hf_to_megatron` are inverses; where Megatron spells one tensor two ways (a norm fused into the
next linear by Transformer Engine's spec or a separate module; a dense MLP inside the plugin's
slot or directly in the layer; a memory as the slot itself or beside an MLP) every spelling is a
candidate: reading takes the one present, writing provides all and the target model asks for one.
"""

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch


class UnsupportedModel(ValueError):
    """The checkpoint's model uses an option the Hugging Face model does not implement."""


# ----------------------------------------------------------------------------- description
def desc_from_config(config, *, vocab_size: int, max_sequence_length: int,
                     position_embedding_type: str = "learned_absolute", rotary_base: float = 10000,
                     rotary_percent: float = 1.0, seq_len_interpolation_factor=None,
                     rope_scaling: bool = False, rope_scaling_factor: float = 8.0,
                     share_embeddings: bool = False, hybrid_layer_pattern: Optional[str] = None) -> Dict:
    """desc of a model built as GPTModel(config, ..., **these arguments) (or HybridModel)."""
    import torch.nn.functional as F

    act = config.activation_func
    activation = {F.gelu: "gelu", F.silu: "silu"}.get(act, getattr(act, "__name__", repr(act)))
    desc = {
        f: getattr(config, f, None)
        for f in (
            "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
            "ffn_hidden_size", "normalization", "layernorm_epsilon", "gated_linear_unit",
            "add_bias_linear", "add_qkv_bias", "bias_activation_fusion", "qk_layernorm",
            "rotary_interleaved", "softmax_scale", "num_moe_experts", "moe_layer_freq",
            "multi_latent_attention", "apply_residual_connection_post_layernorm",
            "layernorm_zero_centered_gamma", "qk_l2_norm", "mtp_num_layers", "glu_linear_offset",
            "activation_func_clamp_value", "attention_output_gate", "window_size",
            "experimental_attention_variant", "softmax_type",
        )
    }  # fmt: skip
    desc.update(
        activation=activation, vocab_size=vocab_size, max_sequence_length=max_sequence_length,
        position_embedding_type=position_embedding_type, rotary_base=rotary_base,
        rotary_percent=rotary_percent, seq_len_interpolation_factor=seq_len_interpolation_factor,
        rope_scaling=rope_scaling, rope_scaling_factor=rope_scaling_factor,
        share_embeddings=share_embeddings, hybrid_layer_pattern=hybrid_layer_pattern,
    )  # fmt: skip
    from ..config import ultramem_fields_of

    desc.update(ultramem_fields_of(config))
    return desc


_ARG_TO_FIELD = {
    # Megatron-LM argument -> TransformerConfig field (core_transformer_config_from_args)
    "norm_epsilon": "layernorm_epsilon",
    "swiglu": "gated_linear_unit",
    "num_experts": "num_moe_experts",
    "apply_layernorm_1p": "layernorm_zero_centered_gamma",
}


def desc_from_args(args) -> Dict:
    """desc of the model Megatron-LM's pretrain_gpt.py / pretrain_hybrid.py (or the plugin's
    pretrain) builds from parsed arguments (an argparse.Namespace saved in the checkpoint)."""
    a = vars(args)
    desc = {k: a.get(k) for k in (
        "num_layers", "hidden_size", "num_attention_heads", "kv_channels", "ffn_hidden_size",
        "normalization", "add_bias_linear", "add_qkv_bias", "qk_layernorm", "rotary_interleaved",
        "moe_layer_freq", "multi_latent_attention", "apply_residual_connection_post_layernorm",
        "qk_l2_norm", "mtp_num_layers", "position_embedding_type", "rotary_base",
        "rotary_percent", "softmax_scale",
    )}  # fmt: skip
    for arg, field in _ARG_TO_FIELD.items():
        desc[field] = a.get(arg)
    desc["num_query_groups"] = a.get("num_query_groups") if a.get("group_query_attention") else None
    if desc["ffn_hidden_size"] is None and desc["hidden_size"]:
        desc["ffn_hidden_size"] = 4 * desc["hidden_size"]
    if a.get("squared_relu"):
        desc["activation"] = "squared_relu"
    elif a.get("quick_geglu"):
        desc["activation"] = "quick_gelu"
    else:
        desc["activation"] = "silu" if a.get("swiglu") else "gelu"
    desc["bias_activation_fusion"] = bool(a.get("bias_swiglu_fusion") if a.get("swiglu") else a.get("bias_gelu_fusion"))
    desc["vocab_size"] = a.get("padded_vocab_size")
    desc["max_sequence_length"] = a.get("max_position_embeddings")
    desc["seq_len_interpolation_factor"] = a.get("rotary_seq_len_interpolation_factor")
    desc["rope_scaling"] = bool(a.get("use_rope_scaling"))
    desc["rope_scaling_factor"] = a.get("rope_scaling_factor", 8.0)
    desc["share_embeddings"] = not a.get("untie_embeddings_and_output_weights", False)
    desc["hybrid_layer_pattern"] = a.get("hybrid_layer_pattern") or a.get("hybrid_override_pattern")
    for k, v in a.items():
        if k.startswith("ultramem_") and k not in ("ultramem_log_stats", "ultramem_per_layer_logging"):
            desc[k] = v
    return desc


RECORDED_ARGS = ("add_position_embedding", "make_vocab_size_divisible_by", "tokenizer_type", "seq_length")
"""Megatron-LM arguments that do not follow from the model but that Megatron-LM's load_checkpoint
compares with the loading run's (check_checkpoint_args): recorded at export from a Megatron-LM
checkpoint (config.megatron["args"]) and written back by import_hf."""


def recorded_args(args) -> Dict:
    return {k: getattr(args, k) for k in RECORDED_ARGS if hasattr(args, k)} if args is not None else {}


# Options with a forward pass the Hugging Face model does not compute: (desc key, flag, allowed)
_REFUSED = [
    ("multi_latent_attention", "--multi-latent-attention", (None, False)),
    ("apply_residual_connection_post_layernorm", "--apply-residual-connection-post-layernorm", (None, False)),
    ("layernorm_zero_centered_gamma", "--apply-layernorm-1p", (None, False)),
    ("qk_l2_norm", "--qk-l2-norm", (None, False)),
    ("mtp_num_layers", "--mtp-num-layers", (None, 0)),
    ("glu_linear_offset", "glu_linear_offset", (None, 0, 0.0)),
    ("activation_func_clamp_value", "activation_func_clamp_value", (None,)),
    ("attention_output_gate", "attention_output_gate", (None, False)),
    ("window_size", "--window-size", (None,)),
    ("experimental_attention_variant", "--experimental-attention-variant", (None,)),
    ("softmax_type", "--softmax-type", (None, "vanilla")),
]


def _refuse(flag: str, value, allowed: str) -> None:
    raise UnsupportedModel(
        f"{flag}={value!r} is not supported by the Hugging Face export (supported: {allowed})"
    )


def memory_layout(desc: Dict) -> Tuple[List[bool], List[str], List[Optional[int]]]:
    """(layer_attention, layer_mlp, memory_sink) of the UltraMemGPTConfig for `desc`."""
    from ..patterns import parse_layer_pattern, parse_skip_units

    L = desc["num_layers"]
    mode = desc.get("ultramem_mode")
    if mode is None:
        raise UnsupportedModel(
            "the checkpoint's model has no UltraMem memory layers (no ultramem_* settings): "
            "export it with a tool for plain GPT models"
        )
    pattern = desc.get("hybrid_layer_pattern")
    moe = [0] * L
    if desc.get("num_moe_experts"):
        freq = desc.get("moe_layer_freq", 1)
        moe = parse_layer_pattern(freq if freq is not None else 1, L, "moe_layer_freq", allow_empty=True)
    if pattern:
        main = pattern.split("/")[0].replace("|", "")
        if len(main) != L:
            raise UnsupportedModel(f"--hybrid-layer-pattern {pattern!r} has {len(main)} layers, --num-layers is {L}")
        for s in main:
            if s not in "*-E":
                raise UnsupportedModel(
                    f"--hybrid-layer-pattern symbol {s!r} is not supported by the Hugging Face "
                    "export (supported: '*' attention, '-' MLP, 'E' replaced by a memory)"
                )
        if "/" in pattern:
            _refuse("--hybrid-layer-pattern (multi-token prediction part)", pattern, "no '/' part")
        chosen = parse_layer_pattern(desc["ultramem_layers"], L, "ultramem_layers")
        if mode not in ("replace", "parallel"):
            _refuse("--ultramem-mode", mode, "'replace' and 'parallel' in a HybridModel")
        attn = [s == "*" for s in main]
        mlp = []
        for i, s in enumerate(main):
            if s == "*":
                mlp.append("none")
            elif s == "E":
                if not (mode == "replace" and chosen[i]):
                    _refuse("--hybrid-layer-pattern", pattern,
                            f"'E' layers replaced by memories (layer {i} is a MoE)")
                mlp.append("memory")
            else:
                mlp.append("dense+memory" if mode == "parallel" and chosen[i] else "dense")
        if not any("memory" in k for k in mlp):
            raise UnsupportedModel(f"the HybridModel pattern {pattern!r} has no memory layer")
        return attn, mlp, [None] * L
    attn = [True] * L
    sink: List[Optional[int]] = [None] * L
    if mode == "skip":
        mlp = ["dense"] * L
        for i, j in parse_skip_units(desc.get("ultramem_skip_units"), L):
            mlp[i] = "dense+memory"
            sink[i] = j if j != i else None
    else:
        chosen = parse_layer_pattern(desc["ultramem_layers"], L, "ultramem_layers")
        mlp = [("memory" if mode == "replace" else "dense+memory") if c else "dense" for c in chosen]
    for i in range(L):
        if moe[i] and mlp[i] != "memory":
            _refuse("--num-experts", desc.get("num_moe_experts"),
                    f"dense MLPs and memories (layer {i} is a MoE layer without a memory in its place)")
    return attn, mlp, sink


def hf_config_dict(desc: Dict) -> Dict:
    """UltraMemGPTConfig keyword arguments for `desc`; UnsupportedModel names what cannot be."""
    for key, flag, allowed in _REFUSED:
        if desc.get(key) not in allowed:
            _refuse(flag, desc.get(key), f"{allowed[-1]!r}")
    norm = desc.get("normalization") or "LayerNorm"
    if norm not in ("LayerNorm", "RMSNorm"):
        _refuse("--normalization", norm, "LayerNorm, RMSNorm")
    act = desc.get("activation", "gelu")
    if act not in ("gelu", "silu"):
        _refuse("activation (--squared-relu / --quick-geglu / activation_func)", act, "gelu, silu (SwiGLU)")
    if act == "silu" and not desc.get("gated_linear_unit"):
        _refuse("activation_func", "silu without gated_linear_unit", "gelu, SwiGLU")
    if act == "gelu" and desc.get("bias_activation_fusion") and (desc.get("add_bias_linear", True) or desc.get("gated_linear_unit")):
        act = "gelu_tanh"  # Megatron's fused bias-GELU / GEGLU kernels use the tanh approximation
    pos = desc.get("position_embedding_type") or "learned_absolute"
    if pos not in ("rope", "learned_absolute", "none"):
        _refuse("--position-embedding-type", pos, "rope, learned_absolute, none")
    attn, mlp, sink = memory_layout(desc)
    H, heads = desc["hidden_size"], desc["num_attention_heads"]
    add_bias = desc.get("add_bias_linear")
    add_bias = True if add_bias is None else bool(add_bias)
    um = {k: desc[k] for k in desc if k.startswith("ultramem_")}
    if um.get("ultramem_score_activation", "none") not in ("none", "softmax"):
        _refuse("--ultramem-score-activation", um.get("ultramem_score_activation"), "none, softmax")
    return dict(
        vocab_size=int(desc["vocab_size"]),
        hidden_size=H,
        num_hidden_layers=desc["num_layers"],
        num_attention_heads=heads,
        num_key_value_heads=desc.get("num_query_groups") or heads,
        head_dim=desc.get("kv_channels") or H // heads,
        intermediate_size=desc.get("ffn_hidden_size") or 4 * H,
        max_position_embeddings=int(desc["max_sequence_length"]),
        norm_type="rmsnorm" if norm == "RMSNorm" else "layernorm",
        norm_eps=float(desc.get("layernorm_epsilon") or 1e-5),
        hidden_act=act,
        gated_mlp=bool(desc.get("gated_linear_unit")),
        qkv_bias=add_bias or bool(desc.get("add_qkv_bias")),
        linear_bias=add_bias,
        qk_layernorm=bool(desc.get("qk_layernorm")),
        attention_scale=desc.get("softmax_scale"),
        position_embedding_type=pos,
        rope_theta=float(desc.get("rotary_base") or 10000),
        rotary_percent=float(desc.get("rotary_percent") or 1.0),
        rotary_interleaved=bool(desc.get("rotary_interleaved")),
        rope_interpolation_factor=desc.get("seq_len_interpolation_factor"),
        rope_llama3_scaling_factor=float(desc["rope_scaling_factor"]) if desc.get("rope_scaling") else None,
        layer_attention=attn,
        layer_mlp=mlp,
        memory_sink=sink,
        ultramem_num_keys=um["ultramem_num_keys"],
        ultramem_key_dim=um["ultramem_key_dim"],
        ultramem_value_dim=um.get("ultramem_value_dim") or H // 2,
        ultramem_expansion=um["ultramem_expansion"],
        ultramem_tucker_rank=um["ultramem_tucker_rank"],
        ultramem_num_cores=um["ultramem_num_cores"],
        ultramem_num_heads=um["ultramem_num_heads"],
        ultramem_topm=um["ultramem_topm"],
        ultramem_score_activation=um.get("ultramem_score_activation", "none"),
        tie_word_embeddings=bool(desc.get("share_embeddings")),
    )


# ----------------------------------------------------------------------------- tensor names
MEMORY_TENSORS = (
    "query_weight", "keys_row", "keys_col", "cores", "values", "permutation", "tucker_u",
    "tucker_v", "query_norm_row.weight", "query_norm_row.bias", "query_norm_col.weight",
    "query_norm_col.bias", "key_norm_row.weight", "key_norm_row.bias", "key_norm_col.weight",
    "key_norm_col.bias",
)  # fmt: skip


class Entry:
    """HF tensors `hf` <-> one Megatron tensor, found under the first present of `keys`.
    kind: 'copy', 'qkv' (hf = q, k, v of the grouped QKV) or 'gated' (hf = gate, up of fc1)."""

    __slots__ = ("hf", "keys", "kind")

    def __init__(self, hf, keys, kind="copy"):
        self.hf, self.keys, self.kind = tuple(hf), tuple(keys), kind


def tensor_plan(cfg) -> List[Entry]:
    """Every tensor of an UltraMemGPTConfig model and its Megatron checkpoint keys."""
    plan = [Entry(["model.embed_tokens.weight"], ["embedding.word_embeddings.weight"])]
    if cfg.position_embedding_type == "learned_absolute":
        plan.append(Entry(["model.embed_positions.weight"], ["embedding.position_embeddings.weight"]))
    norm_parts = ("weight",) if cfg.norm_type == "rmsnorm" else ("weight", "bias")
    receives = {s for s in cfg.memory_sink if s is not None}
    for i in range(cfg.num_hidden_layers):
        p, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        if cfg.layer_attention[i]:
            a = p + "self_attention."
            for part in norm_parts:
                plan.append(Entry([f"{h}input_layernorm.{part}"],
                                  [f"{a}linear_qkv.layer_norm_{part}", f"{p}input_layernorm.{part}"]))  # fmt: skip
            parts = ("weight", "bias") if cfg.qkv_bias else ("weight",)
            for part in parts:
                plan.append(Entry([f"{h}self_attn.{x}_proj.{part}" for x in "qkv"], [f"{a}linear_qkv.{part}"], "qkv"))
            for part in ("weight", "bias") if cfg.linear_bias else ("weight",):
                plan.append(Entry([f"{h}self_attn.o_proj.{part}"], [f"{a}linear_proj.{part}"]))
            if cfg.qk_layernorm:
                for x in "qk":
                    for part in norm_parts:
                        plan.append(Entry([f"{h}self_attn.{x}_norm.{part}"], [f"{a}{x}_layernorm.{part}"]))
        kind = cfg.layer_mlp[i]
        if kind == "none":
            continue
        for part in norm_parts:
            plan.append(Entry([f"{h}post_attention_layernorm.{part}"],
                              [f"{p}pre_mlp_layernorm.{part}", f"{p}mlp.linear_fc1.layer_norm_{part}"]))  # fmt: skip
        if "dense" in kind:
            # inside the plugin's slot (memory beside it, or a skip unit's sink) or the layer's own
            slot = "memory" in kind or i in receives
            prefixes = [f"{p}mlp.mlp.", f"{p}mlp."] if slot else [f"{p}mlp.", f"{p}mlp.mlp."]
            parts = ("weight", "bias") if cfg.linear_bias else ("weight",)
            for part in parts:
                fc1 = [f"{x}linear_fc1.{part}" for x in prefixes]
                if cfg.gated_mlp:
                    plan.append(Entry([f"{h}mlp.gate_proj.{part}", f"{h}mlp.up_proj.{part}"], fc1, "gated"))
                else:
                    plan.append(Entry([f"{h}mlp.up_proj.{part}"], fc1))
                plan.append(Entry([f"{h}mlp.down_proj.{part}"], [f"{x}linear_fc2.{part}" for x in prefixes]))
        if "memory" in kind:
            prefixes = [f"{p}mlp.memory.", f"{p}mlp."] if kind == "dense+memory" else [f"{p}mlp.", f"{p}mlp.memory."]
            for name in MEMORY_TENSORS:
                plan.append(Entry([f"{h}memory.{name}"], [x + name for x in prefixes]))
            plan.append(Entry([f"{h}memory.out_proj.weight"], [x + "linear_out.weight" for x in prefixes]))
    for part in norm_parts:
        plan.append(Entry([f"model.norm.{part}"], [f"decoder.final_layernorm.{part}", f"decoder.final_norm.{part}"]))
    if not cfg.tie_word_embeddings:
        plan.append(Entry(["lm_head.weight"], ["output_layer.weight"]))
    return plan


def _qkv_split(t: torch.Tensor, cfg) -> Tuple[torch.Tensor, ...]:
    """Megatron's grouped QKV [groups * (heads/groups + 2) * hd, ...] -> q, k, v."""
    g, hd = cfg.num_key_value_heads, cfg.head_dim
    rep = cfg.num_attention_heads // g
    v = t.reshape(g, rep + 2, hd, *t.shape[1:])
    rest = t.shape[1:]
    return (v[:, :rep].reshape(g * rep * hd, *rest), v[:, rep].reshape(g * hd, *rest),
            v[:, rep + 1].reshape(g * hd, *rest))  # fmt: skip


def _qkv_join(q, k, v, cfg) -> torch.Tensor:
    g, hd = cfg.num_key_value_heads, cfg.head_dim
    rep = cfg.num_attention_heads // g
    rest = q.shape[1:]
    parts = [q.reshape(g, rep, hd, *rest), k.reshape(g, 1, hd, *rest), v.reshape(g, 1, hd, *rest)]
    return torch.cat(parts, 1).reshape(g * (rep + 2) * hd, *rest)


def unstack_layers(tensors: Dict[str, torch.Tensor], num_layers: int) -> Dict[str, torch.Tensor]:
    """Megatron stacks identical layers under `decoder.layers.<name>` with a leading layer axis
    (TransformerBlock.sharded_state_dict without heterogeneous layers): split them per layer."""
    out = {}
    for key, t in tensors.items():
        rest = key[len("decoder.layers."):] if key.startswith("decoder.layers.") else None
        if rest is not None and not rest.split(".")[0].isdigit():
            if t.shape[0] != num_layers:
                raise ValueError(f"stacked tensor {key} has {t.shape[0]} layers, expected {num_layers}")
            for i in range(num_layers):
                out[f"decoder.layers.{i}.{rest}"] = t[i]
        else:
            out[key] = t
    return out


def megatron_to_hf(get: Callable[[str], Optional[torch.Tensor]], cfg) -> Dict[str, torch.Tensor]:
    """HF state dict from global Megatron tensors (`get(key)` -> tensor or None)."""
    out = {}
    for e in tensor_plan(cfg):
        t = next((x for x in map(get, e.keys) if x is not None), None)
        if t is None:
            raise KeyError(f"the checkpoint has none of {', '.join(e.keys)}")
        if e.kind == "qkv":
            parts = _qkv_split(t, cfg)
        elif e.kind == "gated":
            parts = tuple(torch.chunk(t, 2, dim=0))  # [gate; up] (Megatron's SwiGLU layout)
        else:
            parts = (t,)
        for name, x in zip(e.hf, parts):
            out[name] = x.contiguous()
    return out


def hf_to_megatron(hf: Dict[str, torch.Tensor], cfg) -> Dict[str, torch.Tensor]:
    """Global Megatron tensors under every candidate key, from an HF state dict."""
    out = {}
    for e in tensor_plan(cfg):
        if e.kind == "qkv":
            t = _qkv_join(*(hf[n] for n in e.hf), cfg)
        elif e.kind == "gated":
            t = torch.cat([hf[n] for n in e.hf], 0)
        else:
            t = hf[e.hf[0]]
        for key in e.keys:
            out[key] = t
    if cfg.tie_word_embeddings:  # an untied target (pipeline stages) reads the same tensor
        out.setdefault("output_layer.weight", out["embedding.word_embeddings.weight"])
    return out
