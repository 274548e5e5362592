"""What a train.py run leaves besides its metrics: best.pth with only the weights it was
chosen on (and files of the older layout with both still read), best.safetensors, the
confusion matrix. CPU, timm's test_vit."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models import Classifier, load_pretrained
from test_train_test import TINY, exits, read_csv, source, split  # noqa: F401 - fixtures
from utils import report
from utils.checkpoint import CheckpointError, choose_weights, weight_sets


@pytest.fixture(scope="module")
def run(split, tmp_path_factory, train_script) -> Path:  # noqa: F811 - split is the imported fixture
    out = tmp_path_factory.mktemp("outputs") / "run"
    train_script.main([str(a) for a in ("--data", split, "--output", out, "--epochs", "2", "--ema-decay", "0.9",
                                        "--save-safetensors", *TINY)])
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


# ----------------------------------------------------------------- confusion matrix

def capture_figure(monkeypatch) -> list:
    figures = []
    monkeypatch.setattr(report, "_save", lambda fig, path: figures.append(fig))
    return figures


def test_confusion_matrix_colours_shares_and_writes_counts(monkeypatch):
    figures = capture_figure(monkeypatch)
    report.plot_confusion_matrix([[3, 1], [0, 2]], ["a", "b"], "cm.png", title="val")
    ax = figures[0].axes[0]
    assert [t.get_text() for t in ax.texts] == ["3", "1", "", "2"]
    assert ax.images[0].get_array().tolist() == [[0.75, 0.25], [0.0, 1.0]]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("predicted", "true", "val")
