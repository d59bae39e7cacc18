#!/usr/bin/env bash
# GPU readiness of megatron-simpo in one call of under 6 minutes on one H100/H200, on a machine
# with CUDA torch but no package index (nothing is downloaded here):
#
#   make gpu-wheels                        # once, where pip reaches an index: benchmarks/wheels
#   bash benchmarks/gpu_check.sh OUT_DIR   # on the GPU machine, with benchmarks/wheels carried
#
# Stages, each under its own timeout (T_SETUP + T_TESTS + T_MOE + T_PROBE + T_THD + T_SLICE =
# 355 s by default; a stage that ignores SIGTERM is killed 5 s later: 385 s at worst),
# stdout and stderr of each in OUT_DIR/<stage>.log:
#   setup       install the carried wheels (pip --no-index --no-deps --target $GPU_CHECK_SITE,
#               put on PYTHONPATH) and report the environment (benchmarks/gpu_env.py): versions,
#               the GPU, any module still missing (the stage then fails, naming the wheel to add)
#   cuda_tests  tests/test_cuda.py: bf16 and fp32 steps vs an fp32 CPU reference (a process
#               with CUDA hidden, gloo), SDPA vs local, the fused head, packing, CLI save/resume;
#               with Transformer Engine also TE padded, TE packed as THD sequences, the defaults
#   moe_tests   tests/test_cuda.py -k moe (Transformer Engine): tiny Mixtral- and Qwen3-MoE-like
#               models, experts as TE's grouped GEMM (TEGroupedMLP) vs a SequentialMLP, same
#               weights, fp32 and bf16: losses, moe/aux_loss, gradients, checkpoint layout; EP2
#               where two GPUs are visible
#   sdpa_probe  benchmarks/probe_sdpa_kernels.py: the SDPA kernel (flash / efficient / cuDNN /
#               math) that padded and packed attention get, at Llama-3-8B shapes
#   thd         benchmarks/bench_thd.py: seconds per step of TE padded vs TE packed as THD vs
#               SDPA packed with the dense mask (TE modes skipped without TE)
#   slice       benchmarks/bench_gpu_slice.py: Llama-3-8B-shaped slice, bf16, seq 4096, 4 and 8
#               layers, padded / fused head / packed: tokens/s, TFLOP/s, MFU, per-layer cost
# then OUT_DIR/summary.txt: each stage ok / failed / skipped with its time, and the tables.
# Exit status: 0 all stages ok; 1 a stage failed; 2 stopped where CUDA is first needed because
# none is available (a dry run on a CPU machine; GPU_CHECK_ALLOW_CPU=1 runs the CUDA stages
# anyway, with CPU-sized shapes).
#
# Overrides: PY (python with torch; default .venv/bin/python if present, else python3),
# WHEELS (default benchmarks/wheels; empty or absent: the environment is used as it is),
# GPU_CHECK_SITE (install target, default $TMPDIR/gpu_check_site: outside OUT_DIR),
# GPU_CHECK_REQUIRE (modules that must import, default benchmarks/gpu_env.py's list),
# GPU_CHECK_STAGES (the stages to run, e.g. "setup moe_tests"; default all: the rest are skipped),
# T_SETUP, T_TESTS, T_MOE, T_PROBE, T_THD, T_SLICE (seconds).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
REPO=$PWD
OUT_DIR=${1:-${OUT_DIR:-${TMPDIR:-/tmp}/gpu_check}}
WHEELS=${WHEELS:-$REPO/benchmarks/wheels}
GPU_CHECK_SITE=${GPU_CHECK_SITE:-${TMPDIR:-/tmp}/gpu_check_site}
PY=${PY:-$([[ -x .venv/bin/python ]] && echo "$REPO/.venv/bin/python" || echo python3)}
T_SETUP=${T_SETUP:-30}
T_TESTS=${T_TESTS:-100}
T_MOE=${T_MOE:-40}
T_PROBE=${T_PROBE:-25}
T_THD=${T_THD:-60}
T_SLICE=${T_SLICE:-100}
mkdir -p "$OUT_DIR" || exit 1
OUT_DIR=$(cd "$OUT_DIR" && pwd)
export PYTHONPATH="$GPU_CHECK_SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export CUDA_DEVICE_MAX_CONNECTIONS=1   # Megatron's setting for TP communication ordering
export PY WHEELS GPU_CHECK_SITE GPU_CHECK_REQUIRE="${GPU_CHECK_REQUIRE:-}"

NAMES=() RESULTS=() TIMES=()
BLOCKED=""       # set: every later stage is skipped for this reason
STOPPED_NO_CUDA=0
TINY=()          # CPU-sized shapes for the benchmarks when CUDA is absent and allowed

record() {  # record NAME RESULT SECONDS
    NAMES+=("$1") RESULTS+=("$2") TIMES+=("$3")
    printf '== %s: %s (%s s)\n' "$1" "$2" "$3"
}

