"""Distillation (utils/distillation.py and train.py's --teacher flags), on CPU.

The loss is checked against values worked out by hand; the end-to-end runs call
train.py's main() in this process on a tiny data set (3 classes, a few images each,
32 px): a 1-epoch test_resnet teacher, then a groupmamba_tiny student distilled from
it (hard), and a one-headed test_vit student distilled (soft) from the same teacher
given as a timm name plus a bare state dict, resumed for a second and third epoch.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from subprocesses import load_script
from test_train_test import REPO, _make_source, exits, read_csv
from utils.distillation import (DistillationLoss, TeacherError, _groupmamba_variant,
                                distillation_term, load_teacher, resolve_teacher_source)

LN2, LN3 = math.log(2.0), math.log(3.0)
ABSENT_STATS = str(REPO / "tests" / "absent-stats.json")
# fast settings: one training batch and one validation batch per pass
FAST = ["--img-size", "32", "--batch-size", "4", "--workers", "0", "--device", "cpu",
        "--stats", ABSENT_STATS, "--epochs", "1", "--check-images", "none",
        "--max-train-batches", "1", "--max-val-batches", "1", "--warmup-epochs", "0"]


# ----------------------------------------------------------------------- the loss by hand
# student rows [0, 0] and [ln 3, 0] have probabilities [1/2, 1/2] and [3/4, 1/4]

STUDENT = torch.tensor([[0.0, 0.0], [LN3, 0.0]])


def test_soft_term_by_hand():
    teacher = torch.tensor([[LN3, 0.0], [0.0, 0.0]])  # [3/4, 1/4] and [1/2, 1/2]
    # KL(teacher || student) per row: 3/4 ln(3/2) + 1/4 ln(1/2) = 0.1308120,
    # 1/2 ln(2/3) + 1/2 ln 2 = 0.1438410; summed, divided by numel 4
    expected = (0.75 * math.log(1.5) + 0.25 * math.log(0.5)
                + 0.5 * math.log(2 / 3) + 0.5 * math.log(2)) / 4
    assert expected == pytest.approx(0.0686633, abs=1e-7)
    got = distillation_term(STUDENT, teacher, "soft", tau=1.0)
    assert float(got) == pytest.approx(expected, abs=1e-6)
    # tau 2 on doubled logits: the same probabilities, times tau^2 = 4
    got = distillation_term(2 * STUDENT, 2 * teacher, "soft", tau=2.0)
    assert float(got) == pytest.approx(0.2746531, abs=1e-6)
    # identical predictions: nothing to learn
    assert float(distillation_term(teacher, teacher, "soft", 3.0)) == pytest.approx(0, abs=1e-7)


def test_hard_term_by_hand():
    teacher = torch.tensor([[5.0, 1.0], [0.0, 1.0]])  # top-1 classes 0 and 1
    # -ln(1/2) and -ln(1/4), averaged: (ln 2 + ln 4) / 2 = 1.0397208
    got = distillation_term(STUDENT, teacher, "hard")
    assert float(got) == pytest.approx(1.0397208, abs=1e-6)
    assert float(got) == pytest.approx(1.5 * LN2, abs=1e-6)
    with pytest.raises(ValueError, match="soft or hard"):
        distillation_term(STUDENT, teacher, "none")
    with pytest.raises(ValueError, match="differ in shape"):
        distillation_term(STUDENT, teacher[:1], "hard")


class FixedTeacher(nn.Module):
    """Returns fixed logits and records how it was called."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits
        self.unused = nn.Linear(1, 1)
        self.calls = []

    def forward(self, images):
        self.calls.append((images, self.training, torch.is_grad_enabled()))
        return self.logits + 0 * self.unused.weight.sum()


