"""End to end on loopback: dataset publishers -> a real agent (ONNX Runtime backbones,
CurveZMQ control) -> a real console client. Teach tasks, see predictions, roll back,
restart from the checkpoint."""

from __future__ import annotations

import time
from pathlib import Path

import msgpack
import pytest
import zmq

from benchmarks.harness import wait_job
from runtime import keys
from runtime.agent import Agent, ServeConfig
from runtime.console import ControlClient
from tests.runtime.inprocess import agent_system
from training.learner import LearnerConfig

TASK0 = ["t-shirt", "trouser"]
TASK1 = ["pullover", "dress"]


def _wait(client: ControlClient, job: str, timeout_s: float = 120.0) -> dict:
    return wait_job(client, job, timeout_s)


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    with agent_system(tmp_path_factory.mktemp("agent"), classes=[0, 1],
                      serve=ServeConfig(dataset_per_class=30, eval_per_class=20), learner=LearnerConfig()) as sys_:
        yield sys_


def test_learns_first_task_and_serves_predictions(system):
    client: ControlClient = system["client"]
    job = client.request("learn-new-task", {"name": "task0", "labels": TASK0, "source": "dataset:train"})["job"]
    snap = _wait(client, job)
    assert snap["state"] == "done", snap
    res = snap["result"]
    assert res["accepted"] is True and res["model_version"] == 1
    assert res["new_task_acc"] >= 0.5
    st = client.request("status")
    assert st["classes"] == TASK0 and st["tasks"] == ["task0"] and st["persisted"] is True
    # predictions on the PUB socket: the publisher shows classes 0 and 1 = TASK0
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.connect(f"tcp://127.0.0.1:{system['ports']['pred']}")
    sub.subscribe(b"prediction")
    got = []
    end = time.monotonic() + 20
    while len(got) < 20 and time.monotonic() < end:
        if sub.poll(500):
            got.append(msgpack.unpackb(sub.recv_multipart()[-1]))
    sub.close(0)
    assert len(got) >= 20
    assert all(p["label"] in TASK0 and p["model_version"] == 1 for p in got)
    assert all(p["present"] == {"image": True, "audio": True, "imu": True} for p in got[-5:])
    assert all(0.0 < p["latency_ms"] < 5000 for p in got)
    assert all(abs(sum(x for _, x in p["topk"]) - 1.0) < 1e-3 for p in got if len(p["topk"]) == 2)


def test_learns_second_task_without_forgetting_and_rejects_bad_requests(system):
    client: ControlClient = system["client"]
    job = client.request("learn-new-task", {"name": "task1", "labels": TASK1, "source": "dataset:train"})["job"]
    # a second learn-new-task while one runs is refused as busy
    reply = client.call("learn-new-task", {"name": "task9", "labels": ["coat"], "source": "dataset:train"})
    assert reply["ok"] is False and reply["error"]["code"] == "busy"
    snap = _wait(client, job)
    assert snap["state"] == "done" and snap["result"]["accepted"] is True, snap
    assert client.request("status")["model_version"] == 2
    ev = _wait(client, client.request("evaluate", {"split": "test"})["job"])
    accs = {t["task"]: t["accuracy"] for t in ev["result"]["tasks"]}
    assert set(accs) == {"task0", "task1"}
    assert accs["task0"] > 0.6 and accs["task1"] > 0.6, accs
    # bad requests get error replies, never a crash
    assert client.call("fly-to-the-moon")["error"]["code"] == "unknown_command"
    assert client.call("learn-new-task", {"name": "x", "labels": "coat", "source": "dataset:train"})["error"]["code"] == "bad_args"
    bad = client.call("learn-new-task", {"name": "x", "labels": ["unicorn"], "source": "dataset:train"})
    assert bad["ok"] is True  # accepted as a job, fails with a clear error
    snap = _wait(client, bad["result"]["job"])
    assert snap["state"] == "failed" and "unicorn" in snap["error"]["message"] if isinstance(snap["error"], dict) else "unicorn" in str(snap["error"])
    dup = _wait(client, client.request("learn-new-task", {"name": "task1", "labels": ["coat"], "source": "dataset:train"})["job"])
    assert dup["state"] == "failed" and "exists" in str(dup["error"])


def test_teach_live_samples(system):
    client: ControlClient = system["client"]
    snap = _wait(client, client.request("teach", {"label": "mug", "seconds": 1.5})["job"])
    assert snap["state"] == "done" and snap["result"]["samples"] >= 3, snap
    assert client.request("status")["taught"]["mug"] == snap["result"]["samples"]


def test_rollback_and_restart_resume(system):
    client: ControlClient = system["client"]
    res = client.request("rollback")
    assert res["model_version"] == 1 and res["tasks"] == ["task0"]
    st = client.request("status")
    assert st["classes"] == TASK0 and st["model_version"] == 1
    # a fresh agent on the same state directory resumes the committed model
    cfg, ccfg, scfg, lcfg = system["cfgs"]
    agent2 = Agent(cfg, ccfg, scfg, lcfg)
    try:
        assert agent2.restore() is True
        assert agent2.version == 1 and [t["name"] for t in agent2.tasks] == ["task0"]
        a, b = system["agent"].files, agent2.files
        assert a is not None and b is not None and a.entries == b.entries
        assert all(a.files[f] == b.files[f] for f in a.files)  # learner, buffer, reservoir, ONNX: bit for bit
        assert agent2.server.served.class_names == tuple(TASK0)
    finally:
        agent2.stop()


def test_unauthenticated_console_gets_nothing(system, tmp_path: Path):
    other = tmp_path / "keys"
    keys.create("server", other)
    keys.create("mallory", other)
    # mallory knows the real server key but is not on the allow-list
    (other / "server.key").write_bytes((system["kdir"] / "server.key").read_bytes())
    endpoint = system["agent"].control.config.endpoint
    with ControlClient(endpoint, keys_dir=other, key_name="mallory", timeout_s=1.5) as c, \
            pytest.raises(Exception, match="no reply"):
        c.request("status")
