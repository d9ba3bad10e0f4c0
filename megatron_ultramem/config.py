"""UltraMemConfig: Megatron-Core's TransformerConfig plus the `ultramem_*` knobs.

The fields are on a TransformerConfig subclass (not a separate object) so that one config flows
through GPTModel, the layer specs and Megatron-LM's `core_transformer_config_from_args`, which copies
every parsed argument whose name matches a field. Every knob of the algorithm (ULTRAMEM.md) is here;
validation runs in `__post_init__`, before any module is built, and every error names the field and
its allowed values.
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

from megatron.core.transformer.transformer_config import TransformerConfig

from .patterns import parse_layer_pattern, parse_skip_units

MODES = ("replace", "parallel", "skip")
INITS = ("paper", "reference")
SCORE_ACTIVATIONS = ("none", "softmax")
IMPLS = ("auto", "reference", "triton")


@dataclass
class UltraMemConfig(TransformerConfig):
    """Configuration of a GPT decoder with UltraMem memory layers."""

    ultramem_mode: str = "parallel"
    """Where memory layers go. 'replace': the memory replaces the MLP/MoE of the chosen layers.
    'parallel': the memory runs beside the dense MLP of the chosen layers and the outputs add
    (UltraMemV2; the natural drop-in for a MoE block). 'skip': the paper's skip-layer units, see
    `ultramem_skip_units`."""

    ultramem_layers: Union[int, List[int], str] = 1
    """Which layers get a memory (modes 'replace' and 'parallel'), spelled like `moe_layer_freq`:
    an int N puts one in every N-th layer (layer i when i % N == 0), a list of 0/1 has one entry per
    layer, and a string is a list expression such as "[0,1]*4" or "([0]*3+[1])*2"."""

    ultramem_skip_units: Optional[Union[str, List[Tuple[int, int]]]] = None
    """Skip-layer units for mode 'skip': "i:j,i:j,..." or [(i, j), ...], 0-based block indices with
    i <= j. A unit reads block i's pre-MLP LayerNorm output and adds its output to the residual
    stream after block j (i == j runs beside block i's MLP). Paper, 20 layers: "2:5,6:9,10:13,14:17".
    """

    ultramem_num_keys: int = 64
    """n: keys per side of the physical grid; the table has N = n^2 rows. Paper: 808 at 227M."""

    ultramem_key_dim: int = 128
    """K: query/key dimension per side (row or column). Paper: 192 at 227M."""

    ultramem_value_dim: Optional[int] = None
    """Dv: value dimension. None means hidden_size // 2 ("half vdim + proj", paper ablation -0.022)."""

    ultramem_expansion: int = 4
    """E: implicit value expansion rate, a perfect square; E * N virtual values. Paper default 4."""

    ultramem_tucker_rank: int = 2
    """r: Tucker rank of the row/column scores. Paper: r = 2 (2, 3, 4 about equal)."""

    ultramem_num_cores: int = 2
    """h: Tucker cores (multi-core scoring); Dv is split into h slices. Paper: h = 2 best."""

    ultramem_num_heads: int = 2
    """H: retrieval heads sharing one query. Paper default 2."""

    ultramem_topm: int = 32
    """m: top-m per head, used for the row, column and final selection; m <= sqrt(E) * n.
    Paper: 80 (v1), 32..768 (v2)."""

    ultramem_aux_loss_alpha: float = 0.001
    """alpha of the Tucker auxiliary loss (paper default 0.001; 0 switches it off, as the public
    reference code does)."""

    ultramem_aux_loss_tau: float = 0.15
    """tau: margin under which non-leading singular values of the summed core are free. Paper 0.15."""

    ultramem_init: str = "paper"
    """'paper': variance-matched init (values ~ N(0, E/(2 m H L)), Wo std 1/sqrt(E*Dv), unit-variance
    scores), so each memory adds output variance ~1/(2L) like a GPT MLP. 'reference': the public
    reference code's (values std 0.02, LN weights K^-0.33, q/keys std 1/sqrt(K), cores U(0, 1))."""

    ultramem_value_lr_mult: float = 4.0
    """rho0: the value table's LR multiplier at step 0, decaying linearly to 1 (reference code: 4;
    the paper's summary says 10; UltraMemV2 found 1 slightly better at 1.4T tokens)."""

    ultramem_value_lr_decay_rate: float = 1.0
    """rate: the multiplier reaches 1 at step rate * max_steps."""

    ultramem_value_weight_decay: bool = False
    """Apply weight decay to the value table (off by default: each row sees few updates)."""

    ultramem_score_activation: str = "none"
    """Activation of the pooling weights: 'none' (paper: raw scores, softmax removal -0.006) or
    'softmax' over each head's m winners (the product-key-memory baseline)."""

    ultramem_impl: str = "auto"
    """Retrieval/aggregation backend: 'auto' (Triton kernels on CUDA, reference on CPU),
    'reference' (pure PyTorch everywhere) or 'triton'."""

    ultramem_deterministic: bool = False
    """Sorted, atomic-free value-table gradient in the Triton backward (bitwise reproducible)."""

    ultramem_seed: int = 1234
    """Seed of the virtual-index permutation and the init of memory parameters; derived per layer,
    so the table is the same on every rank whatever the parallel layout."""

    def __post_init__(self):
        # TransformerConfig refuses expert parallelism without MoE experts; here the memory's value
        # table is the expert-parallel tensor, so its check is bypassed for that one field.
        ep = self.expert_model_parallel_size
        if ep > 1 and self.num_moe_experts is None:
            self.expert_model_parallel_size = 1
        try:
            super().__post_init__()
        finally:
            self.expert_model_parallel_size = ep
        self.validate_ultramem()
        # Memory layers differ from their neighbours, so layers are checkpointed one by one rather
        # than stacked (TransformerBlock fails on mixed layers otherwise). Sic: Megatron's spelling.
        self.hetereogenous_dist_checkpoint = True

    # ------------------------------------------------------------------ derived sizes
    @property
    def ultramem_expansion_side(self) -> int:
        """E' = sqrt(E): the key grid is expanded by E' per side."""
        return math.isqrt(self.ultramem_expansion)

    @property
    def ultramem_keys_per_side(self) -> int:
        """n' = E' * n, keys per side of the virtual grid."""
        return self.ultramem_expansion_side * self.ultramem_num_keys

    @property
    def ultramem_num_values(self) -> int:
        """N = n^2 physical value rows."""
        return self.ultramem_num_keys**2

    # ------------------------------------------------------------------ validation
    def validate_ultramem(self) -> None:
        """Check every ultramem_* field; raise ValueError naming the field and the allowed values."""
        _choice("ultramem_mode", self.ultramem_mode, MODES)
        _choice("ultramem_init", self.ultramem_init, INITS)
        _choice("ultramem_score_activation", self.ultramem_score_activation, SCORE_ACTIVATIONS)
        _choice("ultramem_impl", self.ultramem_impl, IMPLS)
        for name in (
            "ultramem_num_keys",
            "ultramem_key_dim",
            "ultramem_expansion",
            "ultramem_tucker_rank",
            "ultramem_num_cores",
            "ultramem_num_heads",
            "ultramem_topm",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        E = self.ultramem_expansion
        if math.isqrt(E) ** 2 != E:
            raise ValueError(
                f"ultramem_expansion (E) must be a perfect square (1, 4, 9, 16, ...), got {E}"
            )
        if self.ultramem_value_dim is None:
            self.ultramem_value_dim = self.hidden_size // 2
        Dv, h = self.ultramem_value_dim, self.ultramem_num_cores
        if not isinstance(Dv, int) or Dv < 1:
            raise ValueError(f"ultramem_value_dim (Dv) must be a positive integer, got {Dv!r}")
        if Dv % h != 0:
            raise ValueError(
                f"ultramem_value_dim (Dv={Dv}) must be divisible by ultramem_num_cores (h={h}): "
                f"allowed h are the divisors of {Dv}"
            )
        t, e = self.tensor_model_parallel_size, self.expert_model_parallel_size
        if Dv % (t * e):
            raise ValueError(
                f"ultramem_value_dim (Dv={Dv}) must be divisible by tensor_model_parallel_size x "
                f"expert_model_parallel_size = {t} x {e}: the table is column-sharded over TP x EP"
            )
        if (t * e) % h and h % (t * e):
            raise ValueError(
                f"ultramem_num_cores (h={h}) and tensor_model_parallel_size x "
                f"expert_model_parallel_size ({t * e}) must divide one another, so that each rank's "
                "value columns belong to whole Tucker-core slices"
            )
        etp = self.expert_tensor_parallel_size
        if etp is not None and etp != t:
            raise ValueError(
                f"expert_tensor_parallel_size ({etp}) must equal tensor_model_parallel_size ({t}) "
                "with UltraMem layers: the value table is split over TP x EP (leave it unset)"
            )
        n_side = self.ultramem_keys_per_side
        if self.ultramem_topm > n_side:
            raise ValueError(
                f"ultramem_topm (m={self.ultramem_topm}) must be <= keys per side of the virtual "
                f"grid n' = sqrt(E) * n = {n_side}: allowed 1..{n_side}"
            )
        for name in ("ultramem_aux_loss_alpha", "ultramem_aux_loss_tau", "ultramem_value_lr_mult",
                     "ultramem_value_lr_decay_rate"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.ultramem_aux_loss_alpha < 0:
            raise ValueError(
                f"ultramem_aux_loss_alpha must be >= 0, got {self.ultramem_aux_loss_alpha}"
            )
        if self.ultramem_aux_loss_tau < 0:
            raise ValueError(f"ultramem_aux_loss_tau must be >= 0, got {self.ultramem_aux_loss_tau}")
        if self.ultramem_value_lr_mult <= 0:
            raise ValueError(
                f"ultramem_value_lr_mult (rho0) must be > 0, got {self.ultramem_value_lr_mult}"
            )
        if self.ultramem_value_lr_decay_rate <= 0:
            raise ValueError(
                "ultramem_value_lr_decay_rate must be > 0, got "
                f"{self.ultramem_value_lr_decay_rate}"
            )
        self._validate_training_features()
        if self.ultramem_mode == "skip" and self.ultramem_layers != 1:
            raise ValueError(
                f"ultramem_layers={self.ultramem_layers!r} has no effect with ultramem_mode='skip', "
                "whose memories come from ultramem_skip_units: leave ultramem_layers at its default "
                "1, or use mode 'replace'/'parallel'"
            )
        if self.ultramem_mode != "skip" and self.ultramem_skip_units:
            raise ValueError(
                f"ultramem_skip_units={self.ultramem_skip_units!r} has no effect with ultramem_mode="
                f"{self.ultramem_mode!r}: allowed only with ultramem_mode='skip'"
            )
        if self.ultramem_mode == "skip":
            units = self.ultramem_skip_unit_list()
            if not units:
                raise ValueError("ultramem_skip_units must name at least one unit for mode 'skip'")
            self._validate_skip_units(units)
        else:
            self.ultramem_layer_pattern()

    def _validate_training_features(self) -> None:
        """Megatron features that would silently break a memory layer: refused with the flags."""
        modules = set(self.recompute_modules or []) if self.recompute_granularity == "selective" else set()
        fp8 = bool(getattr(self, "fp8", None) or getattr(self, "fp4", None))
        if fp8 and "layernorm" in modules:
            raise ValueError(
                "recompute_modules with 'layernorm' and fp8/fp4 cannot be combined with UltraMem "
                "layers: Megatron then marks the MLP slot's linear_fc1 to keep its fp8 input, and "
                "a memory slot has none; drop 'layernorm' from recompute_modules (allowed: 'mlp', "
                "'moe', 'core_attn', ...)"
            )
        chunks = getattr(self, "mlp_chunks_for_training", 1)
        if chunks > 1 and self.ultramem_aux_loss_alpha > 0:
            raise ValueError(
                f"mlp_chunks_for_training={chunks} calls the MLP slot once per chunk, and each call "
                "would add the Tucker aux loss again: use mlp_chunks_for_training=1 or "
                "ultramem_aux_loss_alpha=0"
            )

    def _validate_skip_units(self, units) -> None:
        """Skip units carry a tensor from block i to block j inside one forward pass of one stage."""
        if self.recompute_granularity == "full":
            raise ValueError(
                "ultramem_mode='skip' does not support recompute_granularity='full': a unit's "
                "output crosses layer boundaries; use 'selective' or None"
            )
        modules = set(self.recompute_modules or []) if self.recompute_granularity == "selective" else set()
        for name, why in (
            ("mlp", "block i's slot would run under no_grad, so the memory output sent to block j "
             "carries no gradient and the memory never trains"),
            ("layernorm", "block i's pre-MLP norm output is freed after its MLP and recomputed only "
             "in block i's backward, after block j's backward needs it"),
        ):  # fmt: skip
            if name in modules:
                raise ValueError(
                    f"ultramem_mode='skip' does not support recompute_modules containing {name!r}: "
                    f"{why}; use mode 'parallel' or 'replace', or drop {name!r}"
                )
        for flag in ("mlp_chunks_for_prefill", "mlp_chunks_for_training"):
            if getattr(self, flag, 1) > 1:
                raise ValueError(
                    f"ultramem_mode='skip' needs {flag}=1: a chunked MLP slot runs once per chunk "
                    "and a skip unit carries one memory output per forward pass"
                )
        if getattr(self, "cuda_graph_impl", "none") != "none" or getattr(self, "enable_cuda_graph", False):
            raise ValueError(
                "ultramem_mode='skip' cannot run under CUDA graphs (cuda_graph_impl / "
                "enable_cuda_graph): a captured layer does not run the Python hand-over of the "
                "unit's output; use cuda_graph_impl='none' or mode 'parallel'/'replace'"
            )
        stages = self.ultramem_layer_stages()
        for i, j in units:
            if stages[i] != stages[j]:
                raise ValueError(
                    f"ultramem_skip_units: unit {i}:{j} crosses a pipeline stage boundary: block "
                    f"{i} is in stage {_stage_name(stages[i])} and block {j} in stage "
                    f"{_stage_name(stages[j])} (pipeline_model_parallel_size="
                    f"{self.pipeline_model_parallel_size}); a unit must lie within one stage"
                )

    def ultramem_layer_stages(self) -> List[Tuple[int, int]]:
        """(pipeline rank, virtual stage) that builds each of the num_layers blocks."""
        from megatron.core.transformer.transformer_block import get_num_layers_to_build
        from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

        pp = self.pipeline_model_parallel_size
        vpp = self.virtual_pipeline_model_parallel_size or 1
        stages = [None] * self.num_layers
        if pp == 1 and vpp == 1:
            return [(0, 0)] * self.num_layers
        for rank in range(pp):
            for vp in range(vpp):
                vp_stage = vp if self.virtual_pipeline_model_parallel_size else None
                offset = get_transformer_layer_offset(self, vp_stage=vp_stage, pp_rank=rank)
                for k in range(get_num_layers_to_build(self, vp_stage=vp_stage, pp_rank=rank)):
                    stages[offset + k] = (rank, vp)
        return stages

    def ultramem_layer_pattern(self) -> List[int]:
        """The 0/1 per-layer pattern of `ultramem_layers` (modes 'replace' and 'parallel')."""
        return parse_layer_pattern(self.ultramem_layers, self.num_layers, "ultramem_layers")

    def ultramem_skip_unit_list(self) -> List[Tuple[int, int]]:
        """The (i, j) skip units, validated against num_layers."""
        return parse_skip_units(self.ultramem_skip_units, self.num_layers)


def ultramem_fields_of(config) -> Dict[str, object]:
    """{field: value} of every `ultramem_*` field of an UltraMemConfig."""
    return {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(UltraMemConfig)
        if f.name.startswith("ultramem_")
    }


_UPGRADED: Dict[int, tuple] = {}  # id(config) -> (config, fields, UltraMemConfig): one per config


def ensure_ultramem_config(config, ultramem: Optional[Dict[str, object]] = None) -> UltraMemConfig:
    """`config` as an UltraMemConfig with the given `ultramem_*` values.

    An UltraMemConfig without `ultramem` is returned as is. Otherwise a new UltraMemConfig is built
    from `config`'s TransformerConfig fields (any TransformerConfig subclass) and the values; its
    `__post_init__` validates them. The result is cached per config object, so all layers of a model
    share one config.
    """
    if ultramem is None:
        if isinstance(config, UltraMemConfig):
            return config
        raise TypeError(
            f"{type(config).__name__} has no ultramem_* fields and none were given: build the model "
            "with the UltraMem --spec (megatron_ultramem.megatron_lm) or pass an UltraMemConfig"
        )
    if isinstance(config, UltraMemConfig) and all(
        getattr(config, k) == v or (k == "ultramem_value_dim" and v is None)
        for k, v in ultramem.items()
    ):
        return config
    cached = _UPGRADED.get(id(config))
    if cached is not None and cached[0] is config and cached[1] == ultramem:
        return cached[2]
    kwargs = {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(UltraMemConfig)
        if f.init and not f.name.startswith("ultramem_") and hasattr(config, f.name)
    }
    upgraded = UltraMemConfig(**kwargs, **ultramem)
    _UPGRADED[id(config)] = (config, dict(ultramem), upgraded)
    return upgraded


def _stage_name(stage: Tuple[int, int]) -> str:
    rank, vp = stage
    return f"{rank}" if vp == 0 else f"{rank} (virtual stage {vp})"


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
