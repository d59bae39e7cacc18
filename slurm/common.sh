# Shared by the sbatch scripts in slurm/ (sourced after their overrides, from $REPO/slurm: Slurm
# runs a spooled copy of the batch script, so "$(dirname "$0")" is not the repository).
#
# Where every job step runs, one of:
#   * a virtual environment (default): VENV=/path/to/venv is activated in the batch script and
#     every `srun` step inherits it;
#   * a container, through pyxis/enroot: CONTAINER_IMAGE=nvcr.io#nvidia/pytorch:25.09-py3 (an
#     enroot URI, or a .sqsh file). Every step (import, data preparation, training) gets
#     --container-image, --container-mounts, --container-workdir=$REPO and one --container-name
#     per job (the image is unpacked once per node, not once per step); nothing is activated.
#     The image must hold megatron-simpo's dependencies (slurm/README.md, "Containers").
#     CONTAINER_MOUNTS (pyxis syntax, SRC[:DST[:FLAGS]],...) defaults to REPO, RUN_DIR and the
#     local paths the script names (HF model, data), each mounted at the same path.
#
# The batch script itself runs outside the container, so `scontrol` is always available here:
# a training step that cannot requeue the job (no scontrol inside a container) leaves the job id
# in $MEGATRON_SIMPO_REQUEUE_FILE, and `requeue_if_asked` requeues it after the step.
#
# Steps are single-node srun calls (import, prepare) before the multi-node training step. srun is
# always given --cpus-per-task: Slurm 22.05-23.02 do not pass the allocation's value on to steps.
# shellcheck shell=bash

CONTAINER_IMAGE=${CONTAINER_IMAGE:-}
CONTAINER_MOUNTS=${CONTAINER_MOUNTS:-}
# srun options of every step (filled by setup_environment).
STEP_ARGS=()

# Comma-separated existing directories among the arguments (a file's directory), outermost
# first and without ones already under another: pyxis's default mounts.
default_container_mounts() {
    local p kept=() k covered
    for p in "$@"; do
        [[ -n $p && -e $p ]] || continue
        [[ -d $p ]] || p=$(dirname "$p")
        p=$(cd "$p" && pwd -P)
        covered=0
        for k in "${kept[@]}"; do
            [[ $p == "$k" || $p == "$k"/* ]] && covered=1
        done
        ((covered)) || kept+=("$p")
    done
    local IFS=,
    echo "${kept[*]}"
}

# setup_environment [PATH...]: the venv or the container flags of every step; PATHs (HF model,
# data, ...) are mounted in the container besides REPO and RUN_DIR.
setup_environment() {
    mkdir -p "$RUN_DIR/logs"
    STEP_ARGS=()
    if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
        STEP_ARGS+=("--cpus-per-task=$SLURM_CPUS_PER_TASK")
    fi
    if [[ -n $CONTAINER_IMAGE ]]; then
        local mounts=${CONTAINER_MOUNTS:-$(default_container_mounts "$REPO" "$RUN_DIR" "$@")}
        STEP_ARGS+=(
            "--container-image=$CONTAINER_IMAGE"
            "--container-mounts=$mounts"
            "--container-workdir=$REPO"
            "--container-name=megatron-simpo-${SLURM_JOB_ID:-0}"
        )
        echo "$(date -Is) steps run in container $CONTAINER_IMAGE (mounts: $mounts)"
    else
        [[ -f $VENV/bin/activate ]] || {
            echo "no virtual environment at VENV=$VENV: create it (make install) or set" \
                "CONTAINER_IMAGE to run the steps in a container" >&2
            return 1
        }
        # shellcheck disable=SC1091
        source "$VENV/bin/activate"
    fi
    # The training step writes the job id here when it cannot requeue itself (requeue_if_asked).
    export MEGATRON_SIMPO_REQUEUE_FILE="$RUN_DIR/requeue.${SLURM_JOB_ID:-0}"
    rm -f "$MEGATRON_SIMPO_REQUEUE_FILE"
}

# run_step [srun options...] COMMAND...: one job step in the job's environment.
run_step() {
    srun "${STEP_ARGS[@]}" "$@"
}

# import_hf_model HF_DIR INIT_DIR: the starting weights, imported once (the tracker file is
# written last, so a job preempted mid-import imports again).
import_hf_model() {
    local hf=$1 init=$2
    [[ -f $init/latest_checkpointed_iteration.txt ]] && return 0
    rm -rf "$init"
    echo "$(date -Is) importing $hf into $init"
    run_step --nodes=1 --ntasks=1 \
        python -m megatron_simpo convert hf-to-mcore --hf-dir "$hf" --save "$init"
}

# prepare_data SOURCE OUTPUT [prepare flags...]: sets PREPARED to a `megatron-simpo prepare`
# directory of SOURCE: SOURCE itself when it is one, else OUTPUT, prepared once per RUN_DIR in a
# step of its own (a multi-hour tokenisation never runs behind the training's collective timeout).
# shellcheck disable=SC2034  # PREPARED is read by the calling script
prepare_data() {
    local src=$1 out=$2
    shift 2
    if [[ -f $src/prepared.json ]]; then
        PREPARED=$src
    elif [[ -f $out/prepared.json ]]; then
        PREPARED=$out
        echo "$(date -Is) data already prepared: $out"
    else
        echo "$(date -Is) preparing $src into $out"
        mkdir -p "$(dirname "$out")"
        run_step --nodes=1 --ntasks=1 \
            python -m megatron_simpo prepare --data-path "$src" --output "$out" "$@"
        PREPARED=$out
    fi
}

# requeue_if_asked: after the training step, requeue the job if that step asked for it but
# could not (see MEGATRON_SIMPO_REQUEUE_FILE above).
requeue_if_asked() {
    [[ -f $MEGATRON_SIMPO_REQUEUE_FILE ]] || return 0
    rm -f "$MEGATRON_SIMPO_REQUEUE_FILE"
    echo "$(date -Is) the training step asked for a requeue: scontrol requeue $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
}
