"""The threads and DataLoader workers a run chooses for the cores it finds (utils.cpu)."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

import utils.cpu as cpu
from utils.cpu import busy_cores, plan_cpu, usable_cores


def plan(busy=0.0, cores=2, threads=None, workers=None, device="cpu", **environ):
    return plan_cpu(device, threads, workers, environ=environ, cores=cores, busy=busy)


@pytest.mark.parametrize("cores, busy, threads, workers", [
    (2, 0.0, 2, 0),    # idle: every core computes, data loads in the main process
    (2, 0.2, 2, 0),
    (2, 1.0, 1, 0),    # beside one busy process: one thread, no spinning against it
    (2, 0.5, 1, 0),    # half a core taken already costs a thread
    (2, 3.0, 1, 0),    # at least one thread
    (4, 0.0, 3, 1),
    (16, 0.0, 12, 4),
    (64, 1.0, 59, 4),
])
def test_threads_and_workers_fit_the_free_cores(cores, busy, threads, workers):
    chosen = plan(busy, cores)
    assert (chosen.threads, chosen.workers) == (threads, workers)
    assert chosen.threads + chosen.workers <= max(cores, 1 + chosen.workers)
    assert "free cores" in chosen.describe() and f"{busy:.1f} busy elsewhere" in chosen.describe()


def test_what_the_user_gives_wins_and_threads_stay_within_the_cores():
    assert (plan(workers=2).threads, plan(workers=2).workers) == (1, 2)
    assert plan(threads=1).threads == 1 and "(--threads)" in plan(threads=1).describe()
    assert plan(OMP_NUM_THREADS="1").threads == 1 and "OMP_NUM_THREADS" in plan(OMP_NUM_THREADS="1").describe()
    assert plan(threads=2, OMP_NUM_THREADS="1").threads == 2  # the flag before the environment
    many = plan(threads=8)
    assert many.threads == 2 and "--threads 8, more than the cores" in many.describe()
    with pytest.raises(ValueError, match="--threads"):
        plan(threads=0)
    with pytest.raises(ValueError, match="--workers"):
        plan(workers=-1)
    with pytest.raises(ValueError, match="OMP_NUM_THREADS"):
        plan(OMP_NUM_THREADS="two")


def test_torchrun_processes_share_the_cores_and_do_not_measure_each_other(monkeypatch):
    monkeypatch.setattr(cpu, "busy_cores", lambda *a: pytest.fail("measured under torchrun"))
    chosen = plan_cpu("cpu", environ={"LOCAL_WORLD_SIZE": "2"}, cores=8)
    assert (chosen.cores, chosen.threads, chosen.workers, chosen.busy) == (4, 3, 1, None)


def test_nothing_is_measured_when_both_are_given(monkeypatch):
    monkeypatch.setattr(cpu, "busy_cores", lambda *a: pytest.fail("measured"))
    assert plan_cpu("cpu", 2, 0, environ={}, cores=2).busy is None


def test_on_a_gpu_threads_are_torchs_default_within_the_cores():
    chosen = plan(device="cuda", busy=None, cores=64)
    assert chosen.threads == min(torch.get_num_threads(), 64) and chosen.workers == 4
    assert "PyTorch's default" in chosen.describe()


def test_a_busy_process_is_seen():
    assert usable_cores() >= 1
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # past its start-up
        assert busy_cores(0.3) >= 0.5
    finally:
        spinner.kill()
        spinner.wait()


def test_train_py_resolves_both_once_and_a_resumed_run_chooses_threads_again():
    from utils.config import NOT_INHERITED, parse_config
    config, _ = parse_config(["--device", "cpu", "--workers", "1", "--threads", "1"])
    assert (config.threads, config.workers) == (1, 1) and config.cpu_plan.startswith("1 torch thread (--threads)")
    assert "threads" in NOT_INHERITED and "workers" not in NOT_INHERITED  # the workers pick the augmentation
