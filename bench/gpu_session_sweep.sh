#!/usr/bin/env bash
# Time-to-accuracy runs and model benchmarks side by side, one per GPU (issue 5), in
# one device call:
#   RUN_<gpu>="<name> cold|warm [train.py flags...]"   a time-to-accuracy run
#   BENCH_<gpu>="<name> [bench_model.py flags...]"     a bench_model run
# for gpu = 0, 1, ... Every RUN is bench/time_to_accuracy.py (train.py --preset fast
# --time-limit $BUDGET --fit-time-limit) with the flags added. "cold" runs start at
# once (inductor's cache as found); "warm" runs start when the first cold run has
# finished its first epoch (its graphs are then in the cache, so a warm run of the
# same image and batch size compiles from it). A BENCH writes runs/bench_<name>.json
# and .log; with TESTS_GPU=<gpu> the GPU tests run on that GPU after its BENCH (with
# .carry/reference, carried). Inductor's cache lives in runs/inductor_cache, so a
# second call on the same (still warm) machine finds it; SKIP_SETUP=1 then skips
# building the scan extension and making the split again.
# Logs and metrics (no checkpoints) are packed into $OUT/all.tgz every 15 s.
#   RUN_0="base cold" BENCH_1="tiny --models groupmamba_tiny --backends cuda" \
#   TESTS_GPU=1 OUT=gpu_logs bash bench/gpu_session_sweep.sh
set -uo pipefail
OUT=${OUT:-gpu_logs}
BUDGET=${BUDGET:-300}
END_S=${END_S:-570}  # seconds after which everything must be finished
TESTS_GPU=${TESTS_GPU:-}
SKIP_SETUP=${SKIP_SETUP:-0}
mkdir -p "$OUT" runs
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=$PWD/runs/inductor_cache
pack() {
    tar -czf "$OUT/.all.tgz" --exclude='*.pth' --exclude='*.tmp' runs/session.log runs/tta_* runs/bench_* 2>/dev/null
    mv "$OUT/.all.tgz" "$OUT/all.tgz"
}
[ "$SKIP_SETUP" = 1 ] || {
    nvidia-smi -L
    python3 -m pip install --no-build-isolation ./kernels/selective_scan >runs/build.log 2>&1 &
    python3 mean_std.py --no-progress && python3 makedata.py --no-progress --force
    wait; echo "$(date +%T) build: $(tail -1 runs/build.log)"
} >>runs/session.log 2>&1
echo "$(date +%T) setup done" >>runs/session.log

gpus=(); first_cold=""
for gpu in 0 1 2 3 4 5 6 7; do
    spec_var="RUN_$gpu"; spec=${!spec_var:-}
    [ -n "$spec" ] || continue
    gpus+=("$gpu")
    read -r name mode flags <<<"$spec"
    [ "$mode" = cold ] && [ -z "$first_cold" ] && first_cold=$name
done
pids=()
gpu_tests() {
    [ -d .carry/reference ] || return 0  # the GPU tests' reference data, carried
    CUDA_VISIBLE_DEVICES=$1 GROUPMAMBA_REFERENCE_DIR=$PWD/.carry/reference \
        timeout $((END_S - SECONDS)) python3 -m pytest -q tests/test_cuda_graphs.py \
        tests/test_models_gpu.py tests/test_scan_gpu.py >runs/bench_gpu_tests.log 2>&1
    rc=$?; echo "$(date +%T) GPU tests exit $rc" >>runs/session.log
}
for gpu in 0 1 2 3 4 5 6 7; do
    spec_var="BENCH_$gpu"; spec=${!spec_var:-}
    [ -n "$spec" ] || continue
    read -r name flags <<<"$spec"
    (
        echo "$(date +%T) GPU $gpu bench $name: $flags" >>runs/session.log
        CUDA_VISIBLE_DEVICES=$gpu timeout $((END_S - SECONDS)) python3 bench/bench_model.py \
            $flags --json "runs/bench_$name.json" >"runs/bench_$name.log" 2>&1
        rc=$?; echo "$(date +%T) GPU $gpu bench $name exit $rc" >>runs/session.log
        [ "$TESTS_GPU" = "$gpu" ] && gpu_tests "$gpu"
    ) &
    pids+=($!)
done
tests_bench_var="BENCH_$TESTS_GPU"
if [ -n "$TESTS_GPU" ] && [ -z "${!tests_bench_var:-}" ]; then
    gpu_tests "$TESTS_GPU" &
    pids+=($!)
fi
for gpu in "${gpus[@]}"; do
    spec_var="RUN_$gpu"
    read -r name mode flags <<<"${!spec_var}"
    (
        if [ "$mode" = warm ] && [ -n "$first_cold" ]; then
            until [ -f "runs/tta_$first_cold/metrics.csv" ] || [ $SECONDS -gt $((END_S - BUDGET)) ]; do
                sleep 2
            done
        fi
        echo "$(date +%T) GPU $gpu starts $name ($mode): $flags" >>runs/session.log
        CUDA_VISIBLE_DEVICES=$gpu timeout $((END_S - SECONDS)) python3 bench/time_to_accuracy.py \
            --output "runs/tta_$name" --force --budget "$BUDGET" --json "runs/tta_$name.json" \
            -- $flags >"runs/tta_$name.log" 2>&1
        rc=$?; echo "$(date +%T) GPU $gpu $name exit $rc" >>runs/session.log
    ) &
    pids+=($!)
done
running() { for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }
while running; do pack; sleep 15; done
pack
cat runs/session.log
for f in runs/tta_*.json; do
    python3 -c "import json; d=json.load(open('$f'))['time_to_accuracy']; d.pop('command'); print('$f', d)"
done
