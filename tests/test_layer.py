"""UltraMemLayer: IVE equivalence, gradients, aux loss, SVD refresh (float64, odd sizes)."""

import itertools
import math

import numpy as np
import pytest
import torch

from megatron_ultramem import layer as layer_module
from megatron_ultramem import parallel, reference
from megatron_ultramem.layer import UltraMemLayer

from helpers import small_config


@pytest.fixture
def layer64(megatron_world):
    torch.manual_seed(0)
    return UltraMemLayer(small_config(torch.float64), layer_index=1)


def test_retrieve_shapes_and_ranges(layer64):
    x = torch.randn(11, 24, dtype=torch.float64)
    virtual, scores = layer64.retrieve(x)
    H, m, h = 2, 7, 2
    assert virtual.shape == (11, H * m) and virtual.dtype == torch.int64
    assert scores.shape == (11, H * m, h)
    E, N = 4, 25
    assert int(virtual.min()) >= 0 and int(virtual.max()) < E * N
    # each head's winners are distinct cells of its grid
    for t in range(11):
        for hd in range(H):
            cells = virtual[t, hd * m : (hd + 1) * m].tolist()
            assert len(set(cells)) == m


def test_ive_aggregate_equals_materialized_virtual_values(layer64):
    """aggregate() == sum_k score_k * (virtual value built as V @ W_p for every p), float64."""
    x = torch.randn(13, 24, dtype=torch.float64)
    virtual, scores = layer64.retrieve(x)
    scores = torch.randn_like(scores)  # arbitrary weights exercise the per-core slices
    out = layer64.aggregate(virtual, scores)
    D, Dv, E = 24, 10, 4
    w = layer64.linear_out.weight.view(D, Dv, E).permute(0, 2, 1)  # [D, E, Dv], W_p = w[:, p]
    expected = reference.materialized_aggregate(virtual, scores, layer64.permutation, layer64.values, w)
    # Same float64 sums in another order: rounding only.
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


def test_ive_with_duplicates_and_single_block(megatron_world):
    """E=1 (no expansion) and repeated indices within and across tokens."""
    layer = UltraMemLayer(small_config(torch.float64, ultramem_expansion=1, ultramem_topm=3), layer_index=2)
    virtual = torch.tensor([[0, 0, 3, 3, 3, 7], [7, 7, 7, 0, 1, 2]])
    scores = torch.randn(2, 6, 2, dtype=torch.float64)
    out = layer.aggregate(virtual, scores)
    w = layer.linear_out.weight.view(24, 10, 1).permute(0, 2, 1)
    expected = reference.materialized_aggregate(virtual, scores, layer.permutation, layer.values, w)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


def test_permutation_is_a_fixed_seeded_permutation(megatron_world):
    cfg = small_config(torch.float64)
    a, b = UltraMemLayer(cfg, layer_index=3), UltraMemLayer(cfg, layer_index=3)
    c = UltraMemLayer(cfg, layer_index=4)
    assert a.permutation.dtype == torch.int32  # E*N fits: half the bytes of int64 on every rank
    assert torch.equal(torch.sort(a.permutation).values, torch.arange(4 * 25, dtype=torch.int32))
    # the same pi as the int64 draw of the same stream (checkpoints of earlier versions agree)
    want = torch.randperm(4 * 25, generator=layer_module._generator(cfg.ultramem_seed, 3, 0))
    assert torch.equal(a.permutation.long(), want)
    assert torch.equal(a.permutation, b.permutation) and torch.equal(a.values, b.values)
    assert not torch.equal(a.permutation, c.permutation)
    assert "permutation" in a.state_dict() and "tucker_u" in a.state_dict()


