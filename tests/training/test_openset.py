"""Open-set check: embedding, prototypes, calibration, scoring, state; on synthetic and real backbone taps."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import assert_imports_without_torch
from training.buffer import ReplayBuffer
from training.openset import OpenSet, embed

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "models"
DIMS = {"image": [40, 112, 192, 1280], "audio": [48, 72, 96, 96], "imu": [168, 168, 168, 168]}  # real tap dims
SMALL = {"image": [3, 5], "audio": [4]}


def make_data(rng: np.random.Generator, labels: np.ndarray, dims: dict[str, list[int]], *, noise: float = 0.1,
              centres: dict[str, list[np.ndarray]] | None = None, present: np.ndarray | None = None):
    """Non-negative taps (pooled activations) around one random centre per class and level."""
    n_cls = int(labels.max()) + 1 if len(labels) else 1
    centres = centres or {m: [np.abs(rng.normal(size=(max(n_cls, 10), d))) for d in ds] for m, ds in dims.items()}
    taps = {m: [np.abs(c[labels] + noise * rng.normal(size=(len(labels), c.shape[1]))).astype(np.float32)
                for c in centres[m]] for m in dims}
    present = np.ones((len(labels), len(dims)), bool) if present is None else present
    for k, m in enumerate(dims):
        for x in taps[m]:
            x[~present[:, k]] = 0.0  # absent modality: zeros by convention
    return taps, present, centres


@pytest.fixture(scope="module")
def synthetic() -> dict:
    rng = np.random.default_rng(0)
    fit_y, cal_y, test_y = (np.repeat(np.arange(3), k) for k in (40, 30, 30))
    taps, present, centres = make_data(rng, fit_y, DIMS)
    os_ = OpenSet.fit(taps, present, fit_y, 5, list(DIMS))
    cal = make_data(rng, cal_y, DIMS, centres=centres)
    os_.calibrate(cal[0], cal[1], cal_y)
    return {"openset": os_, "centres": centres, "rng": rng, "test_y": test_y}


# ---- embed -------------------------------------------------------------------------------------
def test_embed_rows_are_unit_and_zero_rows_stay_zero() -> None:
    rng = np.random.default_rng(1)
    levels = [rng.normal(size=(6, d)).astype(np.float32) for d in (3, 7, 2)]
    levels[1][2] = 0.0
    for x in levels:
        x[4] = 0.0
    e = embed(levels)
    assert e.shape == (6, 12) and e.dtype == np.float32
    norms = np.linalg.norm(e, axis=1)
    np.testing.assert_allclose(norms[[0, 1, 3, 5]], 1.0, atol=1e-6)
    np.testing.assert_allclose(norms[2], np.sqrt(2 / 3), atol=1e-6)  # one of three levels is zero
    assert np.array_equal(e[4], np.zeros(12))
    np.testing.assert_allclose(np.linalg.norm(e[0, :3]), 1 / np.sqrt(3), atol=1e-6)  # levels weigh the same


def test_embed_marks_non_finite_rows_and_validates() -> None:
    x = np.ones((3, 4), np.float32)
    x[1, 2] = np.nan
    e = embed([x, np.ones((3, 2))])
    assert np.isnan(e[1]).all() and np.isfinite(e[[0, 2]]).all()
    with pytest.raises(ValueError, match="non-empty list"):
        embed([])
    with pytest.raises(ValueError, match=r"level 1 must be \(3, dim\)"):
        embed([np.ones((3, 2)), np.ones((2, 2))])
    with pytest.raises(ValueError, match="2-D"):
        embed([np.ones(3)])


@settings(max_examples=50)
@given(seed=st.integers(0, 2**32 - 1), log_scale=st.floats(-20, 20))
def test_embed_is_invariant_to_positive_scaling(seed: int, log_scale: float) -> None:
    rng = np.random.default_rng(seed)
    levels = [rng.normal(size=(4, d)) for d in (1, 5, 9)]
    scales = np.exp(log_scale + rng.normal(size=(3, 4, 1)))  # per level and per row
    np.testing.assert_allclose(embed([s * x for s, x in zip(scales, levels, strict=True)]), embed(levels),
                               atol=1e-6)


# ---- fitting and distances ---------------------------------------------------------------------
def test_fit_prototypes_known_mask_and_dims(synthetic: dict) -> None:
    os_ = synthetic["openset"]
    assert os_.modalities == list(DIMS) and os_.dims == DIMS and os_.num_classes == 5
    for m, dims in DIMS.items():
        assert os_.prototypes[m].shape == (5, sum(dims)) and os_.prototypes[m].dtype == np.float32
        assert os_.known[m].tolist() == [True, True, True, False, False]
        np.testing.assert_allclose(np.linalg.norm(os_.prototypes[m], axis=1), [1, 1, 1, 0, 0], atol=1e-6)
        assert os_.thresholds[m] is not None and 0 < os_.thresholds[m] < 0.5
        assert os_.calibration_samples[m] == 90


def test_prototype_is_the_normalised_mean_and_a_prototype_has_distance_zero() -> None:
    rng = np.random.default_rng(2)
    y = np.array([0, 0, 1])
    taps, present, _ = make_data(rng, y, SMALL)
    os_ = OpenSet.fit(taps, present, y, 2, list(SMALL))
    e = embed(taps["image"])
    mean = e[:2].mean(axis=0)
    np.testing.assert_allclose(os_.prototypes["image"][0], mean / np.linalg.norm(mean), atol=1e-6)
    # class 1's only sample is its prototype: it, scaled, sits at distance 0
    q = {"image": [3.0 * x[2:] for x in taps["image"]], "audio": [np.zeros((1, 4), np.float32)]}
    d = os_.distances(q, np.array([[True, False]]))
    assert d[0, 0] == pytest.approx(0.0, abs=1e-6) and np.isnan(d[0, 1])


def test_modality_present_only_for_some_classes() -> None:
    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(3), 10)
    present = np.ones((30, 2), bool)
    present[y == 2, 1] = False  # class 2 was never heard
    taps, present, _ = make_data(rng, y, SMALL, present=present)
    os_ = OpenSet.fit(taps, present, y, 4, list(SMALL))
    assert os_.known["image"].tolist() == [True, True, True, False]
    assert os_.known["audio"].tolist() == [True, True, False, False]
    # calibration counts only samples of classes the modality knows
    os_.calibrate(taps, present, y, min_samples=1)
    assert os_.calibration_samples == {"image": 30, "audio": 20}


def test_distances_nan_where_absent_or_no_prototype() -> None:
    rng = np.random.default_rng(4)
    y = np.repeat(np.arange(2), 5)
    present = np.ones((10, 2), bool)
    present[:, 1] = False  # audio never present in training: no prototypes
    taps, present, centres = make_data(rng, y, SMALL, present=present)
    os_ = OpenSet.fit(taps, present, y, 2, list(SMALL))
    q, qp, _ = make_data(rng, y, SMALL, centres=centres)
    qp[::2, 0] = False
    d = os_.distances(q, qp)
    assert d.shape == (10, 2)
    assert np.isnan(d[::2, 0]).all() and np.isfinite(d[1::2, 0]).all() and np.isnan(d[:, 1]).all()


# ---- calibration and scoring -------------------------------------------------------------------
def test_calibrate_threshold_is_margin_times_quantile() -> None:
    rng = np.random.default_rng(5)
    y = np.repeat(np.arange(2), 20)
    taps, present, centres = make_data(rng, y, SMALL, noise=0.3)
    os_ = OpenSet.fit(taps, present, y, 3, list(SMALL))
    cal_y = np.array([0] * 15 + [1] * 15 + [2] * 7)  # class 2 is unknown: left out of the quantile
    cal, cal_p, _ = make_data(rng, cal_y, SMALL, noise=0.3, centres=centres)
    cal_p[:3, 1] = False
    d = os_.distances(cal, cal_p)
    os_.calibrate(cal, cal_p, cal_y, quantile=0.9, margin=1.5, min_samples=10)
    assert os_.thresholds["image"] == pytest.approx(1.5 * np.quantile(d[:30, 0], 0.9), rel=1e-12)
    assert os_.thresholds["audio"] == pytest.approx(1.5 * np.quantile(d[3:30, 1], 0.9), rel=1e-12)
    assert os_.calibration_samples == {"image": 30, "audio": 27}
    os_.calibrate(cal, cal_p, cal_y, min_samples=28)
    assert os_.thresholds["image"] is not None and os_.thresholds["audio"] is None


def test_score_ratio_max_and_uncalibrated_modalities() -> None:
    rng = np.random.default_rng(6)
    y = np.repeat(np.arange(2), 20)
    taps, present, centres = make_data(rng, y, SMALL, noise=0.3)
    os_ = OpenSet.fit(taps, present, y, 2, list(SMALL))
    q, qp, _ = make_data(rng, y, SMALL, noise=0.3, centres=centres)
    qp[:5] = False
    qp[5:10, 0] = False
    # nothing calibrated: every sample scores 0.0 (known)
    assert np.array_equal(os_.score(q, qp), np.zeros(40)) and os_.is_known(q, qp).all()
    os_.calibrate(q, qp, y, min_samples=1)
    d = os_.distances(q, qp)
    t = np.array([os_.thresholds["image"], os_.thresholds["audio"]])
    s = os_.score(q, qp)
    assert np.array_equal(s[:5], np.zeros(5))  # no modality present
    np.testing.assert_allclose(s[5:10], d[5:10, 1] / t[1], rtol=1e-12)
    np.testing.assert_allclose(s[10:], np.mean(d[10:] / t, axis=1), rtol=1e-12)  # default rule: the mean
    assert np.array_equal(os_.is_known(q, qp), s <= 1.0)
    os_.rule = "max"
    np.testing.assert_allclose(os_.score(q, qp)[10:], np.max(d[10:] / t, axis=1), rtol=1e-12)
    np.testing.assert_allclose(os_.score(q, qp)[5:10], d[5:10, 1] / t[1], rtol=1e-12)  # one modality: the same
    assert OpenSet.from_state_dict(os_.state_dict()).rule == "max"
    os_.rule = "mean"
    os_.thresholds["audio"] = None  # audio alone no longer counts
    assert np.array_equal(os_.score(q, qp)[5:10], np.zeros(5))


def test_absent_modality_is_ignored(synthetic: dict) -> None:
    os_, rng, y = synthetic["openset"], synthetic["rng"], synthetic["test_y"]
    present = np.ones((len(y), 3), bool)
    present[:, 1] = False
    q, qp, _ = make_data(rng, y, DIMS, centres=synthetic["centres"], present=present)
    base = os_.score(q, qp)
    garbage = {m: [x.copy() for x in lv] for m, lv in q.items()}
    garbage["audio"] = [rng.normal(scale=1e3, size=x.shape).astype(np.float32) for x in q["audio"]]
    garbage["audio"][0][0, 0] = np.nan  # even nan in an absent modality does not count
    np.testing.assert_allclose(os_.score(garbage, qp), base, rtol=1e-6, atol=1e-6)
    d = os_.distances(q, qp)
    t = np.array([os_.thresholds[m] for m in DIMS])
    np.testing.assert_allclose(base, np.mean(d[:, [0, 2]] / t[[0, 2]], axis=1), rtol=1e-12)
    assert os_.is_known(q, qp).mean() >= 0.95


def test_far_and_non_finite_samples_are_unknown(synthetic: dict) -> None:
    os_, rng, y = synthetic["openset"], synthetic["rng"], synthetic["test_y"]
    q, qp, _ = make_data(rng, y, DIMS, centres=synthetic["centres"])
    assert os_.is_known(q, qp).mean() >= 0.95
    unseen = make_data(rng, np.full(20, 4), DIMS, centres=synthetic["centres"])  # class 4 was never fitted
    assert not os_.is_known(unseen[0], unseen[1]).any()
    q["image"][2][3, 7] = np.inf
    s = os_.score(q, qp)
    assert s[3] == np.inf and not os_.is_known(q, qp)[3]
    assert np.isinf(os_.distances(q, qp)[3, 0])


@settings(max_examples=40)
@given(seed=st.integers(0, 2**32 - 1), log_scale=st.floats(-6, 6))
def test_score_is_invariant_to_positive_scaling_of_taps(seed: int, log_scale: float) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, 30)
    taps, present, centres = make_data(rng, y, SMALL, noise=0.5)
    os_ = OpenSet.fit(taps, present, y, 3, list(SMALL)).calibrate(taps, present, y, min_samples=1)
    q, qp, _ = make_data(rng, rng.integers(0, 3, 8), SMALL, noise=0.5, centres=centres)
    qp[rng.random(qp.shape) < 0.3] = False
    scaled = {m: [(np.exp(log_scale + rng.normal(size=(len(x), 1))) * x).astype(np.float32) for x in lv]
              for m, lv in q.items()}
    np.testing.assert_allclose(os_.score(scaled, qp), os_.score(q, qp), rtol=1e-4, atol=1e-5)


@settings(max_examples=60)
@given(seed=st.integers(0, 2**32 - 1), n_fit=st.integers(1, 25), n_classes=st.integers(1, 6),
       p_absent=st.floats(0, 0.9))
def test_distance_properties(seed: int, n_fit: int, n_classes: int, p_absent: float) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n_fit)
    present = rng.random((n_fit, 2)) >= p_absent
    taps = {m: [rng.normal(size=(n_fit, d)).astype(np.float32) for d in ds] for m, ds in SMALL.items()}
    os_ = OpenSet.fit(taps, present, y, n_classes, list(SMALL))
    for k, m in enumerate(SMALL):
        assert set(np.flatnonzero(os_.known[m])) == set(y[present[:, k]].tolist())
    qp = rng.random((9, 2)) >= p_absent
    q = {m: [rng.normal(size=(9, d)).astype(np.float32) for d in ds] for m, ds in SMALL.items()}
    d = os_.distances(q, qp)
    no_proto = np.array([not os_.known[m].any() for m in SMALL])
    assert np.array_equal(np.isnan(d), ~qp | no_proto[None, :])
    assert ((d[~np.isnan(d)] >= 0) & (d[~np.isnan(d)] <= 2)).all()
    # a fitted sample is never further from the nearest prototype than from its own class's
    e = embed(taps["image"]).astype(np.float64)[present[:, 0]]
    own = 1 - np.sum(e * os_.prototypes["image"][y[present[:, 0]]], axis=1)
    fit_d = os_.distances(taps, present)[present[:, 0], 0]
    assert (fit_d <= own + 1e-6).all()
    os_.calibrate(q, qp, rng.integers(0, n_classes, 9), min_samples=1)
    s = os_.score(q, qp)
    assert s.shape == (9,) and (s >= 0).all() and np.array_equal(os_.is_known(q, qp), s <= 1)


# ---- state -------------------------------------------------------------------------------------
def _json_and_arrays(value, arrays: list) -> object:
    """What a checkpoint does: arrays out to .npy, the rest through JSON."""
    if isinstance(value, np.ndarray):
        arrays.append(value)
        return {"__array__": len(arrays) - 1}
    if isinstance(value, dict):
        assert all(isinstance(k, str) for k in value)
        return {k: _json_and_arrays(v, arrays) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_and_arrays(v, arrays) for v in value]
    assert value is None or type(value) in (str, int, float, bool), type(value)
    return value


def test_state_round_trip_through_a_checkpoint_is_identical(synthetic: dict) -> None:
    from runtime.checkpoints import StateFiles

    os_ = OpenSet.from_state_dict(synthetic["openset"].state_dict())
    os_.thresholds["audio"] = None  # None must survive too
    state = os_.state_dict()
    json.dumps(_json_and_arrays(state, []))  # only JSON values and arrays
    back = OpenSet.from_state_dict(StateFiles.encode({"openset": state}).decode()["openset"])
    assert back.modalities == os_.modalities and back.dims == os_.dims
    assert back.thresholds == os_.thresholds and back.calibration_samples == os_.calibration_samples
    for m in DIMS:
        assert np.array_equal(back.prototypes[m], os_.prototypes[m])
        assert back.prototypes[m].dtype == np.float32 and back.known[m].dtype == bool
        assert np.array_equal(back.known[m], os_.known[m])
    q, qp, _ = make_data(synthetic["rng"], synthetic["test_y"], DIMS, centres=synthetic["centres"])
    assert np.array_equal(back.score(q, qp), os_.score(q, qp))
    # the state is a copy: changing it leaves the open set alone
    state["prototypes"]["image"][:] = 0
    assert os_.prototypes["image"].any()


def test_from_state_dict_rejects_bad_state(synthetic: dict) -> None:
    state = synthetic["openset"].state_dict()
    with pytest.raises(ValueError, match="format"):
        OpenSet.from_state_dict({**state, "format": 99})
    with pytest.raises(ValueError, match="lacks 'known'"):
        OpenSet.from_state_dict({k: v for k, v in state.items() if k != "known"})
    bad = {**state, "prototypes": {**state["prototypes"], "imu": state["prototypes"]["imu"][:, :10]}}
    with pytest.raises(ValueError, match=r"prototypes\['imu'\] must be \(5, 672\)"):
        OpenSet.from_state_dict(bad)
    with pytest.raises(ValueError, match=r"thresholds\['image'\]"):
        OpenSet.from_state_dict({**state, "thresholds": {**state["thresholds"], "image": -1.0}})


def test_fit_from_the_replay_buffer(synthetic: dict) -> None:
    rng = np.random.default_rng(7)
    y = np.repeat(np.arange(3), 20)
    present = np.ones((60, 3), bool)
    present[::4, 1] = False
    taps, present, _ = make_data(rng, y, DIMS, centres=synthetic["centres"], present=present)
    exact = OpenSet.fit(taps, present, y, 5, list(DIMS))
    for dtype in ("float16", "int8"):
        buf = ReplayBuffer(max_samples=100, dtype=dtype)
        buf.add_batch(taps, present, y, task=0)
        batch = buf.all()
        got = OpenSet.fit(batch.taps, batch.present, batch.labels, 5, buf.modalities)
        for m in DIMS:
            assert np.array_equal(got.known[m], exact.known[m])
            np.testing.assert_allclose(got.prototypes[m], exact.prototypes[m], atol=2e-3)


# ---- validation --------------------------------------------------------------------------------
def test_inputs_are_validated(synthetic: dict) -> None:
    os_ = synthetic["openset"]
    q, qp, _ = make_data(np.random.default_rng(8), np.arange(3), DIMS, centres=synthetic["centres"])
    with pytest.raises(ValueError, match=r"\['image', 'audio'\], expected \['image', 'audio', 'imu'\]"):
        os_.score({m: q[m] for m in ("image", "audio")}, qp[:, :2])
    with pytest.raises(ValueError, match="in that order"):
        os_.score({m: q[m] for m in ("audio", "image", "imu")}, qp)
    wrong = {**q, "imu": [*q["imu"][:3], q["imu"][3][:, :100]]}
    with pytest.raises(ValueError, match=r"taps\['imu'\]\[3\] has dim 100, expected 168"):
        os_.score(wrong, qp)
    with pytest.raises(ValueError, match=r"taps\['audio'\] has 3 levels, expected 4"):
        os_.score({**q, "audio": q["audio"][:3]}, qp)
    with pytest.raises(ValueError, match=r"present must be \(3, 3\)"):
        os_.score(q, qp[:2])
    with pytest.raises(ValueError, match="bool"):
        os_.score(q, qp.astype(int))
    with pytest.raises(ValueError, match="rows"):
        os_.score({**q, "imu": [q["imu"][0][:2], *q["imu"][1:]]}, qp)
    y = np.arange(3)
    with pytest.raises(ValueError, match="labels must be < num_classes=2"):
        OpenSet.fit(q, qp, y, 2, list(DIMS))
    with pytest.raises(ValueError, match="labels must be >= 0"):
        OpenSet.fit(q, qp, np.array([0, -1, 1]), 3, list(DIMS))
    with pytest.raises(ValueError, match="num_classes"):
        OpenSet.fit(q, qp, y, 0, list(DIMS))
    with pytest.raises(ValueError, match="expected \\['imu'\\]"):
        OpenSet.fit(q, qp, y, 3, ["imu"])
    bad = {**q, "image": [x.copy() for x in q["image"]]}
    bad["image"][0][1, 0] = np.nan
    with pytest.raises(ValueError, match=r"taps\['image'\] hold non-finite"):
        OpenSet.fit(bad, qp, y, 3, list(DIMS))
    with pytest.raises(ValueError, match=r"taps\['image'\] hold non-finite"):
        os_.calibrate(bad, qp, y)
    for kw, match in (({"quantile": 0.0}, "quantile"), ({"quantile": 1.5}, "quantile"),
                      ({"margin": 0.0}, "margin"), ({"margin": float("inf")}, "margin"),
                      ({"min_samples": 0}, "min_samples")):
        with pytest.raises(ValueError, match=match):
            os_.calibrate(q, qp, y, **kw)


def test_imports_no_torch() -> None:
    assert_imports_without_torch("training.openset, training.buffer")


# ---- real backbone taps ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_images() -> Iterator[dict]:
    """Cached real image taps (Fashion-MNIST), an open set fitted on classes 0-4, and the image backend."""
    from benchmarks.feature_cache import (
        MODALITIES,
        FeatureConfig,
        cache_key,
        extract_pools,
        load_sources,
        pool_meta,
    )
    from demodata.store import data_dir
    from export import load_backend
    from export.backends import load_manifest
    from export.errors import BackendUnavailableError, ModelFileError

    cfg = FeatureConfig(model_dir=str(MODELS))
    try:
        manifests = {m: load_manifest(m, MODELS, build=False) for m in MODALITIES}
    except (ModelFileError, FileNotFoundError) as exc:
        pytest.skip(f"exported backbones missing under {MODELS} ({exc}); run `python -m export build`")
    try:
        src = load_sources()
    except FileNotFoundError as exc:
        pytest.skip(f"offline data not prepared: {exc}")
    cache = data_dir() / "features" / cache_key(cfg, manifests)
    missing = [n for n in pool_meta(cfg, src) if not (cache / (n.replace("/", "__") + ".npz")).exists()]
    if missing:
        pytest.skip(f"feature cache {cache} lacks {len(missing)} pools (e.g. {missing[0]}); build it with "
                    "`python -c 'from benchmarks.feature_cache import extract_pools; extract_pools()'`")
    pools, _ = extract_pools(cfg, progress=False)
    try:
        backend = load_backend("image", "onnxruntime", MODELS, build=False, threads=2)
    except BackendUnavailableError as exc:
        pytest.skip(f"ONNX Runtime unavailable: {exc}")
    train, test = pools["image/train-d0"], pools["image/test-d0"]
    y = train.labels
    rank = np.zeros(len(y), int)
    for c in np.unique(y):
        rank[y == c] = np.arange(np.sum(y == c))
    fit, cal = (y < 5) & (rank < 200), (y < 5) & (rank >= 200)  # 200 / 100 train images per class

    def sel(pool, rows):
        return {"image": [t[rows] for t in pool.taps]}, np.ones((int(np.sum(rows)), 1), bool)

    os_ = OpenSet.fit(*sel(train, fit), y[fit], 10, ["image"])
    os_.calibrate(*sel(train, cal), y[cal])  # defaults: quantile 0.99, margin 1.25
    yield {"openset": os_, "test": test, "sel": sel, "backend": backend}
    backend.close()


def test_real_images_held_out_known_classes_are_known(real_images: dict) -> None:
    os_, test, sel = real_images["openset"], real_images["test"], real_images["sel"]
    assert os_.known["image"].tolist() == [True] * 5 + [False] * 5
    rate = os_.is_known(*sel(test, test.labels < 5)).mean()
    print(f"\nopen set, real image taps: threshold {os_.thresholds['image']:.4f}; "
          f"held-out test images of classes 0-4 known: {rate:.1%}")
    assert rate >= 0.95


def test_real_noise_frames_are_unknown(real_images: dict) -> None:
    os_, backend = real_images["openset"], real_images["backend"]
    rng = np.random.default_rng(0)
    scores = []
    for shape in ((32, 28, 28, 3), (8, 224, 224, 3), (4, 480, 640, 3)):
        frames = rng.integers(0, 256, shape, dtype=np.uint8)
        taps = {"image": list(backend.extract(frames).values.values())}
        assert [t.shape[1] for t in taps["image"]] == DIMS["image"]
        scores.append(os_.score(taps, np.ones((shape[0], 1), bool)))
    s = np.concatenate(scores)
    print(f"\nopen set, uint8 noise frames (28x28, 224x224, 480x640): unknown {np.mean(s > 1):.1%}, "
          f"min score {s.min():.2f}")
    assert (s > 1).all()


def test_real_unseen_classes_score_higher(real_images: dict) -> None:
    os_, test, sel = real_images["openset"], real_images["test"], real_images["sel"]
    known_s = os_.score(*sel(test, test.labels < 5))
    unseen = test.labels >= 5
    unseen_s = os_.score(*sel(test, unseen))
    per_class = {int(c): float(np.mean(unseen_s[test.labels[unseen] == c] > 1)) for c in range(5, 10)}
    auroc = float(np.mean(unseen_s[:, None] > known_s[None, :]))
    print(f"\nopen set, unseen classes 5-9 flagged unknown: {np.mean(unseen_s > 1):.1%} "
          f"(per class {', '.join(f'{c}: {v:.0%}' for c, v in per_class.items())}); "
          f"AUROC unseen vs held-out known {auroc:.3f}")
    # robust: unseen classes sit further out than held-out known ones, on average and in ranking
    assert np.median(unseen_s) > np.median(known_s) and auroc > 0.75
