"""Pure-PyTorch reference of UltraMem retrieval and aggregation.

This file is the single source of truth for the math (see ULTRAMEM.md in the project notes): the
layer's reference path calls these functions, the Triton kernels are tested against them, and the
benchmarks time them as the baseline. Everything here is functional (no modules, no state) and
written for clarity over speed; each function states its shapes.

Notation: T tokens, H retrieval heads, n' = sqrt(E) * n keys per side of the virtual grid, r Tucker
rank, h Tucker cores, m top-m per head, N = n^2 physical value rows, Dv value dim, E expansion rate.
"""

from typing import List, Tuple

import torch

__all__ = [
    "row_col_scores",
    "tucker_topm",
    "tucker_grid_scores",
    "brute_force_topm",
    "tucker_aux_loss",
    "singular_values",
    "leading_singular_vectors",
    "virtual_to_physical",
    "weighted_gather_pool",
    "ive_aggregate",
    "materialized_aggregate",
]


def row_col_scores(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Rank-r scores of one query side against one key side.

    Args:
        q: [T, K] normalized queries (row or column half).
        keys: [H, n', K, r] normalized keys.
    Returns:
        [T, H, n', r]: S[t, H, a, rho] = <q[t], keys[H, a, :, rho]>.
    """
    return torch.einsum("tk,hakr->thar", q, keys)


def leading_singular_vectors(
    summed_core: torch.Tensor, prev_u: torch.Tensor = None
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leading singular pair of each head's summed core, sign-aligned with the previous pair.

    Args:
        summed_core: [H, r, r], C = sum_i C_i.
        prev_u: [H, r] or None. The sign of (u, v) is arbitrary (C = s u v^T = s (-u)(-v)^T); we
            flip the pair so that <u, prev_u> >= 0, or, without a previous pair, so that sum(u) >= 0,
            which keeps phase-1 selection stable across refreshes.
    Returns:
        u [H, r], v [H, r], singular values [H, r] (descending).
    """
    U, S, Vh = torch.linalg.svd(summed_core.detach().double())
    u, v = U[..., :, 0], Vh[..., 0, :]  # [H, r] each
    ref = prev_u.double() if prev_u is not None else torch.ones_like(u)
    sign = torch.where((u * ref).sum(-1, keepdim=True) < 0, -1.0, 1.0).to(u.dtype)
    if prev_u is not None:
        # A previous pair that is all zeros (never refreshed) gives no direction: fall back.
        fallback = torch.where(u.sum(-1, keepdim=True) < 0, -1.0, 1.0).to(u.dtype)
        sign = torch.where(prev_u.double().abs().sum(-1, keepdim=True) == 0, fallback, sign)
    dtype = summed_core.dtype
    return (u * sign).to(dtype), (v * sign).to(dtype), S.to(dtype)


def tucker_topm(
    s_row: torch.Tensor,
    s_col: torch.Tensor,
    cores: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    m: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """TDQKR two-phase top-m.

    Phase 1 keeps the top-m rows by s_row . u and the top-m columns by s_col . v (rank-1
    preselection). Phase 2 rescores the m x m candidate grid exactly with the summed core and keeps
    the top-m cells; the per-core scores of the winners are returned for multi-core pooling.

    Args:
        s_row, s_col: [T, H, n', r] rank-r row / column scores.
        cores: [H, h, r, r] Tucker cores C_i per head.
        u, v: [H, r] preselection vectors (leading singular pair of sum_i C_i).
        m: candidates per side and winners per head.
    Returns:
        virtual indices [T, H, m] (int64, row * n' + col, in [0, n'^2)), sorted by descending summed
        score, and per-core scores [T, H, m, h].
    """
    T, H, n_side, r = s_row.shape
    # Phase 1: rank-1 preselection. [T, H, n'] -> top-m indices [T, H, m]
    i_row = torch.topk(torch.einsum("thar,hr->tha", s_row, u), m, dim=-1).indices
    i_col = torch.topk(torch.einsum("thbr,hr->thb", s_col, v), m, dim=-1).indices
    sr = torch.gather(s_row, 2, i_row[..., None].expand(T, H, m, r))  # [T, H, m, r]
    sc = torch.gather(s_col, 2, i_col[..., None].expand(T, H, m, r))  # [T, H, m, r]
    # Phase 2: exact rescoring of the m x m grid with the summed core. [T, H, m, m]
    grid = torch.einsum("thar,hrs,thbs->thab", sr, cores.sum(1), sc)
    top = torch.topk(grid.reshape(T, H, m * m), m, dim=-1).indices  # [T, H, m]
    a, b = top // m, top % m
    sr_w = torch.gather(sr, 2, a[..., None].expand(T, H, m, r))  # [T, H, m, r]
    sc_w = torch.gather(sc, 2, b[..., None].expand(T, H, m, r))  # [T, H, m, r]
    # Per-core scores of the winners only (never the [.., h, m, m] grid). [T, H, m, h]
    core_scores = torch.einsum("thmr,hirs,thms->thmi", sr_w, cores, sc_w)
    virtual = torch.gather(i_row, 2, a) * n_side + torch.gather(i_col, 2, b)
    return virtual, core_scores


def tucker_grid_scores(s_row: torch.Tensor, s_col: torch.Tensor, cores: torch.Tensor) -> torch.Tensor:
    """Exact summed-core score of every cell of the full virtual grid: [T, H, n'*n'].

    Only for tests and tiny shapes: this is the n'^2 work that TDQKR avoids.
    """
    T, H, n_side, _ = s_row.shape
    grid = torch.einsum("thar,hrs,thbs->thab", s_row, cores.sum(1), s_col)
    return grid.reshape(T, H, n_side * n_side)


def brute_force_topm(
    s_row: torch.Tensor, s_col: torch.Tensor, cores: torch.Tensor, m: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact top-m over the full virtual grid, same outputs as `tucker_topm` (test oracle)."""
    T, H, n_side, r = s_row.shape
    top = torch.topk(tucker_grid_scores(s_row, s_col, cores), m, dim=-1).indices  # [T, H, m]
    a, b = top // n_side, top % n_side
    sr_w = torch.gather(s_row, 2, a[..., None].expand(T, H, m, r))
    sc_w = torch.gather(s_col, 2, b[..., None].expand(T, H, m, r))
    return top, torch.einsum("thmr,hirs,thms->thmi", sr_w, cores, sc_w)


def tucker_aux_loss(singular_values: torch.Tensor, alpha: float, tau: float) -> torch.Tensor:
    """Tucker auxiliary loss: alpha/(r-1) * sum_{k>=2} max(0, lambda_k - tau)^2, mean over heads.

    Args:
        singular_values: [H, r] singular values of each head's summed core, descending, with
            gradient (`singular_values`: svdvals' value and gradient, without a host sync).
    Returns:
        a scalar; zero when r == 1 (no non-leading singular values to penalize).
    """
    H, r = singular_values.shape
    if r == 1:
        return singular_values.sum() * 0.0
    excess = torch.clamp(singular_values[:, 1:] - tau, min=0.0)
    return alpha / (r - 1) * excess.pow(2).sum(-1).mean()


def _safe_hypot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """hypot(x, y) whose gradient at (0, 0) is 0 instead of NaN (0/0): the where() keeps the
    zero branch's gradient out of the hypot."""
    pos = (x != 0) | (y != 0)
    h = torch.hypot(torch.where(pos, x, torch.ones_like(x)), torch.where(pos, y, torch.zeros_like(y)))
    return torch.where(pos, h, torch.zeros_like(h))


def _round_robin(r: int) -> List[List[Tuple[int, int]]]:
    """The circle method: r - 1 (r even) or r (r odd) rounds of disjoint column pairs covering
    every pair once; one Jacobi sweep rotates each round's pairs at once."""
    n = r + (r % 2)
    rounds = []
    for i in range(n - 1):
        pairs = [(i, n - 1)] + [((i + j) % (n - 1), (i - j) % (n - 1)) for j in range(1, n // 2)]
        rounds.append([(min(p, q), max(p, q)) for p, q in pairs if max(p, q) < r])
    return rounds


JACOBI_SWEEPS = 10
"""Sweeps of `singular_values`' one-sided Jacobi for r >= 3: cyclic Jacobi converges
quadratically once the columns are nearly orthogonal; tests/test_aux_loss_sync_free.py checks
that 10 sweeps match LAPACK's singular values to ~1e-15 relative for r = 3..8 (random and
near-degenerate cores). A fixed count: a convergence test would read a value on the host."""


@torch.no_grad()
def _jacobi_right_vectors(C: torch.Tensor, sweeps: int) -> torch.Tensor:
    """Right singular vectors V [H, r, r] of C [H, r, r] (float64) by one-sided Jacobi: C V's
    columns become orthogonal. Fixed sweeps, no data-dependent control flow on the host."""
    H, r, _ = C.shape
    W = C.clone()
    V = torch.eye(r, dtype=C.dtype, device=C.device).expand(H, r, r).clone()
    schedule = [
        (torch.tensor([p for p, _ in pairs], device=C.device),
         torch.tensor([q for _, q in pairs], device=C.device))
        for pairs in _round_robin(r)
    ]  # fmt: skip
    tiny = torch.finfo(C.dtype).tiny
    for _ in range(sweeps):
        for P, Q in schedule:
            wp, wq = W[:, :, P], W[:, :, Q]  # [H, r, k]
            alpha, beta, gamma = (wp * wp).sum(1), (wq * wq).sum(1), (wp * wq).sum(1)  # [H, k]
            # Rotation zeroing the pair's inner product (Hestenes; t the smaller-angle root).
            rotate = gamma.abs() > tiny
            zeta = (beta - alpha) / torch.where(rotate, 2 * gamma, torch.ones_like(gamma))
            sign = torch.where(zeta >= 0, 1.0, -1.0).to(C.dtype)
            t = sign / (zeta.abs() + torch.sqrt(1 + zeta * zeta))
            t = torch.where(rotate, t, torch.zeros_like(t))
            c = torch.rsqrt(1 + t * t)[:, None, :]
            sn = (c[:, 0, :] * t)[:, None, :]
            for M in (W, V):
                mp, mq = M[:, :, P], M[:, :, Q]
                M[:, :, P] = c * mp - sn * mq
                M[:, :, Q] = sn * mp + c * mq
    return V


def singular_values(summed_core: torch.Tensor, sweeps: int = JACOBI_SWEEPS) -> torch.Tensor:
    """Singular values [H, r], descending, of each head's summed core [H, r, r]: the value and the
    gradient (u_k v_k^T for sigma_k) of torch.linalg.svdvals, without a host synchronization.

    torch.linalg.svdvals on CUDA reads the solver's status on the host (a device sync every
    training step, and an error inside CUDA-graph capture). Here:
    - r = 1: |C|.
    - r = 2: the closed form: with E = (a + d) / 2, F = (a - d) / 2, G = (c + b) / 2,
      K = (c - b) / 2 for C = [[a, b], [c, d]], sigma = hypot(E, K) +- hypot(F, G) (the sum and
      the absolute difference). About 20 elementwise ops, in the input dtype.
    - r >= 3: one-sided Jacobi in float64 for the right singular vectors V (`sweeps` fixed
      sweeps of the round-robin pair schedule, no gradient), U from the columns C v_k
      orthonormalized in order of decreasing norm, then sigma_k = u_k^T C v_k with U and V held
      fixed: its gradient is u_k v_k^T exactly as svdvals', its value |C v_k|. ~25 small ops
      per round, (r - 1 or r) rounds per sweep, all on the device.
    Differentiable; at exactly repeated singular values the gradient is one of the valid
    subgradients (svdvals' is too). Graph-safe: no host reads, shapes fixed.
    """
    H, r, r2 = summed_core.shape
    assert r == r2, summed_core.shape
    C = summed_core
    if r == 1:
        return C.reshape(H, 1).abs()
    if r == 2:
        a, b, c, d = C[:, 0, 0], C[:, 0, 1], C[:, 1, 0], C[:, 1, 1]
        q = _safe_hypot((a + d) / 2, (c - b) / 2)
        p = _safe_hypot((a - d) / 2, (c + b) / 2)
        return torch.stack([q + p, (q - p).abs()], dim=-1)
    V = _jacobi_right_vectors(C.detach().double(), sweeps)  # [H, r, r]
    with torch.no_grad():
        CV = C.detach().double() @ V  # [H, r, r]: columns C v_k, orthogonal
        norms = CV.norm(dim=1)  # [H, r]
        order = torch.argsort(norms, dim=-1, descending=True)
        V = torch.gather(V, 2, order[:, None, :].expand(H, r, r))
        CV = torch.gather(CV, 2, order[:, None, :].expand(H, r, r))
        # Left vectors: C v_k orthonormalized in order of decreasing sigma (modified
        # Gram-Schmidt). C v_k / |C v_k| alone carries an error ~ eps sigma_1 / sigma_k, large for
        # a tiny sigma_k; projecting out the (well-determined) larger u_j first leaves u_k the
        # orthogonal complement, accurate to ~ eps / gap like LAPACK's.
        cols = []
        for k in range(r):
            w = CV[:, :, k]
            for u in cols:
                w = w - (u * w).sum(-1, keepdim=True) * u
            n = w.norm(dim=-1, keepdim=True)
            # an exactly zero column (C = 0): any unit vector orthogonal to the others will do
            fallback = torch.zeros_like(w)
            fallback[:, k] = 1.0
            for u in cols:
                fallback = fallback - (u * fallback).sum(-1, keepdim=True) * u
            fallback = fallback / fallback.norm(dim=-1, keepdim=True)
            cols.append(torch.where(n > 0, w / torch.where(n > 0, n, torch.ones_like(n)), fallback))
        U = torch.stack(cols, dim=-1)  # [H, r, r]
        # sign: u_k^T C v_k >= 0
        U = U * torch.where((U * CV).sum(1) < 0, -1.0, 1.0).to(U.dtype)[:, None, :]
    # sigma_k = u_k^T C v_k: the value (|C v_k| up to rounding), the gradient u_k v_k^T.
    return torch.einsum("hik,hij,hjk->hk", U.to(C.dtype), C, V.to(C.dtype))


def virtual_to_physical(
    virtual: torch.Tensor, permutation: torch.Tensor, num_rows: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """IVE address split: virtual index -> (physical row, virtual block).

    Args:
        virtual: int64 indices in [0, E*N), any shape.
        permutation: [E*N] int32 or int64, the fixed random permutation pi.
        num_rows: N, physical rows.
    Returns:
        (rows, blocks), int64, same shape as `virtual`: phi = pi(v) mod N, p = pi(v) div N.
    """
    pv = permutation[virtual].long()
    return pv % num_rows, pv // num_rows


def _accum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def weighted_gather_pool(
    rows: torch.Tensor, blocks: torch.Tensor, scores: torch.Tensor, values: torch.Tensor, E: int
) -> torch.Tensor:
    """The IVE hot path: pool score-weighted physical rows into their virtual blocks.

    pooled[t, p, c] = sum_{k : blocks[t,k] = p} scores[t, k, core(c)] * values[rows[t,k], c],
    where core(c) = c // (Dv / h) is the multi-core slice that column c belongs to.

    Args:
        rows: [T, M] int64 physical rows (M = H * m selected values per token).
        blocks: [T, M] int64 virtual blocks in [0, E).
        scores: [T, M, h] per-core pooling weights.
        values: [N, Dv] the physical value table, Dv divisible by h.
        E: number of virtual blocks.
    Returns:
        [T, E, Dv] accumulated in fp32 (fp64 for fp64 inputs), cast to `values.dtype`.
    """
    T, M = rows.shape
    h = scores.shape[-1]
    N, Dv = values.shape
    acc = _accum_dtype(values.dtype)
    gathered = values[rows].to(acc).view(T, M, h, Dv // h)  # [T, M, h, Dv/h]
    weighted = (gathered * scores.to(acc)[..., None]).view(T, M, Dv)  # [T, M, Dv]
    pooled = torch.zeros(T, E, Dv, dtype=acc, device=values.device)
    pooled.scatter_add_(1, blocks[..., None].expand(T, M, Dv), weighted)  # [T, E, Dv]
    return pooled.to(values.dtype)


def ive_aggregate(
    virtual: torch.Tensor,
    scores: torch.Tensor,
    permutation: torch.Tensor,
    values: torch.Tensor,
    E: int,
) -> torch.Tensor:
    """Implicit value expansion without materializing virtual rows: [T, E, Dv] pooled values.

    Args:
        virtual: [T, M] virtual indices; scores: [T, M, h]; permutation: [E*N]; values: [N, Dv].
    """
    rows, blocks = virtual_to_physical(virtual, permutation, values.shape[0])
    return weighted_gather_pool(rows, blocks, scores, values, E)


def materialized_aggregate(
    virtual: torch.Tensor,
    scores: torch.Tensor,
    permutation: torch.Tensor,
    values: torch.Tensor,
    out_weight: torch.Tensor,
) -> torch.Tensor:
    """Test oracle for IVE: build every virtual value explicitly and pool them.

    Args:
        virtual [T, M], scores [T, M, h], permutation [E*N], values [N, Dv];
        out_weight: [D, E, Dv], W_p = out_weight[:, p, :] is virtual block p's projection.
    The virtual value at permuted address j = p * N + phi is W_p V[phi]. With multi-core scoring the
    score applies per Dv slice before the projection, so each virtual value is materialized per core
    slice i: virt[j, i] = W_p[:, slice_i] V[phi, slice_i].
    Returns:
        [T, D] = sum_k sum_i scores[t, k, i] * virt[pi(virtual[t, k]), i].
    """
    N, Dv = values.shape
    D, E, _ = out_weight.shape
    h = scores.shape[-1]
    w = out_weight.reshape(D, E, h, Dv // h)  # [D, E, h, Dv/h]
    vs = values.reshape(N, h, Dv // h)  # [N, h, Dv/h]
    # Every virtual value of every core slice: [E*N, h, D] (the E*N rows that IVE never builds)
    virt = torch.einsum("nic,deic->enid", vs, w).reshape(E * N, h, D)
    picked = virt[permutation[virtual]]  # [T, M, h, D]
    return torch.einsum("tmi,tmid->td", scores.to(picked.dtype), picked)
