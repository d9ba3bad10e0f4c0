"""UltraMemLayer: one ultra-sparse memory layer in Megatron-Core's MLP slot.

forward(hidden_states [s, b, D]) -> (output [s, b, D], None), so it drops in where an MLP or MoELayer
goes. The two stages are public seams that the tests and the Triton kernels replace separately:

    retrieve(x [T, D])            -> virtual indices [T, H*m], per-core scores [T, H*m, h]
    aggregate(indices, scores)    -> [T, D]

Config fields read: every `ultramem_*` field of UltraMemConfig, plus hidden_size, num_layers,
params_dtype, perform_initialization, use_cpu_initialization, init_model_with_meta_device, and
(through linear_out) the tensor-parallel settings. Backends: ultramem_impl='auto' runs the Triton
kernels on CUDA and cpu_path.py on the CPU; 'reference' runs reference.py's oracle everywhere.

Parameters (global shapes; `parallel.py` says how they are split over TP x EP ranks):
    query_weight  [2K, D]        replicated, tiny (like a MoE router)
    keys_row/col  [H, n', K, r]  replicated
    cores         [H, h, r, r]   replicated
    values        [N, Dv]        the only big tensor, column-sharded; tagged `is_ultramem_value`
    linear_out    [D, Dv*E]      column-sharded with the values; its input is the pooled values
                                 laid out Dv-major ([T, Dv, E] flattened) so that a Dv slice of the
                                 table maps to a contiguous shard of linear_out's input dim.
Buffers (saved in checkpoints): permutation [E*N] int32 (IVE's fixed pi; int64 beyond 2^31
entries), tucker_u/v [H, r].
Parameters are drawn on their own device from a counter-based hash of (seed, layer, tensor,
global row, global column), pi from a per-layer torch.Generator stream, so every layout holds
exactly its slice of the same global tensors.
"""

import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from . import aux_loss, compat, cpu_path, parallel, reference
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


# ---------------------------------------------------------------------- counter-based init RNG
# Parameters are drawn from a hash of (seed, layer, tensor, global row, global column): element
# (i, j) of a tensor's global [rows, columns] view is the same number whichever rank draws it, on
# whichever device, in whichever order, so a TP x EP layout holds exactly its column slice of the
# single-rank tensors, and a shard is drawn on its own device in a few vectorized passes (no host
# loop over columns, no full host copy). The hash works on 32-bit words held in int64 tensors and
# never overflows int64 (see _mul32), so CPU and CUDA give the same integers; the float transform
# (Box-Muller in float64) can differ in the last bit between devices.
_M32 = 0xFFFFFFFF
_SALT = {"query": 1, "keys_row": 2, "cores": 3, "keys_col": 4, "values": 5, "out": 6, "calibration": 7}
"""One stream id per tensor (the permutation uses the torch.Generator stream of salt 0)."""


def _mul32(x, c: int):
    """(x * c) mod 2^32 for x in [0, 2^32): c split in 16-bit halves keeps products below 2^49."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _fmix32(x):
    """MurmurHash3's 32-bit finalizer: a bijection of [0, 2^32) with full avalanche. Works on
    Python ints and on int64 tensors alike."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def _stream_keys(seed: int, layer_index: int, salt: int) -> Tuple[int, ...]:
    """Four 32-bit keys (row and column key of two independent lanes) of one tensor's stream."""
    k = _fmix32((seed & _M32) ^ _fmix32(((seed >> 32) & _M32) ^ _fmix32(layer_index & _M32)))
    return tuple(_fmix32(k ^ _fmix32((salt * 4 + lane) & _M32)) for lane in range(4))


def _fmix32_(x: torch.Tensor) -> torch.Tensor:
    """_fmix32 in place on an int64 tensor of 32-bit words (fewer temporaries)."""
    for shift, c in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
        x ^= x >> shift
        hi = x * (c >> 16)
        hi &= 0xFFFF
        hi <<= 16
        x *= c & 0xFFFF
        x += hi
        x &= _M32
    x ^= x >> 16
    return x


