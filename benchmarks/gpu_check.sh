#!/usr/bin/env bash
# The GPU checks of the project in one go (CUDA tests, then the benchmarks), each step under its own time limit, every
# output written to $OUT (default: benchmarks/results/gpu-<date>). Run from the repository root on a machine with a
# CUDA GPU, after `dvc repro` of the tiny preset (bench_cuda_precision reads its models/) and with a checkout of
# NVlabs/edm in third_party/edm (ignored by git: upstream's code is never committed here):
#
#     git clone https://github.com/NVlabs/edm third_party/edm && bash benchmarks/gpu_check.sh
#
# A step that fails or runs out of time is reported and the next one runs.
set -u -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="${PWD}${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-benchmarks/results/gpu-$(date +%Y%m%d)}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"

step() {  # step NAME SECONDS COMMAND...: run it with a time limit, its output to $OUT/NAME.txt and the console
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*" | tee -a "$OUT/steps.txt"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/steps.txt"
}

{
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown) $(git status --porcelain 2>/dev/null | grep -q . && echo '(with uncommitted changes)')"
    echo "date: $(date -u +%FT%TZ)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
} | tee "$OUT/device.txt"

step cuda_tests "${LIMIT_TESTS:-200}" env REPRO_CUDA_REPORT="$OUT/cuda_tests.jsonl" \
    "$PY" -m pytest -p no:cacheprovider -q -m cuda -rA tests/test_cuda.py
step bench_vs_upstream "${LIMIT_UPSTREAM:-160}" "$PY" benchmarks/bench_vs_upstream.py --edm third_party/edm \
    --batches 64,256,1024 --variants fp32,bf16,fp16,bf16+cl,bf16+compile --compile-batches 1024 --fid bf16+compile
step bench_ddo "${LIMIT_DDO:-60}" bash -c "$PY benchmarks/bench_ddo.py --device cuda --arch cifar10 --batch 256 --steps 5 --precision fp32 \
    && $PY benchmarks/bench_ddo.py --device cuda --arch edm2-s --batch 64 --steps 5 --precision fp32 --num-steps 32"
step bench_cuda_precision "${LIMIT_PRECISION:-80}" "$PY" benchmarks/bench_cuda_precision.py \
    --variants fp32,bf16,fp16,bf16+compile
step bench_sampler_img64 "${LIMIT_IMG64:-50}" bash -c "$PY benchmarks/bench_sampler.py --device cuda --only img64 --batch 256 --evals 6 --dtype fp32 \
    && $PY benchmarks/bench_sampler.py --device cuda --only img64 --batch 256 --evals 6 --dtype bf16"
echo "done: $OUT"
