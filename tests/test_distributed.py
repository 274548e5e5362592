"""DistributedDataParallel on the fast path, on the CPU with Gloo (GPU variants skip
without CUDA).

- Gradients in their parameters' layouts: the depth-wise convs' weight gradients come
  back channels-last, and DDP compares every gradient's strides with its bucket view's
  (the parameter's), warning once per process ("Grad strides do not match bucket view
  strides") when they differ. Checked on every parameter, and in one DDP step here.
- --resume with another number of steps per epoch continues the schedule by epochs.
- utils.distributed.failures_named: how a failing rank names itself.
- torchrun end to end (slow): two "machines" on 127.0.0.1 in step, a failing rank that
  ends the run with last.pth intact, resuming with 2 -> 1 -> 2 processes, and on two GPUs
  the compiled, GPU-resident path.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import models
from small_classifier import SMALL_KWARGS
from test_train_test import REPO, TINY, read_csv, small_split
from utils.datasets import load_train_val
from utils.distributed import DistEnv, failures_named
from utils.gpu_data import decode_images

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def small_groupmamba(device: str = "cpu", **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return models.create_model("groupmamba_tiny", **SMALL_KWARGS, **kwargs).to(device)


def train_step(model: torch.nn.Module, device: str = "cpu") -> None:
    images = torch.randn(2, 3, 32, 32, device=device)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        outputs = model(images)
    sum(o.float().square().mean() for o in outputs).backward()


def layout_mismatches(model: torch.nn.Module) -> list[str]:
    """Parameters whose gradient's strides differ from their own (what DDP warns about)."""
    return [f"{name}: {tuple(p.stride())}, gradient {tuple(p.grad.stride())}"
            for name, p in model.named_parameters() if p.grad is not None and p.grad.stride() != p.stride()]


@pytest.mark.parametrize("batch_groups, checkpointing", [(True, False), (False, False), (True, True)])
def test_gradients_have_their_parameters_layout(batch_groups, checkpointing):
    model = small_groupmamba().train()
    for layer in model.modules():
        if hasattr(layer, "batch_groups"):
            layer.batch_groups = batch_groups
    model.set_grad_checkpointing(checkpointing)
    train_step(model)
    assert not layout_mismatches(model)
    depthwise = [p for n, p in model.named_parameters() if n.endswith(("conv2d.weight", "dwconv.dwconv.weight"))]
    assert depthwise and all(p.is_contiguous(memory_format=torch.channels_last) for p in depthwise)


def test_layout_survives_conversions_copies_and_loading():
    model = small_groupmamba()
    loaded = small_groupmamba().double().float()
    loaded.load_state_dict(model.state_dict())
    for other in (loaded, copy.deepcopy(model)):
        assert [p.stride() for p in other.parameters()] == [p.stride() for p in model.parameters()]


def test_ddp_step_does_not_warn_about_gradient_strides(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(small_groupmamba().train())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train_step(ddp)
    finally:
        dist.destroy_process_group()
    assert not [str(w.message) for w in caught if "strides" in str(w.message)]
    assert not layout_mismatches(ddp.module)


@needs_cuda
@pytest.mark.parametrize("fused_kernels, compiled", [(False, False), (True, False), (False, True), (True, True)])
def test_gradients_have_their_parameters_layout_on_cuda(fused_kernels, compiled):
    """The cuDNN convs, the fused kernels and compiled blocks (GPU)."""
    from utils.accel import compile_blocks
    model = small_groupmamba("cuda", fused_kernels=fused_kernels).train()
    if compiled:
        compile_blocks(model, dynamic=False)
    train_step(model, "cuda")
    assert not layout_mismatches(model)


# ----------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    return small_split(tmp_path_factory.mktemp("ddp"))


def test_resume_with_another_batch_size_goes_on_by_epochs(train_script, tmp_path, split, capsys):
    """3 steps an epoch at batch 8 (24 images), 6 at batch 4: the resumed run's schedule
    starts from the end of epoch 1, step 6 (as with another number of processes)."""
    out = tmp_path / "run"
    train_script.main([str(a) for a in ("--data", split, "--output", out, "--epochs", "1", *TINY)])
    train_script.main([str(a) for a in ("--resume", out, "--epochs", "2", "--batch-size", "4")])
    assert ("took 3 steps per epoch, this run takes 6: the schedule continues from step 6, the end of epoch 1"
            in capsys.readouterr().out)
    assert torch.load(out / "last.pth", map_location="cpu", weights_only=True)["global_step"] == 6 + 6


# ----------------------------------------------------------------- failures under torchrun

def torchrun_env(tmp_path, rank: int = 1) -> DistEnv:
    return DistEnv(device=torch.device("cpu"), rank=rank, world_size=2, distributed=True,
                   error_file=str(tmp_path / "error.json"))


def recorded(tmp_path) -> str:
    """What torchrun's summary would show for the rank (its error file's call stack)."""
    return json.loads((tmp_path / "error.json").read_text())["message"]["extraInfo"]["py_callstack"]


def test_a_one_line_error_names_the_rank_and_reaches_torchruns_summary(tmp_path):
    with pytest.raises(SystemExit) as info, failures_named(torchrun_env(tmp_path)):
        raise SystemExit("error: data/train has no class folders")
    assert info.value.code == "error: rank 1 (of 2): data/train has no class folders" == recorded(tmp_path)


def test_a_lost_connection_is_one_line(tmp_path):
    gloo = ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
            "[127.0.0.1]:393. This is typically caused by a remote worker crashing.")
    with pytest.raises(SystemExit) as info, failures_named(torchrun_env(tmp_path, rank=0)):
        raise RuntimeError(gloo)
    assert info.value.code.startswith("error: rank 0 (of 2): lost contact with the other processes "
                                      "(Connection closed by peer [127.0.0.1]:393); another rank stopped first")
    assert recorded(tmp_path) == info.value.code


