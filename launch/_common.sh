# Shared by train_single_node.sh, train_multi_node.sh and train_slurm.sbatch (sourced, not run).
#
# Environment:
#   MEGATRON_LM_PATH        Megatron-LM checkout (e.g. branch core_r0.16.0); not needed with
#                           ULTRAMEM_ENTRY=plugin                                       [required]
#   PYTHON                  Python that has megatron_ultramem installed               [python]
#   ULTRAMEM_MODE           parallel | replace (how a MoE block becomes a memory)     [parallel]
#   ULTRAMEM_CONVERT_ARGS   extra options of the converter, e.g. "--ultramem-topm 64"   []
#   ULTRAMEM_ENTRY          module: python -m megatron_ultramem.megatron_lm.pretrain_gpt (no patch)
#                           patched: $MEGATRON_LM_PATH/pretrain_gpt.py with the patch
#                           plugin: python -m megatron_ultramem.pretrain (megatron-core >= 0.19,
#                           no checkout)                                               [module]
#   DRY_RUN=1 (or --dry-run as first argument)  print the command instead of running it

ULTRAMEM_ROOT="${ULTRAMEM_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
PYTHON="${PYTHON:-python}"

ultramem_require_megatron_lm() {
    if [[ "${ULTRAMEM_ENTRY:-module}" != "plugin" && -z "${MEGATRON_LM_PATH:-}" ]]; then
        echo "error: set MEGATRON_LM_PATH to a Megatron-LM checkout, or ULTRAMEM_ENTRY=plugin (megatron-core >= 0.19)" >&2
        exit 2
    fi
}

# ultramem_convert MOE_ARGS... -> fills the array ULTRAMEM_ARGS (MoE args rewritten for UltraMem).
ultramem_convert() {
    local converted
    # shellcheck disable=SC2086  # ULTRAMEM_CONVERT_ARGS is a list of options on purpose
    converted="$(PYTHONPATH="${ULTRAMEM_ROOT}${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m megatron_ultramem.megatron_lm.convert \
        --mode "${ULTRAMEM_MODE:-parallel}" ${ULTRAMEM_CONVERT_ARGS:-} --format lines -- "$@")" || exit 2
    mapfile -t ULTRAMEM_ARGS <<<"$converted"
}

# ultramem_entry -> fills the array ULTRAMEM_ENTRY_CMD: what torchrun launches.
ultramem_entry() {
    case "${ULTRAMEM_ENTRY:-module}" in
        module) ULTRAMEM_ENTRY_CMD=(-m megatron_ultramem.megatron_lm.pretrain_gpt --megatron-lm "$MEGATRON_LM_PATH") ;;
        patched) ULTRAMEM_ENTRY_CMD=("$MEGATRON_LM_PATH/pretrain_gpt.py") ;;
        plugin) ULTRAMEM_ENTRY_CMD=(-m megatron_ultramem.pretrain) ;;
        *) echo "error: ULTRAMEM_ENTRY must be module, patched or plugin, got ${ULTRAMEM_ENTRY}" >&2; exit 2 ;;
    esac
}

ultramem_gpus_per_node() {
    if [[ -n "${NPROC_PER_NODE:-}" ]]; then
        echo "$NPROC_PER_NODE"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L | wc -l
    else
        echo 8
    fi
}

# ultramem_run CMD... : print it (DRY_RUN=1) or exec it.
ultramem_run() {
    if [[ "${DRY_RUN:-0}" == "1" ]]; then
        printf '%q ' "$@" | sed 's/ $//'
        echo
    else
        export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"  # Megatron TP overlap
        export PYTHONPATH="${ULTRAMEM_ROOT}${PYTHONPATH:+:$PYTHONPATH}"
        exec "$@"
    fi
}
