"""A live session: an operator teaches every task from what the robot sees, the robot keeps predicting.

Usage::

    python -m benchmarks.live                  # 5 tasks x 2 labels x 8 s of teaching
    python -m benchmarks.live --tasks 3 --reps 1 --final-reps 2   # shorter

As real processes on loopback: the demo publishers (camera 30 Hz, mic, IMU, ground truth; the
classes follow each other every ``dwell_s``, like objects passing in front of the robot) and the
agent (``python -m runtime.agent``, fresh state, nothing learned). A scripted operator in this
process (``runtime.scripted``), for each task: sends ``learn-new-task --source live:TEACH_S``
and, each time the agent says "show 'LABEL' now", holds that class in front of the robot (the
publishers' scene control) for the capture; waits for the swap, then shows a shuffled sequence of
classes, ``dwell_s`` each (every learned class ``reps`` times, and as many classes it has not
learned yet, to see what the open set says about them) and scores the live predictions on the
learned classes against the ground truth, leaving out the first ``settle_s`` after each class
change. Taught instances and scored instances come from disjoint halves of the test split
(``scene_share``: other images, other voices, other motion recordings). After the last task it
shows every class ``final_reps`` times and asks for the held-out accuracy (``evaluate
heldout``: the reservoir of time-block holdouts, never trained on).

Prints one JSON line (and writes ``benchmarks/results/live.json`` and ``live.png``):
``final_live_accuracy`` (raw label; ``..._smoothed`` counts "unknown" as wrong),
``final_heldout_accuracy``, ``phases`` (live accuracy per phase), latency p50/p99 idle and while
learning (camera stamp -> prediction received), ``learn_to_swap_s`` and ``capture_to_swap_s``
per task, and ``agent_rss_mb`` (max of the serving process).
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from benchmarks.harness import (
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
from benchmarks.pipeline import pct
from demodata.scene_control import SceneClient
from runtime.scripted import LiveMonitor, class_ids, learn_live, show_sequence, wait_job

PAIRS = [["t-shirt", "trouser"], ["pullover", "dress"], ["coat", "sandal"], ["shirt", "sneaker"], ["bag", "ankle boot"]]


class RssSampler:
    """Max resident memory of the agent (and of its learning worker) sampled every 0.5 s."""

    def __init__(self, agent: Agent) -> None:
        self.agent, self.agent_mb, self.worker_mb = agent, 0.0, 0.0
        self.worker_pid: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.agent_mb = max(self.agent_mb, self.agent.proc.rss_mb())
            if self.worker_pid:
                w = proc_rss_mb(self.worker_pid)
                if np.isfinite(w):
                    self.worker_mb = max(self.worker_mb, w)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)


def run(**kw: Any) -> dict[str, Any]:
    """One live run (keyword arguments as ``_run``) in a scratch folder of its own."""
    with scratch_dir("continua-live-") as root:
        return _run(root, **kw)


def _run(root: Path, *, tasks: int, teach_s: float, reps: int, final_reps: int, dwell_s: float, settle_s: float,
         seed: int, learner: dict[str, Any] | None = None, serve: dict[str, Any] | None = None) -> dict[str, Any]:
    kdir = make_keys(root)
    sensors, scene_ep = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    pub = start_publisher(root, "all", sensors, classes=tuple(range(10)), truth=True, dwell_s=dwell_s, seed=seed,
                          scene_endpoint=scene_ep, scene_share=0.5, order="cycle")
    setup = AgentSetup(root=root, kdir=kdir, sensors=[sensors], state=root / "state",
                       agent={"min_new_task_acc": 0.5, "max_old_task_drop": 0.15}, learner=dict(learner or {}),
                       serve=dict(serve or {}))
    agent = Agent(setup, tag="agent")
    ctx = zmq.Context()
    monitor = LiveMonitor(setup.pred_ep, sensors, ctx)
    rss = RssSampler(agent)
    class_of = class_ids()
    learned: list[str] = []
    phases: list[dict[str, Any]] = []
    per_task: list[dict[str, Any]] = []
    idle_lat: list[float] = []
    learn_lat: list[float] = []
    scene = SceneClient(scene_ep, timeout_s=5.0)
    rng = np.random.default_rng(seed)
    try:
        agent.wait_ready(300, predictions=False)
        for i, labels in enumerate(PAIRS[:tasks]):
            mark = monitor.mark()
            snap = learn_live(agent.client, scene, f"task{i}", labels=labels, class_of=class_of, seconds=teach_s,
                              on_poll=lambda s: setattr(rss, "worker_pid", (s.get("meta") or {}).get("worker_pid")))
            rss.worker_pid = None
            learn_lat += monitor.latencies(mark)
            res = snap.get("result") or {}
            per_task.append({"task": f"task{i}", "labels": labels, "state": snap.get("state"), "error": snap.get("error"),
                             "samples": res.get("samples"), "accepted": res.get("accepted"), "reason": res.get("reason"),
                             "learn_to_swap_s": res.get("seconds"), "capture_to_swap_s": res.get("capture_to_swap_s"),
                             "new_task_acc": res.get("new_task_acc"), "old_acc_before": res.get("old_acc_before"),
                             "old_acc_after": res.get("old_acc_after"), "split": res.get("split"),
                             "train_samples": res.get("train_samples"), "holdout_samples": res.get("holdout_samples"),
                             "holdout_known_rate": res.get("holdout_known_rate"), "train_seconds": res.get("train_seconds"),
                             "worker_seconds": res.get("worker_seconds"), "startup_s": res.get("startup_s"),
                             "export": res.get("export"), "timings_s": res.get("timings_s")})
            if res.get("accepted"):
                learned += labels
            print(f"task{i} {labels}: {per_task[-1]}", flush=True)
            mark = monitor.mark()
            seq = show_sequence(scene, [class_of[x] for x in learned], reps=reps if i < tasks - 1 else final_reps,
                                dwell_s=dwell_s, rng=rng)
            ph = monitor.score(mark, None, learned, class_of, settle_s=settle_s) | {"after": f"task{i}",
                                                                                     "learned": list(learned),
                                                                                     "shown": seq}
            idle_lat += monitor.latencies(mark)
            phases.append(ph)
            print(f"live after task{i}: {ph}", flush=True)
        ev = wait_job(agent.client, agent.client.request("evaluate", {"split": "heldout"})["job"], 120, quiet=True)
        held = (ev.get("result") or {}).get("tasks", [])
        n = sum(t["samples"] for t in held if t["accuracy"] is not None)
        heldout_acc = (sum(t["accuracy"] * t["samples"] for t in held if t["accuracy"] is not None) / n) if n else None
        status = agent.status()
    finally:
        rss.stop()
        scene.close()
        monitor.close()
        ctx.destroy(0)
        agent.stop()
        pub.stop()
    final = phases[-1] if phases else {}
    res = {
        "tasks": tasks, "teach_s_per_label": teach_s, "reps": reps, "final_reps": final_reps, "dwell_s": dwell_s,
        "settle_s": settle_s,
        "final_live_accuracy": final.get("live_accuracy"),
        "final_live_accuracy_smoothed": final.get("live_accuracy_smoothed"),
        "final_unknown_rate_learned": final.get("unknown_rate_learned"),
        "final_heldout_accuracy": None if heldout_acc is None else round(heldout_acc, 4),
        "heldout_per_task": held,
        "phases": phases, "per_task": per_task,
        "latency_idle_ms": pct(idle_lat), "latency_learning_ms": pct(learn_lat),
        "learn_to_swap_s": [t["learn_to_swap_s"] for t in per_task],
        "capture_to_swap_s": [t["capture_to_swap_s"] for t in per_task],
        "agent_rss_mb": round(rss.agent_mb, 1), "worker_rss_mb": round(rss.worker_mb, 1),
        "agent_rss_status_mb": status.get("rss_mb"),
    }
    li, ll = res["latency_idle_ms"], res["latency_learning_ms"]
    gap = (None if res["final_live_accuracy"] is None or res["final_heldout_accuracy"] is None
           else round(res["final_heldout_accuracy"] - res["final_live_accuracy"], 4))
    res["heldout_minus_live"] = gap
    res["goals"] = {
        "live_accuracy_ge_0.90": (res["final_live_accuracy"] or 0) >= 0.90,
        "live_within_5_points_of_heldout": gap is not None and abs(gap) <= 0.05,
        "capture_to_swap_lt_15s": bool(per_task) and all(t["capture_to_swap_s"] is not None and t["capture_to_swap_s"] < 15
                                                         for t in per_task),
        "e2e_p99_lt_33ms": li["p99"] is not None and li["p99"] < 33,
        "learning_p99_le_1.10x": bool(li["p99"] and ll["p99"]) and ll["p99"] <= 1.10 * li["p99"],
        "agent_rss_le_500mb": 0 < res["agent_rss_mb"] <= 500,
    }
    _plot(res)
    return res


def _plot(res: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(res["phases"]))
    for key, lab in (("live_accuracy", "live (raw label)"), ("live_accuracy_smoothed", "live (smoothed, unknown = wrong)")):
        ax[0].plot(x, [p.get(key) if p.get(key) is not None else np.nan for p in res["phases"]], marker="o", label=lab)
    ax[0].plot(x, [t.get("new_task_acc") or np.nan for t in res["per_task"]], "k:", marker="x", label="gate: new-task holdout")
    ax[0].axhline(0.9, color="r", ls="--", lw=1, label="0.90 goal")
    ax[0].set(xlabel="after task", ylabel="accuracy on learned classes", ylim=(0, 1.02), xticks=x,
              title="live teaching: accuracy per phase")
    ax[0].legend(fontsize=8)
    ax[1].bar(["idle p50", "idle p99", "learning p50", "learning p99"],
              [res["latency_idle_ms"]["p50"] or 0, res["latency_idle_ms"]["p99"] or 0,
               res["latency_learning_ms"]["p50"] or 0, res["latency_learning_ms"]["p99"] or 0])
    ax[1].axhline(33, color="r", ls="--", lw=1)
    ax[1].set(ylabel="ms (camera stamp -> prediction received)", title="latency")
    save_figure(fig, "live.png")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.live", description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=5, choices=range(1, 6))
    ap.add_argument("--teach-s", type=float, default=8.0, help="seconds of live teaching per label")
    ap.add_argument("--reps", type=int, default=2, help="times each learned class is shown after each task")
    ap.add_argument("--final-reps", type=int, default=3, help="times each class is shown after the last task")
    ap.add_argument("--dwell-s", type=float, default=3.0, help="seconds each class stays in view while scoring")
    ap.add_argument("--settle-s", type=float, default=1.0, help="left out of scoring after each class change")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--learner", default="{}", help='JSON of the [learner] tree, e.g. \'{"training": {"epochs": 4}}\'')
    ap.add_argument("--serve", default="{}", help='JSON of [serve] settings, e.g. \'{"image_threads": 1}\'')
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    res = run(tasks=args.tasks, teach_s=args.teach_s, reps=args.reps, final_reps=args.final_reps,
              dwell_s=args.dwell_s, settle_s=args.settle_s, seed=args.seed, learner=json.loads(args.learner),
              serve=json.loads(args.serve))
    report("live", res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
