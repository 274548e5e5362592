"""The training and evaluation loops of utils.engine on the CPU, with stand-ins for the
model and for a captured (CUDA-graph) training step."""
from __future__ import annotations

import math

import pytest
import torch

from utils.amp import Precision
from utils.distributed import DistEnv
from utils.engine import NonFiniteLossError, train_one_epoch, validate

CPU = DistEnv(device=torch.device("cpu"))


class FakeCapturedStep:
    """Like CapturedTrainStep: returns the same output buffers every call, overwritten
    in place (as a graph replay does), with the given loss per call."""

    def __init__(self, losses, num_classes=3, batch=4):
        self.losses = list(losses)
        self.calls = 0
        self.logits = torch.zeros(batch, num_classes)
        self.loss = torch.zeros(())
        self.grad_norm = torch.ones(())

    def __call__(self, images, target):
        self.loss.fill_(self.losses[self.calls])
        self.logits.zero_()
        self.logits[torch.arange(len(target)), target] = 1.0  # always right
        self.calls += 1
        return self.logits, self.loss, self.grad_norm


class CountingScheduler:
    """timm's scheduler interface: step_update(optimizer steps taken so far)."""

    def __init__(self):
        self.steps = 0

    def step_update(self, num_updates):
        self.steps = num_updates


def _batches(count, batch=4, num_classes=3):
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 3, 8, 8, generator=gen),
             torch.randint(0, num_classes, (batch,), generator=gen)) for _ in range(count)]


def _train(captured, batches):
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return train_one_epoch(model, batches, None, optimizer, CountingScheduler(),
                           Precision("off", torch.device("cpu")), CPU, epoch=2, num_classes=3,
                           captured_step=captured)


def test_captured_losses_are_read_one_step_late_but_each_its_own():
    losses = [4.0, 3.0, 2.0, 1.0]
    result = _train(FakeCapturedStep(losses), _batches(4))
    # the buffer is overwritten by the next call: without a copy the mean would be 1.0
    assert result["loss"] == pytest.approx(sum(losses) / 4)
    assert result["acc1"] == 100.0 and result["steps"] == 4 and result["images"] == 16


@pytest.mark.parametrize("bad_step", [2, 4])
def test_a_nan_loss_of_a_captured_step_names_its_step(bad_step):
    losses = [1.0] * 4
    losses[bad_step - 1] = math.nan
    with pytest.raises(NonFiniteLossError) as info:
        _train(FakeCapturedStep(losses), _batches(4))
    assert (info.value.epoch, info.value.step) == (2, bad_step)


class FixedLogits(torch.nn.Module):
    """Predicts class 0 for every image."""

    def forward(self, images):
        logits = torch.zeros(images.shape[0], 3)
        logits[:, 0] = 2.0
        return logits


def test_validate_sums_every_batch_and_pads_to_a_static_batch():
    targets = [torch.tensor([0, 1, 0, 2]), torch.tensor([0, 0, 1])]
    loader = [(torch.randn(len(t), 3, 8, 8), t) for t in targets]
    result = validate(FixedLogits(), loader, Precision("off", torch.device("cpu")), CPU, 3, static_batch=4)
    all_targets = torch.cat(targets)
    expected_loss = torch.nn.functional.cross_entropy(
        FixedLogits()(torch.zeros(7, 3, 8, 8)), all_targets).item()
    assert result["images"] == 7
    assert result["acc1"] == pytest.approx(100 * 4 / 7)
    assert result["acc5"] == pytest.approx(100.0)  # top-5 of 3 classes is top-3
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-6)


def test_model_ema_matches_timm_and_pairs_tensors_once(monkeypatch):
    from timm.utils import ModelEmaV3

    from utils.ema import ModelEma
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    ours = ModelEma(model, decay=0.99, use_warmup=True, warmup_power=0.75)
    timms = ModelEmaV3(model, decay=0.99, use_warmup=True, warmup_power=0.75)
    state_dict_calls = []
    original = torch.nn.Module.state_dict
    tops = (model, ours.module, timms.module)  # count whole-model walks, not their recursion

    def counting_state_dict(self, *args, **kwargs):
        if any(self is top for top in tops):
            state_dict_calls.append(1)
        return original(self, *args, **kwargs)
    monkeypatch.setattr(torch.nn.Module, "state_dict", counting_state_dict)
    for step in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(2, 3, 8, 8))  # moves the running stats, counts batches
        calls_before = len(state_dict_calls)
        ours.update(model, step=step)
        calls_ours = len(state_dict_calls) - calls_before
        assert calls_ours == (2 if step == 1 else 0)  # both state dicts, at the first update only
        timms.update(model, step=step)
        assert len(state_dict_calls) - calls_before - calls_ours == 2  # timm: every update
    monkeypatch.setattr(torch.nn.Module, "state_dict", original)
    for (key, a), b in zip(ours.module.state_dict().items(), timms.module.state_dict().values()):
        torch.testing.assert_close(a, b, msg=key)
    assert int(ours.module[1].num_batches_tracked) == 5
    assert not torch.equal(ours.module[0].weight, model[0].weight)  # an average, not a copy


class ShapeRecorder(FixedLogits):
    def __init__(self):
        super().__init__()
        self.batch_sizes = []

    def forward(self, images):
        self.batch_sizes.append(images.shape[0])
        return super().forward(images)


def test_predict_batches_pads_to_a_static_batch_and_trims():
    from utils.engine import predict_batches
    model = ShapeRecorder()
    loader = [(torch.randn(n, 3, 8, 8), torch.arange(n)) for n in (4, 4, 3)]
    results = list(predict_batches(model, loader, Precision("off", torch.device("cpu")),
                                   torch.device("cpu"), show_progress=False, static_batch=4))
    assert model.batch_sizes == [4, 4, 4]
    assert [probs.shape[0] for probs, _ in results] == [4, 4, 3]
    assert torch.equal(results[-1][1][0], torch.arange(3))


def test_model_ema_leaves_bf16_weights_to_timms_stochastic_rounding():
    from timm.utils import ModelEmaV3

    from utils.ema import ModelEma
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64).to(torch.bfloat16)
    ours, timms = ModelEma(model, decay=0.999), ModelEmaV3(model, decay=0.999)
    for step in range(1, 4):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight) * 1e-2)
        ours.update(model, step=step)
        timms.update(model, step=step)
    assert ours._low_precision
    torch.testing.assert_close(ours.module.weight, timms.module.weight, rtol=0, atol=0)
