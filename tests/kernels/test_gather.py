"""gather_pool (IVE + MCS weighted gather) vs `reference.weighted_gather_pool`.

Runs on CUDA, or on CPU under the Triton interpreter (conftest.py): shapes are tiny on purpose.
Tolerance rule (STYLE.md, flash-attention): compare the kernel and the same-dtype PyTorch reference
both against the float64 reference; require  kernel_err <= 2 * torch_err + ATOL[dtype].
"""

import pytest
import torch

pytest.importorskip("triton")

from megatron_ultramem import reference as R  # noqa: E402
from megatron_ultramem.kernels import gather as G  # noqa: E402
from megatron_ultramem.kernels import gather_pool  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# Slack added to 2x the same-dtype reference error, for cases where that error is ~0. Outputs are sums
# of <= 13 products of N(0,1) numbers (|x| < ~20): a few ulps of that scale in each dtype.
ATOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}

# (T, M, N, Dv, h, E): odd T, Dv not a power of two, M=1 (H=m=1), E=1 and E=9 (padded to 16), h=1/2,
# N small so rows repeat within and across tokens, Dv=300 to span several Dv blocks.
CASES = [
    (5, 7, 11, 6, 2, 3),
    (7, 1, 3, 10, 2, 1),
    (3, 13, 5, 24, 1, 9),
    (2, 5, 4, 300, 2, 2),
]


def _ids(case):
    return "T{}-M{}-N{}-Dv{}-h{}-E{}".format(*case)


def make_inputs(case, dtype, seed=0, scores_dtype=None):
    T, M, N, Dv, h, E = case
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, N, (T, M), generator=g)
    if M > 1:
        rows[:, 1] = rows[:, 0]  # duplicate row within every token
    if T > 1:
        rows[-1] = rows[0]  # and across tokens
    blocks = torch.randint(0, E, (T, M), generator=g)
    scores = torch.randn(T, M, h, generator=g, dtype=torch.float64)
    values = torch.randn(N, Dv, generator=g, dtype=torch.float64)
    return (
        rows.to(DEVICE),
        blocks.to(DEVICE),
        scores.to(DEVICE, scores_dtype or dtype),
        values.to(DEVICE, dtype),
    )


def randn(*shape, seed):
    """Seeded float64 normal draws on DEVICE (tests must not depend on the global RNG state)."""
    return torch.randn(
        *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    ).to(DEVICE)


def err(x, ref64):
    return (x.double() - ref64).abs().max().item()


def leaf(x, dtype=None):
    return x.detach().to(dtype or x.dtype).requires_grad_(True)


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_matches_reference(case, dtype):
    T, M, N, Dv, h, E = case
    rows, blocks, scores, values = make_inputs(case, dtype)
    out = gather_pool(rows, blocks, scores, values, E)
    assert out.shape == (T, E, Dv) and out.dtype == dtype
    # Outputs start as NaN (conftest): any element the kernel did not write is caught here.
    assert torch.isfinite(out).all()
    ref64 = R.weighted_gather_pool(rows, blocks, scores.double(), values.double(), E)
    ref = R.weighted_gather_pool(rows, blocks, scores, values, E)
    assert err(out, ref64) <= 2 * err(ref, ref64) + ATOL[dtype]


def test_forward_mixed_dtypes():
    """fp32 scores with a bf16 table (scores kept in fp32 by the caller): output in bf16."""
    case = CASES[0]
    rows, blocks, scores, values = make_inputs(case, torch.bfloat16, scores_dtype=torch.float32)
    out = gather_pool(rows, blocks, scores, values, case[-1])
    ref64 = R.weighted_gather_pool(rows, blocks, scores.double(), values.double(), case[-1])
    ref = R.weighted_gather_pool(rows, blocks, scores, values, case[-1])
    assert out.dtype == torch.bfloat16
    assert err(out, ref64) <= 2 * err(ref, ref64) + ATOL[torch.bfloat16]


