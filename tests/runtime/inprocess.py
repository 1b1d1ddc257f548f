"""An agent in the test process with real dataset publishers (a thread), real sockets on
loopback, real ONNX Runtime backbones and real learning workers; shared by the in-process tests."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.harness import free_ports
from demodata.publish import DatasetStreamer, StreamerConfig
from runtime import keys
from runtime.agent import Agent, ServeConfig
from runtime.config import AgentConfig, ControlConfig, FleetConfig
from runtime.console import ControlClient
from training.config import LearnerConfig


@contextmanager
def agent_system(root: Path, *, classes: list[int], serve: ServeConfig, learner: LearnerConfig,
                 fleet: FleetConfig | None = None) -> Iterator[dict[str, Any]]:
    """Publishers of ``classes`` (1 s dwell, a new image per frame) and a started agent with a
    CurveZMQ operator "op"; yields agent, client, ports, root, cfgs, kdir and the streamer (its
    ``show(class, seconds)`` holds a class in front of the robot)."""
    kdir = root / "keys"
    keys.create("server", kdir)
    keys.create("op", kdir)
    ports = dict(zip(("sensors", "pred", "control"), free_ports(3), strict=True))
    stop = threading.Event()
    streamer = DatasetStreamer(StreamerConfig(endpoint=f"tcp://127.0.0.1:{ports['sensors']}", classes=classes,
                                              dwell_s=1.0, camera_resample="frame", split="test"))
    thread = threading.Thread(target=streamer.run, args=(stop,), daemon=True)
    thread.start()
    assert streamer.ready.wait(30)
    cfg = AgentConfig(sensors=[f"tcp://127.0.0.1:{ports['sensors']}"], predictions=f"tcp://127.0.0.1:{ports['pred']}",
                      backend="onnxruntime", checkpoint_dir=root / "state", min_new_task_acc=0.5, max_old_task_drop=0.3)
    ccfg = ControlConfig(endpoint=f"tcp://127.0.0.1:{ports['control']}", keys_dir=kdir)
    agent = Agent(cfg, ccfg, serve, learner, fleet=fleet).start()
    client = ControlClient(ccfg.endpoint, keys_dir=kdir, key_name="op", timeout_s=10.0)
    try:
        yield {"agent": agent, "client": client, "ports": ports, "root": root, "cfgs": (cfg, ccfg, serve, learner),
               "kdir": kdir, "streamer": streamer}
    finally:
        client.close()
        agent.stop()
        stop.set()
        thread.join(timeout=10)


def learn_from_dataset(client: ControlClient, name: str, labels: list[str], timeout_s: float = 180.0) -> dict[str, Any]:
    """``learn-new-task`` from the dataset's train split, waited for; the accepted job's result."""
    from benchmarks.harness import wait_job

    snap = wait_job(client, client.request("learn-new-task", {"name": name, "labels": labels,
                                                              "source": "dataset:train"})["job"], timeout_s)
    assert snap["state"] == "done" and snap["result"]["accepted"], snap
    return snap["result"]
