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
67 TFLOP/s over 4.8 TB/s): memory-bound. benchmarks/bench_kernels.py uses the same formulas.

What keeps a gather at copy bandwidth (Little's law): every SM must have about
bandwidth x latency / SMs bytes of row loads in flight. H100 SXM: 3.35 TB/s x ~0.7 us / 132 =
~18 KB per SM; H200: 4.8 TB/s x ~0.7 us / 132 = ~25 KB per SM ("the product" below; the loaded
DRAM latency is ~0.6-0.8 us, so take 25-35 KB as the goal). Each kernel below is written so that
(a) a table row is read as a [1, BLOCK_D] (or [UNROLL, BLOCK_D]) tile in the layout of the
accumulator it feeds, so no layout conversion (a shared-memory round trip with barriers) sits
between two row loads, (b) each thread reads 16 contiguous bytes of a row per load
(`ld.global.v4`; BLOCK_D = 32 x 16 / elt columns per warp: 256 in bf16), for which the launcher
passes ALIGN, the largest power of two <= 16 / elt dividing the core width Dv / h, and the kernel
rounds Dv and DH down to multiples of ALIGN so the compiler can prove the alignment even when the
JIT cannot (Dv not a multiple of 16), and (c) UNROLL rows are loaded before the first of them is
used. tests/kernels/compile_sm90.py compiles every launch variant for sm_90 with the JIT's own
specialization and checks (a)-(c) and the register counts quoted below in the PTX/SASS
(benchmarks/results/kernels_sm90_compile.md); bytes per SM in flight there = resident CTAs
(65536 registers / (32 x registers per thread), at most 32 one-warp CTAs) x 32 threads x 16 B x
row loads issued before the first use. Nothing here has been timed on a GPU.

Column chunks: a program's BLOCK_D columns always lie inside one core slice [i*DH, (i+1)*DH)
(DH = Dv / h), so a row's score is one scalar per program (no per-column core lookup); grids and
loops enumerate h * cdiv(DH, BLOCK_D) chunks.

Forward, E_PAD * 16/elt <= 64 (bf16: E <= 4; fp32: E <= 16): `_gather_pool_fwd_kernel`, one
one-warp program per (token, column chunk, selection split) (several tokens per program for a
core narrower than a warp's 16-byte row). It walks its chunk of the token's M selections,
UNROLL = 4 rows per round, and adds each score-weighted row into an fp32 [E_PAD, BLOCK_D]
register tile with a one-hot select (E is a constexpr); the output is written once. The price is
E_PAD selects per loaded element, i.e. why larger E goes to the sorted path.
ptxas decides how many of a round's row loads it issues before the first use: by default
(~70 registers) 1-2 of 4; with `.maxnreg` 96 (ROW_MAXNREG) all 4, at 72 registers, 28 CTAs per
SM: 28 x 32 threads x 4 x 16 B = 57 KB in flight per SM, 2.3x the H200 product (bf16, E = 4).
Decode sizes (`forward_config`): T programs per chunk fill few SMs when T is small, so the M
selections are split over SPLIT programs that write fp32 partial tiles into a [SPLIT, T, E, Dv]
workspace, summed in split order by `_split_reduce_kernel` (deterministic; one more launch).
Extra bytes: 2*SPLIT*T*E*Dv*4 with SPLIT*T*chunks < 64*SMs by construction: L2-resident.

Forward, larger E (bf16 E >= 9), and the deterministic / bf16-destination backward: the
segmented sum (`_segment_sum_kernel` + `_segment_fixup_kernel`). Entries j = (t, k) are sorted by
their output row (forward: t*E + block, a stable per-token sort of the blocks; backward: the
table row, a stable sort of the T*M row ids), and the per-entry operands are gathered into that
order in torch (the source row index, the key, the h scores: ~32 bytes per entry). Programs own
fixed blocks of SEG consecutive sorted entries; each walks its block in groups of UNROLL = 4 rows
loaded as one [UNROLL, BLOCK_D] tile (plus, for a main_grad destination, the [UNROLL, BLOCK_D]
destination rows it will add to), forms the segmented running sums of the group with an in-thread
associative scan, and writes every segment that starts and ends in its block once:
destination = round(old + sum), fp32 (fp64) accumulation, one rounding per element. A segment cut
by a block boundary leaves fp32 partial sums (the block's head and tail) in a [blocks, 2, Dv]
workspace; `_segment_fixup_kernel` then adds, per cut segment and column chunk, the partials of
the blocks it spans, in block order, and writes that row once. So no program walks a hot row
alone (a row chosen 13,000 times is 13,000 / SEG blocks summed in parallel, then ~51 partials at
SEG = 256), the result is bitwise reproducible (fixed blocks, stable sorts), and the destination
is read and written once per touched row and column. Dv is looped inside a program at training
sizes (the sorted metadata is read once per column chunk from L1/L2); at decode sizes the chunks
are spread over a second grid dimension instead. The one-hot tile's E factor is gone: one FMA
per element whatever E.

Backward, grad_scores (every table dtype) and the atomic path (fp32/fp64 tables only):
`_gather_pool_bwd_kernel`, one 4-warp program per BLOCK_K = 16 flattened selections, looping
over the column chunks of each core: it loads the [BLOCK_K, BLOCK_D] tiles of grad_pooled rows
(and of value rows for grad_scores), accumulates g * v per core in registers (reduced once per
core, stored once at the end), and atomically adds score * g into the fp32/fp64 destination
(relaxed: one pass, order-dependent rounding). The scores are loaded once per core, outside the
column loop, so no conversion of a score vector sits between row loads (the bf16-score case did
that before). 2-byte tables never take the atomics: Triton lays out a 16-byte fp32 atomic as 4
elements per thread and a 16-byte bf16 row load as 8, and converts between them through shared
memory with barriers inside the column loop (seen in the SASS); their table gradient (fp32 or
bf16 destination) is the segmented sum, which is deterministic too. bf16, grad_scores only:
49 registers, 2 rows x 16 B x 2 tiles in flight per thread, 37 KB per SM.

Destination (Megatron): whenever `values` has a `main_grad` (DDP's grad buffer: fp32 with
grad_reduce_in_fp32, else bf16), grad_values goes straight into it, whatever
gradient_accumulation_fusion says; the autograd gradient is None, or Megatron's flagged,
uninitialized placeholder when the param has `grad_added_to_main_grad` (`_megatron_dummy_wgrad`:
DDP's hook then fires without adding it). Without main_grad the gradient is a zeroed [N, Dv]
tensor in the table dtype written in place (no fp32 table, no cast pass). fp32/fp64
destinations take the atomic kernel by default, the segmented sum with `deterministic=True`;
bf16/fp16 destinations always take the segmented sum.

Offsets: every address that multiplies two runtime sizes is computed in int64 (program ids and
loaded indices are widened first); compile_sm90.py checks the TTIR for int32 products of two
runtime values that feed an address.

Accumulation is fp32 (fp64 for fp64 tables), like the reference. The ops are registered as opaque
`torch.library.custom_op`s (TRITON_NOTES: `triton_op` breaks torch.compile under the interpreter),
with `register_fake` and `register_autograd`, so torch.compile traces around them. Nothing in the
launchers synchronizes with the host (no .item(), no data-dependent shapes): the grids depend on
shapes only, so the ops are safe inside CUDA-graph capture (tests/kernels/test_sync_free.py).
"""

import functools
import math
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

__all__ = ["gather_pool", "HAVE_TRITON", "forward_config", "ForwardLaunch", "segment_config"]

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


def _vec(elt: int) -> int:
    """Elements of `elt` bytes in one 16-byte vector load."""
    return max(1, 16 // elt)


def _align(n: int, elt: int) -> int:
    """The largest power of two <= 16 / elt dividing n: the vector width n allows (ALIGN)."""
    a = 1
    while a * 2 <= _vec(elt) and n % (a * 2) == 0:
        a *= 2
    return a


def _chunk_width(DH: int, elt: int) -> int:
    """BLOCK_D: one warp reading 16 bytes per thread (32 x 16 / elt columns), capped at the core
    width (a power of two, >= 16 so that a tile is never tiny)."""
    return max(16, min(_next_pow2(DH), 32 * _vec(elt)))


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
        TOKENS: tl.constexpr,  # tokens per program: 32 x 16 B / (BLOCK_D x elt) for narrow cores
        UNROLL: tl.constexpr,
        ALIGN: tl.constexpr,  # Dv and DH are multiples of it (the launcher checks)
        ACC: tl.constexpr,
        RNE_BY_HAND: tl.constexpr,
    ):
        """One-hot register pooling: program (TOKENS tokens, column chunk, split) -> out tiles
        [TOKENS, E_PAD, BLOCK_D]. A core narrower than a warp's 16-byte row (bf16: DH < 256)
        takes TOKENS > 1 tokens in lockstep, so that each thread still loads 16 bytes of a row.

        Bytes in flight (benchmarks/results/kernels_sm90_compile.md; bf16, E = 4, UNROLL = 4,
        maxnreg 96): 72 registers -> 28 one-warp CTAs per SM -> 28 x 32 x 4 x 16 B = 57 KB per
        SM against the H200 product of ~25 KB."""
        Dv = Dv // ALIGN * ALIGN  # no-ops that tell the compiler the row starts are aligned
        DH = DH // ALIGN * ALIGN
        nq = tl.cdiv(DH, BLOCK_D)
        q = tl.program_id(1)
        core = q // nq
        col0 = core.to(tl.int64) * DH + (q % nq) * BLOCK_D  # first column of the chunk
        width = tl.minimum(DH - (q % nq) * BLOCK_D, BLOCK_D)  # columns in the chunk
        offs_d = tl.arange(0, BLOCK_D)[None, None, :]  # [1, 1, BLOCK_D]
        tok = tl.program_id(0).to(tl.int64) * TOKENS + tl.arange(0, TOKENS)[:, None, None]
        tok_ok = tok < T  # [TOKENS, 1, 1]
        split = tl.program_id(2).to(tl.int64)  # selections [split * CHUNK, (split + 1) * CHUNK)
        e_idx = tl.arange(0, E_PAD)[None, :, None]  # [1, E_PAD, 1]
        acc = tl.zeros((TOKENS, E_PAD, BLOCK_D), dtype=ACC)
        k_lo = split * CHUNK
        k_hi = tl.minimum(k_lo + CHUNK, M)
        first = tok * M
        for k0 in range(k_lo, k_hi, UNROLL):
            # Unrolled: the UNROLL row loads are independent (the compiler decides how many it
            # issues before the first use: compile_sm90.py measures it).
            for u in tl.static_range(UNROLL):
                k = k0 + u
                # Tokens limit T, 0 past the last selection (a `tensor & scalar-bool` mask
                # breaks the interpreter). [TOKENS, 1, 1]
                ok = tok < tl.where(k < k_hi, T, 0)
                sel = first + k
                row = tl.load(rows_ptr + sel, mask=ok, other=0)
                blk = tl.load(blocks_ptr + sel, mask=ok, other=0)
                s = tl.load(scores_ptr + sel * H_CORES + core, mask=ok, other=0.0).to(ACC)
                v = tl.load(values_ptr + (row * Dv + col0) + offs_d, mask=ok & (offs_d < width),
                            other=0.0, eviction_policy="evict_first").to(ACC)  # row load
                # One-hot select into the selection's virtual block (no reductions).
                acc += tl.where(e_idx == blk, s * v, 0.0)
        out_offs = ((split * T + tok) * E + e_idx) * Dv + col0 + offs_d  # [TOKENS, E_PAD, BD]
        out_mask = tok_ok & (e_idx < E) & (offs_d < width)
        tl.store(out_ptr + out_offs, _cast_for_store(acc, out_ptr, RNE_BY_HAND), mask=out_mask)

    @triton.jit
    def _split_reduce_kernel(
        ws_ptr,  # [SPLIT, n] ACC partial sums
        out_ptr,  # [n] output dtype
        n,
        SPLIT,
        BLOCK: tl.constexpr,
        UNROLL: tl.constexpr,
        RNE_BY_HAND: tl.constexpr,
    ):
        """out = the sum of the splits' partial sums in a fixed order (UNROLL splits at a time,
        loaded together; deterministic), cast once. Offsets in int64: SPLIT * n passes 2^31
        at T = 8192, E = 4, Dv = 1024 with SPLIT >= 65 (an explicit split= override)."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)[None, :]  # [1, BLOCK]
        mask = offs < n
        su = tl.arange(0, UNROLL)[:, None]  # [UNROLL, 1]
        acc = tl.zeros((1, BLOCK), dtype=ws_ptr.dtype.element_ty)
        for s0 in range(0, SPLIT, UNROLL):
            sp = s0 + su
            p = tl.load(ws_ptr + sp.to(tl.int64) * n + offs, mask=mask & (sp < SPLIT), other=0.0,
                        eviction_policy="evict_first")  # row load
            acc += tl.sum(p, axis=0)[None, :]  # in-thread: UNROLL is the register dimension
        tl.store(out_ptr + offs, _cast_for_store(acc, out_ptr, RNE_BY_HAND), mask=mask)

    @triton.jit
    def _segmented_add(v1, f1, v2, f2):
        """Combine of a segmented sum scan: (value, segment-start flag) pairs."""
        return tl.where(f2 != 0, v2, v1 + v2), f1 | f2

    @triton.jit
    def _segment_sum_kernel(
        src_ptr,  # [*, Dv] rows to gather (forward: the table; backward: grad_pooled [T*E, Dv])
        gidx_ptr,  # [TM] int64: source row of each sorted entry
        key_ptr,  # [TM + 1] int64: destination row of each sorted entry, ascending; key[TM] = -1
        sc_ptr,  # [TM, H_CORES]: the entry's score per core
        dst_ptr,  # [*, Dv] destination (rows `key`), any float dtype
        part_ptr,  # [NB, 2, Dv] ACC: partial sums of the segments cut by this block's ends
        TM,
        Dv,
        DH,
        SEG,  # sorted entries per program
        H_CORES: tl.constexpr,
        BLOCK_D: tl.constexpr,
        UNROLL: tl.constexpr,
        ALIGN: tl.constexpr,
        ACC: tl.constexpr,
        LOAD_OLD: tl.constexpr,  # destination += sum (main_grad) instead of = sum
        RNE_BY_HAND: tl.constexpr,
    ):
        """Segmented sums of score-weighted gathered rows over block pid(0) of the sorted entries.

        A segment (entries with one key) that starts and ends in this block is written to its
        destination row once: round(old + sum). The segment this block starts inside of (its
        key equals the key before the block: the 'head') and the one it ends inside of (the
        'tail', continuing past the block) are not final: their partial sums go to part[b, 0]
        (head; also a block that is one segment from end to end) and part[b, 1] (tail), for
        `_segment_fixup_kernel`. Columns: chunks pid(1), pid(1) + num_programs(1), ...

        Bytes in flight (kernels_sm90_compile.md; bf16 rows, UNROLL = 4, maxnreg 96): ~94
        registers -> 21 CTAs per SM -> 21 x 32 x 4 x 16 B = 43 KB per SM (into a bf16 main_grad,
        whose 4 destination rows are loaded too, ptxas keeps ~2.7 of the 8 in flight: 29 KB)."""
        Dv = Dv // ALIGN * ALIGN
        DH = DH // ALIGN * ALIGN
        b = tl.program_id(0).to(tl.int64)
        j_lo = b * SEG
        j_hi = tl.minimum(j_lo + SEG, TM)
        key_before = tl.load(key_ptr + j_lo - 1, mask=j_lo > 0, other=-1)  # -1: no row
        key_first = tl.load(key_ptr + j_lo)
        key_last = tl.load(key_ptr + j_hi - 1)
        key_after = tl.load(key_ptr + j_hi)  # -1 past the last entry
        offs_u = tl.arange(0, UNROLL)[:, None]  # [UNROLL, 1]
        nq = tl.cdiv(DH, BLOCK_D)
        for q in range(tl.program_id(1), H_CORES * nq, tl.num_programs(1)):
            core = q // nq
            col0 = core.to(tl.int64) * DH + (q % nq) * BLOCK_D  # first column of the chunk
            width = tl.minimum(DH - (q % nq) * BLOCK_D, BLOCK_D)  # columns in the chunk
            offs_d = tl.arange(0, BLOCK_D)[None, :]  # [1, BD]
            in_core = offs_d < width
            carry = tl.zeros((1, BLOCK_D), dtype=ACC)  # running sum of the open segment
            head = tl.zeros((1, BLOCK_D), dtype=ACC)  # the head segment's sum, once it ended
            for j0 in range(j_lo, j_hi, UNROLL):
                j = j0 + offs_u  # [UNROLL, 1] int64
                valid = j < j_hi
                # the row loads first: they wait on one index load only
                gi = tl.load(gidx_ptr + j, mask=valid, other=0)
                m2 = valid & in_core
                x = tl.load(src_ptr + (gi * Dv + col0) + offs_d, mask=m2, other=0.0,
                            eviction_policy="evict_first")  # row load
                key = tl.load(key_ptr + j, mask=valid, other=-3)
                prv = tl.load(key_ptr + j - 1, mask=valid & (j > 0), other=-1)
                nxt = tl.load(key_ptr + j + 1, mask=valid, other=-3)
                s = tl.load(sc_ptr + j * H_CORES + core, mask=valid, other=0.0).to(ACC)
                ends = key != nxt  # the entry closes its segment (inside the block or at its end)
                is_head = key == key_before  # belongs to the segment begun before the block
                final = ends & (~is_head)
                if LOAD_OLD:
                    # Issued with the row loads: it depends on the keys only.
                    old = tl.load(dst_ptr + (key * Dv + col0) + offs_d, mask=m2 & final,
                                  other=0.0, eviction_policy="evict_first")  # row load
                # Segmented inclusive scan over the group's rows (in-thread: UNROLL is the
                # register dimension of the tile), then the open segment's carry on the rows
                # that continue it.
                # Padding rows past the block (x = 0) continue the last segment, so the group's
                # last row always carries the running sum of the block's last valid row.
                start = ((key != prv) & valid).to(tl.int32)
                start = start + tl.zeros((UNROLL, BLOCK_D), dtype=tl.int32)
                val, seen = tl.associative_scan((s * x.to(ACC), start), 0, _segmented_add)
                val = tl.where(seen == 0, val + carry, val)
                if LOAD_OLD:
                    res = old.to(ACC) + val
                else:
                    res = val
                tl.store(dst_ptr + (key * Dv + col0) + offs_d, _cast_for_store(res, dst_ptr, RNE_BY_HAND),
                         mask=m2 & final)  # fmt: skip
                head_end = (ends & is_head & valid).to(tl.int32)  # [UNROLL, 1]: <= 1 row
                head_sum = tl.sum(tl.where(head_end != 0, val, 0.0), axis=0)[None, :]
                head = tl.where(tl.sum(head_end, axis=0)[None, :] > 0, head_sum, head)
                carry = tl.sum(tl.where(offs_u == UNROLL - 1, val, 0.0), axis=0)[None, :]
            # After the walk `carry` is the running sum of the block's last segment.
            has_head = key_first == key_before  # the block starts inside an earlier segment
            all_head = key_last == key_before  # ... and never leaves it
            cont = key_last == key_after  # the last segment continues past the block
            pbase = part_ptr + (b * 2 * Dv + col0) + offs_d
            # (scalar conditions folded into the column limit: see the forward kernel)
            tl.store(pbase, tl.where(all_head, carry, head), mask=offs_d < tl.where(has_head, width, 0))
            tl.store(pbase + Dv, carry, mask=offs_d < tl.where(cont & (~all_head), width, 0))

    @triton.jit
    def _segment_fixup_kernel(
        key_ptr,  # [TM + 1] int64 (as in _segment_sum_kernel)
        end_blk_ptr,  # [NB] int64: the block holding the last entry of block b's last segment
        part_ptr,  # [NB, 2, Dv] ACC partials
        dst_ptr,  # [*, Dv]
        TM,
        Dv,
        DH,
        SEG,
        H_CORES: tl.constexpr,
        BLOCK_D: tl.constexpr,
        UNROLL: tl.constexpr,
        ALIGN: tl.constexpr,
        ACC: tl.constexpr,
        LOAD_OLD: tl.constexpr,
        RNE_BY_HAND: tl.constexpr,
    ):
        """Program (b, column chunk): if block b's last segment starts in b and continues past
        it, sum its partials in block order (tail of b, heads of b+1 .. end) and write the row
        once: round(old + sum). Loads of UNROLL partials are issued together (no stores in the
        loop)."""
        Dv = Dv // ALIGN * ALIGN
        DH = DH // ALIGN * ALIGN
        b = tl.program_id(0).to(tl.int64)
        nq = tl.cdiv(DH, BLOCK_D)
        q = tl.program_id(1)
        core = q // nq
        col0 = core.to(tl.int64) * DH + (q % nq) * BLOCK_D  # first column of the chunk
        width = tl.minimum(DH - (q % nq) * BLOCK_D, BLOCK_D)  # columns in the chunk
        offs_d = tl.arange(0, BLOCK_D)[None, :]
        j_lo = b * SEG
        j_hi = tl.minimum(j_lo + SEG, TM)
        key_before = tl.load(key_ptr + j_lo - 1, mask=j_lo > 0, other=-1)
        key = tl.load(key_ptr + j_hi - 1)
        active = (key == tl.load(key_ptr + j_hi)) & (key != key_before)
        last = tl.where(active, tl.load(end_blk_ptr + b), b)  # empty loop when inactive
        # Columns of this core slice, none when inactive (the scalar condition folded into the
        # vector mask, as in the forward kernel).
        in_core = offs_d < tl.where(active, width, 0)
        offs_u = tl.arange(0, UNROLL)[:, None]
        acc = tl.load(part_ptr + ((b * 2 + 1) * Dv + col0) + offs_d, mask=in_core, other=0.0,
                      eviction_policy="evict_first")  # row load
        for b0 in range(b + 1, last + 1, UNROLL):
            bb = b0 + offs_u  # [UNROLL, 1]
            p = tl.load(part_ptr + (bb * 2 * Dv + col0) + offs_d, mask=in_core & (bb <= last),
                        other=0.0, eviction_policy="evict_first")  # row load
            acc += tl.sum(p, axis=0)[None, :]  # in-thread: UNROLL is the register dimension
        ptrs = dst_ptr + (key * Dv + col0) + offs_d
        if LOAD_OLD:
            acc = tl.load(ptrs, mask=in_core, other=0.0).to(ACC) + acc
        tl.store(ptrs, _cast_for_store(acc, dst_ptr, RNE_BY_HAND), mask=in_core)

    @triton.jit
    def _gather_pool_bwd_kernel(
        grad_ptr,  # [T, E, Dv] grad of pooled
        rows_ptr,  # [T*M] int64
        blocks_ptr,  # [T*M] int64
        scores_ptr,  # [T*M, H_CORES]
        values_ptr,  # [N, Dv]
        gscores_ptr,  # [T*M, H_CORES] out (if NEED_GS)
        gvalues_ptr,  # [N, Dv] fp32/fp64 accumulation buffer (if ATOMIC_DV)
        TM,
        M,
        Dv,
        DH,
        E: tl.constexpr,
        H_CORES: tl.constexpr,
        H_PAD: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,
        ALIGN: tl.constexpr,
        ACC: tl.constexpr,
        NEED_GS: tl.constexpr,
        ATOMIC_DV: tl.constexpr,
        RNE_BY_HAND: tl.constexpr,
    ):
        """Program over BLOCK_K flattened selections j = t*M + k (a tile may span two tokens):
        grad_scores[j, i] = <grad_pooled[t, blocks[j], core i], values[rows[j], core i]> and,
        with ATOMIC_DV, gvalues[rows[j], core i] += scores[j, i] * grad_pooled[t, blocks[j], core i].

        Bytes in flight: see compile_sm90.py's table (per thread BLOCK_K * BLOCK_D / threads / 8
        16-byte loads of each of the two gathered tiles per column chunk)."""
        Dv = Dv // ALIGN * ALIGN
        DH = DH // ALIGN * ALIGN
        offs_j = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)[:, None]  # [BK, 1]
        mask_j = offs_j < TM
        t = offs_j // M
        row = tl.load(rows_ptr + offs_j, mask=mask_j, other=0)
        blk = tl.load(blocks_ptr + offs_j, mask=mask_j, other=0)
        g_base = (t * E + blk) * Dv  # start of grad_pooled[t, blocks[t,k]]
        v_base = row * Dv  # start of values[rows[t,k]]
        h_idx = tl.arange(0, H_PAD)[None, :]  # [1, H_PAD]
        gs_all = tl.zeros((BLOCK_K, H_PAD), dtype=ACC)  # grad_scores, stored once at the end
        for i in tl.static_range(H_CORES):
            # One score per selection for the whole core slice: loaded before the column loop.
            s = tl.load(scores_ptr + offs_j * H_CORES + i, mask=mask_j, other=0.0).to(ACC)
            gs = tl.zeros((BLOCK_K, BLOCK_D), dtype=ACC)
            for d0 in range(i * DH, (i + 1) * DH, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)[None, :]  # [1, BLOCK_D]
                m2 = mask_j & (offs_d < (i + 1) * DH)
                # grad_pooled rows are reused by the token's other selections: evict_last.
                g = tl.load(grad_ptr + g_base + offs_d, mask=m2, other=0.0,
                            eviction_policy="evict_last").to(ACC)  # row load
                if NEED_GS:
                    v = tl.load(values_ptr + v_base + offs_d, mask=m2, other=0.0,
                                eviction_policy="evict_first")  # row load
                    gs += g * v.to(ACC)
                if ATOMIC_DV:
                    # relaxed: only the final sum matters, no ordering with other memory operations.
                    tl.atomic_add(gvalues_ptr + v_base + offs_d,
                                  (s * g).to(gvalues_ptr.dtype.element_ty), mask=m2,
                                  sem="relaxed")  # fmt: skip
            if NEED_GS:
                gs_all = tl.where(h_idx == i, tl.sum(gs, axis=1)[:, None], gs_all)
        if NEED_GS:  # one store (and layout conversion) after every row load
            tl.store(gscores_ptr + offs_j * H_CORES + h_idx,
                     _cast_for_store(gs_all, gscores_ptr, RNE_BY_HAND),
                     mask=mask_j & (h_idx < H_CORES))  # fmt: skip


# ----------------------------------------------------------------------------- launch tables
def _check_inputs(rows, blocks, scores, values) -> Tuple[int, int, int, int, int]:
    T, M = rows.shape
    N, Dv = values.shape
    h = scores.shape[-1]
    shapes = (rows.shape, blocks.shape, scores.shape)
    assert blocks.shape == (T, M) and scores.shape == (T, M, h), f"rows/blocks/scores: {shapes}"
    assert Dv % h == 0, f"Dv={Dv} must be divisible by the number of cores h={h}"
    assert rows.dtype == torch.int64 and blocks.dtype == torch.int64
    return T, M, N, Dv, h


DEFAULT_SMS = 132  # H200 / H100 SXM: the tables' SM count where no CUDA device is visible
PROGRAMS_PER_SM = 32  # Hopper's resident-CTA limit: one-warp programs can all be resident
ONEHOT_MAX_ACC = 64  # fp32 accumulators per thread of the one-hot tile (E_PAD x 16-byte vector)
SEG_MAX, SEG_UNROLL = 256, 4  # segmented sum: entries per program (at most), rows per group
BWD_BLOCK_K = 16  # backward tile: selections per program
# ptxas register cap (`.maxnreg`) of the one-warp row-streaming kernels. Without one, ptxas 12.x
# (Triton 3.9's) schedules them for ~70 registers and sinks the unrolled row loads towards their
# uses (1.3-2 row loads in flight per thread); with a cap of 96 it keeps all four of a round in
# flight at ~72-95 registers (compile_sm90.py measures both; the GPU image's Triton 3.6 ships
# another ptxas: benchmarks/gpu_check.py is where it shows).
ROW_MAXNREG = 96


def _row_maxnreg(align: int, elt: int) -> Optional[int]:
    """ROW_MAXNREG for full 16-byte row vectors; none for narrower ones (more load
    instructions per row: the cap made ptxas spill, and they keep enough in flight without)."""
    return ROW_MAXNREG if align * elt >= 16 else None


class ForwardLaunch(NamedTuple):
    """Launch parameters of the forward (see `forward_config`)."""

    path: str  # "onehot" (`_gather_pool_fwd_kernel`) or "sorted" (the segmented sum)
    block_d: int
    split: int  # onehot: programs per (token, column chunk), each over a chunk of the selections
    unroll: int
    num_warps: int
    seg: int  # sorted: sorted entries per program (0 for onehot)
    lanes: int  # sorted: programs per block of entries along the column chunks
    tokens: int = 1  # onehot: tokens per program (narrow cores: a warp's 16-byte row loads)


class SegmentLaunch(NamedTuple):
    """Launch parameters of the segmented sum (see `segment_config`)."""

    seg: int
    lanes: int
    block_d: int
    unroll: int


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device) -> int:
    device = torch.device(device)
    if device.type != "cuda":
        return DEFAULT_SMS
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def segment_config(TM: int, DH: int, h: int, elt: int, sms: int = DEFAULT_SMS) -> SegmentLaunch:
    """The segmented sum's table: SEG_MAX entries per program while that gives >= TARGET =
    PROGRAMS_PER_SM * sms programs, with the Dv column chunks looped inside each program
    (training sizes: one pass over each entry's metadata per chunk, from L1/L2). Fewer entries:
    the chunks are spread over a second grid dimension (lanes) and SEG is halved (down to
    4 * SEG_UNROLL = 16) until the programs reach TARGET. elt: the bytes of the gathered rows."""
    bd = _chunk_width(DH, elt)
    chunks = h * _cdiv(DH, bd)
    target = PROGRAMS_PER_SM * sms
    seg, lanes = SEG_MAX, 1
    if _cdiv(TM, seg) < target:
        lanes = chunks
    while seg > 4 * SEG_UNROLL and _cdiv(TM, seg) * lanes < target:
        seg //= 2  # >= 16: SEG stays a multiple of 16 for the JIT (a SEG = 8 specialization
        # kept half the row loads in flight: compile_sm90.py)
    return SegmentLaunch(seg, lanes, bd, SEG_UNROLL)


def forward_config(
    T: int, M: int, Dv: int, E: int, elt: int, sms: int = DEFAULT_SMS, h: int = 1
) -> ForwardLaunch:
    """The forward's launch table (path, block, tokens, split, unroll) per shape.

    - BLOCK_D = `_chunk_width`: one warp reading 16 bytes per thread, within a core slice; a
      narrower core (bf16 DH < 256) puts TOKENS = 32 x 16 B / (BLOCK_D x elt) tokens in a
      program so that every thread still reads 16 bytes per row.
    - path: "onehot" while the [E_PAD, 16/elt] accumulators per thread are <= ONEHOT_MAX_ACC
      fp32 registers (bf16 E <= 4, fp32 E <= 16, fp64 E <= 25), else "sorted" (the segmented
      sum: no E factor in registers or FMAs, at the price of a per-token sort of the blocks and
      ~32 bytes per selection of gathered metadata).
    - onehot UNROLL: 8 rows per round when the tile needs <= 32 accumulators per thread, else 4
      (registers and the loads in flight: compile_sm90.py). SPLIT: if the programs fall short of
      TARGET = PROGRAMS_PER_SM * sms (decode batches: T < 1056 at Dv = 1024, h = 2 in bf16),
      each token's M selections are split over SPLIT programs (chunks of >= 2 * UNROLL; at most
      ~sqrt(M) splits, which balances the M / SPLIT rounds of the pooling against the SPLIT
      partials the reduce walks), partial tiles in an L2-resident fp32 workspace summed in split
      order by `_split_reduce_kernel`.
    - sorted: `segment_config` over the T * M entries.
    """
    DH = Dv // max(1, h)
    bd = _chunk_width(DH, elt)
    tokens = max(1, 32 * _vec(elt) // bd)
    e_pad = _next_pow2(E)
    per_thread = e_pad * _vec(elt)
    if per_thread > ONEHOT_MAX_ACC:
        s = segment_config(T * M, DH, h, elt, sms)
        return ForwardLaunch("sorted", s.block_d, 1, s.unroll, 1, s.seg, s.lanes)
    unroll = 4  # with ROW_MAXNREG: all 4 in flight; 8 does not fit the registers (sweep, sm_90)
    programs = max(1, _cdiv(T, tokens) * h * _cdiv(DH, bd))
    target = PROGRAMS_PER_SM * sms
    split = 1
    if programs < target:
        cap = max(1, min(M // (2 * unroll), math.isqrt(M)))
        split = max(1, min(_cdiv(target, programs), cap))
    return ForwardLaunch("onehot", bd, split, unroll, 1, 0, 1, tokens)


def bwd_tile(DH: int, elt: int) -> Tuple[int, int, int]:
    """(BLOCK_K, BLOCK_D, num_warps) of `_gather_pool_bwd_kernel`: 16 selections x one 16-byte
    vector per thread per row over 4 warps (bf16: [16, 128] with 2 rows per thread per tile)."""
    bd = max(16, min(_next_pow2(DH), 16 * _vec(elt)))
    return BWD_BLOCK_K, bd, 4


# ----------------------------------------------------------------------------- launchers
def _segment_sum(src, gidx, key, sc, dst, h, load_old, cfg: SegmentLaunch, lanes=None):
    """dst[key[j]] (+)= sum over the sorted entries j of a key of sc[j, core] * src[gidx[j]],
    per core slice; one rounding per destination element (see `_segment_sum_kernel`).

    gidx [TM] int64, key [TM + 1] int64 ascending with key[TM] = -1, sc [TM, h]; src, dst
    [*, Dv] contiguous. No host synchronization: everything below is shaped by TM and Dv."""
    TM = gidx.numel()
    Dv = dst.shape[1]
    DH = Dv // h
    if TM == 0 or Dv == 0:
        return
    acc = torch.float64 if torch.float64 in (src.dtype, dst.dtype) else torch.float32
    seg, bd = cfg.seg, cfg.block_d
    nb = _cdiv(TM, seg)
    chunks = h * _cdiv(DH, bd)
    align = _align(DH, 2)
    rne = _interpreting()
    part = empty_output(nb, 2, Dv, dtype=acc, device=dst.device)
    _segment_sum_kernel[(nb, min(chunks, lanes or cfg.lanes))](
        src, gidx, key, sc, dst, part, TM, Dv, DH, seg,
        H_CORES=h, BLOCK_D=bd, UNROLL=cfg.unroll, ALIGN=align, ACC=_TL_ACC[acc],
        LOAD_OLD=load_old, RNE_BY_HAND=rne, num_warps=1,
        maxnreg=_row_maxnreg(align, src.element_size()),
    )  # fmt: skip
    # The block holding the last entry of each block's last segment (a run end: searchsorted).
    last = torch.clamp(torch.arange(1, nb + 1, device=key.device) * seg, max=TM) - 1
    end_blk = (torch.searchsorted(key[:TM], key[last], right=True) - 1) // seg
    _segment_fixup_kernel[(nb, chunks)](
        key, end_blk, part, dst, TM, Dv, DH, seg,
        H_CORES=h, BLOCK_D=bd, UNROLL=cfg.unroll, ALIGN=align, ACC=_TL_ACC[acc],
        LOAD_OLD=load_old, RNE_BY_HAND=rne, num_warps=1,
    )  # fmt: skip


def _with_sentinel(key: torch.Tensor) -> torch.Tensor:
    """[TM] -> [TM + 1] with key[TM] = -1 (no row), so `key[j + 1]` never reads past the end."""
    return torch.nn.functional.pad(key, (0, 1), value=-1)


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
    path: Optional[str] = None,
    seg: Optional[int] = None,
) -> torch.Tensor:
    """Launch the forward: -> [T, E, Dv] in values.dtype. No autograd.

    block_d / unroll / split / num_warps / path / seg override `forward_config`'s table
    (benchmarks, tests)."""
    T, M, N, Dv, h = _check_inputs(rows, blocks, scores, values)
    assert 1 <= E <= 64, f"E={E}: virtual blocks per token (the one-hot tile's rows)"
    rows, blocks, scores, values = (x.contiguous() for x in (rows, blocks, scores, values))
    if T == 0 or Dv == 0 or M == 0:
        return torch.zeros(T, E, Dv, dtype=values.dtype, device=values.device)
    elt = values.element_size()
    cfg = forward_config(T, M, Dv, E, elt, num_sms(values.device), h)
    path = path or cfg.path
    DH = Dv // h
    if path == "sorted":
        # Entries in (token, block) order: a stable per-token sort of the blocks, the operands
        # gathered into that order. [T, M] -> [T*M]
        sorted_blocks, order = torch.sort(blocks, dim=1, stable=True)
        key = (torch.arange(T, device=rows.device)[:, None] * E + sorted_blocks).reshape(T * M)
        gidx = torch.gather(rows, 1, order).reshape(T * M)
        sc = torch.gather(scores, 1, order[..., None].expand(T, M, h)).reshape(T * M, h)
        s = segment_config(T * M, DH, h, elt, num_sms(values.device))
        s = SegmentLaunch(seg or s.seg, s.lanes, block_d or s.block_d, s.unroll)
        out = torch.zeros(T, E, Dv, dtype=values.dtype, device=values.device)  # empty blocks: 0
        _segment_sum(values, gidx, _with_sentinel(key), sc, out.view(T * E, Dv), h, False, s)
        return out
    out = empty_output(T, E, Dv, dtype=values.dtype, device=values.device)
    bd = block_d or cfg.block_d
    unroll = unroll or cfg.unroll
    split = max(1, min(split or cfg.split, M))
    chunk = triton.cdiv(M, split)
    split = triton.cdiv(M, chunk)  # no empty splits
    acc = _accum_dtype(values.dtype)
    rne = _interpreting()
    dest = out if split == 1 else empty_output(split, T, E, Dv, dtype=acc, device=values.device)
    tokens = cfg.tokens if bd == cfg.block_d else max(1, 32 * _vec(elt) // bd)
    _gather_pool_fwd_kernel[(triton.cdiv(T, tokens), h * triton.cdiv(DH, bd), split)](
        rows, blocks, scores, values, dest, T, M, Dv, DH, chunk,
        E=E, E_PAD=_next_pow2(E), H_CORES=h, BLOCK_D=bd, TOKENS=tokens, UNROLL=unroll,
        ALIGN=_align(DH, elt),
        ACC=_TL_ACC[acc], RNE_BY_HAND=rne, num_warps=num_warps or cfg.num_warps,
        maxnreg=_row_maxnreg(_align(DH, elt), elt),
    )  # fmt: skip
    if split > 1:
        n = T * E * Dv
        _split_reduce_kernel[(triton.cdiv(n, 512),)](
            dest, out, n, split, BLOCK=512, UNROLL=8, RNE_BY_HAND=rne, num_warps=4
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
    block_k: Optional[int] = None,
    block_d: Optional[int] = None,
    seg: Optional[int] = None,
    unroll: Optional[int] = None,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Launch the backward kernels. No autograd.

    Returns (grad_scores [T, M, h] in scores.dtype or None, values gradient or None).

    The values gradient goes
    - into `values_grad_out` when given (a contiguous [N, Dv] float tensor, e.g. Megatron's
      main_grad; it is added to, not overwritten, and returned). fp32/fp64: atomic adds (the
      default) or the segmented sum (`deterministic`). bf16/fp16: always the segmented sum,
      which sums each touched row's contribution in fp32 and adds it once, so every touched
      element is rounded once per call (and the result is deterministic whatever
      `deterministic` says); untouched rows are not read.
    - else into a fresh zeroed [N, Dv] tensor in values.dtype (the gradient itself): fp32/fp64
      tables as above; bf16/fp16 tables get their touched rows summed in fp32 and stored rounded
      once by the segmented sum. No [N, Dv] temporary in the accumulation dtype exists.
    block_k / block_d / seg / unroll override the tables (tests: a small seg cuts segments
    often; a large block_k / unroll makes fewer, wider interpreted steps at 10^4 selections).
    """
    T, M, N, Dv, h = _check_inputs(rows, blocks, scores, values)
    E = grad_pooled.shape[1]
    assert grad_pooled.shape == (T, E, Dv), (grad_pooled.shape, (T, E, Dv))
    TM = T * M
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
    # Atomics only into fp32/fp64 destinations from 4/8-byte tables: a bf16 destination must
    # see each row's whole sum at once, and with a 2-byte table Triton lays the fp32 atomic
    # (4 x 4 bytes per thread) out unlike the 16-byte row load (8 x 2 bytes per thread), i.e. a
    # shared-memory conversion with barriers between the row loads (compile_sm90.py): those
    # take the segmented sum (deterministic) instead.
    wide = gvalues is not None and gvalues.dtype in (torch.float32, torch.float64)
    atomic_dv = need_values and wide and not deterministic and values.element_size() >= 4
    DH = Dv // h
    elt = values.element_size()
    if need_scores or atomic_dv:
        bk, bd, warps = bwd_tile(DH, max(elt, grad_pooled.element_size()))
        bk, bd = block_k or bk, block_d or bd
        _gather_pool_bwd_kernel[(triton.cdiv(TM, bk),)](
            grad_pooled, rows, blocks, scores, values,
            gscores if need_scores else grad_pooled,  # dummy pointer when unused
            gvalues if atomic_dv else grad_pooled,
            TM, M, Dv, DH,
            E=E, H_CORES=h, H_PAD=_next_pow2(h), BLOCK_K=bk, BLOCK_D=bd, ALIGN=_align(DH, elt), ACC=_TL_ACC[acc],
            NEED_GS=need_scores, ATOMIC_DV=atomic_dv, RNE_BY_HAND=_interpreting(),
            num_warps=warps,
        )  # fmt: skip
    if need_values and not atomic_dv:
        # Entries in table-row order (stable: equal rows keep selection order), the operands
        # gathered into that order: each row's run is then a segment of the segmented sum.
        sorted_rows, order = torch.sort(rows.reshape(TM), stable=True)
        gidx = (order // M) * E + blocks.reshape(TM)[order]  # grad_pooled row (t, block)
        sc = scores.reshape(TM, h)[order]
        cfg = segment_config(TM, DH, h, grad_pooled.element_size(), num_sms(values.device))
        cfg = SegmentLaunch(seg or cfg.seg, cfg.lanes, block_d or cfg.block_d, unroll or cfg.unroll)
        _segment_sum(grad_pooled.view(T * E, Dv), gidx, _with_sentinel(sorted_rows), sc, gvalues,
                     h, values_grad_out is not None, cfg)  # fmt: skip
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
