"""Hugging Face model of a GPT (or Megatron HybridModel) decoder with UltraMem memory layers.

Plain PyTorch + transformers (no Megatron, no Triton): copied into every folder that
`python -m megatron_ultramem.export_hf` writes and loaded with `trust_remote_code=True`:

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

Every operation mirrors the Megatron-Core model it was exported from, in the same order where the
rounding could differ: pre-norm blocks (LayerNorm or RMSNorm), attention with Megatron's grouped
QKV heads, QK layernorm before RoPE (Megatron's RotaryEmbedding: base, rotary_percent, interleaved,
linear interpolation, Llama-3 scaling), softmax in fp32, MLP (GELU exact or Megatron's tanh fused
bias-GELU, or SwiGLU), and the memory layer of megatron_ultramem/reference.py: TDQKR's two-phase
top-m (rank-1 preselection with the stored Tucker vectors u, v, then exact rescoring of the m x m
candidate grid with the summed core, torch.topk's selection and order), multi-core scoring and
implicit value expansion pooled in fp32. The memory processes tokens in chunks (selection is per
token, so chunking changes nothing) to bound its [T, H, m, m] and [T, H*m, Dv] temporaries.

Conventions of transformers: PreTrainedModel + GenerationMixin, a `Cache` (DynamicCache) for keys
and values, a 2-D `attention_mask` (1 = token, 0 = padding) and `position_ids`. Megatron's rotary
embedding uses positions 0..s-1 of the sequence; here the positions are `position_ids` (the same
without padding; generate() derives them from the attention mask when a batch is left-padded).
"""

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import transformers
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_ultramem import UltraMemGPTConfig

_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])
# transformers 5 renamed the outputs' and forward's `past_key_values` to `cache`
_CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


# ----------------------------------------------------------------------------- memory math
# The functions below are megatron_ultramem/reference.py's, restated so that this file stands
# alone; the export tests compare them with the reference on random inputs and ties.
def tucker_topm(s_row, s_col, cores, u, v, m: int):
    """TDQKR two-phase top-m. s_row, s_col [T, H, n', r]; cores [H, h, r, r]; u, v [H, r].
    Returns virtual indices [T, H, m] (row * n' + col, by descending summed score) and per-core
    scores of the winners [T, H, m, h]."""
    T, H, n_side, r = s_row.shape
    # Phase 1: rank-1 preselection [T, H, n'] -> top-m rows / columns [T, H, m]
    i_row = torch.topk(torch.einsum("thar,hr->tha", s_row, u), m, dim=-1).indices
    i_col = torch.topk(torch.einsum("thbr,hr->thb", s_col, v), m, dim=-1).indices
    sr = torch.gather(s_row, 2, i_row[..., None].expand(T, H, m, r))  # [T, H, m, r]
    sc = torch.gather(s_col, 2, i_col[..., None].expand(T, H, m, r))  # [T, H, m, r]
    # Phase 2: the m x m candidate grid with the summed core [T, H, m, m], final top-m
    grid = torch.einsum("thar,hrs,thbs->thab", sr, cores.sum(1), sc)
    top = torch.topk(grid.reshape(T, H, m * m), m, dim=-1).indices  # [T, H, m]
    a, b = top // m, top % m
    sr_w = torch.gather(sr, 2, a[..., None].expand(T, H, m, r))
    sc_w = torch.gather(sc, 2, b[..., None].expand(T, H, m, r))
    core_scores = torch.einsum("thmr,hirs,thms->thmi", sr_w, cores, sc_w)  # [T, H, m, h]
    virtual = torch.gather(i_row, 2, a) * n_side + torch.gather(i_col, 2, b)
    return virtual, core_scores


