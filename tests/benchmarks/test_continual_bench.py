"""benchmarks.continual end to end on a small pre-extracted feature file: JSON shape, intervals, pairing."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from benchmarks import continual
from training.metrics import ci95, paired_difference


def _features(path, n_per_class: int = 24, classes: int = 6) -> None:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(classes), n_per_class)
    centers = {m: rng.normal(size=(classes, d)) for m, d in (("audio", 12), ("image", 32), ("imu", 8))}
    arrays = {m: (c[y] + 0.7 * rng.normal(size=(len(y), c.shape[1]))).astype(np.float32) for m, c in centers.items()}
    arrays["image__1"] = arrays.pop("image")
    arrays["image__0"] = arrays["image__1"][:, :16].copy()
    present = rng.random(len(y)) > 0.2
    arrays.update(labels=y, split=np.where(np.arange(len(y)) % 4 == 0, "test", "train"), present__imu=present)
    np.savez(path, **arrays)


def test_continual_prints_intervals_bytes_and_paired_ablations(tmp_path, capsys) -> None:
    _features(tmp_path / "f.npz")
    rc = continual.main(["--features", str(tmp_path / "f.npz"), "--strategies", "naive,replay,ours,ours-full,ours-no-nme",
                         "--seeds", "2", "--epochs", "1", "--out", str(tmp_path / "out"), "--replay-bytes", "200"])
    assert rc == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(line) == {"naive", "replay", "ours", "ours-full", "ours-no-nme"}
    for r in line.values():
        for key in ("acc", "bwt", "fwt", "forgetting"):
            assert 0.0 <= r["acc"]["mean"] <= 1.0 and len(r[key]["per_seed"]) == 2
            assert math.isclose(r[key]["mean"], float(np.mean(r[key]["per_seed"])), abs_tol=1e-12)
            assert math.isclose(r[key]["ci95"], ci95(r[key]["per_seed"]), abs_tol=1e-12)
    assert line["naive"]["bytes_per_sample"] == 0 and 0 < line["replay"]["bytes_per_sample"] <= 200
    doc = json.loads(next((tmp_path / "out").glob("continual-*.json")).read_text())
    nme = doc["comparisons"]["ablations"]["nme"]
    want = paired_difference(line["ours-full"]["acc"]["per_seed"], line["ours-no-nme"]["acc"]["per_seed"])
    assert nme["mean"] == pytest.approx(want["mean"]) and nme["earns_place"] == (want["excludes_zero"]
                                                                              and want["mean"] > 0)


def test_paired_difference_and_interval() -> None:
    # t(4) = 2.776: five seeds, differences 1..5 -> mean 3, sample std 1.58, half-width 1.96
    d = paired_difference([2, 3, 4, 5, 6], [1, 1, 1, 1, 1])
    assert d["mean"] == pytest.approx(3.0) and d["ci95"] == pytest.approx(2.776 * math.sqrt(2.5) / math.sqrt(5))
    assert d["excludes_zero"]
    assert not paired_difference([1.0, 2.0, 1.0], [1.5, 1.0, 1.5])["excludes_zero"]
    assert math.isnan(ci95([0.5]))


def test_config_refuses_unknown_scenarios_and_suites() -> None:
    with pytest.raises(ValueError, match="scenario"):
        continual.Config(scenario="nope")
    with pytest.raises(ValueError, match="suite"):
        continual.Config(suite="easy")
    assert continual.Config(suite="hard").kinds() == ["fewshot", "long", "conjunctive", "faults"]
    assert continual.expand(["baselines", "ours"])[-1] == "ours" and "slda" in continual.expand(["baselines"])
