#!/usr/bin/env bash
# Train an existing MoE model's configuration as UltraMem on one node (torchrun).
#
#   MEGATRON_LM_PATH=/path/to/Megatron-LM launch/train_single_node.sh [--dry-run] <MoE args...>
#
# <MoE args> are the model's pretrain_gpt.py arguments as they are (e.g. the MODEL_ARGS, MOE_ARGS,
# DATA_ARGS, TRAINING_ARGS ... of Megatron-LM's examples/mixtral/train_mixtral_8x7b_distributed.sh).
# --num-experts / --moe-* / expert-parallel flags are dropped and --spec + --ultramem-* flags of the
# same total and activated parameters are added (megatron_ultramem/megatron_lm/convert.py).
# Environment: NPROC_PER_NODE [GPUs on this node], MASTER_PORT [29500], and launch/_common.sh's.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi

ultramem_check_env
ultramem_convert "$@"
ultramem_entry
GPUS="$(ultramem_gpus_per_node)"
ultramem_run torchrun \
    --nproc_per_node "$GPUS" \
    --nnodes 1 \
    --master_addr localhost \
    --master_port "${MASTER_PORT:-29500}" \
    "${ULTRAMEM_ENTRY_CMD[@]}" \
    "${ULTRAMEM_ARGS[@]}"
