#!/usr/bin/env bash
# Issues 5 and 6 on one 4-GPU machine (kind nvidia-h200-x4), in one call: build the
# CUDA scan, then in parallel
#   GPU 0, 1: the distillation recipe (bench/distill_recipe.sh: teacher then distilled
#             student on GPU 0, the baseline student on GPU 1), then on GPU 1
#             bench_model for groupmamba_tiny (eager, then compiled);
#   GPU 2, 3: time-to-accuracy runs (bench/time_to_accuracy.py), one recipe each.
#   OUT=gpu_logs bash bench/gpu_session_speed.sh
set -uo pipefail
OUT=${OUT:-gpu_logs}
LOGS="$OUT/logs"
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
step() { echo "== $(date +%T) $*" | tee -a "$LOGS/summary.txt"; }
# extra train.py flags on top of --preset fast, for GPU 2 and GPU 3
RECIPES=(
    ""
    "--batch-size 256 --lr 2e-3 --epochs 80"
)

nvidia-smi -L >"$LOGS/nvidia-smi.txt" 2>&1
python3 -c "import torch, triton, timm; print('torch', torch.__version__, 'triton', triton.__version__, 'timm', timm.__version__)" \
    | tee -a "$LOGS/summary.txt"
step "build the CUDA extension; mean_std + makedata"
python3 -m pip install --no-build-isolation ./kernels/selective_scan >"$LOGS/build.log" 2>&1 &
build_pid=$!
python3 mean_std.py --no-progress >"$LOGS/mean_std.log" 2>&1
python3 makedata.py --no-progress --force >"$LOGS/makedata.log" 2>&1
wait $build_pid; echo "build exit $?" | tee -a "$LOGS/summary.txt"

pids=()
for ((i = 0; i < ${#RECIPES[@]}; i++)); do
    gpu=$((i + 2))
    step "GPU $gpu: time to accuracy, --preset fast ${RECIPES[$i]}"
    CUDA_VISIBLE_DEVICES=$gpu timeout 420 python3 bench/time_to_accuracy.py --output runs/tta_$gpu \
        --force --json "$LOGS/tta_$gpu.json" -- ${RECIPES[$i]} >"$LOGS/tta_$gpu.log" 2>&1 &
    pids+=($!)
done

step "GPU 0, 1: distillation recipe"
OUT="$LOGS/distill" GPU_A=0 GPU_B=1 bash bench/distill_recipe.sh >"$LOGS/distill.log" 2>&1 &
pids+=($!)

bench_track() {
    export CUDA_VISIBLE_DEVICES=1
    until [ -f runs/distill/baseline/report.txt ] || [ $SECONDS -gt 330 ]; do sleep 5; done
    step "GPU 1: bench_model eager, tiny"
    timeout 120 python3 bench/bench_model.py --models groupmamba_tiny --backends cuda --modes eager \
        --json "$OUT/h200_eager.json" >"$LOGS/bench_eager.log" 2>&1
    echo "bench eager exit $?" | tee -a "$LOGS/summary.txt"; tail -3 "$LOGS/bench_eager.log" >>"$LOGS/summary.txt"
    step "GPU 1: bench_model compiled, tiny"
    timeout $((560 - SECONDS)) python3 bench/bench_model.py --models groupmamba_tiny --backends cuda \
        --modes compile --extra-train --json "$OUT/h200_compile.json" >"$LOGS/bench_compile.log" 2>&1
    echo "bench compile exit $?" | tee -a "$LOGS/summary.txt"; tail -3 "$LOGS/bench_compile.log" >>"$LOGS/summary.txt"
}
bench_track &
pids+=($!)

for pid in "${pids[@]}"; do wait "$pid"; done
step "all tracks done"
cat "$LOGS/distill/summary.txt" >>"$LOGS/summary.txt" 2>/dev/null
for f in "$LOGS"/tta_*.json; do
    [ -f "$f" ] && python3 -c "import json; d=json.load(open('$f'))['time_to_accuracy']; print('$f', {k: d[k] for k in ('time_to_95_s', 'best_val_acc1_300s', 'epochs_run', 'last_elapsed_s')})"
done | tee -a "$LOGS/summary.txt"
for run in runs/tta_*; do
    [ -d "$run" ] || continue
    mkdir -p "$LOGS/$(basename "$run")"
    cp "$run"/*.csv "$run"/*.txt "$run"/*.json "$run"/*.png "$run"/*.log "$LOGS/$(basename "$run")/" 2>/dev/null
done
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs
cp "$LOGS/summary.txt" "$OUT/summary.txt"
rm -rf "$LOGS"
cat "$OUT/summary.txt"
