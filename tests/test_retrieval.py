"""TDQKR retrieval against brute force (python loops over cells, float64)."""

import itertools

import numpy as np
import pytest
import torch

from megatron_ultramem import reference


def _loop_score(s_row, s_col, cores, t, hd, a, b):
    """sum_i S_row[a]^T C_i S_col[b], one cell, plain python floats."""
    r = s_row.shape[-1]
    total = 0.0
    per_core = []
    for i in range(cores.shape[1]):
        c = 0.0
        for x, y in itertools.product(range(r), range(r)):
            c += float(s_row[t, hd, a, x]) * float(cores[hd, i, x, y]) * float(s_col[t, hd, b, y])
        per_core.append(c)
        total += c
    return total, per_core


@pytest.mark.parametrize("T,H,n_side,r,h,m", [(3, 2, 9, 2, 2, 4), (2, 1, 7, 3, 1, 1), (2, 3, 6, 1, 3, 6)])
def test_phase2_equals_brute_force_over_candidate_grid(T, H, n_side, r, h, m):
    g = torch.Generator().manual_seed(T * 100 + n_side)
    s_row = torch.randn(T, H, n_side, r, generator=g, dtype=torch.float64)
    s_col = torch.randn(T, H, n_side, r, generator=g, dtype=torch.float64)
    cores = torch.randn(H, h, r, r, generator=g, dtype=torch.float64)
    u, v, _ = reference.leading_singular_vectors(cores.sum(1))
    virtual, core_scores = reference.tucker_topm(s_row, s_col, cores, u, v, m)
    assert virtual.shape == (T, H, m) and core_scores.shape == (T, H, m, h)
    for t, hd in itertools.product(range(T), range(H)):
        # phase 1 by hand: rank-1 projections, the m largest rows and columns
        pr = [float(sum(s_row[t, hd, a, x] * u[hd, x] for x in range(r))) for a in range(n_side)]
        pc = [float(sum(s_col[t, hd, b, x] * v[hd, x] for x in range(r))) for b in range(n_side)]
        rows = sorted(range(n_side), key=lambda a: -pr[a])[:m]
        cols = sorted(range(n_side), key=lambda b: -pc[b])[:m]
        cells = []
        for a, b in itertools.product(rows, cols):
            total, per_core = _loop_score(s_row, s_col, cores, t, hd, a, b)
            cells.append((total, a * n_side + b, per_core))
        cells.sort(key=lambda c: -c[0])
        expected = cells[:m]
        assert virtual[t, hd].tolist() == [c[1] for c in expected]
        # float64 einsum vs python sums: same terms, different order; 1e-12 is rounding only
        np.testing.assert_allclose(core_scores[t, hd].numpy(), [c[2] for c in expected], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank1_nonnegative_two_phase_equals_full_grid(seed):
    """Rank-1 summed core with non-negative projections: TDQKR is exact over all n'^2 cells."""
    g = torch.Generator().manual_seed(seed)
    T, H, n_side, r, h, m, K = 4, 2, 8, 3, 2, 5, 5
    q = torch.rand(T, K, generator=g, dtype=torch.float64)  # non-negative queries
    keys_r = torch.rand(H, n_side, K, r, generator=g, dtype=torch.float64)  # and keys
    keys_c = torch.rand(H, n_side, K, r, generator=g, dtype=torch.float64)
    s_row = reference.row_col_scores(q, keys_r)
    s_col = reference.row_col_scores(q, keys_c)
    a = torch.rand(H, r, generator=g, dtype=torch.float64)
    b = torch.rand(H, r, generator=g, dtype=torch.float64)
    w = torch.rand(H, h, generator=g, dtype=torch.float64) + 0.1
    cores = w[..., None, None] * (a[:, None, :, None] * b[:, None, None, :])  # [H, h, r, r]
    u, v, s = reference.leading_singular_vectors(cores.sum(1))
    assert torch.all(s[:, 1:] < 1e-12), "summed core must be rank 1"
    # The SVD's sign is arbitrary; with the default alignment (sum(u) >= 0) u and v are non-negative.
    assert torch.all(u >= -1e-12) and torch.all(v >= -1e-12)
    virtual, core_scores = reference.tucker_topm(s_row, s_col, cores, u, v, m)
    for t, hd in itertools.product(range(T), range(H)):
        cells = []
        for ra, cb in itertools.product(range(n_side), range(n_side)):
            total, per_core = _loop_score(s_row, s_col, cores, t, hd, ra, cb)
            cells.append((total, ra * n_side + cb, per_core))
        cells.sort(key=lambda c: -c[0])
        assert virtual[t, hd].tolist() == [c[1] for c in cells[:m]]
        np.testing.assert_allclose(
            core_scores[t, hd].numpy(), [c[2] for c in cells[:m]], rtol=1e-12, atol=1e-12
        )
    bf_virtual, bf_scores = reference.brute_force_topm(s_row, s_col, cores, m)
    assert torch.equal(bf_virtual, virtual)


def test_rank1_with_negative_projections_can_miss():
    """The documented limitation: a product of two large negatives scores high but is not
    preselected. This guards against a 'fix' that silently changes phase 1's semantics."""
    s_row = torch.tensor([[[[-5.0], [1.0], [0.5]]]], dtype=torch.float64)  # [1, 1, 3, 1]
    s_col = torch.tensor([[[[-5.0], [1.0], [0.5]]]], dtype=torch.float64)
    cores = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    u, v, _ = reference.leading_singular_vectors(cores.sum(1))
    virtual, _ = reference.tucker_topm(s_row, s_col, cores, u, v, 1)
    best, _ = reference.brute_force_topm(s_row, s_col, cores, 1)
    assert best.item() == 0 and virtual.item() == 1 * 3 + 1
