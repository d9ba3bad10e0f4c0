"""Weighted gather with implicit value expansion (IVE) and multi-core (MCS) pooling.

Math (oracle: `reference.weighted_gather_pool`):
    pooled[t, p, c] = sum_{k : blocks[t,k] = p} scores[t, k, core(c)] * values[rows[t,k], c]
with core(c) = c // (Dv / h). rows, blocks: [T, M]; scores: [T, M, h]; values: [N, Dv];
pooled: [T, E, Dv].

Floors (each input read once, each output written once; elt = table bytes, s_elt = score bytes):
    forward   bytes = T*M*Dv*elt + T*M*(16 + h*s_elt) + T*E*Dv*elt,  FLOPs = 2*T*M*Dv
    backward  bytes = T*E*Dv*elt + T*M*Dv*elt + T*M*(16 + 2*h*s_elt) + 2*U*Dv*g_elt
              (U <= min(T*M, N) distinct rows, read-modify-write of the destination main_grad in
              its dtype g_elt), FLOPs = 4*T*M*Dv; without main_grad the dense gradient in the
              table dtype costs N*Dv*elt (zero-fill) and the touched rows U*Dv*elt (fp32/fp64
              tables: a read-modify-write, 2*U*Dv*elt). bf16 destinations add a stable sort of
              the T*M row ids (~ tens of bytes per selection, small next to T*M*Dv*elt).
That is ~1 FLOP per byte against an fp32 CUDA-core ridge of ~14 FLOP per byte (H200 datasheet:
67 TFLOP/s over 4.8 TB/s): memory-bound, except that the forward's one-hot FMA multiplies its
arithmetic by E_PAD (below). benchmarks/bench_kernels.py uses the same formulas (`*_floor`).

Design trade-off.
- Forward: one program per (token, Dv-block, selection split). It walks its chunk of the token's M
  selections, reads each selected row slice once (UNROLL independent row loads in flight per
  iteration, so the loop is not latency-bound) and adds the score-weighted row into an fp32
  [E_PAD, BLOCK_D] register tile with a one-hot FMA (E is a constexpr). The output is written
  once. Bytes are at the floor (rows read once, output written once); the price is E_PAD FMAs per
  loaded element. Estimate, not yet measured: with ~E_PAD + 4 instructions per 2-byte bf16 element
  against an H200 ridge of ~8 per byte, E <= 4 stays memory-bound and E = 16 turns ALU-bound (a
  variant that sorts each token's selections by block would remove the E factor at the cost of
  that sort). benchmarks/gpu_check.py measures it.
- Forward at decode sizes (`forward_config`): T programs per Dv block fill few SMs when T is small
  (T = 1, Dv = 1024: 4 programs on 132 SMs, each a chain of M/UNROLL dependent rounds of DRAM
  latency; UltraMemV2's M = 2 * 768 makes that chain long even at T = 64). The table first
  narrows BLOCK_D (down to 128-byte row segments), then splits the M selections over SPLIT
  programs that write fp32 partial tiles into a [SPLIT, T, E, Dv] workspace, summed in split
  order by `_split_reduce_kernel` (deterministic; one more launch).
  Extra bytes: 2*SPLIT*T*E*Dv*4 with SPLIT*T*cdiv(Dv, BLOCK_D) < 64*SMs by construction, i.e.
  < 64*SMs*E_PAD*BLOCK_D*4 (8.7 MB at E = 4, bf16, 132 SMs): L2-resident, so HBM bytes stay at
  the floor. Large T takes the single-pass path unchanged (SPLIT = 1, direct store in values.dtype).
- Backward, grad_scores: one program per tile of BLOCK_K flattened selections; it loops over Dv,
  gathering the value rows and the matching grad_pooled rows and reducing their product per core.
- Backward, grad_values, into an fp32/fp64 destination: by default the same program atomically
  adds score * grad_pooled rows into it (one pass, order-dependent rounding). `deterministic=True`,
  and always for a bf16/fp16 destination: the (row, token, k) triples are sorted by row (stable,
  so ties keep selection order); the program at the start of each run of equal rows owns that row,
  sums its run in order in fp32 and writes the row once (destination + sum, rounded once). No
  atomics, bitwise-reproducible, no [N, Dv] accumulation buffer, at the cost of a sort and a
  [T*M, Dv/BLOCK_D] grid in which non-start programs exit after one load (and of one program
  walking a hot row's whole run: unmeasured on a GPU).
- Destination (Megatron): whenever `values` has a `main_grad` (DDP's grad buffer: fp32 with
  grad_reduce_in_fp32, else bf16), grad_values goes straight into it, whatever
  gradient_accumulation_fusion says; the autograd gradient is None, or Megatron's flagged,
  uninitialized placeholder when the param has `grad_added_to_main_grad` (`_megatron_dummy_wgrad`:
  DDP's hook then fires without adding it). Without main_grad the gradient is a zeroed [N, Dv]
  tensor in the table dtype written in place (no fp32 table, no cast pass).

Accumulation is fp32 (fp64 for fp64 tables), like the reference. The ops are registered as opaque
`torch.library.custom_op`s (TRITON_NOTES: `triton_op` breaks torch.compile under the interpreter),
with `register_fake` and `register_autograd`, so torch.compile traces around them.
"""