def weighted_gather_pool(rows, blocks, scores, values, E: int):
    """IVE + multi-core pooling: rows, blocks [T, M], scores [T, M, h], values [N, Dv] ->
    [T, E, Dv], accumulated in fp32 (fp64 for fp64) and cast to the table's dtype."""
    T, M = rows.shape
    h = scores.shape[-1]
    Dv = values.shape[1]
    acc = torch.float64 if values.dtype == torch.float64 else torch.float32
    gathered = values[rows].to(acc).view(T, M, h, Dv // h)  # [T, M, h, Dv/h]
    weighted = (gathered * scores.to(acc)[..., None]).view(T, M, Dv)  # [T, M, Dv]
    pooled = torch.zeros(T, E, Dv, dtype=acc, device=values.device)
    pooled.scatter_add_(1, blocks[..., None].expand(T, M, Dv), weighted)  # [T, E, Dv]
    return pooled.to(values.dtype)


class UltraMemMemory(nn.Module):
    """One UltraMem memory layer: [..., D] -> [..., D] (megatron_ultramem.layer.UltraMemLayer at
    inference; the Tucker vectors u, v are buffers refreshed during training, stored here)."""

    TOKEN_BUDGET = 1 << 24  # elements of the largest per-chunk temporary (64 MiB in fp32)

    def __init__(self, config: UltraMemGPTConfig):
        super().__init__()
        c = config
        self.D, self.K, self.H = c.hidden_size, c.ultramem_key_dim, c.ultramem_num_heads
        self.r, self.h, self.m = c.ultramem_tucker_rank, c.ultramem_num_cores, c.ultramem_topm
        self.E, self.n_side = c.ultramem_expansion, c.ultramem_keys_per_side
        self.N, self.Dv = c.ultramem_num_keys**2, c.ultramem_value_dim
        self.softmax = c.ultramem_score_activation == "softmax"
        self.query_weight = nn.Parameter(torch.empty(2 * self.K, self.D))
        self.query_norm_row = nn.LayerNorm(self.K)
        self.query_norm_col = nn.LayerNorm(self.K)
        self.key_norm_row = nn.LayerNorm(self.K)
        self.key_norm_col = nn.LayerNorm(self.K)
        self.keys_row = nn.Parameter(torch.empty(self.H, self.n_side, self.K, self.r))
        self.keys_col = nn.Parameter(torch.empty(self.H, self.n_side, self.K, self.r))
        self.cores = nn.Parameter(torch.empty(self.H, self.h, self.r, self.r))
        self.values = nn.Parameter(torch.empty(self.N, self.Dv))
        self.out_proj = nn.Linear(self.Dv * self.E, self.D, bias=False)  # input Dv-major
        perm_dtype = torch.int32 if self.E * self.N <= 2**31 - 1 else torch.int64
        self.register_buffer("permutation", torch.arange(self.E * self.N, dtype=perm_dtype))
        self.register_buffer("tucker_u", torch.zeros(self.H, self.r))
        self.register_buffer("tucker_v", torch.zeros(self.H, self.r))

    def retrieve(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> virtual indices [T, H*m], per-core scores [T, H*m, h]."""
        T = x.shape[0]
        q = F.linear(x, self.query_weight)  # [T, 2K]
        q_row, q_col = self.query_norm_row(q[:, : self.K]), self.query_norm_col(q[:, self.K :])
        k_row = self.key_norm_row(self.keys_row.transpose(-1, -2)).transpose(-1, -2)  # [H, n', K, r]
        k_col = self.key_norm_col(self.keys_col.transpose(-1, -2)).transpose(-1, -2)
        s_row = torch.einsum("tk,hakr->thar", q_row, k_row)  # [T, H, n', r]
        s_col = torch.einsum("tk,hakr->thar", q_col, k_col)
        virtual, scores = tucker_topm(s_row, s_col, self.cores, self.tucker_u, self.tucker_v, self.m)
        if self.softmax:
            scores = torch.softmax(scores, dim=2)
        return virtual.reshape(T, self.H * self.m), scores.reshape(T, self.H * self.m, self.h)

    def aggregate(self, virtual: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """[T, H*m], [T, H*m, h] -> [T, D]: pool the physical rows into virtual blocks, project."""
        pv = self.permutation[virtual].long()
        rows, blocks = pv % self.N, pv // self.N  # physical row, virtual block
        pooled = weighted_gather_pool(rows, blocks, scores, self.values, self.E)  # [T, E, Dv]
        flat = pooled.transpose(1, 2).reshape(pooled.shape[0], -1)  # [T, Dv*E], Dv-major
        return F.linear(flat, self.out_proj.weight)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.D)
        per_token = self.H * self.m * max(self.m, self.Dv, self.n_side * self.r)
        chunk = max(1, self.TOKEN_BUDGET // per_token)
        outs = [self.aggregate(*self.retrieve(x[t : t + chunk])) for t in range(0, x.shape[0], chunk)]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, 0)
        return out.view(shape)


# ----------------------------------------------------------------------------- transformer parts
def _norm(config: UltraMemGPTConfig, dim: int) -> nn.Module:
    if config.norm_type == "rmsnorm":
        return nn.RMSNorm(dim, eps=config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """Megatron's fused bias-GELU (megatron/core/fusions/fused_bias_gelu.py), with its constants."""
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


_ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": gelu_tanh, "silu": F.silu}


class UltraMemGPTMLP(nn.Module):
    """Megatron's MLP: fc1 (gate and up halves when gated) -> activation -> fc2."""

    def __init__(self, config: UltraMemGPTConfig):
        super().__init__()
        D, F_ = config.hidden_size, config.intermediate_size
        self.gated = config.gated_mlp
        self.act = _ACTIVATIONS[config.hidden_act]
        if self.gated:
            self.gate_proj = nn.Linear(D, F_, bias=config.linear_bias)
        self.up_proj = nn.Linear(D, F_, bias=config.linear_bias)
        self.down_proj = nn.Linear(F_, D, bias=config.linear_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class UltraMemGPTRotary(nn.Module):
    """Megatron's RotaryEmbedding frequencies, evaluated at `position_ids`."""

    def __init__(self, config: UltraMemGPTConfig):
        super().__init__()
        dim = config.head_dim
        if config.rotary_percent < 1.0:
            dim = int(dim * config.rotary_percent)
        self.dim = dim
        self.interleaved = config.rotary_interleaved
        self.interpolation = config.rope_interpolation_factor
        self.theta, self.llama3_factor = config.rope_theta, config.rope_llama3_scaling_factor

    def inv_freq(self, device) -> torch.Tensor:
        """[dim/2] fp32, computed at each call (no buffer: from_pretrained may build the model on
        the meta device, and a non-persistent buffer would not be restored)."""
        dim = self.dim
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
        if self.llama3_factor is not None:
            inv_freq = self._llama3_scaling(inv_freq, self.llama3_factor)
        return inv_freq

    @staticmethod
    def _llama3_scaling(freqs, factor, low_freq_factor=1, high_freq_factor=4, old_context_len=8192):
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / freqs
        inv_freq = torch.where(wavelen > low_freq_wavelen, freqs / factor, freqs)
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(medium, smoothed, inv_freq)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        """position_ids [b, s] -> rotation angles [b, 1, s, dim] (fp32)."""
        pos = position_ids.to(torch.float32)
        if self.interpolation is not None:
            pos = pos * (1 / self.interpolation)
        freqs = pos[..., None] * self.inv_freq(pos.device)  # [b, s, dim/2]
        if self.interleaved:
            emb = torch.stack((freqs, freqs), dim=-1).flatten(-2)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)
        return emb[:, None]


def _rotate_half(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    if not interleaved:
        x1, x2 = torch.chunk(x, 2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rotary(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Megatron's _apply_rotary_pos_emb_bshd on t [b, heads, s, hd]: the first rot_dim dims rotate."""
    rot_dim = freqs.shape[-1]
    t, t_pass = t[..., :rot_dim], t[..., rot_dim:]
    cos_, sin_ = torch.cos(freqs).to(t.dtype), torch.sin(freqs).to(t.dtype)
    t = (t * cos_) + (_rotate_half(t, interleaved) * sin_)
    return torch.cat((t, t_pass), dim=-1)


class UltraMemGPTAttention(nn.Module):
    """Megatron's SelfAttention: grouped-query heads, optional QK layernorm, RoPE, fp32 softmax."""

    def __init__(self, config: UltraMemGPTConfig, cache_index: int):
        super().__init__()
        c = config
        self.cache_index = cache_index  # this layer's slot in the Cache (attention layers only)
        self.heads, self.groups, self.hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.heads * self.hd, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.groups * self.hd, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.groups * self.hd, bias=c.qkv_bias)
        self.o_proj = nn.Linear(self.heads * self.hd, c.hidden_size, bias=c.linear_bias)
        if c.qk_layernorm:
            self.q_norm, self.k_norm = _norm(c, self.hd), _norm(c, self.hd)
        else:
            self.q_norm = self.k_norm = None
        self.scale = c.attention_scale if c.attention_scale is not None else 1.0 / math.sqrt(self.hd)
        self.rope = c.position_embedding_type == "rope"
        self.interleaved = c.rotary_interleaved

    def forward(self, x, freqs, mask, cache: Optional[Cache]):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.hd)
        k = self.k_proj(x).view(b, s, self.groups, self.hd)
        v = self.v_proj(x).view(b, s, self.groups, self.hd)
        if self.q_norm is not None:  # Megatron normalizes before the rotary embedding
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b, heads, s, hd]
        if self.rope:
            q, k = apply_rotary(q, freqs, self.interleaved), apply_rotary(k, freqs, self.interleaved)
        if cache is not None:
            k, v = cache.update(k, v, self.cache_index)
        rep = self.heads // self.groups  # query heads of group g: g*rep .. g*rep+rep-1
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale  # [b, heads, s, s_kv]
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, s, self.heads * self.hd)
        return self.o_proj(out)


class UltraMemGPTBlock(nn.Module):
    """One block: [attention sub-layer] then [MLP slot], each pre-norm with a residual."""

    def __init__(self, config: UltraMemGPTConfig, index: int, cache_index: Optional[int]):
        super().__init__()
        kind = config.layer_mlp[index]
        self.index = index
        if config.layer_attention[index]:
            self.input_layernorm = _norm(config, config.hidden_size)
            self.self_attn = UltraMemGPTAttention(config, cache_index)
        else:
            self.input_layernorm = self.self_attn = None
        self.post_attention_layernorm = _norm(config, config.hidden_size) if kind != "none" else None
        self.mlp = UltraMemGPTMLP(config) if "dense" in kind else None
        self.memory = UltraMemMemory(config) if "memory" in kind else None
        sink = config.memory_sink[index]
        self.sink = index if sink is None else sink  # block whose slot output gets the memory

    def forward(self, x, freqs, mask, cache, inbox: dict):
        if self.self_attn is not None:
            x = x + self.self_attn(self.input_layernorm(x), freqs, mask, cache)
        if self.post_attention_layernorm is None:
            return x
        normed = self.post_attention_layernorm(x)
        out = self.mlp(normed) if self.mlp is not None else None
        if self.memory is not None:
            mem = self.memory(normed)
            if self.sink != self.index:  # a skip unit: added after block `sink`
                inbox.setdefault(self.sink, []).append(mem)
            else:
                out = mem if out is None else out + mem
        for mem in inbox.pop(self.index, []):
            out = out + mem
        return x + out


# ----------------------------------------------------------------------------- models
class UltraMemGPTPreTrainedModel(PreTrainedModel):
    config_class = UltraMemGPTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["UltraMemGPTBlock"]
    _supports_cache_class = True

    def _init_weights(self, module):
        std = 0.02
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            if module.weight is not None:
                nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, UltraMemMemory):
            for p in (module.query_weight, module.keys_row, module.keys_col, module.values):
                nn.init.normal_(p, std=std)
            nn.init.uniform_(module.cores)


