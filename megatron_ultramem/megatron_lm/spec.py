"""The object behind `--spec megatron_ultramem.megatron_lm ultramem_block_spec`.

Megatron-LM resolves `--spec MODULE NAME` with `__import__(MODULE, fromlist=[NAME])` and
`vars(module)[NAME]`; the package's `__getattr__` creates one `UltraMemBlockSpec` and stores it in the
package globals, so that lookup finds it. The object serves both ways Megatron-LM uses a spec:

- megatron-core 0.16-0.18 (`gpt_builders.gpt_builder`): the object itself goes to GPTModel as a
  block spec. It is a `TransformerBlockSubmodules`; its `layer_specs` / `layer_norm` are built on
  first access from `megatron.training.get_args()` (the model is built after the arguments are
  parsed and the parallel state is set up) for this pipeline stage.
- 0.19 (`GPTModelConfig.transformer_layer_spec`): a callable that is not a ModuleSpec is called as
  `spec(model_config, vp_stage=...)`; `__call__` builds the block spec for that stage from
  `model_config.transformer` (and the parsed `--ultramem-*` flags).

Both honour `--transformer-impl transformer_engine|local`, `--normalization` and `--qk-l2-norm`.

Megatron-LM builds GPTModel with a plain TransformerConfig (`core_transformer_config_from_args(args)`
without `config_class`), and TransformerLayer hands that config to the MLP slot. The memory modules
need an UltraMemConfig, so the spec swaps them for thin subclasses (`UltraMemLayerFromArgs`,
`UltraMemSlotFromArgs`) that rebuild the config they are given as an UltraMemConfig with the
`ultramem_*` values carried in the spec's params.

Limitation: in the 0.16-0.18 object form one object serves every virtual pipeline stage and cannot
know which one is being built, so `--num-layers-per-virtual-pipeline-stage` /
`--num-virtual-stages-per-pipeline-rank` are refused there (the 0.19 callable form gets vp_stage).
"""

import copy
import dataclasses
from typing import Callable, Dict, Optional

from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from ..config import UltraMemConfig, ensure_ultramem_config, ultramem_fields_of
from ..layer import UltraMemLayer
from ..specs import UltraMemSlot, get_ultramem_decoder_block_spec
from .arguments import SPEC_FLAG, ultramem_fields_from_args, validate_ultramem_args

_args_provider: Optional[Callable] = None


def set_args_provider(provider: Optional[Callable]) -> Optional[Callable]:
    """Where the spec reads the parsed arguments: None means `megatron.training.get_args`.

    For callers without Megatron-LM's global args (tests, custom launchers). Returns the previous
    provider so a caller can restore it.
    """
    global _args_provider
    previous, _args_provider = _args_provider, provider
    return previous


def get_args():
    """The parsed Megatron-LM arguments (see `set_args_provider`)."""
    if _args_provider is not None:
        return _args_provider()
    from megatron.training import get_args as megatron_get_args

    return megatron_get_args()


# ---------------------------------------------------------------------- config
def _config_from_namespace(args) -> UltraMemConfig:
    """Fallback without Megatron-LM: copy args named like UltraMemConfig fields (what
    `core_transformer_config_from_args` does first), plus --num-experts -> num_moe_experts."""
    import torch.nn.functional as F

    kwargs = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(UltraMemConfig)
        if f.init and hasattr(args, f.name)
    }
    kwargs["num_moe_experts"] = getattr(args, "num_experts", None)
    if getattr(args, "swiglu", False):
        kwargs["activation_func"], kwargs["gated_linear_unit"] = F.silu, True
    return UltraMemConfig(**kwargs)


def ultramem_config_from_args(args) -> UltraMemConfig:
    """The UltraMemConfig Megatron-LM's arguments describe.

    Uses Megatron-LM's `core_transformer_config_from_args(args, config_class=UltraMemConfig)` when
    importable (it may pick another config class, e.g. for MLA; the ultramem_* values are then added
    by `ensure_ultramem_config`), else `_config_from_namespace`.
    """
    try:
        from megatron.training.arguments import core_transformer_config_from_args
    except ImportError:
        return ensure_ultramem_config(_config_from_namespace(args), ultramem_fields_from_args(args))
    base = core_transformer_config_from_args(args, config_class=UltraMemConfig)
    return ensure_ultramem_config(base, ultramem_fields_from_args(args))


