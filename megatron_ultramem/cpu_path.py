"""The layer's fast path where the Triton kernels do not run (CPU): the reference math, laid out
for a CPU.

Same selections, outputs and gradients as `reference.py` (up to rounding; tests/test_cpu_path.py
checks it in float64); the reference functions stay the oracle and the benchmark baseline
(benchmarks/bench_decode.py times both). The reference's training step was dominated by autograd
through the [T, H, m, m] grid, a gathered [T, H*m, Dv] copy of the selected rows and
index_put_(accumulate=True); its decode step by torch.topk. What is done instead, and why:

1. Keys are LayerNorm'd in a [H, r, n', K] layout (`key_rows`: one K-vector per (head, rank,
   key)), so the row/column scores are one GEMM, [T, K] @ [K, H*r*n']. From K tokens on the key
   rows are first rotated in rank space so that phase 1's projection S . u is a slice of that GEMM
   (`tdqkr`). (The layer keeps the normalized keys between no-grad calls: `_key_rows`.)
2. Selection (phase 1, the m x m grid, phase 2) runs without autograd, in chunks of tokens whose
   scores stay in cache (`_select_chunk`); only the winners' H*m rank-r scores carry gradient
   (`WinnerScores`: the backward reads the T*H*m*r key rows they came from, embedding_bag for dq
   and a chunked dense GEMM for dK, instead of a dense [T, H, n', r] gradient through both GEMMs).
3. Top-m (`topk_indices`): a block-maximum pre-filter (exact) and numpy's argpartition, which is
   2-3x faster than torch.topk on CPU at these sizes, over a thread pool for large inputs.
4. Pooling (`bag_pool`) is one `F.embedding_bag(mode="sum", per_sample_weights=...)` over the
   table viewed as [N*h, Dv/h] (core slice i of row phi is row phi*h + i), one bag per (token,
   virtual block, core), so the output is [T, E, Dv] directly: no gathered copy, no scatter_add_.
   Its backward (`BagPool`) sorts the selections by table row once; grad_scores are dot products
   in that order and the table's gradient is a second embedding_bag with one bag per table row
   (the transpose), added straight into `main_grad` when the parameter has one (Megatron's DDP;
   fp32, or bf16 summed in fp32 then added), so no dense [N, Dv] temporary exists beyond the
   gradient torch itself needs. Tiny inference batches use the reference (fewer ops).

Shapes: T tokens, H heads, n' keys per side, r Tucker rank, h cores, m top-m, M = H*m selections per
token, N table rows, Dv (local) value columns, E virtual blocks, K key dim.
"""

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import reference

__all__ = ["key_rows", "tdqkr", "topk_indices", "bag_pool", "supports", "bits_checksum"]


def supports(values: torch.Tensor) -> bool:
    """Table dtypes of the fast pooling: those for which CPU embedding_bag (and its backward ops)
    accumulates in fp32 or better and rounds once, as the reference does (tests/test_cpu_path.py
    checks the bf16 error is one rounding)."""
    return values.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------- keys
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits_checksum(t: torch.Tensor) -> torch.Tensor:
    """A 0-dim int64: the wrapping sum of t's raw bits, as 64-bit words where they tile exactly
    (one pass, no cast), else as integers of t's element size. Changing any element changes it
    (a change of one word by d != 0 mod 2^64 cannot vanish); only changes of several elements
    that cancel exactly as integers go unseen."""
    flat = t.detach().reshape(-1)
    if flat.is_contiguous() and (flat.numel() * flat.element_size()) % 8 == 0:
        return flat.view(torch.int64).sum()
    return flat.view(_INT_OF_SIZE[flat.element_size()]).sum(dtype=torch.int64)


