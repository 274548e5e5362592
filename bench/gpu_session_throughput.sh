#!/usr/bin/env bash
# Throughput of groupmamba_tiny on one GPU (kind nvidia-h200), alone on the machine:
# build the CUDA scan, then bench_model in eager and CUDA-graph modes with a kernel
# profile, then the regional-compile modes (bounded by a timeout: compiling may be slow).
#   OUT=gpu_logs bash bench/gpu_session_throughput.sh
set -uo pipefail
OUT=${OUT:-gpu_logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
log="$OUT/session.log"
step() { echo "== $(date +%T) $*" | tee -a "$log"; }

nvidia-smi -L >>"$log" 2>&1
step "build the CUDA extension"
timeout 150 python3 -m pip install --no-build-isolation ./kernels/selective_scan >"$OUT/build.log" 2>&1
echo "build exit $?" | tee -a "$log"

step "bench_model eager + cuda-graph, profile"
timeout ${EAGER_TIMEOUT:-200} python3 bench/bench_model.py --models groupmamba_tiny --backends cuda \
    --modes eager cuda-graph --profile 30 --json "$OUT/h200.json" >"$OUT/bench_graph.log" 2>&1
echo "exit $?" | tee -a "$log"

step "bench_model regional compile"
timeout ${COMPILE_TIMEOUT:-230} python3 bench/bench_model.py --models groupmamba_tiny --backends cuda \
    --modes ${COMPILE_MODES:-compile-blocks+cuda-graph} --profile 30 \
    --json "$OUT/h200_compile.json" >"$OUT/bench_compile.log" 2>&1
echo "exit $?" | tee -a "$log"
step "done"
