"""End-to-end latency of the agent on live (replayed dataset) streams, idle and while learning.

Usage::

    python -m benchmarks.pipeline [--seconds 15] [--backend onnxruntime]

In one run, on this machine, as real processes on loopback: dataset publishers stream camera
(30 Hz), mic and IMU; the agent (``python -m runtime.agent``: CurveZMQ control, ONNX Runtime
backbones and side network) learns a first task, then serves. Reported (ms):

- ``e2e_subscriber_ms``: the camera frame's stamp -> the prediction *received* by a subscriber
  in this process (``frame_stamp_ns``: the frame the prediction describes);
- ``e2e_agent_ms``: the agent's own ``latency_ms`` (camera stamp -> publish);
- ``bare_backbones_ms``: the three backbones on one full sample (image, 1 s of audio, 1 s of
  IMU), called directly one after the other with the agent's thread settings, measured in this
  process *before* anything else runs (the key and meaning are kept from earlier versions so
  results stay comparable);
  ``bare_frame_path_ms``: the backbone work the agent does per camera frame (the image
  backbone; audio and IMU taps are computed on arrival in their own threads);
- ``learning_ms``: e2e while a learn-new-task runs (a worker process extracts and trains);
- ``agent_rss_mb``: the serving process's resident memory (max over the run);
  ``worker_rss_mb``: the learning worker's, sampled while it ran.

Goals (2 CPU cores): e2e p99 < 33 ms; p50 <= 1.15 x bare backbones; p99 while learning <=
1.10 x idle. Writes ``benchmarks/results/pipeline.json`` and ``pipeline.png``; the last stdout
line is JSON.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zmq

from benchmarks.harness import (
    REPO,
    Agent,
    AgentSetup,
    free_port,
    make_keys,
    proc_rss_mb,
    report,
    save_figure,
    scratch_dir,
    start_publisher,
)

TASK0 = ["t-shirt", "trouser", "pullover", "dress"]
TASK1 = ["coat", "sandal", "shirt", "sneaker"]


def pct(x: list[float]) -> dict[str, float | int | None]:
    a = np.asarray(x, dtype=float)
    if not a.size:
        return {"n": 0, "p50": None, "p99": None}
    return {"n": int(a.size), "p50": round(float(np.percentile(a, 50)), 3), "p99": round(float(np.percentile(a, 99)), 3)}


def bare_backbones(n: int = 200, *, image_threads: int = 2, threads: int = 1) -> dict[str, list[float]]:
    """Per-sample backbone times (ms), this process alone, with the agent's thread settings
    (``[serve] image_threads`` / ``backend_threads``): the full sample, and the frame path."""
    from export.backends import load_backend
    from runtime.backbone_stage import FeatureExtractor
    from runtime.sources import dataset_samples

    samples, _ = dataset_samples(["coat", "bag"], "test", per_class=max(1, n // 2))
    fx = FeatureExtractor(kind="onnxruntime", model_dir=REPO / "models", threads=threads, build="missing")
    image = load_backend("image", "onnxruntime", REPO / "models", build=False, threads=image_threads)
    fx.backends["image"].close()
    fx.backends["image"] = image  # the full sample uses the serving image session too
    full, frame = [], []
    try:
        for s in samples[:10]:  # warm-up
            fx.extract([s])
        for s in samples:
            t0 = time.perf_counter()
            fx.extract([s])
            t1 = time.perf_counter()
            image.extract(s.image[None])
            t2 = time.perf_counter()
            full.append((t1 - t0) * 1e3)
            frame.append((t2 - t1) * 1e3)
    finally:
        fx.close()
    return {"full": full, "frame": frame}


class Predictions:
    """A SUB on the agent's predictions; latency from the camera stamp at receipt."""

    def __init__(self, endpoint: str) -> None:
        self.sub = zmq.Context.instance().socket(zmq.SUB)
        self.sub.linger = 0
        self.sub.connect(endpoint)
        self.sub.subscribe(b"prediction")

    def drain(self) -> None:
        while self.sub.poll(0):
            self.sub.recv_multipart()

    def collect(self, seconds: float) -> list[dict[str, Any]]:
        out = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if self.sub.poll(50):
                frames = self.sub.recv_multipart()
                rx = time.time_ns()
                msg = msgpack.unpackb(frames[-1])
                msg["rx_latency_ms"] = (rx - msg["frame_stamp_ns"]) / 1e6 if msg.get("frame_stamp_ns") else None
                out.append(msg)
        return out

    def close(self) -> None:
        self.sub.close(0)


def _lat(preds: list[dict[str, Any]], key: str) -> list[float]:
    return [p[key] for p in preds if p.get(key) is not None and p.get("frame_stamp_ns")]


def run(seconds: float, backend: str) -> dict[str, Any]:
    bare = bare_backbones()
    with scratch_dir("continua-pipeline-") as root:
        return _run(root, bare, seconds, backend)


