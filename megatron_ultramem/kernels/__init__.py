"""Triton kernels for UltraMem retrieval (TDQKR phase 2) and aggregation (IVE + MCS pooling).

Each public function has the semantics of its pure-PyTorch oracle in `megatron_ultramem.reference`
and falls back to it when Triton is unavailable or the tensors are on a CPU without
TRITON_INTERPRET=1:
- `gather_pool`       ~ `reference.weighted_gather_pool` (differentiable custom op; the forward's
                        launch table splits the selections over programs at decode batch sizes
                        and takes a sorted segmented sum for large E; the table's gradient is a
                        segmented sum over row-sorted selections, atomics only for fp32 tables)
- `tucker_topm_fused` ~ `reference.tucker_topm` (phase-2 selection without the m x m grid in
                        memory: a register kernel for m <= 64, a tiled one for m <= 1024; the
                        reference above that)
Every launch variant is compiled for sm_90 by tests/kernels/compile_sm90.py (registers, spills,
vector widths, barriers, bytes in flight); the launchers never synchronize with the host.
"""

from .gather import HAVE_TRITON, gather_pool
from .topm import tucker_topm_fused

__all__ = ["HAVE_TRITON", "gather_pool", "tucker_topm_fused"]