# ---------------------------------------------------------------------- modules that take any config
class _UpgradesConfig:
    """Mixin: turn the TransformerConfig that TransformerLayer passes into an UltraMemConfig."""

    def __init__(self, config, *args, ultramem_fields=None, mixed_layers=False, **kwargs):
        if mixed_layers:
            # Memory in only some layers: the block's layers are not identical, so its sharded
            # state dict must not stack them (TransformerBlock reads this flag of the block config,
            # which is the object passed here).
            config.hetereogenous_dist_checkpoint = True
        super().__init__(ensure_ultramem_config(config, ultramem_fields), *args, **kwargs)


class UltraMemLayerFromArgs(_UpgradesConfig, UltraMemLayer):
    """UltraMemLayer for a model built with a plain TransformerConfig (Megatron-LM)."""


class UltraMemSlotFromArgs(_UpgradesConfig, UltraMemSlot):
    """UltraMemSlot for a model built with a plain TransformerConfig (Megatron-LM)."""


_ADAPTERS = {UltraMemLayer: UltraMemLayerFromArgs, UltraMemSlot: UltraMemSlotFromArgs}


def bind_ultramem_config(
    block: TransformerBlockSubmodules, config: UltraMemConfig
) -> TransformerBlockSubmodules:
    """A copy of `block` whose memory modules accept any TransformerConfig (see module doc)."""
    fields = ultramem_fields_of(config)
    pattern = _memory_pattern(config)
    mixed = 0 < sum(pattern) < len(pattern)
    layer_specs = []
    for spec in block.layer_specs:
        mlp = getattr(getattr(spec, "submodules", None), "mlp", None)
        if isinstance(mlp, ModuleSpec) and mlp.module in _ADAPTERS:
            spec = copy.copy(spec)
            spec.submodules = copy.copy(spec.submodules)
            spec.submodules.mlp = ModuleSpec(
                module=_ADAPTERS[mlp.module],
                params={**mlp.params, "ultramem_fields": fields, "mixed_layers": mixed},
                submodules=mlp.submodules,
            )
        layer_specs.append(spec)
    return TransformerBlockSubmodules(layer_specs=layer_specs, layer_norm=block.layer_norm)


def _memory_pattern(config: UltraMemConfig):
    if config.ultramem_mode == "skip":
        units = config.ultramem_skip_unit_list()
        touched = {i for i, _ in units} | {j for _, j in units}
        return [1 if i in touched else 0 for i in range(config.num_layers)]
    return config.ultramem_layer_pattern()


# ---------------------------------------------------------------------- the spec object
def _use_te(transformer_impl: str) -> bool:
    if transformer_impl not in ("transformer_engine", "local"):
        raise ValueError(
            f"--transformer-impl {transformer_impl} is not supported with {SPEC_FLAG}; allowed: "
            "transformer_engine, local"
        )
    return transformer_impl == "transformer_engine"


def build_block_spec(
    config: UltraMemConfig,
    transformer_impl: str,
    normalization: Optional[str] = None,
    qk_l2_norm: bool = False,
    vp_stage: Optional[int] = None,
    pp_rank: Optional[int] = None,
) -> TransformerBlockSubmodules:
    """Block spec for this pipeline stage, with memory modules that take Megatron-LM's config."""
    if pp_rank is None and config.pipeline_model_parallel_size == 1:
        pp_rank = 0  # no parallel state needed for a single stage
    block = get_ultramem_decoder_block_spec(
        config,
        use_transformer_engine=_use_te(transformer_impl),
        normalization=normalization,
        qk_l2_norm=qk_l2_norm,
        vp_stage=vp_stage,
        pp_rank=pp_rank,
    )
    return bind_ultramem_config(block, config)


