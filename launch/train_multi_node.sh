#!/usr/bin/env bash
# Train an existing MoE model's configuration as UltraMem on several nodes (torchrun, NCCL).
# Run it once on every node, with the same MASTER_ADDR / MASTER_PORT / NNODES and that node's
# NODE_RANK (static rendezvous, so ranks follow node order as Megatron's layout expects):
#
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 MEGATRON_LM_PATH=/path/to/Megatron-LM \
#       launch/train_multi_node.sh [--dry-run] <MoE args...>
#
# NODE_RANK falls back to SLURM_NODEID (see train_slurm.sbatch). NCCL settings (NCCL_SOCKET_IFNAME,
# NCCL_IB_HCA, ...) are taken from the environment; NCCL_DEBUG defaults to WARN.
# Environment: NPROC_PER_NODE [GPUs on this node], and launch/_common.sh's.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi

NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-}}"
MASTER_PORT="${MASTER_PORT:-29500}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"

ultramem_check_env
ultramem_check_nodes
ultramem_convert "$@"
ultramem_entry
GPUS="$(ultramem_gpus_per_node)"
ultramem_run torchrun \
    --nproc_per_node "$GPUS" \
    --nnodes "$NNODES" \
    --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" \
    --master_port "$MASTER_PORT" \
    "${ULTRAMEM_ENTRY_CMD[@]}" \
    "${ULTRAMEM_ARGS[@]}"
