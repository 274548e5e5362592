#!/usr/bin/env bash
# The checks to run on a machine with a CUDA GPU, one after another so that timings
# have the GPU to themselves:
#   1. the GPU tests (they skip themselves on a CPU-only machine);
#   2. bench/bench_model.py on the default fast path (--compile --cuda-graph, the fused
#      kernels on), which updates bench/results/<gpu>.json with the headline keys
#      (train_img_s_tiny_224_bs128, ...), then the same training rows with --unfused (the
#      baseline of the fused kernels, in the same call) into $OUT/bench_model_unfused.json;
#   3. bench/bench_fused_norm.py (the fused LayerNorm kernels against the unfused ops, with
#      their bandwidth), into $OUT/bench_fused_norm.json.
# Logs and the kernel table go to $OUT. Run from the repository root:
#   bash bench/gpu_checks.sh
#   OUT=gpu_logs TESTS="tests/test_grid_scan.py" BENCH="--models groupmamba_small" bash bench/gpu_checks.sh
# Settings (environment, defaults in brackets): OUT [gpu_logs]; TESTS [the GPU test
# files]; BENCH [extra bench_model.py flags]; JSON [bench/results/<gpu kind>.json];
# GROUPMAMBA_REFERENCE_DIR [../shared/reference: the official outputs the model tests
# compare against]. The exit code is that of the tests, else of the benchmark.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_logs}
TESTS=${TESTS:-tests/test_scan_gpu.py tests/test_grid_scan.py tests/test_models_gpu.py tests/test_depthwise_conv.py tests/test_fused_norm.py tests/test_cuda_graphs.py tests/test_scan_ops.py tests/test_triton_compile.py tests/test_distributed.py::test_gradients_have_their_parameters_layout_on_cuda tests/test_distributed.py::test_the_fast_path_under_torchrun_on_two_gpus tests/test_compile_plan.py}
BENCH=${BENCH:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
gpu=$(python3 -c "import torch; n = torch.cuda.get_device_name(); print(next((k for k in ('h200', 'h100', 'a100') if k in n.lower()), 'gpu'))") || exit 1
JSON=${JSON:-bench/results/$gpu.json}
{ nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } | tee "$OUT/machine.txt"

# -m "": the slow tests too (pytest.ini leaves them to a second pass)
# shellcheck disable=SC2086
python3 -m pytest -q -rfEs -m "" $TESTS 2>&1 | tee "$OUT/gpu_tests.log"
tests=${PIPESTATUS[0]}

# shellcheck disable=SC2086
python3 bench/bench_model.py --compile --cuda-graph --json "$JSON" --kernels-json "$OUT/kernels.json" $BENCH \
    2>&1 | tee "$OUT/bench_model.log"
bench=${PIPESTATUS[0]}
cp "$JSON" "$OUT/" 2>/dev/null
# shellcheck disable=SC2086
python3 bench/bench_model.py --compile --cuda-graph --train-only --unfused --json "$OUT/bench_model_unfused.json" \
    --kernels-json "$OUT/kernels_unfused.json" $BENCH 2>&1 | tee "$OUT/bench_model_unfused.log"
python3 bench/bench_fused_norm.py --json "$OUT/bench_fused_norm.json" 2>&1 | tee "$OUT/bench_fused_norm.log"
[ "$tests" -ne 0 ] && exit "$tests"
exit "$bench"
