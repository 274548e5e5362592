"""What a train.py run leaves besides its metrics: best.pth with only the weights it was
chosen on (and files of the older layout with both still read), best.safetensors,
TensorBoard scalars, the learning-rate curve, the confusion matrix. CPU, timm's test_vit."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from models import Classifier, load_pretrained
from test_train_test import TINY, exits, read_csv, source, split  # noqa: F401 - fixtures
from utils import report
from utils.checkpoint import CheckpointError, choose_weights, weight_sets

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


@pytest.fixture(scope="module")
def run(split, tmp_path_factory, train_script) -> Path:  # noqa: F811 - split is the imported fixture
    out = tmp_path_factory.mktemp("outputs") / "run"
    train_script.main([str(a) for a in ("--data", split, "--output", out, "--epochs", "2", "--ema-decay", "0.9",
                                        "--save-safetensors", *(["--tensorboard"] if HAS_TENSORBOARD else []),
                                        *TINY)])
    return out


def tensor_bytes(state) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------- best.pth and best.safetensors

def test_best_pth_holds_only_the_weights_it_was_chosen_on(run):
    best, last = load(run / "best.pth"), load(run / "last.pth")
    kept = "model_ema" if best["best_source"] == "ema" else "model"
    dropped = "model" if kept == "model_ema" else "model_ema"
    assert best[kept] is not None and best[dropped] is None and best["optimizer"] is None
    assert last["model"] is not None and last["model_ema"] is not None and last["optimizer"] is not None
    both = tensor_bytes(last["model"]) + tensor_bytes(last["model_ema"])
    assert 0.45 * both < (run / "best.pth").stat().st_size < 0.6 * both  # about half of last.pth's weights


def _old_layout(run: Path, tmp_path: Path) -> Path:
    """best.pth as written before: both sets of weights (the other one taken from last.pth)."""
    best, last = load(run / "best.pth"), load(run / "last.pth")
    other = "model" if best["best_source"] == "ema" else "model_ema"
    path = tmp_path / "old_best.pth"
    torch.save({**best, other: last[other]}, path)
    return path


def test_test_py_reads_old_and_new_best_pth_alike(run, split, test_script, tmp_path, capsys):  # noqa: F811
    rows = {}
    for name, path in (("new", run / "best.pth"), ("old", _old_layout(run, tmp_path))):
        code, text = exits(test_script.main, ["--checkpoint", path, "--images", split / "val", "--output",
                                              tmp_path / f"{name}.csv", "--workers", "0", "--device", "cpu"], capsys)
        assert code == 0, text
        rows[name] = [(r["file"], r["predicted"], r["confidence"]) for r in read_csv(tmp_path / f"{name}.csv")]
    assert rows["new"] == rows["old"] and rows["new"]


def test_every_reader_takes_the_weights_it_was_chosen_on(run, tmp_path):
    new, old = load(run / "best.pth"), load(_old_layout(run, tmp_path))
    expected, which = choose_weights(new, "auto", "best.pth")
    assert which == ("EMA" if new["best_source"] == "ema" else "raw")
    assert choose_weights(old, "auto", "old")[0] is not None
    for checkpoint in (new, old):
        state, _ = choose_weights(checkpoint, "auto", "x")
        assert all(torch.equal(state[k], expected[k]) for k in expected)
        model = Classifier.from_checkpoint(run / "best.pth").model
        load_pretrained(model, checkpoint, reset_head=False)
        assert all(torch.equal(model.state_dict()[k], expected[k]) for k in expected)


def test_best_safetensors_is_best_pth_in_another_file(run):
    from safetensors import safe_open

    with safe_open(str(run / "best.safetensors"), framework="pt") as fh:
        header = json.loads(fh.metadata()["checkpoint"])
    best = load(run / "best.pth")
    assert header["weights"] == ("EMA" if best["best_source"] == "ema" else "raw")
    assert header["pretrained_cfg"]["input_size"] == [3, 32, 32] and "optimizer" not in header
    images = torch.randn(3, 3, 32, 32)
    a, b = Classifier.from_checkpoint(run / "best.pth"), Classifier.from_checkpoint(run / "best.safetensors")
    assert (a.weights, a.class_names) == (b.weights, b.class_names)
    assert torch.equal(a.probabilities(images), b.probabilities(images))


def test_a_checkpoint_says_which_weights_it_lacks():
    weights = {"w": torch.ones(1)}
    ema_chosen = {"model": None, "model_ema": weights, "best_source": "ema", "optimizer": None,
                  "args": {"ema_decay": 0.9}}
    with pytest.raises(CheckpointError, match="no raw weights .*chosen on; last.pth holds both"):
        choose_weights(ema_chosen, "model", "best.pth")
    raw_chosen = dict(ema_chosen, model=weights, model_ema=None, best_source="model")
    with pytest.raises(CheckpointError, match="no EMA weights .*raw weights it was chosen on"):
        choose_weights(raw_chosen, "ema", "best.pth")
    with pytest.raises(CheckpointError, match=r"no EMA weights \(trained with --ema-decay 0\)"):
        choose_weights(dict(raw_chosen, args={"ema_decay": 0.0}), "ema", "best.pth")
    assert weight_sets({"model": weights, "weights": "EMA"}) == {"EMA": weights}
    # the older layout: both sets; every reader takes the one best_source names
    both = {"model": {"weight": torch.zeros(1, 1)}, "model_ema": {"weight": torch.ones(1, 1)}, "best_source": "ema"}
    assert choose_weights(both, "auto", "x")[1] == "EMA"
    target = torch.nn.Linear(1, 1, bias=False)
    assert load_pretrained(target, both).source == "model_ema" and target.weight.item() == 1.0


def test_pretrained_cfg_is_saved_with_the_run(run):
    for name in ("best.pth", "last.pth"):
        cfg = load(run / name)["pretrained_cfg"]
        assert cfg["input_size"] == (3, 32, 32) and cfg["interpolation"] == "bilinear"
        assert (cfg["crop_pct"], cfg["crop_mode"]) == (1.0, "squash") and cfg["num_classes"] == 3


# ----------------------------------------------------------------- TensorBoard, curves, confusion matrix

@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed")
def test_tensorboard_gets_the_per_epoch_scalars(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    rows = read_csv(run / "metrics.csv")
    for tag, column in (("loss/train", "train_loss"), ("acc1/val", "val_acc1"), ("acc5/val_ema", "ema_val_acc5"),
                        ("lr", "lr")):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [1, 2]
        assert [s.value for s in scalars] == pytest.approx([float(r[column]) for r in rows], rel=1e-4)


def test_tensorboard_without_the_package_is_a_one_line_error(train_script, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # the import fails
    with pytest.raises(SystemExit) as info:
        train_script.parse_config(["--tensorboard"])
    assert info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.endswith("--tensorboard needs the tensorboard package: pip install tensorboard")
    assert train_script.parse_config([])[0].tensorboard is False  # not asked for: not needed


def test_force_removes_the_event_files_and_keeps_other_files(tmp_path):
    from utils.run_folder import remove_owned

    board = tmp_path / "tensorboard"
    board.mkdir()
    (board / "events.out.tfevents.1.host.1.0").write_bytes(b"x")
    (board / "notes.txt").write_text("mine")
    remove_owned(board)
    assert [p.name for p in board.iterdir()] == ["notes.txt"]
    (board / "notes.txt").unlink()
    (board / "events.out.tfevents.2.host.1.0").write_bytes(b"x")
    remove_owned(board)
    assert not board.exists()


def capture_figure(monkeypatch) -> list:
    figures = []
    monkeypatch.setattr(report, "_save", lambda fig, path: figures.append(fig))
    return figures


def test_curves_show_the_learning_rate(monkeypatch):
    figures = capture_figure(monkeypatch)
    history = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.1 / e, "train_acc1": 10.0 * e,
                "val_acc1": 9.0 * e, "lr": 5e-4 / e} for e in (1, 2, 3)]
    report.plot_curves(history, "curves.png")
    axes = figures[0].axes
    assert [ax.get_title() for ax in axes] == ["loss", "top-1 accuracy", "learning rate (end of epoch)"]
    assert list(axes[2].lines[0].get_ydata()) == [5e-4, 2.5e-4, 5e-4 / 3]


def test_confusion_matrix_colours_shares_and_writes_counts(monkeypatch):
    figures = capture_figure(monkeypatch)
    report.plot_confusion_matrix([[3, 1], [0, 2]], ["a", "b"], "cm.png", title="val")
    ax = figures[0].axes[0]
    assert [t.get_text() for t in ax.texts] == ["3", "1", "", "2"]
    assert ax.images[0].get_array().tolist() == [[0.75, 0.25], [0.0, 1.0]]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("predicted", "true", "val")
