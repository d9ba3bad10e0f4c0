"""Find host synchronizations in code that runs on CPU tensors (a helper, not a test module).

On CUDA an op synchronizes with the host when the host must see a value the device computes:
a Python scalar or list read from a tensor (`.item()`, `bool(t)`, `.tolist()`, `.cpu()`), an
output whose shape depends on the data (`nonzero`, `unique`, `masked_select`, boolean
indexing, `repeat_interleave` without `output_size`, `bincount`), or a solver whose status is
checked on the host (`torch.linalg.svd/svdvals/eigh/inv/cholesky/solve`, which call
`_linalg_check_errors`). Such an op stalls the CPU until the GPU catches up (the pipeline
schedules lose their overlap) and raises inside CUDA-graph capture.

`SyncRecorder` is a TorchDispatchMode (every aten op, forward and backward) plus a
TorchFunctionMode (the Python-level reads that do not always reach the dispatcher on CPU:
`Tensor.item`, `__bool__`, `tolist`, `numpy`, `cpu`, `to(cpu)`...). It records every op and
flags those above. `kernels_off_the_record` wraps the Triton kernels of megatron_ultramem.kernels
so that what the interpreter does to run them on CPU (numpy copies) is not recorded: on a GPU a
kernel launch is asynchronous, only the launchers' torch code around it matters.
benchmarks/gpu_check.py uses the same recorder in its dry run; on a GPU it uses
torch.cuda.set_sync_debug_mode("error") instead.
"""

import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops (overload packets) that synchronize on CUDA.
SYNC_ATEN = {
    "_local_scalar_dense", "item", "is_nonzero", "equal", "allclose",
    "nonzero", "nonzero_numpy", "argwhere", "masked_select", "masked_scatter", "bincount",
    "histc", "unique", "_unique", "_unique2", "unique_consecutive", "unique_dim",
    "unique_dim_consecutive", "_linalg_svd", "linalg_svd", "linalg_svdvals", "svd",
    "_linalg_eigh", "linalg_eigh", "linalg_eigvalsh", "linalg_eig", "linalg_eigvals",
    "_linalg_check_errors", "linalg_inv", "inverse", "linalg_cholesky", "cholesky",
    "linalg_solve", "_linalg_solve_ex", "linalg_lstsq", "linalg_matrix_rank", "linalg_pinv",
}  # fmt: skip
# Tensor methods that read values into Python (or move them to the host).
HOST_READS = {
    "item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__",
    "__complex__", "__array__",
}  # fmt: skip


def _sync_reason(func, args, kwargs) -> str:
    """Why this aten op synchronizes on CUDA, or ''."""
    name = func._overloadpacket.__name__ if hasattr(func, "_overloadpacket") else str(func)
    if name in SYNC_ATEN:
        return name
    if name == "repeat_interleave" and kwargs.get("output_size") is None and "Tensor" in str(func):
        return "repeat_interleave without output_size (data-dependent shape)"
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", [])
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or []):
            return f"{name} with a boolean mask (data-dependent shape)"
    return ""


class SyncRecorder:
    """with SyncRecorder() as rec: ... -> rec.syncs ([(what, where)]), rec.ops (every aten op)."""

    def __init__(self):
        self.syncs, self.ops, self.paused = [], [], 0
        recorder = self

        class _Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if not recorder.paused:
                    recorder.ops.append(str(func))
                    why = _sync_reason(func, args, kwargs)
                    if why:
                        recorder.syncs.append((why, str(func)))
                return func(*args, **kwargs)

        class _Function(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if not recorder.paused:
                    name = getattr(func, "__name__", str(func))
                    if name in HOST_READS:
                        recorder.syncs.append((f"Tensor.{name}", name))
                    elif name == "to":
                        target = [a for a in list(args[1:]) + list(kwargs.values())
                                  if isinstance(a, (str, torch.device))]  # fmt: skip
                        if any(torch.device(t).type == "cpu" for t in target):
                            recorder.syncs.append(("Tensor.to(cpu)", name))
                return func(*args, **kwargs)

        self._modes = (_Function(), _Dispatch())

    def __enter__(self):
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)
        return False

    @contextlib.contextmanager
    def pause(self):
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1


class _Kernel:
    """A @triton.jit kernel whose launches run unrecorded and are counted by name."""

    def __init__(self, fn, name, recorder, launched):
        self.fn, self.name, self.recorder, self.launched = fn, name, recorder, launched

    def __getitem__(self, grid):
        launch = self.fn[grid]

        def run(*args, **kwargs):
            self.launched.append(self.name)
            with self.recorder.pause():
                return launch(*args, **kwargs)

        return run

    def __getattr__(self, item):  # type(...).__name__ checks etc. reach the real kernel
        return getattr(self.fn, item)


@contextlib.contextmanager
def kernels_off_the_record(recorder: SyncRecorder):
    """Replace every kernel of megatron_ultramem.kernels.{gather,topm} by an unrecorded,
    counted launcher; yields the list of launched kernel names."""
    from megatron_ultramem.kernels import gather, topm

    launched, saved = [], []
    original, interpreting = gather._interpreting, gather._interpreting()
    for mod in (gather, topm):
        for name, obj in list(vars(mod).items()):
            if name.endswith("_kernel") and hasattr(obj, "__getitem__") and hasattr(obj, "fn"):
                saved.append((mod, name, obj))
                setattr(mod, name, _Kernel(obj, name, recorder, launched))
    gather._interpreting = lambda: interpreting  # the wrapper is not an InterpretedFunction
    try:
        yield launched
    finally:
        for mod, name, obj in saved:
            setattr(mod, name, obj)
        gather._interpreting = original
