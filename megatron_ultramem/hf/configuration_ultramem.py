"""Hugging Face configuration of a GPT (or Megatron HybridModel) decoder with UltraMem memory layers.

This file is copied into every exported folder and loaded with `trust_remote_code=True`: it
imports only `transformers`. `megatron_ultramem.export_hf` fills it from a Megatron checkpoint.

The decoder is a list of blocks; block i has an attention sub-layer when `layer_attention[i]` and
an MLP slot of kind `layer_mlp[i]`:
    "dense"          a dense MLP
    "memory"         an UltraMem memory instead of the MLP (placement 'replace')
    "dense+memory"   a dense MLP and a memory on the same normed input, outputs added
                     (placement 'parallel'; with a skip unit i:j, j > i, the memory output goes to
                     block j instead: `memory_sink[i] = j`)
    "none"           no MLP slot (an attention-only block of a HybridModel)
A GPT model has attention in every block; a HybridModel pattern "*-*E" becomes attention-only
('*') and MLP-only ('-', 'E') blocks.
"""

from transformers import PretrainedConfig

MLP_KINDS = ("dense", "memory", "dense+memory", "none")


class UltraMemGPTConfig(PretrainedConfig):
    model_type = "ultramem_gpt"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 256,
        hidden_size: int = 128,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int = None,
        head_dim: int = None,
        intermediate_size: int = 512,
        max_position_embeddings: int = 2048,
        norm_type: str = "layernorm",
        norm_eps: float = 1e-5,
        hidden_act: str = "gelu",
        gated_mlp: bool = False,
        qkv_bias: bool = True,
        linear_bias: bool = True,
        qk_layernorm: bool = False,
        attention_scale: float = None,
        position_embedding_type: str = "rope",
        rope_theta: float = 10000.0,
        rotary_percent: float = 1.0,
        rotary_interleaved: bool = False,
        rope_interpolation_factor: float = None,
        rope_llama3_scaling_factor: float = None,
        layer_attention: list = None,
        layer_mlp: list = None,
        memory_sink: list = None,
        ultramem_num_keys: int = 64,
        ultramem_key_dim: int = 128,
        ultramem_value_dim: int = None,
        ultramem_expansion: int = 4,
        ultramem_tucker_rank: int = 2,
        ultramem_num_cores: int = 2,
        ultramem_num_heads: int = 2,
        ultramem_topm: int = 32,
        ultramem_score_activation: str = "none",
        megatron: dict = None,
        tie_word_embeddings: bool = True,
        use_cache: bool = True,
        **kwargs,
    ):
        """Fields, with the Megatron names they come from:

        num_key_value_heads (num_query_groups), head_dim (kv_channels), intermediate_size
        (ffn_hidden_size), norm_type 'layernorm'/'rmsnorm' (normalization), norm_eps
        (layernorm_epsilon), hidden_act 'gelu' (exact), 'gelu_tanh' (Megatron's fused bias-gelu,
        tanh approximation) or 'silu', gated_mlp (gated_linear_unit: SwiGLU with silu), qkv_bias
        (add_bias_linear or add_qkv_bias), linear_bias (add_bias_linear: attention output and
        MLP), attention_scale (softmax_scale; None = 1/sqrt(head_dim)), position_embedding_type
        'rope' / 'learned_absolute' / 'none', rope_theta (rotary_base), rotary_percent,
        rotary_interleaved, rope_interpolation_factor (seq_len_interpolation_factor: positions
        divided by it), rope_llama3_scaling_factor (rope_scaling with rope_scaling_factor: the
        Llama-3 frequency scaling, low/high frequency factors 1 and 4, original context 8192),
        tie_word_embeddings (share_embeddings_and_output_weights), and the ultramem_* fields of
        the plugin's UltraMemConfig. `megatron` records where the weights came from.
        """
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.norm_type = norm_type
        self.norm_eps = norm_eps
        self.hidden_act = hidden_act
        self.gated_mlp = gated_mlp
        self.qkv_bias = qkv_bias
        self.linear_bias = linear_bias
        self.qk_layernorm = qk_layernorm
        self.attention_scale = attention_scale
        self.position_embedding_type = position_embedding_type
        self.rope_theta = rope_theta
        self.rotary_percent = rotary_percent
        self.rotary_interleaved = rotary_interleaved
        self.rope_interpolation_factor = rope_interpolation_factor
        self.rope_llama3_scaling_factor = rope_llama3_scaling_factor
        self.layer_attention = list(layer_attention) if layer_attention is not None else [True] * num_hidden_layers
        self.layer_mlp = list(layer_mlp) if layer_mlp is not None else ["dense"] * num_hidden_layers
        self.memory_sink = (
            list(memory_sink) if memory_sink is not None else [None] * num_hidden_layers
        )
        self.ultramem_num_keys = ultramem_num_keys
        self.ultramem_key_dim = ultramem_key_dim
        self.ultramem_value_dim = ultramem_value_dim or hidden_size // 2
        self.ultramem_expansion = ultramem_expansion
        self.ultramem_tucker_rank = ultramem_tucker_rank
        self.ultramem_num_cores = ultramem_num_cores
        self.ultramem_num_heads = ultramem_num_heads
        self.ultramem_topm = ultramem_topm
        self.ultramem_score_activation = ultramem_score_activation
        self.megatron = dict(megatron or {})
        self.use_cache = use_cache
        self._check()
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def _check(self) -> None:
        L = self.num_hidden_layers
        for name in ("layer_attention", "layer_mlp", "memory_sink"):
            if len(getattr(self, name)) != L:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries, num_hidden_layers is {L}")
        for i, kind in enumerate(self.layer_mlp):
            if kind not in MLP_KINDS:
                raise ValueError(f"layer_mlp[{i}] = {kind!r}; allowed: {', '.join(MLP_KINDS)}")
        for i, sink in enumerate(self.memory_sink):
            if sink is None:
                continue
            if "memory" not in self.layer_mlp[i] or not (i <= sink < L) or self.layer_mlp[sink] == "none":
                raise ValueError(f"memory_sink[{i}] = {sink}: needs a memory in block {i} and an MLP slot in block {sink} >= {i}")
        for name, allowed in (
            ("norm_type", ("layernorm", "rmsnorm")),
            ("hidden_act", ("gelu", "gelu_tanh", "silu")),
            ("position_embedding_type", ("rope", "learned_absolute", "none")),
            ("ultramem_score_activation", ("none", "softmax")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} = {getattr(self, name)!r}; allowed: {', '.join(allowed)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        E = self.ultramem_expansion
        if int(round(E**0.5)) ** 2 != E:
            raise ValueError(f"ultramem_expansion must be a perfect square, got {E}")
        if self.ultramem_value_dim % self.ultramem_num_cores:
            raise ValueError("ultramem_value_dim must be divisible by ultramem_num_cores")

    @property
    def ultramem_keys_per_side(self) -> int:
        """n' = sqrt(E) * n: keys per side of the virtual grid."""
        return int(round(self.ultramem_expansion**0.5)) * self.ultramem_num_keys

    @property
    def num_attention_layers(self) -> int:
        return sum(bool(a) for a in self.layer_attention)
