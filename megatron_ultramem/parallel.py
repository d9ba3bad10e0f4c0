"""How an UltraMem layer is split over tensor-parallel (TP) and expert-parallel (EP) ranks.

The value table V [N, Dv] is the layer's bulk. It is **column-sharded**: the t*e ranks of one
TP x EP block each own Dv/(t*e) columns of every row (shard s = ep_rank * t + tp_rank), together
with the matching contiguous input columns of the output projection Wo (its input is laid out
Dv-major, see layer.py). Retrieval (query, keys, cores: a few MB) is replicated and computed on
every rank, so a token's selected rows are known everywhere without communication.

Replicated parameters: `tag_replicated_parameters` has Megatron average their gradients over TP
once per step (finalize_model_grads), so the copies never drift apart.

Order of application in forward (each step a function below; backward runs them in reverse):
 1. gather_input    (SP only)  all-gather the sequence over TP; backward: keep own slice (the
                    input gradient is already complete on every TP rank after step 2).
 2. share_scores    (TP > 1)   identity; backward: all-reduce the score gradient over TP (each
                    rank's pooling only sees its own Dv columns).
 3. dispatch        (EP > 1)   all-gather indices [T, H*m] and scores [T, H*m, h] over EP, so each
                    EP rank pools its columns for the whole EP group's tokens; backward:
                    reduce-scatter of the score gradient.
 4. (local)         pool own columns -> [e*T, E, Dv/(t*e)], project with own Wo columns -> [e*T, D]
 5. combine         reduce-scatter the partial outputs over EP (back to the tokens' owners), then
                    all-reduce over TP, or reduce-scatter over TP with sequence parallelism.

Bytes communicated per token per layer (b = bytes per activation element, M = H*m):
  column sharding (this module):
    TP: forward all-reduce of D (as a dense MLP's fc2);  backward all-reduce of M*h scores.
    SP: forward all-gather D + reduce-scatter D;         backward all-gather D + all-reduce M*h.
    EP: forward all-gather M*(8 + h*b) + reduce-scatter D; backward the transposes.
        A MoE layer's all-gather dispatcher moves D (all-gather) + D (reduce-scatter) per token,
        so UltraMem's dispatch is cheaper whenever M*(8 + h*b) < D*b (e.g. M=64, h=2, bf16:
        768 B vs 8 KiB at D=4096).
  row sharding (VocabParallelEmbedding style, not implemented): each rank pools the rows it owns
    and the partial pooled values [E, Dv] are all-reduced: E*Dv = 2D per token for E=4, Dv=D/2,
    twice column sharding's D, hence column sharding is the default and only mode.

Constraints (checked in UltraMemConfig): Dv % (t*e) == 0, and the h multi-core slices must not
straddle shards unevenly: (t*e) % h == 0 or h % (t*e) == 0. Expert tensor parallelism must equal
tensor parallelism. All EP ranks must see micro-batches of the same shape.
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)

from . import compat


@dataclass(frozen=True)
class MemoryLayout:
    """Where this rank sits in the TP x EP split of one memory layer's table."""

    tp_size: int = 1
    tp_rank: int = 0
    ep_size: int = 1
    ep_rank: int = 0
    edp_rank: int = 0
    sequence_parallel: bool = False
    tp_group: Optional[object] = None
    ep_group: Optional[object] = None

    @property
    def num_shards(self) -> int:
        return self.tp_size * self.ep_size

    @property
    def shard(self) -> int:
        return self.ep_rank * self.tp_size + self.tp_rank

    def columns(self, Dv: int) -> Tuple[int, int]:
        """[c0, c1): this rank's value columns."""
        width = Dv // self.num_shards
        return self.shard * width, (self.shard + 1) * width

    def cores(self, Dv: int, h: int) -> Tuple[int, int]:
        """[k0, k1): the Tucker cores whose Dv slices this rank's columns belong to."""
        c0, c1 = self.columns(Dv)
        per_core = Dv // h
        return c0 // per_core, max(c0 // per_core + 1, c1 // per_core)


