"""models.Classifier: the one road from a checkpoint to predictions (test.py takes it too)."""
from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import models
from models import CheckpointError, Classifier
from small_classifier import CLASS_NAMES, IMG_SIZE, draw_images, write_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("run") / "best.pth")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    return draw_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def clf(checkpoint) -> Classifier:
    return Classifier.from_checkpoint(checkpoint, device="cpu")


def test_the_checkpoint_describes_the_classifier(clf, checkpoint):
    assert clf.class_names == CLASS_NAMES and clf.img_size == IMG_SIZE
    assert clf.mean == pytest.approx([0.33, 0.29, 0.21]) and clf.std == pytest.approx([0.12, 0.11, 0.13])
    assert clf.weights == "raw" and not clf.model.training and models.Classifier is Classifier
    assert Classifier.from_checkpoint(checkpoint, weights="ema").weights == "EMA"


def test_predict_a_path_a_pil_image_a_list_and_a_tensor(clf, images):
    one = clf.predict(images[0], topk=2)
    assert len(one) == 2 and all(name in CLASS_NAMES for name, _ in one)
    assert one[0][1] >= one[1][1] and 0 < one[0][1] <= 1
    assert clf.predict(Image.open(images[0])) == clf.predict(images[0])  # same decoding as a file
    several = clf.predict([images[0], Image.open(images[1]), images[2]])
    assert len(several) == 3 and all(len(ranked) == len(CLASS_NAMES) for ranked in several)
    batch = clf.preprocess(images[:3])
    assert batch.shape == (3, 3, IMG_SIZE, IMG_SIZE) and batch.dtype == torch.float32
    from_tensor = clf.predict(batch)
    # as {class: probability}, to 1e-5: the batch size changes the float32 kernels' order
    # of summation (seen: 1e-7 to 1.7e-6 apart, by memory alignment), and an untrained
    # model's near-equal probabilities may then swap places
    for a, b in zip(from_tensor, several):
        assert dict(a) == pytest.approx(dict(b), abs=1e-5)
    single = clf.predict(batch[0])  # one image: a list of pairs, not a list of lists
    assert isinstance(single[0], tuple) and dict(single) == pytest.approx(dict(from_tensor[0]), abs=1e-5)
    assert clf.predict([]) == []


def test_probabilities_are_the_softmax_of_the_models_logits(clf, images):
    batch = clf.preprocess(images)
    probabilities = clf.probabilities(batch)
    with torch.no_grad():
        expected = clf.model(batch).softmax(dim=1)
    torch.testing.assert_close(probabilities, expected)
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(len(images)))


def _fused(model) -> set:
    return {m.fused_kernels for m in model.modules() if hasattr(m, "fused_kernels")}


def test_the_fused_kernels_are_for_cuda_devices(clf):
    assert _fused(clf.model) == {False}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_fused_kernels_predict_what_the_unfused_ops_do(checkpoint, images):
    from gpu_checks import set_fused_kernels
    on_gpu = Classifier.from_checkpoint(checkpoint, device="cuda")
    assert _fused(on_gpu.model) == {True}
    batch = on_gpu.preprocess(images)
    fused = on_gpu.probabilities(batch)
    set_fused_kernels(on_gpu.model, False)
    torch.testing.assert_close(fused, on_gpu.probabilities(batch), atol=2e-2, rtol=0)  # bf16 autocast


def test_bad_inputs_are_value_errors(clf, images):
    with pytest.raises(ValueError, match="topk"):
        clf.predict(images[0], topk=0)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        clf.predict(torch.zeros(2, 1, IMG_SIZE, IMG_SIZE))
    with pytest.raises(ValueError, match="weights"):
        Classifier.from_checkpoint(images[0], weights="best")


def test_a_release_file_needs_the_model_name(tmp_path):
    import timm
    from timm.data import ImageNetInfo
    from timm.data.constants import IMAGENET_DEFAULT_MEAN

    release = tmp_path / "release.pth"
    torch.save(timm.create_model("test_vit").state_dict(), release)  # bare, ImageNet's 1000 classes
    with pytest.raises(CheckpointError, match="does not look like a checkpoint written by train.py"):
        Classifier.from_checkpoint(release)
    clf = Classifier.from_checkpoint(release, model_name="test_vit")
    assert clf.weights == "release" and clf.img_size == 224 and clf.mean == pytest.approx(IMAGENET_DEFAULT_MEAN)
    assert len(clf.class_names) == 1000 and clf.class_names[1] == ImageNetInfo().index_to_description(1)
    (name, probability), = clf.predict(torch.zeros(3, 224, 224), topk=1)
    assert name in clf.class_names and 0 < probability <= 1
    three = tmp_path / "three.pth"
    torch.save(timm.create_model("test_vit", num_classes=3).state_dict(), three)
    assert Classifier.from_checkpoint(three, model_name="test_vit", class_names=list("abc")).class_names == list("abc")
    with pytest.raises(CheckpointError, match="do not match"):
        Classifier.from_checkpoint(three, model_name="test_vit")  # 1000 classes by default


def load_test_script():
    spec = importlib.util.spec_from_file_location("_test_script_for_classifier", REPO / "test.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_test_py_predicts_what_the_classifier_predicts(clf, checkpoint, images, tmp_path, capsys):
    out = tmp_path / "pred.csv"
    with pytest.raises(SystemExit) as exit_info:
        load_test_script().main(["--checkpoint", str(checkpoint), "--images", str(images[0].parents[1]),
                                 "--output", str(out), "--workers", "0", "--device", "cpu"])
    assert exit_info.value.code == 0, capsys.readouterr()
    with open(out, newline="", encoding="utf-8") as fh:
        rows = {row["file"]: row for row in csv.DictReader(fh)}
    assert len(rows) == len(images)
    for path, ranked in zip(images, clf.predict(images)):
        row = rows[str(path)]
        assert [row[f"class_{k}"] for k in (1, 2, 3)] == [name for name, _ in ranked]
        assert [float(row[f"prob_{k}"]) for k in (1, 2, 3)] == pytest.approx([p for _, p in ranked], abs=2e-6)
        assert row["label"] == path.parent.name and row["predicted"] == ranked[0][0]


def test_test_py_prints_the_top_classes_of_one_image(checkpoint, images, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_test_script().main(["--checkpoint", str(checkpoint), "--images", str(images[0]),
                                 "--output", str(tmp_path / "one.csv"), "--workers", "0", "--topk", "2"])
    printed = capsys.readouterr().out
    assert exit_info.value.code == 0
    lines = printed.split(f"{images[0]}:\n")[1].splitlines()[:2]
    assert len(lines) == 2 and all(line.split()[1] in CLASS_NAMES for line in lines)
