"""Time to accuracy on plant seedlings: how soon a from-scratch run reaches a val ACC1.

    python bench/time_to_accuracy.py                       # train.py --preset fast, then read it
    python bench/time_to_accuracy.py --cold --seed 1       # an empty compile cache, another seed
    python bench/time_to_accuracy.py --from-run runs/a runs/b runs/c   # read finished runs (seeds)
    python bench/time_to_accuracy.py -- --img-size 128     # extra train.py flags after --

It runs ``train.py --preset fast --time-limit <budget> --fit-time-limit`` (the
learning-rate schedule shortened to the epochs that fit into the budget; compiling and CUDA
graphs as train.py decides by default) on the split in ``--data`` (``makedata.py``'s
default: seed 42), then reads the run's ``metrics.csv``:

- ``time_to_95_s``: ``elapsed_s`` (wall seconds since the first training step,
  compiling, validation and checkpoint writes included; image decoding before the
  first step excluded) of the first epoch whose val ACC1 (raw or EMA weights) is at
  least ``--target`` percent; null when never reached;
- ``best_val_acc1_300s``: the best val ACC1 (a fraction, 0 to 1) among the epochs that
  finished within ``--budget`` seconds;
- ``first_epoch_overhead_s``: the first epoch's time over the median of the next ones
  (compiling, CUDA-graph capture and warm-up).

Several runs (``--from-run`` with several folders, e.g. one per seed) are summarised by
their mean and range. With ``--json`` these keys (and the runs' details) are merged into
that file, e.g. ``bench/results/h100.json`` next to ``bench/bench_model.py``'s keys.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from utils.images import update_json


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from-run", type=Path, nargs="+", default=None,
                        help="read these finished runs instead of training")
    parser.add_argument("--output", type=Path, default=Path("runs/time_to_accuracy"),
                        help="run folder for the training (must not exist unless --force)")
    parser.add_argument("--force", action="store_true", help="passed on to train.py")
    parser.add_argument("--data", default="data", help="split made by makedata.py")
    parser.add_argument("--target", type=float, default=95.0, help="val ACC1 to reach (%%)")
    parser.add_argument("--budget", type=float, default=300.0,
                        help="seconds: the time limit of the run and of best_val_acc1")
    parser.add_argument("--seed", type=int, default=None, help="passed on to train.py")
    parser.add_argument("--cold", action="store_true",
                        help="train with an empty compile cache (a new folder), as on a fresh machine")
    parser.add_argument("--json", type=Path, default=None, help="merge the figures into this file")
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    return parser.parse_args(argv), extra


def read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.csv"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found (is {run} a train.py run folder?)")
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "elapsed_s" not in rows[0]:
        raise SystemExit(f"error: {path} has no elapsed_s column (written by an older train.py?)")
    return rows


def epoch_acc1(row: dict) -> float:
    """The better of the raw and EMA weights' val ACC1 (percent), as best.pth keeps."""
    values = [float(row[key]) for key in ("val_acc1", "ema_val_acc1") if row.get(key) not in (None, "")]
    return max(values)


def first_epoch_overhead(rows: list[dict]) -> float | None:
    times = [float(row["epoch_time_s"]) for row in rows]
    return round(times[0] - statistics.median(times[1:6]), 1) if len(times) > 1 else None


def summarise(rows: list[dict], target: float, budget: float) -> dict:
    reached = next((row for row in rows if epoch_acc1(row) >= target), None)
    in_budget = [row for row in rows if float(row["elapsed_s"]) <= budget]
    best = max(in_budget, key=epoch_acc1) if in_budget else None
    return {
        time_key(target): round(float(reached["elapsed_s"]), 1) if reached else None,
        "epoch_reached_target": int(reached["epoch"]) if reached else None,
        best_key(budget): round(epoch_acc1(best) / 100, 4) if best else None,
        "epoch_of_best_within_budget": int(best["epoch"]) if best else None,
        "first_epoch_overhead_s": first_epoch_overhead(rows),
        "epochs_run": len(rows), "last_elapsed_s": round(float(rows[-1]["elapsed_s"]), 1),
    }


def time_key(target: float) -> str:
    return "time_to_95_s" if target == 95.0 else f"time_to_{target:g}_s"


def best_key(budget: float) -> str:
    return "best_val_acc1_300s" if budget == 300.0 else f"best_val_acc1_{budget:g}s"


def spread(values: list) -> dict:
    """Mean and range of the runs' values (None: a run that never got there)."""
    known = [v for v in values if v is not None]
    out = {"values": values, "runs_without": len(values) - len(known)}
    if known:
        out.update(mean=round(statistics.mean(known), 4), min=min(known), max=max(known))
    return out


def train(args, extra: list[str]) -> None:
    command = [sys.executable, str(ROOT / "train.py"), "--preset", "fast", "--data", args.data,
               "--time-limit", str(args.budget), "--fit-time-limit", "--output", str(args.output)]
    command += ["--force"] if args.force else []
    command += ["--seed", str(args.seed)] if args.seed is not None else []
    # --cold: a new, empty compile cache, removed afterwards (a few hundred MB)
    with tempfile.TemporaryDirectory(prefix="compile_cache_") as empty_cache:
        command += ["--compile-cache", empty_cache] if args.cold else []
        print("running:", " ".join(command + extra), flush=True)
        subprocess.run(command + extra, check=True)


def describe_run(run: Path, summary: dict) -> dict:
    run_args = json.loads((run / "args.json").read_text()) if (run / "args.json").is_file() else {}
    return {**summary, "run": str(run), "seed": run_args.get("seed"),
            "command": run_args.get("run", {}).get("command"), "device": run_args.get("run", {}).get("device")}


def main(argv=None) -> dict:
    args, extra = parse_args(argv)
    runs = args.from_run
    if runs is None:
        train(args, extra)
        runs = [args.output]
    summaries = [describe_run(run, summarise(read_metrics(run), args.target, args.budget)) for run in runs]
    keys = (time_key(args.target), best_key(args.budget), "first_epoch_overhead_s")
    figures = {key: summaries[0][key] if len(summaries) == 1 else spread([s[key] for s in summaries])
               for key in keys}
    result = {"time_to_accuracy": {"runs": summaries, **figures, "target_acc1": args.target,
                                   "budget_s": args.budget,
                                   "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}}
    result.update({k: v for k, v in figures.items() if k != "first_epoch_overhead_s"})
    print(json.dumps(result, indent=2))
    if args.json:
        update_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
