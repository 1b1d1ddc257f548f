"""The learn gate (``decide``) and the time-block holdout split (``holdout_split``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.gate import GateConfig, GateDecision, Split, decide, holdout_split

S = 1_000_000_000
T0 = 1_700_000_000 * S  # a realistic time.time_ns() epoch stamp
FRAME = 33_000_000  # camera frames 33 ms apart


# ---------------------------------------------------------------------------- decide
def test_accepts_a_learned_task_without_forgetting() -> None:
    d = decide(new_task_acc=0.8, old_acc_before=0.9, old_acc_after=0.85, config=GateConfig())
    assert d.accepted and d.reasons == () and d.reason == ""
    assert d.new_task_acc == 0.8 and d.old_acc_before == 0.9 and d.old_acc_after == 0.85
    assert d.old_drop == pytest.approx(0.05, abs=1e-9)


def test_rejects_a_new_task_below_the_threshold_with_the_reason() -> None:
    d = decide(new_task_acc=0.4, old_acc_before=0.9, old_acc_after=0.9, config=GateConfig())
    assert not d.accepted
    assert d.reasons == ("new-task accuracy 0.400 < 0.5",)
    assert d.reason == "new-task accuracy 0.400 < 0.5"
    assert d.old_drop == 0.0


def test_rejects_an_old_task_drop_with_the_reason() -> None:
    d = decide(new_task_acc=0.95, old_acc_before=0.9, old_acc_after=0.7, config=GateConfig())
    assert not d.accepted
    assert d.reasons == ("old-task accuracy dropped 0.200 > 0.1 (0.900 -> 0.700 on held-out samples)",)
    assert d.old_drop == pytest.approx(0.2, abs=1e-9)


def test_both_failures_are_reported_in_order() -> None:
    cfg = GateConfig(min_new_task_acc=0.7, max_old_task_drop=0.05)
    d = decide(new_task_acc=0.6, old_acc_before=0.8, old_acc_after=0.6, config=cfg)
    assert not d.accepted and len(d.reasons) == 2
    assert d.reasons[0] == "new-task accuracy 0.600 < 0.7"
    assert d.reasons[1].startswith("old-task accuracy dropped 0.200 > 0.05 (0.800 -> 0.600")
    assert d.reason == "; ".join(d.reasons)


def test_thresholds_themselves_are_accepted() -> None:
    cfg = GateConfig(min_new_task_acc=0.5, max_old_task_drop=0.1)
    assert decide(new_task_acc=0.5, old_acc_before=None, old_acc_after=None, config=cfg).accepted
    # 0.8 - 0.7 is 0.10000000000000009 in floats: a drop of exactly the limit must still pass
    for before, after in ((0.8, 0.7), (0.9, 0.8), (0.3, 0.2), (0.7, 0.6), (1.0, 0.9)):
        d = decide(new_task_acc=0.9, old_acc_before=before, old_acc_after=after, config=cfg)
        assert d.accepted, (before, after, d.reason)
        assert d.old_drop == pytest.approx(0.1, abs=1e-9)
    d = decide(new_task_acc=0.9, old_acc_before=0.8, old_acc_after=0.6999, config=cfg)
    assert not d.accepted and "dropped 0.100 > 0.1" in d.reason  # just over the limit


def test_first_task_has_no_old_accuracies() -> None:
    d = decide(new_task_acc=0.75, old_acc_before=None, old_acc_after=None, config=GateConfig())
    assert d.accepted and d.old_acc_before is None and d.old_acc_after is None and d.old_drop == 0.0
    d = decide(new_task_acc=0.1, old_acc_before=None, old_acc_after=None, config=GateConfig())
    assert not d.accepted and d.reasons == ("new-task accuracy 0.100 < 0.5",)


def test_an_old_task_improvement_is_a_negative_drop() -> None:
    d = decide(new_task_acc=0.9, old_acc_before=0.6, old_acc_after=0.8, config=GateConfig())
    assert d.accepted and d.old_drop == pytest.approx(-0.2, abs=1e-9)


@pytest.mark.parametrize("bad", [-0.01, 1.01, float("nan"), float("inf")])
def test_new_task_accuracy_outside_0_1_is_an_error(bad: float) -> None:
    with pytest.raises(ValueError, match="new_task_acc"):
        decide(new_task_acc=bad, old_acc_before=None, old_acc_after=None, config=GateConfig())


@pytest.mark.parametrize(("before", "after", "field"), [
    (float("nan"), 0.9, "old_acc_before"), (0.9, float("nan"), "old_acc_after"),
    (1.5, 0.9, "old_acc_before"), (0.9, -0.1, "old_acc_after")])
def test_old_accuracies_outside_0_1_are_errors(before: float, after: float, field: str) -> None:
    with pytest.raises(ValueError, match=field):  # a NaN drop compares False: it must not pass the gate
        decide(new_task_acc=0.9, old_acc_before=before, old_acc_after=after, config=GateConfig())


def test_old_accuracies_must_come_in_pairs() -> None:
    for before, after in ((0.9, None), (None, 0.9)):
        with pytest.raises(ValueError, match="both be given or both be None"):
            decide(new_task_acc=0.9, old_acc_before=before, old_acc_after=after, config=GateConfig())


@pytest.mark.parametrize(("field", "value"), [("min_new_task_acc", 1.2), ("min_new_task_acc", -0.1),
                                              ("max_old_task_drop", 2.0), ("max_old_task_drop", -0.5)])
def test_gate_config_is_validated(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"GateConfig.{field}={value}"):
        GateConfig(**{field: value})


@given(new=st.floats(0, 1), before=st.floats(0, 1), after=st.floats(0, 1),
       min_new=st.floats(0, 1), max_drop=st.floats(0, 1))
def test_decision_matches_its_definition(new: float, before: float, after: float, min_new: float,
                                         max_drop: float) -> None:
    d = decide(new_task_acc=new, old_acc_before=before, old_acc_after=after,
               config=GateConfig(min_new_task_acc=min_new, max_old_task_drop=max_drop))
    assert isinstance(d, GateDecision)
    new_ok, old_ok = new >= min_new, before - after <= max_drop + 1e-9
    if abs(before - after - max_drop) > 1e-8:  # away from the rounding tolerance: exact definition
        assert d.accepted == (new_ok and old_ok)
    assert d.accepted == (not d.reasons)
    assert d.old_drop == pytest.approx(before - after, abs=1e-6)


# ---------------------------------------------------------------------------- holdout_split
def _check_time_block(split: Split, names: np.ndarray, stamps: np.ndarray, label: str, *, share: float,
                      guard_s: float, min_train: int) -> None:
    """The invariants of one time-block label (stamps unique within the label)."""
    idx = np.flatnonzero(names == label)
    t = stamps[idx]
    tr, ho, dr = t[split.train[idx]], t[split.holdout[idx]], t[split.dropped[idx]]
    assert split.how[label] == "time-block"
    assert len(ho) >= 1 and len(tr) >= min_train
    start = ho.min()
    block = np.sort(t)[len(t) - len(ho):]
    assert (np.sort(ho) == block).all(), "held out is not one block at the end of the span"
    if len(tr):
        assert tr.max() < start
    if len(dr):
        assert dr.max() < start and (len(tr) == 0 or dr.min() > tr.max())
        assert dr.min() >= start - int(guard_s * S), "a dropped sample lies further back than the guard"
    # the block lies in the last `share` of the label's time span (float cut: allow 1 us)
    cut = t.min() + (t.max() - t.min()) * (1.0 - share)
    assert start >= cut - 1_000 or len(ho) == 1


def test_time_block_holds_out_the_end_of_each_label_and_guards_before_it() -> None:
    n = 100
    stamps = T0 + np.arange(n) * FRAME  # 3.27 s of frames
    names = np.array(["cup"] * n)
    perm = np.random.default_rng(1).permutation(n)  # input order does not matter: stamps do
    split = holdout_split(names[perm], stamps[perm], share=0.2, guard_s=1.0, min_train=3)
    hold_i, train_i, drop_i = (perm[m] for m in (split.holdout, split.train, split.dropped))
    # cut at 80% of the span (2.6136 s): frames 80..99 held out (frame 80 is at 2.64 s)
    assert sorted(hold_i.tolist()) == list(range(80, 100))
    # guard: frames within 1 s before 2.64 s, i.e. stamps >= 1.64 s: frames 50..79
    assert sorted(drop_i.tolist()) == list(range(50, 80))
    assert sorted(train_i.tolist()) == list(range(50))
    assert split.how == {"cup": "time-block"}
    assert not (split.train & split.holdout).any()
    span = stamps[-1] - stamps[0]
    held_span = stamps[-1] - stamps[80]
    assert held_span / span == pytest.approx(0.2, abs=FRAME / span)
    _check_time_block(split, names[perm], stamps[perm], "cup", share=0.2, guard_s=1.0, min_train=3)


def test_held_out_share_follows_time_not_sample_count() -> None:
    # a burst of 50 frames in the first second, then 10 frames spread over the next 9 s
    stamps = np.concatenate([T0 + np.arange(50) * 20_000_000, T0 + S + np.arange(1, 11) * (9 * S // 10)])
    names = np.array(["box"] * len(stamps))
    split = holdout_split(names, stamps, share=0.25, guard_s=0.5, min_train=3)
    held = stamps[split.holdout]
    span = stamps.max() - stamps.min()
    assert held.min() >= stamps.min() + 0.75 * span  # the last quarter of the time...
    assert split.holdout.sum() == 3  # ... is 3 of 60 samples (8.2 s, 9.1 s, 10 s), not 15
    _check_time_block(split, names, stamps, "box", share=0.25, guard_s=0.5, min_train=3)


def test_guard_shrinks_to_keep_min_train() -> None:
    stamps = T0 + np.arange(10) * 100_000_000  # 0.9 s span: the 1 s guard would leave nothing
    names = np.array(["pen"] * 10)
    split = holdout_split(names, stamps, share=0.2, guard_s=1.0, min_train=3)
    assert split.holdout.tolist() == [False] * 8 + [True] * 2  # 0.8 s and 0.9 s (cut 0.72 s)
    assert split.train.sum() == 3 and split.train[:3].all()  # guard halved to 0.5 s: < 0.3 s trains
    assert split.dropped.tolist() == [False] * 3 + [True] * 5 + [False] * 2
    _check_time_block(split, names, stamps, "pen", share=0.2, guard_s=1.0, min_train=3)
    # min_train 8: the guard shrinks (almost) to nothing, and the block is the last 2 samples
    split = holdout_split(names, stamps, share=0.2, guard_s=1.0, min_train=8)
    assert split.train.sum() == 8 and split.holdout.sum() == 2 and not split.dropped.any()
    # min_train 9: the block itself shrinks to one sample
    split = holdout_split(names, stamps, share=0.5, guard_s=0.0, min_train=9)
    assert split.holdout.tolist() == [False] * 9 + [True]
    assert split.train.sum() == 9


def test_no_guard_trains_on_everything_before_the_block() -> None:
    stamps = T0 + np.arange(40) * FRAME
    split = holdout_split(["a"] * 40, stamps, share=0.3, guard_s=0.0, min_train=3)
    assert not split.dropped.any()
    assert split.holdout.sum() + split.train.sum() == 40
    assert stamps[split.train].max() < stamps[split.holdout].min()


def test_unstamped_samples_are_split_at_random() -> None:
    n = 200
    names = ["digit"] * n
    split = holdout_split(names, np.zeros(n, np.int64), share=0.2, guard_s=1.0, min_train=3, seed=0)
    assert split.how == {"digit": "random"}
    assert split.holdout.sum() == 40 and split.train.sum() == 160 and not split.dropped.any()
    held = np.flatnonzero(split.holdout)
    assert held.max() - held.min() > 100  # spread over the samples, not a block
    again = holdout_split(names, np.zeros(n, np.int64), share=0.2, seed=0)
    other = holdout_split(names, np.zeros(n, np.int64), share=0.2, seed=1)
    assert (again.holdout == split.holdout).all()  # seeded
    assert (other.holdout != split.holdout).any() and other.holdout.sum() == 40


def test_a_label_with_any_unstamped_sample_is_split_at_random() -> None:
    stamps = T0 + np.arange(30) * FRAME
    stamps[7] = 0
    split = holdout_split(["x"] * 30, stamps, share=0.2)
    assert split.how == {"x": "random"} and split.holdout.sum() == 6 and split.train.sum() == 24


def test_random_split_keeps_min_train() -> None:
    split = holdout_split(["a"] * 4, [0] * 4, share=0.5, min_train=3)  # round(4 * 0.5) = 2 would leave 2
    assert split.holdout.sum() == 1 and split.train.sum() == 3
    split = holdout_split(["a"] * 3, [0] * 3, share=0.1, min_train=2)  # at least one held out
    assert split.holdout.sum() == 1 and split.train.sum() == 2


def test_several_labels_interleaved_in_time() -> None:
    rng = np.random.default_rng(3)
    labels = ["red", "green", "blue"]
    # round robin (a scene cycling its objects) for 6 s, then a separate later capture of "blue"
    names = [labels[i % 3] for i in range(180)] + ["blue"] * 60
    stamps = np.concatenate([T0 + np.arange(180) * FRAME, T0 + 20 * S + np.arange(60) * FRAME])
    stamps = stamps + rng.integers(0, 1_000_000, len(stamps))  # jitter, stamps stay unique
    names = np.array(names)
    # plus an unstamped dataset label
    names = np.concatenate([names, ["dataset"] * 50])
    stamps = np.concatenate([stamps, np.zeros(50, np.int64)])
    perm = rng.permutation(len(names))
    names, stamps = names[perm], stamps[perm]
    split = holdout_split(names, stamps, share=0.2, guard_s=1.0, min_train=3)
    assert split.how == {**dict.fromkeys(["red", "green", "blue"], "time-block"), "dataset": "random"}
    for lab in ("red", "green", "blue"):
        _check_time_block(split, names, stamps, lab, share=0.2, guard_s=1.0, min_train=3)
    blue = stamps[(names == "blue") & split.holdout]
    assert blue.min() >= T0 + 20 * S  # blue's block is at the end of its own span: the late capture
    red_span = np.ptp(stamps[names == "red"])
    red_held = stamps[(names == "red") & split.holdout]
    assert np.ptp(red_held) / red_span == pytest.approx(0.2, abs=4 * FRAME / red_span)
    ds = names == "dataset"
    assert split.holdout[ds].sum() == 10 and split.train[ds].sum() == 40
    assert split.dropped.sum() == sum(split.dropped[names == lab].sum() for lab in ("red", "green", "blue"))


def test_holdout_split_validates_its_inputs() -> None:
    with pytest.raises(ValueError, match="stamps_ns has 3 entries for 4 samples"):
        holdout_split(["a"] * 4, [1, 2, 3])
    for share in (0.0, 0.9, -0.1, 1.0):
        with pytest.raises(ValueError, match="share"):
            holdout_split(["a"] * 10, [0] * 10, share=share)
    with pytest.raises(ValueError, match="guard_s"):
        holdout_split(["a"] * 10, [0] * 10, guard_s=-1.0)
    with pytest.raises(ValueError, match="label 'few' has 3 samples; need >= 4"):
        holdout_split(["ok"] * 10 + ["few"] * 3, [0] * 13, min_train=3)


def test_empty_input_is_an_empty_split() -> None:
    split = holdout_split([], np.zeros(0, np.int64))
    assert split.train.shape == (0,) and split.holdout.shape == (0,) and split.how == {}


@st.composite
def _samples(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int]:
    min_train = draw(st.integers(0, 5))
    n_labels = draw(st.integers(1, 4))
    names: list[str] = []
    stamps: list[int] = []
    for k in range(n_labels):
        n = draw(st.integers(min_train + 1, 40))
        kind = draw(st.sampled_from(["stamped", "stamped", "unstamped", "mixed"]))
        start = T0 + draw(st.integers(0, 10 * S))
        gaps = draw(st.lists(st.integers(1, 400_000_000), min_size=n, max_size=n))
        t = (start + np.cumsum(gaps)).tolist()  # strictly increasing within the label
        if kind == "unstamped":
            t = [0] * n
        elif kind == "mixed":
            t[draw(st.integers(0, n - 1))] = 0
        names += [f"label{k}"] * n
        stamps += t
    order = draw(st.permutations(range(len(names))))
    return np.array(names)[list(order)], np.array(stamps, np.int64)[list(order)], min_train


@settings(max_examples=150)
@given(data=_samples(), share=st.floats(0.01, 0.89), guard_s=st.floats(0.0, 3.0), seed=st.integers(0, 10))
def test_split_properties(data: tuple[np.ndarray, np.ndarray, int], share: float, guard_s: float,
                          seed: int) -> None:
    names, stamps, min_train = data
    split = holdout_split(names, stamps, share=share, guard_s=guard_s, min_train=min_train, seed=seed)
    assert split.train.shape == split.holdout.shape == (len(names),)
    assert not (split.train & split.holdout).any()
    assert ((split.train | split.holdout) ^ split.dropped).all()
    for lab in np.unique(names):
        m = names == lab
        n_hold, n_train = int(split.holdout[m].sum()), int(split.train[m].sum())
        assert n_hold >= 1 and n_train >= min_train
        if (stamps[m] == 0).any():
            assert split.how[lab] == "random"
            assert not split.dropped[m].any()  # the guard only exists for time blocks
            want = min(max(1, round(m.sum() * share)), int(m.sum()) - min_train)
            assert n_hold == want
        else:
            _check_time_block(split, names, stamps, lab, share=share, guard_s=guard_s, min_train=min_train)
            if guard_s == 0.0:
                assert not split.dropped[m].any()
    assert set(split.how) == set(np.unique(names).tolist())
    assert math.isclose(split.dropped.sum() + split.train.sum() + split.holdout.sum(), len(names))
