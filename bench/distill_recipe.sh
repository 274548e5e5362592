#!/usr/bin/env bash
# Distillation recipe: does DeiT-style hard distillation from a trained CNN
# teacher help groupmamba_tiny on the plant seedlings? A few minutes on two H200s,
# with the images decoded once and kept on the GPU (--gpu-data):
#   (a) the seed-42 split of data1 (makedata.py) and its mean/std (mean_std.py)
#   (b) a teacher: timm resnet18 from scratch
#   (c) groupmamba_tiny without distillation (both heads learn the labels)
#   (d) groupmamba_tiny with --teacher <(b)'s best.pth> --distillation-type hard,
#       the same epochs, seed and settings as (c)
# then a table of val ACC1 (best and last epoch) for the three runs. With two GPUs
# visible, (c) runs on GPU_B while (b) and then (d) run on GPU_A.
#
#   bash bench/distill_recipe.sh                     # logs in ./distill_logs
#   OUT=/tmp/x EPOCHS=20 bash bench/distill_recipe.sh
#
# Settings (environment, defaults in brackets): OUT [./distill_logs], RUNS [runs/distill:
# split, stats and run folders], EPOCHS [40, each student], TEACHER_EPOCHS [80],
# TEACHER_MODEL [resnet18], IMG [128], BATCH [128], LR [1e-3], TEACHER_LR [LR],
# WARMUP [2 epochs], EMA_DECAY [0: off, so best/last are plain epochs], WORKERS [12],
# GPU_DATA [auto: images decoded once and kept on the GPU], GPU_A [0], GPU_B [1],
# SEED [42], STEP_TIMEOUT [300 s per training run, a guard against hangs], EXTRA [more
# train.py flags for every run, e.g. a CPU smoke test:
# EXTRA="--device cpu --max-train-batches 1 --max-val-batches 1" EPOCHS=1 TEACHER_EPOCHS=1].
# Nothing waits for input and existing run folders are replaced (--force).
# $OUT gets, as the runs go: summary.txt (the steps and the table, rewritten after each
# run), summary.json, prep.log, teacher.log, baseline.log, distilled.log (console logs),
# and at the end runs.tar.gz (metrics.csv, args.json, report.txt, curves.png of each run):
# 7 files, so a cut-off run still returns its finished part.
set -uo pipefail
OUT=${OUT:-./distill_logs}
RUNS=${RUNS:-runs/distill}
EPOCHS=${EPOCHS:-40}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-80}
TEACHER_MODEL=${TEACHER_MODEL:-resnet18}
IMG=${IMG:-128}
BATCH=${BATCH:-128}
LR=${LR:-1e-3}
TEACHER_LR=${TEACHER_LR:-$LR}
WARMUP=${WARMUP:-2}
EMA_DECAY=${EMA_DECAY:-0}
WORKERS=${WORKERS:-12}
GPU_DATA=${GPU_DATA:-auto}
GPU_A=${GPU_A:-0}
GPU_B=${GPU_B:-1}
SEED=${SEED:-42}
STEP_TIMEOUT=${STEP_TIMEOUT:-300}
EXTRA=${EXTRA:-}
mkdir -p "$OUT" "$RUNS"
export PYTHONUNBUFFERED=1
START=$(date +%s)
: >"$OUT/steps.txt"
step() { echo "== $(date +%T) (+$(( $(date +%s) - START )) s) $*" | tee -a "$OUT/steps.txt"; }

