"""End-to-end latency of the agent on live (replayed dataset) streams, idle and while learning.

Usage::

    python -m benchmarks.pipeline [--seconds 20] [--backend onnxruntime]

In one run, on this machine: dataset publishers stream camera (30 Hz), mic and IMU over
loopback TCP; a real agent (CurveZMQ control, ONNX Runtime backbones) learns a first task,
then serves. Reported:

- end-to-end latency p50/p99: sensor stamp of the newest data in a sample -> prediction
  published (measured by the agent, and by a subscriber of the predictions socket);
- bare backbones: the same three backbones on the same kind of samples, called directly;
  the ratio e2e / bare is the pipeline's overhead (receive, windows, side network, publish);
- p99 while a learn-new-task runs vs idle.

Goals (2 CPU cores): e2e p99 < 33 ms, overhead <= 15 %, p99 while learning <= 1.25 x idle.
Writes ``benchmarks/results/pipeline.json`` and ``pipeline.png``; the last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import zmq

from runtime import keys
from runtime.agent import Agent, ServeConfig
from runtime.config import AgentConfig, ControlConfig
from runtime.console import ControlClient
from runtime.sources import dataset_samples
from sensors.datasets.publish import DatasetStreamer, StreamerConfig
from training.learner import LearnerConfig

RESULTS = Path("benchmarks/results")


def _port() -> int:
    s = zmq.Context.instance().socket(zmq.REP)
    p = s.bind_to_random_port("tcp://127.0.0.1")
    s.close(0)
    return p


def _collect(sub: zmq.Socket, seconds: float) -> list[float]:
    out: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if sub.poll(100):
            msg = msgpack.unpackb(sub.recv_multipart()[-1])
            out.append((time.time_ns() - msg["stamp_ns"]) / 1e6)
    return out


def _pct(x: list[float]) -> dict[str, float | int | None]:
    a = np.asarray(x, dtype=float)
    if not a.size:
        return {"n": 0, "p50": None, "p99": None}
    return {"n": int(a.size), "p50": round(float(np.percentile(a, 50)), 3), "p99": round(float(np.percentile(a, 99)), 3)}


def run(seconds: float, backend: str) -> dict:
    root = Path(tempfile.mkdtemp(prefix="continua-pipeline-"))
    kdir = root / "keys"
    keys.create("server", kdir)
    keys.create("bench", kdir)
    ports = {k: _port() for k in ("s", "p", "c")}
    stop = threading.Event()
    streamer = DatasetStreamer(StreamerConfig(endpoint=f"tcp://127.0.0.1:{ports['s']}", classes=list(range(10)),
                                              dwell_s=1.0, camera_resample="frame"))
    t = threading.Thread(target=streamer.run, args=(stop,), daemon=True)
    t.start()
    streamer.ready.wait(30)
    cfg = AgentConfig(sensors=[f"tcp://127.0.0.1:{ports['s']}"], predictions=f"tcp://127.0.0.1:{ports['p']}",
                      backend=backend, checkpoint_dir=root / "state", max_old_task_drop=1.0, min_new_task_acc=0.0)
    ccfg = ControlConfig(endpoint=f"tcp://127.0.0.1:{ports['c']}", keys_dir=kdir)
    agent = Agent(cfg, ccfg, ServeConfig(dataset_per_class=100), LearnerConfig()).start()
    client = ControlClient(ccfg.endpoint, keys_dir=kdir, key_name="bench", timeout_s=10)
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.connect(cfg.predictions)
    sub.subscribe(b"prediction")
    try:
        job = client.request("learn-new-task", {"name": "t0", "labels": ["t-shirt", "trouser", "pullover", "dress"],
                                                "source": "dataset:train"})["job"]
        while client.request("job", {"id": job})["state"] == "running":
            time.sleep(0.2)
        _collect(sub, 2.0)  # warm up
        agent.latency_ms.clear()
        idle = _collect(sub, seconds)
        idle_agent = list(agent.latency_ms)
        # bare backbones on the same kind of samples (same process, same threads)
        samples, _ = dataset_samples(["coat", "bag"], "test", per_class=50)
        bare = []
        for s in samples:
            t0 = time.perf_counter()
            agent.features.extract([s])
            bare.append((time.perf_counter() - t0) * 1e3)
        # while learning; first drop the predictions queued in our SUB socket while we measured
        # the bare backbones (reading them now would add their queueing time to the latency)
        while sub.poll(0):
            sub.recv_multipart()
        agent.latency_ms.clear()
        job = client.request("learn-new-task", {"name": "t1", "labels": ["coat", "sandal", "shirt", "sneaker"],
                                                "source": "dataset:train"})["job"]
        learning: list[float] = []
        learn_start = time.monotonic()
        while client.request("job", {"id": job})["state"] == "running":
            learning += _collect(sub, 0.5)
        learn_s = time.monotonic() - learn_start
        learning_agent = list(agent.latency_ms)
    finally:
        sub.close(0)
        client.close()
        agent.stop()
        stop.set()
        t.join(timeout=10)
    res = {
        "backend": backend,
        "seconds": seconds,
        "e2e_subscriber_ms": _pct(idle),
        "e2e_agent_ms": _pct(idle_agent),
        "bare_backbones_ms": _pct(bare),
        "overhead_ratio_p50": round(_pct(idle)["p50"] / _pct(bare)["p50"], 3) if idle and bare else None,
        "learning_ms": _pct(learning),
        "learning_agent_ms": _pct(learning_agent),
        "learning_seconds": round(learn_s, 2),
        "p99_learning_over_idle": round(_pct(learning)["p99"] / _pct(idle)["p99"], 3) if learning and idle else None,
        "goals": {"e2e_p99_lt_33ms": None, "overhead_le_15pct": None, "learning_p99_le_1.25x": None},
    }
    res["goals"] = {
        "e2e_p99_lt_33ms": bool(idle) and _pct(idle)["p99"] < 33,
        "overhead_le_15pct": res["overhead_ratio_p50"] is not None and res["overhead_ratio_p50"] <= 1.15,
        "learning_p99_le_1.25x": res["p99_learning_over_idle"] is not None and res["p99_learning_over_idle"] <= 1.25,
    }
    _plot(idle, bare, learning)
    return res


def _plot(idle: list[float], bare: list[float], learning: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    data = [x for x in (bare, idle, learning)]
    ax.boxplot([d if d else [np.nan] for d in data], tick_labels=["bare backbones", "e2e idle", "e2e learning"],
               showfliers=True, whis=(1, 99))
    ax.axhline(33, color="r", ls="--", lw=1, label="33 ms (one frame at 30 Hz)")
    ax.set(ylabel="latency (ms)", title="continua pipeline latency (whiskers p1..p99)")
    ax.legend()
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "pipeline.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.pipeline", description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--backend", default="onnxruntime")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    res = run(args.seconds, args.backend)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pipeline.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