# Decode-size shapes for the split forward: T = 1 and odd T, M not a multiple of the split or of
# UNROLL, Dv ending in a partial block (48 = 32 + 16 at bf16/fp32, 40 = 32 + 8), E = 3 (padded).
SPLIT_CASES = [
    (1, 40, 50, 48, 2, 4),
    (3, 37, 20, 40, 1, 3),
]


@pytest.mark.parametrize("split", [None, 2, 7], ids=lambda s: f"split{s}")
@pytest.mark.parametrize("case", SPLIT_CASES, ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_split_matches_reference(case, dtype, split):
    """Selection-split forward (partial fp32 tiles + ordered reduce): same rule as the forward
    test. split=None is the launch table's choice, which must split at these decode sizes."""
    T, M, N, Dv, h, E = case
    rows, blocks, scores, values = make_inputs(case, dtype, seed=7)
    if split is None:
        cfg = G.forward_config(T, M, Dv, E, values.element_size(), G.num_sms(values.device))
        assert cfg.split > 1, cfg
    out = G.gather_pool_forward(rows, blocks, scores, values, E, split=split)
    assert out.shape == (T, E, Dv) and out.dtype == dtype
    assert torch.isfinite(out).all()  # NaN-poisoned output and workspace: all written
    ref64 = R.weighted_gather_pool(rows, blocks, scores.double(), values.double(), E)
    ref = R.weighted_gather_pool(rows, blocks, scores, values, E)
    assert err(out, ref64) <= 2 * err(ref, ref64) + ATOL[dtype]
    # Deterministic: the splits are summed in a fixed order.
    again = G.gather_pool_forward(rows, blocks, scores, values, E, split=split)
    assert torch.equal(out, again)


def test_split_forward_under_autograd():
    """The public op at a decode size (the table splits it): forward and both gradients."""
    case = SPLIT_CASES[0]
    T, M, N, Dv, h, E = case
    rows, blocks, scores, values = make_inputs(case, torch.float32, seed=8)
    assert G.forward_config(T, M, Dv, E, 4, G.num_sms(values.device)).split > 1
    grad_out = randn(T, E, Dv, seed=103)
    gs, gv = grads_of(gather_pool, rows, blocks, scores, values, E, grad_out)
    gs64, gv64 = grads_of(
        R.weighted_gather_pool, rows, blocks, scores.double(), values.double(), E, grad_out
    )
    # fp32 sums of <= 40 products of magnitude < ~11 (measured error ~1e-6 under the interpreter)
    assert err(gs, gs64) <= ATOL[torch.float32] and err(gv, gv64) <= ATOL[torch.float32]


def test_forward_config_table():
    """The launch table's invariants (pure arithmetic, no kernel): register tile <= 4096 fp32,
    rows read in >= 128-byte segments when narrowed, splits only while programs < TARGET, chunks
    of >= 2*UNROLL selections, workspace < 2 * TARGET * E_PAD * BLOCK_D * 4 bytes, and training
    sizes keep the single-pass kernel at its widest block."""
    sms = 132
    target = G.PROGRAMS_PER_SM * sms
    for T in (1, 2, 3, 7, 16, 33, 64, 100, 257, 1000, 4096, 8192):
        for M in (1, 7, 160, 1536):
            for Dv in (16, 48, 300, 1024):
                for E in (1, 4, 9, 16):
                    for elt in (2, 4, 8):
                        c = G.forward_config(T, M, Dv, E, elt, sms)
                        e_pad = G._next_pow2(E)
                        widest = G._block_d(Dv, max(16, min(256, 4096 // e_pad)))
                        assert e_pad * c.block_d <= 4096 and 16 <= c.block_d <= widest
                        assert c.block_d == widest or c.block_d * elt >= 128
                        programs = T * -(-Dv // c.block_d)
                        assert c.block_d == widest or programs < 2 * target
                        if c.split > 1:
                            assert programs < target and M // c.split >= 2 * c.unroll
                            ws = c.split * T * E * Dv * 4
                            assert ws < 2 * target * e_pad * c.block_d * 4 * 2  # Dv tail slack
    big = G.forward_config(8192, 160, 1024, 4, 2, sms)
    assert big.split == 1 and big.block_d == 256


def grads_of(fn, rows, blocks, scores, values, E, grad_out):
    s, v = leaf(scores), leaf(values)
    fn(rows, blocks, s, v, E).backward(grad_out.to(values.dtype))
    return s.grad, v.grad


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "sorted"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_matches_reference(case, dtype, deterministic):
    T, M, N, Dv, h, E = case
    rows, blocks, scores, values = make_inputs(case, dtype, seed=1)
    grad_out = randn(T, E, Dv, seed=100)

    def kernel(*args):
        return gather_pool(*args, deterministic=deterministic)

    gs, gv = grads_of(kernel, rows, blocks, scores, values, E, grad_out)
    assert gs.shape == scores.shape and gs.dtype == scores.dtype
    assert gv.shape == values.shape and gv.dtype == values.dtype
    assert torch.isfinite(gs).all() and torch.isfinite(gv).all()
    gs64, gv64 = grads_of(
        R.weighted_gather_pool, rows, blocks, scores.double(), values.double(), E, grad_out
    )
    gs_t, gv_t = grads_of(R.weighted_gather_pool, rows, blocks, scores, values, E, grad_out)
    # The same-dtype reference accumulates the table gradient in `dtype` (index backward); the
    # kernel accumulates in fp32, so for bf16/fp16 it is usually far inside the bound.
    assert err(gs, gs64) <= 2 * err(gs_t, gs64) + ATOL[dtype]
    assert err(gv, gv64) <= 2 * err(gv_t, gv64) + ATOL[dtype]


@pytest.mark.parametrize("need", ["scores", "values"])
def test_backward_one_input(need):
    """Only one of scores / values requires grad: the other kernel branch is skipped."""
    case = CASES[0]
    E = case[-1]
    rows, blocks, scores, values = make_inputs(case, torch.float32, seed=2)
    s = leaf(scores) if need == "scores" else scores
    v = leaf(values) if need == "values" else values
    out = gather_pool(rows, blocks, s, v, E)
    grad_out = randn(*out.shape, seed=102).to(out.dtype)
    out.backward(grad_out)
    s64, v64 = leaf(scores, torch.float64), leaf(values, torch.float64)
    R.weighted_gather_pool(rows, blocks, s64, v64, E).backward(grad_out.double())
    got, want = (s.grad, s64.grad) if need == "scores" else (v.grad, v64.grad)
    assert err(got, want) <= ATOL[torch.float32]  # fp32 accumulation of <= 7 terms


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic_is_bitwise_reproducible(dtype):
    """Sorted-row backward: two runs give identical bits (and match the reference)."""
    case = (7, 9, 3, 10, 2, 3)  # 63 selections over 3 rows: long runs of equal rows
    T, M, N, Dv, h, E = case
    rows, blocks, scores, values = make_inputs(case, dtype, seed=3)
    grad_out = randn(T, E, Dv, seed=100)

    def kernel(*args):
        return gather_pool(*args, deterministic=True)

    gs1, gv1 = grads_of(kernel, rows, blocks, scores, values, E, grad_out)
    gs2, gv2 = grads_of(kernel, rows, blocks, scores, values, E, grad_out)
    assert torch.equal(gv1, gv2) and torch.equal(gs1, gs2)
    _, gv64 = grads_of(
        R.weighted_gather_pool, rows, blocks, scores.double(), values.double(), E, grad_out
    )
    _, gv_t = grads_of(R.weighted_gather_pool, rows, blocks, scores, values, E, grad_out)
    assert err(gv1, gv64) <= 2 * err(gv_t, gv64) + ATOL[dtype]


def test_poison_switch_is_on():
    """The NaN pre-fill that the tests above rely on to catch unwritten elements is active."""
    assert torch.isnan(G.empty_output(3, dtype=torch.float32, device=DEVICE)).all()
    assert (G.empty_output(3, dtype=torch.int64, device=DEVICE) == -1).all()


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "sorted"])
@pytest.mark.parametrize("megatron_ddp", [False, True], ids=["plain", "ddp-flag"])
def test_main_grad_accumulation(deterministic, megatron_ddp):
    """Gradient-accumulation fusion: the table gradient is added into values.main_grad (fp32)."""
    case = CASES[0]
    T, M, N, Dv, h, E = case
    rows, blocks, scores, values = make_inputs(case, torch.bfloat16, seed=4)
    param = torch.nn.Parameter(values.clone())
    param.main_grad = randn(N, Dv, seed=101).float()
    before = param.main_grad.clone()
    if megatron_ddp:
        param.grad_added_to_main_grad = False  # Megatron DDP sets this on every param
    s = leaf(scores)
    out = gather_pool(rows, blocks, s, param, E, deterministic, accumulate_into_main_grad=True)
    grad_out = randn(T, E, Dv, seed=100)
    out.backward(grad_out.to(torch.bfloat16))

    s64, v64 = leaf(scores, torch.float64), leaf(values, torch.float64)
    R.weighted_gather_pool(rows, blocks, s64, v64, E).backward(grad_out.to(torch.bfloat16).double())
    # fp32 accumulation of exact bf16 products onto an fp32 buffer: fp32 rounding only.
    assert err(param.main_grad, before.double() + v64.grad) <= 1e-5
    assert err(s.grad, s64.grad) <= ATOL[torch.bfloat16]
    if megatron_ddp:
        # Megatron's convention: a dummy grad so DDP's hook fires, flagged as already added.
        assert param.grad_added_to_main_grad is True
        assert param.grad is not None and param.grad.shape == param.shape
    else:
        assert param.grad is None


def test_main_grad_flag_without_main_grad_returns_grad():
    """accumulate_into_main_grad=True on a table without main_grad falls back to a normal grad."""
    case = CASES[0]
    E = case[-1]
    rows, blocks, scores, values = make_inputs(case, torch.float32, seed=5)
    v = leaf(values)
    out = gather_pool(rows, blocks, scores, v, E, accumulate_into_main_grad=True)
    grad_out = randn(*out.shape, seed=102).to(out.dtype)
    out.backward(grad_out)
    v64 = leaf(values, torch.float64)
    R.weighted_gather_pool(rows, blocks, scores.double(), v64, E).backward(grad_out.double())
    assert err(v.grad, v64.grad) <= ATOL[torch.float32]


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile(backend):
    """The custom op is opaque to torch.compile: fullgraph capture, same forward and gradients.

    aot_eager also traces the backward through register_autograd and the backward op's fake impl.
    """
    case = CASES[0]
    E = case[-1]
    rows, blocks, scores, values = make_inputs(case, torch.float32, seed=6)

    def loss_fn(r, b, s, v):
        return gather_pool(r, b, s, v, E).square().sum()

    compiled = torch.compile(loss_fn, backend=backend, fullgraph=True)
    s1, v1 = leaf(scores), leaf(values)
    loss_c = compiled(rows, blocks, s1, v1)
    loss_c.backward()
    s2, v2 = leaf(scores), leaf(values)
    loss_e = loss_fn(rows, blocks, s2, v2)
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(s1.grad, s2.grad)
    torch.testing.assert_close(v1.grad, v2.grad)


def test_falls_back_to_reference_without_triton(monkeypatch):
    """Where Triton cannot run, gather_pool is exactly the reference."""
    monkeypatch.setattr(G, "use_triton", lambda t: False)
    case = CASES[0]
    rows, blocks, scores, values = make_inputs(case, torch.float32)
    out = gather_pool(rows, blocks, scores, values, case[-1])
    assert torch.equal(out, R.weighted_gather_pool(rows, blocks, scores, values, case[-1]))
