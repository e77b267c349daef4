"""Forgetting metrics against hand-computed matrices; the plots and the summary table."""

from __future__ import annotations

import pytest
from slimtune.apps.train import metrics

ACC = [
    [0.9, 0.1, 0.0],
    [0.5, 0.8, 0.2],
    [0.3, 0.6, 0.7],
]


def test_three_stages_three_tasks_by_hand():
    report = metrics.forgetting(ACC, ["a", "b", "c"], [0, 1, 2])
    assert report["average_accuracy"] == pytest.approx((0.3 + 0.6 + 0.7) / 3)
    assert report["average_accuracy_per_stage"] == pytest.approx([1.0 / 3, 1.5 / 3, 1.6 / 3])
    assert report["backward_transfer"] == pytest.approx(((0.3 - 0.9) + (0.6 - 0.8)) / 2)
    assert report["forgetting"] == pytest.approx({"a": 0.9 - 0.3, "b": 0.8 - 0.6, "c": 0.2 - 0.7})
    assert report["average_forgetting"] == pytest.approx(((0.9 - 0.3) + (0.8 - 0.6)) / 2)  # c is learned last


def test_loss_only_tasks_and_tasks_without_a_stage():
    acc = [[0.2, None, 0.4], [0.6, None, 0.1]]
    report = metrics.forgetting(acc, ["a", "text", "b"], [None, None, 0])
    assert report["average_accuracy"] == pytest.approx(0.35)
    assert report["backward_transfer"] == pytest.approx(0.1 - 0.4)  # only b names its stage
    assert report["forgetting"] == pytest.approx({"a": 0.2 - 0.6, "b": 0.4 - 0.1})
    assert "text" not in report["forgetting"]
    assert report["average_forgetting"] == pytest.approx(((0.2 - 0.6) + (0.4 - 0.1)) / 2)


def test_single_stage_has_no_transfer_or_forgetting():
    report = metrics.forgetting([[0.5, 1.0]], ["a", "b"], [0, 0])
    assert report["average_accuracy"] == pytest.approx(0.75)
    assert report["backward_transfer"] is None and report["average_forgetting"] is None
    assert report["forgetting"] == {"a": None, "b": None}


def test_table_and_plots(tmp_path):
    rows, tasks = ["base", "s1", "s2", "s3"], ["a", "b", "c"]
    acc = [[0.0, 0.0, 0.0], *ACC]
    loss = [[3.0, 3.0, 3.0], [0.1, 2.0, 2.5], [1.0, 0.2, 2.0], [1.5, 0.9, 0.3]]
    report = metrics.forgetting(ACC, tasks, [0, 1, 2])
    text = metrics.table(rows, tasks, acc, loss, {"all": report})
    assert "a acc" in text and "0.900" in text and "backward transfer -0.400" in text
    metrics.heatmap(rows, tasks, acc, tmp_path / "heat.png")
    metrics.loss_curves(rows[1:], [[3.0, 2.0], [2.5, 1.0], [2.0, 0.5]], tmp_path / "loss.png")
    for name in ("heat.png", "loss.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
