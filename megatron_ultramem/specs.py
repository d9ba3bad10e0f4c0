"""Layer specs that give a Megatron-Core GPT decoder UltraMem memory layers.

Three placements (UltraMemConfig.ultramem_mode):
- 'replace':  the chosen layers' MLP/MoE slot is an UltraMemLayer.
- 'parallel': the chosen layers' slot is an UltraMemSlot running the dense MLP and the memory on the
              same pre-MLP-normed input, outputs added (UltraMemV2; the drop-in for a MoE block).
- 'skip':     paper units "i:j": block i's slot runs its MLP and the memory on block i's pre-MLP norm
              output and sends the memory output through a SkipChannel; block j's slot adds it to
              its MLP output, which bias-dropout-add puts on the residual stream after block j.

Transformer Engine modules (TENorm, TERowParallelLinear, TEColumnParallelLinear) are used when TE
imports and `use_transformer_engine` is not False; Megatron's local modules otherwise.
"""

import copy
from dataclasses import dataclass
from typing import List, Optional, Union

import torch

from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from . import compat
from .config import UltraMemConfig
from .layer import UltraMemLayer, UltraMemSubmodules

HAVE_TE = gpt_layer_specs.HAVE_TE


def _child(name: Optional[str], child: str) -> Optional[str]:
    return f"{name}.{child}" if name is not None else None


class SkipChannel:
    """Carries one skip unit's memory output from block i to block j within one forward pass.

    The spec builder makes one channel per unit and hands the same object to both ends; deepcopy
    returns the object itself because it is a rendezvous point, not state to duplicate (Megatron
    copies specs while building).
    """

    def __init__(self, source: int, sink: int):
        self.source, self.sink = source, sink
        self._tensor = None

    def __deepcopy__(self, memo):
        return self

    def put(self, tensor: torch.Tensor) -> None:
        self._tensor = tensor

    def take(self) -> torch.Tensor:
        if self._tensor is None:
            raise RuntimeError(
                f"UltraMem skip unit {self.source}:{self.sink}: block {self.sink} ran before block "
                f"{self.source} produced the memory output (pipeline split or reordered layers?)"
            )
        tensor, self._tensor = self._tensor, None
        return tensor

    def __repr__(self):
        return f"SkipChannel({self.source}:{self.sink})"


@dataclass
class UltraMemSlotSubmodules:
    """mlp: the dense MLP spec (or None); memory: an UltraMemLayer spec (or None)."""

    mlp: Optional[Union[ModuleSpec, type]] = None
    memory: Optional[Union[ModuleSpec, type]] = None


class UltraMemSlot(MegatronModule):
    """MLP slot running a dense MLP and/or a memory, with optional skip-channel send/receive.

    output = mlp(x) [+ mlp bias] [+ memory(x) unless sent to a later block] [+ received memories]
    """

    def __init__(
        self,
        config: UltraMemConfig,
        submodules: UltraMemSlotSubmodules,
        send: Optional[SkipChannel] = None,
        receive: Optional[List[SkipChannel]] = None,
        pg_collection=None,
        is_mtp_layer: bool = False,
        name: Optional[str] = None,
        **kwargs,
    ):
        super().__init__(config=config)
        # 0.18+ pass pg_collection; earlier releases only config (groups then come from mpu).
        self.mlp = (
            compat.build_mlp(submodules.mlp, config, pg_collection, is_mtp_layer, _child(name, "mlp"))
            if submodules.mlp is not None
            else None
        )
        self.memory = (
            build_module(submodules.memory, config=config, pg_collection=pg_collection)
            if submodules.memory is not None
            else None
        )
        self.send = send
        self.receive = list(receive or [])

    def set_layer_number(self, layer_number: int) -> None:
        if self.memory is not None:
            self.memory.set_layer_number(layer_number)

    def forward(self, hidden_states: torch.Tensor, **kwargs):
        """[s, b, D] -> ([s, b, D], None)."""
        out = None
        if self.mlp is not None:
            out, bias = self.mlp(hidden_states)
            if bias is not None:
                out = out + bias
        if self.memory is not None:
            mem, _ = self.memory(hidden_states)
            if self.send is not None:
                self.send.put(mem)
            else:
                out = mem if out is None else out + mem
        for channel in self.receive:
            out = out + channel.take()
        return out, None


# ---------------------------------------------------------------------- backend choices
def _use_te(use_transformer_engine: Optional[bool]) -> bool:
    if use_transformer_engine is None:
        return HAVE_TE
    if use_transformer_engine and not HAVE_TE:
        raise ImportError(
            "use_transformer_engine=True but transformer_engine is not importable: install "
            "megatron-ultramem[te] on a CUDA machine, or pass use_transformer_engine=False"
        )
    return use_transformer_engine


def _norm_impl(use_te: bool):
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return gpt_layer_specs.LNImpl