def block_spec_from_args(args) -> TransformerBlockSubmodules:
    """The block spec for this pipeline stage from parsed Megatron-LM arguments (object form)."""
    validate_ultramem_args(args)
    vpp = getattr(args, "virtual_pipeline_model_parallel_size", None)
    if vpp is not None and vpp > 1:
        raise ValueError(
            f"{SPEC_FLAG} with virtual pipeline stages (virtual_pipeline_model_parallel_size={vpp}): "
            "megatron-core 0.16-0.18 use one spec object for every virtual stage, so the stage "
            "cannot be told apart; use megatron-core >= 0.19 (callable spec) or drop "
            "--num-layers-per-virtual-pipeline-stage / --num-virtual-stages-per-pipeline-rank"
        )
    config = ultramem_config_from_args(args)
    return build_block_spec(
        config,
        getattr(args, "transformer_impl", "transformer_engine"),
        normalization=getattr(args, "normalization", None),
        qk_l2_norm=bool(getattr(args, "qk_l2_norm", False)),
    )


class UltraMemBlockSpec(TransformerBlockSubmodules):
    """`--spec` object: a lazily built TransformerBlockSubmodules that is also a spec callable.

    Object form (0.16-0.18): `layer_specs` / `layer_norm` are built from the parsed arguments on
    first access and kept. Callable form (0.19): `spec(model_config, vp_stage=None)` returns a fresh
    TransformerBlockSubmodules for that stage.
    """

    def __init__(self):  # no dataclass fields: both are computed
        self._built: Optional[TransformerBlockSubmodules] = None

    def _block(self) -> TransformerBlockSubmodules:
        if self._built is None:
            self._built = block_spec_from_args(get_args())
        return self._built

    @property
    def layer_specs(self):
        return self._block().layer_specs

    @layer_specs.setter
    def layer_specs(self, value):
        self._block().layer_specs = value

    @property
    def layer_norm(self):
        return self._block().layer_norm

    @layer_norm.setter
    def layer_norm(self, value):
        self._block().layer_norm = value

    def __call__(self, model_config, vp_stage: Optional[int] = None) -> TransformerBlockSubmodules:
        config = getattr(model_config, "transformer", model_config)
        if isinstance(config, UltraMemConfig):
            um_config = config
        else:
            args = get_args()
            validate_ultramem_args(args)
            um_config = ensure_ultramem_config(config, ultramem_fields_from_args(args))
        return build_block_spec(
            um_config,
            getattr(um_config, "transformer_impl", "transformer_engine"),
            normalization=getattr(um_config, "normalization", None),
            qk_l2_norm=bool(getattr(um_config, "qk_l2_norm", False)),
            vp_stage=vp_stage,
        )

    def reset(self) -> None:
        """Forget the block built from the arguments (tests; a new run in the same process)."""
        self._built = None

    def __repr__(self):
        state = "built" if self._built is not None else "not built yet"
        return f"UltraMemBlockSpec({state}; {SPEC_FLAG})"

    def __eq__(self, other):
        return self is other

    __hash__ = object.__hash__


# ---------------------------------------------------------------------- HybridModel (0.19+)
def hybrid_stack_spec_from_args(args):
    """`--spec megatron_ultramem.megatron_lm ultramem_hybrid_stack_spec`: the HybridStack spec for
    pretrain_hybrid.py (`hybrid_config_from_args` uses the object itself as `hybrid_stack_spec`).

    One static ModuleSpec for every pipeline stage: its memory slots choose per layer when built
    (hybrid.HybridMemorySlot), reading the `--ultramem-*` values carried in the spec.
    """
    from ..hybrid import get_ultramem_hybrid_stack_spec

    validate_ultramem_args(args)
    return get_ultramem_hybrid_stack_spec(
        use_transformer_engine=_use_te(getattr(args, "transformer_impl", "transformer_engine")),
        ultramem_fields=ultramem_fields_from_args(args),
    )