def test_loss_mixes_label_and_teacher_terms():
    images = torch.randn(2, 3, 8, 8)
    teacher = FixedTeacher(torch.tensor([[5.0, 1.0], [0.0, 1.0]]))
    teacher.train()
    loss_fn = DistillationLoss(nn.CrossEntropyLoss(), teacher, "hard", alpha=0.25)
    assert not teacher.training and not teacher.unused.weight.requires_grad

    # two heads: head [ln 3, 0] / [0, 0] on labels [0, 1]:
    # (-ln(3/4) + ln 2) / 2 = 0.4904146; dist_head = STUDENT on the teacher: 1.0397208
    head = torch.tensor([[LN3, 0.0], [0.0, 0.0]], requires_grad=True)
    dist = STUDENT.clone().requires_grad_(True)
    loss = loss_fn(images, (head, dist), torch.tensor([0, 1]))
    assert loss.item() == pytest.approx(0.75 * 0.4904146 + 0.25 * 1.0397208, abs=1e-6)
    assert loss.item() == pytest.approx(0.6277412, abs=1e-6)
    seen, training, grad = teacher.calls[-1]
    assert seen is images and not training and not grad
    loss.backward()
    assert head.grad is not None and dist.grad is not None
    assert teacher.unused.weight.grad is None

    # one head (a CNN student): both terms on it; labels [1, 0]:
    # (ln 2 - ln(3/4)) / 2 = 0.4904146, teacher term 1.0397208, alpha 0.5
    loss_fn = DistillationLoss(nn.CrossEntropyLoss(), teacher, "hard", alpha=0.5)
    loss = loss_fn(images, STUDENT, torch.tensor([1, 0]))
    assert float(loss) == pytest.approx(0.7650677, abs=1e-6)
    # alpha 0 is the label loss alone, alpha 1 the teacher term alone
    assert float(DistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.0)(
        images, STUDENT, torch.tensor([1, 0]))) == pytest.approx(0.4904146, abs=1e-6)
    with pytest.raises(ValueError, match="alpha"):
        DistillationLoss(nn.CrossEntropyLoss(), teacher, "hard", alpha=1.5)


def test_groupmamba_variant_from_shapes():
    import timm
    import models  # noqa: F401  (registers the variants)

    with torch.device("meta"):
        small = timm.create_model("groupmamba_small", num_classes=7, distillation=True)
    name, kwargs = _groupmamba_variant(small.state_dict())
    assert name == "groupmamba_small" and kwargs == {"num_classes": 7, "distillation": True}
    assert _groupmamba_variant({"fc.weight": torch.zeros(3, 4)}) is None


# ----------------------------------------------------------------------- end to end

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a 2-core machine shared with other jobs, two OpenMP
    threads spin against each other and groupmamba_tiny's step gets ~4x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def train_script():
    return load_script("train")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """data/train (4 images a class) and data/val (2 a class), 3 classes."""
    source = _make_source(tmp_path_factory.mktemp("src") / "images", classes=3, per_class=6)
    root = tmp_path_factory.mktemp("data")
    for cls in sorted(p.name for p in source.iterdir()):
        for part, files in (("train", sorted((source / cls).iterdir())[:4]),
                            ("val", sorted((source / cls).iterdir())[4:])):
            (root / part / cls).mkdir(parents=True)
            for f in files:
                shutil.copy(f, root / part / cls / f.name)
    return root


