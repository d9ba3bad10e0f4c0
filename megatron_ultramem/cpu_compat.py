"""CPU compatibility layer: lets real Megatron-Core code run on CPU under the gloo backend.

Megatron-Core assumes CUDA in a few places. `enable()` patches exactly those that GPTModel,
parallel_state, tensor_parallel, the layer specs, Megatron's DDP and dist_checkpointing reach on a
CPU-only machine, and nothing else. It does nothing when CUDA is available, is idempotent (a marker
attribute on each patched object), and keeps each original as `__wrapped__` so `disable()` restores
it. Call it before building the model.

Patches (target: reason):
 1. torch.cuda.current_device: Megatron allocates on "the current CUDA device" in ~30 places
    (GlobalMemoryBuffer, the tensor-parallel mappings' all-gather/reduce-scatter outputs,
    RotaryEmbedding, DDP's grad buffers, dist-checkpoint coordination tensors). On a CPU-only
    build the call raises; returning 'cpu' makes each of them allocate on the CPU instead, which
    is one patch instead of one per call site.
 2. transformer.utils.get_default_causal_mask (and its import in fused_softmax):
    builds the mask with device="cuda"; build it on CPU.
 3. CudaRNGStatesTracker.add/fork, model_parallel_cuda_manual_seed:
    the tracker stores and swaps CUDA generator states; on CPU it swaps the CPU generator's state
    (dropout in tensor-parallel regions then draws from the tracked per-rank stream, as on GPU).
 4. moe_utils.te_general_gemm: megatron-core 0.16.1 without Transformer Engine references it
    undefined in the router; define it as None (the router then uses torch.matmul).
 5. torch.cuda.synchronize, torch.cuda.current_stream, torch.cuda.Stream, torch.cuda.stream:
    Megatron's DDP and the dist-checkpoint async writer call them unconditionally; on CPU there is
    nothing to synchronize, so they become no-ops / a dummy stream.
 6. models.hybrid.hybrid_block.TENorm (megatron-core 0.19+, only without Transformer Engine):
    HybridStack builds its final norm with TENorm whatever the stack spec says, and TENorm raises
    without TE; use Megatron's local norm (the one the local GPT spec uses) instead.
 7. Megatron's optimizers and schedules: (a) the module-level `torch` name of the optimizer,
    distrib_optimizer, clip_grads, grad_scaler, DDP grad-buffer, pipeline-schedule modules and
    megatron.core.utils (the apex-free multi-tensor fallbacks) becomes a proxy whose tensor
    factories turn device='cuda' into the CPU (found-inf flags, loss scales, norm buffers, the
    schedules' token counters); (b) the
    constructors of Float16OptimizerWithFloat16Params and DistributedOptimizer, and
    clip_grad_by_total_norm_fp32, dispatch on `tensor.type()` strings such as
    'torch.cuda.BFloat16Tensor': while those three run, `Tensor.type()` (no arguments) names CPU
    tensors with their CUDA spelling. Nothing else sees either change.
 9. tensor_parallel.random._get_cuda_rng_state / _set_cuda_rng_state: activation recompute
    (tensor_parallel.checkpoint) saves and restores "the CUDA RNG state" around the recomputed
    forward; on CPU that is the CPU generator's state (which it also saves itself).
 8. megatron.training.arguments.get_device_arch_version (where megatron.training is importable:
    megatron-core 0.17+, or a Megatron-LM checkout on sys.path): validate_args asks the GPU's
    compute capability with tensor parallelism; report 9 (Hopper), whose rules (e.g.
    CUDA_DEVICE_MAX_CONNECTIONS=1 for TP communication overlap) are the conservative ones.
10. megatron.training's pretrain() loop (`enable(training_loop=True)`, where megatron.training is
    importable): (a)
    `training.initialize_megatron` gets `allow_no_cuda=True` (it asserts CUDA otherwise);
    (b) `initialize._initialize_distributed` first creates the default process group itself
    (--distributed-backend, gloo on CPU) when none exists, since Megatron's own call would bind it
    to a CUDA device; (c) the module-level `torch` of training, initialize, checkpointing,
    training.utils and core.rerun_state_machine becomes the patch-7a proxy (their
    `torch.tensor(..., device='cuda')` flags, timers and loss sums land on the CPU) whose
    `torch.cuda` reports one device (that gates parallel-state setup and the model-parallel RNG
    seeding), makes `set_device` a no-op, and saves / restores the CPU generator's state as "the
    CUDA RNG state" (rerun state machine, checkpoints).
"""