import functools
import os
from typing import NamedTuple, Optional, Tuple

import torch

from .. import reference
from ..reference import _accum_dtype  # fp64 for fp64 inputs, else fp32: the reference's rule

try:  # optional dependency: the pure-torch reference is the fallback
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    HAVE_TRITON = False

__all__ = ["gather_pool", "HAVE_TRITON", "forward_config", "ForwardLaunch"]

_NAMESPACE = "megatron_ultramem"
# Test-only debug switch: outputs are pre-filled with NaN (integer outputs with -1) so an element the
# kernel forgot to write shows up in every comparison. Read per call so tests can monkeypatch it.
_POISON_ENV = "ULTRAMEM_POISON_OUTPUTS"


def _interpreting() -> bool:
    """Whether this module's kernels were built for the Triton interpreter.

    `@triton.jit` reads TRITON_INTERPRET when the kernel is defined (at import), so the kernel
    objects, not the current environment, say how they run.
    """
    return HAVE_TRITON and type(_gather_pool_fwd_kernel).__name__ == "InterpretedFunction"


def use_triton(t: torch.Tensor) -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors when the kernels are interpreted."""
    return HAVE_TRITON and (t.is_cuda or (t.device.type == "cpu" and _interpreting()))


def empty_output(*shape, dtype, device) -> torch.Tensor:
    """torch.empty, or a poisoned tensor (NaN / -1) when the debug switch is on."""
    out = torch.empty(*shape, dtype=dtype, device=device)
    if os.environ.get(_POISON_ENV, "0") not in ("", "0"):
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _block_d(Dv: int, cap: int) -> int:
    # >= 16 so a warp's vector loads stay wide; capped so the [E_PAD, BLOCK_D] tile fits registers.
    return max(16, min(_next_pow2(Dv), cap))


if HAVE_TRITON:
    _TL_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}

    @triton.jit
    def _cast_for_store(x, ptr, RNE_BY_HAND: tl.constexpr):
        """x cast to ptr's element type, rounding to nearest even.

        GPUs round fp32 -> bf16 casts to nearest even; the Triton interpreter (3.9) truncates, which
        doubles the rounding error that the CPU tests measure. Under the interpreter (RNE_BY_HAND)
        bf16 is rounded with the usual integer trick instead (finite values; NaN stays NaN).
        """
        if RNE_BY_HAND and ptr.dtype.element_ty == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return x.to(ptr.dtype.element_ty)

    @triton.jit
    def _gather_pool_fwd_kernel(
        rows_ptr,  # [T, M] int64
        blocks_ptr,  # [T, M] int64
        scores_ptr,  # [T, M, H_CORES]
        values_ptr,  # [N, Dv]
        out_ptr,  # [T, E, Dv] output, or [SPLIT, T, E, Dv] ACC workspace when split
        T,
        M,
        Dv,
        DH,  # columns per core slice, Dv // H_CORES
        CHUNK,  # selections per split (M when not split)
        E: tl.constexpr,
        E_PAD: tl.constexpr,
        H_CORES: tl.constexpr,
        BLOCK_D: tl.constexpr,
        UNROLL: tl.constexpr,
        ACC: tl.constexpr,
        RNE_BY_HAND: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
        split = tl.program_id(2).to(tl.int64)  # selections [split * CHUNK, (split + 1) * CHUNK)
        mask_d = offs_d < Dv
        core_d = offs_d // DH  # MCS slice of each column
        e_idx = tl.arange(0, E_PAD)
        acc = tl.zeros((E_PAD, BLOCK_D), dtype=ACC)
        k_lo = split * CHUNK
        k_hi = tl.minimum(k_lo + CHUNK, M)
        first = t * M
        for k0 in range(k_lo, k_hi, UNROLL):
            # Unrolled so UNROLL row loads are independent and in flight together.
            for u in tl.static_range(UNROLL):
                k = k0 + u
                valid = k < k_hi
                # Column limit 0 past the last selection: the scalar condition folded into the
                # vector mask (a `vector & scalar-bool` mask breaks the interpreter).
                d_lim = tl.where(valid, Dv, 0)
                sel = first + k
                row = tl.load(rows_ptr + sel, mask=valid, other=0)
                blk = tl.load(blocks_ptr + sel, mask=valid, other=0)
                v = tl.load(values_ptr + row * Dv + offs_d, mask=offs_d < d_lim, other=0.0).to(ACC)
                # Per-column score: the score of the core slice the column belongs to.
                s0 = tl.load(scores_ptr + sel * H_CORES, mask=valid, other=0.0).to(ACC)
                s_col = tl.zeros((BLOCK_D,), dtype=ACC) + s0
                for i in tl.static_range(1, H_CORES):
                    s_i = tl.load(scores_ptr + sel * H_CORES + i, mask=valid, other=0.0).to(ACC)
                    s_col = tl.where(core_d == i, s_i, s_col)
                # One-hot FMA into the selection's virtual block (E_PAD x BLOCK_D, no reductions).
                hit = (e_idx == blk).to(ACC)  # [E_PAD]
                acc += hit[:, None] * (s_col * v)[None, :]
        out_offs = ((split * T + t) * E + e_idx[:, None]) * Dv + offs_d[None, :]  # [E_PAD, BLOCK_D]
        out_mask = (e_idx[:, None] < E) & mask_d[None, :]
        tl.store(out_ptr + out_offs, _cast_for_store(acc, out_ptr, RNE_BY_HAND), mask=out_mask)

    @triton.jit
    def _split_reduce_kernel(
        ws_ptr,  # [SPLIT, n] ACC partial sums
        out_ptr,  # [n] output dtype
        n,
        SPLIT,
        BLOCK: tl.constexpr,
        RNE_BY_HAND: tl.constexpr,
    ):
        """out = sum of the splits' partial sums, in split order (deterministic), cast once."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        acc = tl.load(ws_ptr + offs, mask=mask, other=0.0)
        for s in range(1, SPLIT):
            acc += tl.load(ws_ptr + s * n + offs, mask=mask, other=0.0)
        tl.store(out_ptr + offs, _cast_for_store(acc, out_ptr, RNE_BY_HAND), mask=mask)

    @triton.jit
    def _gather_pool_bwd_kernel(
        grad_ptr,  # [T, E, Dv] grad of pooled
        rows_ptr,  # [T*M] int64
        blocks_ptr,  # [T*M] int64
        scores_ptr,  # [T*M, H_CORES]
        values_ptr,  # [N, Dv]
        gscores_ptr,  # [T*M, H_CORES] out (if NEED_GS)
        gvalues_ptr,  # [N, Dv] accumulation buffer (if ATOMIC_DV)
        TM,
        M,
        Dv,
        DH,
        E: tl.constexpr,
        H_CORES: tl.constexpr,
        H_PAD: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,
        ACC: tl.constexpr,
        NEED_GS: tl.constexpr,
        ATOMIC_DV: tl.constexpr,
        RNE_BY_HAND: tl.constexpr,
    ):
        # Flattened selections j = t * M + k; a tile may span two tokens, each j knows its own t.
        offs_j = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        mask_j = offs_j < TM
        t = offs_j // M
        row = tl.load(rows_ptr + offs_j, mask=mask_j, other=0)
        blk = tl.load(blocks_ptr + offs_j, mask=mask_j, other=0)
        g_base = (t * E + blk) * Dv  # start of grad_pooled[t, blocks[t,k]]
        v_base = row * Dv  # start of values[rows[t,k]]
        h_idx = tl.arange(0, H_PAD)
        gs = tl.zeros((BLOCK_K, H_PAD), dtype=ACC)
        for d0 in range(0, Dv, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < Dv
            core_d = offs_d // DH
            m2 = mask_j[:, None] & mask_d[None, :]
            g = tl.load(grad_ptr + g_base[:, None] + offs_d[None, :], mask=m2, other=0.0).to(ACC)
            if NEED_GS:
                v = tl.load(values_ptr + v_base[:, None] + offs_d[None, :], mask=m2, other=0.0)
                prod = g * v.to(ACC)  # [BLOCK_K, BLOCK_D]
                for i in tl.static_range(H_CORES):
                    part = tl.sum(tl.where(core_d[None, :] == i, prod, 0.0), axis=1)  # [BLOCK_K]
                    gs = tl.where(h_idx[None, :] == i, gs + part[:, None], gs)
            if ATOMIC_DV:
                s0 = tl.load(scores_ptr + offs_j * H_CORES, mask=mask_j, other=0.0).to(ACC)
                s_col = tl.zeros((BLOCK_K, BLOCK_D), dtype=ACC) + s0[:, None]  # core-0 score
                for i in tl.static_range(1, H_CORES):
                    s_i = tl.load(scores_ptr + offs_j * H_CORES + i, mask=mask_j, other=0.0)
                    s_col = tl.where(core_d[None, :] == i, s_i.to(ACC)[:, None], s_col)
                # relaxed: only the final sum matters, no ordering with other memory operations.
                tl.atomic_add(
                    gvalues_ptr + v_base[:, None] + offs_d[None, :],
                    (s_col * g).to(gvalues_ptr.dtype.element_ty),  # fp32 or fp64 destination
                    mask=m2,
                    sem="relaxed",
                )
        if NEED_GS:
            gs_offs = offs_j[:, None] * H_CORES + h_idx[None, :]
            gs_mask = mask_j[:, None] & (h_idx[None, :] < H_CORES)
            tl.store(
                gscores_ptr + gs_offs, _cast_for_store(gs, gscores_ptr, RNE_BY_HAND), mask=gs_mask
            )

    @triton.jit
    def _scatter_sorted_kernel(
        grad_ptr,  # [T, E, Dv] grad of pooled
        order_ptr,  # [T*M] int64: flat selection index, sorted by row (stable)
        sorted_rows_ptr,  # [T*M] int64
        run_end_ptr,  # [T*M] int32: end of the run of equal rows for run starts, else own index
        blocks_ptr,  # [T*M] int64
        scores_ptr,  # [T*M, H_CORES]
        gvalues_ptr,  # [N, Dv] any float dtype, written by the row's owner only
        M,
        Dv,
        DH,
        E: tl.constexpr,
        H_CORES: tl.constexpr,
        BLOCK_D: tl.constexpr,
        UNROLL: tl.constexpr,
        ACC: tl.constexpr,
        LOAD_OLD: tl.constexpr,  # add to the destination (main_grad) instead of storing (zeros)
        RNE_BY_HAND: tl.constexpr,
    ):
        """Each run of equal rows is summed in ACC by the program at its start, in sorted order,
        and the row is written once: destination = round(old + sum) (round(sum) without LOAD_OLD),
        one rounding per element whatever the destination dtype (bf16 main_grad included)."""
        j = tl.program_id(0)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        core_d = offs_d // DH
        end = tl.load(run_end_ptr + j)  # == j (empty loop, masked store) unless j starts a run
        acc = tl.zeros((BLOCK_D,), dtype=ACC)
        for jj0 in range(j, end, UNROLL):
            for u in tl.static_range(UNROLL):
                jj = jj0 + u
                valid = jj < end
                d_lim = tl.where(valid, Dv, 0)  # see the forward kernel
                src = tl.load(order_ptr + jj, mask=valid, other=0)  # = t * M + k
                blk = tl.load(blocks_ptr + src, mask=valid, other=0)
                g = tl.load(
                    grad_ptr + ((src // M) * E + blk) * Dv + offs_d, mask=offs_d < d_lim, other=0.0
                ).to(ACC)
                s0 = tl.load(scores_ptr + src * H_CORES, mask=valid, other=0.0).to(ACC)
                s_col = tl.zeros((BLOCK_D,), dtype=ACC) + s0
                for i in tl.static_range(1, H_CORES):
                    s_i = tl.load(scores_ptr + src * H_CORES + i, mask=valid, other=0.0).to(ACC)
                    s_col = tl.where(core_d == i, s_i, s_col)
                acc += s_col * g  # fixed order within the run: bitwise reproducible
        row = tl.load(sorted_rows_ptr + j)
        ptrs = gvalues_ptr + row * Dv + offs_d
        own = offs_d < tl.where(end > j, Dv, 0)
        if LOAD_OLD:
            old = tl.load(ptrs, mask=own, other=0.0)
            if gvalues_ptr.dtype.element_ty == tl.float64:
                acc = old + acc.to(tl.float64)
            else:
                acc = old.to(ACC) + acc  # bf16/fp16 main_grad: summed in fp32, rounded once below
        tl.store(ptrs, _cast_for_store(acc, gvalues_ptr, RNE_BY_HAND), mask=own)


# ----------------------------------------------------------------------------- launchers
def _check_inputs(rows, blocks, scores, values) -> Tuple[int, int, int, int, int]:
    T, M = rows.shape
    N, Dv = values.shape
    h = scores.shape[-1]
    shapes = (rows.shape, blocks.shape, scores.shape)
    assert blocks.shape == (T, M) and scores.shape == (T, M, h), f"rows/blocks/scores: {shapes}"
    assert Dv % h == 0, f"Dv={Dv} must be divisible by the number of cores h={h}"
    assert rows.dtype == torch.int64 and blocks.dtype == torch.int64
    return T, M, N, Dv, h


DEFAULT_SMS = 132  # H200 / H100 SXM: the table's SM count where no CUDA device is visible
PROGRAMS_PER_SM = 32  # Hopper's resident-CTA limit: small forward programs can all be resident


class ForwardLaunch(NamedTuple):
    """Launch parameters of the forward kernel (see `forward_config`)."""

    block_d: int
    split: int  # programs per (token, Dv block), each over a contiguous chunk of the M selections
    unroll: int
    num_warps: int


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device) -> int:
    device = torch.device(device)
    if device.type != "cuda":
        return DEFAULT_SMS
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def forward_config(
    T: int, M: int, Dv: int, E: int, elt: int, sms: int = DEFAULT_SMS
) -> ForwardLaunch:
    """The forward's launch table: block size, selection split and unroll per shape.

    Reasoning (Little's law; benchmarks/gpu_check.py times the table against fixed alternatives,
    not yet done on a GPU): the gather is a chain of dependent DRAM round trips per program (M /
    UNROLL of them), so its speed is the bytes in flight per SM. Keeping HBM3e busy takes
    ~bandwidth x latency / SMs ~ 4.8 TB/s x ~0.7 us / 132 ~ 25 KB per SM in flight.
    - BLOCK_D: the widest of 16..256 columns whose fp32 [E_PAD, BLOCK_D] tile has <= 4096 elements
      (registers) while T * cdiv(Dv, BLOCK_D) programs reach TARGET = PROGRAMS_PER_SM * sms;
      below that, halved down to 128-byte row segments (one full cache line per row and program).
    - SPLIT: if the programs still fall short of TARGET (T < 264 at Dv = 1024 in bf16: decode
      batches), each token's M selections are split into chunks of
      >= 2 * UNROLL, each program writing an fp32 partial [E, BLOCK_D] tile into a
      [SPLIT, T, E, Dv] workspace that a second kernel sums in split order (deterministic) and
      casts. The workspace is < 2 * TARGET * E_PAD * BLOCK_D * 4 bytes (8.7 MB at E = 4, bf16,
      132 SMs): it stays in the 60 MB L2, so the extra traffic is not HBM traffic.
    - UNROLL: 8 for tiles of <= 512 elements (1 warp, 2 elements per thread per row: cheap to
      double the loads in flight), else 4. 32 resident 1-warp programs x 8 x 128 B = 32 KB/SM.
    """
    target = PROGRAMS_PER_SM * sms
    e_pad = _next_pow2(E)
    bd = _block_d(Dv, max(16, min(256, 4096 // e_pad)))
    bd_min = min(bd, max(16, 128 // elt))
    while bd > bd_min and T * _cdiv(Dv, bd) < target:
        bd //= 2
    tile = e_pad * bd
    unroll = 8 if tile <= 512 else 4
    num_warps = 4 if tile >= 2048 else (2 if tile > 512 else 1)
    programs = max(1, T * _cdiv(Dv, bd))
    split = 1
    if programs < target:
        split = max(1, min(_cdiv(target, programs), M // (2 * unroll)))
    return ForwardLaunch(bd, split, unroll, num_warps)


def gather_pool_forward(
    rows: torch.Tensor,
    blocks: torch.Tensor,
    scores: torch.Tensor,
    values: torch.Tensor,
    E: int,
    block_d: Optional[int] = None,
    unroll: Optional[int] = None,
    split: Optional[int] = None,
    num_warps: Optional[int] = None,
) -> torch.Tensor:
    """Launch the forward kernel: -> [T, E, Dv] in values.dtype. No autograd.

    block_d / unroll / split / num_warps override `forward_config`'s table (benchmarks, tests).
    """
    T, M, N, Dv, h = _check_inputs(rows, blocks, scores, values)
    assert 1 <= E <= 64, f"E={E}: the [E, BLOCK_D] accumulator tile lives in registers"
    rows, blocks, scores, values = (x.contiguous() for x in (rows, blocks, scores, values))
    out = empty_output(T, E, Dv, dtype=values.dtype, device=values.device)
    if T == 0 or Dv == 0 or M == 0:
        return out.zero_()
    cfg = forward_config(T, M, Dv, E, values.element_size(), num_sms(values.device))
    bd = block_d or cfg.block_d
    unroll = unroll or cfg.unroll
    split = max(1, min(split or cfg.split, M))
    chunk = triton.cdiv(M, split)
    split = triton.cdiv(M, chunk)  # no empty splits
    acc = _accum_dtype(values.dtype)
    rne = _interpreting()
    if num_warps is None:
        tile = _next_pow2(E) * bd
        num_warps = 4 if tile >= 2048 else (2 if tile > 512 else 1)  # forward_config's rule
    dest = out if split == 1 else empty_output(split, T, E, Dv, dtype=acc, device=values.device)
    _gather_pool_fwd_kernel[(T, triton.cdiv(Dv, bd), split)](
        rows, blocks, scores, values, dest, T, M, Dv, Dv // h, chunk,
        E=E, E_PAD=_next_pow2(E), H_CORES=h, BLOCK_D=bd, UNROLL=unroll,
        ACC=_TL_ACC[acc], RNE_BY_HAND=rne, num_warps=num_warps,
    )  # fmt: skip
    if split > 1:
        n = T * E * Dv
        _split_reduce_kernel[(triton.cdiv(n, 1024),)](
            dest, out, n, split, BLOCK=1024, RNE_BY_HAND=rne, num_warps=4
        )
    return out


def gather_pool_backward(
    grad_pooled: torch.Tensor,
    rows: torch.Tensor,
    blocks: torch.Tensor,
    scores: torch.Tensor,
    values: torch.Tensor,
    need_scores: bool = True,
    need_values: bool = True,
    deterministic: bool = False,
    values_grad_out: Optional[torch.Tensor] = None,
    block_k: int = 16,
    block_d: Optional[int] = None,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Launch the backward kernels. No autograd.

    Returns (grad_scores [T, M, h] in scores.dtype or None, values gradient or None).

    The values gradient goes
    - into `values_grad_out` when given (a contiguous [N, Dv] float tensor, e.g. Megatron's
      main_grad; it is added to, not overwritten, and returned). fp32/fp64: atomic adds (the
      default) or the sorted owner kernel (`deterministic`). bf16/fp16: always the sorted owner
      kernel, which sums each touched row's contribution in fp32 and adds it once, so every touched
      element is rounded once per call (and the result is deterministic whatever `deterministic`
      says); untouched rows are not read.
    - else into a fresh zeroed [N, Dv] tensor in values.dtype (the gradient itself): fp32/fp64
      tables as above; bf16/fp16 tables get their touched rows summed in fp32 and stored rounded
      once by the owner kernel. No [N, Dv] temporary in the accumulation dtype exists.
    """
    T, M, N, Dv, h = _check_inputs(rows, blocks, scores, values)
    E = grad_pooled.shape[1]
    assert grad_pooled.shape == (T, E, Dv), (grad_pooled.shape, (T, E, Dv))
    TM = T * M
    assert TM < 2**31, "flattened selection index is int32 in the deterministic path"
    grad_pooled, rows, blocks, scores, values = (
        x.contiguous() for x in (grad_pooled, rows, blocks, scores, values)
    )
    acc = _accum_dtype(values.dtype)
    gscores = (
        empty_output(T, M, h, dtype=scores.dtype, device=scores.device) if need_scores else None
    )
    gvalues = None
    if need_values:
        if values_grad_out is not None:
            assert values_grad_out.shape == (N, Dv), (values_grad_out.shape, (N, Dv))
            assert values_grad_out.is_contiguous() and values_grad_out.is_floating_point()
            assert values_grad_out.device == values.device
            gvalues = values_grad_out
        else:
            gvalues = torch.zeros(N, Dv, dtype=values.dtype, device=values.device)
    if TM == 0 or Dv == 0:
        if gscores is not None:
            gscores.zero_()
        return gscores, gvalues
    # Atomics only into fp32/fp64 destinations: a bf16 one must see each row's whole sum at once.
    wide = gvalues is not None and gvalues.dtype in (torch.float32, torch.float64)
    atomic_dv = need_values and wide and not deterministic
    tl_acc = _TL_ACC[acc]
    rne = _interpreting()
    if need_scores or atomic_dv:
        bd = block_d or _block_d(Dv, 128)
        _gather_pool_bwd_kernel[(triton.cdiv(TM, block_k),)](
            grad_pooled, rows, blocks, scores, values,
            gscores if need_scores else grad_pooled,  # dummy pointer when unused
            gvalues if atomic_dv else grad_pooled,
            TM, M, Dv, Dv // h,
            E=E, H_CORES=h, H_PAD=_next_pow2(h), BLOCK_K=block_k, BLOCK_D=bd, ACC=tl_acc,
            NEED_GS=need_scores, ATOMIC_DV=atomic_dv, RNE_BY_HAND=rne,
            num_warps=8,  # [16, 128] tiles of 64-bit pointers: 4 warps ran at 168 regs (ptxas, sm_90)
        )  # fmt: skip
    if need_values and not atomic_dv:
        flat_rows = rows.reshape(TM)
        # Stable sort: equal rows keep selection order, so each run is summed in a fixed order.
        sorted_rows, order = torch.sort(flat_rows, stable=True)
        idx = torch.arange(TM, device=rows.device)
        run_end = torch.searchsorted(sorted_rows, sorted_rows, right=True)  # end of each run
        is_start = torch.ones(TM, dtype=torch.bool, device=rows.device)
        is_start[1:] = sorted_rows[1:] != sorted_rows[:-1]
        run_end = torch.where(is_start, run_end, idx).to(torch.int32)  # no host sync
        bd = block_d or _block_d(Dv, 256)
        _scatter_sorted_kernel[(TM, triton.cdiv(Dv, bd))](
            grad_pooled, order, sorted_rows, run_end, blocks, scores, gvalues, M, Dv, Dv // h,
            E=E, H_CORES=h, BLOCK_D=bd, UNROLL=4, ACC=tl_acc,
            LOAD_OLD=values_grad_out is not None, RNE_BY_HAND=rne,
            num_warps=2 if bd >= 256 else 1,
        )  # fmt: skip
    return gscores, gvalues


# ----------------------------------------------------------------------------- custom ops
if HAVE_TRITON:

    @torch.library.custom_op(f"{_NAMESPACE}::gather_pool", mutates_args=())
    def _gather_pool_op(
        rows: torch.Tensor,
        blocks: torch.Tensor,
        scores: torch.Tensor,
        values: torch.Tensor,
        E: int,
        deterministic: bool,
    ) -> torch.Tensor:
        # deterministic only shapes the backward; it is an op argument so that setup_context sees it.
        return gather_pool_forward(rows, blocks, scores, values, E)

    @_gather_pool_op.register_fake
    def _(rows, blocks, scores, values, E, deterministic):
        return values.new_empty(rows.shape[0], E, values.shape[1])

    @torch.library.custom_op(f"{_NAMESPACE}::gather_pool_backward", mutates_args=())
    def _gather_pool_bwd_op(
        grad_pooled: torch.Tensor,
        rows: torch.Tensor,
        blocks: torch.Tensor,
        scores: torch.Tensor,
        values: torch.Tensor,
        deterministic: bool,
        need_scores: bool,
        need_values: bool,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        gs, gv = gather_pool_backward(
            grad_pooled, rows, blocks, scores, values, need_scores, need_values, deterministic
        )
        # Custom ops return tensors: an empty tensor stands for "no gradient". gv is already in
        # values.dtype (no cast, no accumulation-dtype table).
        gs = gs if need_scores else scores.new_empty(0)
        gv = gv if need_values else values.new_empty(0)
        return gs, gv

    @_gather_pool_bwd_op.register_fake
    def _(grad_pooled, rows, blocks, scores, values, deterministic, need_scores, need_values):
        gs = torch.empty_like(scores) if need_scores else scores.new_empty(0)
        gv = torch.empty_like(values) if need_values else values.new_empty(0)
        return gs, gv

    @torch.library.custom_op(
        f"{_NAMESPACE}::gather_pool_backward_main_grad", mutates_args=("main_grad",)
    )
    def _gather_pool_bwd_main_grad_op(
        grad_pooled: torch.Tensor,
        rows: torch.Tensor,
        blocks: torch.Tensor,
        scores: torch.Tensor,
        values: torch.Tensor,
        main_grad: torch.Tensor,
        deterministic: bool,
        need_scores: bool,
    ) -> torch.Tensor:
        gs, _ = gather_pool_backward(
            grad_pooled, rows, blocks, scores, values, need_scores, True, deterministic,
            values_grad_out=main_grad,
        )  # fmt: skip
        return gs if need_scores else scores.new_empty(0)

    @_gather_pool_bwd_main_grad_op.register_fake
    def _(grad_pooled, rows, blocks, scores, values, main_grad, deterministic, need_scores):
        return torch.empty_like(scores) if need_scores else scores.new_empty(0)

    def _setup_context(ctx, inputs, output):
        rows, blocks, scores, values, E, deterministic = inputs
        ctx.save_for_backward(rows, blocks, scores, values)
        ctx.deterministic = deterministic
        # The Parameter object itself (not a saved copy) carries main_grad; under torch.compile the
        # inputs are fake tensors without it, and the ordinary gradient path is taken.
        has_main_grad = getattr(values, "main_grad", None) is not None
        ctx.main_grad_param = values if has_main_grad else None

    def _megatron_dummy_wgrad(param: torch.Tensor) -> Optional[torch.Tensor]:
        """Megatron's convention after a fused main_grad accumulation (tensor_parallel/layers.py).

        Megatron's DDP sets `grad_added_to_main_grad = False` on every parameter it wraps and
        hooks each parameter's AccumulateGrad node; that hook adds `param.grad` into main_grad
        unless the flag is True (or `zero_out_wgrad`), then drops `param.grad`. With the
        attribute present, the flag is set and a placeholder grad is returned so that the hook
        fires at all (with overlap_grad_reduce it asserts a grad and marks the bucket ready):
        uninitialized memory (no kernel, no traffic; NaN under the tests' poison switch, so an
        add by the hook would show), zeros under `zero_out_wgrad` (CUDA graphs; the hook adds
        those). Without the attribute (no Megatron DDP) None: no autograd grad at all.
        """
        if not hasattr(param, "grad_added_to_main_grad"):
            return None
        param.grad_added_to_main_grad = True
        if getattr(param, "zero_out_wgrad", False):
            return torch.zeros_like(param)
        return empty_output(*param.shape, dtype=param.dtype, device=param.device)

    def _backward(ctx, grad_pooled):
        rows, blocks, scores, values = ctx.saved_tensors
        need_scores, need_values = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        param = ctx.main_grad_param
        grad_pooled = grad_pooled.contiguous()
        args = (grad_pooled, rows, blocks, scores, values)
        if need_values and param is not None:
            grad_scores = _gather_pool_bwd_main_grad_op(
                *args, param.main_grad, ctx.deterministic, need_scores
            )
            grad_values = _megatron_dummy_wgrad(param)
        else:
            grad_scores, grad_values = _gather_pool_bwd_op(
                *args, ctx.deterministic, need_scores, need_values
            )
            grad_values = grad_values if need_values else None
        grad_scores = grad_scores if need_scores else None
        return None, None, grad_scores, grad_values, None, None

    _gather_pool_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API
def gather_pool(
    rows: torch.Tensor,
    blocks: torch.Tensor,
    scores: torch.Tensor,
    values: torch.Tensor,
    E: int,
    deterministic: bool = False,
) -> torch.Tensor:
    """Differentiable IVE + MCS pooling, same semantics as `reference.weighted_gather_pool`.

    Args:
        rows, blocks: [T, M] int64 physical rows in [0, N) and virtual blocks in [0, E) (not
            bounds-checked by the kernel).
        scores: [T, M, h] per-core pooling weights (differentiable).
        values: [N, Dv] value table, Dv divisible by h (differentiable).
        E: number of virtual blocks.
        deterministic: values gradient without atomics, bitwise-reproducible across runs (bf16 /
            fp16 destinations are always computed that way, see `gather_pool_backward`).
    Returns:
        [T, E, Dv] in values.dtype, accumulated in fp32 (fp64 for fp64 values).

    The table's gradient: if `values` has a `main_grad` attribute (Megatron's DDP grad buffer,
    fp32 with grad_reduce_in_fp32, else in the param dtype), it is added there, whatever
    `gradient_accumulation_fusion` says, and the autograd gradient is None, or Megatron's flagged
    placeholder where the parameter has `grad_added_to_main_grad` (`_megatron_dummy_wgrad`).
    Otherwise (no main_grad, or under torch.compile, whose fake inputs carry none) the ordinary
    gradient in values.dtype is returned. Eager mode only for main_grad.

    Uses the Triton kernels on CUDA (or on CPU under TRITON_INTERPRET=1), else the reference.
    """
    if not use_triton(values):
        return reference.weighted_gather_pool(rows, blocks, scores, values, E)
    return _gather_pool_op(rows, blocks, scores, values, E, deterministic)
