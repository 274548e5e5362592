#!/usr/bin/env bash
# Everything the GPU needs to show, in one call on a 2-GPU machine (kind nvidia-h200-x2):
# build the CUDA scan, GPU tests, a 2-epoch DDP run (torchrun) and a DataParallel run
# on the plant-seedlings split, test.py on val, and the model throughput benchmark.
#   OUT=gpu_logs GROUPMAMBA_REFERENCE_DIR=../shared/reference bash bench/gpu_session.sh
set -uo pipefail
OUT=${OUT:-gpu_logs}
LOGS="$OUT/logs"
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
step() { echo "== $(date +%T) $*" | tee -a "$LOGS/summary.txt"; }

nvidia-smi >"$LOGS/nvidia-smi.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpus', torch.cuda.device_count())" | tee -a "$LOGS/summary.txt"

step "build the CUDA extension (background)"
python3 -m pip install --no-build-isolation ./kernels/selective_scan >"$LOGS/build.log" 2>&1 &
build_pid=$!

step "mean_std + makedata"
python3 mean_std.py --no-progress >"$LOGS/mean_std.log" 2>&1
python3 makedata.py --no-progress --force >"$LOGS/makedata.log" 2>&1
tail -3 "$LOGS/mean_std.log" >>"$LOGS/summary.txt"

step "DDP: torchrun, 2 GPUs, 2 epochs, triton scan"
torchrun --standalone --nproc_per_node=2 train.py --epochs 2 --batch-size 64 --workers 8 \
    --scan-backend triton --output runs/ddp >"$LOGS/ddp.log" 2>&1
echo "ddp exit $?" | tee -a "$LOGS/summary.txt"
tail -4 runs/ddp/metrics.csv >>"$LOGS/summary.txt" 2>/dev/null

wait $build_pid; echo "build exit $?" | tee -a "$LOGS/summary.txt"
tail -2 "$LOGS/build.log" >>"$LOGS/summary.txt"

step "DataParallel: 2 GPUs, 1 epoch, cuda scan"
python3 train.py --epochs 1 --batch-size 128 --workers 8 --scan-backend cuda --output runs/dp \
    >"$LOGS/dp.log" 2>&1
echo "dp exit $?" | tee -a "$LOGS/summary.txt"
tail -2 runs/dp/metrics.csv >>"$LOGS/summary.txt" 2>/dev/null

step "test.py on val with the DDP checkpoint"
python3 test.py --checkpoint runs/ddp/best.pth --images data/val --output runs/ddp/val_predictions.csv \
    >"$LOGS/test_py.log" 2>&1
echo "test.py exit $?" | tee -a "$LOGS/summary.txt"
tail -3 "$LOGS/test_py.log" >>"$LOGS/summary.txt"

step "GPU tests"
CUDA_VISIBLE_DEVICES=0 python3 -m pytest -q -p no:cacheprovider tests/test_models_gpu.py tests/test_scan_gpu.py \
    tests/test_scan_ops.py -rs >"$LOGS/gpu_tests.log" 2>&1
echo "gpu tests exit $?" | tee -a "$LOGS/summary.txt"
tail -3 "$LOGS/gpu_tests.log" >>"$LOGS/summary.txt"

step "model benchmark"
CUDA_VISIBLE_DEVICES=0 python3 bench/bench_model.py --backends cuda triton torch \
    --json "$OUT/bench_model_h200.json" >"$LOGS/bench_model.log" 2>&1
echo "bench exit $?" | tee -a "$LOGS/summary.txt"
tail -5 "$LOGS/bench_model.log" >>"$LOGS/summary.txt"

for run in ddp dp; do
    mkdir -p "$LOGS/$run"
    cp runs/$run/*.csv runs/$run/*.txt runs/$run/*.json runs/$run/*.png runs/$run/*.log "$LOGS/$run/" 2>/dev/null
done
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs
cp "$LOGS/summary.txt" "$OUT/summary.txt"
rm -rf "$LOGS"
cat "$OUT/summary.txt"
