#!/usr/bin/env bash
# GPU readiness in one short run (fits a 10-minute slot on one NVIDIA GPU):
#   1. the tests that need CUDA (tests/test_cuda.py; CPU runs skip them), plus the attention and
#      fused-loss-head equality tests, which also run on CUDA when it is present;
#   2. SimPO training throughput of a Llama-3-8B-shaped slice (4 layers, hidden 4096, GQA 32/8,
#      SwiGLU 14336, vocab 128256, seq 4096, bf16; TE spec when Transformer Engine is installed,
#      else SDPA) with the materialised and the fused loss head: tokens/s, TFLOP/s, MFU.
#
#   bash benchmarks/gpu_check.sh                  # uses $PY (default: .venv/bin/python, python3)
#   SEQ=2048 LAYERS=2 STEPS=3 bash benchmarks/gpu_check.sh
#
# Python needs torch (CUDA), megatron-core and this package's dependencies. A machine without a
# package index can use pure-Python wheels unpacked here beforehand:
#   .venv/bin/pip download --no-deps -d .gpu_deps/wheels megatron-core==0.16.1 ...
# and PYTHONPATH=.gpu_deps/site (see README "Performance").
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
SEQ=${SEQ:-4096}
LAYERS=${LAYERS:-4}
STEPS=${STEPS:-5}
OUT=${OUT:-${TMPDIR:-/tmp}/gpu_check}
mkdir -p "$OUT"
if [ -d .gpu_deps/site ]; then export PYTHONPATH="$PWD/.gpu_deps/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"; fi

echo "== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" - <<'PY' || { echo "gpu_check: torch/megatron-core not importable with $PY"; exit 2; }
import torch, megatron.core as mc
print(f"torch {torch.__version__} cuda {torch.version.cuda} available {torch.cuda.is_available()}")
print(f"megatron-core {getattr(mc, '__version__', '?')}")
try:
    import transformer_engine  # noqa: F401
    print("transformer-engine: installed")
except Exception:
    print("transformer-engine: not installed (SDPA attention)")
assert torch.cuda.is_available(), "no CUDA device visible"
PY

status=0
echo "== CUDA tests"
timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_attention.py \
    tests/test_fused_logprobs.py 2>&1 | tail -n 15 || status=1

shape=(--layers "$LAYERS" --hidden 4096 --ffn 14336 --heads 32 --kv-heads 8 --vocab 128256
       --seq-length "$SEQ" --micro-batch-size 1 --global-batch-size 2 --steps "$STEPS" --warmup 2
       --precision bf16)
echo "== throughput: Llama-3-8B slice, materialised loss head"
timeout 150 "$PY" benchmarks/bench_throughput.py "${shape[@]}" 2>/dev/null | tail -n 1 \
    | tee "$OUT/throughput.json" || status=1
echo "== throughput: Llama-3-8B slice, fused loss head"
timeout 150 "$PY" benchmarks/bench_throughput.py "${shape[@]}" -- --fused-loss-head 2>/dev/null \
    | tail -n 1 | tee "$OUT/throughput_fused.json" || status=1
exit $status
