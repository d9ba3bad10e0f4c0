"""UltraMem in a Megatron-Core HybridModel (megatron-core 0.19+).

A HybridModel's layers come from a layer pattern of symbols ('*' attention, '-' dense MLP, 'E' MoE,
'M' Mamba, ...) over one HybridStackSubmodules spec with a slot per symbol. The UltraMem stack spec
keeps every slot of Megatron's and changes two:

- `moe_layer` ('E'):  mode 'replace' - a selected E layer's MoE is replaced by an UltraMemLayer.
- `mlp_layer` ('-'):  mode 'parallel' - a selected '-' layer runs an UltraMemLayer beside its dense
                      MLP on the same pre-MLP-normed input, outputs added (UltraMemV2).

"Selected" is `ultramem_layers` read over the whole pattern (layer i of the pattern, 0-based, as in
a GPT model), so `ultramem_layers=1` (the default) means every E layer (replace) or every '-' layer
(parallel); layers of other symbols are never touched. Mode 'skip' is refused (a unit would cross
Mamba/attention layers that have no MLP slot). Validation against a given pattern is
`validate_hybrid_pattern`.

Because HybridStack builds every layer of one symbol from the same spec, the choice is made per
layer when it is built: the two slots hold a `HybridMemorySlot` spec whose constructor reads the
layer's global number and the config, and returns either Megatron's own layer (unchosen) or a layer
whose MLP slot holds the memory. The memory is seeded by its global layer index, so the value
table is the same whatever the pipeline split.

Transformer Engine: with TE the base is Megatron's `hybrid_stack_spec`; without TE (CPU) an
equivalent stack of Megatron's local modules (`local_hybrid_stack_spec`). HybridStack's final norm
is TENorm whatever the spec: `cpu_compat` gives it a local norm on machines without TE.
"""

import copy
from typing import Dict, List, Optional

from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from . import compat
from .config import UltraMemConfig, ensure_ultramem_config
from .specs import (
    UltraMemSlot,
    UltraMemSlotSubmodules,
    _norm_impl,
    _unfused_mlp,
    _use_te,
    get_ultramem_module_spec,
)

MOE_SYMBOL, MLP_SYMBOL = "E", "-"
SLOT_OF_MODE = {"replace": MOE_SYMBOL, "parallel": MLP_SYMBOL}
"""Which pattern symbol a mode puts memories on."""


def _hybrid_modules():
    try:
        from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
    except ImportError as err:  # megatron-core < 0.19 has MambaModel/MambaStack instead
        raise ImportError(
            f"HybridModel needs megatron-core >= 0.19 (installed: {compat.megatron_core_version()}); "
            "use the GPT spec (megatron_ultramem.specs.get_ultramem_decoder_block_spec) here"
        ) from err
    return HybridStack, HybridStackSubmodules


def _check_mode(config: UltraMemConfig) -> None:
    if config.ultramem_mode not in SLOT_OF_MODE:
        raise ValueError(
            f"ultramem_mode={config.ultramem_mode!r} is not supported in a HybridModel; allowed: "
            "'replace' (memories replace the pattern's E layers) or 'parallel' (memories beside "
            "the dense MLP of its '-' layers)"
        )


def validate_hybrid_pattern(config: UltraMemConfig, hybrid_layer_pattern: str) -> List[int]:
    """Check `ultramem_*` against a hybrid layer pattern; returns the 0-based memory layers.

    The pattern's main part (before any '/' MTP part, '|' pipeline separators removed) must have
    `num_layers` symbols, and `ultramem_layers` must select at least one layer of the mode's symbol.
    """
    _check_mode(config)
    main = hybrid_layer_pattern.split("/")[0].replace("|", "")
    if len(main) != config.num_layers:
        raise ValueError(
            f"hybrid layer pattern {hybrid_layer_pattern!r} has {len(main)} layers but num_layers "
            f"is {config.num_layers}"
        )
    symbol = SLOT_OF_MODE[config.ultramem_mode]
    chosen = config.ultramem_layer_pattern()
    layers = [i for i, s in enumerate(main) if s == symbol and chosen[i]]
    if not layers:
        raise ValueError(
            f"ultramem_layers={config.ultramem_layers!r} with ultramem_mode="
            f"{config.ultramem_mode!r} selects no {symbol!r} layer of the hybrid pattern {main!r}: "
            f"mode {config.ultramem_mode!r} puts memories on the pattern's {symbol!r} layers"
        )
    return layers


