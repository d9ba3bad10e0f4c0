"""tucker_topm_fused (TDQKR with a fused phase 2) vs `reference.tucker_topm`.

Runs on CUDA, or on CPU under the Triton interpreter (conftest.py): shapes are tiny on purpose.
fp32/fp64: the kernel must pick exactly the reference's winners in the same order (random continuous
inputs, so no near-ties), and the differentiable tail is then the reference's own ops.
bf16/fp16: the reference rounds the grid to the input dtype before its top-m, the kernel scores in
fp32, so winners legitimately differ; we compare both against float64 with the STYLE.md rule
kernel_err <= 2 * torch_err + ATOL[dtype].
Two kernels: the register kernel (m <= REGISTER_MAX_M) and the tiled one (m up to MAX_M). The
`tiled` fixture lowers REGISTER_MAX_M to 0 so that the small cases also run the tiled kernel; the
m > 128 cases run it as the layer does. Its exact fallback is forced with a scratch smaller than m.
"""

import pytest
import torch

pytest.importorskip("triton")

from megatron_ultramem import reference as R  # noqa: E402
from megatron_ultramem.kernels import gather as G  # noqa: E402
from megatron_ultramem.kernels import topm as TM  # noqa: E402
from megatron_ultramem.kernels import tucker_topm_fused  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Slack on top of 2x the same-dtype reference error: a few ulps of scores of size ~r * |C| * 3^2.
ATOL = {torch.bfloat16: 5e-2, torch.float16: 5e-3}

# (T, H, n', r, h, m): odd T, m = 1, m not a power of two (tile padded), m = n' (phase 1 keeps all).
CASES = [
    (5, 2, 9, 2, 2, 4),
    (3, 1, 6, 1, 1, 1),
    (2, 2, 20, 3, 2, 13),
    (1, 1, 40, 2, 2, 40),
]


# m > REGISTER_MAX_M (the tiled kernel by default). Odd m; m = n' (phase 1 keeps everything, so the
# result is the brute-force top-m of the whole grid); interpreter cost ~1-4 s per (token, head).
LARGE_CASES = [
    (2, 1, 140, 2, 2, 129),
    (1, 1, 131, 3, 1, 131),
    (1, 2, 300, 2, 2, 257),
]


@pytest.fixture(params=["register", "tiled"])
def kernel(request, monkeypatch):
    """Run the test once per phase-2 kernel (the tiled one at small m by lowering the limit)."""
    if request.param == "tiled":
        monkeypatch.setattr(TM, "REGISTER_MAX_M", 0)
    return request.param


def _ids(case):
    return "T{}-H{}-n{}-r{}-h{}-m{}".format(*case)


def make_inputs(case, dtype, seed=0):
    T, H, n, r, h, m = case
    g = torch.Generator().manual_seed(seed)
    s_row = torch.randn(T, H, n, r, generator=g, dtype=torch.float64)
    s_col = torch.randn(T, H, n, r, generator=g, dtype=torch.float64)
    cores = torch.rand(H, h, r, r, generator=g, dtype=torch.float64)  # U(0, 1) like the code's init
    u, v, _ = R.leading_singular_vectors(cores.sum(1))
    return tuple(x.to(DEVICE, dtype) for x in (s_row, s_col, cores, u, v))


def leaves(*xs, dtype=None):
    return [x.detach().to(dtype or x.dtype).requires_grad_(True) for x in xs]


def winner_scores(s_row, s_col, cores, virtual):
    """Per-core scores of given winners (differentiable): the reference's tail, from virtual ids."""
    T, H, n, r = s_row.shape
    m = virtual.shape[-1]
    a, b = virtual // n, virtual % n
    sr_w = torch.gather(s_row, 2, a[..., None].expand(T, H, m, r))
    sc_w = torch.gather(s_col, 2, b[..., None].expand(T, H, m, r))
    return torch.einsum("thmr,hirs,thms->thmi", sr_w, cores, sc_w)


