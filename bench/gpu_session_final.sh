#!/usr/bin/env bash
# Issues 5 and 6 on one 4-GPU machine (nvidia-h200-x4), one call, about 6 minutes:
#   GPU 0, 1: bench/distill_recipe.sh (teacher then distilled student on GPU 0,
#             the baseline student on GPU 1);
#   GPU 2:    bench/time_to_accuracy.py (train.py --preset fast, 300 s budget).
# Every 15 s the logs and metrics (no checkpoints) are packed into $OUT/all.tgz, so a
# run cut off by the device's time limit still returns what it has.
#   OUT=gpu_logs bash bench/gpu_session_final.sh
set -uo pipefail
OUT=${OUT:-gpu_logs}
mkdir -p "$OUT" runs
export PYTHONUNBUFFERED=1
pack() {
    tar -czf "$OUT/.all.tgz" --exclude='*.pth' --exclude='runs/distill/data' \
        runs/session.log runs/tta runs/tta.log runs/tta.json runs/distill runs/distill_logs 2>/dev/null
    mv "$OUT/.all.tgz" "$OUT/all.tgz"
}
{
    python3 -m pip install --no-build-isolation ./kernels/selective_scan >runs/build.log 2>&1 &
    python3 mean_std.py --no-progress && python3 makedata.py --no-progress --force
    wait; echo "build: $(tail -1 runs/build.log)"
} >runs/session.log 2>&1
CUDA_VISIBLE_DEVICES=2 timeout 400 python3 bench/time_to_accuracy.py --output runs/tta --force \
    --json runs/tta.json >runs/tta.log 2>&1 &
tta=$!
OUT=runs/distill_logs EPOCHS=${EPOCHS:-30} TEACHER_EPOCHS=${TEACHER_EPOCHS:-60} GPU_A=0 GPU_B=1 \
    bash bench/distill_recipe.sh >>runs/session.log 2>&1 &
distill=$!
while kill -0 $tta 2>/dev/null || kill -0 $distill 2>/dev/null; do pack; sleep 15; done
pack
cat runs/distill_logs/summary.txt runs/tta.json 2>/dev/null
