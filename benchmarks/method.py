"""Method benchmark: learn-task time, replay bytes per sample, routing shares, expert saturation.

    python -m benchmarks.method [--quick] [--threads 2] [--tasks 20]   (--quick: 10 saturation tasks)

In one run, with the learner's default config (strategy "ours", MoE adapters at every tap level):

1. learn-new-task time for 500 new samples with a full 2,000-sample buffer on ``--threads``
   torch threads (goal < 10 s), absolute seconds and samples/s, and the ratio to naive
   fine-tuning on the same data measured in the same run;
2. replay bytes per sample (float32 / float16 / int8 + scale) and the accuracy change of the
   trained model when its inputs pass through float16 or int8 storage instead of float32;
3. expert routing shares per task (PNG: one heat map per tap level);
4. a ``--tasks``-task class-incremental run (2 classes per task): ACC and frozen-expert count
   after every task (PNG), to see whether the experts saturate.

Features: the cached REAL tri-modal backbone features (Fashion-MNIST image + spoken class name +
BasicMotions IMU, ``benchmarks.scenarios.trimodal``, as ``benchmarks.continual`` uses them): the
timing and storage parts use the 5-task class-incremental split (seed ``--seed``); the saturation
run needs more tasks than 10 classes give, so its ``--tasks`` tasks are class pairs (in the class
scenario's order) under the domain scenario's shifts: tasks 0-4 domain 0 (clean), 5-9 domain 1
(blur + IMU noise + new voices), ... (label space stays 10 classes; ACC is over every task seen).
Replay storage: float32 / float16 / int8 bytes per sample for the full taps, and the "capped"
layout the agent ships as a configuration (``[learner] replay_sample_bytes = 2048`` with
``buffer_dtype = "int8"``: the 1280-d image tap mean-pooled to 640 in the side network, all other
taps kept), with the accuracy of a model trained and replayed that way vs float32. Writes
benchmarks/results/method.json, method_routing.png and method_saturation.png; the last stdout
line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from common.config import require_positive

log = logging.getLogger("benchmarks.method")
GOAL_LEARN_S = 10.0
GOAL_BYTES = 2048


@dataclass(kw_only=True)
class Config:
    quick: bool = False
    threads: int = 2
    tasks: int = 20
    new_samples: int = 500
    buffer_samples: int = 2000
    epochs: int = 8
    seed: int = 0
    out: Path = Path("benchmarks/results")

    def __post_init__(self) -> None:
        require_positive(self, "threads", "tasks", "new_samples", "buffer_samples", "epochs")


def load(kind: str, cfg: Config):
    """The cached real tri-modal scenario (5 tasks), as benchmarks.continual loads it."""
    from benchmarks.feature_cache import FeatureConfig
    from benchmarks.scenarios import trimodal

    return trimodal(kind, seed=cfg.seed, n_tasks=5, feature_config=FeatureConfig(threads=cfg.threads), progress=False)


def _learner(dims, cfg: Config, strategy: str, threads: int = 1, replay_sample_bytes: int = 0, **over):
    """Untimed work runs on 1 thread: on shared, busy cores 2 OpenMP threads wait for each other
    (a task took 211 s instead of ~6 s); only the timed step uses ``cfg.threads``."""
    from training.config import StrategyConfig
    from training.learner import Learner, LearnerConfig

    return Learner(dims, LearnerConfig(strategy=strategy, replay_sample_bytes=replay_sample_bytes,
                                       training=StrategyConfig(
        epochs=cfg.epochs, threads=threads, max_seconds=0.0, buffer_size=cfg.buffer_samples, seed=cfg.seed, **over)))


def _subset(data, n: int, seed: int):
    if len(data) <= n:
        return data
    return data.subset(np.sort(np.random.default_rng(seed).choice(len(data), n, replace=False)))


def timing(sc, cfg: Config) -> dict:
    """Learn class tasks 0-3 (2,400 samples: the 2,000-sample buffer is full), then time learning
    ``new_samples`` of task 4, on ``cfg.threads`` and on 1 thread (same starting state)."""
    import copy
    import dataclasses

    out: dict = {}
    for strategy in ("ours", "naive"):
        learner = _learner(sc.tap_dims, cfg, strategy)
        for t in range(4):
            learner.learn_task(sc.train[t])
        new = _subset(sc.train[4], cfg.new_samples, cfg.seed)
        out[strategy] = {}
        for threads in sorted({cfg.threads, 1}, reverse=True):
            # What Learner.learn_task does (copy the strategy, train the copy), on a fresh copy per
            # thread count so both start from the same state.
            t0 = time.perf_counter()
            work = copy.deepcopy(learner.strategy)
            work.config.threads = threads
            report = work.learn_task(dataclasses.replace(new, task=work.tasks_learned))
            sec = time.perf_counter() - t0
            out[strategy][f"threads_{threads}"] = {
                "seconds": sec, "train_seconds": report.seconds, "steps": report.steps, "new": len(new),
                "buffer": len(learner.buffer or []), "samples_per_s": len(new) * cfg.epochs / sec}
            log.info("learn-task %s, %d threads: %.2f s, %d steps", strategy, threads, sec, report.steps)
    for key in out["ours"]:
        out[f"ratio_ours_over_naive_{key}"] = out["ours"][key]["seconds"] / out["naive"][key]["seconds"]
    return out


def _quantise(taps: dict[str, list[np.ndarray]], dtype: str) -> dict[str, list[np.ndarray]]:
    if dtype == "float16":
        return {m: [x.astype(np.float16).astype(np.float32) for x in lv] for m, lv in taps.items()}
    out = {}
    for m, lv in taps.items():
        q = []
        for x in lv:
            scale = np.abs(x).max(1, keepdims=True) / 127.0 + 1e-12
            q.append((np.round(x / scale).clip(-127, 127) * scale).astype(np.float32))
        out[m] = q
    return out


def storage(sc, cfg: Config) -> dict:
    """Bytes per replayed sample per layout, and 5-task class-IL ACC of "ours" trained that way."""
    from training.buffer import ReplayBuffer, fit_pool
    from training.config import ModelConfig
    from training.taskdata import TaskData

    dims = sc.tap_dims
    # the shipped layout: [learner] replay_sample_bytes = 2048 with buffer_dtype "int8"
    cdims = ModelConfig(tap_dims=dims, tap_pool=fit_pool(dims, "int8", GOAL_BYTES)).pooled_dims()
    per = {"float32": sum(sum(ds) for ds in dims.values()) * 4}
    for dt in ("float16", "int8"):
        per[dt] = ReplayBuffer(10, 1 << 30, dt).sample_bytes(dims)
    per["int8_capped"] = ReplayBuffer(10, 1 << 30, "int8").sample_bytes(cdims)
    test = TaskData.concat(sc.test)
    acc = {}
    for name, dtype, capped in (("float16", "float16", False), ("int8", "int8", False),
                                ("int8_capped", "int8", True)):
        learner = _learner(dims, cfg, "ours", buffer_dtype=dtype, replay_sample_bytes=GOAL_BYTES if capped else 0)
        for t in sc.train:
            learner.learn_task(t)
        acc[name] = learner.evaluate(test)
        log.info("storage %s: ACC %.4f", name, acc[name])
        if name == "float16":  # the same trained model on float16/int8-rounded test inputs
            rounded = {dt: learner.evaluate(TaskData(taps=_quantise(test.taps, dt), present=test.present,
                                                     labels=test.labels, task=test.task)) - acc[name]
                       for dt in ("float16", "int8")}
    return {"bytes_per_sample": per, "capped_dims": cdims, "acc": acc,
            "acc_change_vs_float16_buffer": {k: acc[k] - acc["float16"] for k in acc},
            "input_rounding_change_vs_float32": rounded, "shipped": "int8_capped",
            "shipped_ok": per["int8_capped"] <= GOAL_BYTES}


def saturation_tasks(cls_sc, dom_sc, n_tasks: int, seed: int):
    """``n_tasks`` tasks: class pairs (seeded order) x domains 0, 1, ... (5 pairs per domain)."""
    from training.taskdata import TaskData

    order = np.random.default_rng(seed).permutation(10)
    rank = np.argsort(order)  # original label -> position in the order (so the head grows pairwise)
    out = []
    for k in range(n_tasks):
        d, pair = divmod(k, 5)
        if d >= len(dom_sc.train):
            raise ValueError(f"saturation: at most {5 * len(dom_sc.train)} tasks, got {n_tasks}")
        split = []
        for part in (dom_sc.train[d], dom_sc.test[d]):
            keep = np.flatnonzero(np.isin(part.labels, order[2 * pair : 2 * pair + 2]))
            sub = part.subset(keep)
            split.append(TaskData(taps=sub.taps, present=sub.present, labels=rank[sub.labels], task=k,
                                  name=f"d{d}-pair{pair}"))
        out.append(tuple(split))
    return out


def saturation(cls_sc, dom_sc, cfg: Config) -> tuple[dict, object]:
    tasks = saturation_tasks(cls_sc, dom_sc, cfg.tasks, cfg.seed)
    learner = _learner(cls_sc.tap_dims, cfg, "ours")
    tests, rows = [], []
    for t, (train, test) in enumerate(tasks):
        tests.append(test)
        rep = learner.learn_task(train)
        accs = [learner.evaluate(x) for x in tests]
        frozen = learner.strategy.frozen_history[-1]
        rows.append({"task": t, "domain": t // 5, "acc": float(np.mean(accs)), "frozen_experts": frozen,
                     "seconds": rep.seconds, "train_samples": len(train), "accs": accs})
        log.info("task %d: ACC %.3f, frozen experts %d, %.1f s", t, rows[-1]["acc"], frozen, rep.seconds)
    from training.metrics import average_forgetting
    from training.moe import moe_modules

    r = np.zeros((len(tasks), len(tasks)))
    for i, row in enumerate(rows):
        r[i, : i + 1] = row["accs"]
    total = sum(m.n_experts for m in moe_modules(learner.model))
    res = {"per_task": rows, "experts_total": total, "final_acc": rows[-1]["acc"],
           "forgetting": float(average_forgetting(r)) if len(tasks) > 1 else 0.0,
           "shares": learner.strategy.routing_shares().tolist()}
    return res, learner


def plot(result: dict, out: Path) -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = np.asarray(result["saturation"]["shares"])  # (tasks, levels, experts)
    levels = shares.shape[1]
    fig, axes = plt.subplots(1, levels, figsize=(3.2 * levels, 4), squeeze=False)
    for b in range(levels):
        ax = axes[0, b]
        im = ax.imshow(shares[:, b, :], aspect="auto", cmap="viridis", vmin=0, vmax=max(0.3, shares.max()))
        ax.set_title(f"level {b}")
        ax.set_xlabel("expert")
        ax.set_ylabel("task")
    fig.colorbar(im, ax=axes.ravel().tolist(), label="routing share (new samples)")
    fig.suptitle("MoE routing share per task (frozen after a task when > 10%)")
    p1 = out / "method_routing.png"
    fig.savefig(p1, dpi=110)
    plt.close(fig)

    rows = result["saturation"]["per_task"]
    fig, ax = plt.subplots(figsize=(7, 4))
    t = [r["task"] + 1 for r in rows]
    ax.plot(t, [r["acc"] for r in rows], "o-", label="ACC (tasks so far)")
    ax.set_xlabel("tasks learned")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax2 = ax.twinx()
    ax2.step(t, [r["frozen_experts"] for r in rows], "r-", where="post", label="frozen experts")
    ax2.set_ylabel(f"frozen experts (of {result['saturation']['experts_total']})")
    ax2.set_ylim(0, result["saturation"]["experts_total"] * 1.05)
    fig.legend(loc="lower left")
    ax.set_title("Expert saturation: class pairs x domains (real tri-modal features)")
    p2 = out / "method_saturation.png"
    fig.tight_layout()
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    return p1, p2


def run(cfg: Config) -> dict:
    import torch

    torch.manual_seed(cfg.seed)
    cls_sc, dom_sc = load("class", cfg), load("domain", cfg)
    result: dict = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
                    "features": "real (cached tri-modal: " + cls_sc.name + ", " + dom_sc.name + ")",
                    "tap_dims": cls_sc.tap_dims}
    result["timing"] = timing(cls_sc, cfg)
    sat, _ = saturation(cls_sc, dom_sc, cfg)
    result["saturation"] = sat
    result["storage"] = storage(cls_sc, cfg)
    secs = result["timing"]["ours"][f"threads_{cfg.threads}"]["seconds"]
    result["goals"] = {"learn_task_s": secs, "learn_task_ok": secs < GOAL_LEARN_S,
                       "bytes_per_sample": result["storage"]["bytes_per_sample"]["int8_capped"],
                       "bytes_ok": result["storage"]["shipped_ok"]}
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.method", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="10 tasks in the saturation run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tasks", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    a = p.parse_args(argv)
    cfg = Config(quick=a.quick, threads=a.threads, tasks=10 if a.quick else a.tasks,
                 out=a.out)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from common.config import format_config

    print(format_config(cfg), file=sys.stderr)
    result = run(cfg)
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "method.json").write_text(json.dumps(result, indent=2))
    p1, p2 = plot(result, cfg.out)
    tm, st, sat = result["timing"], result["storage"], result["saturation"]
    for key in tm["ours"]:
        o, n = tm["ours"][key], tm["naive"][key]
        print(f"learn-task ({o['new']} new + {o['buffer']} buffer, {key.replace('_', ' ')}): ours {o['seconds']:.2f} s "
              f"({o['samples_per_s']:.0f} samples/s), naive {n['seconds']:.2f} s, ratio "
              f"{tm['ratio_ours_over_naive_' + key]:.2f}")
    print(f"bytes/sample {st['bytes_per_sample']}; 5-task ACC by buffer layout {st['acc']}; "
          f"test-input rounding vs float32 {st['input_rounding_change_vs_float32']}")
    print("task  dom  ACC    frozen")
    for r in sat["per_task"]:
        print(f"{r['task'] + 1:4d}  {r['domain']:3d}  {r['acc']:.3f}  {r['frozen_experts']}/{sat['experts_total']}")
    main_t = tm["ours"][f"threads_{cfg.threads}"]
    summary = {"learn_task_s": round(main_t["seconds"], 2), "learn_task_ok": result["goals"]["learn_task_ok"],
               "learn_task_s_1_thread": round(tm["ours"]["threads_1"]["seconds"], 2),
               "ratio_vs_naive": round(tm[f"ratio_ours_over_naive_threads_{cfg.threads}"], 2),
               "bytes_per_sample": st["bytes_per_sample"], "bytes_ok": st["shipped_ok"],
               "acc_change_vs_float16_buffer": {k: round(v, 4) for k, v in st["acc_change_vs_float16_buffer"].items()},
               "input_rounding_change_vs_float32": {k: round(v, 4)
                                                    for k, v in st["input_rounding_change_vs_float32"].items()},
               "final_acc": round(sat["final_acc"], 3), "forgetting": round(sat["forgetting"], 3),
               "frozen_final": sat["per_task"][-1]["frozen_experts"], "experts_total": sat["experts_total"],
               "features": result["features"], "json": str(cfg.out / "method.json"), "png": [str(p1), str(p2)]}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