def check_valid(virtual, case):
    T, H, n, r, h, m = case
    assert virtual.shape == (T, H, m) and virtual.dtype == torch.int64
    # Poisoned with -1 (conftest): every slot written, in range, m distinct cells per (t, head).
    assert ((virtual >= 0) & (virtual < n * n)).all()
    assert (torch.sort(virtual, -1).values.diff(dim=-1) != 0).all()


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_matches_reference_exactly(case, dtype, kernel):
    T, H, n, r, h, m = case
    s_row, s_col, cores, u, v = make_inputs(case, dtype)
    sr_k, sc_k, c_k = leaves(s_row, s_col, cores)
    virtual, scores = tucker_topm_fused(sr_k, sc_k, c_k, u, v, m)
    check_valid(virtual, case)
    sr_r, sc_r, c_r = leaves(s_row, s_col, cores)
    virtual_ref, scores_ref = R.tucker_topm(sr_r, sc_r, c_r, u, v, m)
    assert torch.equal(virtual, virtual_ref)
    assert scores.shape == (T, H, m, h) and scores.dtype == dtype
    # Same winners in the same order and the same torch ops on them: equal up to op rounding.
    torch.testing.assert_close(scores, scores_ref, rtol=0, atol=0)
    grad = torch.randn(scores.shape, generator=torch.Generator().manual_seed(6), dtype=dtype).to(
        DEVICE
    )
    scores.backward(grad)
    scores_ref.backward(grad)
    for got, want in ((sr_k, sr_r), (sc_k, sc_r), (c_k, c_r)):
        torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES[:3], ids=_ids)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_against_float64(case, dtype, kernel):
    T, H, n, r, h, m = case
    s_row, s_col, cores, u, v = make_inputs(case, dtype, seed=1)
    x64 = [x.double() for x in (s_row, s_col, cores)]  # exact upcast of the same inputs

    # The best achievable: exact (fp64) top-m over the same phase-1 candidates (phase 1 runs in the
    # input dtype exactly as in the reference and the kernel wrapper).
    i_row = torch.topk(torch.einsum("thar,hr->tha", s_row, u), m, dim=-1).indices
    i_col = torch.topk(torch.einsum("thbr,hr->thb", s_col, v), m, dim=-1).indices
    cand = i_row[..., :, None] * n + i_col[..., None, :]  # [T, H, m, m] candidate virtual ids
    cand_scores = winner_scores(*x64, cand.reshape(T, H, m * m)).sum(-1)
    best = torch.topk(cand_scores, m, dim=-1).values  # [T, H, m] descending

    def run(fn):
        xs = leaves(s_row, s_col, cores)
        virtual, scores = fn(*xs, u, v, m)
        check_valid(virtual, case)
        achieved = winner_scores(*x64, virtual).sum(-1)  # true summed scores of the picks
        grad = torch.randn(
            scores.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64
        )
        scores.backward(grad.to(scores.device, dtype))
        # float64 oracle on the *same* winners: per-core scores and gradients.
        xs64 = leaves(*x64)
        scores64 = winner_scores(*xs64, virtual)
        scores64.backward(grad.to(scores.device))
        errs = [
            (achieved - best).abs().max().item(),
            (scores.double() - scores64).abs().max().item(),
        ]
        errs += [(x.grad.double() - x64_.grad).abs().max().item() for x, x64_ in zip(xs, xs64)]
        return errs

    kernel_errs = run(tucker_topm_fused)
    torch_errs = run(R.tucker_topm)
    names = ["selection", "core_scores", "grad_s_row", "grad_s_col", "grad_cores"]
    for name, ek, et in zip(names, kernel_errs, torch_errs):
        assert ek <= 2 * et + ATOL[dtype], (name, ek, et)


def test_full_candidate_set_is_brute_force(kernel):
    """m = n': phase 1 keeps every row and column, so TDQKR is the exact top-m of the whole grid."""
    case = (3, 2, 7, 2, 2, 7)
    s_row, s_col, cores, u, v = make_inputs(case, torch.float32, seed=2)
    virtual, scores = tucker_topm_fused(s_row, s_col, cores, u, v, 7)
    top, scores_bf = R.brute_force_topm(s_row, s_col, cores, 7)
    assert torch.equal(virtual, top)
    torch.testing.assert_close(scores, scores_bf)


