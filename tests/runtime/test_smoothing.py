"""Prediction smoother: window by stamps, unknown share, abstention, resets."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.smoothing import UNKNOWN, Smoothed, Smoother
from tests.conftest import assert_imports_without_torch

MS = 1_000_000


def onehot(c: int, n: int = 3, p: float = 0.9) -> np.ndarray:
    v = np.full(n, (1 - p) / (n - 1))
    v[c] = p
    return v


def test_averages_known_entries_within_the_window() -> None:
    s = Smoother(window_s=0.5)
    out = s.update(0, onehot(0), True)
    assert out == Smoothed(index=0, confidence=pytest.approx(0.9), n=1, unknown_share=0.0)
    s.update(100 * MS, onehot(1), True)
    out = s.update(200 * MS, onehot(1), True)
    assert out.index == 1 and out.n == 3
    assert out.confidence == pytest.approx((0.05 + 0.9 + 0.9) / 3)
    assert not out.is_unknown


def test_window_expiry_is_measured_from_the_newest_stamp() -> None:
    s = Smoother(window_s=0.5)
    s.update(0, onehot(0), True)
    s.update(400 * MS, onehot(0), True)
    assert s.update(500 * MS, onehot(1), True).n == 3  # the entry at 0 is exactly 0.5 s old: kept
    out = s.update(501 * MS, onehot(1), True)  # now it is not
    assert out.n == 3 and out.index == 1
    out = s.update(2_000 * MS, onehot(2), True)  # a gap longer than the window: only the new entry
    assert out.n == 1 and out.index == 2 and out.confidence == pytest.approx(0.9)
    assert len(s) == 1


def test_late_entry_within_the_window_is_kept_and_newest_does_not_move_back() -> None:
    s = Smoother(window_s=0.5)
    s.update(1_000 * MS, onehot(0), True)
    out = s.update(800 * MS, onehot(0), True)  # 0.2 s late: still inside the window
    assert out.n == 2
    out = s.update(1_350 * MS, onehot(0), True)  # the late entry is now 0.55 s old: dropped
    assert out.n == 2


def test_stamp_going_back_more_than_the_window_clears_it() -> None:
    s = Smoother(window_s=0.5)
    for t in range(10):
        s.update(10_000 * MS + t * 50 * MS, onehot(0), True)
    out = s.update(3 * MS, onehot(2), True)  # sensor restart: its clock starts again near 0
    assert out.n == 1 and out.index == 2
    out = s.update(53 * MS, onehot(2), True)  # the new clock is followed from here on
    assert out.n == 2 and out.index == 2


def test_unknown_share_above_the_limit_answers_unknown() -> None:
    s = Smoother(window_s=1.0, unknown_share=0.5)
    s.update(0, onehot(1), True)
    out = s.update(10 * MS, onehot(1), False)
    assert out.unknown_share == 0.5 and out.index == 1  # exactly the limit: not above it
    assert out.confidence == pytest.approx(0.9)  # the not-known entry's probabilities do not count
    out = s.update(20 * MS, onehot(0, p=1.0), False)
    assert out.unknown_share == pytest.approx(2 / 3) and out.index == UNKNOWN and out.is_unknown
    assert out.confidence == pytest.approx(0.9)  # still reported while abstaining
    s.update(30 * MS, onehot(1), True)
    out = s.update(40 * MS, onehot(1), True)
    assert out.unknown_share == pytest.approx(2 / 5) and out.index == 1


def test_all_unknown_entries_answer_unknown_with_zero_confidence() -> None:
    for share in (0.5, 1.0):
        s = Smoother(unknown_share=share)
        out = s.update(0, onehot(0), False)
        assert out == Smoothed(index=UNKNOWN, confidence=0.0, n=1, unknown_share=1.0)


def test_abstains_below_the_confidence_threshold() -> None:
    s = Smoother(window_s=1.0, abstain_below=0.6)
    s.update(0, onehot(0), True)
    out = s.update(10 * MS, onehot(1), True)  # average top probability (0.9 + 0.05) / 2 = 0.475
    assert out.index == UNKNOWN and out.confidence == pytest.approx(0.475)
    out = s.update(20 * MS, onehot(1), True)
    assert out.index == 1 and out.confidence == pytest.approx((0.05 + 0.9 + 0.9) / 3)
    lenient = Smoother(abstain_below=0.0)
    assert lenient.update(0, np.full(4, 0.25), True).index == 0  # ties go to the first class


def test_class_count_change_resets_and_reset_clears() -> None:
    s = Smoother(window_s=1.0)
    s.update(0, onehot(0), True)
    s.update(10 * MS, onehot(0), True)
    out = s.update(20 * MS, onehot(3, n=5), True)  # a grown model: 5 classes now
    assert out.n == 1 and out.index == 3
    s.reset()
    assert len(s) == 0
    out = s.update(5 * MS, onehot(1), True)  # after reset, no stamp history either
    assert out.n == 1 and out.index == 1


def test_max_entries_bounds_a_source_with_frozen_stamps() -> None:
    s = Smoother(max_entries=8)
    for _ in range(100):
        out = s.update(0, onehot(0), True)
    assert out.n == 8 and len(s) == 8


def test_config_and_input_validation() -> None:
    for kw, match in (({"window_s": 0}, "window_s"), ({"window_s": float("inf")}, "window_s"),
                      ({"window_s": "1"}, "window_s"), ({"abstain_below": 1.5}, "abstain_below"),
                      ({"abstain_below": -0.1}, "abstain_below"), ({"unknown_share": float("nan")}, "unknown_share"),
                      ({"unknown_share": True}, "unknown_share"), ({"max_entries": 0}, "max_entries")):
        with pytest.raises(ValueError, match=match):
            Smoother(**kw)
    s = Smoother()
    with pytest.raises(ValueError, match="stamp_ns must be an int"):
        s.update(0.5, onehot(0), True)
    with pytest.raises(ValueError, match=r"\(C,\) vector"):
        s.update(0, np.ones((2, 3)), True)
    with pytest.raises(ValueError, match=r"\(C,\) vector"):
        s.update(0, np.array([]), True)
    with pytest.raises(ValueError, match="non-finite"):
        s.update(0, np.array([0.5, np.nan]), True)
    assert len(s) == 0  # a rejected update changes nothing


@settings(max_examples=60)
@given(events=st.lists(st.tuples(st.integers(0, 3_000), st.integers(0, 2), st.booleans()), min_size=1, max_size=40),
       window_ms=st.integers(1, 1_000), abstain=st.floats(0, 1), share=st.floats(0, 1))
def test_matches_a_direct_computation(events: list[tuple[int, int, bool]], window_ms: int, abstain: float,
                                      share: float) -> None:
    """Stamps only move forward here: every answer equals the definition applied to the window."""
    s = Smoother(window_s=window_ms / 1000, abstain_below=abstain, unknown_share=share)
    stamp = 0
    seen: list[tuple[int, np.ndarray, bool]] = []
    for dt, c, known in events:
        stamp += dt * MS
        p = onehot(c, p=0.5 + 0.1 * c)
        seen.append((stamp, p, known))
        out = s.update(stamp, p, known)
        window = [(q, k) for t, q, k in seen if t >= stamp - window_ms * MS]
        kept = [q for q, k in window if k]
        want_share = 1 - len(kept) / len(window)
        conf = float(np.mean(kept, axis=0).max()) if kept else 0.0
        assert out.n == len(window)
        assert out.unknown_share == pytest.approx(want_share)
        assert out.confidence == pytest.approx(conf)
        if out.index != UNKNOWN:
            assert kept and out.unknown_share <= share and out.confidence >= abstain
            assert out.index == int(np.argmax(np.mean(kept, axis=0)))
        else:
            assert not kept or out.unknown_share > share or out.confidence < abstain


def test_imports_no_torch() -> None:
    assert_imports_without_torch("runtime.smoothing")
