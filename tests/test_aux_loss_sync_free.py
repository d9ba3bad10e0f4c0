"""`reference.singular_values` (the aux loss's sync-free singular values) against
torch.linalg.svdvals in float64: values and gradients, random and near-degenerate cores.

svdvals on CUDA reads the solver status on the host (a sync per training step, an error in CUDA
graph capture); singular_values uses a closed form for r = 2 and a fixed-sweep one-sided Jacobi
for r >= 3 (tests/kernels/test_sync_free.py checks that the layer's step then has no syncing op).

Tolerances (float64, eps = 2.2e-16): LAPACK and these formulas are both backward stable, so each
singular value is within a few eps x sigma_1 of the exact one: values are compared to 50 eps x
sigma_1 (relative to the largest). The gradient of sigma_k is u_k v_k^T, whose error grows like
eps / gap for a gap between sigma_k and its neighbours: 1e-9 absolute covers the smallest gap
drawn here (1e-6 sigma_1) with a 100x margin; exactly repeated singular values are excluded from
gradient checks (the gradient is not unique there).
"""

import pytest
import torch

from megatron_ultramem import reference

EPS = torch.finfo(torch.float64).eps


def cores(kind: str, H: int, r: int, seed: int) -> torch.Tensor:
    """[H, r, r] float64 summed cores of one kind (all with distinct singular values)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    if kind == "random":
        return rand(H, r, r)
    U, _ = torch.linalg.qr(rand(H, r, r))
    V, _ = torch.linalg.qr(rand(H, r, r))
    s = torch.linspace(2.0, 1.0, r, dtype=torch.float64).expand(H, r).clone()
    if kind == "near-degenerate":  # sigma_1 - sigma_2 = 1e-6 (the hinge's neighbourhood)
        s[:, 1] = s[:, 0] - 1e-6
    elif kind == "near-singular":  # smallest sigma 1e-9
        s[:, -1] = 1e-9
    elif kind == "large":  # scale 1e6: no overflow of the squares in the closed form
        s = s * 1e6
    return U @ torch.diag_embed(s) @ V.transpose(-1, -2)


KINDS = ["random", "near-degenerate", "near-singular", "large"]


# r = 1 has one singular value: no gap, no degeneracy, so only the random kind applies
CASES = [(r, kind) for r in (1, 2, 3, 4, 7) for kind in KINDS if r > 1 or kind == "random"]


@pytest.mark.parametrize("r,kind", CASES)
def test_values_and_gradients_match_svdvals(r, kind):
    H = 5
    for seed in range(6):
        C = cores(kind, H, r, seed).requires_grad_(True)
        mine = reference.singular_values(C)
        ref = torch.linalg.svdvals(C)
        assert mine.shape == ref.shape == (H, r)
        scale = ref[:, :1]
        assert ((mine - ref).abs() <= 50 * EPS * scale).all(), (mine - ref).abs().max()
        w = torch.randn(H, r, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        (g_mine,) = torch.autograd.grad((mine * w).sum(), C)
        (g_ref,) = torch.autograd.grad((ref * w).sum(), C)
        tol = 1e-9 * scale.max().item()
        assert (g_mine - g_ref).abs().max() <= tol, ((g_mine - g_ref).abs().max(), kind, r)


@pytest.mark.parametrize("r", [2, 3])
def test_aux_loss_value_and_gradient(r):
    """The aux loss itself (hinge at tau, mean over heads): same value and core gradient."""
    C = cores("random", 4, r, 7).requires_grad_(True)
    losses = [reference.tucker_aux_loss(fn(C), 0.3, 0.2)
              for fn in (reference.singular_values, torch.linalg.svdvals)]  # fmt: skip
    assert losses[0].item() > 0
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-13, atol=0)
    grads = [torch.autograd.grad(x, C)[0] for x in losses]
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-12)


def test_zero_and_repeated_singular_values_stay_finite():
    """C = 0 and C = s * orthogonal (all singular values equal): finite values and gradients
    (autograd through sqrt/hypot at 0 and the Jacobi's zero rotations would give NaN)."""
    for r in (2, 3):
        for C in (torch.zeros(2, r, r, dtype=torch.float64),
                  3.0 * torch.eye(r, dtype=torch.float64).expand(2, r, r)):  # fmt: skip
            C = C.clone().requires_grad_(True)
            s = reference.singular_values(C)
            torch.testing.assert_close(s, torch.linalg.svdvals(C), rtol=0, atol=1e-14)
            (g,) = torch.autograd.grad(s.sum(), C)
            assert torch.isfinite(g).all()


def test_float32_input_keeps_dtype():
    """The layer passes the summed cores in fp32: fp32 out, within fp32 rounding of svdvals."""
    C = cores("random", 3, 2, 1).float()
    s = reference.singular_values(C)
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, torch.linalg.svdvals(C), rtol=1e-6, atol=1e-6)
