# Shared by train_single_node.sh, train_multi_node.sh and train_slurm.sbatch (sourced, not run).
#
# Environment (checked before anything runs; a bad value is a one-line error and exit status 2):
#   MEGATRON_LM_PATH        Megatron-LM checkout (a directory with pretrain_gpt.py, e.g. branch
#                           core_r0.16.0); not needed with ULTRAMEM_ENTRY=plugin       [required]
#   PYTHON                  Python that has megatron_ultramem installed               [python]
#   ULTRAMEM_MODE           parallel | replace (how a MoE block becomes a memory)     [parallel]
#   ULTRAMEM_CONVERT_ARGS   extra options of the converter, e.g. "--ultramem-topm 64"   []
#   ULTRAMEM_ENTRY          module: python -m megatron_ultramem.megatron_lm.pretrain_gpt (no patch;
#                                   pretrain_hybrid.py for a --hybrid-layer-pattern model)
#                           patched: $MEGATRON_LM_PATH/pretrain_gpt.py with the patch
#                           plugin: python -m megatron_ultramem.pretrain (megatron-core >= 0.19,
#                           no checkout)                                               [module]
#   NPROC_PER_NODE          processes (GPUs) per node, an integer >= 1      [nvidia-smi's count, else 8]
#   MASTER_PORT             rendezvous port, 1..65535                                  [29500]
#   DRY_RUN=1 (or --dry-run as first argument)  print the command instead of running it; 0 runs it

ULTRAMEM_ROOT="${ULTRAMEM_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
PYTHON="${PYTHON:-python}"

ultramem_die() {
    echo "error: $*" >&2
    exit 2
}

ultramem_is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

