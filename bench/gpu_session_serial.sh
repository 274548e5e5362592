#!/usr/bin/env bash
# Benchmark variants one after another on one GPU with nothing beside them, in one
# device call (issue 5): comparisons of GPU time need the GPU to themselves.
#   TESTS="<pytest args>"                        GPU tests, first (a broken kernel shows early)
#   BENCH_1="<name> <bench_model.py flags>"      then BENCH_1, BENCH_2, ... in order
#   TTA="<name> [train.py flags]"                last: bench/time_to_accuracy.py (warm when
#                                                 an earlier call on this machine compiled it)
# Each BENCH writes bench_<name>.{json,log} and kernels_<name>.json (every kernel of
# the profiled steps); with DWCONV_SWEEP=1 bench/bench_dwconv.py sweeps the fused conv
# kernels' launch settings first and every BENCH with --fused-kernels gets its
# best_config; with GRID_SWEEP=1 bench/bench_grid_scan.py sweeps the grid scan's
# and every BENCH gets its best_config. Logs go to runs/serial and are packed into $OUT/all.tgz after each
# step (the device returns at most 8 files). The scan extension is built as a wheel,
# returned as $OUT/groupmamba_scan_cuda-*.whl with scan_ext.hash; carried back in
# .whl/ (with the hash of the current sources) it is installed instead of rebuilt.
# Inductor's cache is runs/inductor_cache, so a second call on the same (still
# warm) machine compiles from it. Steps that would start after END_S seconds are
# skipped, a running one is stopped at END_S.
#   TESTS="tests/test_scan_gpu.py" BENCH_1="tiny --models groupmamba_tiny --backends cuda \
#   --modes compile-blocks+cuda-graph --extra-train" OUT=gpu_logs bash bench/gpu_session_serial.sh
set -uo pipefail
OUT=${OUT:-gpu_logs}
END_S=${END_S:-570}
W=runs/serial
rm -rf "$W"; mkdir -p "$OUT" "$W"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=$PWD/runs/inductor_cache
log() { echo "$(date +%T) [${SECONDS}s] $*" | tee -a "$W/session.log"; }
left() { echo $((END_S - SECONDS)); }
pack() { tar -czf "$OUT/.all.tgz" -C "$W" . && mv "$OUT/.all.tgz" "$OUT/all.tgz"; }

nvidia-smi -L | tee -a "$W/session.log"
# per-file hashes sorted in the C locale: the same on every machine whatever its glob order
sources_hash=$(cd kernels/selective_scan && sha1sum csrc/* setup.py | LC_ALL=C sort | sha1sum | cut -c1-16)
if [ "$(cat runs/scan_ext.hash 2>/dev/null)" != "$sources_hash" ]; then
    if [ "$(cat .whl/scan_ext.hash 2>/dev/null)" = "$sources_hash" ]; then
        python3 -m pip install --no-deps --force-reinstall .whl/groupmamba_scan_cuda-*.whl >"$W/build.log" 2>&1
    else
        rm -rf runs/whl
        python3 -m pip wheel --no-build-isolation --no-deps -w runs/whl ./kernels/selective_scan >"$W/build.log" 2>&1 \
            && python3 -m pip install --no-deps --force-reinstall runs/whl/*.whl >>"$W/build.log" 2>&1 \
            && cp runs/whl/*.whl "$OUT/" && echo "$sources_hash" >"$OUT/scan_ext.hash"
    fi
    [ $? = 0 ] && echo "$sources_hash" >runs/scan_ext.hash
    log "scan extension: $(tail -1 "$W/build.log")"
fi

if [ -n "${TESTS:-}" ]; then
    GROUPMAMBA_REFERENCE_DIR=$PWD/.carry/reference timeout "$(left)" \
        python3 -m pytest -q -rfE $TESTS >"$W/tests.log" 2>&1
    log "tests exit $?: $(tail -1 "$W/tests.log")"
    grep -E "^(FAILED|ERROR)" "$W/tests.log" | cut -c1-300 | tee -a "$W/session.log"
    pack
fi

# sweep <name> <flag>: bench/bench_<name>.py sweeps launch settings; swept_flags is then
# "<flag> KEY=VALUE ..." of its best_config (empty if it failed)
sweep() {
    timeout "$(left)" python3 "bench/bench_$1.py" --json "$W/bench_$1.json" >"$W/bench_$1.log" 2>&1
    log "$1 sweep exit $?: $(grep best_config "$W/bench_$1.log")"
    swept_flags=$(python3 -c "import json; c = json.load(open('$W/bench_$1.json'))['best_config']; \
print('$2', *(f'{k}={v}' for k, v in c.items()))" 2>/dev/null)
    pack
}
dwconv_flags=""
if [ "${DWCONV_SWEEP:-0}" = 1 ]; then sweep dwconv --dwconv-config; dwconv_flags=$swept_flags; fi
grid_flags=""
if [ "${GRID_SWEEP:-0}" = 1 ]; then sweep grid_scan --grid-scan-config; grid_flags=$swept_flags; fi

for index in 1 2 3 4 5 6 7 8 9; do
    spec_var="BENCH_$index"; spec=${!spec_var:-}
    [ -n "$spec" ] || continue
    read -r name flags <<<"$spec"
    if [ "$(left)" -lt 60 ]; then log "skip bench $name: $(left) s left"; continue; fi
    case " $flags " in *" --fused-kernels "*) flags="$flags $dwconv_flags" ;; esac
    flags="$flags $grid_flags"
    log "bench $name: $flags"
    timeout "$(left)" python3 bench/bench_model.py $flags --json "$W/bench_$name.json" \
        --kernels-json "$W/kernels_$name.json" >"$W/bench_$name.log" 2>&1
    log "bench $name exit $?: $(tail -1 "$W/bench_$name.log")"
    pack
done

if [ -n "${TTA:-}" ]; then
    read -r name flags <<<"$TTA"
    [ -d data/train ] || { python3 mean_std.py --no-progress && python3 makedata.py --no-progress; } \
        >"$W/data.log" 2>&1
    log "time to accuracy $name: $flags"
    ( while sleep 20; do cp "runs/tta_$name/metrics.csv" "$W/tta_${name}_metrics.csv" 2>/dev/null; pack; done ) &
    packer=$!
    timeout "$(left)" python3 bench/time_to_accuracy.py --output "runs/tta_$name" --force \
        --budget "${BUDGET:-300}" --json "$W/tta_$name.json" -- $flags >"$W/tta_$name.log" 2>&1
    log "time to accuracy $name exit $?"
    kill $packer 2>/dev/null
    cp "runs/tta_$name/metrics.csv" "$W/tta_${name}_metrics.csv" 2>/dev/null
    cp "runs/tta_$name/train.log" "$W/tta_${name}_train.log" 2>/dev/null
fi
log "done"
pack
