"""The scripted console session of ``make demo``: teach tasks one after another, show what
the robot remembers.

Usage (normally started by ``python -m runtime.launch launch/demo.toml``)::

    python -m runtime.demo --config launch/demo.toml

It talks to a running agent exactly as an operator's console does (CurveZMQ, the same
``ControlClient``), and listens to the agent's predictions and to the dataset publishers'
ground-truth topic. The agent starts knowing the first task (``[serve] initial_task``);
for every further task the demo sends ``learn-new-task`` (source ``dataset:train``, or
``live:SECONDS`` to capture from the streams), follows the job's progress, then asks for
``evaluate`` on the held-out split and prints the accuracy matrix so far (rows: after task
i; columns: task j), the live prediction latency and the live accuracy on frames whose
class the robot has learned. At the end it writes the accuracy curve as a PNG and a JSON
summary, and shuts the agent down.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zmq

from runtime.console import ControlClient
from sensors.config import ConfigError, format_config, load_config

log = logging.getLogger("continua.demo")


@dataclass(kw_only=True)
class DemoConfig:
    control: str = "tcp://127.0.0.1:5570"
    predictions: str = "tcp://127.0.0.1:5560"
    sensors: str = "tcp://127.0.0.1:5556"
    keys_dir: Path = Path("state/demo/keys")
    key_name: str = "demo"
    insecure: bool = False
    tasks: list[list[str]] = field(default_factory=lambda: [["t-shirt", "trouser"], ["pullover", "dress"],
                                                             ["coat", "sandal"], ["shirt", "sneaker"], ["bag", "ankle boot"]])
    source: str = "dataset:train"
    eval_split: str = "test"
    agent_wait_s: float = 300.0  # first start builds the ONNX models
    job_timeout_s: float = 300.0
    live_window_s: float = 4.0  # live predictions measured between tasks
    out_dir: Path = Path("benchmarks/results")
    shutdown_agent: bool = True

    def __post_init__(self) -> None:
        if len(self.tasks) < 2:
            raise ValueError(f"tasks must list >= 2 tasks (the first is the agent's initial task), got {self.tasks}")


class LiveMonitor:
    """Collects predictions and ground truth in the background; matches them by frame stamp."""

    def __init__(self, cfg: DemoConfig, ctx: zmq.Context) -> None:
        self._pred = ctx.socket(zmq.SUB)
        self._pred.connect(cfg.predictions)
        self._pred.subscribe(b"prediction")
        self._truth = ctx.socket(zmq.SUB)
        self._truth.connect(cfg.sensors)
        self._truth.subscribe(b"truth")
        for s in (self._pred, self._truth):
            s.setsockopt(zmq.LINGER, 0)
        self.truth: dict[int, int] = {}  # camera frame stamp -> dataset class id
        self.preds: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._pred, zmq.POLLIN)
        poller.register(self._truth, zmq.POLLIN)
        while not self._stop.is_set():
            for sock, _ in poller.poll(100):
                frames = sock.recv_multipart()
                try:
                    body = msgpack.unpackb(frames[-1], raw=False)
                except Exception:  # not ours to judge; skip
                    continue
                if sock is self._pred:
                    self.preds.append(body)
                elif isinstance(body, dict) and "stamp_ns" in body:
                    self.truth[int(body["stamp_ns"])] = int(body.get("label", -1))
                    if len(self.truth) > 20000:
                        self.truth.pop(next(iter(self.truth)))

    def window(self, since: int, known: set[str], class_of: dict[str, int]) -> dict[str, Any]:
        """Latency and live accuracy of the predictions after index ``since``; only frames whose
        true class the robot has learned are scored (labels mapped to dataset class ids)."""
        preds = self.preds[since:]
        lat = np.asarray([p["latency_ms"] for p in preds], dtype=float)
        known_ids = {class_of[k] for k in known if k in class_of}
        scored = [(class_of.get(p["label"], -2), self.truth.get(int(p.get("frame_stamp_ns", 0)))) for p in preds]
        scored = [(p, t) for p, t in scored if t is not None and t in known_ids]
        acc = float(np.mean([p == t for p, t in scored])) if scored else None
        return {"predictions": len(preds), "latency_p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
                "latency_p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
                "live_accuracy": acc, "scored": len(scored)}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        self._pred.close(0)
        self._truth.close(0)


def _wait_job(client: ControlClient, job: str, timeout_s: float) -> dict[str, Any]:
    """Follow a job: a tqdm bar on a terminal, one line per phase kind in a log (launch)."""
    from tqdm import tqdm

    end = time.monotonic() + timeout_s
    tty = sys.stderr.isatty()
    last_kind = ""
    with tqdm(total=100, unit="%", file=sys.stderr, disable=not tty,
              bar_format="{desc:<40} {percentage:3.0f}%|{bar}| {elapsed}") as bar:
        while time.monotonic() < end:
            snap = client.request("job", {"id": job})
            phase = str(snap.get("phase", ""))
            bar.n = round(100 * float(snap.get("progress", 0.0)))
            bar.set_description_str(phase[:40], refresh=False)
            bar.refresh()
            kind = phase.split(" ", maxsplit=1)[0]
            if not tty and kind != last_kind:
                print(f"  {snap.get('name')}: {phase} ({100 * float(snap.get('progress', 0.0)):.0f}%)", flush=True)
                last_kind = kind
            if snap.get("state") != "running":
                return snap
            time.sleep(0.25)
    client.request("cancel")
    raise TimeoutError(f"job {job} did not finish within {timeout_s} s")


def _plot(matrix: list[list[float]], names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    m = np.full((len(matrix), len(names)), np.nan)
    for i, row in enumerate(matrix):
        m[i, : len(row)] = row
    for j in range(len(names)):
        axes[0].plot(range(j, len(matrix)), m[j:, j], marker="o", label=names[j])
    axes[0].plot(range(len(matrix)), [np.nanmean(r) for r in m], "k--", lw=2, label="average")
    axes[0].set(xlabel="after learning task", ylabel="accuracy (held-out)", ylim=(0, 1.02),
                xticks=range(len(matrix)), title="continua demo: accuracy per task")
    axes[0].legend(fontsize=8)
    im = axes[1].imshow(m, vmin=0, vmax=1, cmap="viridis")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if not np.isnan(m[i, j]):
                axes[1].text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", color="w", fontsize=8)
    axes[1].set(xlabel="task j", ylabel="after task i", title="accuracy matrix R[i][j]",
                xticks=range(m.shape[1]), yticks=range(m.shape[0]))
    axes[1].set_xticklabels(names[: m.shape[1]])
    axes[1].set_yticklabels(names[: m.shape[0]])
    fig.colorbar(im, ax=axes[1])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg: DemoConfig) -> dict[str, Any]:
    ctx = zmq.Context()
    client = ControlClient(cfg.control, keys_dir=None if cfg.insecure else cfg.keys_dir, key_name=cfg.key_name,
                           insecure=cfg.insecure, timeout_s=10.0, context=ctx)
    monitor = LiveMonitor(cfg, ctx)
    try:
        end = time.monotonic() + cfg.agent_wait_s
        while True:  # the agent may still be building models / learning the initial task
            try:
                st = client.request("status", timeout_s=5.0)
                if st.get("tasks"):
                    break
            except Exception as exc:  # not up yet
                if time.monotonic() > end:
                    raise TimeoutError(f"agent did not come up within {cfg.agent_wait_s} s: {exc}") from exc
            time.sleep(1.0)
        names = list(st["tasks"])
        from sensors.datasets.store import load

        class_of = {str(w): i for i, w in enumerate(load("speech")["words"])}
        print(f"agent up: model v{st['model_version']}, knows {st['classes']}", flush=True)
        matrix: list[list[float]] = []
        live: list[dict[str, Any]] = []
        learned: list[dict[str, Any]] = []
        for i, labels in enumerate(cfg.tasks):
            if i > 0:
                name = f"task{i}"
                job = client.request("learn-new-task", {"name": name, "labels": labels, "source": cfg.source})["job"]
                snap = _wait_job(client, job, cfg.job_timeout_s)
                res = snap.get("result") or {}
                learned.append(res | {"state": snap.get("state"), "error": snap.get("error")})
                if snap.get("state") != "done" or not res.get("accepted"):
                    print(f"task {name} {labels}: NOT learned: {snap.get('error') or res.get('reason')}", flush=True)
                    continue
                names.append(name)
                print(f"learned {name} {labels} in {res.get('train_seconds')} s of training "
                      f"(held-out {res.get('new_task_acc')}, old-task drop {res.get('old_drop')})", flush=True)
            since = len(monitor.preds)
            time.sleep(cfg.live_window_s)
            known = {lab for t in client.request("tasks")["tasks"] for lab in t["labels"]}
            live.append(monitor.window(since, known, class_of))
            ev = _wait_job(client, client.request("evaluate", {"split": cfg.eval_split})["job"], cfg.job_timeout_s)
            row = [t["accuracy"] for t in (ev.get("result") or {}).get("tasks", [])]
            matrix.append(row)
            _print_matrix(matrix, names)
            w = live[-1]
            print(f"live: {w['predictions']} predictions, latency p50 {_f(w['latency_p50_ms'])} ms / p99 "
                  f"{_f(w['latency_p99_ms'])} ms, accuracy on learned classes {_f(w['live_accuracy'])} "
                  f"({w['scored']} frames)", flush=True)
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        png = cfg.out_dir / "demo_accuracy.png"
        _plot(matrix, names, png)
        final = matrix[-1] if matrix else []
        summary = {"tasks": names, "accuracy_matrix": matrix, "final_average_accuracy": float(np.mean(final)) if final else None,
                   "live": live, "learned": learned, "plot": str(png)}
        (cfg.out_dir / "demo.json").write_text(json.dumps(summary, indent=1))
        print(f"accuracy curve: {png}", flush=True)
        if cfg.shutdown_agent:
            client.request("shutdown")
        return summary
    finally:
        monitor.close()
        client.close()
        ctx.term()


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}" if x <= 1.0 else f"{x:.1f}"


def _print_matrix(matrix: list[list[float]], names: list[str]) -> None:
    print("accuracy matrix (row: after task i, column: task j, held-out split)", flush=True)
    print("          " + " ".join(f"{n:>7}" for n in names[: len(matrix[-1])]), flush=True)
    for i, row in enumerate(matrix):
        print(f"after {names[i] if i < len(names) else i:>4}" + " ".join(f"{x:7.3f}" for x in row)
              + f"   avg {np.mean(row):.3f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="TOML file with a [demo] table")
    parser.add_argument("--insecure", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(DemoConfig, args.config, "demo", insecure=True if args.insecure else None)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    log.info("config: %s", format_config(cfg))
    summary = run(cfg)
    print(json.dumps({k: summary[k] for k in ("tasks", "accuracy_matrix", "final_average_accuracy")}))
    return 0 if summary["accuracy_matrix"] else 1


if __name__ == "__main__":
    sys.exit(main())
