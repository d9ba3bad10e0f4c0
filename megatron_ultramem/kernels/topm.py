"""TDQKR phase 2: exact rescoring of the m x m candidate grid and top-m, the grid never in memory.

Math (oracle: `reference.tucker_topm`): after phase 1 (rank-1 preselection of m rows and m columns,
left in torch: a [T, H, n'] projection and torch.topk), the candidate cell (a, b) of token t, head H
scores G[a, b] = S~_row[a] C S~_col[b]^T with C = sum_i C_i; the m best cells win, in descending G.

Design trade-off.
- One program per (token, head) holds the whole [M_PAD, M_PAD] grid in registers (M_PAD =
  next_pow2(m), m <= 128), built from the [m, r] candidate rows/columns and the [r, r] summed core:
  the grid never touches memory (the reference writes and re-reads T*H*m^2 scores).
- Selection is a radix select, not m rounds of argmax: the scores are mapped to order-preserving
  unsigned integer keys and the m-th largest key is found bit by bit (32 count-reductions over the
  tile for fp32 scores, 64 for fp64) instead of m max-reductions; the winners (keys above the
  threshold plus the first ties at it, in flat-index order) are compacted with a prefix sum and
  stored with their scores. A small torch.sort of the [T, H, m] winner scores then puts them in
  descending order like torch.topk (stable: equal scores keep flat-index order).
- Scores are computed in fp32 (fp64 for fp64 inputs) whatever the input dtype, so for bf16/fp16
  inputs the selection is *more* exact than the reference's (which rounds the grid to bf16 first).
- The per-core scores of the winners and the virtual indices are computed in torch from the winner
  indices: that is T*H*m*h*r^2 FLOPs on gathered [T, H, m, r] rows, and it keeps the backward to
  s_row, s_col and cores exactly the reference's autograd graph (the selection itself has no
  gradient).
- m > 128 (the tile would not fit registers) and tensors that Triton cannot run on use the
  reference.
"""

from typing import Tuple

import torch

from .. import reference
from .gather import HAVE_TRITON, _next_pow2, empty_output, use_triton

if HAVE_TRITON:
    import triton
    import triton.language as tl

__all__ = ["tucker_topm_fused", "MAX_M"]

MAX_M = 128  # a [128, 128] fp32 tile + its keys is the most one program keeps in registers
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


def phase2_select(
    sr: torch.Tensor, sc: torch.Tensor, summed_core: torch.Tensor, m: int
) -> torch.Tensor:
    """Launch the selection kernel. No autograd.

    Args:
        sr, sc: [T, H, m, r] candidate row / column scores; summed_core: [H, r, r].
    Returns:
        [T, H, m] int64 flat cells a * m + b of the winners, by descending summed score.
    """
    T, H, mm, r = sr.shape
    assert mm == m and sc.shape == sr.shape and summed_core.shape == (H, r, r)
    assert 1 <= m <= MAX_M, f"m={m} > {MAX_M}: the grid tile would not fit in registers"
    fp64 = torch.float64 in (sr.dtype, sc.dtype, summed_core.dtype)
    comp = torch.float64 if fp64 else torch.float32
    idx = empty_output(T * H, m, dtype=torch.int64, device=sr.device)
    val = empty_output(T * H, m, dtype=comp, device=sr.device)
    if T * H == 0:
        return idx.view(T, H, m)
    m_pad = max(4, _next_pow2(m))
    if fp64:
        key = dict(
            COMP=tl.float64, KEY_INT=tl.int64, KEY_UINT=tl.uint64, KEY_BITS=64, SIGN=-(2**63)
        )
    else:
        key = dict(
            COMP=tl.float32, KEY_INT=tl.int32, KEY_UINT=tl.uint32, KEY_BITS=32, SIGN=-(2**31)
        )
    _tucker_select_kernel[(T * H,)](
        sr.contiguous(), sc.contiguous(), summed_core.to(comp).contiguous(), idx, val, H, m,
        R=r, M_PAD=m_pad, num_warps=max(1, min(16, m_pad * m_pad // 1024)), **key,
    )  # fmt: skip
    # Winners come in flat-index order; sort by descending score like torch.topk. [T*H, m]
    order = torch.sort(val, dim=-1, descending=True, stable=True).indices
    return torch.gather(idx, 1, order).view(T, H, m)


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
        virtual indices [T, H, m] int64 by descending summed score (ties may be ordered
        differently from torch.topk) and per-core scores [T, H, m, h], differentiable w.r.t. s_row,
        s_col and cores.
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
