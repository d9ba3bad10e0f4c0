"""TDQKR phase 2: exact rescoring of the m x m candidate grid and top-m, the grid never in memory.

Math (oracle: `reference.tucker_topm`): after phase 1 (rank-1 preselection of m rows and m columns,
left in torch: a [T, H, n'] projection and torch.topk), the candidate cell (a, b) of token t, head H
scores G[a, b] = S~_row[a] C S~_col[b]^T with C = sum_i C_i; the m best cells win, in descending G.
Winners are the top m by (G descending, flat cell a * m + b ascending) in every path, so ties are
broken the same way by both kernels (torch.topk's tie order is unspecified).

Floors per (token, head): read 2*m*r candidate scores (+ r^2 core), write m winners:
    bytes = 2*T*H*m*r*elt + 8*T*H*m;  FLOPs = T*H*(2*m*r^2 + 2*m^2*r) for the grid.
The reference writes and re-reads the [T, H, m, m] grid on top (2*T*H*m^2*elt bytes and topk's own
passes): at m = 768 (UltraMemV2), T = 8192, H = 2 that is 9.7e9 cells (19 GB in bf16).
Selection is compare work, not FLOPs: it is what the two kernels below spend their time on.

Design trade-off, m <= REGISTER_MAX_M (64): `_tucker_select_kernel`.
- One program per (token, head) holds the whole [M_PAD, M_PAD] grid in registers (M_PAD =
  next_pow2(m)), built from the [m, r] candidate rows/columns and the [r, r] summed core.
- Selection is a radix select, not m rounds of argmax: the scores are mapped to order-preserving
  unsigned integer keys and the m-th largest key is found bit by bit (32 count-reductions over the
  tile for fp32 scores, 64 for fp64); the winners (keys above the threshold plus the first ties at
  it, in flat-index order) are compacted with a prefix sum and stored with their scores.

Design trade-off, REGISTER_MAX_M < m <= MAX_M (1024): `_tucker_select_tiled_kernel`. The grid
(up to 2^20 cells per (token, head)) is streamed through [BLOCK_A, BLOCK_B] register tiles and
recomputed when needed (2r FLOPs per cell is cheaper than storing it); one program per (t, head):
1. Lower bound: the m-th largest score of the top-left S x S block (S^2 >= 4m cells, in phase-1
   order, where the winners concentrate) is <= the grid's m-th largest: tau.
2. One pass over the grid compacts every cell >= tau (score, flat index) into a per-program
   scratch of CAP = next_pow2(2m) slots. Tiles whose bound cannot reach tau are skipped without
   computing them: G[a, b] <= sum_s max(P_s Y_s) over the tile's min/max of P = S~_row C and Y =
   S~_col (plus a rounding margin of 4 (r+1) eps sum_s max|P_s| max|Y_s|, so no cell >= tau is
   ever skipped). On random data (numpy simulation at n' = 1616, m = 768, r = 2, 2026-11) the
   candidates number ~1.1-1.3 m and ~11-30 % of the tiles are live; on a GPU: not yet measured.
3. If m <= count <= CAP: radix select (value key, then the flat index among ties at the
   threshold) over the scratch, in registers. Otherwise (many ties, adversarial data) the exact
   fallback: the same two radix selects as passes over the whole grid (KEY_BITS + log2(m^2) + 1
   passes), slow but exact. Each program reports which path it took (`status`).
Memory: the scratch is T*H*CAP*(4 + comp bytes), launched in chunks of at most SCRATCH_BYTES; no
[T, H, m, m] tensor exists at any point.

Both kernels compute scores in fp32 (fp64 for fp64 inputs) whatever the input dtype, so for
bf16/fp16 inputs the selection is *more* exact than the reference's (which rounds the grid to bf16
first). The per-core scores of the winners and the virtual indices are computed in torch from the
winner indices: that is T*H*m*h*r^2 FLOPs on gathered [T, H, m, r] rows, and it keeps the backward
to s_row, s_col and cores exactly the reference's autograd graph (the selection itself has no
gradient). m > MAX_M and tensors that Triton cannot run on use the reference.
"""

