"""Triton kernels for UltraMem retrieval (TDQKR phase 2) and aggregation (IVE + MCS pooling).

Each public function has the semantics of its pure-PyTorch oracle in `megatron_ultramem.reference`
and falls back to it when Triton is unavailable or the tensors are on a CPU without
TRITON_INTERPRET=1:
- `gather_pool`       ~ `reference.weighted_gather_pool` (differentiable custom op; the forward's
                        launch table splits the selections over programs at decode batch sizes)
- `tucker_topm_fused` ~ `reference.tucker_topm` (phase-2 selection without the m x m grid in
                        memory: a register kernel for m <= 128, a tiled one for m <= 1024; the
                        reference above that)
"""

from .gather import HAVE_TRITON, gather_pool
from .topm import tucker_topm_fused

__all__ = ["HAVE_TRITON", "gather_pool", "tucker_topm_fused"]