class HybridMemorySlot:
    """Spec module of the `moe_layer` / `mlp_layer` slot: builds the layer HybridStack asks for.

    `HybridMemorySlot(config, submodules, layer_number=..., **kwargs)` returns Megatron's layer
    (`base_module` with `submodules`) when the layer is not chosen, else a layer of `memory_module`
    whose MLP slot holds the memory. It is a class only because build_module instantiates classes;
    `__new__` returns the built layer.
    """

    def __new__(
        cls,
        config,
        submodules,
        layer_number: int = 1,
        *args,
        symbol: str,
        base_module: type,
        memory_module: type,
        use_te: bool,
        ultramem_fields: Optional[Dict[str, object]] = None,
        **kwargs,
    ):
        um = ensure_ultramem_config(config, ultramem_fields)
        _check_mode(um)
        index = layer_number - 1  # HybridStack passes global 1-based numbers (offset included)
        pattern = um.ultramem_layer_pattern()
        if index >= len(pattern):
            raise ValueError(
                f"layer {index} of the hybrid pattern is beyond num_layers={um.num_layers}"
            )
        if SLOT_OF_MODE[um.ultramem_mode] != symbol or not pattern[index]:
            return build_module(
                ModuleSpec(module=base_module, submodules=submodules),
                config, layer_number=layer_number, *args, **kwargs,
            )  # fmt: skip
        memory = get_ultramem_module_spec(use_te, layer_index=index)
        sub = copy.copy(submodules)
        sub.pre_mlp_layernorm = _norm_impl(use_te)  # the memory reads the normed input on its own
        if symbol == MOE_SYMBOL:
            sub.mlp = memory
        else:
            sub.mlp = ModuleSpec(
                module=UltraMemSlot,
                submodules=UltraMemSlotSubmodules(mlp=_unfused_mlp(submodules.mlp, use_te), memory=memory),
            )
        return build_module(
            ModuleSpec(module=memory_module, submodules=sub), um, layer_number=layer_number,
            *args, **kwargs,
        )  # fmt: skip


def local_hybrid_stack_spec(num_experts: int = 8) -> ModuleSpec:
    """Megatron's hybrid stack slots for attention, '-' and 'E' layers built from the local (non-TE)
    GPT layer spec, for machines without Transformer Engine (Mamba/GDN/MLA slots are left out)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp
    from megatron.core.transformer.transformer_layer import MoETransformerLayer, TransformerLayer

    HybridStack, HybridStackSubmodules = _hybrid_modules()
    dense = get_gpt_layer_local_spec().submodules
    moe = get_gpt_layer_local_spec(num_experts=num_experts).submodules

    def only_attention(s):
        s = copy.deepcopy(s)
        s.pre_mlp_layernorm, s.mlp, s.mlp_bda = IdentityOp, IdentityOp, IdentityFuncOp
        return s

    def only_mlp(s):
        s = copy.deepcopy(s)
        s.input_layernorm, s.self_attention, s.self_attn_bda = IdentityOp, IdentityOp, IdentityFuncOp
        return s

    return ModuleSpec(
        module=HybridStack,
        submodules=HybridStackSubmodules(
            attention_layer=ModuleSpec(module=TransformerLayer, submodules=only_attention(dense)),
            mlp_layer=ModuleSpec(module=MLPLayer, submodules=only_mlp(dense)),
            moe_layer=ModuleSpec(module=MoETransformerLayer, submodules=only_mlp(moe)),
        ),
    )


def get_ultramem_hybrid_stack_spec(
    use_transformer_engine: Optional[bool] = None,
    ultramem_fields: Optional[Dict[str, object]] = None,
    base: Optional[ModuleSpec] = None,
) -> ModuleSpec:
    """HybridModel(hybrid_stack_spec=...) with UltraMem in the `moe_layer` and `mlp_layer` slots.

    Args:
        use_transformer_engine: None -> TE when it imports.
        ultramem_fields: `ultramem_*` values for a model built with a plain TransformerConfig
            (Megatron-LM); None when the model's config is an UltraMemConfig.
        base: the stack spec to start from (default: Megatron's `hybrid_stack_spec` with TE, else
            `local_hybrid_stack_spec()`).
    """
    use_te = _use_te(use_transformer_engine)
    if base is None:
        if use_te:
            from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec as base
        else:
            base = local_hybrid_stack_spec()
    from megatron.core.transformer.transformer_layer import TransformerLayer

    spec = copy.deepcopy(base)
    sub = spec.submodules
    for slot, symbol in (("moe_layer", MOE_SYMBOL), ("mlp_layer", MLP_SYMBOL)):
        layer = getattr(sub, slot)
        memory_module = TransformerLayer if symbol == MOE_SYMBOL else layer.module  # MLPLayer
        setattr(sub, slot, ModuleSpec(
            module=HybridMemorySlot,
            params=dict(symbol=symbol, base_module=layer.module, memory_module=memory_module,
                        use_te=use_te, ultramem_fields=ultramem_fields),
            submodules=layer.submodules,
        ))  # fmt: skip
    return spec
