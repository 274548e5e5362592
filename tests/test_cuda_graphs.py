"""The captured training step and forward (utils.cuda_graphs) against the same steps
run uncaptured: same losses, same weights. The GPU tests skip without CUDA; the
setup checks run anywhere."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import models
from utils.accel import cuda_graph_problem
from utils.cuda_graphs import CapturedForward, CapturedTrainStep
from utils.engine import heads_loss

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cuda_graph_problem_names_what_is_missing():
    cuda = torch.device("cuda")
    assert cuda_graph_problem(cuda, False, False, False, False) is None
    assert "CUDA" in cuda_graph_problem(torch.device("cpu"), False, False, False, False)
    assert "all-reduce" in cuda_graph_problem(cuda, True, False, False, False)  # torchrun
    assert "single process" in cuda_graph_problem(cuda, False, True, False, False)
    assert "bf16" in cuda_graph_problem(cuda, False, False, True, False)
    assert "teacher" in cuda_graph_problem(cuda, False, False, False, True)


def test_captured_step_refuses_an_optimizer_that_cannot_be_captured():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="capturable"):
        CapturedTrainStep(model, torch.nn.functional.cross_entropy, torch.optim.AdamW(model.parameters()),
                          torch.bfloat16, False, 1.0)


def _small_groupmamba():
    torch.manual_seed(0)
    return models.create_model("groupmamba_tiny", num_classes=5, embed_dims=[16, 32, 48, 64], depths=[1, 1, 1, 1],
                               stem_hidden_dim=8, scan_backend="auto").cuda()


@needs_cuda
def test_captured_training_matches_uncaptured_steps():
    eager_model = _small_groupmamba()
    graph_model = copy.deepcopy(eager_model)
    loss_fn = heads_loss(torch.nn.CrossEntropyLoss())
    make_opt = lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True, capturable=True)  # noqa: E731
    eager_opt, graph_opt = make_opt(eager_model), make_opt(graph_model)
    sched = torch.optim.lr_scheduler.LambdaLR(graph_opt, lambda s: 1.0 / (1 + s))
    eager_sched = torch.optim.lr_scheduler.LambdaLR(eager_opt, lambda s: 1.0 / (1 + s))
    captured = CapturedTrainStep(graph_model, loss_fn, graph_opt, torch.bfloat16, False, 1.0, warmup=2)
    generator = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(6):  # 2 uncaptured, 1 capture + replay, 3 replays
        images = torch.randn(4, 3, 64, 64, device="cuda", generator=generator)
        labels = torch.randint(0, 5, (4,), device="cuda", generator=generator)
        eager_opt.zero_grad(set_to_none=True)
        eager_loss = loss_fn(eager_model(images), labels)
        eager_loss.backward()
        eager_norm = torch.nn.utils.clip_grad_norm_(list(eager_model.parameters()), 1.0)
        eager_opt.step()
        eager_sched.step()
        # held across the next call, as the training loop holds them
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outputs, loss, norm = captured(images, labels)
        assert not [w for w in caught if "AccumulateGrad" in str(w.message)]
        assert all(head.grad_fn is None for head in outputs)
        sched.step()  # the captured step reads the new rate at its next replay
        torch.testing.assert_close(loss, eager_loss.detach(), rtol=1e-4, atol=1e-5)
        # bf16 gradients summed over the batch by GEMMs whose split-K cuBLAS may pick
        # differently on the capture's side stream: 3e-4 apart seen on an H200
        torch.testing.assert_close(norm, eager_norm, rtol=1e-3, atol=1e-5)
    assert captured.graph is not None and isinstance(graph_opt.param_groups[0]["lr"], float)
    for (name, a), b in zip(eager_model.named_parameters(), graph_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5, msg=name)
    with pytest.raises(ValueError, match="one size"):
        captured(images[:2], labels[:2])

    graph_model.eval()
    forward = CapturedForward(graph_model, torch.bfloat16, False, warmup=1).eval()
    with torch.no_grad():
        for batch in range(3):
            images = torch.randn(4, 3, 64, 64, device="cuda", generator=generator)
            torch.testing.assert_close(forward(images).clone(), graph_model(images), rtol=1e-4, atol=1e-5)
        assert forward.graph is not None
        assert forward(images[:3]).shape == (3, 5)  # another shape runs uncaptured