def key_rows(keys: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    """LayerNorm over K of keys [H, n', K, r] -> key rows [H, r, n', K] (differentiable)."""
    return norm(keys.permute(0, 3, 1, 2))


# ----------------------------------------------------------------------------- selection
ROTATE_MIN_TOKENS = None
"""From this many tokens on (None: K, the key dim), `tdqkr` rotates the key rows so that phase 1's
projection comes out of the GEMM. The rotation is a pass over the H*r*n'*K key rows, the direct
projection a pass over the T*H*r*n' scores: the rotation pays off from T ~ K tokens on."""


def _block_size(n: int, k: int) -> int:
    """Block size of `topk_indices`' pre-filter: a power of two near sqrt(n/k) (minimizes the
    n/b + k*b elements the two small selections see) that divides n with n/b >= k; 1 = none."""
    b = 1
    while b * 2 <= max(1.0, (n / k) ** 0.5) * 1.5 and n % (b * 2) == 0 and n // (b * 2) >= k:
        b *= 2
    return b


_BLOCKED_MIN_ELEMENTS = 1 << 15
def _argtopk(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [R, k] of the k largest entries of each row of x [R, n], unspecified order.

    numpy's argpartition (introselect) on CPU float32/float64 rows: measured 2-3x faster than
    torch.topk(sorted=False) at n = 128..1024, k = 32 on one thread (torch builds (value, index)
    pairs for nth_element), and about as fast as torch.topk on two (splitting the rows over a
    thread pool measured slower in the layer on a shared 2-core machine, so it is not done).
    Other dtypes and devices use torch.topk.
    """
    R, n = x.shape
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or k >= n:
        return torch.topk(x, k, dim=-1, sorted=False).indices
    import numpy as np

    xn = x.detach().contiguous().numpy()
    return torch.from_numpy(np.argpartition(xn, n - k, axis=-1)[:, n - k :])


def topk_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [..., k] of the k largest entries of x [..., n] (unspecified order).

    A selection costs several ns per element while a max-reduction costs < 1 ns, so the rows are
    first split into n/b blocks of b entries: every entry larger than the k-th largest block maximum
    lies in one of the k blocks with the largest maxima (a block outside them has its maximum,
    hence all its entries, at most that value, and at least k entries reach it). The exact top-k is
    then taken over those k*b entries. Block j holds the entries j, j + n/b, j + 2n/b, ... so that
    the maxima are a vectorized reduction over b contiguous [n/b] slices. Same values as
    torch.topk; among exactly tied values the chosen indices may differ (as they may between
    torch.topk implementations).
    """
    n = x.shape[-1]
    lead = x.shape[:-1]
    x = x.reshape(-1, n)
    # small inputs (decode): the pre-filter's extra ops cost more than they save
    b = _block_size(n, k) if x.numel() > _BLOCKED_MIN_ELEMENTS else 1
    if b == 1:
        return _argtopk(x, k).view(*lead, k)
    R, nb = x.shape[0], n // b
    xb = x.view(R, b, nb)  # [R, b, n/b]: entry i*nb + j is in block j
    blocks = _argtopk(xb.amax(1), k)  # [R, k]
    cand = torch.gather(xb, 2, blocks[:, None, :].expand(R, b, k)).reshape(R, b * k)  # [R, b*k]
    win = _argtopk(cand, k)  # [R, k], in [0, b*k)
    i = torch.div(win, k, rounding_mode="floor")  # position in the block
    return (i * nb + torch.gather(blocks, 1, win - i * k)).view(*lead, k)


_DENSE_CHUNK = 1 << 20  # elements of WinnerScores' per-chunk dense gradient buffer (4 MiB fp32)


def _flat_index(keys: torch.Tensor, H: int, r: int, n_side: int) -> torch.Tensor:
    """Key-row index (head, rank, key) in [H*r*n'] of keys [T, H, m]: -> [T, H, r, m]."""
    dev = keys.device
    base = (torch.arange(H, device=dev)[:, None] * r + torch.arange(r, device=dev)) * n_side
    return base[None, :, :, None] + keys[:, :, None, :]


class WinnerScores(torch.autograd.Function):
    """The winners' rank-r scores <q[t], key_rows[idx[t, l]]>, taken from the candidates' scores
    computed without autograd; the backward touches only the T*L selected key rows.

    forward(q [T, K], rows [R, K], cand [T, C] (no grad), pos [T, L], idx [T, L]) -> [T, L] with
    out[t, l] = cand[t, pos[t, l]] = <q[t], rows[idx[t, l]]>.
    """

    @staticmethod
    def forward(ctx, q, rows, cand, pos, idx):
        ctx.save_for_backward(q, rows, idx)
        return torch.gather(cand, 1, pos)

    @staticmethod
    def backward(ctx, grad):
        q, rows, idx = ctx.saved_tensors
        grad = grad.contiguous()
        dq = drows = None
        if ctx.needs_input_grad[0]:
            # dq[t] = sum_l grad[t, l] * rows[idx[t, l]]: one bag of L rows per token.
            dq = F.embedding_bag(idx, rows, mode="sum", per_sample_weights=grad)  # [T, K]
        if ctx.needs_input_grad[1]:
            # drows = G^T q with G [T, R] holding each token's L gradients, densified one chunk of
            # tokens at a time into a reused [R, chunk] buffer (R = H*r*n' is small next to the
            # table; a [T, R] buffer would be paged in anew every call) for one GEMM per chunk.
            T, R = q.shape[0], rows.shape[0]
            chunk = max(1, min(T, _DENSE_CHUNK // max(R, 1)))
            buf = torch.empty(R, chunk, dtype=grad.dtype, device=grad.device)
            drows = torch.zeros(R, q.shape[1], dtype=grad.dtype, device=grad.device)
            for t0 in range(0, T, chunk):
                t1 = min(T, t0 + chunk)
                dense = buf[:, : t1 - t0].zero_()  # [R, tokens]
                dense.scatter_add_(0, idx[t0:t1].t(), grad[t0:t1].t())
                drows.addmm_(dense, q[t0:t1])  # [R, K]
        return dq, drows, None, None, None


def _rotation(w: torch.Tensor) -> torch.Tensor:
    """[H, r] -> [H, r, r] orthogonal U with first column w/|w| (a Householder reflection taking
    e_1 to w/|w|; the identity where w is e_1 or zero)."""
    H, r = w.shape
    e1 = torch.zeros_like(w)
    e1[:, 0] = 1.0
    norm = w.norm(dim=-1, keepdim=True)  # [H, 1]
    unit = w / norm.clamp_min(torch.finfo(w.dtype).tiny)
    vec = unit - e1  # [H, r]
    vv = (vec * vec).sum(-1)[:, None, None]
    eye = torch.eye(r, dtype=w.dtype, device=w.device).expand(H, r, r)
    refl = eye - 2.0 * vec[:, :, None] * vec[:, None, :] / vv.clamp_min(torch.finfo(w.dtype).tiny)
    return torch.where((vv > 1e-12) & (norm[..., None] > 0), refl, eye)


_SCORE_CHUNK = 1 << 21  # scores per token chunk of tdqkr's selection (8 MiB in fp32)

_SCRATCH = {}


def _scratch(slot: str, shape: Tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A scratch tensor of `shape` kept between calls, one per (slot, device, dtype), grown when
    too small. Only for no-grad intermediates that never leave the function that fills them.

    Why: a fresh multi-MiB tensor gets new pages from the OS on every call (glibc returns large
    blocks), and touching them costs more than the work on them: 4-5 ms per 8 MiB at T = 1024
    tokens, measured, against 0.5 ms for the [T, H, m, m] grid product itself. Not thread-safe:
    two threads running the CPU path at once would share these buffers."""
    n = math.prod(shape)
    key = (slot, like.device, like.dtype)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < n:
        buf = _SCRATCH[key] = torch.empty(n, dtype=like.dtype, device=like.device)
    return buf[:n].view(shape)


def _select_chunk(qs, sides, summed, H, r, n_side, m, rotate):
    """TDQKR selection for one chunk of tokens (no autograd): queries (q_row, q_col) [t, K] ->
    per side the candidates [t, H, m], their key-row indices [t, H*r*m] and rank-r scores
    [t, H, r, m], then the winners' candidate row and column a, b [t, H, m]."""
    T = qs[0].shape[0]
    out = []
    for q, (rows_t, w, rot), slot in zip(qs, sides, ("scores_row", "scores_col")):
        buf = _scratch(slot, (T, H * r * n_side), q)
        s = torch.mm(q, rows_t, out=buf).view(T, H, r, n_side)  # [t, H, r, n']
        # Phase 1: rank-1 projections [t, H, n'] and their top-m candidates
        proj = s[:, :, 0, :] if rotate else (s * w[None, :, :, None]).sum(2)
        cand = topk_indices(proj, m)  # [t, H, m]
        idx = _flat_index(cand, H, r, n_side).reshape(T, H * r * m)
        sel = torch.gather(s.view(T, H * r * n_side), 1, idx).view(T, H, r, m)  # [t, H, r, m]
        if rotate:
            sel = torch.einsum("hrs,thsm->thrm", rot, sel)  # back to the keys' rank basis
        out += [cand, idx, sel]
    sr, sc = out[2], out[5]
    # Phase 2: the m x m grid sr^T C sc, exactly: [t, H, r, m] -> [t, H, m, m]
    left = torch.einsum("thrm,hrs->thsm", sr, summed)  # (C^T sr)
    grid = torch.matmul(left.transpose(-1, -2), sc, out=_scratch("grid", (T, H, m, m), left))
    top = topk_indices(grid.reshape(T, H, m * m), m)  # [t, H, m]
    a = torch.div(top, m, rounding_mode="floor")  # winners' candidate row
    return (*out, a, top - a * m)  # and column


def tdqkr(
    q_row: torch.Tensor,
    q_col: torch.Tensor,
    rows_row: torch.Tensor,
    rows_col: torch.Tensor,
    cores: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    m: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """reference.row_col_scores + reference.tucker_topm from normalized queries and key rows.

    Args:
        q_row, q_col: [T, K] normalized queries; rows_row, rows_col: [H, r, n', K] key rows
        (`key_rows`); cores [H, h, r, r]; u, v [H, r]; m.
    Returns:
        virtual indices [T, H, m] (row * n' + col; each head's winners in an unspecified order) and
        per-core scores [T, H, m, h], differentiable w.r.t. queries, keys and cores.

    From ROTATE_MIN_TOKENS tokens on, the key rows of each head are first rotated in rank space by
    an orthogonal U whose first column is u/|u| (`_rotation`): the GEMM against the rotated rows
    then gives phase 1's projection S . u/|u| as one contiguous [n'] slice (no [T, H, n', r] pass
    to form it), and the rank-r scores of the candidates are recovered as S = U (U^T S). Equal to
    the reference's S and S . u up to rounding (U is orthogonal) and a positive scale that does
    not change the selection.
    """
    T = q_row.shape[0]
    H, r, n_side, K = rows_row.shape
    flat_row, flat_col = rows_row.reshape(-1, K), rows_col.reshape(-1, K)  # [H*r*n', K]
    rotate = T >= (K if ROTATE_MIN_TOKENS is None else ROTATE_MIN_TOKENS)
    with torch.no_grad():
        sides = []
        for rows, w in ((rows_row, u), (rows_col, v)):
            w = w.to(rows.dtype)
            rot = _rotation(w) if rotate else None  # [H, r, r]
            if rotate:
                rows = torch.einsum("hrak,hrs->hsak", rows, rot)  # [H, r', n', K]
            sides.append((rows.reshape(-1, K).t(), w, rot))  # [K, H*r*n']
        summed = cores.sum(1).to(q_row.dtype)  # [H, r, r]
        # Token chunks of ~_SCORE_CHUNK scores: each chunk's [tokens, H*r*n'] scores and
        # [tokens, H, m, m] grid stay in cache for the selection that reads them, in scratch
        # buffers kept between calls (`_scratch`).
        chunk = max(1, min(T, _SCORE_CHUNK // (H * r * n_side)))
        starts = range(0, T, chunk) if T > 0 else [0]
        parts = [
            _select_chunk((q_row[t0 : t0 + chunk], q_col[t0 : t0 + chunk]), sides, summed,
                          H, r, n_side, m, rotate)
            for t0 in starts
        ]  # fmt: skip
        i_row, idx_row, sr, i_col, idx_col, sc, a, b = (
            torch.cat(p, 0) if len(p) > 1 else p[0] for p in zip(*parts)
        )
        win_row, win_col = torch.gather(i_row, 2, a), torch.gather(i_col, 2, b)
        # Position of each winner's (rank rho) score among the candidates' [T, H, r, m] scores
        rho = torch.arange(r, device=q_row.device)
        head = torch.arange(H, device=q_row.device)[:, None, None] * (r * m)
        pos_row = (head + rho * m + a[..., None]).view(T, H * m * r)  # [T, H, m, r] flattened
        pos_col = (head + rho * m + b[..., None]).view(T, H * m * r)
        idx_w_row = torch.gather(idx_row, 1, pos_row)  # key rows of the winners
        idx_w_col = torch.gather(idx_col, 1, pos_col)
    if torch.is_grad_enabled():
        sr_w = WinnerScores.apply(q_row, flat_row, sr.reshape(T, H * r * m), pos_row, idx_w_row)
        sc_w = WinnerScores.apply(q_col, flat_col, sc.reshape(T, H * r * m), pos_col, idx_w_col)
    else:
        sr_w = torch.gather(sr.reshape(T, H * r * m), 1, pos_row)
        sc_w = torch.gather(sc.reshape(T, H * r * m), 1, pos_col)
    sr_w, sc_w = sr_w.view(T, H, m, r), sc_w.view(T, H, m, r)
    # Per-core scores of the winners: sr^T C_i sc. [T, H, m, r] x [H, h, r, r] -> [T, H, m, h]
    core_scores = torch.einsum("thmr,hirs,thms->thmi", sr_w, cores, sc_w)
    return win_row * n_side + win_col, core_scores


# ----------------------------------------------------------------------------- pooling
@torch.no_grad()
def _bag_layout(rows: torch.Tensor, blocks: torch.Tensor, h: int, E: int):
    """Where each (selection k, core i) goes in embedding_bag's flat input: bags ordered
    (token, block, core), within a bag by k. A counting sort (E*h keys), no torch.sort.

    Returns idx [T*M*h] (table row phi*h + i of each entry, in bag order), pos [T, M, h] (each
    (k, i)'s position within its token's M*h entries) and offsets [T*E*h] (each bag's start).
    """
    T, M = rows.shape
    dev = rows.device
    onehot = F.one_hot(blocks, E)  # [T, M, E]
    counts = onehot.sum(1)  # [T, E] selections per block
    rank = torch.gather(onehot.cumsum(1), 2, blocks[..., None])[..., 0] - 1  # [T, M] rank in block
    start = counts.cumsum(1) - counts  # [T, E] first selection of each block (per core)
    core = torch.arange(h, device=dev)
    # Block p's h bags are consecutive, each counts[p] long: entry (k, i) sits at
    # h * start[p] + i * counts[p] + rank[k].
    pos = (
        h * torch.gather(start, 1, blocks)[..., None]
        + core * torch.gather(counts, 1, blocks)[..., None]
        + rank[..., None]
    )  # [T, M, h]
    idx = torch.empty(T, M * h, dtype=rows.dtype, device=dev)
    idx.scatter_(1, pos.view(T, M * h), (rows[..., None] * h + core).view(T, M * h))
    sizes = counts[:, :, None].expand(T, E, h).reshape(-1)  # [T*E*h], bag order (t, p, i)
    offsets = sizes.cumsum(0) - sizes
    return idx.view(-1), pos, offsets


def _megatron_dummy_grad(param: torch.Tensor) -> Optional[torch.Tensor]:
    """Megatron's convention after a fused main_grad accumulation (tensor_parallel/layers.py):
    with `grad_added_to_main_grad` (set by Megatron's DDP), flag the param and return a placeholder
    grad so that DDP's backward hook fires (it asserts a grad with overlap_grad_reduce) without
    adding it again; zeros under `zero_out_wgrad`. torch.empty does not touch the pages."""
    if not hasattr(param, "grad_added_to_main_grad"):
        return None
    param.grad_added_to_main_grad = True
    if getattr(param, "zero_out_wgrad", False):
        return torch.zeros_like(param)
    return torch.empty_like(param)


def accumulate_rows(main_grad: torch.Tensor, rows: torch.Tensor, grad_rows: torch.Tensor) -> None:
    """main_grad[rows] += grad_rows for distinct `rows`, summing in fp32 (fp64 for fp64): a bf16
    main_grad (Megatron's grad_reduce_in_fp32=False) is rounded once per micro-batch."""
    acc = torch.float64 if main_grad.dtype == torch.float64 else torch.float32
    cur = main_grad.index_select(0, rows).to(acc)
    main_grad.index_copy_(0, rows, (cur + grad_rows.to(acc)).to(main_grad.dtype))


class BagPool(torch.autograd.Function):
    """pooled [T*E*h, c] = embedding_bag over the table viewed as [N*h, c] (see _bag_layout).

    forward(scores [T, M, h], values [N, Dv], idx, pos, offsets, E) -> [T, E, Dv]. When `values`
    has a `main_grad` (Megatron's DDP sets it on the Parameter), the table's gradient goes there.
    """

    @staticmethod
    def forward(ctx, scores, values, idx, pos, offsets, E):
        T, M, h = scores.shape
        N, Dv = values.shape
        table = values.reshape(N * h, Dv // h)
        weights = torch.empty(T, M * h, dtype=values.dtype, device=values.device)
        weights.scatter_(1, pos.view(T, M * h), scores.reshape(T, M * h).to(values.dtype))
        pooled = F.embedding_bag(
            idx, table, offsets, mode="sum", per_sample_weights=weights.view(-1)
        )  # [T*E*h, Dv/h], bags (t, p, i)
        ctx.save_for_backward(values, idx, pos, offsets, weights)
        ctx.shape = (T, M, h, E, scores.dtype)
        # The Parameter object itself carries main_grad (a saved copy would not).
        ctx.param = values if getattr(values, "main_grad", None) is not None else None
        return pooled.view(T, E, Dv)

    @staticmethod
    def backward(ctx, grad):
        values, idx, pos, offsets, weights = ctx.saved_tensors
        T, M, h, E, s_dtype = ctx.shape
        N, Dv = values.shape
        c = Dv // h
        need_s, need_v = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g = grad.contiguous().view(T * E * h, c)  # one row per bag
        with torch.no_grad():
            sizes = torch.diff(offsets, append=offsets.new_tensor([idx.numel()]))
            bag = torch.repeat_interleave(torch.arange(T * E * h, device=g.device), sizes)
            # One sort by table row serves both gradients: table rows are then read (grad_scores)
            # and written (the table's gradient) in order.
            key = idx.to(torch.int32) if N * h < 2**31 else idx
            order = torch.argsort(key)
            idx_s, bag_s = idx.index_select(0, order), bag.index_select(0, order)
        grad_scores = grad_values = None
        if need_s:
            # grad of entry j: <grad[bag_j], table[idx_j]> (embedding_bag's own per-sample-weight
            # backward, computed here in table-row order).
            gw_s = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                g, values.reshape(N * h, c), idx_s, offsets, bag_s, 0, -1
            )
            gw = torch.empty_like(gw_s).index_copy_(0, order, gw_s).view(T, M * h)
            grad_scores = torch.gather(gw, 1, pos.view(T, M * h)).view(T, M, h).to(s_dtype)
        if need_v:
            w_s = weights.view(-1).index_select(0, order)
            param = ctx.param
            if param is not None:
                # Only the distinct rows touched: [U, c] sums, added into main_grad.
                uniq, counts = torch.unique_consecutive(idx_s, return_counts=True)
                starts = counts.cumsum(0) - counts
                acc = torch.float64 if g.dtype == torch.float64 else torch.float32
                rows_grad = F.embedding_bag(
                    bag_s, g.to(acc), starts, mode="sum", per_sample_weights=w_s.to(acc)
                )  # [U, c] in fp32: a bf16 main_grad is rounded once, in accumulate_rows
                accumulate_rows(param.main_grad.view(N * h, c), uniq, rows_grad)
                grad_values = _megatron_dummy_grad(param)
            else:
                # The transpose as an embedding_bag: one bag per table row (empty bags are zero),
                # its output is the dense gradient itself.
                counts = torch.bincount(idx_s, minlength=N * h)
                starts = counts.cumsum(0) - counts
                grad_values = F.embedding_bag(
                    bag_s, g, starts, mode="sum", per_sample_weights=w_s
                ).view(N, Dv)
        return grad_scores, grad_values, None, None, None, None


_SMALL_POOL_ELEMENTS = 1 << 16  # T*M*Dv of the gathered copy below which inference uses the reference


def bag_pool(
    rows: torch.Tensor,
    blocks: torch.Tensor,
    scores: torch.Tensor,
    values: torch.Tensor,
    E: int,
) -> torch.Tensor:
    """reference.weighted_gather_pool as one embedding_bag (same arguments and result):
    rows, blocks [T, M], scores [T, M, h], values [N, Dv] -> [T, E, Dv].

    When `values` (the Parameter) has `main_grad`, its gradient is added there (see BagPool).
    Tables of other dtypes than `supports` lists use the reference.
    """
    small = rows.numel() * values.shape[1] <= _SMALL_POOL_ELEMENTS and not torch.is_grad_enabled()
    if small or not supports(values):
        # decode batch sizes: the reference's gather-multiply-scatter is a few ops on a [T, M, Dv]
        # copy that is small; embedding_bag's bag layout costs more
        return reference.weighted_gather_pool(rows, blocks, scores, values, E)
    h = scores.shape[-1]
    idx, pos, offsets = _bag_layout(rows, blocks, h, E)
    return BagPool.apply(scores, values, idx, pos, offsets, E)
