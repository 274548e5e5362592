"""CPU training memory: the gradient checkpointing decision, the pre-flight estimate and its
advice, and what Ctrl-C does. In-process, with made-up amounts of available memory."""
from __future__ import annotations

import re
import signal
from types import SimpleNamespace

import pytest
import torch

from utils import interrupt, memory
from utils.accel import choose_grad_checkpointing, plan_speed, set_grad_checkpointing
from utils.config import build_parser
from utils.distributed import DistEnv

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
TINY = "groupmamba_tiny"


def request(**overrides) -> SimpleNamespace:
    """train.py's defaults for what the plan and the pre-flight read."""
    values = dict(model=TINY, scan_backend="torch", compile="off", cuda_graph="off", low_memory=False,
                  grad_checkpointing=None, teacher=None, img_size=224, batch_size=64, workers=2)
    return SimpleNamespace(**{**values, **overrides})


def test_grad_checkpointing_is_on_by_default_on_a_cpu_only(monkeypatch):
    monkeypatch.setattr(memory, "available_gib", lambda: 21.0)  # a 24 GiB machine
    parse = build_parser().parse_args
    assert parse([]).grad_checkpointing is None  # unset: the plan decides
    assert parse(["--grad-checkpointing"]).grad_checkpointing is True
    assert parse(["--no-grad-checkpointing"]).grad_checkpointing is False
    on, note = choose_grad_checkpointing(None, CPU)
    assert on and "--no-grad-checkpointing" in note and "\n" not in note
    assert choose_grad_checkpointing(None, CUDA) == (False, None)
    assert choose_grad_checkpointing(False, CPU) == (False, None)
    assert choose_grad_checkpointing(True, CUDA) == (True, None)
    plan = plan_speed(request(), DistEnv(device=CPU), grad_scaling=False)
    assert plan.grad_checkpointing and "gradient checkpointing" in plan.describe()
    assert plan.notes == (note,)
    plan = plan_speed(request(grad_checkpointing=False), DistEnv(device=CPU), grad_scaling=False)
    assert not plan.grad_checkpointing and plan.notes == ()
    # a step that fits without it (--preset quick's 64 px, batch 32) runs at full speed
    assert choose_grad_checkpointing(None, CPU, fits_without=True) == (False, None)
    plan = plan_speed(request(img_size=64, batch_size=32), DistEnv(device=CPU), grad_scaling=False)
    assert not plan.grad_checkpointing and plan.notes == ()
    plan = plan_speed(request(grad_checkpointing=True, cuda_graph="on"), DistEnv(device=CUDA), grad_scaling=False)
    assert plan.cuda_graph and not plan.grad_checkpointing
    assert plan.notes == ("--grad-checkpointing is off: this toolkit does not capture recomputed blocks in CUDA "
                          "graphs (choose one of --grad-checkpointing and --cuda-graph)",)


def test_set_grad_checkpointing_reports_a_model_without_it():
    plan = plan_speed(request(), DistEnv(device=CPU), grad_scaling=False)
    assert not set_grad_checkpointing(torch.nn.Linear(2, 2), plan)
    with torch.device("meta"):
        import models
        model = models.create_model(TINY, num_classes=3)
    assert set_grad_checkpointing(model, plan) and model.grad_checkpointing


def test_the_defaults_and_the_quick_preset_fit_a_24_gib_machine():
    available = 21.0  # a 24 GiB machine with the system and a desktop running
    assert memory.memory_problem(TINY, 224, 64, True, 4, available) is None
    assert memory.memory_problem(TINY, 64, 32, True, 4, available) is None
    assert memory.memory_problem(TINY, 64, 32, False, 4, available) is None
    assert memory.memory_problem(TINY, 64, 32, True, 2, 4.0) is None  # quick fits a small laptop
    # all activations kept, batch 64 at 224 px needs about 21 GiB on its own
    assert memory.memory_problem(TINY, 224, 64, False, 4, available) is not None


def suggested(line: str, flag: str) -> int:
    return int(re.search(rf"{flag} (\d+)", line).group(1))


@pytest.mark.parametrize("available", [3.0, 6.0, 9.0])
def test_a_step_that_does_not_fit_is_one_line_that_says_what_fits(available):
    need = memory.estimate_step_gib(TINY, 224, 64, True, 2)
    line = memory.memory_problem(TINY, 224, 64, True, 2, available)
    assert line.startswith(f"a training step of {TINY} at 224 px, batch 64 needs about {need:.1f} GiB")
    assert f"and {available:.1f} GiB is available" in line and "\n" not in line
    batch = suggested(line, "--batch-size")
    assert batch % 2 == 0 and memory.estimate_step_gib(TINY, 224, batch, True, 2) <= available
    assert memory.estimate_step_gib(TINY, 224, batch + 2, True, 2) > available  # the largest
    size = suggested(line, "--img-size")
    assert size % 32 == 0 and memory.estimate_step_gib(TINY, size, 64, True, 2) <= available
    assert "--preset quick (64 px, batch 32)" in line


def test_advice_without_checkpointing_and_with_too_little_memory():
    line = memory.memory_problem(TINY, 224, 64, False, 2, 16.0)
    assert "use gradient checkpointing (leave out --no-grad-checkpointing), --batch-size" in line
    line = memory.memory_problem(TINY, 224, 64, True, 2, 0.5)
    assert line.endswith("; free some memory or train a smaller model")
    # torchrun's processes on one machine share it
    assert memory.memory_problem(TINY, 224, 64, True, 2, 20.0) is None
    assert "in each of 2 processes" in memory.memory_problem(TINY, 224, 64, True, 2, 20.0, processes=2)
    # no calibration, or no reading: no refusal
    assert memory.memory_problem("resnet18", 224, 4096, False, 2, 1.0) is None
    assert memory.memory_problem(TINY, 224, 4096, False, 2, None) is None


def test_check_step_memory_stops_a_cpu_run_only(monkeypatch):
    monkeypatch.setattr(memory, "available_gib", lambda: 4.0)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit, match=r"^error: a training step of groupmamba_tiny .* --batch-size \d+"):
        memory.check_step_memory(request(), True, CPU)
    memory.check_step_memory(request(), True, CUDA)  # GPU memory is not the host's
    memory.check_step_memory(request(img_size=64, batch_size=32), True, CPU)
    monkeypatch.setattr(memory, "available_gib", lambda: 12.0)
    memory.check_step_memory(request(), True, CPU)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="in each of 2 processes"):
        memory.check_step_memory(request(), True, CPU)


def test_available_memory_is_read_from_the_system():
    available = memory.available_gib()
    assert available is None or 0 < available < 1 << 20


def test_first_ctrl_c_interrupts_and_the_second_exits_at_once(monkeypatch):
    exits = []

    def exit_now(code):  # os._exit, without ending the test's process
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(interrupt.os, "_exit", exit_now)
    before = signal.getsignal(signal.SIGINT)
    with interrupt.stop_on_sigint():
        handler = signal.getsignal(signal.SIGINT)
        assert isinstance(handler, interrupt.SigintHandler)
        with pytest.raises(KeyboardInterrupt):
            handler(signal.SIGINT, None)
        with pytest.raises(SystemExit):
            handler(signal.SIGINT, None)
        assert exits == [interrupt.INTERRUPTED_EXIT_CODE] == [130]
    assert signal.getsignal(signal.SIGINT) is before