def test_ties(kernel):
    """Integer-valued scores (many exact ties): m distinct winners, the exact top-m multiset, in
    non-increasing order (tie order may differ from torch.topk's)."""
    case = (4, 2, 12, 2, 1, 11)
    T, H, n, r, h, m = case
    g = torch.Generator().manual_seed(3)
    s_row = torch.randint(-2, 3, (T, H, n, r), generator=g).float().to(DEVICE)
    s_col = torch.randint(-2, 3, (T, H, n, r), generator=g).float().to(DEVICE)
    cores = torch.randint(0, 3, (H, h, r, r), generator=g).float().to(DEVICE)
    u, v, _ = R.leading_singular_vectors(cores.sum(1))
    virtual, scores = tucker_topm_fused(s_row, s_col, cores, u, v, m)
    check_valid(virtual, case)
    _, scores_ref = R.tucker_topm(s_row, s_col, cores, u, v, m)
    got = scores.sum(-1)  # integers: exact in fp32
    assert (got.diff(dim=-1) <= 0).all()
    assert torch.equal(got, scores_ref.sum(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_adjacent_floats_and_odd_ties(dtype, kernel):
    """Scores one ulp apart, and a tie at a key with its lowest bit set: exercises the last bit of
    the radix select (random data almost never does). With r = m = n', s_col = I and C = I, phase 1
    keeps everything and the candidate grid is the free matrix S = s_row[0, 0], so any score
    pattern can be planted."""
    up = torch.nextafter(torch.tensor(0.5, dtype=dtype), torch.tensor(1.0, dtype=dtype))  # odd key
    dn = torch.nextafter(torch.tensor(-0.25, dtype=dtype), torch.tensor(-1.0, dtype=dtype))
    top = torch.tensor([3.0, 2.5, 2.0, up, up, 0.5, -0.25, dn], dtype=dtype)
    for m in (4, 5, 6):  # the tied pair is split (4), taken whole (5), plus its 1-ulp neighbour (6)
        rest = -10.0 - torch.arange(m * m - len(top), dtype=dtype)
        g = torch.Generator().manual_seed(m)
        S = torch.cat([top, rest])[torch.randperm(m * m, generator=g)].view(1, 1, m, m).to(DEVICE)
        eye = torch.eye(m, dtype=dtype, device=DEVICE)
        virtual, scores = tucker_topm_fused(
            S, eye[None, None], eye[None, None], eye[:1], eye[:1], m
        )
        check_valid(virtual, (1, 1, m, m, 1, m))
        picked = S.reshape(-1)[virtual.reshape(-1)]
        assert torch.equal(picked, torch.topk(S.reshape(-1), m).values)
        assert torch.equal(scores.reshape(-1), picked)


def test_m_above_kernel_limit_uses_reference(monkeypatch):
    case = (1, 1, TM.MAX_M + 2, 1, 1, TM.MAX_M + 1)
    s_row, s_col, cores, u, v = make_inputs(case, torch.float32, seed=4)

    def no_kernel(*args):
        raise AssertionError("the kernel must not run above MAX_M")

    monkeypatch.setattr(TM, "_phase2_select_op", no_kernel)
    got = tucker_topm_fused(s_row, s_col, cores, u, v, case[-1])
    want = R.tucker_topm(s_row, s_col, cores, u, v, case[-1])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_torch_compile():
    """The selection op is opaque to torch.compile; the differentiable tail is traced around it."""
    case = (2, 1, 6, 2, 2, 3)
    s_row, s_col, cores, u, v = make_inputs(case, torch.float32, seed=5)

    def fn(a, b, c):
        virtual, scores = tucker_topm_fused(a, b, c, u, v, 3)
        return virtual, scores.square().sum()

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    xs_c, xs_e = leaves(s_row, s_col, cores), leaves(s_row, s_col, cores)
    (vc, lc), (ve, le) = compiled(*xs_c), fn(*xs_e)
    lc.backward()
    le.backward()
    assert torch.equal(vc, ve)
    torch.testing.assert_close(lc, le)
    for a, b in zip(xs_c, xs_e):
        torch.testing.assert_close(a.grad, b.grad)


def test_kernel_path_is_exercised():
    """Guard: these tests run the Triton kernels (CUDA or interpreter), not the fallbacks."""
    assert G.use_triton(torch.empty(1, device=DEVICE))


# ----------------------------------------------------------------------------- tiled, m > 128
def phase1_candidates(case, dtype, seed):
    """Phase-1 candidates as the wrapper builds them: [T, H, m, r] rows/columns + summed core."""
    T, H, n, r, h, m = case
    s_row, s_col, cores, u, v = make_inputs(case, dtype, seed=seed)
    i_row = torch.topk(torch.einsum("thar,hr->tha", s_row, u), m, dim=-1).indices
    i_col = torch.topk(torch.einsum("thbr,hr->thb", s_col, v), m, dim=-1).indices
    sr = torch.gather(s_row, 2, i_row[..., None].expand(T, H, m, r))
    sc = torch.gather(s_col, 2, i_col[..., None].expand(T, H, m, r))
    return sr, sc, cores.sum(1)


def exact_order(sr, sc, csum, m):
    """Brute force in float64: every cell's score, stably sorted descending (ties: ascending
    cell), first m. Exact when the scores are exact in float64 (integers, or the same rounding
    as the kernel's)."""
    T, H = sr.shape[:2]
    grid = torch.einsum("thar,hrs,thbs->thab", sr.double(), csum.double(), sc.double())
    flat = grid.reshape(T, H, m * m)
    return torch.sort(flat, dim=-1, descending=True, stable=True).indices[..., :m]


@pytest.mark.parametrize("case", LARGE_CASES, ids=_ids)
def test_large_m_matches_reference_exactly(case):
    """m > 128 through the public entry point (tiled kernel, no monkeypatching), fp32: the same
    winners in the same order as the reference, per-core scores and gradients identical."""
    T, H, n, r, h, m = case
    assert m > TM.REGISTER_MAX_M
    s_row, s_col, cores, u, v = make_inputs(case, torch.float32, seed=20)
    sr_k, sc_k, c_k = leaves(s_row, s_col, cores)
    virtual, scores = tucker_topm_fused(sr_k, sc_k, c_k, u, v, m)
    check_valid(virtual, case)
    sr_r, sc_r, c_r = leaves(s_row, s_col, cores)
    virtual_ref, scores_ref = R.tucker_topm(sr_r, sc_r, c_r, u, v, m)
    assert torch.equal(virtual, virtual_ref)
    torch.testing.assert_close(scores, scores_ref, rtol=0, atol=0)  # same ops on the same winners
    grad = torch.randn(scores.shape, generator=torch.Generator().manual_seed(21)).to(DEVICE)
    scores.backward(grad)
    scores_ref.backward(grad)
    for got, want in ((sr_k, sr_r), (sc_k, sc_r), (c_k, c_r)):
        torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=0)
    if n == m:  # phase 1 keeps every row and column: TDQKR is the brute-force top-m
        top, _ = R.brute_force_topm(s_row, s_col, cores, m)
        assert torch.equal(torch.sort(virtual, -1).values, torch.sort(top, -1).values)


def test_large_m_float64_and_scratch_path():
    """fp64 at odd m > 128 on phase-1 ordered data: the scratch path (status 0) is what runs, and
    its result is the float64 brute force over the candidate grid (same rounding: equal cells)."""
    case = (2, 1, 200, 2, 2, 131)
    sr, sc, csum = phase1_candidates(case, torch.float64, seed=22)
    top, status = TM.phase2_select(sr, sc, csum, 131, return_status=True)
    assert (status == 0).all()
    # Different summation order from the einsum: compare scores, not cells, to the last ulps.
    grid = torch.einsum("thar,hrs,thbs->thab", sr, csum, sc).reshape(2, 1, -1)
    got = torch.gather(grid, 2, top)
    want = torch.topk(grid, 131, dim=-1).values
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)  # fp64 rounding of r=2 products


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_large_m_low_precision_against_float64(dtype):
    """bf16/fp16 at m = 129: kernel (fp32 scores) vs reference (grid rounded to dtype), both
    against the float64 best, STYLE.md rule (as test_low_precision_against_float64)."""
    case = (1, 1, 150, 2, 2, 129)
    T, H, n, r, h, m = case
    s_row, s_col, cores, u, v = make_inputs(case, dtype, seed=23)
    x64 = [x.double() for x in (s_row, s_col, cores)]
    i_row = torch.topk(torch.einsum("thar,hr->tha", s_row, u), m, dim=-1).indices
    i_col = torch.topk(torch.einsum("thbr,hr->thb", s_col, v), m, dim=-1).indices
    cand = (i_row[..., :, None] * n + i_col[..., None, :]).reshape(T, H, m * m)
    best = torch.topk(winner_scores(*x64, cand).sum(-1), m, dim=-1).values  # descending

    def selection_err(fn):
        virtual, _ = fn(s_row, s_col, cores, u, v, m)
        check_valid(virtual, case)
        achieved = torch.sort(winner_scores(*x64, virtual).sum(-1), -1, descending=True).values
        return (achieved - best).abs().max().item()

    ek, et = selection_err(tucker_topm_fused), selection_err(R.tucker_topm)
    assert ek <= 2 * et + ATOL[dtype], (ek, et)


