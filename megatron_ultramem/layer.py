"""UltraMemLayer: one ultra-sparse memory layer in Megatron-Core's MLP slot.

forward(hidden_states [s, b, D]) -> (output [s, b, D], None), so it drops in where an MLP or MoELayer
goes. The two stages are public seams that the tests and the Triton kernels replace separately:

    retrieve(x [T, D])            -> virtual indices [T, H*m], per-core scores [T, H*m, h]
    aggregate(indices, scores)    -> [T, D]

Config fields read: every `ultramem_*` field of UltraMemConfig, plus hidden_size, num_layers,
params_dtype, and (through linear_out) the tensor-parallel settings.

Parameters (global shapes; `parallel.py` says how they are split over TP x EP ranks):
    query_weight  [2K, D]        replicated, tiny (like a MoE router)
    keys_row/col  [H, n', K, r]  replicated
    cores         [H, h, r, r]   replicated
    values        [N, Dv]        the only big tensor, column-sharded; tagged `is_ultramem_value`
    linear_out    [D, Dv*E]      column-sharded with the values; its input is the pooled values
                                 laid out Dv-major ([T, Dv, E] flattened) so that a Dv slice of the
                                 table maps to a contiguous shard of linear_out's input dim.
Buffers (saved in checkpoints): permutation [E*N] (IVE's fixed pi), tucker_u/v [H, r].
All of them are drawn from per-(layer, tensor, column) seeded streams, so every layout holds
exactly its slice of the same global tensors.
"""

import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from . import compat, parallel, reference
from .config import UltraMemConfig


@dataclass
class UltraMemSubmodules:
    """The pluggable parts: Transformer Engine's TERowParallelLinear when TE is installed, Megatron's
    RowParallelLinear otherwise."""

    linear_out: Union[ModuleSpec, type] = None


def _generator(seed: int, layer_index: int, salt: int) -> torch.Generator:
    # One stream per (layer, tensor): the init does not depend on construction order or on how many
    # ranks build the model, which is what resharding checkpoints and layout tests rely on.
    return torch.Generator().manual_seed(
        (seed * 1_000_003 + layer_index * 9_973 + salt) % (2**63 - 1)
    )