# stage NAME TIMEOUT NEEDS_CUDA COMMAND...: runs COMMAND under `timeout`, tee'd to NAME.log.
stage() {
    local name=$1 limit=$2 needs_cuda=$3 log="$OUT_DIR/$1.log" start=$SECONDS rc
    shift 3
    if [[ -n $BLOCKED ]]; then
        record "$name" "skipped ($BLOCKED)" 0
        return
    fi
    if [[ -n ${GPU_CHECK_STAGES:-} && " $GPU_CHECK_STAGES " != *" $name "* ]]; then
        record "$name" "skipped (not selected)" 0
        return
    fi
    if [[ $needs_cuda == 1 && $HAVE_CUDA != 1 && -z ${GPU_CHECK_ALLOW_CPU:-} ]]; then
        echo "gpu_check: CUDA required from stage $name on: stop (no CUDA device visible to $PY)" \
            | tee "$log"
        BLOCKED="no CUDA" STOPPED_NO_CUDA=1
        record "$name" "skipped (no CUDA)" 0
        return
    fi
    echo "== $name (timeout ${limit} s): $*"
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) record "$name" ok $((SECONDS - start)) ;;
        124 | 137) record "$name" "failed (timeout after $limit s)" $((SECONDS - start)) ;;
        *) record "$name" "failed (exit $rc)" $((SECONDS - start)) ;;
    esac
    if [[ $name == setup && $rc != 0 ]]; then BLOCKED="setup failed"; fi
}

# The setup stage's body (run by `timeout bash -c`, hence exported variables only).
# shellcheck disable=SC2317  # invoked indirectly, through bash -c
setup() {
    echo "repository $PWD; output $OUT_DIR"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 \
        || echo "nvidia-smi: not available"
    rm -rf "$GPU_CHECK_SITE" && mkdir -p "$GPU_CHECK_SITE" || return 1
    shopt -s nullglob
    local wheels=("$WHEELS"/*.whl) env_args=()
    if ((${#wheels[@]})); then
        echo "installing ${#wheels[@]} wheels from $WHEELS into $GPU_CHECK_SITE (no index, no deps)"
        "$PY" -m pip install --no-index --no-deps --no-compile --no-cache-dir \
            --disable-pip-version-check -q --target "$GPU_CHECK_SITE" "${wheels[@]}" || {
            echo "gpu_check: pip could not install the wheels of $WHEELS (see above): they must" \
                "match this Python ($("$PY" -V 2>&1)); rebuild them with make gpu-wheels"
            return 1
        }
        env_args+=(--wheels "$WHEELS")
    else
        echo "no wheels in WHEELS=$WHEELS: using the environment of $PY as it is"
    fi
    if [[ -n $GPU_CHECK_REQUIRE ]]; then
        read -r -a req <<<"$GPU_CHECK_REQUIRE"
        env_args+=(--require "${req[@]}")
    fi
    "$PY" benchmarks/gpu_env.py "${env_args[@]}"
}
export -f setup
export OUT_DIR

echo "gpu_check: $(date -u +%FT%TZ), logs in $OUT_DIR"
if "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    HAVE_CUDA=1
else
    HAVE_CUDA=0
    [[ -n ${GPU_CHECK_ALLOW_CPU:-} ]] && TINY=(--tiny)
fi

stage setup "$T_SETUP" 0 bash -c setup
stage cuda_tests "$T_TESTS" 1 "$PY" -m pytest -v -rA -p no:cacheprovider tests/test_cuda.py \
    -k "not moe"
stage moe_tests "$T_MOE" 1 "$PY" -m pytest -v -rA -p no:cacheprovider tests/test_cuda.py -k moe
stage sdpa_probe "$T_PROBE" 1 "$PY" benchmarks/probe_sdpa_kernels.py "${TINY[@]}" \
    --json "$OUT_DIR/sdpa_probe.json"
# Three runs; each gets a third of the stage (less 5 s for the table).
stage thd "$T_THD" 1 "$PY" benchmarks/bench_thd.py "${TINY[@]}" --timeout $(((T_THD - 5) / 3))
# The slice keeps 15 s of its stage for the tables; its runs stop when that budget is spent.
stage slice "$T_SLICE" 1 "$PY" benchmarks/bench_gpu_slice.py "${TINY[@]}" \
    --budget-s $((T_SLICE - 15)) --json "$OUT_DIR/slice.json"

{
    echo "gpu_check summary ($(date -u +%FT%TZ); logs: $OUT_DIR/<stage>.log)"
    printf '%-12s %-40s %s\n' stage result seconds
    for i in "${!NAMES[@]}"; do
        printf '%-12s %-40s %s\n' "${NAMES[$i]}" "${RESULTS[$i]}" "${TIMES[$i]}"
    done
    for name in cuda_tests moe_tests sdpa_probe thd slice; do
        [[ -s $OUT_DIR/$name.log ]] || continue
        echo
        echo "-- $name"
        if [[ $name == *_tests ]]; then
            grep -E '^(PASSED|FAILED|ERROR|SKIPPED)|^=+ .*(passed|failed|skipped|error)' \
                "$OUT_DIR/$name.log"
        else
            grep -E '^(\||Llama-3-8B slice|Per layer|torch |THD packing)' "$OUT_DIR/$name.log"
        fi
    done
} | tee "$OUT_DIR/summary.txt"

for result in "${RESULTS[@]}"; do
    [[ $result == failed* ]] && exit 1
done
((STOPPED_NO_CUDA)) && exit 2
exit 0
