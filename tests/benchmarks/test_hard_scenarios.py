"""Hard scenarios: plans on synthetic pool metadata (sizes, pairing, Latin square, faults), hashes, assembly."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.feature_cache import Pool
from benchmarks.hard_scenarios import (
    CONJ_IMAGES,
    FAULT_FRACTION,
    HARD,
    SPECS,
    assemble_hard,
    build_hard_plan,
    class_specs,
    saved_hard_plan,
)
from benchmarks.scenarios import MODS
from demodata.store import voice_split
from training.errors import ScenarioError


def fake_pools(n_img: int = 300, n_test: int = 100, n_dig: int = 100, n_dig_test: int = 50) -> dict[str, Pool]:
    """Pool metadata shaped like the real one (20 words); taps encode (pool id, row, label) for assembly checks."""
    pools: dict[str, Pool] = {}
    for split, n, nd, off in (("train", n_img, n_dig, 0), ("test", n_test, n_dig_test, 1000)):
        lab = np.repeat(np.arange(10), n)
        pools[f"image/{split}-d0"] = Pool(labels=lab, src=np.arange(len(lab)))
        dl = np.repeat(np.arange(10), nd)
        pools[f"image/digits-{split}-d0"] = Pool(labels=dl, src=off + np.arange(len(dl)))  # disjoint source rows
        pools[f"imu/{split}-d0"] = Pool(labels=np.tile(np.arange(4), 10), src=np.arange(40))
    voices = [f"espeak-ng:en+{v}" for v in ("m1", "m2", "f1", "f2")] + [f"espeak-ng:en+{v}" for v in ("m3", "f4")]
    vs = np.repeat(voices, 20)
    ys = np.tile(np.arange(20), len(voices))
    pools["audio/all-d0"] = Pool(labels=ys, src=np.arange(len(ys)), voice=vs, split=voice_split(vs))
    for pid, pool in enumerate(pools.values()):
        rows = np.arange(len(pool.labels), dtype=np.float32)
        pool.taps = [np.stack([np.full_like(rows, pid), rows, pool.labels.astype(np.float32)], 1),
                     np.full((len(rows), 2), pid + 0.5, np.float32)]
    return pools


@pytest.fixture(scope="module")
def pools() -> dict[str, Pool]:
    return fake_pools()


@pytest.fixture(scope="module")
def plans(pools: dict[str, Pool]) -> dict[tuple[str, int], dict]:
    return {(k, s): build_hard_plan(k, pools, seed=s) for k in HARD for s in (0, 1)}


def _source(plan: dict, e: dict, pools: dict[str, Pool], m: str, i: int) -> int:
    return int(pools[e["pools"][m][e[f"{m}_pool"][i]]].labels[e[m][i]])


@pytest.mark.parametrize("kind", HARD)
def test_plans_deterministic_per_seed_and_differ_across_seeds(kind: str, pools: dict[str, Pool],
                                                              plans: dict) -> None:
    assert build_hard_plan(kind, pools, seed=0) == plans[(kind, 0)]
    a, b = plans[(kind, 0)], plans[(kind, 1)]
    assert a["tasks"][0]["train"]["image"] != b["tasks"][0]["train"]["image"]


@pytest.mark.parametrize("kind", HARD)
def test_pairing_rule_labels_and_leave_voices_out(kind: str, pools: dict[str, Pool], plans: dict) -> None:
    plan, specs = plans[(kind, 0)], class_specs(kind)
    order, per = plan["class_order"], plan["n_classes"] // plan["n_tasks"]
    assert sorted(order) == list(range(len(specs)))
    audio = pools["audio/all-d0"]
    for t, entry in enumerate(plan["tasks"]):
        for split in ("train", "test"):
            e = entry[split]
            assert np.bincount(e["label"]).max() == SPECS[kind][split]
            used = {m: [] for m in MODS}
            for i, lab in enumerate(e["label"]):
                assert t * per <= lab < (t + 1) * per
                s = specs[order[lab]]
                fm = e["fault_mod"][i]
                if fm != MODS.index("image"):
                    assert _source(plan, e, pools, "image", i) == s["image_label"]
                    assert e["pools"]["image"][e["image_pool"][i]] == s["image"].format(split=split)
                assert _source(plan, e, pools, "audio", i) == s["word"]
                assert _source(plan, e, pools, "imu", i) == s["activity"]
                assert audio.split[e["audio"][i]] == split
                used["image"].append((e["image_pool"][i], e["image"][i]))
            assert len(set(used["image"])) == len(used["image"])  # every image at most once


def test_fewshot_at_most_20_per_class_per_task(plans: dict) -> None:
    for seed in (0, 1):
        plan = plans[("fewshot", seed)]
        assert plan["n_tasks"] == 5 and plan["n_classes"] == 10
        for entry in plan["tasks"]:
            counts = np.bincount(entry["train"]["label"])
            assert counts[counts > 0].max() <= 20 and (counts > 0).sum() == 2


def test_long_has_10_tasks_20_classes_and_disjoint_digit_rows(pools: dict[str, Pool], plans: dict) -> None:
    plan = plans[("long", 0)]
    assert plan["n_tasks"] >= 10 and plan["n_classes"] >= 20
    assert len({c for e in plan["tasks"] for c in e["classes"]}) == 20
    src = {"train": set(), "test": set()}
    for entry in plan["tasks"]:
        for split in ("train", "test"):
            e = entry[split]
            for i in range(len(e["label"])):
                key = e["pools"]["image"][e["image_pool"][i]]
                if "digits" in key:
                    src[split].add(int(pools[key].src[e["image"][i]]))
    assert len(src["train"]) == 10 * SPECS["long"]["train"] and len(src["test"]) == 10 * SPECS["long"]["test"]
    assert not src["train"] & src["test"]


def test_conjunctive_single_modality_quarter_any_two_identify(plans: dict) -> None:
    specs = class_specs("conjunctive")
    assert len(specs) == 16
    value = {"image": [s["image_label"] for s in specs], "audio": [s["word"] for s in specs],
             "imu": [s["activity"] for s in specs]}
    for m in MODS:
        assert len(set(value[m])) == 4
        assert all(value[m].count(v) == 4 for v in set(value[m]))
    for a, b in itertools.combinations(MODS, 2):
        assert len(set(zip(value[a], value[b], strict=True))) == 16
    assert set(value["image"]) == set(CONJ_IMAGES)
    plan = plans[("conjunctive", 0)]
    assert plan["n_tasks"] == 8 and max(plan["separability"].values()) == pytest.approx(0.25)


def test_faults_fraction_one_modality_each_and_stale_is_another_class(pools: dict[str, Pool], plans: dict) -> None:
    for seed in (0, 1):
        plan = plans[("faults", seed)]
        for split in ("train", "test"):
            n = faulted = 0
            kinds = {"missing": 0, "stale": 0}
            for entry in plan["tasks"]:
                e = entry[split]
                n += len(e["label"])
                for i, (fm, fk, st) in enumerate(zip(e["fault_mod"], e["fault_kind"], e["stale"], strict=True)):
                    assert (fm == -1) == (fk == "") and (fk == "stale") == (st >= 0)
                    if fm < 0:
                        continue
                    faulted += 1
                    kinds[fk] += 1
                    if fk == "stale":
                        m = MODS[fm]
                        pool = pools[e["pools"][m][e[f"{m}_pool"][i]]]
                        assert pool.labels[st] != pool.labels[e[m][i]]
                        if m == "audio":
                            assert pool.split[st] == split
            assert faulted / n == pytest.approx(FAULT_FRACTION, abs=0.02)
            assert abs(kinds["missing"] - kinds["stale"]) <= plan["n_tasks"]
    for kind in ("fewshot", "long", "conjunctive"):
        assert all(m == -1 for e in plans[(kind, 0)]["tasks"] for m in e["train"]["fault_mod"])


def test_assemble_applies_faults_as_planned(pools: dict[str, Pool], plans: dict) -> None:
    plan = plans[("faults", 0)]
    sc = assemble_hard(plan, pools, [f"c{i}" for i in range(10)])
    assert sc.kind == "faults" and sc.n_tasks == 5 and sc.num_classes == 10
    seen = {"missing": 0, "stale": 0}
    for entry, td in zip(plan["tasks"], sc.test, strict=True):
        e = entry["test"]
        assert td.labels.tolist() == e["label"]
        for i in range(len(td)):
            fm, fk = e["fault_mod"][i], e["fault_kind"][i]
            for mi, m in enumerate(MODS):
                pool = pools[e["pools"][m][e[f"{m}_pool"][i]]]
                got = td.taps[m][0][i]
                if mi == fm and fk == "missing":
                    assert not td.present[i, mi] and (got == 0).all() and (td.taps[m][1][i] == 0).all()
                    seen["missing"] += 1
                    continue
                assert td.present[i, mi]
                row = e["stale"][i] if mi == fm else e[m][i]
                np.testing.assert_allclose(got, pool.taps[0][row], atol=0)
                np.testing.assert_allclose(td.taps[m][1][i], pool.taps[1][row], atol=0)
                if mi == fm:
                    assert got[2] != pool.labels[e[m][i]]  # the stale reading carries another class
                    seen["stale"] += 1
    assert seen["missing"] > 10 and seen["stale"] > 10


def test_assemble_long_mixes_two_image_pools(pools: dict[str, Pool], plans: dict) -> None:
    plan = plans[("long", 0)]
    sc = assemble_hard(plan, pools, [f"c{i}" for i in range(20)])
    assert sc.num_classes == 20 and sc.n_tasks == 10
    ids = {int(pid) for td in sc.train for pid in td.taps["image"][0][:, 0]}
    names = list(pools)
    assert {names[i] for i in ids} == {"image/train-d0", "image/digits-train-d0"}
    assert all(td.present.all() for td in sc.train + sc.test)


def test_saved_plan_verifies_sha256(tmp_path: Path, pools: dict[str, Pool]) -> None:
    plan = saved_hard_plan("faults", pools, seed=2, directory=tmp_path, pools_id="abc")
    path = tmp_path / "hard-faults-seed2-abc.json"
    assert path.exists() and saved_hard_plan("faults", pools, seed=2, directory=tmp_path, pools_id="abc") == plan
    doc = json.loads(path.read_text())
    doc["tasks"][0]["train"]["fault_mod"][0] = (doc["tasks"][0]["train"]["fault_mod"][0] + 2) % 3
    path.write_text(json.dumps(doc))
    with pytest.raises(ScenarioError, match="sha256"):
        saved_hard_plan("faults", pools, seed=2, directory=tmp_path, pools_id="abc")


def test_too_small_pools_and_unknown_kind_are_errors() -> None:
    with pytest.raises(ScenarioError, match="raise the FeatureConfig"):
        build_hard_plan("conjunctive", fake_pools(n_test=20), seed=0)
    with pytest.raises(ScenarioError, match="one of"):
        build_hard_plan("easy", fake_pools(), seed=0)
