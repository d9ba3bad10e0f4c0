"""The layer's CUDA path (ultramem_impl='triton') never synchronizes with the host: a training
step (forward + backward, aux loss included) and a decode step, with every op recorded.

The Python that runs around the kernels on a GPU runs here on CPU tensors, the kernels through
the Triton interpreter (conftest), off the record (`sync_check.kernels_off_the_record`: a launch
is asynchronous on a GPU; what the interpreter does to run it on CPU is not what a GPU does).
Everything else, Megatron's linear, the aux-loss scaler, autograd's backward ops included, is
recorded by `sync_check.SyncRecorder` and must contain no syncing op (`.item()`, `nonzero`,
`unique`, `svdvals`, boolean indexing, `.cpu()`, ...). On a GPU, benchmarks/gpu_check.py runs the
same step under torch.cuda.set_sync_debug_mode("error") and captures a decode step in a CUDA graph.
"""

import pytest
import torch

from megatron_ultramem import reference
from megatron_ultramem.kernels import HAVE_TRITON
from megatron_ultramem.layer import UltraMemLayer

from helpers import small_config
from sync_check import SyncRecorder, kernels_off_the_record

pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not importable")


def test_recorder_flags_syncing_ops():
    """The recorder is not blind: each of these synchronizes on CUDA and is flagged, one by one;
    the sync-free singular values of the aux loss are not."""
    x = torch.randn(3, 2, 2)
    cases = {
        "svdvals": lambda: torch.linalg.svdvals(x),
        "item": lambda: x.sum().item(),
        "bool": lambda: bool(x.sum() > 0),
        "nonzero": lambda: torch.nonzero(x),
        "mask index": lambda: x[x > 0],
        "unique": lambda: torch.unique(x),
        "tolist": lambda: x.tolist(),
        "cpu": lambda: x.to("cpu"),
    }
    for name, fn in cases.items():
        with SyncRecorder() as rec:
            fn()
        assert rec.syncs, name
    with SyncRecorder() as rec:
        reference.singular_values(x.requires_grad_(True)).sum().backward()
    assert not rec.syncs and rec.ops, rec.syncs


def _layer(dtype, **overrides):
    cfg = small_config(dtype, ultramem_impl="triton", ultramem_init="reference",
                       ultramem_aux_loss_alpha=0.5, ultramem_aux_loss_tau=0.0, **overrides)  # fmt: skip
    return UltraMemLayer(cfg, layer_index=1)


@pytest.mark.parametrize(
    "dtype,main_grad,deterministic",
    [(torch.float32, None, False), (torch.bfloat16, torch.bfloat16, True)],
    ids=["fp32-atomic", "bf16-main_grad"],
)
def test_training_step_is_sync_free(megatron_world, dtype, main_grad, deterministic):
    """Forward + backward in training mode (aux loss attached, tau = 0 so its hinge is live):
    no syncing op, the Triton path taken (kernels launched), gradients finite. fp32: the atomic
    backward; bf16 with a bf16 main_grad (Megatron's grad_reduce_in_fp32=False): the segmented
    sum. Also the value of the layer's aux loss equals the svdvals formula."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    layer = _layer(dtype, ultramem_deterministic=deterministic)
    layer.train()
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    if main_grad is not None:
        layer.values.main_grad = torch.zeros_like(layer.values, dtype=main_grad)
        layer.values.grad_added_to_main_grad = False
    x = torch.randn(3, 2, 24, generator=torch.Generator().manual_seed(0)).to(dtype)
    x.requires_grad_(True)
    with SyncRecorder() as rec, kernels_off_the_record(rec) as launched:
        out, _ = layer(x)
        out.float().square().sum().backward()
    assert not rec.syncs, rec.syncs
    assert len(rec.ops) > 50, len(rec.ops)  # the recorder saw the step
    need = {"_tucker_select_kernel", "_gather_pool_fwd_kernel", "_gather_pool_bwd_kernel"}
    need |= {"_segment_sum_kernel", "_segment_fixup_kernel"} if main_grad is not None else set()
    assert need <= set(launched), launched
    # (values.grad is Megatron's uninitialized placeholder when main_grad took the gradient)
    grads = [p.grad for p in layer.parameters() if p.grad is not None and p is not layer.values]
    grads += [x.grad] + ([layer.values.grad] if main_grad is None else [])
    assert all(torch.isfinite(g.float()).all() for g in grads)
    if main_grad is not None:
        assert torch.isfinite(layer.values.main_grad.float()).all()
        assert layer.values.main_grad.abs().sum() > 0  # the table gradient went there
    sv = torch.linalg.svdvals(layer.cores.detach().sum(1).double())
    want = reference.tucker_aux_loss(sv, 0.5, 0.0)
    torch.testing.assert_close(layer.tucker_aux_loss().double(), want, rtol=1e-5, atol=1e-7)


def test_decode_step_is_sync_free(megatron_world):
    """One decode step (eval, no grad, [1, B, D]): the split forward at decode sizes and the
    phase-2 kernel; no syncing op."""
    layer = _layer(torch.float32, ultramem_topm=10)  # M = 20 selections: split in two
    layer.eval()
    x = torch.randn(1, 3, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), SyncRecorder() as rec, kernels_off_the_record(rec) as launched:
        out, _ = layer(x)
    assert not rec.syncs, rec.syncs
    assert {"_tucker_select_kernel", "_gather_pool_fwd_kernel", "_split_reduce_kernel"} <= set(launched)
    assert out.shape == x.shape and torch.isfinite(out).all()
