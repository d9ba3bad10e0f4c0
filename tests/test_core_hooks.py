"""Hooks megatron-core 0.20 (Megatron-LM main) expects a parameter owner to honour:
`param.use_muon = False` on the value table (Muon / the layer-wise optimizer leave it to Adam) and
`MegatronModule.refresh_cache()` (called after an in-place weight refit).
"""

import pytest
import torch

from megatron_ultramem import compat
from megatron_ultramem.layer import UltraMemLayer
from megatron_ultramem.reference import leading_singular_vectors

from helpers import small_config

F64 = dict(rtol=1e-12, atol=1e-12)


def test_value_table_is_tagged_for_muon_and_nothing_else(megatron_world):
    layer = UltraMemLayer(small_config(), layer_index=0)
    assert layer.values.use_muon is False
    assert [n for n, p in layer.named_parameters() if hasattr(p, "use_muon")] == ["values"]


def _refresh_caches(module):
    """Megatron's own refit receiver where it exists (0.20: resharding.execution), else the call
    it makes on every MegatronModule."""
    try:
        from megatron.core.resharding.execution import _refresh_module_caches
    except ImportError:
        for m in module.modules():
            if hasattr(m, "refresh_cache"):
                m.refresh_cache()
        return
    _refresh_module_caches(module)


def test_refresh_cache_after_an_in_place_refit(megatron_world):
    """A refit writes new weights through `.data` (no version bump). Two rows of keys_row swapped
    keep every value the kept key rows are checked against (pointer, version, the bits' sum), so
    without refresh_cache the CPU path would keep using the old keys; after it, the layer equals the
    reference path on the new weights, and the Tucker vectors are the leading pair of the new cores."""
    layer = UltraMemLayer(small_config(torch.float64, ultramem_impl="auto"), layer_index=1).eval()
    ref = UltraMemLayer(small_config(torch.float64), layer_index=1).eval()
    x = torch.randn(4, 3, 24, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        layer(x)  # keeps the key rows
        before = layer(x)[0]
        keys = layer.keys_row.data
        keys.copy_(keys[:, [1, 0, *range(2, keys.shape[1])]])  # rows 0 and 1 swapped, in place
        ref.load_state_dict(layer.state_dict())
        expected = ref(x)[0]
        assert not torch.allclose(expected, before)  # the refit changes the output
        assert torch.equal(layer(x)[0], before)  # the kept rows are stale: what refresh is for
        _refresh_caches(layer)
        torch.testing.assert_close(layer(x)[0], expected, **F64)
        # new cores: refresh_cache also recomputes the phase-1 vectors from them
        layer.cores.data.copy_(torch.randn_like(layer.cores))
        _refresh_caches(layer)
        ref.load_state_dict(layer.state_dict())
        torch.testing.assert_close(layer(x)[0], ref(x)[0], **F64)
    u = leading_singular_vectors(layer.cores.sum(1))[0]
    torch.testing.assert_close(layer.tucker_u.abs(), u.abs(), **F64)


def _megatron_muon():
    try:
        from megatron.core.optimizer import emerging_optimizers
    except ImportError:
        return False
    return bool(getattr(emerging_optimizers, "HAVE_EMERGING_OPTIMIZERS", False))


@pytest.mark.skipif(
    not (compat.muon_honours_use_muon() and _megatron_muon()),
    reason="needs Megatron's Muon with use_muon (megatron-core >= 0.20) and emerging-optimizers "
    "(Python >= 3.12); older releases refuse --optimizer muon with the UltraMem spec "
    "(tests/megatron_lm/test_refusals.py)",
)
def test_megatrons_muon_updates_the_table_with_adam(megatron_world):
    """One step of Megatron's Muon through Megatron's DDP and optimizer factory: the table's update
    is exactly the first Adam step, -lr * g / (|g| + eps) (m and v bias-corrected to g and g^2),
    while a 2-D retrieval weight (query_weight) gets Muon's orthogonalized update (flat spectrum)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_ultramem.optim import add_value_config_overrides

    cfg = small_config(ultramem_impl="auto")
    layer = UltraMemLayer(cfg, layer_index=1)
    ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(grad_reduce_in_fp32=True), layer)
    lr, eps = 1e-2, 1e-8
    oc = OptimizerConfig(optimizer="muon", lr=lr, min_lr=lr, weight_decay=0.0, clip_grad=0.0,
                         adam_eps=eps, muon_scalar_optimizer="adam")  # fmt: skip
    opt = get_megatron_optimizer(oc, [ddp], config_overrides=add_value_config_overrides(None, oc, 1.0))
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    ddp.zero_grad_buffer()
    x = torch.randn(5, 2, 24, generator=torch.Generator().manual_seed(1))
    out, _ = ddp(x)
    (out * torch.randn_like(out)).sum().backward()
    ddp.finish_grad_sync()
    g, gq = layer.values.main_grad.clone(), layer.query_weight.main_grad.clone()
    assert g.abs().sum() > 0
    ok, _, _ = opt.step()
    assert ok
    table_step = layer.values.detach() - before["values"]
    # fp32 Adam: the quotient and the subtraction each round once (relative 1e-5 of lr)
    torch.testing.assert_close(table_step, -lr * g / (g.abs() + eps), rtol=1e-5, atol=1e-5 * lr)
    # query_weight [12, 24] went to Muon: Newton-Schulz flattens its gradient's spectrum (all
    # well-excited directions near the same value), which an elementwise (Adam) step of the same
    # gradient does not do
    def flat(step):
        sv = torch.linalg.svdvals(step.double())
        return int((sv > 0.9 * sv.max()).sum())

    q_step = layer.query_weight.detach() - before["query_weight"]
    assert flat(q_step) >= 8 and flat(-lr * gq / (gq.abs() + eps)) <= 4
