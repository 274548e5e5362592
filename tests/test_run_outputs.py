"""What a train.py run leaves besides its metrics: the confusion matrix."""
from __future__ import annotations

from utils import report


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