def test_gradients_match_finite_differences(layer64):
    """Every parameter, float64. Top-m selections are piecewise constant; a 1e-6 perturbation of
    random continuous inputs does not flip them, so the function is smooth where it is checked."""
    layer64.eval()  # the aux loss is tested on its own below
    x = torch.randn(5, 2, 24, dtype=torch.float64, requires_grad=True)
    names, params = zip(*[(n, p) for n, p in layer64.named_parameters()])
    assert "values" in names and "cores" in names and "linear_out.weight" in names

    def f(inp, *ps):
        state = dict(zip(names, ps))
        out, bias = torch.func.functional_call(layer64, state, (inp,))
        assert bias is None
        return out

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)
    out = f(x, *params)
    out.square().sum().backward()
    for n, p in layer64.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    # only the selected rows of the table get gradient
    touched = (layer64.values.grad.abs().sum(1) > 0).sum().item()
    assert 0 < touched <= 10 * 2 * 7


def _numpy_aux(cores: np.ndarray, alpha: float, tau: float) -> float:
    per_head = []
    for c in cores.sum(1):  # [r, r]
        s = np.linalg.svd(c, compute_uv=False)
        per_head.append(sum(max(0.0, lam - tau) ** 2 for lam in s[1:]) * alpha / (len(s) - 1))
    return float(np.mean(per_head))


@pytest.mark.parametrize("r", [2, 3])
def test_tucker_aux_loss_formula_and_backward_injection(megatron_world, r):
    cfg = small_config(torch.float64, ultramem_tucker_rank=r, ultramem_aux_loss_alpha=0.5, ultramem_aux_loss_tau=0.05)
    layer = UltraMemLayer(cfg, layer_index=0)
    with torch.no_grad():
        layer.cores.copy_(torch.randn_like(layer.cores))
    aux = layer.tucker_aux_loss()
    assert aux.item() > 0
    np.testing.assert_allclose(aux.item(), _numpy_aux(layer.cores.detach().numpy(), 0.5, 0.05), rtol=1e-6)

    # Training forward injects d(aux)/d(cores) through Megatron's MoEAuxLossAutoScaler (scale 1).
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    x = torch.randn(4, 3, 24, dtype=torch.float64)
    layer.train()
    layer(x)[0].sum().backward()
    g_train = layer.cores.grad.clone()
    layer.zero_grad()
    layer.eval()
    layer(x)[0].sum().backward()
    g_eval = layer.cores.grad.clone()
    (g_aux,) = torch.autograd.grad(layer.tucker_aux_loss(), layer.cores)
    torch.testing.assert_close(g_train - g_eval, g_aux, rtol=1e-9, atol=1e-12)


def test_aux_loss_zero_below_tau_and_for_rank_one():
    sv = torch.tensor([[3.0, 0.1], [2.0, 0.14]], dtype=torch.float64)
    assert reference.tucker_aux_loss(sv, 0.001, 0.15).item() == 0.0
    assert reference.tucker_aux_loss(torch.tensor([[2.0]]), 1.0, 0.0).item() == 0.0