import contextlib

import torch

CPU_CONFIG = dict(
    use_cpu_initialization=True,
    bias_dropout_fusion=False,
    gradient_accumulation_fusion=False,
    masked_softmax_fusion=False,
    persist_layer_norm=False,
    apply_rope_fusion=False,
)
"""TransformerConfig fields (and Megatron-LM argument names) for CPU runs: parameters created on the
CPU, and Megatron's fused kernels (which need CUDA or apex) off, so the plain PyTorch paths run."""

_MARK = "_ultramem_cpu_patched"
_PATCHED = []  # (owner, attribute name) pairs, for disable()


def _patch(owner, name, replacement):
    original = getattr(owner, name, None)
    if original is not None and getattr(original, _MARK, False):
        return  # idempotent
    setattr(replacement, _MARK, True)
    replacement.__wrapped__ = original
    setattr(owner, name, replacement)
    _PATCHED.append((owner, name))


def _current_device_cpu():
    return "cpu"


def _causal_mask_cpu(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq), diagonal=1).bool()


def _tracker_add(self, name, seed):
    self._is_initialized = True
    if seed in self.seeds_:
        raise Exception(f"seed {seed} already exists")
    self.seeds_.add(seed)
    if name in self.states_:
        raise Exception(f"rng state {name} already exists")
    orig = torch.get_rng_state()
    torch.manual_seed(seed)
    self.states_[name] = torch.get_rng_state()
    torch.set_rng_state(orig)


@contextlib.contextmanager
def _tracker_fork(self, name="model-parallel-rng"):
    if name not in self.states_:
        raise Exception(f"rng state {name} is not added")
    orig = torch.get_rng_state()
    torch.set_rng_state(self.states_[name])
    try:
        yield
    finally:
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)


class _NoStream:
    """Stand-in for torch.cuda.Stream on CPU: every operation is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, *args, **kwargs):
        return None


_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "randn", "rand")


def _cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int) or torch.device(device).type == "cuda":
        return "cpu"
    return device


class _CpuTorch:
    """`torch` as seen by Megatron's optimizer modules on CPU (patch 7a)."""

    def __getattr__(self, name):
        value = getattr(torch, name)
        if name in _FACTORIES:

            def factory(*args, device=None, **kwargs):
                return value(*args, device=_cpu_device(device), **kwargs)

            return factory
        return value


class _CpuCuda:
    """`torch.cuda` as megatron.training's loop sees it on CPU (patch 10): one device, the CPU."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def device_count() -> int:
        return 1  # gates parallel-state setup and the model-parallel RNG seeding in initialize.py

    @staticmethod
    def set_device(*args, **kwargs) -> None:
        pass

    @staticmethod
    def get_rng_state(*args, **kwargs) -> torch.Tensor:
        return torch.get_rng_state()  # checkpoints save "the CUDA RNG state": the CPU generator's

    @staticmethod
    def set_rng_state(state, *args, **kwargs) -> None:
        torch.set_rng_state(state)


class _CpuTrainingTorch(_CpuTorch):
    """`torch` as megatron.training's loop modules see it on CPU (patch 10)."""

    cuda = _CpuCuda()


_TENSOR_TYPE = torch.Tensor.type


def _cuda_type_name(self, *args, **kwargs):
    name = _TENSOR_TYPE(self, *args, **kwargs)
    if args or kwargs or not isinstance(name, str) or name.startswith("torch.cuda."):
        return name
    return name.replace("torch.", "torch.cuda.", 1)


