#!/usr/bin/env bash
# One device call: GPU tests at real sizes, then the model and server benchmarks. Logs go to $OUT.
# Usage (on the GPU machine, from the repo root): bash bench/gpu_check.sh [all]
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/card.txt"
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/model/test_model_kernels.py 2>&1 | tail -8 | tee "$OUT/gpu_tests.log"
INFOMAMBA_TEST_DEVICE=cuda timeout 90 python3 -m pytest -q -p no:cacheprovider tests/server 2>&1 | tail -15 | tee "$OUT/gpu_server_tests.log"
timeout 75 python3 bench/bench_server.py --concurrency 1 16 64 --requests 64 --max-tokens 32 2>&1 | tee "$OUT/bench_server.log"
if [ "${1:-}" = all ]; then
    timeout 300 python3 -m pytest -q -p no:cacheprovider tests/kernels 2>&1 | tail -8 | tee "$OUT/gpu_kernel_tests.log"
    timeout 150 python3 bench/bench_model.py 2>&1 | tee "$OUT/bench_model.log"
    timeout 60 python3 bench/bench_model.py --concepts 16 --quick 2>&1 | tee "$OUT/bench_model_k16.log"
fi