@pytest.mark.parametrize("m", [1, 5, 13])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_tiled_fallback_is_exact(m, dtype):
    """A scratch smaller than m forces the exact whole-grid fallback (status 1) in every program;
    it must equal the scratch path and the stable float64 brute force (cells, in order)."""
    case = (1, 2, max(m, 17), 2, 2, m)  # the fallback costs ~70 grid passes: 2 programs only
    sr, sc, csum = phase1_candidates(case, dtype, seed=24 + m)
    fast, st_fast = TM.phase2_select(sr, sc, csum, m, impl="tiled", return_status=True)
    slow, st_slow = TM.phase2_select(
        sr, sc, csum, m, impl="tiled", cap=m - 1, return_status=True
    )
    assert (st_fast == 0).all() and (st_slow == 1).all()
    assert torch.equal(fast, slow)
    if dtype == torch.float64:  # the kernel's fp64 scores round like the einsum's (r = 2): cells
        assert torch.equal(fast, exact_order(sr, sc, csum, m))


@pytest.mark.parametrize("impl,cap", [("register", None), ("tiled", None), ("tiled", 4)])
def test_tie_rule_is_exact(impl, cap):
    """Small integer scores (exact in fp32, heavy ties): every kernel path returns exactly the
    stable brute-force order, i.e. descending score with ties by ascending cell."""
    T, H, m, r = 2, 2, 9, 2
    g = torch.Generator().manual_seed(25)
    sr = torch.randint(-2, 3, (T, H, m, r), generator=g).float().to(DEVICE)
    sc = torch.randint(-2, 3, (T, H, m, r), generator=g).float().to(DEVICE)
    csum = torch.randint(0, 3, (H, r, r), generator=g).float().to(DEVICE)
    top, status = TM.phase2_select(sr, sc, csum, m, impl=impl, cap=cap, return_status=True)
    assert torch.equal(top, exact_order(sr, sc, csum, m))
    if cap is not None:
        assert (status == 1).all()


def test_no_candidate_grid_is_allocated():
    """At m > 128 no torch tensor of T*H*m*m elements (the reference's grid) is created: the
    largest allocation is the phase-1 scores, the [T*H, CAP] scratch or the per-core tail's
    [T*H*m, h*r*r] einsum intermediate."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestTensor(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for x in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(x, torch.Tensor):
                    self.largest = max(self.largest, x.numel())
            return out

    case = (2, 1, 140, 2, 2, 129)
    T, H, n, r, h, m = case
    s_row, s_col, cores, u, v = make_inputs(case, torch.float32, seed=26)
    with LargestTensor() as mode:
        virtual, _ = tucker_topm_fused(s_row, s_col, cores, u, v, m)
    check_valid(virtual, case)
    cap = TM.tiled_config(m)["CAP_PAD"]
    assert mode.largest <= max(T * H * n * r, T * H * cap, T * H * m * h * r * r) < T * H * m * m
