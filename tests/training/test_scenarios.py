"""Scenarios: class/voice disjointness, pairing rule, saved splits with hashes, the feature-dataset loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.feature_cache import N_DOMAINS, FeatureConfig, Pool, corrupt_images, corrupt_imu, pool_meta
from benchmarks.scenarios import assemble, build_plan, plan_hash, saved_plan
from training.errors import FeatureDatasetError, ScenarioError
from training.feature_files import load_feature_dataset


def fake_pools(n_img: int = 6, n_test: int = 3) -> dict[str, Pool]:
    """Pool metadata shaped like the real one; taps encode (pool, row) so assembly can be checked."""
    pools: dict[str, Pool] = {}
    for split, n in (("train", n_img), ("test", n_test)):
        for k in range(N_DOMAINS):
            lab = np.repeat(np.arange(10), n)
            pools[f"image/{split}-d{k}"] = Pool(labels=lab, src=np.arange(len(lab)))
            pools[f"imu/{split}-d{k}"] = Pool(labels=np.repeat(np.arange(4), 10), src=np.arange(40))
    voices = [f"espeak-ng:en+{v}" for v in ("m1", "m2", "f1", "f2", "m5", "m7")] + [
        f"espeak-ng:en-gb+{v}" for v in ("m1", "m2", "f1", "f2", "m5")] + [
        f"espeak-ng:{a}+{v}" for a in ("en", "en-gb", "en-us") for v in ("m3", "f4")]
    vs = np.repeat(voices, 10)
    ys = np.tile(np.arange(10), len(voices))
    from demodata.store import voice_split

    pools["audio/all-d0"] = Pool(labels=ys, src=np.arange(len(ys)), voice=vs, split=voice_split(vs))
    for name, pool in pools.items():
        rows = np.arange(len(pool.labels), dtype=np.float32)
        pool.taps = [np.stack([rows, pool.labels.astype(np.float32)], 1), np.full((len(rows), 3), hash(name) % 97,
                                                                                   np.float32)]
    return pools


def test_class_scenario_disjoint_classes_and_pairing_rule() -> None:
    pools = fake_pools()
    plan = build_plan("class", pools, seed=3, n_tasks=5)
    order = plan["class_order"]
    assert sorted(order) == list(range(10))
    seen: set[int] = set()
    for t, entry in enumerate(plan["tasks"]):
        cls = set(entry["classes"])
        assert len(cls) == 2 and not cls & seen
        seen |= cls
        for split in ("train", "test"):
            e = entry[split]
            for lab, img, aud, imu in zip(e["label"], e["image"], e["audio"], e["imu"], strict=True):
                c = order[lab]  # renumbered label -> source class
                assert lab in (2 * t, 2 * t + 1)
                assert pools[e["pools"]["image"]].labels[img] == c
                assert pools["audio/all-d0"].labels[aud] == c
                assert pools[e["pools"]["imu"]].labels[imu] == c % 4
    assert seen == set(range(10))


def test_speech_test_voices_are_never_training_voices() -> None:
    pools = fake_pools()
    audio = pools["audio/all-d0"]
    for kind in ("class", "domain"):
        plan = build_plan(kind, pools, seed=0)
        train_v = {audio.voice[i] for e in plan["tasks"] for i in e["train"]["audio"]}
        test_v = {audio.voice[i] for e in plan["tasks"] for i in e["test"]["audio"]}
        assert train_v and test_v and not train_v & test_v
        assert all(audio.split[i] == "test" for e in plan["tasks"] for i in e["test"]["audio"])


def test_domain_scenario_new_domain_and_new_voices_each_task() -> None:
    pools = fake_pools()
    audio = pools["audio/all-d0"]
    plan = build_plan("domain", pools, seed=1)
    groups = []
    for t, entry in enumerate(plan["tasks"]):
        assert entry["domain"] == t and sorted(entry["classes"]) == list(range(10))
        assert entry["train"]["pools"]["image"] == f"image/train-d{t}"
        assert entry["test"]["pools"]["imu"] == f"imu/test-d{t}"
        assert sorted(set(entry["train"]["label"])) == list(range(10))
        groups.append({audio.voice[i] for i in entry["train"]["audio"]})
    for a in range(5):
        for b in range(a + 1, 5):
            assert not groups[a] & groups[b]


def test_plan_is_deterministic_and_seed_dependent() -> None:
    pools = fake_pools()
    a, b = build_plan("class", pools, seed=0), build_plan("class", pools, seed=0)
    assert plan_hash(a) == plan_hash(b)
    assert plan_hash(build_plan("class", pools, seed=1)) != plan_hash(a)
    with pytest.raises(ScenarioError, match="divide"):
        build_plan("class", pools, n_tasks=3)
    with pytest.raises(ScenarioError, match="kind"):
        build_plan("task", pools)


def test_saved_plan_written_with_hash_and_verified(tmp_path: Path) -> None:
    pools = fake_pools()
    plan = saved_plan("class", pools, seed=0, n_tasks=5, directory=tmp_path)
    path = next(tmp_path.glob("class-seed0-t5*.json"))
    again = saved_plan("class", pools, seed=0, n_tasks=5, directory=tmp_path)
    assert again == plan and plan["sha256"] == plan_hash(plan)
    bad = json.loads(path.read_text())
    bad["tasks"][0]["train"]["image"][0] += 1
    path.write_text(json.dumps(bad))
    with pytest.raises(ScenarioError, match="sha256"):
        saved_plan("class", pools, seed=0, n_tasks=5, directory=tmp_path)


def test_assemble_gathers_the_planned_rows() -> None:
    pools = fake_pools()
    plan = build_plan("class", pools, seed=2)
    sc = assemble(plan, pools, [f"c{i}" for i in range(10)])
    assert sc.n_tasks == 5 and sc.modalities == ["image", "audio", "imu"] and sc.num_classes == 10
    assert sc.class_names == [f"c{c}" for c in plan["class_order"]]
    t1 = sc.train[1]
    assert len(t1) == 12 and t1.task == 1 and set(t1.labels) == {2, 3}
    assert np.array_equal(t1.taps["image"][0][:, 0], np.asarray(plan["tasks"][1]["train"]["image"], np.float32))
    assert sc.tap_dims == {"image": [2, 3], "audio": [2, 3], "imu": [2, 3]}


def test_image_and_imu_domains_differ_and_are_deterministic() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, size=(4, 28, 28), dtype=np.uint8)
    clean = corrupt_images(x, 0)
    assert clean.shape == (4, 28, 28, 3) and clean.dtype == np.uint8 and np.array_equal(clean[..., 1], x)
    for d in range(1, N_DOMAINS):
        out = corrupt_images(x, d)
        assert out.shape == clean.shape and not np.array_equal(out, clean)
        assert np.array_equal(out, corrupt_images(x, d))
    imu = rng.normal(size=(3, 6, 100)).astype(np.float32)
    std = np.ones(6, np.float32)
    assert np.array_equal(corrupt_imu(imu, 0, std), imu)
    for d in range(1, N_DOMAINS):
        out = corrupt_imu(imu, d, std)
        assert out.dtype == np.float32 and np.abs(out - imu).mean() > 0.2
        assert np.array_equal(out, corrupt_imu(imu, d, std))


def test_pool_meta_on_prepared_data_keeps_voices_apart() -> None:
    try:
        from benchmarks.feature_cache import load_sources

        src = load_sources()
    except FileNotFoundError as exc:
        pytest.skip(f"offline data not prepared: {exc}")
    pools = pool_meta(FeatureConfig(image_train=5, image_test=2, domain_train=2, domain_test=1), src)
    assert len(pools["image/train-d0"].src) == 50 and len(pools["image/test-d3"].src) == 10
    plan = build_plan("domain", pools, seed=0)
    audio = pools["audio/all-d0"]
    train_v = {audio.voice[i] for e in plan["tasks"] for i in e["train"]["audio"]}
    test_v = {audio.voice[i] for e in plan["tasks"] for i in e["test"]["audio"]}
    assert not train_v & test_v


def write_features(path: Path, *, task: bool = False) -> None:
    rng = np.random.default_rng(0)
    n = 120
    labels = np.repeat(np.arange(6), 20)
    arrays = {"audio": rng.normal(size=(n, 8)).astype(np.float32),
              "visual__0": rng.normal(size=(n, 5)).astype(np.float32),
              "visual__1": rng.normal(size=(n, 7)).astype(np.float32),
              "labels": labels, "split": np.where(np.arange(n) % 4 == 0, "test", "train"),
              "present__audio": np.arange(n) % 10 != 0, "class_names": np.array([f"k{i}" for i in range(6)])}
    if task:
        arrays["task"] = np.arange(n) % 3
    np.savez(path, **arrays)


def test_feature_dataset_class_incremental(tmp_path: Path) -> None:
    write_features(tmp_path / "features.npz")
    sc = load_feature_dataset(tmp_path, n_tasks=3, seed=0)
    assert sc.kind == "class" and sc.n_tasks == 3 and sc.modalities == ["audio", "visual"]
    assert sc.tap_dims == {"audio": [8], "visual": [5, 7]}
    seen: set[int] = set()
    for t, (tr, te) in enumerate(zip(sc.train, sc.test, strict=True)):
        assert set(tr.labels) == set(te.labels) == {2 * t, 2 * t + 1} and not set(tr.labels) & seen
        seen |= set(tr.labels)
    assert sum(len(t) for t in sc.train) == 90 and sum(len(t) for t in sc.test) == 30
    assert not all(t.present[:, 0].all() for t in sc.train)
    assert sorted(sc.class_names) == [f"k{i}" for i in range(6)]


def test_feature_dataset_domain_incremental_and_errors(tmp_path: Path) -> None:
    write_features(tmp_path / "d.npz", task=True)
    sc = load_feature_dataset(tmp_path / "d.npz")
    assert sc.kind == "domain" and [t.task for t in sc.train] == [0, 1, 2]
    np.savez(tmp_path / "bad.npz", audio=np.zeros((3, 2)), labels=np.zeros(3))
    with pytest.raises(FeatureDatasetError, match="split"):
        load_feature_dataset(tmp_path / "bad.npz")
    np.savez(tmp_path / "bad2.npz", audio__x=np.zeros((3, 2)), labels=np.zeros(3), split=np.array(["train"] * 3))
    with pytest.raises(FeatureDatasetError, match="level"):
        load_feature_dataset(tmp_path / "bad2.npz")
