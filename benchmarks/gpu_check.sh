#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA GPU (none was at hand where this was written; BENCHMARKS.md "bfloat16"
# says so): the cuda-marked tests, then the speed benchmark on the GPU, in about 8 minutes on an H100-class GPU.
#
#     bash benchmarks/gpu_check.sh            # from the repository root, with .venv set up (a CUDA torch build)
#     PYTHON=python bash benchmarks/gpu_check.sh
#
#   1. pytest -m cuda: bf16 weights and autocast on the GPU against float32 (tests/test_cuda.py)
#   2. a training step at the GPT-2 124M shape in bf16 with torch.compile, against float32 (compiled too):
#      tokens/s and MFU against the GPU's dense bf16 peak (bench_bf16.py's table: H100/H200 989 TFLOP/s, A100 312)
#   3. batch-1 greedy decoding at the 124M shape, fp32 against bf16 weights; int8/int4 through
#      benchmarks/bench_quantize.py --device cuda where that script exists (issue 17, part A)
# Every step has its own time limit, so one stuck step cannot use up the rest; the summary lists each step's status.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH="benchmarks${PYTHONPATH:+:$PYTHONPATH}"
status=()

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@"
    local rc=$?
    status+=("$name: exit $rc after $((SECONDS - start)) s")
}

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA GPU visible to $PY (torch.cuda.is_available() is False); nothing to check" >&2
    exit 2
fi
"$PY" -c "import torch; print('#', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| CUDA', torch.version.cuda)"

step "cuda tests" 90 "$PY" -m pytest -q -m cuda tests/
step "train 124M (compiled, fp32 vs bf16)" 240 "$PY" benchmarks/bench_bf16.py --device cuda --compile --what train \
    --rounds 5 --batch 16 --seq 1024
step "decode 124M (fp32 vs bf16)" 60 "$PY" benchmarks/bench_bf16.py --device cuda --what decode --rounds 3 \
    --gen-tokens 200
if [ -f benchmarks/bench_quantize.py ]; then
    step "decode 124M (int8, int4)" 90 "$PY" benchmarks/bench_quantize.py --device cuda
else
    status+=("decode int8/int4: benchmarks/bench_quantize.py is not in this checkout; skipped")
fi

echo "=== summary"
printf '%s\n' "${status[@]}"