def _hash_bits(keys, rows: torch.Tensor, cols: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Two independent 32-bit words per (row, col): rows [R, 1], cols [1, C] int64 -> [R, C] x 2."""
    return tuple(
        _fmix32_(_fmix32(rows ^ keys[2 * lane]) ^ _fmix32(cols ^ keys[2 * lane + 1]))
        for lane in range(2)
    )


# Elements per pass: on the CPU a few int64 temporaries of 512 KiB stay in cache (4x faster than
# 32 MiB passes, measured); on an accelerator large passes amortize the launches.
_CHUNK = {"cpu": 1 << 16}
_CHUNK_DEFAULT = 1 << 24


@torch.no_grad()
def _hash_fill(out: torch.Tensor, keys, kind: str, col_offset: int = 0, scale: float = 1.0) -> None:
    """Fill `out` (viewed as [rows, columns], last dim = columns) in place with scale * N(0, 1)
    (kind 'normal', Box-Muller) or U(0, 1) (kind 'uniform') numbers of its global elements; its
    column j is global column col_offset + j (a column shard), rows are global."""
    view = out.view(-1, out.shape[-1]) if out.dim() > 1 else out.view(-1, 1)
    R, C = view.shape
    assert R < 2**32 and col_offset + C < 2**32, "rows and columns are hashed as 32-bit words"
    dev = out.device
    cols = torch.arange(col_offset, col_offset + C, device=dev, dtype=torch.int64)[None, :]
    step = max(1, _CHUNK.get(dev.type, _CHUNK_DEFAULT) // max(C, 1))
    for r0 in range(0, R, step):
        rows = torch.arange(r0, min(R, r0 + step), device=dev, dtype=torch.int64)[:, None]
        a, b = _hash_bits(keys, rows, cols)
        u1 = (a.double() + 0.5) * 2.0**-32  # in (0, 1): log(u1) is finite
        if kind == "uniform":
            z = u1
        else:
            u2 = b.double() * 2.0**-32
            z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)
        view[r0 : r0 + rows.shape[0]].copy_(z * scale)


def _init_device(config) -> torch.device:
    """Where the layer's tensors are created, as Megatron's own layers decide: the meta device with
    `init_model_with_meta_device`, the CPU with `use_cpu_initialization` (or without CUDA), else the
    current CUDA device."""
    if getattr(config, "init_model_with_meta_device", False):
        return torch.device("meta")
    if config.use_cpu_initialization or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


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
        aux_loss.install_schedule_hook()  # the aux gradient's scale in models without MoE
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
        device = _init_device(c)  # drawn there by reset_parameters (meta: drawn after materializing)
        kw = dict(dtype=dtype, device=device)

        self.query_weight = torch.nn.Parameter(torch.empty(2 * self.K, self.D, **kw))
        self.query_norm_row = torch.nn.LayerNorm(self.K, **kw)
        self.query_norm_col = torch.nn.LayerNorm(self.K, **kw)
        self.key_norm_row = torch.nn.LayerNorm(self.K, **kw)
        self.key_norm_col = torch.nn.LayerNorm(self.K, **kw)
        key_shape = (self.H, self.n_side, self.K, self.r)
        self.keys_row = torch.nn.Parameter(torch.empty(key_shape, **kw))
        self.keys_col = torch.nn.Parameter(torch.empty(key_shape, **kw))
        self.cores = torch.nn.Parameter(torch.empty(self.H, self.h, self.r, self.r, **kw))
        self.values = torch.nn.Parameter(
            torch.empty(self.N, self.col_hi - self.col_lo, **kw)
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
            # A name Transformer Engine knows: an unknown one makes TE's linear set
            # config.tp_comm_overlap = False on the shared config, for every layer built after it.
            # (Expert linears never overlap TP communication, so the buffer itself is not used.)
            tp_comm_buffer_name="fc2",
        )
        assert self.linear_out.weight.shape[1] == (self.col_hi - self.col_lo) * self.E
        parallel.tag_replicated_parameters(self.replicated_parameters(), self.layout)

        # IVE's pi, filled by reset_parameters. int32 while E*N fits (half of int64's bytes on
        # every rank: at E=4, Dv=1024, t*e=64 an int64 pi is as large as the value shard).
        perm_dtype = torch.int32 if self.E * self.N <= 2**31 - 1 else torch.int64
        self.register_buffer("permutation", torch.empty(self.E * self.N, dtype=perm_dtype, device=device))
        self.register_buffer("tucker_u", torch.zeros(self.H, self.r, **kw))
        self.register_buffer("tucker_v", torch.zeros(self.H, self.r, **kw))
        self.reset_parameters()

    def replicated_parameters(self):
        """The retrieval parameters, replicated on every TP x EP rank (all but values and Wo)."""
        sharded = {id(self.values), id(self.linear_out.weight)}
        return [p for p in self.parameters() if id(p) not in sharded]

    # ------------------------------------------------------------------ init
    def init_scales(self) -> dict:
        """The init's scales, by ultramem_init (the one place they are computed): std of the query
        weight, keys, values and Wo, and the LayerNorm weight; `unit_cores` says whether the
        U(0, 1) cores are scaled to unit Frobenius norm."""
        c = self.config
        K, D, E, Dv = self.K, self.D, self.E, self.Dv
        if c.ultramem_init == "paper":
            # Variance matching: LN weights K^-1/4 on both sides make <q, k> unit-variance; cores of
            # unit Frobenius norm make each core's score unit-variance; then values with variance
            # E/(2 m H L) and Wo with variance 1/(E*Dv) would give output variance 1/(2L), like an
            # MLP, if the pooling weights had unit mean square. They are the top-m winners of a
            # grid, whose mean square is far above 1 (measured 20-45): reset_parameters divides the
            # value std by their RMS measured at init (calibrated_value_std).
            return dict(
                query=1.0 / math.sqrt(D), keys=1.0, ln_weight=K**-0.25, unit_cores=True,
                values=math.sqrt(E / (2.0 * self.m * self.H * c.num_layers)),
                out=1.0 / math.sqrt(E * Dv),
            )  # fmt: skip
        # "reference": the public reference code's choices
        return dict(
            query=1.0 / math.sqrt(K), keys=1.0 / math.sqrt(K), ln_weight=K**-0.33,
            unit_cores=False, values=0.02, out=1.0 / math.sqrt(E * Dv),
        )  # fmt: skip

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draw the permutation and, with `perform_initialization`, every memory parameter, on the
        tensors' own device (see the counter-based RNG above; `init_scales` gives the scales).

        Tensors on the meta device are skipped: call again after materializing them (Megatron-FSDP
        does). Without `perform_initialization` the parameters are left as allocated (a checkpoint
        is expected) but pi is still drawn (cheap, and the layer is wrong without it).
        """
        c = self.config
        seed, layer = c.ultramem_seed, self.layer_index
        if not self.permutation.is_meta:
            # A torch.Generator stream on the host (randperm is not counter-based); int32 draws the
            # same permutation as int64.
            perm = torch.randperm(
                self.E * self.N, generator=_generator(seed, layer, 0), dtype=self.permutation.dtype
            )
            self.permutation.copy_(perm)
        if self.values.is_meta or not c.perform_initialization:
            self.tucker_u.zero_()
            self.tucker_v.zero_()
            return
        sc = self.init_scales()

        def draw(t, name, kind="normal", col_offset=0, scale=1.0):
            if not t.is_meta:
                _hash_fill(t, _stream_keys(seed, layer, _SALT[name]), kind, col_offset, scale)

        draw(self.query_weight, "query", scale=sc["query"])
        draw(self.keys_row, "keys_row", scale=sc["keys"])
        draw(self.keys_col, "keys_col", scale=sc["keys"])
        draw(self.cores, "cores", kind="uniform")
        if sc["unit_cores"]:
            self.cores.div_(self.cores.flatten(-2).norm(dim=-1)[..., None, None])
        for norm in (self.query_norm_row, self.query_norm_col, self.key_norm_row, self.key_norm_col):
            norm.weight.fill_(sc["ln_weight"])
            norm.bias.zero_()
        self.tucker_u.zero_()
        self.refresh_tucker_vectors()  # retrieval is now final: the calibration below uses it
        value_std = sc["values"]
        if c.ultramem_init == "paper":
            value_std /= self.winner_score_rms()
        # Table [N, Dv] and Wo [D, Dv*E] (Dv-major: column col*E + p): this rank's column slices
        # of the global tensors.
        draw(self.values, "values", col_offset=self.col_lo, scale=value_std)
        draw(self.linear_out.weight, "out", col_offset=self.col_lo * self.E, scale=sc["out"])

    CALIBRATION_TOKENS = 512
    """Tokens of the init's calibration batch (the RMS of 512 * H * m * h winner scores: its
    sampling error is far below the 2x the init promises)."""

    @torch.no_grad()
    def winner_score_rms(self) -> float:
        """RMS of the pooling weights (per-core winner scores, after ultramem_score_activation) on a
        unit-variance random batch: what the pre-MLP LayerNorm hands the layer at init.

        The output variance is Var(V) / E * H * m * mean(s^2) (y = Wo pooled, Var(Wo) = 1/(E Dv),
        each pooled entry a sum of H*m/E score-weighted values on average, per-core slices
        averaging the h cores), so dividing the value std by this RMS makes it the 1/(2L) target.
        The batch comes from the layer's own counter-based stream and the retrieval parameters are
        replicated: every rank of any layout computes the same number.
        """
        x = torch.empty(self.CALIBRATION_TOKENS, self.D, dtype=torch.float32, device=self.cores.device)
        _hash_fill(x, _stream_keys(self.config.ultramem_seed, self.layer_index, _SALT["calibration"]), "normal")
        _, scores = self.retrieve(x.to(self.cores.dtype))  # [T, H*m, h]
        return float(scores.double().pow(2).mean().sqrt().clamp_min(1e-12))

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

    def refresh_cache(self) -> None:
        """Megatron-Core's hook (0.20+: `MegatronModule.refresh_cache`, called after an in-place
        weight refit such as RL resharding, when parameters changed outside the optimizer and the
        checkpoint loader): drop the CPU path's kept key rows (`_key_rows`) and recompute the Tucker
        vectors from the cores now in place (sign-aligned with the current ones, so a refit that
        also sent the buffers leaves them as received)."""
        self._key_rows_cache = None
        if not self.cores.is_meta:
            self.refresh_tucker_vectors()

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

    def _use_cpu_path(self) -> bool:
        """cpu_path.py's fast path: ultramem_impl='auto' on tensors the Triton kernels do not take
        (the CPU). 'reference' runs reference.py's oracle functions everywhere."""
        return self.config.ultramem_impl == "auto" and not self.values.is_cuda

    def normalized_keys(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """LayerNorm'd keys over K: two [H, n', K, r] tensors."""
        kr = self.key_norm_row(self.keys_row.transpose(-1, -2)).transpose(-1, -2)
        kc = self.key_norm_col(self.keys_col.transpose(-1, -2)).transpose(-1, -2)
        return kr, kc

    def _key_rows(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The CPU path's LayerNorm'd keys, [H, r, n', K] per side (cpu_path.key_rows).

        They do not depend on the input, and at decode batch sizes normalizing them (a strided copy
        of both key tensors plus a LayerNorm) is about half of the layer's time. Without autograd
        the result is kept and reused while the keys and their LayerNorms are unchanged: same
        tensors (data_ptr, dtype, device), same version counters, and the same bits (a
        `param.data.copy_()`, as Megatron's optimizers do, does not bump the version counter; the
        check is a wrapping int64 sum of the raw bits, which any change of a single element
        alters). With autograd they are always recomputed (and the kept copy dropped)."""
        sides = ((self.keys_row, self.key_norm_row), (self.keys_col, self.key_norm_col))
        if torch.is_grad_enabled():
            self._key_rows_cache = None
            return tuple(cpu_path.key_rows(keys, norm) for keys, norm in sides)
        tensors = [t for keys, norm in sides for t in (keys, norm.weight, norm.bias)]
        stamp = tuple((t.data_ptr(), t.dtype, t.device, t._version) for t in tensors)
        sums = torch.stack([cpu_path.bits_checksum(t) for t in tensors]).tolist()
        cache = getattr(self, "_key_rows_cache", None)
        if cache is not None and cache[0] == stamp and cache[1] == sums:
            return cache[2]
        rows = tuple(cpu_path.key_rows(keys, norm) for keys, norm in sides)
        self._key_rows_cache = (stamp, sums, rows)
        return rows

    def _queries(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Shared query projection + LN: x [T, D] -> q_row, q_col [T, K]."""
        q = F.linear(x, self.query_weight)  # [T, 2K]
        return self.query_norm_row(q[:, : self.K]), self.query_norm_col(q[:, self.K :])

    def row_col_scores(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Query projection + LN, then rank-r scores: x [T, D] -> S_row, S_col [T, H, n', r]."""
        q_row, q_col = self._queries(x)  # [T, K] each
        k_row, k_col = self.normalized_keys()
        return reference.row_col_scores(q_row, k_row), reference.row_col_scores(q_col, k_col)

    def retrieve(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """TDQKR: x [T, D] -> virtual indices [T, H*m] (int64) and per-core scores [T, H*m, h].

        Each head's m winners are contiguous; their order within the head is the backend's
        (sorted by score in the reference, unspecified in the CPU fast path)."""
        T = x.shape[0]
        if self._use_cpu_path():
            q_row, q_col = self._queries(x)  # [T, K] each
            rows_row, rows_col = self._key_rows()  # [H, r, n', K] each
            virtual, scores = cpu_path.tdqkr(
                q_row, q_col, rows_row, rows_col, self.cores, self.tucker_u, self.tucker_v, self.m
            )
        else:
            s_row, s_col = self.row_col_scores(x)  # [T, H, n', r] each
            kernels = self._backend()
            topm = kernels.tucker_topm_fused if kernels is not None else reference.tucker_topm
            virtual, scores = topm(s_row, s_col, self.cores, self.tucker_u, self.tucker_v, self.m)
        # virtual [T, H, m], scores [T, H, m, h]
        if self.config.ultramem_score_activation == "softmax":
            scores = torch.softmax(scores, dim=2)
        return virtual.reshape(T, self.H * self.m), scores.reshape(T, self.H * self.m, self.h)

    def pooled_values(self, virtual: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """IVE + MCS pooling of this rank's columns: [T', H*m], [T', H*m, h] -> [T', E, Dv_local].

        The table's gradient goes into `values.main_grad` whenever the parameter has one (Megatron's
        DDP buffers), instead of a dense [N, Dv_local] gradient tensor."""
        rows, blocks = reference.virtual_to_physical(virtual, self.permutation, self.N)
        scores = scores[..., self.core_lo : self.core_hi]  # the cores of this rank's columns
        if self._use_cpu_path():
            return cpu_path.bag_pool(rows, blocks, scores, self.values, self.E)
        kernels = self._backend()
        if kernels is None:
            return reference.weighted_gather_pool(rows, blocks, scores, self.values, self.E)
        # The kernel's backward adds into values.main_grad (fp32 or bf16) whenever it exists.
        return kernels.gather_pool(
            rows,
            blocks,
            scores,
            self.values,
            self.E,
            deterministic=self.config.ultramem_deterministic,
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
        """L_aux on the singular values of each head's summed core (differentiable). Computed by
        `reference.singular_values` (closed form for r = 2, fixed-sweep Jacobi above): svdvals'
        value and gradient without its host synchronization, so a training step stays sync-free
        and CUDA-graph capturable (tests/kernels/test_sync_free.py)."""
        sv = reference.singular_values(self.cores.sum(1).float())  # [H, r]
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
    def _recompute(self) -> bool:
        """Selective recompute of the memory itself: 'moe' in recompute_modules treats the memory
        like the MoE block it replaces. With 'mlp' Megatron's TransformerLayer already recomputes
        the whole MLP slot (memory included) and the memory must not checkpoint again."""
        c = self.config
        modules = set(c.recompute_modules or []) if c.recompute_granularity == "selective" else set()
        return "moe" in modules and "mlp" not in modules and self.training and torch.is_grad_enabled()

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> Tuple[torch.Tensor, None]:
        """[s, b, D] -> ([s, b, D], None); [s/t, b, D] in and out with sequence parallelism."""
        if self._recompute():
            from megatron.core import tensor_parallel

            # activations of the memory are recomputed in backward (Megatron's checkpoint keeps
            # the RNG tracker state); the aux loss is attached outside, once
            out = tensor_parallel.checkpoint(self._memory_output, False, hidden_states)
        else:
            out = self._memory_output(hidden_states)
        if self.training and self.config.ultramem_aux_loss_alpha > 0 and torch.is_grad_enabled():
            out = self._attach_aux_loss(out)
        return out, None

    def _memory_output(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = parallel.gather_input(hidden_states, self.layout)  # [s, b, D]
        s, b, D = x.shape
        virtual, scores = self.retrieve(x.reshape(s * b, D))  # replicated on every TP rank
        return self.aggregate(virtual, scores).view(-1, b, D)  # [s (or s/t), b, D]