class UltraMemLayer(MegatronModule):
    """An UltraMem memory layer (TDQKR retrieval + IVE/MCS pooling + output projection)."""

    def __init__(
        self,
        config: UltraMemConfig,
        submodules: Optional[UltraMemSubmodules] = None,
        layer_index: int = 0,
        pg_collection=None,
        is_mtp_layer: bool = False,
        name: Optional[str] = None,
        **kwargs,
    ):
        super().__init__(config=config)
        if not isinstance(config, UltraMemConfig):
            raise TypeError(
                "UltraMemLayer needs an UltraMemConfig (TransformerConfig with ultramem_* fields), "
                f"got {type(config).__name__}"
            )
        c = config
        self.layer_index = layer_index
        self.layer_number = None  # set by TransformerLayer (1-based), used for logging
        self.D = c.hidden_size
        self.K = c.ultramem_key_dim
        self.H = c.ultramem_num_heads
        self.r = c.ultramem_tucker_rank
        self.h = c.ultramem_num_cores
        self.m = c.ultramem_topm
        self.E = c.ultramem_expansion
        self.n_side = c.ultramem_keys_per_side
        self.N = c.ultramem_num_values
        self.Dv = c.ultramem_value_dim
        self.layout = parallel.memory_layout(c, pg_collection)  # groups: pg_collection or mpu
        self.col_lo, self.col_hi = self.layout.columns(self.Dv)  # this rank's value columns
        self.core_lo, self.core_hi = self.layout.cores(self.Dv, self.h)
        dtype = c.params_dtype

        self.query_weight = torch.nn.Parameter(torch.empty(2 * self.K, self.D, dtype=dtype))
        self.query_norm_row = torch.nn.LayerNorm(self.K, dtype=dtype)
        self.query_norm_col = torch.nn.LayerNorm(self.K, dtype=dtype)
        self.key_norm_row = torch.nn.LayerNorm(self.K, dtype=dtype)
        self.key_norm_col = torch.nn.LayerNorm(self.K, dtype=dtype)
        key_shape = (self.H, self.n_side, self.K, self.r)
        self.keys_row = torch.nn.Parameter(torch.empty(key_shape, dtype=dtype))
        self.keys_col = torch.nn.Parameter(torch.empty(key_shape, dtype=dtype))
        self.cores = torch.nn.Parameter(torch.empty(self.H, self.h, self.r, self.r, dtype=dtype))
        self.values = torch.nn.Parameter(
            torch.empty(self.N, self.col_hi - self.col_lo, dtype=dtype)
        )  # [N, Dv / (t*e)]
        parallel.tag_value_parameter(self.values, self.layout)

        if submodules is None or submodules.linear_out is None:
            from megatron.core.tensor_parallel.layers import RowParallelLinear

            submodules = UltraMemSubmodules(linear_out=RowParallelLinear)
        # An "expert" linear: Megatron then leaves all communication to us (parallel.combine) and
        # tags the weight like the table. Its TP split divides the input by t; EP is folded in here.
        self.linear_out = build_module(
            submodules.linear_out,
            self.Dv * self.E // self.layout.ep_size,
            self.D,
            config=c,
            init_method=lambda w: None,  # filled by reset_parameters from our own seeded streams
            bias=False,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=True,
            tp_comm_buffer_name="ultramem_out",
        )
        assert self.linear_out.weight.shape[1] == (self.col_hi - self.col_lo) * self.E

        perm = torch.randperm(self.E * self.N, generator=_generator(c.ultramem_seed, layer_index, 0))
        self.register_buffer("permutation", perm)
        self.register_buffer("tucker_u", torch.zeros(self.H, self.r, dtype=dtype))
        self.register_buffer("tucker_v", torch.zeros(self.H, self.r, dtype=dtype))
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialize every memory parameter from the layer's seeded streams (see ultramem_init)."""
        c = self.config
        K, D, E, Dv = self.K, self.D, self.E, self.Dv

        def normal(shape, std, salt):
            return torch.randn(shape, generator=_generator(c.ultramem_seed, self.layer_index, salt)) * std

        def uniform(shape, salt):
            return torch.rand(shape, generator=_generator(c.ultramem_seed, self.layer_index, salt))

        if c.ultramem_init == "paper":
            # Variance matching: LN weights K^-1/4 on both sides make <q, k> unit-variance; cores of
            # unit Frobenius norm make each core's score unit-variance; then values with variance
            # E/(2 m H L) and Wo with variance 1/(E*Dv) give output variance ~ 1/(2L), like an MLP.
            ln_weight = K**-0.25
            q_std, key_std = 1.0 / math.sqrt(D), 1.0
            cores = uniform(self.cores.shape, 3)
            cores = cores / cores.flatten(-2).norm(dim=-1)[..., None, None]
            value_std = math.sqrt(E / (2.0 * self.m * self.H * c.num_layers))
        else:  # "reference": the public reference code's choices
            ln_weight = K**-0.33
            q_std = key_std = 1.0 / math.sqrt(K)
            cores = uniform(self.cores.shape, 3)
            value_std = 0.02
        out_std = 1.0 / math.sqrt(E * Dv)

        self.query_weight.copy_(normal(self.query_weight.shape, q_std, 1))
        self.keys_row.copy_(normal(self.keys_row.shape, key_std, 2))
        self.keys_col.copy_(normal(self.keys_col.shape, key_std, 4))
        self.cores.copy_(cores)
        for norm in (self.query_norm_row, self.query_norm_col, self.key_norm_row, self.key_norm_col):
            norm.weight.fill_(ln_weight)
            norm.bias.zero_()
        # Table and Wo: one stream per global value column, so any column shard is drawn alone.
        for j, col in enumerate(range(self.col_lo, self.col_hi)):
            self.values[:, j].copy_(normal((self.N,), value_std, 1000 + 2 * col))
            w = normal((D, E), out_std, 1001 + 2 * col)  # Wo's inputs for column col, all E blocks
            self.linear_out.weight[:, j * E : (j + 1) * E].copy_(w)
        self.tucker_u.zero_()
        self.refresh_tucker_vectors()

    def set_layer_number(self, layer_number: int) -> None:
        """Called by TransformerLayer after construction (1-based); used to label logged losses."""
        self.layer_number = layer_number

    # ------------------------------------------------------------------ once per optimizer step
    @torch.no_grad()
    def refresh_tucker_vectors(self) -> torch.Tensor:
        """Recompute the phase-1 preselection vectors from the summed core's SVD.

        Call once per optimizer step (after `optimizer.step()`); the sign of each pair is aligned with
        the previous one so selection does not flip between steps. Returns the singular values
        [H, r] of the summed cores (for logging).
        """
        u, v, s = reference.leading_singular_vectors(self.cores.sum(1), self.tucker_u)
        self.tucker_u.copy_(u)
        self.tucker_v.copy_(v)
        return s

    # ------------------------------------------------------------------ stages
    def _backend(self):
        impl = self.config.ultramem_impl
        if impl == "reference" or (impl == "auto" and not self.values.is_cuda):
            return None
        from . import kernels

        if not kernels.HAVE_TRITON:
            if impl == "triton":
                raise RuntimeError("ultramem_impl='triton' but triton is not importable")
            return None
        return kernels

    def normalized_keys(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """LayerNorm'd keys over K: two [H, n', K, r] tensors."""
        kr = self.key_norm_row(self.keys_row.transpose(-1, -2)).transpose(-1, -2)
        kc = self.key_norm_col(self.keys_col.transpose(-1, -2)).transpose(-1, -2)
        return kr, kc

    def row_col_scores(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Query projection + LN, then rank-r scores: x [T, D] -> S_row, S_col [T, H, n', r]."""
        q = F.linear(x, self.query_weight)  # [T, 2K]
        q_row = self.query_norm_row(q[:, : self.K])  # [T, K]
        q_col = self.query_norm_col(q[:, self.K :])  # [T, K]
        k_row, k_col = self.normalized_keys()
        return reference.row_col_scores(q_row, k_row), reference.row_col_scores(q_col, k_col)

    def retrieve(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """TDQKR: x [T, D] -> virtual indices [T, H*m] (int64) and per-core scores [T, H*m, h]."""
        T = x.shape[0]
        s_row, s_col = self.row_col_scores(x)  # [T, H, n', r] each
        kernels = self._backend()
        topm = kernels.tucker_topm_fused if kernels is not None else reference.tucker_topm
        virtual, scores = topm(s_row, s_col, self.cores, self.tucker_u, self.tucker_v, self.m)
        # virtual [T, H, m], scores [T, H, m, h]
        if self.config.ultramem_score_activation == "softmax":
            scores = torch.softmax(scores, dim=2)
        return virtual.reshape(T, self.H * self.m), scores.reshape(T, self.H * self.m, self.h)

    def pooled_values(self, virtual: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """IVE + MCS pooling of this rank's columns: [T', H*m], [T', H*m, h] -> [T', E, Dv_local]."""
        rows, blocks = reference.virtual_to_physical(virtual, self.permutation, self.N)
        scores = scores[..., self.core_lo : self.core_hi]  # the cores of this rank's columns
        kernels = self._backend()
        if kernels is None:
            return reference.weighted_gather_pool(rows, blocks, scores, self.values, self.E)
        return kernels.gather_pool(
            rows,
            blocks,
            scores,
            self.values,
            self.E,
            deterministic=self.config.ultramem_deterministic,
            # Megatron's gradient-accumulation fusion: the table's gradient goes straight into the
            # fp32 main_grad buffer instead of a dense [N, Dv] grad tensor.
            accumulate_into_main_grad=self.config.gradient_accumulation_fusion,
        )

    def aggregate(self, virtual: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Pool the selected values and project: [T, H*m], [T, H*m, h] -> [T, D] ([T/t, D] with
        sequence parallelism). Communication steps are parallel.py's."""
        scores = parallel.share_scores(scores, self.layout)
        virtual, scores = parallel.dispatch(virtual, scores, self.layout)  # [e*T, ...]
        pooled = self.pooled_values(virtual, scores)  # [e*T, E, Dv_local]
        flat = pooled.transpose(1, 2).reshape(pooled.shape[0], -1)  # [e*T, Dv_local*E], Dv-major
        out, _ = self.linear_out(flat)  # [e*T, D], partial over TP x EP shards
        return parallel.combine(out, self.layout)

    # ------------------------------------------------------------------ aux loss
    def tucker_aux_loss(self) -> torch.Tensor:
        """L_aux on the singular values of each head's summed core (differentiable)."""
        sv = torch.linalg.svdvals(self.cores.sum(1).float())  # [H, r]
        return reference.tucker_aux_loss(
            sv, self.config.ultramem_aux_loss_alpha, self.config.ultramem_aux_loss_tau
        )

    def _attach_aux_loss(self, output: torch.Tensor) -> torch.Tensor:
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        aux = self.tucker_aux_loss()
        if self.layer_number is not None:
            compat.record_aux_loss(
                "ultramem_tucker_loss", aux.detach(), self.layer_number, self.config.num_layers
            )
        # Identity in forward; in backward it injects d(aux)/d(cores), scaled like the main loss.
        return MoEAuxLossAutoScaler.apply(output, aux)

    # ------------------------------------------------------------------ checkpointing
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """Distributed-checkpoint view: the table and Wo as column shards of their global tensors
        (so a checkpoint saved at one TP x EP layout loads at another), everything else replicated.
        """
        from megatron.core.dist_checkpointing.mapping import ShardedTensor
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state = self.state_dict(prefix="", keep_vars=True)
        split = {"values": 1, "linear_out.weight": 1}  # name -> sharded axis
        sharded = make_sharded_tensors_for_checkpoint(
            {k: v for k, v in state.items() if k not in split}, prefix, {}, sharded_offsets
        )
        lay = self.layout
        for name, axis in split.items():
            key = f"{prefix}{name}"
            sharded[key] = ShardedTensor.from_rank_offsets(
                key,
                state[name],
                *sharded_offsets,
                (axis + len(sharded_offsets), lay.shard, lay.num_shards),
                replica_id=(0, 0, lay.edp_rank),  # copies differ only in expert-DP rank
                prepend_axis_num=len(sharded_offsets),
            )
        return sharded

    # ------------------------------------------------------------------ forward
    def forward(self, hidden_states: torch.Tensor, **kwargs) -> Tuple[torch.Tensor, None]:
        """[s, b, D] -> ([s, b, D], None); [s/t, b, D] in and out with sequence parallelism."""
        x = parallel.gather_input(hidden_states, self.layout)  # [s, b, D]
        s, b, D = x.shape
        virtual, scores = self.retrieve(x.reshape(s * b, D))  # replicated on every TP rank
        out = self.aggregate(virtual, scores).view(-1, b, D)  # [s (or s/t), b, D]
        if self.training and self.config.ultramem_aux_loss_alpha > 0 and torch.is_grad_enabled():
            out = self._attach_aux_loss(out)
        return out, None
