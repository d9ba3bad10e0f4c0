"""gather_pool (IVE + MCS weighted gather) vs `reference.weighted_gather_pool`.

Runs on CUDA, or on CPU under the Triton interpreter (conftest.py): shapes are tiny on purpose.
Tolerance rule (STYLE.md, flash-attention): compare the kernel and the same-dtype PyTorch reference
both against the float64 reference; require  kernel_err <= 2 * torch_err + ATOL[dtype].
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


# Every split for a 4-byte and a 2-byte table; fp16 (the bf16 kernel with another element type)
# and fp64 (8-byte rows, fp64 accumulation) at the table's split only: the split count changes
# the chunking, not the per-dtype code.
SPLIT_PARAMS = [
    pytest.param(d, s, id=f"{d}-split{s}")
    for d, s in [(d, s) for d in (torch.float32, torch.bfloat16) for s in (None, 2, 7)]
    + [(torch.float16, None), (torch.float64, None)]
]


@pytest.mark.parametrize("case", SPLIT_CASES, ids=_ids)
@pytest.mark.parametrize("dtype,split", SPLIT_PARAMS)
def test_forward_split_matches_reference(case, dtype, split):
    """Selection-split forward (partial fp32 tiles + ordered reduce): same rule as the forward
    test. split=None is the launch table's choice, which must split at these decode sizes."""
    T, M, N, Dv, h, E = case
    rows, blocks, scores, values = make_inputs(case, dtype, seed=7)
    if split is None:
        cfg = G.forward_config(T, M, Dv, E, values.element_size(), G.num_sms(values.device), h)
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
    assert G.forward_config(T, M, Dv, E, 4, G.num_sms(values.device), h).split > 1
    grad_out = randn(T, E, Dv, seed=103)
    gs, gv = grads_of(gather_pool, rows, blocks, scores, values, E, grad_out)
    gs64, gv64 = grads_of(
        R.weighted_gather_pool, rows, blocks, scores.double(), values.double(), E, grad_out
    )
    # fp32 sums of <= 40 products of magnitude < ~11 (measured error ~1e-6 under the interpreter)
    assert err(gs, gs64) <= ATOL[torch.float32] and err(gv, gv64) <= ATOL[torch.float32]