def test_other_failures_keep_their_traceback_and_reach_torchruns_summary(tmp_path):
    with pytest.raises(ZeroDivisionError), failures_named(torchrun_env(tmp_path)):
        1 / 0
    assert recorded(tmp_path).startswith("Traceback") and "ZeroDivisionError" in recorded(tmp_path)
    with pytest.raises(SystemExit) as info, failures_named(torchrun_env(tmp_path)):
        raise SystemExit(130)  # an exit code (Ctrl-C) is left as it is
    assert info.value.code == 130


def test_single_process_failures_are_left_alone(tmp_path):
    env = DistEnv(device=torch.device("cpu"))
    with pytest.raises(SystemExit) as info, failures_named(env):
        raise SystemExit("error: no such folder")
    assert info.value.code == "error: no such folder" and not list(tmp_path.iterdir())


# ----------------------------------------------------------------- torchrun end to end (Gloo)
# train.py runs through tests/ddp_probe.py, which saves each rank's weights after every
# epoch, records each checkpoint written, and can make a rank fail (see its docstring).

SHORT = [*TINY, "--batch-size", "4", "--max-val-batches", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(launcher: list[str], args, probe: Path | None = None, fail: str = "",
          compile_backend: str = "") -> subprocess.Popen:
    """``torchrun <launcher> tests/ddp_probe.py <args>`` (no launcher: one plain process)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", DDP_PROBE_DIR=str(probe or ""), DDP_PROBE_FAIL=fail,
               DDP_PROBE_COMPILE_BACKEND=compile_backend)
    head = ["-m", "torch.distributed.run", *launcher] if launcher else []
    return subprocess.Popen([sys.executable, *head, "tests/ddp_probe.py", *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: int = 180) -> tuple[int, str]:
    try:
        text = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"no exit within {timeout} s (a rank waiting for another?)\n{proc.communicate()[0][-4000:]}")
    return proc.returncode, text


def weights(probe: Path, rank: int, epoch: int) -> dict:
    return torch.load(probe / f"rank{rank}-epoch{epoch}.pt", map_location="cpu", weights_only=True)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "the ranks' weights differ"


@pytest.mark.slow
def test_two_nodes_train_in_step_and_rank_0_alone_writes(tmp_path, split):
    """Two torchrun "machines" on 127.0.0.1 (c10d rendezvous, one process each) on the fast
    path: compiled blocks (Dynamo and AOTAutograd, without inductor's code generation on the
    CPU), data on the device (decoded half by each rank) sharded by rank, EMA. After a step
    both ranks hold all the images and the same weights and EMA, which are last.pth's; only
    rank 0 wrote checkpoints."""
    out, probe, port = tmp_path / "run", tmp_path / "probe", free_port()
    probe.mkdir()
    nodes = [start(["--nnodes=2", f"--node_rank={k}", "--nproc_per_node=1", "--rdzv_backend=c10d",
                    f"--rdzv_endpoint=127.0.0.1:{port}"],
                   ["--data", split, "--output", out, "--epochs", "1", "--max-train-batches", "1",
                    "--gpu-data", "on", "--compile", *SHORT], probe, compile_backend="aot_eager") for k in (0, 1)]
    for code, text in [finish(node) for node in nodes]:
        assert code == 0, text[-4000:]
    first, second = weights(probe, 0, 1), weights(probe, 1, 1)
    for key in ("model", "ema"):
        assert_same(first[key], second[key])
    # each rank decoded half of the images: both hold all of them, as one process decodes them
    train_split = load_train_val(split, "none")[0]
    assert_same(dict(zip(("images", "labels"), decode_images(train_split.samples, 32, torch.device("cpu")))),
                {key: first[key] for key in ("images", "labels")})
    assert_same({key: first[key] for key in ("images", "labels")}, {key: second[key] for key in ("images", "labels")})
    ckpt = torch.load(out / "last.pth", map_location="cpu", weights_only=True)
    assert_same(ckpt["model"], first["model"])
    assert_same(ckpt["model_ema"], first["ema"])
    assert sorted(line.split()[1] for line in (probe / "saves-rank0.txt").read_text().splitlines()) == \
        ["best.pth", "last.pth"]
    assert not (probe / "saves-rank1.txt").exists()
    run = json.loads((out / "args.json").read_text())["run"]
    assert run["world_size"] == 2 and run["speed"]["compile"] and run["data_path"].startswith("GPU-resident data")


@pytest.mark.slow
def test_a_failing_rank_ends_the_run_and_last_pth_stays(tmp_path, split):
    """Rank 1 fails as epoch 2 begins while rank 0 waits for it in the gradient all-reduce:
    the run ends without hanging, non-zero, torchrun's summary names rank 1 and its error,
    and last.pth is epoch 1's, byte for byte."""
    out, probe = tmp_path / "run", tmp_path / "probe"
    probe.mkdir()
    code, text = finish(start(["--standalone", "--nproc_per_node=2"],
                              ["--data", split, "--output", out, "--epochs", "3", "--max-train-batches", "1",
                               *SHORT], probe, fail="1:2"), timeout=120)
    assert code != 0
    root_cause = text.split("Root Cause (first observed failure):")[1]
    assert "rank      : 1 (local_rank: 1)" in root_cause, text[-4000:]
    assert "InjectedFault: injected fault on rank 1 in epoch 2" in root_cause
    saves = [line.split() for line in (probe / "saves-rank0.txt").read_text().splitlines()]
    (epoch, digest), = [(int(e), sha) for e, name, sha in saves if name == "last.pth"]
    assert epoch == 1 and hashlib.sha256((out / "last.pth").read_bytes()).hexdigest() == digest
    assert torch.load(out / "last.pth", map_location="cpu", weights_only=True)["epoch"] == 1


@pytest.mark.slow
def test_resume_with_another_number_of_processes(tmp_path, split):
    """2 processes -> resumed with 1 -> resumed with 2: the schedule goes by epochs (3 steps
    an epoch with two processes of 12 images each, 6 with one), and every run continues."""
    out = tmp_path / "run"
    two = ["--standalone", "--nproc_per_node=2"]
    said = []
    for launcher, extra, epochs in ((two, ["--data", split, "--output", out], 1), ([], ["--resume", out], 2),
                                    (two, ["--resume", out], 3)):
        code, text = finish(start(launcher, [*extra, "--epochs", epochs, *SHORT]))
        assert code == 0, text[-4000:]
        assert torch.load(out / "last.pth", map_location="cpu", weights_only=True)["epoch"] == epochs
        said.append(text)
    assert "took 3 steps per epoch, this run takes 6: the schedule continues from step 6, the end of epoch 1" \
        in said[1]
    assert "took 6 steps per epoch, this run takes 3: the schedule continues from step 6, the end of epoch 2" \
        in said[2]
    assert torch.load(out / "last.pth", map_location="cpu", weights_only=True)["global_step"] == 9
    assert [row["epoch"] for row in read_csv(out / "metrics.csv")] == ["1", "2", "3"]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_the_fast_path_under_torchrun_on_two_gpus(tmp_path, split):
    """groupmamba_tiny with --compile --cuda-graph --gpu-data on and EMA on two GPUs (NCCL):
    the compiled blocks run, CUDA graphs are off with the reason, no gradient-stride warning,
    and after each epoch both ranks hold the same weights and EMA."""
    out, probe = tmp_path / "run", tmp_path / "probe"
    probe.mkdir()
    code, text = finish(start(["--standalone", "--nproc_per_node=2"],
                              ["--data", split, "--output", out, "--epochs", "2", "--model", "groupmamba_tiny",
                               "--img-size", "64", "--batch-size", "4", "--max-val-batches", "1", "--device", "cuda",
                               "--compile", "--cuda-graph", "--gpu-data", "on", "--workers", "0",
                               "--stats", REPO / "tests" / "absent-stats.json"], probe), timeout=900)
    assert code == 0, text[-4000:]
    assert "--cuda-graph is off: under torchrun" in text and "compiled blocks" in text
    assert "Grad strides do not match" not in text
    for epoch in (1, 2):
        first, second = weights(probe, 0, epoch), weights(probe, 1, epoch)
        for key in ("model", "ema"):
            assert_same(first[key], second[key])