@pytest.fixture(scope="module")
def teacher(train_script, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher") / "run"
    train_script.main([str(a) for a in ["--data", data, "--output", out, "--model",
                                        "test_resnet", "--ema-decay", "0", *FAST]])
    return out / "best.pth"


def test_groupmamba_student_hard_distillation(train_script, data, teacher, tmp_path, capsys):
    out = tmp_path / "student"
    train_script.main([str(a) for a in [
        "--data", data, "--output", out, "--model", "groupmamba_tiny", "--scan-backend",
        "torch", "--teacher", teacher.parent, "--distillation-type", "hard", "--mixup-prob", "1.0",
        *FAST]])
    text = capsys.readouterr().out
    assert "teacher: test_resnet" in text and "val ACC1" in text
    assert "head on the labels, dist_head on the teacher" in text
    args = json.loads((out / "args.json").read_text())
    assert args["teacher"] == str(teacher.parent) and args["distillation_type"] == "hard"
    info = args["run"]["teacher"]
    assert info["file"] == str(teacher.resolve())  # the run folder's best.pth
    assert info["model_name"] == "test_resnet" and info["class_names_checked"]
    assert info["kind"] == "train.py checkpoint" and len(info["sha256"]) == 64
    assert 0 <= info["val_acc1"] <= 100
    ckpt = torch.load(out / "last.pth", map_location="cpu", weights_only=True)
    assert ckpt["teacher"]["sha256"] == info["sha256"]
    assert ckpt["model_kwargs"]["distillation"] is True
    assert any(k.startswith("dist_head.") for k in ckpt["model"])
    best = torch.load(out / "best.pth", map_location="cpu", weights_only=True)
    assert best["teacher"]["sha256"] == info["sha256"]

    # the student's weights as a bare state dict, the format of the official release:
    # the variant is recognised from the shapes, the class count from the head
    torch.save(best["model"], tmp_path / "release.pth")
    source = resolve_teacher_source(str(tmp_path / "release.pth"))
    loaded = load_teacher(source, best["class_names"], "torch")
    assert loaded.info["model_name"] == "groupmamba_tiny" and not loaded.model.training
    assert loaded.info["model_kwargs"] == {"num_classes": 3, "distillation": True}
    with pytest.raises(TeacherError, match="groupmamba_tiny with 3 classes but the data has 2"):
        load_teacher(source, best["class_names"][:2], "torch")


def test_one_head_student_soft_from_timm_name(train_script, data, teacher, tmp_path, capsys):
    """A bare state dict plus --teacher <timm name>; a student without dist_head."""
    weights = tmp_path / "teacher_state.pth"
    torch.save(torch.load(teacher, map_location="cpu", weights_only=True)["model"], weights)
    out = tmp_path / "student"
    train_script.main([str(a) for a in [
        "--data", data, "--output", out, "--model", "test_vit", "--teacher", "test_resnet",
        "--teacher-checkpoint", weights, "--distillation-type", "soft",
        "--distillation-tau", "2", "--ema-decay", "0", *FAST]])
    assert "one head: it gets both" in capsys.readouterr().out
    info = json.loads((out / "args.json").read_text())["run"]["teacher"]
    assert info["kind"] == "timm model + checkpoint" and not info["class_names_checked"]

    # resume: the saved teacher and distillation settings come back
    train_script.main([str(a) for a in ["--resume", out, "--epochs", "2"]])
    assert "teacher: test_resnet" in capsys.readouterr().out
    assert [r["epoch"] for r in read_csv(out / "metrics.csv")] == ["1", "2"]
    args = json.loads((out / "args.json").read_text())
    assert args["distillation_type"] == "soft" and args["distillation_tau"] == 2.0
    assert args["run"]["teacher"]["sha256"] == info["sha256"]
    # and can be switched off: the saved teacher is dropped with the type
    train_script.main([str(a) for a in ["--resume", out, "--epochs", "3",
                                        "--distillation-type", "none"]])
    assert "teacher" not in capsys.readouterr().out
    args = json.loads((out / "args.json").read_text())
    assert args["teacher"] is None and args["run"]["teacher"] is None


def test_teacher_errors(train_script, data, teacher, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["--data", data, "--output", out, "--model", "test_vit", *FAST]

    def fails(expect, *extra, code=None):
        got, text = exits(train_script.main, base + list(extra), capsys)
        assert got not in (0, None), text
        assert code is None or got == code, text
        assert expect in text, text
        assert not out.exists()  # refused before anything was written

    fails("needs a --teacher", "--distillation-type", "hard", code=2)
    fails("--distillation-type is none", "--teacher", teacher, code=2)
    fails("--teacher-checkpoint needs --teacher", "--teacher-checkpoint", teacher, code=2)
    fails("--distillation-alpha must be in [0, 1]", "--teacher", teacher,
          "--distillation-type", "soft", "--distillation-alpha", "2", code=2)
    kd = ["--distillation-type", "hard"]
    fails("--teacher file not found", "--teacher", tmp_path / "nope.pth", *kd)
    fails("--teacher-checkpoint PATH", "--teacher", "resnet18", *kd)
    fails("unknown model", "--teacher", "no_such_net", "--teacher-checkpoint", teacher, *kd)

    # a teacher trained on other classes
    ckpt = torch.load(teacher, map_location="cpu", weights_only=True)
    names = ckpt["class_names"]
    torch.save(dict(ckpt, class_names=names[:-1] + ["Dandelion"]), tmp_path / "other.pth")
    fails("not the data's", "--teacher", tmp_path / "other.pth", *kd)
    torch.save(dict(ckpt, class_names=names[::-1]), tmp_path / "order.pth")
    fails("another order", "--teacher", tmp_path / "order.pth", *kd)
    # a bare state dict whose head has another class count
    state = dict(ckpt["model"], **{"fc.weight": torch.zeros(5, ckpt["model"]["fc.weight"].shape[1]),
                                   "fc.bias": torch.zeros(5)})
    torch.save(state, tmp_path / "five.pth")
    fails("has 5 outputs", "--teacher", "test_resnet", "--teacher-checkpoint",
          tmp_path / "five.pth", *kd)
    # a file that is neither ours nor a GroupMamba state dict
    fails("cannot tell which model", "--teacher", tmp_path / "five.pth", *kd)


def test_loading_a_teacher_keeps_the_random_streams(teacher):
    """The student's initial weights and augmentation do not depend on the teacher."""
    import random

    from utils.distillation import setup_teacher

    torch.manual_seed(0)
    random.seed(0)
    expected = (torch.rand(3), random.random())
    torch.manual_seed(0)
    random.seed(0)
    names = torch.load(teacher, map_location="cpu", weights_only=True)["class_names"]
    loaded = setup_teacher(resolve_teacher_source(str(teacher)), names, 32, [0.5] * 3,
                           [0.25] * 3, torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    # trained at 32 px with ImageNet's mean/std: the other normalisation is pointed out
    assert len(loaded.notes) == 1 and "mean/std" in loaded.notes[0]
