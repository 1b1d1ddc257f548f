"""Skill packages between two real agents (in this process, real publishers, backbones and workers):
export-skill on one, import-skill on the other through the same gate, predictions all along;
tampered, clashing and out-of-place packages refused with their reasons."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from benchmarks.harness import wait_job
from runtime.agent import ServeConfig
from runtime.config import FleetConfig
from tests.runtime.inprocess import agent_system, learn_from_dataset
from training import skills
from training.config import StrategyConfig
from training.learner import LearnerConfig

TASK_A = ["t-shirt", "trouser"]
TASK_B = ["pullover", "dress"]


@pytest.fixture(scope="module")
def robots(tmp_path_factory):
    root = tmp_path_factory.mktemp("skills")
    key = skills.new_key(root / "fleet.key")
    serve = ServeConfig(dataset_per_class=40, eval_per_class=20)
    learner = LearnerConfig(training=StrategyConfig(epochs=4))
    with agent_system(root / "a", classes=[0, 1], serve=serve, learner=learner,
                      fleet=FleetConfig(key_file=key, robot="robot-a")) as a:
        learn_from_dataset(a["client"], "shirts", TASK_A)
        exported = wait_job(a["client"], a["client"].request("export-skill", {"task": "shirts"})["job"], 120)
        with agent_system(root / "b", classes=[0, 1, 2, 3], serve=serve, learner=learner,
                          fleet=FleetConfig(key_file=key, robot="robot-b")) as b:
            learn_from_dataset(b["client"], "tops", TASK_B)
            yield {"a": a, "b": b, "exported": exported, "key": key}


def test_export_writes_a_signed_bounded_package(robots) -> None:
    snap = robots["exported"]
    assert snap["state"] == "done", snap
    r = snap["result"]
    path = Path(r["skill_file"])
    assert path.parent == robots["a"]["agent"].skills.skills_dir and path.is_file()
    data = path.read_bytes()
    h = skills.read_header(data, skills.load_key(robots["key"]))
    assert h["task"] == "shirts" and h["labels"] == TASK_A and h["origin"] == "robot-a"
    assert h["fingerprints"] == robots["a"]["agent"].fingerprints
    assert len(data) == r["skill_bytes"] <= 1_000_000 and h["exemplars"] == r["exemplars"] > 0
    assert skills.skill_id(data) == r["skill_id"]


def _copy_to_b(robots, name: str, data: bytes) -> str:
    d = robots["b"]["agent"].skills.skills_dir
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)
    return name


def test_refused_packages_change_nothing(robots) -> None:
    client, agent = robots["b"]["client"], robots["b"]["agent"]
    good = Path(robots["exported"]["result"]["skill_file"]).read_bytes()
    version = agent.version
    bad = bytearray(good)
    bad[-3] ^= 0xFF
    snap = wait_job(client, client.request("import-skill", {"path": _copy_to_b(robots, "bad.skill", bytes(bad))})["job"])
    assert snap["state"] == "failed" and "checksum mismatch" in snap["error"], snap
    foreign = skills.sign(skills.read_header(good, None), good[len(good) - skills.read_header(good, None)["payload_bytes"]:],
                          bytes(32))
    snap = wait_job(client, client.request("import-skill", {"path": _copy_to_b(robots, "foreign.skill", foreign)})["job"])
    assert snap["state"] == "failed" and "another fleet's key" in snap["error"], snap
    reply = client.call("import-skill", {"path": "../a/fleet.key"})
    assert reply["ok"] is False and reply["error"]["code"] == "bad_args", reply
    assert agent.version == version and [t["name"] for t in agent.tasks] == ["tops"]
    assert sum(agent.skills.stats()["refused"].values()) == 2


def test_import_learns_the_peers_task_through_the_gate_while_serving(robots) -> None:
    client, agent = robots["b"]["client"], robots["b"]["agent"]
    src = Path(robots["exported"]["result"]["skill_file"])
    before = client.request("status")["predictions"]
    snap = wait_job(client, client.request("import-skill", {"path": _copy_to_b(robots, src.name, src.read_bytes())})["job"],
                    180)
    assert snap["state"] == "done" and snap["result"]["accepted"], snap
    assert client.request("status")["predictions"] > before  # predictions never stopped
    names = {t["name"]: t for t in agent.tasks}
    assert set(names) == {"tops", "shirts"} and names["shirts"]["origin"] == "robot-a"
    assert set(agent.server.served.class_names) == set(TASK_A + TASK_B)
    ev = wait_job(client, client.request("evaluate", {"split": "test"})["job"], 120)
    acc = {t["task"]: t["accuracy"] for t in ev["result"]["tasks"]}
    assert acc["shirts"] >= 0.8 and acc["tops"] >= 0.8, ev  # learned without a single local sample of it
    # the same package again: its classes are known now
    snap = wait_job(client, client.request("import-skill", {"path": src.name})["job"])
    assert snap["state"] == "failed" and "class names clash" in snap["error"], snap
    shutil.rmtree(agent.skills.skills_dir, ignore_errors=True)
