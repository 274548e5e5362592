"""--compile auto, --cuda-graph auto and the compile cache: what is decided, from what,
and where compiled graphs are kept."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from utils import compile_cache
from utils.accel import COMPILE_SECONDS, compile_estimate, decide_compile, plan_speed
from utils.compile_cache import CacheState, cache_is_warm, prepare_compile_cache, resolve_cache_dir
from tests.test_train_test import source, split  # noqa: F401
from utils.distributed import DistEnv

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
REPO = Path(__file__).resolve().parents[1]


def request(**overrides) -> SimpleNamespace:
    values = dict(model="groupmamba_tiny", scan_backend="torch", compile="auto", cuda_graph="auto",
                  low_memory=False, grad_checkpointing=None, teacher=None, img_size=224, batch_size=64, workers=2)
    return SimpleNamespace(**{**values, **overrides})


def test_cuda_graphs_are_on_by_default_where_a_groupmamba_can_be_captured():
    assert plan_speed(request(), DistEnv(device=CUDA), grad_scaling=False).cuda_graph
    plan = plan_speed(request(), DistEnv(device=CPU), grad_scaling=False)
    assert not plan.cuda_graph and not any("cuda-graph" in note for note in plan.notes)  # quietly off
    assert not plan_speed(request(model="resnet18"), DistEnv(device=CUDA), grad_scaling=False).cuda_graph
    assert not plan_speed(request(), DistEnv(device=CUDA), grad_scaling=True).cuda_graph  # fp16's scaler
    plan = plan_speed(request(grad_checkpointing=True), DistEnv(device=CUDA), grad_scaling=False)
    assert plan.grad_checkpointing and not plan.cuda_graph  # what was asked wins over a default
    plan = plan_speed(request(cuda_graph="on"), DistEnv(device=CPU), grad_scaling=False)
    assert not plan.cuda_graph and "--cuda-graph is off: it needs a CUDA device" in plan.notes
    assert plan_speed(request(), DistEnv(device=CUDA), grad_scaling=False).compile is None  # decided later


@pytest.mark.parametrize("on_cuda, overrides, fused", [
    (True, {}, True),  # the default: a CUDA graph replays the kernels' launches
    (True, {"cuda_graph": "off"}, False),  # launched one by one they cost more host time
    (True, {"cuda_graph": "off", "low_memory": True}, True),  # asked for: memory first
    (True, {"model": "resnet18", "low_memory": True}, False),  # GroupMamba's kernels only
    (False, {"low_memory": True}, False),  # Triton kernels run on CUDA only
])
def test_fused_kernels_run_where_a_cuda_graph_replays_them_or_memory_is_asked_for(on_cuda, overrides, fused,
                                                                                    monkeypatch):
    import utils.accel
    env = DistEnv(device=CUDA if on_cuda else CPU)
    monkeypatch.setattr(utils.accel, "HAS_TRITON", True)
    plan = plan_speed(request(**overrides), env, grad_scaling=False)
    assert plan.fused_kernels is fused
    assert ("fused kernels" in plan.describe()) is fused
    monkeypatch.setattr(utils.accel, "HAS_TRITON", False)  # without Triton nothing to fuse with
    assert not plan_speed(request(**overrides), env, grad_scaling=False).fused_kernels


def test_compile_auto_compiles_runs_long_enough_to_win_back_the_compile_time():
    plan = plan_speed(request(), DistEnv(device=CUDA), grad_scaling=False)
    cold, warm = CacheState(Path("/c"), "cold"), CacheState(Path("/c"), "warm")
    long_run = decide_compile(plan, "groupmamba_tiny", CUDA, 224, 100 * 30_000, None, cold)
    assert long_run.compile and "--compile auto: on" in long_run.notes[-1] and "is empty" in long_run.notes[-1]
    short_run = decide_compile(plan, "groupmamba_tiny", CUDA, 224, 2 * 2_800, None, cold)
    assert short_run.compile is False and "--compile auto: off" in short_run.notes[-1]
    # the break-even point moves with the state of the cache
    eager_s, compiled_s, cost = compile_estimate(plan, "groupmamba_tiny", 224, 20_000, None, "warm")
    assert cost == COMPILE_SECONDS["warm"] < COMPILE_SECONDS["cold"]
    assert decide_compile(plan, "groupmamba_tiny", CUDA, 224, 20_000, None, warm).compile == (compiled_s < eager_s)
    # a time limit caps the run at what eager training finishes in it
    eager_s, compiled_s, _ = compile_estimate(plan, "groupmamba_tiny", 192, 10**9, 300.0, "cold")
    assert eager_s == pytest.approx(300.0)
    # --preset fast in 300 s with a cold cache: compiling would not pay for itself
    assert compiled_s > eager_s
    assert decide_compile(plan, "groupmamba_tiny", CUDA, 192, 10**9, 300.0, cold).compile is False
    assert decide_compile(plan, "groupmamba_tiny", CUDA, 192, 10**9, 300.0, warm).compile


def test_compile_auto_stays_off_where_there_is_nothing_to_estimate():
    plan = plan_speed(request(), DistEnv(device=CPU), grad_scaling=False)
    assert decide_compile(plan, "groupmamba_tiny", CPU, 224, 10**9, None, None) == \
        plan_speed(request(compile="off"), DistEnv(device=CPU), grad_scaling=False)  # quietly, no note
    plan = plan_speed(request(model="resnet18"), DistEnv(device=CUDA), grad_scaling=False)
    off = decide_compile(plan, "resnet18", CUDA, 224, 10**9, None, CacheState(Path("/c"), "cold"))
    assert off.compile is False and "--compile on compiles it" in off.notes[-1]
    for flag, expected in (("on", True), ("off", False)):  # what is asked is kept
        plan = plan_speed(request(compile=flag), DistEnv(device=CUDA), grad_scaling=False)
        assert decide_compile(plan, "groupmamba_tiny", CUDA, 224, 1.0, None, None).compile is expected


def test_the_compile_cache_folder_comes_from_the_flag_then_torch_then_the_user_cache(tmp_path):
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "torch"), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    assert resolve_cache_dir(str(tmp_path / "flag"), env) == tmp_path / "flag"
    assert resolve_cache_dir(None, env) == tmp_path / "torch"
    assert resolve_cache_dir(None, {"XDG_CACHE_HOME": str(tmp_path / "xdg")}) == \
        tmp_path / "xdg" / "groupmamba" / "torch-compile"
    assert resolve_cache_dir(None, {}) == Path("~/.cache/groupmamba/torch-compile").expanduser().resolve()


def test_prepare_compile_cache_sees_a_warm_folder_and_a_run_folder_s_artifacts(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere")
    folder = tmp_path / "cache"
    state = prepare_compile_cache(str(folder), None)
    assert state == CacheState(folder, "cold") and folder.is_dir()
    import os
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder)  # inductor reads it when it compiles
    (folder / "fxgraph" / "ab").mkdir(parents=True)
    assert cache_is_warm(folder) and prepare_compile_cache(str(folder), None).state == "warm"
    run = tmp_path / "run"
    run.mkdir()
    (run / compile_cache.ARTIFACTS_FILE).write_bytes(b"artifacts")
    loaded = []
    monkeypatch.setattr(compile_cache, "load_artifacts", lambda path: loaded.append(path) or True)
    state = prepare_compile_cache(str(folder), str(run / "last.pth"))
    assert state.state == "artifacts" and loaded == [run / compile_cache.ARTIFACTS_FILE]
    assert "filled from" in state.describe()


def test_a_read_only_cache_folder_is_named(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if not __import__("os").access(folder, __import__("os").W_OK):  # root ignores permissions
            with pytest.raises(PermissionError, match="--compile-cache"):
                compile_cache.use_cache_dir(folder)
    finally:
        folder.chmod(0o700)


ROUND_TRIP = """
import sys, torch
from pathlib import Path
from utils.compile_cache import keep_artifacts, prepare_compile_cache
state = prepare_compile_cache(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
device = "cuda" if torch.cuda.is_available() else "cpu"  # Triton's kernels on a GPU, C++ ones on the CPU
model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU()).to(device)
model.compile()
model(torch.randn(4, 8, device=device)).sum().backward()
print(state.state)
print(keep_artifacts(Path(sys.argv[3] if len(sys.argv) > 3 else "unused") / "compile_cache.bin"))
"""


@pytest.mark.slow
def test_artifacts_saved_by_one_run_fill_an_empty_cache_for_the_next(tmp_path):
    """The portable artifacts written after a compile load into a fresh cache folder (the
    run folder carried to another machine); on the GPU where there is one, else on the
    CPU's inductor backend."""
    run = tmp_path / "run"
    run.mkdir()

    def child(*args) -> list[str]:
        proc = subprocess.run([sys.executable, "-c", ROUND_TRIP, *map(str, args)], cwd=REPO, capture_output=True,
                              text=True, timeout=600, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.splitlines()

    first = child(tmp_path / "cache_a", "", run)
    assert first[0] == "cold" and "compile cache artifacts:" in first[1]
    assert (run / "compile_cache.bin").stat().st_size > 0
    second = child(tmp_path / "cache_b", run / "last.pth", tmp_path)
    assert second[0] == "artifacts"
    assert cache_is_warm(tmp_path / "cache_b")


GPU_RUN = ["--model", "groupmamba_tiny", "--img-size", "64", "--batch-size", "8", "--workers", "0",
           "--device", "cuda", "--stats", str(REPO / "tests" / "absent-stats.json"), "--max-train-batches", "4",
           "--max-val-batches", "2", "--check-images", "none"]


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_default_gpu_run_takes_the_fast_path_and_keeps_its_compile_cache(train_script, tmp_path, split,
                                                                              recwarn):
    """On a GPU a short run stays eager with CUDA graphs, with gradients of a sane size
    (a captured step that accumulated gradients off its stream once gave norms of 1e6);
    a compiled one leaves its portable cache artifacts, and a run resumed from its folder
    loads them."""
    cache = tmp_path / "cache"
    short = tmp_path / "short"
    train_script.main([str(a) for a in ["--data", split, "--epochs", "1", *GPU_RUN, "--output", short,
                                        "--compile-cache", cache]])
    log = (short / "train.log").read_text()
    assert "--compile auto: off" in log and "CUDA graphs" in log
    with open(short / "metrics.csv", newline="") as fh:
        assert 0.0 < float(next(csv.DictReader(fh))["grad_norm"]) < 100.0
    assert not [w for w in recwarn if "AccumulateGrad" in str(w.message)]
    compiled = tmp_path / "compiled"
    train_script.main([str(a) for a in ["--data", split, "--epochs", "1", *GPU_RUN, "--output", compiled,
                                        "--compile", "--compile-cache", cache]])
    assert (compiled / "compile_cache.bin").stat().st_size > 0 and cache_is_warm(cache)
    train_script.main([str(a) for a in ["--data", split, "--epochs", "2", *GPU_RUN, "--resume", compiled,
                                        "--compile", "--compile-cache", tmp_path / "fresh"]])
    assert "filled from" in (compiled / "train.log").read_text()
