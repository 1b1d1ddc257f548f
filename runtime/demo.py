"""The scripted operator of ``make demo``: teaches tasks live and shows what the robot remembers.

Usage (normally started by ``python -m runtime.launch launch/demo.toml``)::

    python -m runtime.demo --config launch/demo.toml

It talks to a running agent exactly as an operator's console does (CurveZMQ, the same
``ControlClient``), holds classes in front of the robot through the demo publishers' scene
control, and listens to the agent's predictions and the publishers' ground-truth topic
(``runtime.scripted``). The agent starts knowing the first task (``[serve] initial_task``,
from the dataset's training split). Every further task is taught live (``learn-new-task
--source live:TEACH_S``: the demo shows each label when the agent asks for it) unless its index
is missing from ``live_tasks`` (then ``dataset:train``). After each task it shows every learned
class ``reps`` times from the publishers' other half of the samples (other images, voices and
motion recordings than the taught ones), prints the live accuracy on the learned classes
against the ground truth (leaving out ``settle_s`` after each class change), the latency
(camera stamp -> prediction received) and the accuracy matrix on held-out samples (rows: after
task i; columns: task j; the agent's reservoir of time-block holdouts, never trained on). At the
end it writes the matrix and curve as a PNG and a JSON summary, and shuts the agent down.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from common.config import ConfigError, format_config
from runtime.access import is_loopback
from runtime.config import load_section
from runtime.console import ControlClient
from runtime.scripted import LiveMonitor, class_ids, learn_live, show_sequence, wait_job

log = logging.getLogger("continua.demo")


@dataclass(kw_only=True)
class DemoConfig:
    control: str = "tcp://127.0.0.1:5570"
    predictions: str = "tcp://127.0.0.1:5560"
    sensors: str = "tcp://127.0.0.1:5556"
    scene: str = "tcp://127.0.0.1:5557"  # the publishers' scene control
    keys_dir: Path = Path("state/demo/keys")
    key_name: str = "demo"
    insecure: bool = False  # --insecure only (refused in TOML): the agent was started with --insecure
    tasks: list[list[str]] = field(default_factory=lambda: [["t-shirt", "trouser"], ["pullover", "dress"],
                                                             ["coat", "sandal"], ["shirt", "sneaker"], ["bag", "ankle boot"]])
    live_tasks: list[int] = field(default_factory=lambda: [1, 2, 3, 4])  # taught live; the others: dataset:train
    teach_s: float = 8.0  # seconds of live capture per label
    reps: int = 1  # times each learned class is shown after each task
    dwell_s: float = 3.0
    settle_s: float = 1.0
    agent_wait_s: float = 300.0  # first start builds the ONNX models
    job_timeout_s: float = 300.0
    out_dir: Path = Path("benchmarks/results")
    shutdown_agent: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.tasks) < 2:
            raise ValueError(f"tasks must list >= 2 tasks (the first is the agent's initial task), got {self.tasks}")
        if any(not 1 <= i < len(self.tasks) for i in self.live_tasks):
            raise ValueError(f"live_tasks={self.live_tasks}: indices of tasks after the first (1..{len(self.tasks) - 1})")
        for name in ("teach_s", "dwell_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be > 0")
        if self.reps < 1:
            raise ValueError(f"reps={self.reps!r} must be >= 1")
        if self.insecure and not is_loopback(self.control):
            raise ValueError(f"--insecure refuses control={self.control!r}: without CurveZMQ only a loopback endpoint")


def _plot(matrix: list[list[float | None]], names: list[str], live: list[float | None], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    m = np.full((len(matrix), len(names)), np.nan)
    for i, row in enumerate(matrix):
        m[i, : len(row)] = [np.nan if x is None else x for x in row]
    for j in range(len(names)):
        axes[0].plot(range(j, len(matrix)), m[j:, j], marker="o", label=names[j])
    axes[0].plot(range(len(matrix)), [np.nanmean(r) for r in m], "k--", lw=2, label="average (held-out)")
    axes[0].plot(range(len(live)), [np.nan if x is None else x for x in live], "r:", marker="s", lw=2,
                 label="live, learned classes")
    axes[0].set(xlabel="after learning task", ylabel="accuracy", ylim=(0, 1.02), xticks=range(len(matrix)),
                title="continua demo: accuracy per task")
    axes[0].legend(fontsize=8)
    im = axes[1].imshow(m, vmin=0, vmax=1, cmap="viridis")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if not np.isnan(m[i, j]):
                axes[1].text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", color="w", fontsize=8)
    axes[1].set(xlabel="task j", ylabel="after task i", title="held-out accuracy matrix R[i][j]",
                xticks=range(m.shape[1]), yticks=range(m.shape[0]))
    axes[1].set_xticklabels(names[: m.shape[1]])
    axes[1].set_yticklabels(names[: m.shape[0]])
    fig.colorbar(im, ax=axes[1])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _wait_agent(client: ControlClient, timeout_s: float) -> dict[str, Any]:
    end = time.monotonic() + timeout_s
    while True:  # the agent may still be building models / learning the initial task
        try:
            st = client.request("status", timeout_s=5.0)
            if st.get("tasks"):
                return st
        except Exception as exc:  # not up yet
            if time.monotonic() > end:
                raise TimeoutError(f"agent did not come up within {timeout_s} s: {exc}") from exc
        time.sleep(1.0)


def run(cfg: DemoConfig) -> dict[str, Any]:
    from demodata.scene_control import SceneClient

    ctx = zmq.Context()
    client = ControlClient(cfg.control, keys_dir=None if cfg.insecure else cfg.keys_dir, key_name=cfg.key_name,
                           insecure=cfg.insecure, timeout_s=10.0, context=ctx)
    monitor = LiveMonitor(cfg.predictions, cfg.sensors, ctx)
    scene = SceneClient(cfg.scene, timeout_s=5.0)
    rng = np.random.default_rng(cfg.seed)
    class_of = class_ids()
    try:
        st = _wait_agent(client, cfg.agent_wait_s)
        print(f"agent up: model v{st['model_version']}, knows {st['classes']}", flush=True)
        live: list[dict[str, Any]] = []
        learned: list[dict[str, Any]] = []
        for i, labels in enumerate(cfg.tasks):
            if i > 0:
                name = f"task{i}"
                if i in cfg.live_tasks:
                    print(f"teaching {name} {labels} live: {cfg.teach_s:g} s of camera, microphone and IMU per label",
                          flush=True)
                    snap = learn_live(client, scene, name, labels=labels, class_of=class_of, seconds=cfg.teach_s,
                                      timeout_s=cfg.job_timeout_s)
                else:
                    job = client.request("learn-new-task", {"name": name, "labels": labels, "source": "dataset:train"})
                    snap = wait_job(client, job["job"], cfg.job_timeout_s)
                res = snap.get("result") or {}
                learned.append(res | {"state": snap.get("state"), "error": snap.get("error")})
                if snap.get("state") != "done" or not res.get("accepted"):
                    print(f"task {name} {labels}: NOT learned: {snap.get('error') or res.get('reason')}", flush=True)
                    continue
                print(f"learned {name} {labels}: {res.get('samples')} samples ({res.get('split')}), held-out "
                      f"{res.get('new_task_acc')}, old tasks {res.get('old_acc_before')} -> {res.get('old_acc_after')}, "
                      f"swapped in {res.get('capture_to_swap_s', res.get('seconds'))} s after the capture", flush=True)
            tasks = client.request("tasks")["tasks"]
            known = [lab for t in tasks for lab in t["labels"]]
            mark = monitor.mark()
            show_sequence(scene, [class_of[x] for x in known], reps=cfg.reps, dwell_s=cfg.dwell_s, rng=rng)
            w = monitor.score(mark, None, known, class_of, settle_s=cfg.settle_s)
            live.append(w)
            matrix = [t.get("accuracy_row") or [] for t in tasks]
            _print_matrix(matrix, [t["name"] for t in tasks])
            print(f"live: {w['predictions']} predictions, latency p50 {_f(w['latency_p50_ms'])} ms / p99 "
                  f"{_f(w['latency_p99_ms'])} ms; accuracy on learned classes {_f(w['live_accuracy'])} "
                  f"(smoothed {_f(w['live_accuracy_smoothed'])}, unknown {_f(w['unknown_rate_learned'])}; "
                  f"{w['scored']} frames); unknown on classes not learned yet {_f(w['unknown_rate_not_learned'])}",
                  flush=True)
        tasks = client.request("tasks")["tasks"]
        names = [t["name"] for t in tasks]
        matrix = [t.get("accuracy_row") or [] for t in tasks]
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        png = cfg.out_dir / "demo_accuracy.png"
        _plot(matrix, names, [w["live_accuracy"] for w in live], png)
        final = [x for x in (matrix[-1] if matrix else []) if x is not None]
        summary = {"tasks": names, "accuracy_matrix": matrix, "final_average_accuracy": float(np.mean(final)) if final else None,
                   "final_live_accuracy": live[-1]["live_accuracy"] if live else None, "live": live, "learned": learned,
                   "plot": str(png)}
        (cfg.out_dir / "demo.json").write_text(json.dumps(summary, indent=1))
        print(f"accuracy curve: {png}", flush=True)
        if cfg.shutdown_agent:
            client.request("shutdown")
        return summary
    finally:
        scene.close()
        monitor.close()
        client.close()
        ctx.destroy(0)


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}" if x <= 1.0 else f"{x:.1f}"


def _print_matrix(matrix: list[list[float | None]], names: list[str]) -> None:
    print("accuracy matrix (row: after task i, column: task j, held-out samples never trained on)", flush=True)
    print("           " + " ".join(f"{n:>7}" for n in names), flush=True)
    for i, row in enumerate(matrix):
        vals = [x for x in row if x is not None]
        print(f"after {names[i]:>5}" + " ".join("    n/a" if x is None else f"{x:7.3f}" for x in row)
              + (f"   avg {np.mean(vals):.3f}" if vals else ""), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="TOML file with a [demo] table")
    parser.add_argument("--insecure", action="store_true",
                        help="no CurveZMQ: the agent runs --insecure (development only, loopback only; a flag only)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_section(DemoConfig, args.config, "demo", insecure=True if args.insecure else None)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    log.info("config: %s", format_config(cfg))
    summary = run(cfg)
    print(json.dumps({k: summary[k] for k in ("tasks", "accuracy_matrix", "final_average_accuracy",
                                               "final_live_accuracy")}))
    return 0 if summary["accuracy_matrix"] else 1


if __name__ == "__main__":
    sys.exit(main())