def _with_cuda_type_names(fn):
    """fn, run with Tensor.type() reporting CUDA names (patch 7b)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        torch.Tensor.type = _cuda_type_name
        try:
            return fn(*args, **kwargs)
        finally:
            torch.Tensor.type = _TENSOR_TYPE

    return wrapper


def _patch_optimizers_and_schedules() -> None:
    import importlib

    for name in ("optimizer", "distrib_optimizer", "clip_grads", "grad_scaler"):
        module = importlib.import_module(f"megatron.core.optimizer.{name}")
        _patch(module, "torch", _CpuTorch())
    from megatron.core import utils as core_utils
    from megatron.core.distributed import param_and_grad_buffer

    from megatron.core.pipeline_parallel import schedules

    for module in (param_and_grad_buffer, core_utils, schedules):
        _patch(module, "torch", _CpuTorch())
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    for owner, name in (
        (optimizer.Float16OptimizerWithFloat16Params, "__init__"),
        (distrib_optimizer.DistributedOptimizer, "__init__"),
        (clip_grads, "clip_grad_by_total_norm_fp32"),
        (optimizer, "clip_grad_by_total_norm_fp32"),  # imported by name there
    ):
        original = getattr(owner, name)
        if not getattr(original, _MARK, False):
            _patch(owner, name, _with_cuda_type_names(original))


_TRAINING_MODULES = (
    "megatron.training.training",
    "megatron.training.initialize",
    "megatron.training.checkpointing",
    "megatron.training.utils",
    "megatron.core.rerun_state_machine",
)
"""Modules of megatron.training whose `torch.tensor(..., device='cuda')` calls patch 10 redirects."""


def _have_te() -> bool:
    from megatron.core.extensions import transformer_engine

    return bool(transformer_engine.HAVE_TE)


def _local_norm(config, hidden_size: int, eps: float = 1e-5, **kwargs):
    from megatron.core.models.gpt.gpt_layer_specs import LNImpl

    return LNImpl(config=config, hidden_size=hidden_size, eps=eps)


def enable(training_loop: bool = False) -> bool:
    """Apply the patches when CUDA is absent. Returns True when the CPU layer is active.

    training_loop=True also applies patch 10 (megatron.training's pretrain() loop; imports
    megatron.training.training, which model-level code does not need)."""
    if torch.cuda.is_available():
        return False
    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.transformer import utils as tr_utils
    from megatron.core.transformer.moe import moe_utils

    # 1
    _patch(torch.cuda, "current_device", _current_device_cpu)
    # 2
    _patch(tr_utils, "get_default_causal_mask", _causal_mask_cpu)
    _patch(fused_softmax, "get_default_causal_mask", _causal_mask_cpu)
    # 3
    _patch(tp_random.CudaRNGStatesTracker, "add", _tracker_add)
    _patch(tp_random.CudaRNGStatesTracker, "fork", _tracker_fork)
    # 4
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    # 5
    _patch(torch.cuda, "synchronize", lambda *a, **k: None)
    _patch(torch.cuda, "current_stream", lambda *a, **k: _NoStream())
    _patch(torch.cuda, "Stream", _NoStream)
    _patch(torch.cuda, "stream", lambda *a, **k: contextlib.nullcontext())
    # 6
    try:
        from megatron.core.models.hybrid import hybrid_block
    except ImportError:  # megatron-core < 0.19: no HybridModel
        hybrid_block = None
    if hybrid_block is not None and not _have_te():
        _patch(hybrid_block, "TENorm", _local_norm)
    # 7
    _patch_optimizers_and_schedules()
    # 9
    _patch(tp_random, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state())
    _patch(tp_random, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state))
    # 8
    try:
        from megatron.training import arguments as training_arguments
    except ImportError:
        training_arguments = None
    if training_arguments is not None and hasattr(training_arguments, "get_device_arch_version"):
        _patch(training_arguments, "get_device_arch_version", lambda: 9)
    # 10
    if training_loop and training_arguments is not None:
        _patch_training_loop()
    return True


def _patch_training_loop() -> None:
    """Patch 10: megatron.training's pretrain() loop on CPU (see the module docstring)."""
    import functools
    import importlib

    from megatron.training import training

    from megatron.training import initialize

    original = training.initialize_megatron
    if not getattr(original, _MARK, False):
        _patch(training, "initialize_megatron", functools.wraps(original)(
            functools.partial(original, allow_no_cuda=True)
        ))  # fmt: skip
    original = initialize._initialize_distributed
    if not getattr(original, _MARK, False):

        @functools.wraps(original)
        def initialize_distributed(*args, **kwargs):
            if not torch.distributed.is_initialized():
                from datetime import timedelta

                from megatron.training import get_args

                margs = get_args()
                torch.distributed.init_process_group(
                    backend=margs.distributed_backend, world_size=margs.world_size,
                    rank=margs.rank, timeout=timedelta(minutes=margs.distributed_timeout_minutes),
                )  # fmt: skip
            return original(*args, **kwargs)

        _patch(initialize, "_initialize_distributed", initialize_distributed)
    for name in _TRAINING_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "torch"):
            _patch(module, "torch", _CpuTrainingTorch())


def disable() -> None:
    """Undo every patch (tests use this to check idempotence and reversibility)."""
    while _PATCHED:
        owner, name = _PATCHED.pop()
        current = getattr(owner, name)
        setattr(owner, name, current.__wrapped__)


def is_enabled() -> bool:
    return bool(_PATCHED)
