"""The learning job on a real agent (in this process) with real publishers, backbones and workers:
a SIGKILLed worker, cancel, the held-out reservoir, the prediction message, the open set."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from benchmarks.harness import free_ports, wait_job
from runtime.agent import Agent, ServeConfig
from runtime.config import AgentConfig, ControlConfig
from runtime.console import ControlClient
from tests.runtime.inprocess import agent_system
from training.buffer import ReplayBuffer
from training.config import StrategyConfig
from training.learner import LearnerConfig

TASK0 = ["t-shirt", "trouser"]
TASK1 = ["pullover", "dress"]


def _wait(client: ControlClient, job: str, timeout_s: float = 180.0, until=None) -> dict:
    return wait_job(client, job, timeout_s, until)


def _predictions(endpoint: str, n: int, timeout_s: float = 20.0) -> list[dict]:
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.connect(endpoint)
    sub.subscribe(b"prediction")
    got: list[dict] = []
    end = time.monotonic() + timeout_s
    try:
        while len(got) < n and time.monotonic() < end:
            if sub.poll(200):
                got.append(msgpack.unpackb(sub.recv_multipart()[-1]))
    finally:
        sub.close(0)
    return got


def _committed(state: Path) -> dict[str, bytes]:
    latest = (state / "LATEST").read_text().strip()
    return {p.name: p.read_bytes() for p in sorted((state / latest).iterdir())}


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    with agent_system(tmp_path_factory.mktemp("learning"), classes=[0, 1, 2, 3],
                      serve=ServeConfig(dataset_per_class=40, eval_per_class=20),
                      learner=LearnerConfig(training=StrategyConfig(epochs=6))) as sys_:
        snap = _wait(sys_["client"], sys_["client"].request("learn-new-task", {"name": "task0", "labels": TASK0,
                                                                               "source": "dataset:train"})["job"])
        assert snap["state"] == "done" and snap["result"]["accepted"], snap
        yield sys_


def test_sigkill_of_the_worker_mid_training_fails_the_job_and_changes_nothing(system):
    client, agent = system["client"], system["agent"]
    state = system["root"] / "state"
    before = _committed(state)
    job = client.request("learn-new-task", {"name": "task1", "labels": TASK1, "source": "dataset:train"})["job"]
    snap = _wait(client, job, until=lambda s: s["phase"].startswith("training step"))
    assert snap["state"] == "running", snap
    pid = snap["meta"]["worker_pid"]
    assert pid != os.getpid()
    os.kill(pid, signal.SIGKILL)
    snap = _wait(client, job, 60)
    assert snap["state"] == "failed" and "SIGKILL" in str(snap["error"]), snap
    st = client.request("status")
    assert st["model_version"] == 1 and st["tasks"] == ["task0"] and st["classes"] == TASK0 and st["persisted"]
    assert st["worker_pid"] is None
    assert _committed(state) == before  # the checkpoint store is untouched, byte for byte
    preds = _predictions(f"tcp://127.0.0.1:{system['ports']['pred']}", 15)
    assert len(preds) == 15 and all(p["model_version"] == 1 and p["label"] in TASK0 for p in preds)
    assert agent.learning.job_dirs() == []  # the job directory is removed


def test_cancel_during_training_and_during_capture(system):
    client = system["client"]
    job = client.request("learn-new-task", {"name": "task1", "labels": TASK1, "source": "dataset:train"})["job"]
    _wait(client, job, until=lambda s: s["phase"].startswith(("training step", "extracting")))
    assert client.request("cancel")["cancelled"] is True
    snap = _wait(client, job, 60)
    assert snap["state"] == "cancelled", snap
    job = client.request("learn-new-task", {"name": "task1", "labels": TASK1, "source": "live:5"})["job"]
    _wait(client, job, 30, until=lambda s: s["phase"].startswith("capturing"))
    assert client.request("cancel")["cancelled"] is True
    snap = _wait(client, job, 30)
    assert snap["state"] == "cancelled", snap
    st = client.request("status")
    assert st["model_version"] == 1 and st["worker_pid"] is None and st["taught"] == {}


def test_reservoir_keeps_the_holdout_apart_and_the_gate_uses_it(system):
    client, agent = system["client"], system["agent"]
    res0 = ReplayBuffer.from_state_dict(agent.files.decode(["reservoir"])["reservoir"])
    assert len(res0) == 16 and set(res0.class_counts()) == {0, 1}  # 20 % of 2 x 40 dataset samples
    job = client.request("learn-new-task", {"name": "task1", "labels": TASK1, "source": "dataset:train"})["job"]
    snap = _wait(client, job)
    assert snap["state"] == "done" and snap["result"]["accepted"], snap
    r = snap["result"]
    assert r["holdout_samples"] == 16 and r["train_samples"] == 64 and r["split"] == {"pullover": "random", "dress": "random"}
    assert r["old_acc_before"] is not None and r["old_acc_after"] is not None  # old tasks checked on the reservoir
    assert r["export"] == "template"  # traced while the samples were coming, filled after training
    assert len(r["accuracy_row"]) == 2
    state = agent.files.decode(["reservoir", "buffer"])
    res = ReplayBuffer.from_state_dict(state["reservoir"])
    buf = ReplayBuffer.from_state_dict(state["buffer"]).all()
    assert res.class_counts() == {0: 8, 1: 8, 2: 8, 3: 8}
    # no held-out sample was trained on: none of their taps is in the replay buffer (which holds what was)
    held = res.all()
    train_rows = {x.tobytes() for x in buf.taps["image"][3].astype(np.float16)}
    assert not any(x.tobytes() in train_rows for x in held.taps["image"][3].astype(np.float16))
    ev = _wait(client, client.request("evaluate", {"split": "heldout"})["job"], 60)
    assert ev["state"] == "done" and [t["task"] for t in ev["result"]["tasks"]] == ["task0", "task1"]
    assert all(t["samples"] == 16 and t["accuracy"] >= 0.5 for t in ev["result"]["tasks"]), ev


def test_prediction_message_carries_camera_latency_ages_and_smoothing(system):
    preds = _predictions(f"tcp://127.0.0.1:{system['ports']['pred']}", 30)
    assert len(preds) == 30
    last = preds[-1]
    for key in ("label", "confidence", "known", "novelty", "unknown", "smoothed_label", "smoothed_confidence",
                "latency_ms", "latency_from", "age_ms", "frame_stamp_ns", "model_version"):
        assert key in last, key
    assert all(p["latency_from"] == "image" and p["stamp_ns"] == p["frame_stamp_ns"] > 0 for p in preds)
    assert all(0 < p["latency_ms"] < 2000 and abs(p["age_ms"]["image"] - p["latency_ms"]) < 1.0 for p in preds)
    # audio and IMU taps are computed as their data arrives: their newest covered sample is recent
    assert all(p["age_ms"]["audio"] is not None and 0 <= p["age_ms"]["audio"] < 400 for p in preds[-10:])
    assert all(p["age_ms"]["imu"] is not None and 0 <= p["age_ms"]["imu"] < 400 for p in preds[-10:])
    classes = set(system["agent"].server.served.class_names)
    assert all(p["smoothed_label"] in classes | {"unknown"} for p in preds)
    assert all(p["unknown"] == (not p["known"] or p["confidence"] < 0.5) for p in preds)


def test_noise_frames_through_the_imagezmq_bridge_are_unknown(system, tmp_path):
    """A camera-only stream of random noise: the softmax is confident, the open set is not."""
    imagezmq = pytest.importorskip("imagezmq")
    from sensors.bridge import ImageZmqBridge, ImageZmqBridgeConfig

    _, _, scfg, _ = system["cfgs"]
    state = tmp_path / "state"
    shutil.copytree(system["root"] / "state", state)
    src, out, pred, ctl = free_ports(4)
    sender = imagezmq.ImageSender(connect_to=f"tcp://127.0.0.1:{src}", REQ_REP=False)
    bridge = ImageZmqBridge(ImageZmqBridgeConfig(connect=[f"tcp://127.0.0.1:{src}"], publish=f"tcp://127.0.0.1:{out}"))
    stop = threading.Event()
    bt = threading.Thread(target=bridge.run, args=(stop,), daemon=True)
    bt.start()
    cfg2 = AgentConfig(sensors=[f"tcp://127.0.0.1:{out}"], predictions=f"tcp://127.0.0.1:{pred}", backend="onnxruntime",
                       checkpoint_dir=state)
    agent = Agent(cfg2, ControlConfig(endpoint=f"tcp://127.0.0.1:{ctl}", insecure=True), scfg, LearnerConfig())
    assert agent.restore() and agent.server.served.openset is not None
    agent.start()
    rng = np.random.default_rng(0)
    feeding = threading.Event()

    def feed() -> None:
        while not feeding.is_set():
            sender.send_image("noise", rng.integers(0, 256, (240, 320, 3), dtype=np.uint8))
            time.sleep(1 / 20)

    ft = threading.Thread(target=feed, daemon=True)
    ft.start()
    try:
        preds = _predictions(f"tcp://127.0.0.1:{pred}", 40, timeout_s=30)
    finally:
        feeding.set()
        ft.join(5)
        agent.stop()
        stop.set()
        bt.join(5)
        bridge.close()
        sender.close()
    assert len(preds) >= 30, len(preds)
    assert all(p["present"] == {"image": True, "audio": False, "imu": False} for p in preds), [
        (p["present"], p["model_version"]) for p in preds]
    assert all(p["label"] in TASK0 + TASK1 for p in preds)  # the classifier still names a class...
    assert all(p["known"] is False and p["unknown"] and p["novelty"] > 1.0 for p in preds)  # ...the open set does not
    assert all(p["smoothed_label"] == "unknown" for p in preds[5:])