def _causal_mask(attention_mask, b: int, s: int, past: int, device) -> torch.Tensor:
    """[b, 1, s, past + s] bool, True = may attend: causal, and not a padding key. A query row
    that sees no key (a padding query) attends to itself, so no row is all-masked."""
    total = past + s
    q_pos = torch.arange(past, total, device=device)[:, None]
    allowed = torch.arange(total, device=device)[None, :] <= q_pos  # [s, total]
    allowed = allowed[None, None].expand(b, 1, s, total)
    if attention_mask is not None:
        keys = attention_mask[:, None, None, -total:].to(torch.bool)
        allowed = allowed & keys
        allowed = allowed | (~allowed.any(-1, keepdim=True) & (torch.arange(total, device=device) == q_pos))
    return allowed


class UltraMemGPTModel(UltraMemGPTPreTrainedModel):
    def __init__(self, config: UltraMemGPTConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.position_embedding_type == "learned_absolute":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        else:
            self.embed_positions = None
        cache_index, blocks = 0, []
        for i in range(config.num_hidden_layers):
            blocks.append(UltraMemGPTBlock(config, i, cache_index if config.layer_attention[i] else None))
            cache_index += int(bool(config.layer_attention[i]))
        self.layers = nn.ModuleList(blocks)
        self.norm = _norm(config, config.hidden_size)
        self.rotary = UltraMemGPTRotary(config) if config.position_embedding_type == "rope" else None
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Cache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        cache: Optional[Cache] = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        cache = cache if cache is not None else past_key_values  # transformers 5 names it `cache`
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, s = x.shape[:2]
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config) if _TRANSFORMERS_MAJOR >= 5 else DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + s, device=x.device)[None].expand(b, s)
        if self.embed_positions is not None:
            x = x + self.embed_positions(position_ids)
        freqs = self.rotary(position_ids) if self.rotary is not None else None
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("attention_mask must be 2-D [batch, past + sequence] (1 = token, 0 = padding)")
        mask = _causal_mask(attention_mask, b, s, past, x.device)
        inbox = {}  # skip units: memory outputs waiting for their block
        for block in self.layers:
            x = block(x, freqs, mask, cache if use_cache else None, inbox)
        x = self.norm(x)
        return BaseModelOutputWithPast(**{"last_hidden_state": x, _CACHE_FIELD: cache if use_cache else None})


class UltraMemGPTForCausalLM(UltraMemGPTPreTrainedModel, GenerationMixin):
    if _TRANSFORMERS_MAJOR >= 5:
        _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    else:
        _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config: UltraMemGPTConfig):
        super().__init__(config)
        self.model = UltraMemGPTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Cache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        cache: Optional[Cache] = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            cache=cache,
        )  # fmt: skip
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:  # next-token cross entropy, labels shifted here (-100 ignored)
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )  # fmt: skip
        return CausalLMOutputWithPast(**{"loss": loss, "logits": logits, _CACHE_FIELD: getattr(out, _CACHE_FIELD)})


__all__ = ["UltraMemGPTForCausalLM", "UltraMemGPTModel", "UltraMemGPTPreTrainedModel", "UltraMemMemory"]