summary() {  # the table of whatever has finished so far -> summary.txt, summary.json
    python3 - "$RUNS" "$OUT" <<'EOF'
import csv, json, sys
from pathlib import Path
runs, out = Path(sys.argv[1]), Path(sys.argv[2])
rows, lines = {}, []
num = lambda v: float(v) if v not in (None, "") else None
for name in ("teacher", "baseline", "distilled"):
    path = runs / name / "metrics.csv"
    if not path.exists():
        lines.append(f"| {name} | (not run) | | | | |")
        continue
    hist = list(csv.DictReader(open(path)))
    last, args = hist[-1], json.loads((runs / name / "args.json").read_text())
    teacher = (args.get("run") or {}).get("teacher") or {}
    r = rows[name] = {
        "model": args["model"], "distillation": args.get("distillation_type", "none"),
        "epochs_done": int(last["epoch"]), "epochs": args["epochs"],
        "best_val_acc1": num(last["best_acc1"]), "best_epoch": int(last["best_epoch"]),
        "best_source": last["best_source"], "last_val_acc1": num(last["val_acc1"]),
        "last_ema_val_acc1": num(last["ema_val_acc1"]),
        "train_img_s_last_epoch": num(last["train_img_s"]),
        "epochs_time_s": sum(num(h["epoch_time_s"]) for h in hist),
        "teacher_val_acc1": teacher.get("val_acc1"), "args": args}
    ema = f" (EMA {r['last_ema_val_acc1']:.2f})" if r["last_ema_val_acc1"] is not None else ""
    kd = r["distillation"] + (f", teacher val {r['teacher_val_acc1']:.2f} %"
                              if r["teacher_val_acc1"] is not None else "")
    lines.append(f"| {name} | {r['model']} | {kd} | {r['epochs_done']}/{r['epochs']} | "
                 f"{r['best_val_acc1']:.2f} (epoch {r['best_epoch']}) | "
                 f"{r['last_val_acc1']:.2f}{ema} | {r['epochs_time_s']:.0f} s, "
                 f"{r['train_img_s_last_epoch']:.0f} img/s |")
text = "\n".join(["| run | model | distillation | epochs | val ACC1 % best | val ACC1 % last epoch "
                  "| time in epochs, train speed |", "|---|---|---|---|---|---|---|", *lines])
(out / "summary.json").write_text(json.dumps(rows, indent=2))
steps = (out / "steps.txt").read_text() if (out / "steps.txt").exists() else ""
(out / "summary.txt").write_text(steps + "\n" + text + "\n")
print(text)
EOF
}

{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee -a "$OUT/steps.txt"

step "(a) makedata (seed 42) + mean_std on data1"
{ python3 makedata.py --src data1 --dst "$RUNS/data" --seed 42 --force --no-progress </dev/null &&
  python3 mean_std.py --root data1 --out "$RUNS/stats.json" --force --no-progress </dev/null
} >"$OUT/prep.log" 2>&1 || { echo "data preparation failed:"; tail -n 5 "$OUT/prep.log"; exit 1; }

# makedata.py has checked every image: no second full decode in each run
COMMON=(--data "$RUNS/data" --stats "$RUNS/stats.json" --img-size "$IMG" --batch-size "$BATCH"
        --warmup-epochs "$WARMUP" --ema-decay "$EMA_DECAY" --workers "$WORKERS" --seed "$SEED"
        --check-images none --scan-backend auto --gpu-data "$GPU_DATA" --force)

train() {  # name, then train.py flags
    local name=$1; shift
    step "$name: train.py $* (+ common flags: ${COMMON[*]} $EXTRA)"
    timeout --signal=INT --kill-after=30 "$STEP_TIMEOUT" \
        python3 train.py "${COMMON[@]}" --output "$RUNS/$name" "$@" $EXTRA \
        </dev/null >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc" | tee -a "$OUT/steps.txt"
    [ $rc -eq 0 ] || tail -n 5 "$OUT/$name.log" | tee -a "$OUT/steps.txt"
    summary >/dev/null
    return $rc
}

flags_baseline=(--model groupmamba_tiny --epochs "$EPOCHS" --lr "$LR")
distilled() {
    if [ -f "$RUNS/teacher/best.pth" ]; then
        train distilled "${flags_baseline[@]}" --teacher "$RUNS/teacher/best.pth" --distillation-type hard
    else
        echo "no teacher checkpoint: the distilled student is not run" | tee -a "$OUT/steps.txt"
    fi
}
if [ "$(nvidia-smi -L 2>/dev/null | wc -l)" -ge 2 ]; then
    # two GPUs: the baseline (no teacher needed) beside the teacher and then the
    # distilled student; same settings and seed for both students
    CUDA_VISIBLE_DEVICES=$GPU_B train baseline "${flags_baseline[@]}" &
    export CUDA_VISIBLE_DEVICES=$GPU_A
    train teacher --model "$TEACHER_MODEL" --epochs "$TEACHER_EPOCHS" --lr "$TEACHER_LR"
    distilled
    wait
    summary >/dev/null
else
    train teacher --model "$TEACHER_MODEL" --epochs "$TEACHER_EPOCHS" --lr "$TEACHER_LR"
    train baseline "${flags_baseline[@]}"
    distilled
fi

step "done"
summary
tar -czf "$OUT/runs.tar.gz" -C "$RUNS" \
    $(cd "$RUNS" && ls -d {teacher,baseline,distilled}/{metrics.csv,args.json,report.txt,curves.png} 2>/dev/null)
rm -f "$OUT/steps.txt"  # its lines are at the top of summary.txt