def _run(root: Path, bare: dict[str, list[float]], seconds: float, backend: str) -> dict[str, Any]:
    kdir = make_keys(root)
    sensors = f"tcp://127.0.0.1:{free_port()}"
    pub = start_publisher(root, "all", sensors, classes=tuple(range(10)))
    setup = AgentSetup(root=root, kdir=kdir, sensors=[sensors], state=root / "state",
                       agent={"backend": backend, "max_old_task_drop": 1.0, "min_new_task_acc": 0.0},
                       serve={"dataset_per_class": 100})
    agent = Agent(setup, tag="agent")
    preds = Predictions(setup.pred_ep)
    rss: list[float] = []
    worker_rss: list[float] = []
    try:
        agent.wait_ready(300)
        snap = agent.wait_job(agent.client.request("learn-new-task", {"name": "t0", "labels": TASK0,
                                                                      "source": "dataset:train"})["job"], 300)
        if snap["state"] != "done":
            raise RuntimeError(f"first task not learned: {snap}")
        preds.collect(2.0)  # warm-up
        idle = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            idle += preds.collect(1.0)
            rss.append(agent.proc.rss_mb())
        job = agent.client.request("learn-new-task", {"name": "t1", "labels": TASK1, "source": "dataset:train"})["job"]
        learning: list[dict[str, Any]] = []
        t0 = time.monotonic()
        while True:
            st = agent.client.request("status")
            rss.append(agent.proc.rss_mb())
            if st.get("worker_pid"):
                worker_rss.append(proc_rss_mb(st["worker_pid"]))
            if (st["job"] or {}).get("state") != "running":
                break
            learning += preds.collect(0.5)
        learn_s = time.monotonic() - t0
        final = agent.client.request("job", {"id": job})
    finally:
        preds.close()
        agent.stop()
        pub.stop()
    idle_rx, learn_rx = _lat(idle, "rx_latency_ms"), _lat(learning, "rx_latency_ms")
    res: dict[str, Any] = {
        "backend": backend, "seconds": seconds,
        "e2e_subscriber_ms": pct(idle_rx), "e2e_agent_ms": pct(_lat(idle, "latency_ms")),
        "bare_backbones_ms": pct(bare["full"]), "bare_frame_path_ms": pct(bare["frame"]),
        "learning_ms": pct(learn_rx), "learning_agent_ms": pct(_lat(learning, "latency_ms")),
        "learning_seconds": round(learn_s, 2), "learning_job": final.get("state"),
        "predictions_per_s_idle": round(len(idle) / seconds, 1),
        "agent_rss_mb": round(max(rss), 1) if rss else None,
        "worker_rss_mb": round(float(np.nanmax(worker_rss)), 1) if np.isfinite(worker_rss).any() else None,
    }
    e2e, b_full, b_frame = res["e2e_subscriber_ms"], res["bare_backbones_ms"], res["bare_frame_path_ms"]
    res["overhead_ratio_p50"] = round(e2e["p50"] / b_full["p50"], 3) if e2e["p50"] and b_full["p50"] else None
    res["overhead_vs_frame_path_p50"] = round(e2e["p50"] / b_frame["p50"], 3) if e2e["p50"] and b_frame["p50"] else None
    res["p99_learning_over_idle"] = (round(res["learning_ms"]["p99"] / e2e["p99"], 3)
                                     if res["learning_ms"]["p99"] and e2e["p99"] else None)
    res["goals"] = {
        "e2e_p99_lt_33ms": e2e["p99"] is not None and e2e["p99"] < 33,
        "overhead_le_15pct": res["overhead_ratio_p50"] is not None and res["overhead_ratio_p50"] <= 1.15,
        "learning_p99_le_1.10x": res["p99_learning_over_idle"] is not None and res["p99_learning_over_idle"] <= 1.10,
        "agent_rss_le_500mb": res["agent_rss_mb"] is not None and res["agent_rss_mb"] <= 500,
    }
    _plot(bare, idle_rx, learn_rx)
    return res


def _plot(bare: dict[str, list[float]], idle: list[float], learning: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    data = [bare["full"], bare["frame"], idle, learning]
    ax.boxplot([d if d else [np.nan] for d in data], whis=(1, 99), showfliers=True,
               tick_labels=["bare backbones\n(full sample)", "bare frame path\n(image)", "e2e idle", "e2e learning"])
    ax.axhline(33, color="r", ls="--", lw=1, label="33 ms (one frame at 30 Hz)")
    ax.set(ylabel="ms (camera stamp -> prediction received)", title="continua pipeline latency (whiskers p1..p99)")
    ax.legend()
    save_figure(fig, "pipeline.png")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.pipeline", description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--backend", default="onnxruntime")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    res = run(args.seconds, args.backend)
    report("pipeline", res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
