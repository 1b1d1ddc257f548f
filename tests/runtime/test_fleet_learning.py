"""Learning across a fleet on Flower's simulation engine (the path `benchmarks.fleet` measures):
robots learn their own tasks through the agent's learning path and gate, share skill packages
in rounds, import each other's through the same gate; a robot offline for a round catches up,
a tampered package never reaches a learner."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.fleet import Robot
from runtime.fleet.apps import simulate
from runtime.training_job import TaskSamples
from training.config import LearnerConfig, StrategyConfig

DIMS = {"image": [24, 40], "audio": [16], "imu": [12]}
FP = {"image": "img", "audio": "aud", "imu": "imu"}
KEY = bytes(range(32))
LABELS = {"t0": ["a", "b"], "t1": ["c", "d"], "t2": ["e", "f"]}


def _data(labels: list[str], n: int, seed: int) -> TaskSamples:
    centres = np.random.default_rng(123)  # the same class centres for every robot and split
    c = {lab: {m: [centres.normal(size=d) * 2.5 for d in ds] for m, ds in DIMS.items()} for lab in "abcdef"}
    rng = np.random.default_rng(seed)
    names = [lab for lab in labels for _ in range(n)]
    taps = {m: [np.stack([c[lab][m][b] + rng.normal(size=d) for lab in names]).astype(np.float32)
                for b, d in enumerate(ds)] for m, ds in DIMS.items()}
    return TaskSamples(taps=taps, present=np.ones((len(names), 3), bool), stamps=np.zeros(len(names), np.int64),
                       names=names)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet-learning")
    lcfg = LearnerConfig(training=StrategyConfig(epochs=4, max_seconds=0))
    robots = [Robot(f"robot-{i}", root, DIMS, lcfg, seed=i) for i in range(3)]
    for i, (r, task) in enumerate(zip(robots, LABELS, strict=True)):
        assert r.learn(task, LABELS[task], _data(LABELS[task], 60, i))["accepted"]
        r.export(r.tasks[-1], KEY, FP, 400_000)
    tests = [(t, _data(LABELS[t], 40, 999)) for t in LABELS]
    before = {r.name: r.accuracy(tests) for r in robots}
    # a tampered copy of robot-0's package in robot-1's outbox: the server must refuse it
    good = next(iter(robots[0].spool.pending_uploads()))[1]
    bad = bytearray(good)
    bad[-2] ^= 0x10
    (robots[1].spool.root / "outbox" / "tampered.skill").write_bytes(bytes(bad))
    (robots[2].spool.root / "offline").touch()
    r1 = simulate([(r.spool.root, r.name) for r in robots], root / "server", KEY, rounds=1)
    imports1 = {r.name: r.import_inbox(KEY, FP) for r in robots}
    after1 = {r.name: r.accuracy(tests) for r in robots}
    (robots[2].spool.root / "offline").unlink()
    r2 = simulate([(r.spool.root, r.name) for r in robots], root / "server", KEY, rounds=1)
    imports2 = {r.name: r.import_inbox(KEY, FP) for r in robots}
    after2 = {r.name: r.accuracy(tests) for r in robots}
    return {"robots": robots, "before": before, "after1": after1, "after2": after2, "imports1": imports1,
            "imports2": imports2, "rounds": r1 + r2}


def test_two_robots_exchange_their_tasks_in_one_round(fleet) -> None:
    a, b = fleet["after1"]["robot-0"], fleet["after1"]["robot-1"]
    assert fleet["before"]["robot-0"]["t1"] == 0.0 and fleet["before"]["robot-1"]["t0"] == 0.0
    assert a["t1"] >= 0.9 and b["t0"] >= 0.9  # learned from the peer's package alone
    assert a["t0"] >= fleet["before"]["robot-0"]["t0"] - 0.05 and b["t1"] >= fleet["before"]["robot-1"]["t1"] - 0.05
    got = {x["task"]: x for x in fleet["imports1"]["robot-1"]}
    assert got["t0"]["accepted"] and got["t0"]["origin"] == "robot-0" and got["t0"]["bytes"] <= 400_000
    assert [t["name"] for t in fleet["robots"][1].tasks][:2] == ["t1", "t0"]  # (t2 came in round 2)


def test_tampered_package_never_reaches_a_learner(fleet) -> None:
    rec = fleet["rounds"][0]
    assert sum(rec["refused"].values()) == 1 and any("checksum" in k for k in rec["refused"]), rec
    tasks = [x["task"] for imps in (*fleet["imports1"].values(), *fleet["imports2"].values()) for x in imps]
    assert sorted(tasks) == sorted(["t1", "t2", "t0", "t2"] + ["t0", "t1"])  # each real package once per peer


def test_offline_robot_catches_up_on_the_next_round(fleet) -> None:
    # (a node that never replied in this run is named by its Flower node id)
    assert len(fleet["rounds"][0]["missed"]) == 1 and fleet["imports1"]["robot-2"] == []
    assert fleet["rounds"][1]["missed"] == [] and "robot-2" in fleet["rounds"][1]["nodes"]
    assert fleet["after1"]["robot-2"]["t0"] == 0.0  # nothing arrived while offline
    late = fleet["after2"]["robot-2"]
    assert late["t0"] >= 0.9 and late["t1"] >= 0.9 and late["t2"] >= fleet["before"]["robot-2"]["t2"] - 0.05
    assert fleet["after2"]["robot-0"]["t2"] >= 0.9  # its own task went out on the same round