def get_ultramem_module_spec(use_transformer_engine: Optional[bool] = None, layer_index: int = 0):
    """ModuleSpec of one UltraMemLayer (TERowParallelLinear output projection when TE is used)."""
    if _use_te(use_transformer_engine):
        from megatron.core.extensions.transformer_engine import TERowParallelLinear as RowLinear
    else:
        from megatron.core.tensor_parallel.layers import RowParallelLinear as RowLinear
    return ModuleSpec(
        module=UltraMemLayer,
        params={"layer_index": layer_index},
        submodules=UltraMemSubmodules(linear_out=RowLinear),
    )


def _unfused_mlp(mlp_spec, use_te: bool):
    """The dense MLP spec (ModuleSpec or 0.18+ builder) with its LayerNorm split out: TE fuses it
    into linear_fc1, and the memory needs the normed input on its own."""
    spec = copy.deepcopy(mlp_spec)
    if use_te:
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear

        sub = copy.copy(compat.mlp_spec_submodules(spec))
        sub.linear_fc1 = TEColumnParallelLinear
        spec = compat.with_mlp_submodules(spec, sub)
    return spec


def _is_moe(layer_spec: ModuleSpec) -> bool:
    from megatron.core.transformer.moe.moe_layer import MoELayer

    cls = compat.mlp_spec_class(layer_spec.submodules.mlp)
    return cls is not None and issubclass(cls, MoELayer)


def _with_slot(layer_spec: ModuleSpec, slot_spec, use_te: bool) -> ModuleSpec:
    spec = copy.deepcopy(layer_spec)
    sub = spec.submodules
    sub.mlp = slot_spec
    # The memory needs the normed input on its own: an explicit pre-MLP norm replaces TE's fused one.
    sub.pre_mlp_layernorm = _norm_impl(use_te)
    keys_map = dict(sub.sharded_state_dict_keys_map or {})
    keys_map = {k: v for k, v in keys_map.items() if not k.startswith(("pre_mlp_layernorm", "mlp."))}
    sub.sharded_state_dict_keys_map = keys_map
    return spec


def get_ultramem_layer_specs(
    config: UltraMemConfig,
    use_transformer_engine: Optional[bool] = None,
    normalization: Optional[str] = None,
    qk_l2_norm: bool = False,
) -> List[ModuleSpec]:
    """Per-layer specs for all `config.num_layers` layers (before pipeline slicing)."""
    if not isinstance(config, UltraMemConfig):
        raise TypeError("get_ultramem_layer_specs needs an UltraMemConfig")
    use_te = _use_te(use_transformer_engine)
    base = gpt_layer_specs.get_gpt_decoder_layer_specs(
        config, use_te, normalization=normalization, qk_l2_norm=qk_l2_norm
    )
    specs = list(base)
    mode = config.ultramem_mode

    def memory(i):
        return get_ultramem_module_spec(use_te, layer_index=i)

    def dense_mlp(i):
        if _is_moe(base[i]):
            raise ValueError(
                f"layer {i} is a MoE layer (num_moe_experts/moe_layer_freq) and is also chosen for "
                f"an UltraMem memory in mode '{mode}': a memory runs beside a dense MLP; use "
                "ultramem_mode='replace' to swap the MoE for a memory, or deselect the layer"
            )
        return _unfused_mlp(base[i].submodules.mlp, use_te)

    if mode in ("replace", "parallel"):
        for i, chosen in enumerate(config.ultramem_layer_pattern()):
            if not chosen:
                continue
            if mode == "replace":
                specs[i] = _with_slot(base[i], memory(i), use_te)
            else:
                slot = ModuleSpec(
                    module=UltraMemSlot,
                    submodules=UltraMemSlotSubmodules(mlp=dense_mlp(i), memory=memory(i)),
                )
                specs[i] = _with_slot(base[i], slot, use_te)
    else:  # skip
        units = config.ultramem_skip_unit_list()
        sends, receives = {}, {}
        for i, j in units:
            channel = SkipChannel(i, j) if j > i else None
            sends[i] = channel
            if channel is not None:
                receives.setdefault(j, []).append(channel)
        for i in sorted(set(sends) | set(receives)):
            slot = ModuleSpec(
                module=UltraMemSlot,
                params={"send": sends.get(i), "receive": receives.get(i, [])},
                submodules=UltraMemSlotSubmodules(
                    mlp=dense_mlp(i), memory=memory(i) if i in sends else None
                ),
            )
            specs[i] = _with_slot(base[i], slot, use_te)
    return specs


def get_ultramem_decoder_block_spec(
    config: UltraMemConfig,
    use_transformer_engine: Optional[bool] = None,
    normalization: Optional[str] = None,
    qk_l2_norm: bool = False,
    vp_stage: Optional[int] = None,
    pp_rank: Optional[int] = None,
) -> TransformerBlockSubmodules:
    """Block spec for GPTModel(transformer_layer_spec=...), sliced for this pipeline stage.

    Like Megatron's `get_gpt_decoder_block_spec`, with UltraMem placed per `config.ultramem_mode`.
    """
    use_te = _use_te(use_transformer_engine)
    layer_specs = get_ultramem_layer_specs(config, use_te, normalization, qk_l2_norm)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    num = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(
        layer_specs=layer_specs[offset : offset + num], layer_norm=_norm_impl(use_te)
    )
