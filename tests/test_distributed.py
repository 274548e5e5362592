"""DistributedDataParallel: gradients in their parameters' layouts (no "Grad strides do not
match bucket view strides" warning), and the helpers of utils/distributed.py.

The depth-wise convs' weight gradients come back channels-last; DDP compares every
gradient's strides with its bucket view's (the parameter's) and warns once per process
when they differ. The check here is the condition itself, on every parameter, plus one
DDP step in this process (Gloo, one rank) that must not warn. GPU variants (the fused
low-memory kernels, compiled blocks) skip without CUDA.
"""
from __future__ import annotations

import copy
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import models
from small_classifier import SMALL_KWARGS
from test_train_test import TINY, _make_source

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
@pytest.mark.parametrize("low_memory, compiled", [(False, False), (True, False), (False, True), (True, True)])
def test_gradients_have_their_parameters_layout_on_cuda(low_memory, compiled):
    """The cuDNN convs, the fused low-memory kernels and compiled blocks (GPU)."""
    from utils.accel import compile_blocks
    model = small_groupmamba("cuda", low_memory=low_memory).train()
    if compiled:
        compile_blocks(model, dynamic=False)
    train_step(model, "cuda")
    assert not layout_mismatches(model)



# ----------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    """data/{train,val}/<class>/: 8 train and 4 val images for each of 3 classes."""
    source = _make_source(tmp_path_factory.mktemp("ddp-src") / "images")
    data = tmp_path_factory.mktemp("ddp-data") / "data"
    for cls in sorted(source.iterdir()):
        files = sorted(cls.iterdir())
        for part, chunk in (("train", files[:8]), ("val", files[8:12])):
            (data / part / cls.name).mkdir(parents=True, exist_ok=True)
            for f in chunk:
                shutil.copy(f, data / part / cls.name / f.name)
    return data


def test_resume_with_another_batch_size_goes_on_by_epochs(train_script, tmp_path, split, capsys):
    """3 steps an epoch at batch 8 (24 images), 6 at batch 4: the resumed run's schedule
    starts from the end of epoch 1, step 6 (as with another number of processes)."""
    out = tmp_path / "run"
    train_script.main([str(a) for a in ("--data", split, "--output", out, "--epochs", "1", *TINY)])
    train_script.main([str(a) for a in ("--resume", out, "--epochs", "2", "--batch-size", "4")])
    assert ("took 3 steps per epoch, this run takes 6: the schedule continues from step 6, the end of epoch 1"
            in capsys.readouterr().out)
    assert torch.load(out / "last.pth", map_location="cpu", weights_only=True)["global_step"] == 6 + 6