# ultramem_check_env: every environment variable above, before any work.
ultramem_check_env() {
    case "${DRY_RUN:-0}" in
        0 | 1) ;;
        *) ultramem_die "DRY_RUN=${DRY_RUN}: allowed 1 (print the command) or 0 (run it)" ;;
    esac
    case "${ULTRAMEM_ENTRY:-module}" in
        module | patched | plugin) ;;
        *) ultramem_die "ULTRAMEM_ENTRY=${ULTRAMEM_ENTRY}: allowed module, patched or plugin" ;;
    esac
    case "${ULTRAMEM_MODE:-parallel}" in
        parallel | replace) ;;
        *) ultramem_die "ULTRAMEM_MODE=${ULTRAMEM_MODE}: allowed parallel or replace" ;;
    esac
    if [[ -n "${NPROC_PER_NODE:-}" ]] && { ! ultramem_is_uint "$NPROC_PER_NODE" || ((10#$NPROC_PER_NODE < 1)); }; then
        ultramem_die "NPROC_PER_NODE=${NPROC_PER_NODE}: expected an integer >= 1 (processes per node)"
    fi
    if [[ -n "${MASTER_PORT:-}" ]] && { ! ultramem_is_uint "$MASTER_PORT" || ((10#$MASTER_PORT < 1 || 10#$MASTER_PORT > 65535)); }; then
        ultramem_die "MASTER_PORT=${MASTER_PORT}: expected a port number in 1..65535"
    fi
    command -v "$PYTHON" >/dev/null 2>&1 || ultramem_die "PYTHON=${PYTHON}: no such command (a Python with megatron_ultramem installed)"
    if [[ "${ULTRAMEM_ENTRY:-module}" != "plugin" ]]; then
        if [[ -z "${MEGATRON_LM_PATH:-}" ]]; then
            ultramem_die "set MEGATRON_LM_PATH to a Megatron-LM checkout, or ULTRAMEM_ENTRY=plugin (megatron-core >= 0.19)"
        fi
        if [[ ! -d "$MEGATRON_LM_PATH" ]]; then
            ultramem_die "MEGATRON_LM_PATH=${MEGATRON_LM_PATH}: no such directory (a Megatron-LM checkout)"
        fi
        if [[ ! -f "$MEGATRON_LM_PATH/pretrain_gpt.py" ]]; then
            ultramem_die "MEGATRON_LM_PATH=${MEGATRON_LM_PATH}: no pretrain_gpt.py there, not a Megatron-LM checkout"
        fi
    fi
}

# Kept for scripts written against the previous version of this file.
ultramem_require_megatron_lm() { ultramem_check_env; }

# ultramem_check_nodes: NNODES >= 1 and 0 <= NODE_RANK < NNODES (multi-node launchers).
ultramem_check_nodes() {
    if ! ultramem_is_uint "${NNODES:-}" || ((10#$NNODES < 1)); then
        ultramem_die "NNODES=${NNODES:-}: expected an integer >= 1 (number of nodes)"
    fi
    if ! ultramem_is_uint "${NODE_RANK:-}" || ((10#$NODE_RANK >= 10#$NNODES)); then
        ultramem_die "NODE_RANK=${NODE_RANK:-}: expected an integer in 0..$((10#$NNODES - 1)) (NNODES=${NNODES})"
    fi
    [[ -n "${MASTER_ADDR:-}" ]] || ultramem_die "MASTER_ADDR is empty: set it to the host of node 0"
}

# ultramem_convert MOE_ARGS... -> fills the array ULTRAMEM_ARGS (MoE args rewritten for UltraMem).
# The converter's own errors (one line, naming the flag) end the script with status 2.
ultramem_convert() {
    local converted
    [[ $# -gt 0 ]] || ultramem_die "no MoE arguments given: pass the model's pretrain_gpt.py arguments (--num-layers ... --num-experts ...)"
    # shellcheck disable=SC2086  # ULTRAMEM_CONVERT_ARGS is a list of options on purpose
    converted="$(PYTHONPATH="${ULTRAMEM_ROOT}${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m megatron_ultramem.megatron_lm.convert \
        --mode "${ULTRAMEM_MODE:-parallel}" ${ULTRAMEM_CONVERT_ARGS:-} --format lines -- "$@")" || exit 2
    mapfile -t ULTRAMEM_ARGS <<<"$converted"
}

# ultramem_entry -> fills the array ULTRAMEM_ENTRY_CMD: what torchrun launches (call after
# ultramem_convert: a HybridModel runs Megatron-LM's pretrain_hybrid.py).
ultramem_entry() {
    local hybrid=0 arg
    for arg in "${ULTRAMEM_ARGS[@]}"; do
        [[ "$arg" == "ultramem_hybrid_stack_spec" ]] && hybrid=1
    done
    case "${ULTRAMEM_ENTRY:-module}" in
        module)
            ULTRAMEM_ENTRY_CMD=(-m megatron_ultramem.megatron_lm.pretrain_gpt --megatron-lm "$MEGATRON_LM_PATH")
            if ((hybrid)); then
                [[ -f "$MEGATRON_LM_PATH/pretrain_hybrid.py" ]] || ultramem_die "MEGATRON_LM_PATH=${MEGATRON_LM_PATH}: no pretrain_hybrid.py there (a HybridModel needs Megatron-LM core_v0.19.0 or newer)"
                ULTRAMEM_ENTRY_CMD+=(--megatron-lm-script pretrain_hybrid.py)
            fi
            ;;
        patched)
            ((hybrid)) && ultramem_die "ULTRAMEM_ENTRY=patched: the patch covers pretrain_gpt.py only; a HybridModel needs ULTRAMEM_ENTRY=module or plugin"
            ULTRAMEM_ENTRY_CMD=("$MEGATRON_LM_PATH/pretrain_gpt.py")
            ;;
        plugin) ULTRAMEM_ENTRY_CMD=(-m megatron_ultramem.pretrain) ;;
    esac
}

ultramem_gpus_per_node() {
    if [[ -n "${NPROC_PER_NODE:-}" ]]; then
        echo "$((10#$NPROC_PER_NODE))"
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
