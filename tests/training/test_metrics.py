"""Metrics against hand-computed matrices."""

from __future__ import annotations

import numpy as np
import pytest

from training.metrics import (
    aggregate,
    average_accuracy,
    average_forgetting,
    backward_transfer,
    forward_transfer,
    peak_rss_bytes,
    summarize,
)

# R[i][j]: accuracy on task j after learning task i (3 tasks)
R = [[0.9, 0.1, 0.2],
     [0.6, 0.8, 0.3],
     [0.5, 0.7, 0.9]]
B = [0.1, 0.2, 0.25]


def test_acc_is_last_row_mean() -> None:
    assert average_accuracy(R) == pytest.approx((0.5 + 0.7 + 0.9) / 3)


def test_bwt_by_hand() -> None:
    # (R[2][0]-R[0][0] + R[2][1]-R[1][1]) / 2 = (-0.4 + -0.1) / 2
    assert backward_transfer(R) == pytest.approx(-0.25)


def test_fwt_by_hand() -> None:
    # (R[0][1]-b1 + R[1][2]-b2) / 2 = (0.1-0.2 + 0.3-0.25) / 2
    assert forward_transfer(R, B) == pytest.approx(-0.025)


def test_forgetting_uses_best_earlier_accuracy() -> None:
    # task 0: max(0.9, 0.6) - 0.5 = 0.4 ; task 1: max(0.8) - 0.7 = 0.1
    assert average_forgetting(R) == pytest.approx(0.25)
    # a task that improves after it was learned gives negative forgetting (max over rows j..T-2 only)
    up = [[0.5, 0.0], [0.7, 0.9]]
    assert average_forgetting(up) == pytest.approx(-0.2)  # 0.5 - 0.7
    assert backward_transfer(up) == pytest.approx(0.2)


def test_forgetting_peak_in_the_middle() -> None:
    r = [[0.6, 0.0, 0.0], [0.8, 0.7, 0.0], [0.3, 0.7, 0.9]]
    assert average_forgetting(r) == pytest.approx(((0.8 - 0.3) + 0.0) / 2)


def test_single_task_and_bad_shapes() -> None:
    assert backward_transfer([[0.7]]) == 0.0
    assert forward_transfer([[0.7]], [0.1]) == 0.0
    assert average_forgetting([[0.7]]) == 0.0
    with pytest.raises(ValueError, match="T x T"):
        average_accuracy([[0.1, 0.2]])
    with pytest.raises(ValueError, match="one random-init accuracy per task"):
        forward_transfer(R, [0.1])


def test_summarize_and_aggregate() -> None:
    m1 = summarize(R, B, task_seconds=[1.0, 2.0, 3.0], peak_rss=100, buffer_bytes=10)
    m2 = summarize(np.asarray(R) - 0.1, B, task_seconds=[3.0, 3.0, 3.0], peak_rss=300, buffer_bytes=30)
    assert m1.acc == pytest.approx(0.7) and m1.bwt == pytest.approx(-0.25)
    agg = aggregate([m1, m2])
    assert agg["acc"]["mean"] == pytest.approx(0.65) and agg["acc"]["std"] == pytest.approx(0.05)
    assert agg["mean_task_seconds"]["mean"] == pytest.approx(2.5)
    assert agg["bwt"]["std"] == pytest.approx(0.0, abs=1e-12)
    assert np.allclose(agg["matrix_mean"], np.asarray(R) - 0.05)
    assert agg["seeds"] == 2


def test_peak_rss_is_plausible() -> None:
    assert 10 << 20 < peak_rss_bytes() < 64 << 30