def test_svd_refresh_is_leading_pair_and_sign_stable(layer64):
    g = torch.Generator().manual_seed(5)
    prev_u = layer64.tucker_u.clone()
    for _ in range(5):
        with torch.no_grad():
            layer64.cores.add_(0.05 * torch.randn(layer64.cores.shape, generator=g, dtype=torch.float64))
        s = layer64.refresh_tucker_vectors()
        C = layer64.cores.detach().sum(1)
        u, v = layer64.tucker_u, layer64.tucker_v
        # C v = s1 u and C^T u = s1 v: (u, v) is the leading singular pair
        torch.testing.assert_close(torch.einsum("hrs,hs->hr", C, v), s[:, :1] * u, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(torch.einsum("hrs,hr->hs", C, u), s[:, :1] * v, rtol=1e-9, atol=1e-12)
        assert torch.all((u * prev_u).sum(-1) > 0), "sign flipped between refreshes"
        prev_u = u.clone()
    # An explicit flip of the stored pair is undone by the next refresh's alignment only if the
    # previous vector says so: flip prev, refresh, the new u follows the flipped direction.
    with torch.no_grad():
        layer64.tucker_u.neg_()
    flipped = layer64.tucker_u.clone()
    layer64.refresh_tucker_vectors()
    assert torch.all((layer64.tucker_u * flipped).sum(-1) > 0)


def test_softmax_activation_normalizes_each_head(megatron_world):
    layer = UltraMemLayer(small_config(torch.float64, ultramem_score_activation="softmax"), layer_index=0)
    _, scores = layer.retrieve(torch.randn(6, 24, dtype=torch.float64))
    per_head = scores.view(6, 2, 7, 2).sum(2)  # [T, H, h]
    torch.testing.assert_close(per_head, torch.ones_like(per_head))


def test_paper_init_values_variance(megatron_world):
    cfg = small_config(torch.float64, ultramem_num_keys=20, ultramem_topm=9)
    layer = UltraMemLayer(cfg, layer_index=0)
    # E / (2 m H L), divided by the winners' mean square measured at init (tests/test_init.py)
    expected = 4 / (2 * 9 * 2 * 3) / layer.winner_score_rms() ** 2
    # 400 x 10 samples: the sample variance is within ~7% (3 sigma) of the target
    assert abs(layer.values.var().item() / expected - 1) < 0.1
    cores = layer.cores.detach().flatten(-2).norm(dim=-1)
    torch.testing.assert_close(cores, torch.ones_like(cores))


# ---------------------------------------------------------------------- initialization
def _keys(salt=5, seed=1234, layer=0):
    return layer_module._stream_keys(seed, layer, salt)


def _normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def test_hash_rng_column_shard_is_slice_of_full_tensor():
    """Element (i, j) depends only on (seed, layer, tensor, i, global j): a shard drawn alone, with
    its column offset, is exactly the slice of the full tensor (any chunking of the rows too)."""
    full = torch.empty(37, 20, dtype=torch.float64)
    layer_module._hash_fill(full, _keys(), "normal")
    for lo, hi in ((0, 5), (5, 10), (13, 20)):
        part = torch.empty(37, hi - lo, dtype=torch.float64)
        layer_module._hash_fill(part, _keys(), "normal", col_offset=lo)
        assert torch.equal(part, full[:, lo:hi])
    chunked = torch.empty_like(full)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(layer_module._CHUNK, "cpu", 64)  # 3 rows per pass
        layer_module._hash_fill(chunked, _keys(), "normal")
    assert torch.equal(chunked, full)
    f32 = torch.empty(37, 20, dtype=torch.float32)
    layer_module._hash_fill(f32, _keys(), "normal")
    assert torch.equal(f32, full.float())  # drawn in float64, then rounded


def test_hash_rng_streams_differ_by_seed_layer_and_tensor():
    draws = []
    for keys in (_keys(), _keys(salt=6), _keys(layer=1), _keys(seed=1235)):
        t = torch.empty(50, 8, dtype=torch.float64)
        layer_module._hash_fill(t, keys, "normal")
        draws.append(t)
    for a, b in itertools.combinations(draws, 2):
        assert (a == b).float().mean() < 0.01


def test_hash_rng_distribution():
    """N(0, 1) and U(0, 1) draws: moments, Kolmogorov-Smirnov distance and neighbour correlations
    (n = 200k samples: 5e-3 ~ 2.2 standard errors of the mean, 1.63/sqrt(n) = 3.6e-3 is the 1% KS
    critical value, correlations of independent samples have standard error 1/sqrt(n))."""
    R, C = 4000, 50
    n = R * C
    z = torch.empty(R, C, dtype=torch.float64)
    layer_module._hash_fill(z, _keys(), "normal")
    assert abs(z.mean().item()) < 5e-3 and abs(z.std().item() - 1.0) < 5e-3
    ks = (torch.arange(1, n + 1, dtype=torch.float64) / n - _normal_cdf(torch.sort(z.reshape(-1)).values))
    assert ks.abs().max().item() < 1.63 / math.sqrt(n)
    for a, b in ((z[:, 1:], z[:, :-1]), (z[1:], z[:-1])):  # adjacent columns, adjacent rows
        assert abs(torch.corrcoef(torch.stack([a.reshape(-1), b.reshape(-1)]))[0, 1].item()) < 4 / math.sqrt(n)
    u = torch.empty(R, C, dtype=torch.float64)
    layer_module._hash_fill(u, _keys(), "uniform")
    assert u.min() > 0 and u.max() < 1
    ku = (torch.arange(1, n + 1, dtype=torch.float64) / n - torch.sort(u.reshape(-1)).values).abs().max()
    assert ku.item() < 1.63 / math.sqrt(n)


def test_init_layout_holds_its_column_slice(megatron_world, monkeypatch):
    """An EP (or TP) rank's table and Wo are its column slices of the single-rank layer's, and the
    replicated tensors are equal (built here with a faked 4-way layout: init needs no groups)."""
    cfg = small_config(torch.float64, ultramem_value_dim=12)
    full = UltraMemLayer(cfg, layer_index=3)
    E = 4
    for rank in range(4):
        layout = parallel.MemoryLayout(ep_size=4, ep_rank=rank)
        monkeypatch.setattr(layer_module.parallel, "memory_layout", lambda c, g=None, _l=layout: _l)
        part = UltraMemLayer(cfg, layer_index=3)
        c0, c1 = part.col_lo, part.col_hi
        assert (c0, c1) == (3 * rank, 3 * rank + 3)
        assert torch.equal(part.values, full.values[:, c0:c1])
        assert torch.equal(part.linear_out.weight, full.linear_out.weight[:, c0 * E : c1 * E])
        for name in ("query_weight", "keys_row", "keys_col", "cores", "permutation", "tucker_u"):
            assert torch.equal(getattr(part, name), getattr(full, name)), name


@pytest.mark.parametrize("scheme", ["paper", "reference"])
def test_init_scales(megatron_world, scheme):
    """Each tensor is N(0, std^2) with init_scales()' std, cores U(0, 1) (unit norm for 'paper').
    Bounds are 4 standard errors: 1/sqrt(2n) for a sample std, 1/sqrt(n) for a mean (in std units)."""
    cfg = small_config(torch.float64, ultramem_init=scheme, ultramem_num_keys=20, ultramem_value_dim=16)
    layer = UltraMemLayer(cfg, layer_index=0)
    sc = layer.init_scales()
    if scheme == "paper":  # the value std is calibrated by the winners' RMS (tests/test_init.py)
        sc["values"] /= layer.winner_score_rms()
    for name, key in (("values", "values"), ("linear_out.weight", "out"), ("query_weight", "query"),
                      ("keys_row", "keys"), ("keys_col", "keys")):  # fmt: skip
        t = layer.get_parameter(name)
        n = t.numel()  # 288 (query) to 6,400 (values)
        assert abs(t.std().item() / sc[key] - 1) < 4 / math.sqrt(2 * n), name
        assert abs(t.mean().item()) < 4 * sc[key] / math.sqrt(n), name
    cores = layer.cores.detach()
    if scheme == "paper":
        norms = cores.flatten(-2).norm(dim=-1)
        torch.testing.assert_close(norms, torch.ones_like(norms))
    else:
        assert cores.min() > 0 and cores.max() < 1
    assert torch.all(layer.query_norm_row.weight == sc["ln_weight"])


def test_perform_initialization_false_draws_nothing_but_pi(megatron_world, monkeypatch):
    def fail(*a, **k):
        raise AssertionError("drew a parameter")

    monkeypatch.setattr(layer_module, "_hash_fill", fail)
    layer = UltraMemLayer(small_config(torch.float64, perform_initialization=False), layer_index=1)
    assert torch.equal(torch.sort(layer.permutation).values.long(), torch.arange(100))
    assert torch.count_nonzero(layer.tucker_u) == 0


def test_meta_device_construction_then_materialize(megatron_world):
    """init_model_with_meta_device: nothing is allocated or drawn; after to_empty(), a call to
    reset_parameters() (as Megatron-FSDP does) gives the same layer as a CPU construction."""
    meta = UltraMemLayer(small_config(torch.float64, init_model_with_meta_device=True), layer_index=1)
    assert meta.values.is_meta and meta.keys_row.is_meta and meta.permutation.is_meta
    meta.to_empty(device="cpu")
    meta.reset_parameters()
    cpu = UltraMemLayer(small_config(torch.float64), layer_index=1)
    for (name, a), (_, b) in zip(meta.state_dict().items(), cpu.state_dict().items()):
        if torch.is_tensor(a):
            assert torch.equal(a, b), name


def test_parameters_are_created_on_the_init_device(megatron_world):
    """use_cpu_initialization=False puts parameters on the current CUDA device; without CUDA (this
    machine, or cpu_compat) that is the CPU."""
    layer = UltraMemLayer(small_config(torch.float64, use_cpu_initialization=False), layer_index=1)
    want = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    for name, t in [*layer.named_parameters(), *layer.named_buffers()]:
        if name != "linear_out.weight":  # Megatron's own layer decides its device
            assert t.device == want, name


@pytest.mark.parametrize("impl", ["auto", "triton"])
def test_bf16_main_grad_does_not_crash(megatron_world, impl):
    """Issue #11: Megatron's default grad_reduce_in_fp32=False gives bf16 main_grads. Both the CPU
    path and the Triton backward add the table gradient into them (summed in fp32, rounded once:
    tests/test_cpu_path.py and tests/kernels/test_gather.py check the bits) and return no autograd
    gradient. Checked against the same layer's ordinary gradient (no main_grad): main_grad is one
    bf16 rounding of the fp32 sum; the plain bf16 gradient may also round each product (the CPU
    path's bf16 embedding_bag; measured 2 ulps), so they agree to 4 bf16 ulps (2^-6 relative)."""
    from megatron_ultramem import kernels

    if impl == "triton" and not kernels.HAVE_TRITON:
        pytest.skip("triton is not importable")
    # 'reference' init: the paper init's calibration batch would run the interpreted kernel
    cfg = small_config(torch.bfloat16, ultramem_impl=impl, ultramem_init="reference")
    layer = UltraMemLayer(cfg, layer_index=1)
    layer.eval()
    x = torch.randn(4, 2, 24, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    layer(x)[0].float().square().sum().backward()
    plain = layer.values.grad.clone()  # no main_grad: the ordinary gradient
    layer.values.grad = None
    layer.values.main_grad = torch.zeros_like(layer.values)  # bf16, like DDP's buffer
    layer(x)[0].float().square().sum().backward()
    assert layer.values.grad is None
    assert torch.count_nonzero(plain) > 0
    torch.testing.assert_close(layer.values.main_grad, plain, rtol=2**-6, atol=1e-6)


def test_output_projection_does_not_switch_off_tp_comm_overlap(megatron_world):
    """Transformer Engine's linear sets config.tp_comm_overlap = False (for every later layer, the
    config is shared) when given a tp_comm_buffer_name outside its list; the layer must pass one
    from that list. The list is read from Megatron's TE wrapper source, so a change there shows."""
    import inspect
    import re

    from megatron.core.extensions import transformer_engine as te_ext
    from megatron.core.tensor_parallel.layers import RowParallelLinear

    from megatron_ultramem.layer import UltraMemSubmodules

    match = re.search(r"tp_comm_buffer_name not in (\[[^\]]*\])", inspect.getsource(te_ext))
    assert match, "Megatron's TE wrapper no longer checks buffer names this way: revisit layer.py"
    known = eval(match.group(1))  # a literal list of strings in Megatron's source
    seen = {}

    class Spy(RowParallelLinear):
        def __init__(self, *args, tp_comm_buffer_name=None, **kwargs):
            seen.update(name=tp_comm_buffer_name, is_expert=kwargs.get("is_expert"))
            super().__init__(*args, tp_comm_buffer_name=tp_comm_buffer_name, **kwargs)

    UltraMemLayer(small_config(), submodules=UltraMemSubmodules(linear_out=Spy))
    assert seen["name"] in known and seen["is_expert"] is True