import math
from typing import Optional, Tuple

import torch

from .. import reference
from .gather import HAVE_TRITON, _next_pow2, empty_output, use_triton

if HAVE_TRITON:
    import triton
    import triton.language as tl

__all__ = ["tucker_topm_fused", "phase2_select", "MAX_M", "REGISTER_MAX_M"]

# The largest m whose [M_PAD, M_PAD] grid + keys one program keeps in registers without spilling:
# compiled for sm_90 with the JIT's attributes, M_PAD = 128 spills at 8 and at 16 warps (32-40
# STL/LDL in bf16/fp32, 278 in fp64: compile_sm90.py); M_PAD <= 64 does not. Larger m take the
# tiled kernel (the same selection; tests/kernels/test_topm.py checks both paths agree).
REGISTER_MAX_M = 64
MAX_M = 1024  # tiled kernel: flat cells < 2^20, the scratch's [2048] keys fit one program
# Tiled kernel: 4 warps (sm_90, m = 768 bf16: 136 registers, no spills; at 8 warps ptxas holds
# 128 registers and spills 6-13 STL/LDL: compile_sm90.py).
TILED_WARPS = 4
SCRATCH_BYTES = 256 << 20  # per launch; larger T*H run as several launches over one scratch
_NAMESPACE = "megatron_ultramem"


