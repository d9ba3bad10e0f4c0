"""Triton kernels for UltraMem retrieval (TDQKR phase 2) and aggregation (IVE + MCS pooling).

Each public function has the semantics of its pure-PyTorch oracle in `megatron_ultramem.reference`
and falls back to it when Triton is unavailable or the tensors are on a CPU without
TRITON_INTERPRET=1:
- `gather_pool`       ~ `reference.weighted_gather_pool` (differentiable custom op)
- `tucker_topm_fused` ~ `reference.tucker_topm` (phase-2 selection without the m x m grid in memory)
"""

from .gather import HAVE_TRITON, gather_pool
from .topm import tucker_topm_fused

__all__ = ["HAVE_TRITON", "gather_pool", "tucker_topm_fused"]
