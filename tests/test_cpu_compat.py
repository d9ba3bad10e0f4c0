"""The CPU compatibility layer is idempotent, reversible and does what it says."""

import torch

from megatron_ultramem import cpu_compat


def test_enable_is_idempotent_and_reversible(megatron_world):
    from megatron.core.tensor_parallel import random as tp_random

    assert cpu_compat.enable() is True  # already enabled by the fixture
    patched = tp_random.CudaRNGStatesTracker.fork
    n = len(cpu_compat._PATCHED)
    cpu_compat.enable()
    assert tp_random.CudaRNGStatesTracker.fork is patched and len(cpu_compat._PATCHED) == n
    original = patched.__wrapped__
    cpu_compat.disable()
    try:
        assert tp_random.CudaRNGStatesTracker.fork is original
        assert not cpu_compat.is_enabled()
    finally:
        cpu_compat.enable()
    assert tp_random.CudaRNGStatesTracker.fork is not original
    assert torch.cuda.current_device() == "cpu"


def test_patched_spots_work_on_cpu(megatron_world):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    from megatron.core.transformer.utils import get_default_causal_mask

    buf = parallel_state.get_global_memory_buffer().get_tensor((3, 4), torch.float32, "t")
    assert buf.device.type == "cpu" and buf.shape == (3, 4)
    assert torch.equal(get_default_causal_mask(3), torch.ones(3, 3).triu(1).bool())
    # the tracked stream is its own: forking draws from it and leaves the default stream untouched
    torch.manual_seed(7)
    expected_default = torch.rand(3)
    torch.manual_seed(7)
    with get_cuda_rng_tracker().fork():
        a = torch.rand(3)
    assert torch.equal(torch.rand(3), expected_default)
    with get_cuda_rng_tracker().fork():
        b = torch.rand(3)
    assert not torch.equal(a, b)  # the tracked state advanced


def test_training_loop_patch_and_its_reversal(megatron_world):
    """Patch 10 (megatron.training present, 0.17+): pretrain()'s CUDA spots on the CPU, undone by
    disable(). The whole loop runs in tests/megatron_lm/test_pretrain_loop.py."""
    import pytest

    training = pytest.importorskip("megatron.training.training")
    from megatron.core import rerun_state_machine
    from megatron.training import initialize

    assert not hasattr(training.initialize_megatron, "keywords")  # model-level enable(): untouched
    assert cpu_compat.enable(training_loop=True) is True
    assert training.initialize_megatron.keywords == {"allow_no_cuda": True}
    flags = training.torch.tensor([1, 0], dtype=torch.long, device="cuda")  # as training.py does
    assert flags.device.type == "cpu" and flags.tolist() == [1, 0]
    assert initialize.torch.cuda.device_count() == 1
    torch.manual_seed(3)
    state = rerun_state_machine.torch.cuda.get_rng_state()
    assert torch.equal(state, torch.get_rng_state())
    expected = torch.rand(2)
    rerun_state_machine.torch.cuda.set_rng_state(state)
    assert torch.equal(torch.rand(2), expected)  # restoring it replays the CPU stream
    cpu_compat.disable()
    try:
        assert training.torch is torch and initialize.torch is torch
        assert not hasattr(training.initialize_megatron, "keywords")
    finally:
        cpu_compat.enable()