if HAVE_TRITON:

    @triton.jit
    def _tucker_select_kernel(
        sr_ptr,  # [T*H, m, R] candidate rows' rank-r scores (phase-1 winners)
        sc_ptr,  # [T*H, m, R] candidate columns' rank-r scores
        csum_ptr,  # [H, R, R] summed core
        out_idx_ptr,  # [T*H, m] int64: flat cell a * m + b of each winner, in flat-index order
        out_val_ptr,  # [T*H, m] its summed score (COMP dtype)
        H,
        m,
        R: tl.constexpr,
        M_PAD: tl.constexpr,
        COMP: tl.constexpr,  # fp32 or fp64: grid arithmetic
        KEY_INT: tl.constexpr,  # int32 / int64: same width as COMP, for the bitcast
        KEY_UINT: tl.constexpr,  # uint32 / uint64: the order-preserving key
        KEY_BITS: tl.constexpr,
        SIGN: tl.constexpr,  # -2**(KEY_BITS-1): the sign bit as a signed literal
    ):
        pid = tl.program_id(0)  # = t * H + head
        head = pid % H
        base = pid.to(tl.int64) * m * R
        a = tl.arange(0, M_PAD)
        mask_a = a < m
        # G[a, b] = sum_s (sum_r sr[a, r] C[r, s]) sc[b, s]  -> [M_PAD, M_PAD], registers only
        grid = tl.zeros((M_PAD, M_PAD), dtype=COMP)
        for s in tl.static_range(R):
            p = tl.zeros((M_PAD,), dtype=COMP)
            for r in tl.static_range(R):
                c = tl.load(csum_ptr + (head * R + r) * R + s).to(COMP)
                p += tl.load(sr_ptr + base + a * R + r, mask=mask_a, other=0.0).to(COMP) * c
            y = tl.load(sc_ptr + base + a * R + s, mask=mask_a, other=0.0).to(COMP)
            grid += p[:, None] * y[None, :]
        valid = mask_a[:, None] & mask_a[None, :]
        # Order-preserving key: flip all bits of negatives, only the sign bit of non-negatives.
        # Padding cells get key 0, below every finite or infinite score.
        bits = grid.to(KEY_INT, bitcast=True)
        key = (bits ^ ((bits >> (KEY_BITS - 1)) | SIGN)).to(KEY_UINT, bitcast=True)
        key = tl.where(valid, key, 0)
        # Radix select: thr = largest key with count(key >= thr) >= m, i.e. the m-th largest key.
        thr = tl.zeros((), dtype=KEY_UINT)
        for i in tl.static_range(KEY_BITS):
            cand = thr | (tl.full((), 1, KEY_UINT) << (KEY_BITS - 1 - i))
            cnt = tl.sum(tl.sum((key >= cand).to(tl.int32), axis=1), axis=0)
            thr = tl.where(cnt >= m, cand, thr)
        # Winners: every key above thr, then ties at thr in flat-index order until there are m.
        above = key > thr
        n_above = tl.sum(tl.sum(above.to(tl.int32), axis=1), axis=0)
        above = tl.reshape(above, (M_PAD * M_PAD,))  # row-major flatten, cell = a * M_PAD + b
        tie = tl.reshape(key == thr, (M_PAD * M_PAD,)).to(tl.int32)
        tie_rank = tl.cumsum(tie, axis=0) - tie  # exclusive prefix count of ties
        take = above | ((tie != 0) & (tie_rank < m - n_above))
        pos = tl.cumsum(take.to(tl.int32), axis=0) - 1  # slot of each winner in [0, m)
        cell = tl.arange(0, M_PAD * M_PAD)
        flat = (cell // M_PAD) * m + cell % M_PAD  # index in the unpadded m x m grid
        out = pid.to(tl.int64) * m + pos
        tl.store(out_idx_ptr + out, flat.to(tl.int64), mask=take)
        tl.store(out_val_ptr + out, tl.reshape(grid, (M_PAD * M_PAD,)), mask=take)

    # ------------------------------------------------------------------ tiled kernel (m > 128)
    @triton.jit
    def _order_keys(x, valid, KEY_INT: tl.constexpr, KEY_UINT: tl.constexpr,
                    KEY_BITS: tl.constexpr, SIGN: tl.constexpr):  # fmt: skip
        """Order-preserving unsigned keys: flip all bits of negatives, only the sign bit of
        non-negatives. Invalid (padding) cells get key 0, below every finite or infinite score."""
        bits = x.to(KEY_INT, bitcast=True)
        key = (bits ^ ((bits >> (KEY_BITS - 1)) | SIGN)).to(KEY_UINT, bitcast=True)
        return tl.where(valid, key, 0)

    @triton.jit
    def _kth_largest_key(key, k, KEY_UINT: tl.constexpr, KEY_BITS: tl.constexpr):
        """The k-th largest of a 1-D key tensor: the largest thr with count(key >= thr) >= k."""
        thr = tl.zeros((), dtype=KEY_UINT)
        one = tl.full((), 1, KEY_UINT)
        for i in range(KEY_BITS):
            cand = thr | (one << (tl.full((), KEY_BITS - 1, tl.int32) - i).to(KEY_UINT))
            cnt = tl.sum((key >= cand).to(tl.int32), axis=0)
            thr = tl.where(cnt >= k, cand, thr)
        return thr

    @triton.jit
    def _kth_smallest_index(idx, sel, k, idx_bits):
        """The k-th smallest of the distinct int32 indices where sel (1 <= k <= count(sel)): the
        largest x with count(sel & idx < x) < k."""
        x = tl.zeros((), dtype=tl.int32)
        one = tl.full((), 1, tl.int32)
        for i in range(idx_bits):
            cand = x | (one << (idx_bits - 1 - i))
            c = tl.sum((sel & (idx < cand)).to(tl.int32), axis=0)
            x = tl.where(c < k, cand, x)
        return x

    @triton.jit
    def _row_proj(sr_ptr, csum_ptr, base, head, offs_a, mask_a, s: tl.constexpr,
                  R: tl.constexpr, BA: tl.constexpr, COMP: tl.constexpr):  # fmt: skip
        """P[a, s] = sum_r S~_row[a, r] C[r, s] for the tile's rows. [BA]"""
        p = tl.zeros((BA,), dtype=COMP)
        for r in tl.static_range(R):
            c = tl.load(csum_ptr + (head * R + r) * R + s).to(COMP)
            p += tl.load(sr_ptr + base + offs_a * R + r, mask=mask_a, other=0.0).to(COMP) * c
        return p

    @triton.jit
    def _grid_tile(sr_ptr, sc_ptr, csum_ptr, base, head, a0, b0, m, R: tl.constexpr,
                   BA: tl.constexpr, BB: tl.constexpr, COMP: tl.constexpr):  # fmt: skip
        """Scores of cells [a0, a0 + BA) x [b0, b0 + BB): (grid, valid, flat cell) [BA, BB].

        The one place the tiled kernel computes scores, so the lower-bound sample and the passes
        see bitwise the same values."""
        offs_a = a0 + tl.arange(0, BA)
        offs_b = b0 + tl.arange(0, BB)
        mask_a = offs_a < m
        mask_b = offs_b < m
        grid = tl.zeros((BA, BB), dtype=COMP)
        for s in tl.static_range(R):
            p = _row_proj(sr_ptr, csum_ptr, base, head, offs_a, mask_a, s, R, BA, COMP)
            y = tl.load(sc_ptr + base + offs_b * R + s, mask=mask_b, other=0.0).to(COMP)
            grid += p[:, None] * y[None, :]
        valid = mask_a[:, None] & mask_b[None, :]
        flat = offs_a[:, None] * m + offs_b[None, :]
        return grid, valid, flat

    @triton.jit
    def _tile_bound(sr_ptr, sc_ptr, csum_ptr, base, head, a0, b0, m, R: tl.constexpr,
                    BA: tl.constexpr, BB: tl.constexpr, COMP: tl.constexpr):  # fmt: skip
        """(ub, ab): ub >= every score of the tile up to rounding, ab = sum_s max|P_s| max|Y_s|
        (the scale of that rounding)."""
        offs_a = a0 + tl.arange(0, BA)
        offs_b = b0 + tl.arange(0, BB)
        mask_a = offs_a < m
        mask_b = offs_b < m
        ub = tl.zeros((), dtype=COMP)
        ab = tl.zeros((), dtype=COMP)
        for s in tl.static_range(R):
            p = _row_proj(sr_ptr, csum_ptr, base, head, offs_a, mask_a, s, R, BA, COMP)
            y = tl.load(sc_ptr + base + offs_b * R + s, mask=mask_b, other=0.0).to(COMP)
            p_hi = tl.max(tl.where(mask_a, p, -float("inf")), axis=0)
            p_lo = tl.min(tl.where(mask_a, p, float("inf")), axis=0)
            y_hi = tl.max(tl.where(mask_b, y, -float("inf")), axis=0)
            y_lo = tl.min(tl.where(mask_b, y, float("inf")), axis=0)
            hi = tl.maximum(p_hi * y_hi, p_hi * y_lo)
            ub += tl.maximum(hi, tl.maximum(p_lo * y_hi, p_lo * y_lo))
            ab += tl.maximum(tl.abs(p_hi), tl.abs(p_lo)) * tl.maximum(tl.abs(y_hi), tl.abs(y_lo))
        return ub, ab

    @triton.jit
    def _grid_count(sr_ptr, sc_ptr, csum_ptr, base, head, m, thr, x, MODE: tl.constexpr,
                    R: tl.constexpr, BA: tl.constexpr, BB: tl.constexpr, COMP: tl.constexpr,
                    KEY_INT: tl.constexpr, KEY_UINT: tl.constexpr, KEY_BITS: tl.constexpr,
                    SIGN: tl.constexpr):  # fmt: skip
        """One pass over the whole grid (fallback): count key >= thr (MODE 0), key > thr (1), or
        key == thr with flat cell < x (2)."""
        cnt = tl.zeros((), dtype=tl.int32)
        for a0 in range(0, m, BA):
            for b0 in range(0, m, BB):
                g, valid, flat = _grid_tile(sr_ptr, sc_ptr, csum_ptr, base, head, a0, b0, m,
                                            R, BA, BB, COMP)  # fmt: skip
                key = _order_keys(g, valid, KEY_INT, KEY_UINT, KEY_BITS, SIGN)
                if MODE == 0:
                    hit = key >= thr
                elif MODE == 1:
                    hit = key > thr
                else:
                    hit = (key == thr) & (flat < x)
                hit = hit & valid
                cnt += tl.sum(tl.sum(hit.to(tl.int32), axis=1), axis=0)
        return cnt

    @triton.jit
    def _tucker_select_tiled_kernel(
        sr_ptr,  # [T*H, m, R] candidate rows' rank-r scores (phase-1 winners)
        sc_ptr,  # [T*H, m, R] candidate columns' rank-r scores
        csum_ptr,  # [H, R, R] summed core
        out_idx_ptr,  # [T*H, m] int64: flat cell a * m + b of each winner (any order)
        out_val_ptr,  # [T*H, m] its summed score (COMP dtype)
        scr_val_ptr,  # [programs, cap] scratch: candidate scores (COMP)
        scr_idx_ptr,  # [programs, cap] scratch: candidate flat cells (int32)
        status_ptr,  # [T*H] int32: 0 scratch path, 1 exact fallback
        H,
        m,
        cap,  # scratch slots per program (<= CAP_PAD); smaller only in tests
        idx_bits,  # bits of m*m - 1
        R: tl.constexpr,
        S_PAD: tl.constexpr,  # side of the lower-bound sample block
        BA: tl.constexpr,
        BB: tl.constexpr,
        CAP_PAD: tl.constexpr,
        MARGIN: tl.constexpr,  # 4 (R + 1) eps(COMP): the bound's rounding margin
        COMP: tl.constexpr,
        KEY_INT: tl.constexpr,
        KEY_UINT: tl.constexpr,
        KEY_BITS: tl.constexpr,
        SIGN: tl.constexpr,
    ):
        pid = tl.program_id(0)  # = t * H + head (within this launch's chunk)
        head = pid % H
        base = pid.to(tl.int64) * m * R
        scr = pid.to(tl.int64) * cap
        out = pid.to(tl.int64) * m
        # 1. tau: the m-th largest score of the top-left block (>= m valid cells) bounds the m-th
        #    largest of the grid from below. (Names differ per stage: Triton types each variable
        #    once, and the stages' tiles have different shapes.)
        g_s, valid_s, _ = _grid_tile(sr_ptr, sc_ptr, csum_ptr, base, head, 0, 0, m,
                                     R, S_PAD, S_PAD, COMP)  # fmt: skip
        key_s = _order_keys(g_s, valid_s, KEY_INT, KEY_UINT, KEY_BITS, SIGN)
        thr_lb = _kth_largest_key(tl.reshape(key_s, (S_PAD * S_PAD,)), m, KEY_UINT, KEY_BITS)
        tau = tl.max(tl.max(tl.where(key_s == thr_lb, g_s, -float("inf")), axis=1), axis=0)
        # 2. Compact every cell with key >= thr_lb into the scratch; skip tiles that cannot
        #    reach tau.
        cnt = tl.zeros((), dtype=tl.int32)
        for a0 in range(0, m, BA):
            for b0 in range(0, m, BB):
                ub, ab = _tile_bound(sr_ptr, sc_ptr, csum_ptr, base, head, a0, b0, m,
                                     R, BA, BB, COMP)  # fmt: skip
                # live unless provably below tau; NaN anywhere keeps the tile live
                live = (ub + MARGIN * ab >= tau) | (ub != ub) | (tau != tau)
                if live:
                    g_t, valid_t, flat_t = _grid_tile(sr_ptr, sc_ptr, csum_ptr, base, head, a0, b0,
                                                      m, R, BA, BB, COMP)  # fmt: skip
                    key_t = _order_keys(g_t, valid_t, KEY_INT, KEY_UINT, KEY_BITS, SIGN)
                    take_t = tl.reshape(valid_t & (key_t >= thr_lb), (BA * BB,)).to(tl.int32)
                    pos_t = cnt + tl.cumsum(take_t, axis=0) - 1
                    keep = (take_t != 0) & (pos_t < cap)
                    tl.store(scr_val_ptr + scr + pos_t, tl.reshape(g_t, (BA * BB,)), mask=keep)
                    tl.store(scr_idx_ptr + scr + pos_t, tl.reshape(flat_t, (BA * BB,)), mask=keep)
                    cnt += tl.sum(take_t, axis=0)
        tl.debug_barrier()  # the scratch is re-read below by other threads of this program
        if (cnt >= m) & (cnt <= cap):
            # 3. Select among the cnt candidates, in registers.
            j = tl.arange(0, CAP_PAD)
            mj = j < cnt
            v = tl.load(scr_val_ptr + scr + j, mask=mj, other=0.0, cache_modifier=".cg")
            idx = tl.load(scr_idx_ptr + scr + j, mask=mj, other=0, cache_modifier=".cg")
            key_c = _order_keys(v, mj, KEY_INT, KEY_UINT, KEY_BITS, SIGN)
            thr_c = _kth_largest_key(key_c, m, KEY_UINT, KEY_BITS)
            above = key_c > thr_c
            tie = mj & (key_c == thr_c)
            need_c = m - tl.sum(above.to(tl.int32), axis=0)  # >= 1 ties, smallest cells first
            x_c = _kth_smallest_index(idx, tie, need_c, idx_bits)
            take_c = (above | (tie & (idx <= x_c))).to(tl.int32)  # exactly m
            pos_c = tl.cumsum(take_c, axis=0) - 1
            tl.store(out_idx_ptr + out + pos_c, idx.to(tl.int64), mask=take_c != 0)
            tl.store(out_val_ptr + out + pos_c, v, mask=take_c != 0)
            tl.store(status_ptr + pid, 0)
        else:
            # Exact fallback: the same selection as passes over the whole grid.
            thr_f = tl.zeros((), dtype=KEY_UINT)
            one = tl.full((), 1, KEY_UINT)
            for i in range(KEY_BITS):
                cand_k = thr_f | (one << (tl.full((), KEY_BITS - 1, tl.int32) - i).to(KEY_UINT))
                c_k = _grid_count(sr_ptr, sc_ptr, csum_ptr, base, head, m, cand_k, 0, 0, R, BA,
                                  BB, COMP, KEY_INT, KEY_UINT, KEY_BITS, SIGN)  # fmt: skip
                thr_f = tl.where(c_k >= m, cand_k, thr_f)
            need_f = m - _grid_count(sr_ptr, sc_ptr, csum_ptr, base, head, m, thr_f, 0, 1, R, BA,
                                     BB, COMP, KEY_INT, KEY_UINT, KEY_BITS, SIGN)  # fmt: skip
            x_f = tl.zeros((), dtype=tl.int32)
            one_i = tl.full((), 1, tl.int32)
            for i in range(idx_bits):
                cand_i = x_f | (one_i << (idx_bits - 1 - i))
                c_i = _grid_count(sr_ptr, sc_ptr, csum_ptr, base, head, m, thr_f, cand_i, 2, R, BA,
                                  BB, COMP, KEY_INT, KEY_UINT, KEY_BITS, SIGN)  # fmt: skip
                x_f = tl.where(c_i < need_f, cand_i, x_f)
            n = tl.zeros((), dtype=tl.int32)
            for a0 in range(0, m, BA):
                for b0 in range(0, m, BB):
                    g_f, valid_f, flat_f = _grid_tile(sr_ptr, sc_ptr, csum_ptr, base, head, a0, b0,
                                                      m, R, BA, BB, COMP)  # fmt: skip
                    key_f = _order_keys(g_f, valid_f, KEY_INT, KEY_UINT, KEY_BITS, SIGN)
                    sel = valid_f & ((key_f > thr_f) | ((key_f == thr_f) & (flat_f <= x_f)))
                    take_f = tl.reshape(sel, (BA * BB,)).to(tl.int32)
                    pos_f = n + tl.cumsum(take_f, axis=0) - 1
                    tl.store(out_idx_ptr + out + pos_f, tl.reshape(flat_f, (BA * BB,)).to(tl.int64),
                             mask=take_f != 0)  # fmt: skip
                    flat_g = tl.reshape(g_f, (BA * BB,))
                    tl.store(out_val_ptr + out + pos_f, flat_g, mask=take_f != 0)
                    n += tl.sum(take_f, axis=0)
            tl.store(status_ptr + pid, 1)


# ----------------------------------------------------------------------------- launchers
def _key_args(fp64: bool) -> dict:
    if fp64:
        return dict(
            COMP=tl.float64, KEY_INT=tl.int64, KEY_UINT=tl.uint64, KEY_BITS=64, SIGN=-(2**63)
        )
    return dict(
        COMP=tl.float32, KEY_INT=tl.int32, KEY_UINT=tl.uint32, KEY_BITS=32, SIGN=-(2**31)
    )


def tiled_config(m: int, block_a: int = 32, block_b: int = 64) -> dict:
    """Compile-time sizes of the tiled kernel for m (see the module doc)."""
    return dict(
        S_PAD=max(4, min(_next_pow2(m), _next_pow2(math.ceil(math.sqrt(4 * m))))),
        BA=min(block_a, max(4, _next_pow2(m))),
        BB=min(block_b, max(4, _next_pow2(m))),
        CAP_PAD=max(16, _next_pow2(2 * m)),
    )


def phase2_select(
    sr: torch.Tensor,
    sc: torch.Tensor,
    summed_core: torch.Tensor,
    m: int,
    impl: str = "auto",
    cap: Optional[int] = None,
    block_a: int = 32,
    block_b: int = 64,
    return_status: bool = False,
):
    """Launch a selection kernel. No autograd.

    Args:
        sr, sc: [T, H, m, r] candidate row / column scores; summed_core: [H, r, r].
        impl: "register" (m <= REGISTER_MAX_M), "tiled" (m <= MAX_M) or "auto" (register when it
            fits). cap, block_a, block_b: tiled kernel's scratch slots and tile (tests, benchmarks).
    Returns:
        [T, H, m] int64 flat cells a * m + b of the winners, by descending summed score, ties by
        ascending cell; with return_status also the tiled kernel's [T, H] int32 path flags (0
        scratch, 1 exact fallback; all 0 for the register kernel).
    """
    T, H, mm, r = sr.shape
    assert mm == m and sc.shape == sr.shape and summed_core.shape == (H, r, r)
    if impl == "auto":
        impl = "register" if m <= REGISTER_MAX_M else "tiled"
    assert impl in ("register", "tiled"), impl
    limit = REGISTER_MAX_M if impl == "register" else MAX_M
    assert 1 <= m <= limit, f"m={m} > {limit}: too large for the {impl} kernel"
    fp64 = torch.float64 in (sr.dtype, sc.dtype, summed_core.dtype)
    comp = torch.float64 if fp64 else torch.float32
    TH = T * H
    idx = empty_output(TH, m, dtype=torch.int64, device=sr.device)
    val = empty_output(TH, m, dtype=comp, device=sr.device)
    status = torch.zeros(TH, dtype=torch.int32, device=sr.device)
    if TH == 0:
        return (idx.view(T, H, m), status.view(T, H)) if return_status else idx.view(T, H, m)
    sr, sc, csum = sr.contiguous(), sc.contiguous(), summed_core.to(comp).contiguous()
    if impl == "register":
        m_pad = max(4, _next_pow2(m))
        _tucker_select_kernel[(TH,)](
            sr, sc, csum, idx, val, H, m,
            R=r, M_PAD=m_pad, num_warps=max(1, min(16, m_pad * m_pad // 1024)), **_key_args(fp64),
        )  # fmt: skip
        # Winners come in flat-index order: one stable sort by descending score. [T*H, m]
        order = torch.sort(val, dim=-1, descending=True, stable=True).indices
        top = torch.gather(idx, 1, order)
    else:
        cfg = tiled_config(m, block_a, block_b)
        cap = cfg["CAP_PAD"] if cap is None else cap
        assert 0 <= cap <= cfg["CAP_PAD"], (cap, cfg["CAP_PAD"])  # cap < m forces the fallback
        slot_bytes = max(1, cap) * (torch.finfo(comp).bits // 8 + 4)
        chunk = max(H, (SCRATCH_BYTES // slot_bytes) // H * H)  # whole tokens: head = pid % H
        rows = min(TH, chunk)
        scr_val = torch.empty(rows, max(1, cap), dtype=comp, device=sr.device)
        scr_idx = torch.empty(rows, max(1, cap), dtype=torch.int32, device=sr.device)
        srf, scf = sr.view(TH, m, r), sc.view(TH, m, r)
        eps = torch.finfo(comp).eps
        for lo in range(0, TH, chunk):
            hi = min(TH, lo + chunk)
            _tucker_select_tiled_kernel[(hi - lo,)](
                srf[lo:hi], scf[lo:hi], csum, idx[lo:hi], val[lo:hi], scr_val, scr_idx,
                status[lo:hi], H, m, cap, max(1, (m * m - 1).bit_length()), R=r,
                MARGIN=4.0 * (r + 1) * eps, num_warps=TILED_WARPS, **cfg, **_key_args(fp64),
            )  # fmt: skip
        # Winners come in scratch order: sort by cell, then stably by descending score. [T*H, m]
        idx, order = torch.sort(idx, dim=-1)
        val = torch.gather(val, 1, order)
        order = torch.sort(val, dim=-1, descending=True, stable=True).indices
        top = torch.gather(idx, 1, order)
    top = top.view(T, H, m)
    return (top, status.view(T, H)) if return_status else top


if HAVE_TRITON:

    @torch.library.custom_op(f"{_NAMESPACE}::tucker_phase2_select", mutates_args=())
    def _phase2_select_op(
        sr: torch.Tensor, sc: torch.Tensor, summed_core: torch.Tensor, m: int
    ) -> torch.Tensor:
        return phase2_select(sr, sc, summed_core, m)

    @_phase2_select_op.register_fake
    def _(sr, sc, summed_core, m):
        T, H = sr.shape[:2]
        return sr.new_empty(T, H, m, dtype=torch.int64)


def tucker_topm_fused(
    s_row: torch.Tensor,
    s_col: torch.Tensor,
    cores: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    m: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """TDQKR two-phase top-m with a fused phase 2; same contract as `reference.tucker_topm`.

    Args:
        s_row, s_col: [T, H, n', r] rank-r row / column scores.
        cores: [H, h, r, r] Tucker cores; u, v: [H, r] preselection vectors.
        m: candidates per side and winners per head (the kernel handles m <= MAX_M).
    Returns:
        virtual indices [T, H, m] int64 by descending summed score (ties by ascending candidate
        cell, which may differ from torch.topk's unspecified tie order) and per-core scores
        [T, H, m, h], differentiable w.r.t. s_row, s_col and cores.
    """
    if m > MAX_M or not use_triton(s_row):
        return reference.tucker_topm(s_row, s_col, cores, u, v, m)
    T, H, n_side, r = s_row.shape
    # Phase 1 (as in the reference): rank-1 preselection. [T, H, n'] -> top-m indices [T, H, m]
    i_row = torch.topk(torch.einsum("thar,hr->tha", s_row, u), m, dim=-1).indices
    i_col = torch.topk(torch.einsum("thbr,hr->thb", s_col, v), m, dim=-1).indices
    sr = torch.gather(s_row, 2, i_row[..., None].expand(T, H, m, r))  # [T, H, m, r]
    sc = torch.gather(s_col, 2, i_col[..., None].expand(T, H, m, r))  # [T, H, m, r]
    # Phase 2 in the kernel: winners' flat cells a * m + b. [T, H, m]
    with torch.no_grad():
        summed = (
            cores.detach()
            .to(torch.float64 if cores.dtype == torch.float64 else torch.float32)
            .sum(1)
        )
        top = _phase2_select_op(sr.detach(), sc.detach(), summed, m)
    a, b = top // m, top % m
    # Differentiable tail, the reference's ops on the winners only. [T, H, m, r] -> [T, H, m, h]
    sr_w = torch.gather(sr, 2, a[..., None].expand(T, H, m, r))
    sc_w = torch.gather(sc, 2, b[..., None].expand(T, H, m, r))
    core_scores = torch.einsum("thmr,hirs,thms->thmi", sr_w, cores, sc_w)
    virtual = torch.gather(i_row, 2, a) * n_side + torch.gather(i_col, 2, b)
    return virtual, core_scores