def memory_layout(config, pg_collection=None) -> MemoryLayout:
    """The layout from `pg_collection` (megatron-core 0.18+ pass one to MLP-slot modules) or from
    Megatron's parallel_state; a single-rank layout when neither is set up."""
    groups = compat.process_groups(pg_collection)
    if groups is None:
        return MemoryLayout(sequence_parallel=False)
    tp_group, ep_group, edp_group = groups
    return MemoryLayout(
        tp_size=tp_group.size(),
        tp_rank=tp_group.rank(),
        ep_size=ep_group.size(),
        ep_rank=ep_group.rank(),
        edp_rank=edp_group.rank() if edp_group is not None else 0,
        sequence_parallel=bool(config.sequence_parallel) and tp_group.size() > 1,
        tp_group=tp_group,
        ep_group=ep_group,
    )


def tag_value_parameter(param: torch.nn.Parameter, layout: MemoryLayout) -> None:
    """Tag the table shard the way Megatron tags expert/TP params (read by DDP, grad norm, ckpt)."""
    param.is_ultramem_value = True
    # An embedding-like table (each step updates few rows): Megatron's Muon / layer-wise optimizer
    # (megatron-core 0.20+) must leave it to its scalar optimizer (Adam) instead of orthogonalizing
    # its update. Older releases do not read the tag: the Megatron-LM flags refuse Muon there.
    param.use_muon = False
    param.tensor_model_parallel = layout.tp_size > 1
    param.partition_dim = 1
    param.partition_stride = 1
    # DDP: allreduce=False means "expert param": gradients are reduced over the
    # expert-data-parallel group only, since each EP rank owns different columns.
    param.allreduce = layout.ep_size == 1


def tag_replicated_parameters(params, layout: MemoryLayout) -> None:
    """Keep the replicated retrieval parameters (query, keys, cores, their LayerNorms) bitwise
    identical on the TP ranks.

    Every TP rank computes the same retrieval, so their gradients agree mathematically, but not
    always bit for bit (atomics in GPU index/scatter backward kernels); a copy that drifts by one
    ulp per step eventually selects other rows than its peers, while each rank pools only its own
    columns. Megatron's finalize_model_grads averages the gradients of parameters tagged
    `average_gradients_across_tp_domain` over the TP group once per step (an all-reduce leaves the
    same bits on every rank), so the optimizer sees identical gradients everywhere.
    """
    if layout.tp_size == 1:
        return
    for param in params:
        param.average_gradients_across_tp_domain = True


# ---------------------------------------------------------------------- communication steps
def gather_input(x: torch.Tensor, layout: MemoryLayout) -> torch.Tensor:
    """Step 1 (sequence parallel): [s/t, b, D] -> [s, b, D]."""
    if not layout.sequence_parallel:
        return x
    return gather_from_sequence_parallel_region(
        x, tensor_parallel_output_grad=False, group=layout.tp_group
    )


def share_scores(scores: torch.Tensor, layout: MemoryLayout) -> torch.Tensor:
    """Step 2: identity; backward all-reduces the partial score gradient over TP."""
    if layout.tp_size == 1:
        return scores
    return copy_to_tensor_model_parallel_region(scores, group=layout.tp_group)


def _all_gather_rows(t: torch.Tensor, group) -> torch.Tensor:
    out = torch.empty((group.size() * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    torch.distributed.all_gather_into_tensor(out, t.contiguous(), group=group)
    return out


def dispatch(
    virtual: torch.Tensor, scores: torch.Tensor, layout: MemoryLayout
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Step 3: [T, M] indices and [T, M, h] scores -> the EP group's [e*T, M], [e*T, M, h]."""
    if layout.ep_size == 1:
        return virtual, scores
    virtual = _all_gather_rows(virtual, layout.ep_group)  # no gradient: integers
    scores = gather_from_sequence_parallel_region(
        scores, tensor_parallel_output_grad=True, group=layout.ep_group
    )
    return virtual, scores


def combine(out: torch.Tensor, layout: MemoryLayout) -> torch.Tensor:
    """Step 5: partial outputs [e*T, D] -> [T, D] (or [T/t, D] with sequence parallelism)."""
    if layout.ep_size > 1:
        out = reduce_scatter_to_sequence_parallel_region(out, group=layout.ep_group)
    if layout.tp_size > 1:
        if layout.sequence_parallel:
            out = reduce_scatter_to_sequence_parallel_region(out, group=layout.tp_group)
        else:
            out = reduce_from_tensor_model_parallel_region(out, group=layout.tp_group)
    return out