def test_forward_config_table():
    """The launch table's invariants (pure arithmetic, no kernel): a warp reads 16-byte row
    vectors (BLOCK_D x TOKENS = 32 x 16 / elt columns, BLOCK_D within the core), the one-hot tile
    within ONEHOT_MAX_ACC accumulators per thread and larger E on the sorted path, splits only
    while the programs fall short of TARGET, in chunks of >= 2 * UNROLL and at most sqrt(M)
    splits, and training sizes single-pass."""
    sms = 132
    target = G.PROGRAMS_PER_SM * sms
    for T in (1, 2, 3, 7, 16, 33, 64, 100, 257, 1000, 4096, 8192):
        for M in (1, 7, 160, 1536):
            for Dv, h in ((16, 1), (48, 2), (300, 2), (1024, 2), (128, 1)):
                for E in (1, 4, 9, 16):
                    for elt in (2, 4, 8):
                        c = G.forward_config(T, M, Dv, E, elt, sms, h)
                        vec, DH = 16 // elt, Dv // h
                        onehot_fits = G._next_pow2(E) * vec <= G.ONEHOT_MAX_ACC
                        assert c.path == ("onehot" if onehot_fits else "sorted"), (c, E, elt)
                        assert c.block_d == max(16, min(G._next_pow2(DH), 32 * vec))
                        if c.path == "sorted":
                            assert c.split == 1 and 2 * c.unroll <= c.seg <= G.SEG_MAX
                            continue
                        assert c.tokens == max(1, 32 * vec // c.block_d)
                        programs = -(-T // c.tokens) * h * -(-DH // c.block_d)
                        if c.split > 1:
                            assert programs < target
                            assert M // c.split >= 2 * c.unroll and c.split <= M**0.5
    big = G.forward_config(8192, 160, 1024, 4, 2, sms, 2)
    assert big == G.ForwardLaunch("onehot", 256, 1, 4, 1, 0, 1, 1)
    assert G.forward_config(8192, 160, 1024, 16, 2, sms, 2).path == "sorted"  # bf16, E = 16
    assert G.forward_config(8192, 160, 128, 4, 2, sms, 1).tokens == 2  # narrow core (TP = 8)


def grads_of(fn, rows, blocks, scores, values, E, grad_out):
    s, v = leaf(scores), leaf(values)
    fn(rows, blocks, s, v, E).backward(grad_out.to(values.dtype))
    return s.grad, v.grad


# fp32/fp64 tables: the atomic kernel by default, the segmented sum when deterministic; bf16/fp16
# tables take the segmented sum either way (a 2-byte destination never takes atomics), so
# `deterministic` would launch the same kernels twice there: those run once.
BWD_PARAMS = [
    pytest.param(d, det, id=f"{d}-{'deterministic' if det else 'default'}")
    for d, det in [(d, det) for d in (torch.float32, torch.float64) for det in (False, True)]
    + [(torch.bfloat16, True), (torch.float16, True)]
]


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("dtype,deterministic", BWD_PARAMS)
def test_backward_matches_reference(case, dtype, deterministic):
    """fp32/fp64 tables: the atomic kernel by default, the segmented sum when deterministic;
    bf16/fp16 tables: the segmented sum (into a zeroed gradient)."""
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


# ----------------------------------------------------------------------------- segmented sum
def hot_inputs(dtype, seed=30):
    """11,000 selections (T = 100 tokens x M = 110) of which 10,000 choose row 3 (one hot row,
    spread over 20 blocks of 512 sorted entries), the rest rows 0..14; rows 15..29 are never
    chosen. Dv = 2 (one core, one column chunk): the interpreter's generic scan (the segmented
    sum's `tl.associative_scan`) calls its combine function in Python once per tile element, so
    the cost is entries x BLOCK_D."""
    T, M, N, Dv, h, E = 100, 110, 30, 2, 1, 3
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, 15, (T * M,), generator=g)
    rows[torch.randperm(T * M, generator=g)[:10_000]] = 3
    rows = rows.view(T, M)
    blocks = torch.randint(0, E, (T, M), generator=g)
    scores = torch.randn(T, M, h, generator=g, dtype=torch.float64)
    values = torch.randn(N, Dv, generator=g, dtype=torch.float64)
    grad = torch.randn(T, E, Dv, generator=g, dtype=torch.float64)
    cast = lambda x, d: x.to(DEVICE, d)  # noqa: E731
    return (T, M, N, Dv, h, E), cast(rows, torch.int64), cast(blocks, torch.int64), \
        cast(scores, dtype), cast(values, dtype), cast(grad, torch.float64)


# dest -> (table dtype, main_grad dtype, deterministic, rounding of one store relative to |x|)
HOT_DESTS = {
    # Megatron's default grad_reduce_in_fp32=False: bf16 table into a bf16 main_grad (always the
    # segmented sum for a bf16 destination)
    "bf16 main_grad": (torch.bfloat16, torch.bfloat16, False, 2.0**-8),
    # fp32 table into an fp32 main_grad in deterministic mode (without it: the atomic kernel)
    "fp32 main_grad deterministic": (torch.float32, torch.float32, True, 2.0**-24),
}


@pytest.mark.parametrize("dest", list(HOT_DESTS))
def test_segmented_backward_hot_row_and_empty_rows(dest):
    """The segmented-sum backward with a row chosen 10,000 times (summed over 20 blocks of 512
    sorted entries, then combined by the fix-up) and rows never chosen, into a main_grad: the
    touched rows equal old + the float64 gradient to fp32-summation accuracy plus one rounding
    to the main_grad dtype (a per-entry bf16 accumulation would be off by ~10 there), the
    untouched rows keep their bits. grad_scores too, against float64.

    Interpreter cost: BLOCK_D = Dv = 2 and UNROLL = 64 (fewer, wider interpreted steps; the
    table's UNROLL = 4 and BLOCK_D are exercised by the smaller tests around this one),
    BLOCK_K = 2048 for the grad_scores kernel."""
    table, main_dtype, deterministic, unit = HOT_DESTS[dest]
    (T, M, N, Dv, h, E), rows, blocks, scores, values, grad = hot_inputs(table)
    assert int((rows == 3).sum()) >= 10_000
    g = grad.to(table)
    # float64 gradients of the same (table-dtype-exact) inputs
    s_exact, v_exact = grads_of(R.weighted_gather_pool, rows, blocks, scores.double(),
                                values.double(), E, g.double())  # fmt: skip
    start = randn(N, Dv, seed=31).to(main_dtype)
    main = start.clone()
    gs, out = G.gather_pool_backward(g, rows, blocks, scores, values, values_grad_out=main,
                                     deterministic=deterministic, seg=512, block_d=2, unroll=64,
                                     block_k=2048)  # fmt: skip
    assert out is main
    want = start.double() + v_exact
    # fp32 sums of <= 10,000 products of magnitude < ~20 (bf16 inputs are exact in fp32):
    # error ~ sqrt(n) * 2^-24 * partial sums ~ 1e-3 at this size; 5e-3 leaves room; then one
    # round-to-nearest into the main_grad dtype (unit roundoff `unit` of |want|).
    assert ((main.double() - want).abs() <= 5e-3 + unit * want.abs()).all(), err(main, want)
    assert torch.equal(main[15:], start[15:])  # rows never chosen: untouched
    assert not torch.equal(main[3], start[3])  # the hot row did get its sum
    # grad_scores: 2-term fp32 dots, rounded once to the score dtype (bf16: 2^-8 relative;
    # 2^-7 for margin; fp32: far inside it)
    assert err(gs, s_exact) <= 2.0**-7 * s_exact.abs().max().item()


# seg 8 and 16 cut the same runs at different places (both cut them many times): one each,
# paired with the two accumulation dtypes.
@pytest.mark.parametrize("dtype,seg", [(torch.float32, 8), (torch.float64, 16)],
                         ids=["fp32-seg8", "fp64-seg16"])  # fmt: skip
def test_segmented_backward_block_boundaries(dtype, seg):
    """Runs of equal rows cut by many block boundaries (seg = 8 or 16 sorted entries per
    program; runs of up to ~40 entries span up to 6 blocks), deterministic path into a zeroed
    gradient and into an fp32/fp64 main_grad: equal to float64 to accumulation rounding.
    block_d = 8 > DH = 5: a partial column chunk (the table's 16 would only double the
    interpreter's per-column scan calls)."""
    case = (9, 13, 6, 10, 2, 3)  # 117 selections over 6 rows
    T, M, N, Dv, h, E = case
    rows, blocks, scores, values = make_inputs(case, dtype, seed=32)
    grad_out = randn(T, E, Dv, seed=33)
    _, gv64 = grads_of(R.weighted_gather_pool, rows, blocks, scores.double(), values.double(), E,
                       grad_out)  # fmt: skip
    _, gv = G.gather_pool_backward(grad_out.to(dtype), rows, blocks, scores, values,
                                   need_scores=False, deterministic=True, seg=seg, block_d=8)  # fmt: skip
    # sums of <= ~40 products of N(0,1) numbers: a few ulps of ~50 in fp32 (fp64: ~1e-13)
    tol = {torch.float32: 3e-5, torch.float64: 1e-12}[dtype]
    assert err(gv, gv64) <= tol
    main = randn(N, Dv, seed=34).to(dtype)
    start = main.clone()
    G.gather_pool_backward(grad_out.to(dtype), rows, blocks, scores, values, need_scores=False,
                           deterministic=True, values_grad_out=main, seg=seg, block_d=8)  # fmt: skip
    assert torch.equal(main, start + gv)  # the same fp sums, added to the old value once


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("seg", [None, 8])
def test_sorted_forward_matches_reference(dtype, seg):
    """The segmented-sum forward (large E): an odd shape where the table picks it for bf16, and
    forced for fp32; blocks with no selection are zero."""
    case = (5, 13, 7, 24, 2, 9)
    T, M, N, Dv, h, E = case
    rows, blocks, scores, values = make_inputs(case, dtype, seed=35)
    blocks[:, :] = blocks % 7  # blocks 7 and 8 never chosen: their outputs must be 0
    if dtype == torch.bfloat16:
        assert G.forward_config(T, M, Dv, E, 2, G.num_sms(values.device), h).path == "sorted"
    out = G.gather_pool_forward(rows, blocks, scores, values, E, path="sorted", seg=seg)
    ref64 = R.weighted_gather_pool(rows, blocks, scores.double(), values.double(), E)
    ref = R.weighted_gather_pool(rows, blocks, scores, values, E)
    assert err(out, ref64) <= 2 * err(ref, ref64) + ATOL[dtype]
    assert (out[:, 7:] == 0).all()


def test_narrow_core_forward_takes_several_tokens():
    """A core narrower than a warp's 16-byte row (bf16 Dv / h = 16 < 256): TOKENS tokens per
    program, T not a multiple of it; same results as the reference."""
    case = (7, 9, 11, 32, 2, 4)
    T, M, N, Dv, h, E = case
    assert G.forward_config(T, M, Dv, E, 2, 132, h).tokens == 16
    rows, blocks, scores, values = make_inputs(case, torch.bfloat16, seed=36)
    out = G.gather_pool_forward(rows, blocks, scores, values, E, split=1)
    ref64 = R.weighted_gather_pool(rows, blocks, scores.double(), values.double(), E)
    ref = R.weighted_gather_pool(rows, blocks, scores, values, E)
    assert err(out, ref64) <= 2 * err(ref, ref64) + ATOL[torch.bfloat16]


def test_poison_switch_is_on():
    """The NaN pre-fill that the tests above rely on to catch unwritten elements is active."""
    assert torch.isnan(G.empty_output(3, dtype=torch.float32, device=DEVICE)).all()
    assert (G.empty_output(3, dtype=torch.int64, device=DEVICE) == -1).all()


# ----------------------------------------------------------------------------- main_grad
# Megatron's DDP gives every parameter a `main_grad` (fp32 with grad_reduce_in_fp32, else the param
# dtype) and `grad_added_to_main_grad = False`. Table dtype per main_grad dtype: the paper's bf16
# table for fp32 and bf16 main_grads, an fp16 table for an fp16 main_grad.
MAIN_DTYPES = {torch.float32: torch.bfloat16, torch.bfloat16: torch.bfloat16,
               torch.float16: torch.float16}  # fmt: skip


def kernel_fp32_sum(rows, blocks, scores, values, grad_out):
    """The kernel's own fp32 table gradient of one micro-batch (sorted path, into fp32 zeros: the
    fixed-order sum before any rounding to a narrower main_grad)."""
    zeros = torch.zeros(values.shape, dtype=torch.float32, device=values.device)
    _, c32 = G.gather_pool_backward(
        grad_out, rows, blocks, scores, values, need_scores=False, deterministic=True,
        values_grad_out=zeros,
    )  # fmt: skip
    return c32


def table_param(values, main_dtype, seed, ddp_flag):
    param = torch.nn.Parameter(values.clone())
    param.main_grad = randn(*values.shape, seed=seed).to(main_dtype)
    if ddp_flag:
        param.grad_added_to_main_grad = False  # Megatron's DDP sets it on every param it wraps
    return param


# fp32 main_grad: atomic and sorted, each plain and with Megatron's flag. bf16/fp16 main_grads
# always take the sorted path (`deterministic` changes nothing there): sorted only; the flag
# handling is dtype-independent (the autograd Function), checked on bf16 as well.
MAIN_PARAMS = [
    pytest.param(dt, f, d, id=f"{dt}-{'ddp-flag' if f else 'plain'}-{'sorted' if d else 'atomic'}")
    for dt, f, d in [(torch.float32, f, d) for f in (False, True) for d in (False, True)]
    + [(torch.bfloat16, False, True), (torch.bfloat16, True, True), (torch.float16, False, True)]
]


@pytest.mark.parametrize("main_dtype,ddp_flag,deterministic", MAIN_PARAMS)
def test_main_grad_two_micro_batches(main_dtype, ddp_flag, deterministic):
    """The table gradient goes into values.main_grad (no flag needed), twice in a row.

    fp32 main_grad: M0 + 2c to fp32 rounding (sorted: bitwise (M0 + c32) + c32, c32 = the
    kernel's fp32 sum). bf16/fp16 main_grad (grad_reduce_in_fp32=False): each micro-batch's fp32
    sum is added to the fp32 value of main_grad and rounded once, i.e. bitwise
    B1 = round(B0 + c32), B2 = round(B1 + c32), in both modes (narrow destinations always take
    the sorted path). The autograd grad is None, or Megatron's flagged placeholder."""
    case = CASES[0]  # 35 selections over 11 rows: runs of equal rows within and across tokens
    T, M, N, Dv, h, E = case
    dtype = MAIN_DTYPES[main_dtype]
    rows, blocks, scores, values = make_inputs(case, dtype, seed=4)
    grad_out = randn(T, E, Dv, seed=100).to(dtype)
    param = table_param(values, main_dtype, 101, ddp_flag)
    start = param.main_grad.clone()
    s64, v64 = leaf(scores, torch.float64), leaf(values, torch.float64)
    R.weighted_gather_pool(rows, blocks, s64, v64, E).backward(grad_out.double())
    c32 = kernel_fp32_sum(rows, blocks, scores, values, grad_out)
    assert err(c32, v64.grad) <= 1e-5  # fp32 sums of <= 7 exact bf16 x bf16 products
    after = []
    for _ in range(2):
        s = leaf(scores)
        gather_pool(rows, blocks, s, param, E, deterministic).backward(grad_out)
        assert err(s.grad, s64.grad) <= ATOL[dtype]
        after.append(param.main_grad.clone())
        if ddp_flag:  # Megatron's convention: a placeholder so DDP's hook fires, flagged as added
            assert param.grad_added_to_main_grad is True
            assert param.grad.shape == param.shape and param.grad.dtype == param.dtype
            param.grad, param.grad_added_to_main_grad = None, False  # what DDP's hook / reset do
        else:
            assert param.grad is None  # no autograd gradient at all
    if main_dtype == torch.float32:
        assert err(after[1], start.double() + 2 * v64.grad) <= 2e-5
        if deterministic:
            assert torch.equal(after[0], start + c32) and torch.equal(after[1], after[0] + c32)
    else:
        one = (start.float() + c32).to(main_dtype)
        assert torch.equal(after[0], one)  # rounded once, per touched element
        assert torch.equal(after[1], (one.float() + c32).to(main_dtype))
        untouched = torch.ones(N, dtype=torch.bool, device=rows.device)
        untouched[rows.reshape(-1)] = False
        assert torch.equal(after[1][untouched], start[untouched])


@pytest.mark.parametrize("dest", ["fp32 main_grad", "bf16 main_grad", "grad"])
def test_main_grad_deterministic_is_bitwise_reproducible(dest):
    """Sorted path with heavy duplication: two runs from the same main_grad give the same bits."""
    case = (7, 9, 3, 10, 2, 3)  # 63 selections over 3 rows: long runs of equal rows
    T, M, N, Dv, h, E = case
    rows, blocks, scores, values = make_inputs(case, torch.bfloat16, seed=3)
    grad_out = randn(T, E, Dv, seed=100).to(torch.bfloat16)
    results = []
    for _ in range(2):
        if dest == "grad":
            param = leaf(values)
        else:
            param = table_param(values, torch.float32 if "fp32" in dest else torch.bfloat16, 9, 0)
        gather_pool(rows, blocks, scores, param, E, deterministic=True).backward(grad_out)
        results.append(param.grad if dest == "grad" else param.main_grad)
    assert torch.equal(results[0], results[1])


class FreshTensors(TorchDispatchMode):
    """Records (op, shape, dtype) of every tensor of >= min_numel elements that an op creates (its
    storage is none of the op's inputs': views and in-place results are not counted)."""

    def __init__(self, min_numel):
        super().__init__()
        self.min_numel, self.seen = min_numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {
            x.untyped_storage().data_ptr()
            for x in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(x, torch.Tensor)
        }
        for x in torch.utils._pytree.tree_leaves(out):
            if isinstance(x, torch.Tensor) and x.numel() >= self.min_numel:
                if x.untyped_storage().data_ptr() not in inputs:
                    self.seen.append((str(func), tuple(x.shape), x.dtype))
        return out


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "sorted"])
@pytest.mark.parametrize("dest", ["fp32 main_grad", "bf16 main_grad", "ddp-flag", "grad"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_no_dense_temporary(dtype, dest, deterministic):
    """Tensors of >= N*Dv/2 elements created in backward, through the launcher and through
    autograd: none with a main_grad; Megatron's placeholder (torch.empty: no kernel) when flagged;
    without main_grad only the gradient itself, in the table dtype (no fp32 table, no cast copy).
    N*Dv = 1536 elements against T*M = 15 selections, T*E*Dv = 216 pooled elements."""
    case = (3, 5, 64, 24, 2, 3)
    T, M, N, Dv, h, E = case
    rows, blocks, scores, values = make_inputs(case, dtype, seed=11)
    grad_out = randn(T, E, Dv, seed=104).to(dtype)
    big = N * Dv // 2
    main_dtype = torch.bfloat16 if dest == "bf16 main_grad" else torch.float32
    if dest == "grad":
        param = leaf(values)
    else:
        param = table_param(values, main_dtype, 12, ddp_flag=dest == "ddp-flag")
    main = getattr(param, "main_grad", None)
    with FreshTensors(big) as launcher:
        G.gather_pool_backward(grad_out, rows, blocks, scores, values,
                               deterministic=deterministic, values_grad_out=main)  # fmt: skip
    s = leaf(scores)
    out = gather_pool(rows, blocks, s, param, E, deterministic)
    with FreshTensors(big) as autograd:  # the dispatch mode also sees the backward's ops
        out.backward(grad_out)
    dense = [(N, Dv), dtype]
    if dest == "grad":
        assert [x[1:] for x in launcher.seen] == [tuple(dense)], launcher.seen
        assert [x[1:] for x in autograd.seen] == [tuple(dense)], autograd.seen  # the grad itself
    else:
        assert launcher.seen == []
        if dest == "ddp-flag":
            assert autograd.seen == [("aten.empty.memory_format", *dense)], autograd.seen
        else:
            assert autograd.seen == [] and param.grad is None


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
@pytest.mark.parametrize("fp32_reduce", [False, True], ids=["bf16-buffer", "fp32-buffer"])
def test_megatron_ddp_hook(megatron_world, fp32_reduce, overlap):
    """Megatron's own DistributedDataParallel (world of 1, gloo) around a bf16 table: two
    micro-batches (the first under no_sync, as Megatron's schedules do), then finish_grad_sync.
    DDP's AccumulateGrad hook must fire (overlap_grad_reduce asserts a grad and marks the bucket
    ready) and must not add the placeholder (NaN under the poison switch) into main_grad."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from helpers import small_config

    class Pool(torch.nn.Module):
        def __init__(self, values):
            super().__init__()
            self.values = torch.nn.Parameter(values.clone())

        def forward(self, rows, blocks, scores, E):
            return gather_pool(rows, blocks, scores, self.values, E)

    case = CASES[0]
    T, M, N, Dv, h, E = case
    rows, blocks, scores, values = make_inputs(case, torch.bfloat16, seed=13)
    grad_out = randn(T, E, Dv, seed=105).to(torch.bfloat16)
    module = Pool(values)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=fp32_reduce, overlap_grad_reduce=overlap
    )
    ddp = DistributedDataParallel(small_config(torch.bfloat16), ddp_config, module)
    ddp.zero_grad_buffer()
    param = module.values
    assert param.main_grad.dtype == (torch.float32 if fp32_reduce else torch.bfloat16)
    with ddp.no_sync():
        ddp(rows, blocks, scores, E).backward(grad_out)
    ddp(rows, blocks, scores, E).backward(grad_out)
    ddp.finish_grad_sync()  # with overlap: fails unless the hook marked the param ready
    assert param.grad is None  # the hook dropped the placeholder
    c32 = kernel_fp32_sum(rows, blocks, scores, values, grad_out)
    if fp32_reduce:
        assert err(param.main_grad, 2 * c32.double()) <= 1e-5  # atomic fp32 adds
    else:
        once = c32.to(torch.bfloat16)
        assert torch.equal(param.main_grad, (once.float() + c32).to(torch.bfloat16))


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
