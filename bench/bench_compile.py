"""What compiling costs: the first training and validation steps of a compiled model,
with an empty compile cache, a warm one, and one filled from portable cache artifacts.

    python bench/bench_compile.py                       # groupmamba_tiny, 224 px, batch 128
    python bench/bench_compile.py --json bench/results/h100.json

Each phase runs in a fresh process, as a new training run would, with its own
``TORCHINDUCTOR_CACHE_DIR`` (inductor keeps its FX-graph, AOTAutograd and Triton caches
there):

- ``cold``: an empty cache folder (a new machine);
- ``warm``: the folder the cold phase filled (the next run on the same machine);
- ``artifacts``: an empty folder filled first from ``torch.compiler.save_cache_artifacts()``
  of the cold phase (the cache carried to another machine of the same kind).

A phase compiles the model's blocks the way train.py does (``utils.accel.compile_regions``),
then times its first three training steps (bf16 autocast forward, backward, fused AdamW)
and its first validation forward (eval mode, no grad, same batch). The first step's excess
over a steady one is the compile cost; torch's own timers split it by phase.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PHASES = ("cold", "warm", "artifacts")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="groupmamba_tiny")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--num-classes", type=int, default=12)
    parser.add_argument("--json", help="add the compile figures to this results file")
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)  # one phase, in a child process
    parser.add_argument("--artifacts", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_phase(args) -> dict:
    """One phase in this process: compile, time the first steps, report."""
    import torch
    import models
    from bench_model import first_call_seconds as timed  # wall time of one call, synchronised
    from utils.accel import SpeedPlan, compile_regions, compile_seconds
    if args.phase == "artifacts":
        torch.compiler.load_cache_artifacts(Path(args.artifacts).read_bytes())
    plan = SpeedPlan(scan_backend="grid", compile=True, cuda_graph=False, low_memory=False)
    model = models.create_model(args.model, num_classes=args.num_classes, scan_backend="grid").cuda()
    compile_regions([model], plan)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device="cuda")
    labels = torch.randint(0, args.num_classes, (args.batch,), device="cuda")

    def train_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(images)
            loss = torch.nn.functional.cross_entropy((out if isinstance(out, torch.Tensor) else out[0]).float(),
                                                     labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def val_step():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(images)

    train_s = [timed(train_step) for _ in range(3)]
    model.eval()
    val_s = [timed(val_step) for _ in range(2)]
    row = {"phase": args.phase, "first_train_step_s": round(train_s[0], 2), "steady_train_step_s": round(train_s[-1], 3),
           "first_val_step_s": round(val_s[0], 2), "steady_val_step_s": round(val_s[-1], 3),
           "compile_s": round(train_s[0] - train_s[-1] + val_s[0] - val_s[-1], 1),
           "torch_timers": {k: round(v, 1) for k, v in compile_seconds().items()}}
    if args.phase == "cold" and args.artifacts:
        artifacts = torch.compiler.save_cache_artifacts()
        if artifacts:
            Path(args.artifacts).write_bytes(artifacts[0])
            row["artifacts_mb"] = round(len(artifacts[0]) / 1e6, 1)
    return row


def run_child(args, phase: str, cache_dir: Path, artifacts: Path) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir)}
    env.pop("TRITON_CACHE_DIR", None)  # inductor then keeps Triton's cache inside its own
    cmd = [sys.executable, __file__, "--phase", phase, "--artifacts", str(artifacts), "--model", args.model,
           "--img-size", str(args.img_size), "--batch", str(args.batch), "--num-classes", str(args.num_classes)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: the {phase} phase failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.phase:
        print(json.dumps(run_phase(args)))
        return []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        artifacts = tmp / "artifacts.bin"
        rows = [run_child(args, "cold", tmp / "cache", artifacts),
                run_child(args, "warm", tmp / "cache", artifacts),
                run_child(args, "artifacts", tmp / "fresh_cache", artifacts)]
    for row in rows:
        print(json.dumps(row))
    if args.json:
        from utils.images import update_json
        tag = f"{args.model.removeprefix('groupmamba_')}_{args.img_size}_bs{args.batch}"
        update_json(args.json, {f"compile_s_{row['phase']}_{tag}": row["compile_s"] for row in rows}
                    | {f"compile_rows_{tag}": rows})
    return rows


if __name__ == "__main__":
    main()
