"""export.py (ONNX, pt2, safetensors) and predict_onnx.py, on a small GroupMamba checkpoint.

The ONNX tests need onnx and onnxruntime (``pip install -e .[export]``; the test extra
installs them) and skip without them.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

import models
from models import Classifier
from small_classifier import CLASS_NAMES, IMG_SIZE, SMALL_KWARGS, draw_images, write_checkpoint
from subprocesses import load_script, run_python

REPO = Path(__file__).resolve().parents[1]


def exits(main, argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    captured = capsys.readouterr()
    return info.value.code, captured.out + captured.err


def onnx_runtime():
    pytest.importorskip("onnx", reason="ONNX export needs the onnx package (pip install -e .[export])")
    return pytest.importorskip("onnxruntime", reason="ONNX round trips need onnxruntime (pip install -e .[export])")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    # best_source "ema": the export takes the EMA weights, as test.py would
    return write_checkpoint(tmp_path_factory.mktemp("run") / "best.pth", best_source="ema")


@pytest.fixture(scope="module")
def clf(checkpoint) -> Classifier:
    return Classifier.from_checkpoint(checkpoint, scan_backend="torch", amp="off")


@pytest.fixture(scope="module")
def export_script():
    return load_script("export")


@pytest.fixture(scope="module")
def onnx_file(checkpoint, export_script, tmp_path_factory) -> Path:
    onnx_runtime()
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    with pytest.raises(SystemExit) as info:
        export_script.main(["--checkpoint", str(checkpoint), "--format", "onnx", "--output", str(out)])
    assert info.value.code == 0
    return out


def logits(clf: Classifier, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(batch, 3, IMG_SIZE, IMG_SIZE, generator=torch.Generator().manual_seed(10 + batch))
    with torch.no_grad():
        return images, clf.model(images)


def onnx_session_matching(path: Path, clf: Classifier):
    """An onnxruntime session of ``path``, checked against PyTorch at batch 1 and 4."""
    ort = onnx_runtime()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1:] == [3, IMG_SIZE, IMG_SIZE]
    for batch in (1, 4):
        images, expected = logits(clf, batch)
        (got,) = session.run(["logits"], {"images": images.numpy()})
        assert got.shape == (batch, len(CLASS_NAMES))
        assert abs(got - expected.numpy()).max() <= 1e-4
    return session


def test_onnx_round_trip_with_a_dynamic_batch(onnx_file, clf):
    session = onnx_session_matching(onnx_file, clf)
    assert session.get_inputs()[0].shape[0] == "batch"
    embedded = json.loads(session.get_modelmeta().custom_metadata_map["classifier"])
    sidecar = json.loads(onnx_file.with_name("model.onnx.json").read_text(encoding="utf-8"))
    assert embedded == sidecar
    assert sidecar["class_names"] == CLASS_NAMES and sidecar["img_size"] == IMG_SIZE and sidecar["weights"] == "EMA"
    assert sidecar["mean"] == pytest.approx(clf.mean) and sidecar["model_kwargs"] == SMALL_KWARGS


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
def test_the_scan_exports_exactly(tmp_path):
    # the TorchScript exporter once mis-traced writes into strided views (the scan's output was off by
    # its own size); the odd/even reduction must come out of it exactly, odd and even lengths alike
    ort = onnx_runtime()
    from kernels.selective_scan.reference import linear_scan

    class Scan(torch.nn.Module):
        def forward(self, a, b):
            return linear_scan(a, b)

    generator = torch.Generator().manual_seed(0)
    for length in (7, 16):
        a, b = torch.rand(2, 3, length, generator=generator), torch.randn(2, 3, length, generator=generator)
        path = tmp_path / f"scan{length}.onnx"
        torch.onnx.export(Scan(), (a, b), str(path), dynamo=False, opset_version=18, input_names=["a", "b"])
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (got,) = session.run(None, {"a": a.numpy(), "b": b.numpy()})
        assert abs(got - linear_scan(a, b).numpy()).max() <= 1e-5


@pytest.mark.slow
def test_onnx_through_the_dynamo_exporter(checkpoint, clf, export_script, tmp_path, capsys):
    onnx_runtime()
    pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript (pip install -e .[export])")
    out = tmp_path / "dynamo.onnx"
    code, text = exits(export_script.main, ["--checkpoint", checkpoint, "--format", "onnx", "--output", out,
                                            "--exporter", "dynamo", "--no-check"], capsys)
    assert code == 0, text
    onnx_session_matching(out, clf)


@pytest.mark.slow
def test_pt2_round_trip_with_a_dynamic_batch(checkpoint, clf, export_script, tmp_path, capsys):
    out = tmp_path / "model.pt2"
    code, text = exits(export_script.main, ["--checkpoint", checkpoint, "--format", "pt2", "--output", out], capsys)
    assert code == 0, text
    extra = {"classifier.json": ""}
    module = torch.export.load(out, extra_files=extra).module()
    for batch in (1, 4):
        images, expected = logits(clf, batch)
        torch.testing.assert_close(module(images), expected, rtol=0, atol=1e-5)
    assert json.loads(extra["classifier.json"])["class_names"] == CLASS_NAMES


def test_safetensors_round_trip_through_load_pretrained(checkpoint, clf, export_script, tmp_path, capsys):
    out = tmp_path / "weights.safetensors"
    code, text = exits(export_script.main, ["--checkpoint", checkpoint, "--format", "safetensors", "--output", out],
                       capsys)
    assert code == 0, text
    model = models.create_model("groupmamba_tiny", **SMALL_KWARGS)
    info = models.load_pretrained(model, out, reset_head=False)
    assert info.metadata["model_name"] == "groupmamba_tiny" and info.metadata["class_names"] == CLASS_NAMES
    for key, value in clf.model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    # a checkpoint for every reader: the classifier it describes predicts the same
    again = Classifier.from_checkpoint(out)
    assert (again.class_names, again.img_size, again.mean) == (clf.class_names, clf.img_size, clf.mean)
    images, expected = logits(clf, 2)
    torch.testing.assert_close(again.probabilities(images), expected.softmax(dim=1))


def test_export_keeps_existing_files_without_force(checkpoint, export_script, tmp_path, capsys):
    out = tmp_path / "weights.safetensors"
    out.write_bytes(b"mine")
    code, text = exits(export_script.main, ["--checkpoint", checkpoint, "--format", "safetensors", "--output", out],
                       capsys)
    assert code == 2 and "--force" in text and out.read_bytes() == b"mine"
    assert not out.with_name(out.name + ".json").exists()
    out.unlink()
    out.with_name(out.name + ".json").write_text("{}")  # the metadata file alone counts too
    code, text = exits(export_script.main, ["--checkpoint", checkpoint, "--format", "safetensors", "--output", out],
                       capsys)
    assert code == 2 and not out.exists()
    code, text = exits(export_script.main, ["--checkpoint", checkpoint, "--format", "safetensors", "--output", out,
                                            "--force"], capsys)
    assert code == 0, text
    assert json.loads(out.with_name(out.name + ".json").read_text())["class_names"] == CLASS_NAMES
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name, out.name + ".json"]  # no temporary files


def test_an_export_that_fails_its_check_writes_nothing(checkpoint, export_script, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(export_script, "exported_runner", lambda *args: (lambda images: torch.zeros(len(images), 3)))
    code, text = exits(export_script.main, ["--checkpoint", checkpoint, "--format", "safetensors", "--output",
                                            tmp_path / "bad.safetensors"], capsys)
    assert code == 1 and "the export is wrong" in text
    assert list(tmp_path.iterdir()) == []


def test_export_errors_are_one_line(checkpoint, export_script, tmp_path, capsys):
    code, text = exits(export_script.main, ["--checkpoint", tmp_path / "missing.pth", "--format", "onnx"], capsys)
    assert code == 2 and "checkpoint not found" in text and "Traceback" not in text
    release = tmp_path / "release.pth"
    torch.save({"head.weight": torch.zeros(2, 2)}, release)
    code, text = exits(export_script.main, ["--checkpoint", release, "--format", "pt2"], capsys)
    assert code == 2 and "does not look like a checkpoint written by train.py" in text
    code, text = exits(export_script.main, ["--checkpoint", checkpoint, "--format", "onnx", "--output",
                                            tmp_path / "m.onnx", "--opset", "13"], capsys)
    assert code == 2 and "--opset" in text


def read_rows(path: Path) -> dict[str, dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return {row["file"]: row for row in csv.DictReader(fh)}


def test_predict_onnx_writes_test_pys_predictions_without_torch(onnx_file, checkpoint, tmp_path, capsys):
    folder = tmp_path / "images"
    draw_images(folder)
    (folder / CLASS_NAMES[0] / "broken.png").write_bytes(b"\x89PNG not really")
    code, text = exits(load_script("test").main, ["--checkpoint", checkpoint, "--images", folder, "--output",
                                                  tmp_path / "torch.csv", "--workers", "0"], capsys)
    assert code == 0, text
    # predict_onnx.py in a fresh interpreter where importing torch fails
    code = ("import runpy, sys\nsys.modules['torch'] = None\n"
            f"sys.argv = ['predict_onnx.py', '--model', {str(onnx_file)!r}, '--images', {str(folder)!r}, "
            f"'--output', {str(tmp_path / 'onnx.csv')!r}]\n"
            "runpy.run_path('predict_onnx.py', run_name='__main__')")
    proc = run_python(code, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ACC1" in proc.stdout and "could not read" in proc.stderr
    with_torch, without = read_rows(tmp_path / "torch.csv"), read_rows(tmp_path / "onnx.csv")
    assert list(with_torch) == list(without) and len(without) == 7
    for file, row in with_torch.items():
        other = without[file]
        assert list(row) == list(other)  # the same columns, in the same order
        assert (row["label"], row["predicted"], bool(row["error"])) == (other["label"], other["predicted"],
                                                                         bool(other["error"]))
        for k in range(1, len(CLASS_NAMES) + 1):
            assert row[f"class_{k}"] == other[f"class_{k}"]
            if not row["error"]:
                assert abs(float(row[f"prob_{k}"]) - float(other[f"prob_{k}"])) <= 1e-3
