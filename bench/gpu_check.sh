#!/usr/bin/env bash
# One device call (about 9 minutes): the server test suite on the GPU, then bench/bench_server.py at full sizes
# (completions at c = 1/16/64/256, websocket appends, a 2M-id long append, 1/2/4 API servers; 2 s a measured run) and
# bench/bench_hops.py (one request's hops). Logs go to $OUT;
# the bench's markdown summary is the end of $OUT/bench_server.log. `all` then adds the kernel tests and the
# model benchmarks, the few-row products' sweep and hybrids included (about 16 more minutes: use a second call).
# Usage (on the GPU machine, from the repo root): bash bench/gpu_check.sh [all]
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/card.txt"
INFOMAMBA_TEST_DEVICE=cuda timeout 120 python3 -m pytest -q -p no:cacheprovider tests/server 2>&1 | tail -15 | tee "$OUT/gpu_server_tests.log"
timeout 420 python3 bench/bench_server.py --seconds 2 2>&1 | tee "$OUT/bench_server.log"
timeout 120 python3 bench/bench_hops.py --device cuda --trace 2>&1 | sed -n '/^summary/,$p' | tee "$OUT/bench_hops.log"
if [ "${1:-}" = all ]; then
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/model/test_model_kernels.py tests/model/test_pdl.py 2>&1 | tail -8 | tee "$OUT/gpu_tests.log"
    timeout 300 python3 -m pytest -q -p no:cacheprovider tests/kernels 2>&1 | tail -8 | tee "$OUT/gpu_kernel_tests.log"
    timeout 150 python3 bench/bench_small_linear.py --json "$OUT/bench_small_linear.json" 2>&1 | tail -40 | tee "$OUT/bench_small_linear.log"
    timeout 300 python3 bench/bench_model.py --json "$OUT/bench_model.json" 2>&1 | tee "$OUT/bench_model.log"
    timeout 300 python3 bench/bench_hybrid.py 2>&1 | tee "$OUT/bench_hybrid.log"
fi
