"""cpu_path.py (the layer's CPU fast path) against reference.py, the oracle, in float64.

Selections are compared as sets per (token, head): the fast path leaves each head's winners in an
unspecified order. Float64 comparisons use rtol 1e-10 / atol 1e-12: the same sums in another order,
so rounding only; random float64 inputs have no near-ties that rounding could flip.
"""

import itertools
import math

import pytest
import torch

from megatron_ultramem import cpu_path, reference
from megatron_ultramem.layer import UltraMemLayer

from helpers import small_config

F64 = dict(rtol=1e-10, atol=1e-12)


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- top-k
@pytest.mark.parametrize(
    "R,n,k", [(7, 512, 32), (5, 1024, 32), (9, 64, 4), (3, 10, 7), (4, 49, 7), (6, 16, 16), (0, 64, 4),
              (37, 96, 3)]
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prefilter", [True, False], ids=["blocked", "direct"])
def test_topk_indices_equals_torch_topk(R, n, k, dtype, prefilter, monkeypatch):
    monkeypatch.setattr(cpu_path, "_BLOCKED_MIN_ELEMENTS", 0 if prefilter else 10**12)
    x = torch.randn(R, n, generator=gen(R * n + k), dtype=torch.float64).to(dtype)
    idx = cpu_path.topk_indices(x, k)
    assert idx.shape == (R, k) and idx.dtype == torch.int64
    for row in idx.tolist():
        assert len(set(row)) == k  # distinct entries
    # the same values as torch.topk (indices may differ only among exact ties)
    got = torch.sort(torch.gather(x, 1, idx), dim=1).values
    want = torch.sort(torch.topk(x, k, dim=1).values, dim=1).values
    assert torch.equal(got, want)


def test_topk_indices_with_ties_and_leading_dims():
    """Many exact ties (small integers), a leading batch shape and the blocked pre-filter (n=512)."""
    x = torch.randint(0, 20, (5, 14, 512), generator=gen(1)).double()
    # large enough for the pre-filter
    assert cpu_path._block_size(512, 32) > 1 and x.numel() > cpu_path._BLOCKED_MIN_ELEMENTS
    idx = cpu_path.topk_indices(x, 32)
    assert idx.shape == (5, 14, 32)
    got = torch.sort(torch.gather(x, 2, idx), dim=2).values
    want = torch.sort(torch.topk(x, 32, dim=2).values, dim=2).values
    assert torch.equal(got, want)
    assert all(len(set(r)) == 32 for r in idx.reshape(-1, 32).tolist())


# ----------------------------------------------------------------------------- retrieval
def _ln(K, seed, dtype=torch.float64):
    norm = torch.nn.LayerNorm(K, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(K, generator=gen(seed), dtype=dtype) + 0.5)
        norm.bias.copy_(0.1 * torch.randn(K, generator=gen(seed + 1), dtype=dtype))
    return norm


def _retrieval_inputs(T, H, n_side, K, r, h, seed):
    g = gen(seed)
    leaf = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    q_row, q_col = leaf(T, K), leaf(T, K)
    keys_row, keys_col = leaf(H, n_side, K, r), leaf(H, n_side, K, r)
    cores = leaf(H, h, r, r)
    u, v, _ = reference.leading_singular_vectors(cores.detach().sum(1))
    return q_row, q_col, keys_row, keys_col, cores, u, v, _ln(K, seed), _ln(K, seed + 7)


def _loss_weights(virtual, T, H, m, h):
    """An order-independent functional of the winners: a weight per (token, head, cell, core)."""
    t = torch.arange(T)[:, None, None, None].double()
    hd = torch.arange(H)[None, :, None, None].double()
    i = torch.arange(h)[None, None, None, :].double()
    return torch.sin(0.37 * virtual[..., None].double() + 1.3 * i + 0.11 * t + 0.7 * hd)


CASES = [  # T, H, n', K, r, h, m
    (40, 2, 64, 6, 2, 2, 4),  # blocked top-k in both phases
    (9, 1, 10, 5, 1, 1, 3),  # r = h = 1
    (33, 3, 12, 4, 3, 2, 5),  # r = 3: the rotation is a Householder reflection
    (6, 2, 7, 3, 2, 3, 7),  # m = n': every key is a candidate
    (35, 2, 9, 6, 2, 2, 1),  # m = 1
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("rotate", [True, False], ids=["rotated", "direct"])
def test_tdqkr_equals_reference(case, rotate, monkeypatch):
    """Same winners, per-core scores and gradients (queries, raw keys, key LN, cores) as
    reference.row_col_scores + reference.tucker_topm."""
    monkeypatch.setattr(cpu_path, "ROTATE_MIN_TOKENS", 0 if rotate else 10**9)
    T, H, n_side, K, r, h, m = case
    if rotate:  # also select in token chunks of 7 (the last one shorter), with the top-k pre-filter
        monkeypatch.setattr(cpu_path, "_SCORE_CHUNK", 7 * H * r * n_side)
        monkeypatch.setattr(cpu_path, "_BLOCKED_MIN_ELEMENTS", 0)
    q_row, q_col, keys_row, keys_col, cores, u, v, ln_r, ln_c = _retrieval_inputs(
        T, H, n_side, K, r, h, seed=sum(case)
    )
    leaves = [q_row, q_col, keys_row, keys_col, cores, *ln_r.parameters(), *ln_c.parameters()]

    def run(fast):
        if fast:
            rows_r, rows_c = cpu_path.key_rows(keys_row, ln_r), cpu_path.key_rows(keys_col, ln_c)
            assert rows_r.shape == (H, r, n_side, K)
            virtual, scores = cpu_path.tdqkr(q_row, q_col, rows_r, rows_c, cores, u, v, m)
        else:
            kr = ln_r(keys_row.transpose(-1, -2)).transpose(-1, -2)
            kc = ln_c(keys_col.transpose(-1, -2)).transpose(-1, -2)
            s_row = reference.row_col_scores(q_row, kr)
            s_col = reference.row_col_scores(q_col, kc)
            virtual, scores = reference.tucker_topm(s_row, s_col, cores, u, v, m)
        assert virtual.shape == (T, H, m) and scores.shape == (T, H, m, h)
        loss = (scores * _loss_weights(virtual, T, H, m, h)).sum()
        grads = torch.autograd.grad(loss, leaves)
        order = torch.argsort(virtual, dim=-1)  # align the winners by cell
        return torch.gather(virtual, 2, order), torch.gather(
            scores.detach(), 2, order[..., None].expand(T, H, m, h)
        ), grads

    v_fast, s_fast, g_fast = run(True)
    v_ref, s_ref, g_ref = run(False)
    assert torch.equal(v_fast, v_ref)
    torch.testing.assert_close(s_fast, s_ref, **F64)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, **F64)


def test_tdqkr_no_grad_path_and_empty_batch():
    T, H, n_side, K, r, h, m = CASES[0]
    q_row, q_col, keys_row, keys_col, cores, u, v, ln_r, ln_c = _retrieval_inputs(
        T, H, n_side, K, r, h, seed=3
    )
    rows_r, rows_c = cpu_path.key_rows(keys_row, ln_r), cpu_path.key_rows(keys_col, ln_c)
    with_grad = cpu_path.tdqkr(q_row, q_col, rows_r, rows_c, cores, u, v, m)
    with torch.no_grad():
        without = cpu_path.tdqkr(q_row, q_col, rows_r, rows_c, cores, u, v, m)
    assert torch.equal(with_grad[0], without[0])
    torch.testing.assert_close(with_grad[1].detach(), without[1], rtol=0, atol=0)
    empty = torch.zeros(0, K, dtype=torch.float64)
    virtual, scores = cpu_path.tdqkr(empty, empty, rows_r, rows_c, cores, u, v, m)
    assert virtual.shape == (0, H, m) and scores.shape == (0, H, m, h)


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_tdqkr_outputs_do_not_alias_its_scratch_buffers(grad):
    """The selection's scores and grid live in scratch buffers kept between calls: a second call
    (other queries, a smaller and then a larger batch, which grows the buffers) must leave the
    first call's results and their gradients untouched."""
    T, H, n_side, K, r, h, m = CASES[0]
    q_row, q_col, keys_row, keys_col, cores, u, v, ln_r, ln_c = _retrieval_inputs(
        T, H, n_side, K, r, h, seed=5
    )
    rows_r, rows_c = cpu_path.key_rows(keys_row, ln_r), cpu_path.key_rows(keys_col, ln_c)
    with torch.set_grad_enabled(grad):
        virtual, scores = cpu_path.tdqkr(q_row, q_col, rows_r, rows_c, cores, u, v, m)
        kept = virtual.clone(), scores.detach().clone()
        for t in (T // 3, 3 * T):  # other tokens, then more of them
            g = gen(t)
            other = [torch.randn(t, K, generator=g, dtype=torch.float64) for _ in range(2)]
            cpu_path.tdqkr(*other, rows_r, rows_c, cores, u, v, m)
    assert torch.equal(virtual, kept[0]) and torch.equal(scores.detach(), kept[1])
    if grad:  # the backward reads what forward saved, after the other calls
        (gq,) = torch.autograd.grad(scores.sum(), [q_row])
        with torch.no_grad():
            _, again = cpu_path.tdqkr(q_row, q_col, rows_r, rows_c, cores, u, v, m)
        assert torch.equal(again, kept[1])
        q2 = q_row.detach().clone().requires_grad_()
        _, fresh = cpu_path.tdqkr(q2, q_col, rows_r, rows_c, cores, u, v, m)
        (gq2,) = torch.autograd.grad(fresh.sum(), [q2])
        assert torch.equal(gq, gq2)


def test_rotation_is_orthogonal_with_u_first():
    w = torch.randn(5, 3, generator=gen(4), dtype=torch.float64)
    w[1] = torch.tensor([2.0, 0.0, 0.0])  # already e_1: identity
    w[2] = 0.0  # degenerate: identity
    U = cpu_path._rotation(w)
    eye = torch.eye(3, dtype=torch.float64).expand(5, 3, 3)
    torch.testing.assert_close(U.transpose(1, 2) @ U, eye, **F64)
    unit = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    torch.testing.assert_close(U[[0, 1, 3, 4], :, 0], unit[[0, 1, 3, 4]], **F64)
    torch.testing.assert_close(U[2], eye[0], **F64)


# ----------------------------------------------------------------------------- pooling
POOL_CASES = [  # T, M, N, Dv, h, E
    (11, 14, 25, 10, 2, 4),  # the small config's sizes
    (5, 9, 3, 6, 3, 2),  # few rows: many duplicates within and across tokens
    (4, 6, 7, 5, 1, 1),  # no expansion, one core
    (0, 6, 7, 4, 2, 4),  # no tokens
]


def _pool_inputs(case, seed, dtype=torch.float64, one_block=False):
    T, M, N, Dv, h, E = case
    g = gen(seed)
    rows = torch.randint(0, N, (T, M), generator=g)
    blocks = torch.zeros(T, M, dtype=torch.int64) if one_block else torch.randint(0, E, (T, M), generator=g)
    scores = torch.randn(T, M, h, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    values = torch.randn(N, Dv, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    return rows, blocks, scores, values


def _pool_and_grads(fn, rows, blocks, scores, values, E, grad_out):
    out = fn(rows, blocks, scores, values, E)
    gs, gv = torch.autograd.grad(out, (scores, values), grad_out)
    return out.detach(), gs, gv


@pytest.mark.parametrize("case", POOL_CASES)
@pytest.mark.parametrize("one_block", [False, True], ids=["blocks", "empty-blocks"])
def test_bag_pool_equals_reference(case, one_block):
    T, M, N, Dv, h, E = case
    rows, blocks, scores, values = _pool_inputs(case, seed=sum(case), one_block=one_block)
    grad_out = torch.randn(T, E, Dv, generator=gen(9), dtype=torch.float64)
    fast = _pool_and_grads(cpu_path.bag_pool, rows, blocks, scores, values, E, grad_out)
    ref = _pool_and_grads(reference.weighted_gather_pool, rows, blocks, scores, values, E, grad_out)
    assert fast[0].shape == (T, E, Dv)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, **F64)


def test_bag_pool_layout_is_a_permutation_into_bags():
    """Every (selection, core) entry lands in its own slot of its (token, block, core) bag."""
    T, M, N, Dv, h, E = POOL_CASES[0]
    rows, blocks, _, _ = _pool_inputs(POOL_CASES[0], seed=5)
    idx, pos, offsets = cpu_path._bag_layout(rows, blocks, h, E)
    assert torch.equal(torch.sort(pos.reshape(T, -1), 1).values, torch.arange(M * h).expand(T, M * h))
    sizes = torch.diff(offsets, append=torch.tensor([T * M * h]))
    for t, k, i in itertools.product(range(T), range(M), range(h)):
        flat = t * M * h + int(pos[t, k, i])
        bag = (t * E + int(blocks[t, k])) * h + i
        assert offsets[bag] <= flat < offsets[bag] + sizes[bag]
        assert int(idx[flat]) == int(rows[t, k]) * h + i


def test_bag_pool_column_shard_is_slice_of_full():
    """A TP x EP rank pools its column shard with its cores' scores (what pooled_values passes)."""
    T, M, N, Dv, h, E = 6, 8, 9, 12, 2, 4
    rows, blocks, scores, values = _pool_inputs((T, M, N, Dv, h, E), seed=6)
    full = cpu_path.bag_pool(rows, blocks, scores, values, E)
    for lo, hi in ((0, 3), (3, 6), (6, 12), (0, 12)):  # shards within a core, one core, all
        c_lo, c_hi = lo // (Dv // h), max(lo // (Dv // h) + 1, hi // (Dv // h))
        part = cpu_path.bag_pool(rows, blocks, scores[..., c_lo:c_hi], values[:, lo:hi], E)
        torch.testing.assert_close(part, full[..., lo:hi], **F64)


@pytest.mark.parametrize("need", ["scores", "values"])
def test_bag_pool_one_input_needs_grad(need):
    case = POOL_CASES[0]
    rows, blocks, scores, values = _pool_inputs(case, seed=8)
    scores.requires_grad_(need == "scores")
    values.requires_grad_(need == "values")
    target = scores if need == "scores" else values
    (got,) = torch.autograd.grad(cpu_path.bag_pool(rows, blocks, scores, values, 4).sum(), target)
    (want,) = torch.autograd.grad(reference.weighted_gather_pool(rows, blocks, scores, values, 4).sum(), target)
    torch.testing.assert_close(got, want, **F64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_bag_pool_low_precision_against_float64(dtype):
    """Both paths accumulate in fp32 and round once: the fast path's error against float64 of the
    same (rounded) inputs is within 2x the reference's own error + 1e-6 (flash-attention's rule)."""
    case = (16, 14, 25, 32, 2, 4)
    T, M, N, Dv, h, E = case
    rows, blocks, scores, values = _pool_inputs(case, seed=10, dtype=dtype)
    grad_out = torch.randn(T, E, Dv, generator=gen(11), dtype=torch.float64).to(dtype)
    fast = _pool_and_grads(cpu_path.bag_pool, rows, blocks, scores, values, E, grad_out)
    ref = _pool_and_grads(reference.weighted_gather_pool, rows, blocks, scores, values, E, grad_out)
    s64 = scores.detach().double().requires_grad_()
    v64 = values.detach().double().requires_grad_()
    exact = _pool_and_grads(reference.weighted_gather_pool, rows, blocks, s64, v64, E, grad_out.double())

    def err(a, b):
        return ((a.double() - b).abs().max() / b.abs().max()).item()

    for a, b, want in zip(fast, ref, exact):
        assert a.dtype == dtype
        assert err(a, want) <= 2 * err(b, want) + 1e-6


# ----------------------------------------------------------------------------- main_grad
def _param_with_main_grad(values, main_dtype, seed=12):
    param = torch.nn.Parameter(values.detach().clone())
    param.main_grad = torch.randn(param.shape, generator=gen(seed), dtype=torch.float64).to(main_dtype)
    return param, param.main_grad.clone()


@pytest.mark.parametrize("ddp_flag", [False, True, "zero_out"], ids=["plain", "ddp", "zero-out"])
def test_table_gradient_goes_into_fp32_main_grad(ddp_flag):
    case = POOL_CASES[1]
    T, M, N, Dv, h, E = case
    rows, blocks, scores, values = _pool_inputs(case, seed=13, dtype=torch.float32)
    param, before = _param_with_main_grad(values, torch.float32)
    if ddp_flag:
        param.grad_added_to_main_grad = False  # Megatron's DDP sets it on every parameter
    if ddp_flag == "zero_out":
        param.zero_out_wgrad = True
    grad_out = torch.randn(T, E, Dv, generator=gen(14))
    cpu_path.bag_pool(rows, blocks, scores, param, E).backward(grad_out)
    v64 = values.detach().double().requires_grad_()
    reference.weighted_gather_pool(rows, blocks, scores.detach().double(), v64, E).backward(grad_out.double())
    # fp32 sums of a few fp32 products added onto an fp32 buffer: fp32 rounding (2^-24) only.
    torch.testing.assert_close(param.main_grad.double(), before.double() + v64.grad, rtol=1e-6, atol=1e-6)
    if ddp_flag:
        assert param.grad_added_to_main_grad is True
        assert param.grad is not None and param.grad.shape == param.shape  # the placeholder
        if ddp_flag == "zero_out":
            assert torch.count_nonzero(param.grad) == 0
    else:
        assert param.grad is None  # nothing else was materialized


def test_bf16_main_grad_is_accumulated_in_fp32():
    """grad_reduce_in_fp32=False: bf16 table, bf16 main_grad. The new gradient is summed in fp32 and
    added to the fp32 value of main_grad, so each element is rounded to bf16 once: within one bf16
    ulp (2^-8 relative) of the exact sum; a bf16 gradient added to bf16 would round twice."""
    case = (8, 14, 6, 16, 2, 4)  # 6 rows: each row sums ~19 contributions
    T, M, N, Dv, h, E = case
    rows, blocks, scores, values = _pool_inputs(case, seed=15, dtype=torch.bfloat16)
    param, before = _param_with_main_grad(values, torch.bfloat16)
    grad_out = torch.randn(T, E, Dv, generator=gen(16)).bfloat16()
    cpu_path.bag_pool(rows, blocks, scores, param, E).backward(grad_out)
    v64 = values.detach().double().requires_grad_()
    reference.weighted_gather_pool(rows, blocks, scores.detach().double(), v64, E).backward(grad_out.double())
    exact = before.double() + v64.grad
    assert param.main_grad.dtype == torch.bfloat16 and param.grad is None
    ulp = 2.0 ** (torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - 7)  # bf16 spacing
    assert torch.all((param.main_grad.double() - exact).abs() <= ulp)


# ----------------------------------------------------------------------------- the layer
def _copy_weights(src, dst):
    dst.load_state_dict(src.state_dict())


@pytest.mark.parametrize("activation", ["none", "softmax"])
@pytest.mark.parametrize("tokens,rotate", [((5, 3), False), ((12, 4), True)], ids=["direct", "rotated"])
def test_layer_fast_path_equals_reference_path(megatron_world, activation, tokens, rotate, monkeypatch):
    """UltraMemLayer with ultramem_impl='auto' on CPU (the fast path) against 'reference': outputs,
    the input gradient and every parameter gradient, float64, train mode with the aux loss."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    monkeypatch.setattr(cpu_path, "ROTATE_MIN_TOKENS", 0 if rotate else 10**9)

    # scale 1 (shape [1], like megatron_ultramem.aux_loss sets it; a 0-dim scale left behind would
    # not accept a later copy_ of a [1] tensor)
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    kw = dict(ultramem_score_activation=activation, ultramem_aux_loss_alpha=0.3, ultramem_aux_loss_tau=0.0)
    layers = {impl: UltraMemLayer(small_config(torch.float64, ultramem_impl=impl, **kw), layer_index=1)
              for impl in ("reference", "auto")}  # fmt: skip
    with torch.no_grad():  # move off the init so nothing special (e.g. unit cores) is relied on
        for p in layers["reference"].parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen(p.numel()), dtype=p.dtype))
    layers["reference"].refresh_tucker_vectors()
    _copy_weights(layers["reference"], layers["auto"])
    assert layers["auto"]._use_cpu_path() and not layers["reference"]._use_cpu_path()
    s, b = tokens
    x = torch.randn(s, b, 24, generator=gen(17), dtype=torch.float64)
    g = torch.randn(s, b, 24, generator=gen(18), dtype=torch.float64)
    results = {}
    for impl, layer in layers.items():
        layer.train()
        xi = x.clone().requires_grad_()
        out, bias = layer(xi)
        assert bias is None
        out.backward(g)
        results[impl] = (out.detach(), xi.grad, {n: p.grad for n, p in layer.named_parameters()})
    (o_ref, dx_ref, g_ref), (o_fast, dx_fast, g_fast) = results["reference"], results["auto"]
    torch.testing.assert_close(o_fast, o_ref, **F64)
    torch.testing.assert_close(dx_fast, dx_ref, **F64)
    for name, grad in g_ref.items():
        torch.testing.assert_close(g_fast[name], grad, **F64, msg=name)


def test_layer_fast_path_gradcheck(megatron_world):
    """Finite differences through the fast path's custom backward functions (every parameter)."""
    layer = UltraMemLayer(small_config(torch.float64, ultramem_impl="auto"), layer_index=2)
    layer.eval()
    x = torch.randn(4, 2, 24, generator=gen(19), dtype=torch.float64, requires_grad=True)
    names, params = zip(*layer.named_parameters())

    def f(inp, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (inp,))[0]

    # eps 1e-6 does not flip any top-m choice of random float64 inputs (piecewise smooth there)
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


def test_layer_main_grad_accumulation(megatron_world):
    """With values.main_grad (Megatron DDP) the layer adds the table gradient there, float64."""
    cfg = small_config(torch.float64, ultramem_impl="auto")
    ref, fast = UltraMemLayer(small_config(torch.float64), layer_index=0), UltraMemLayer(cfg, layer_index=0)
    _copy_weights(ref, fast)
    fast.values.main_grad = torch.ones_like(fast.values)
    x = torch.randn(6, 2, 24, generator=gen(20), dtype=torch.float64)
    for layer in (ref, fast):
        layer.eval()
        layer(x)[0].square().sum().backward()
    assert fast.values.grad is None
    torch.testing.assert_close(fast.values.main_grad, 1.0 + ref.values.grad, **F64)
    torch.testing.assert_close(fast.cores.grad, ref.cores.grad, **F64)


def test_layer_bf16_fast_path_close_to_float64(megatron_world):
    """bf16 parameters: the fast path's output error against the float64 layer (same bf16 weights)
    is within 2x the reference path's bf16 error + 1e-3."""
    x = torch.randn(6, 3, 24, generator=gen(21))
    outs = {}
    base = UltraMemLayer(small_config(torch.bfloat16), layer_index=0)
    for impl, dtype in (("reference", torch.float64), ("reference", torch.bfloat16), ("auto", torch.bfloat16)):
        layer = UltraMemLayer(small_config(dtype, ultramem_impl=impl), layer_index=0)
        layer.load_state_dict({k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
                               for k, v in base.state_dict().items()})  # fmt: skip
        layer.eval()
        with torch.no_grad():
            outs[impl, dtype] = layer(x.to(dtype))[0].double()
    want = outs["reference", torch.float64]

    def err(a):
        return ((a - want).abs().max() / want.abs().max()).item()

    assert err(outs["auto", torch.bfloat16]) <= 2 * err(outs["reference", torch.bfloat16]) + 1e-3


def test_retrieve_keeps_heads_contiguous(megatron_world):
    """retrieve()'s contract: [T, H*m] with head hd's m winners in columns hd*m..(hd+1)*m-1."""
    layer = UltraMemLayer(small_config(torch.float64, ultramem_impl="auto"), layer_index=1)
    x = torch.randn(7, 24, generator=gen(22), dtype=torch.float64)
    virtual, scores = layer.retrieve(x)
    ref = UltraMemLayer(small_config(torch.float64), layer_index=1)
    v_ref, _ = ref.retrieve(x)
    H, m = 2, 7
    for hd in range(H):
        cols = slice(hd * m, (hd + 1) * m)
        assert torch.equal(torch.sort(virtual[:, cols], 1).values, torch.sort(v_ref[:, cols], 1).values)
    assert scores.shape == (7, H * m, 2) and not math.isnan(scores.sum().item())


def test_key_rows_kept_between_no_grad_calls_and_refreshed_on_any_change(megatron_world):
    """The normalized keys reused by no-grad calls never go stale: after each kind of update
    (through .data without a version bump, in place, rebinding .data, load_state_dict) the layer's
    output equals the reference path's on the same weights."""
    layer = UltraMemLayer(small_config(torch.float64, ultramem_impl="auto"), layer_index=1).eval()
    ref = UltraMemLayer(small_config(torch.float64), layer_index=1).eval()
    x = torch.randn(3, 2, 24, generator=gen(23), dtype=torch.float64)
    with torch.no_grad():
        layer(x)
        kept = layer._key_rows_cache[2]
        layer(x)
        assert layer._key_rows_cache[2] is kept  # reused while nothing changed

    def check():
        ref.load_state_dict(layer.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(layer(x)[0], ref(x)[0], **F64)

    updates = [
        lambda: layer.keys_row.data.copy_(layer.keys_row.data * 1.01),  # optimizers' .data writes
        lambda: layer.keys_row.data.view(-1)[5].add_(1e-9),  # one element, a tiny change
        lambda: layer.key_norm_col.weight.data.mul_(1.1),
        lambda: layer.key_norm_row.bias.data.add_(0.01),
        lambda: setattr(layer.keys_col, "data", layer.keys_col.data.flip(1).clone()),
        lambda: layer.load_state_dict({**layer.state_dict(), "keys_col": torch.randn_like(layer.keys_col)}),
    ]
    for update in updates:
        update()
        check()
    layer(x)  # with autograd: recomputed, and the kept copy dropped
    assert layer._key_rows_cache is None


def test_bits_checksum_sees_every_single_element_change():
    for dtype, n in ((torch.float32, 10), (torch.float32, 7), (torch.bfloat16, 6), (torch.float64, 5)):
        t = torch.randn(n, generator=gen(n), dtype=torch.float64).to(dtype)
        base = cpu_path.bits_checksum(t)
        for i in range(n):  # the smallest change: one element to its next representable value
            u = t.clone()
            if dtype == torch.bfloat16:  # no nextafter for bf16: +1 on the raw bits
                u.view(torch.int16)[i] += 1
            else:
                u[i] = torch.nextafter(u[i], torch.tensor(float("inf"), dtype=dtype))
            assert not torch.equal(u, t) and cpu_path.bits_checksum(u) != base
