"""Method benchmark: learn-task time, replay bytes per sample, routing shares, expert saturation.

    python -m benchmarks.method [--quick] [--threads 2] [--tasks 20]

In one run, with the learner's default config (strategy "ours", MoE adapters at every tap level):

1. learn-new-task time for 500 new samples with a full 2,000-sample buffer on ``--threads``
   torch threads (goal < 10 s), absolute seconds and samples/s, and the ratio to naive
   fine-tuning on the same data measured in the same run;
2. replay bytes per sample (float32 / float16 / int8 + scale) and the accuracy change of the
   trained model when its inputs pass through float16 or int8 storage instead of float32;
3. expert routing shares per task (PNG: one heat map per tap level);
4. a ``--tasks``-task class-incremental run (2 classes per task): ACC and frozen-expert count
   after every task (PNG), to see whether the experts saturate.

Features: tap dimensions come from ``models/*.manifest.json`` (falling back to built-in ones);
the samples are SYNTHETIC (a class latent projected into every tap with modality-specific
noise), because cached real backbone features (training/features.py) were not available when
this was written. The JSON says which (``"features"``). Writes benchmarks/results/method.json,
method_routing.png and method_saturation.png; the last stdout line is one JSON object.
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

log = logging.getLogger("benchmarks.method")
GOAL_LEARN_S = 10.0
DEFAULT_DIMS = {"image": [40, 112, 192, 1280], "audio": [48, 72, 96, 96], "imu": [168, 168, 168, 168]}


@dataclass(kw_only=True)
class Config:
    quick: bool = False
    threads: int = 2
    tasks: int = 20
    new_samples: int = 500
    buffer_samples: int = 2000
    epochs: int = 8
    seed: int = 0
    models: Path = Path("models")
    out: Path = Path("benchmarks/results")

    def __post_init__(self) -> None:
        for name in ("threads", "tasks", "new_samples", "buffer_samples", "epochs"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Config.{name} must be > 0, got {getattr(self, name)}")


def tap_dims(models: Path) -> tuple[dict[str, list[int]], str]:
    dims: dict[str, list[int]] = {}
    for m in DEFAULT_DIMS:
        f = models / f"{m}.manifest.json"
        try:
            man = json.loads(f.read_text())
            dims[m] = [int(t["dim"]) for t in man["taps"]]
        except (OSError, KeyError, ValueError):
            return dict(DEFAULT_DIMS), "built-in"
    return dims, str(models)


class Synthetic:
    """Class latents (16-d) projected into every tap; image clean, audio noisier, IMU noisiest."""

    NOISE = {"image": 1.0, "audio": 1.5, "imu": 2.0}

    def __init__(self, dims: dict[str, list[int]], n_classes: int, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.dims = dims
        self.means = self.rng.normal(size=(n_classes, 16)).astype(np.float32)
        self.maps = {m: [self.rng.normal(size=(16, d)).astype(np.float32) / 4.0 for d in ds] for m, ds in dims.items()}

    def task(self, classes: list[int], n: int, task: int):
        from training.taskdata import TaskData

        y = self.rng.choice(classes, n)
        z = self.means[y] + 0.7 * self.rng.normal(size=(n, 16)).astype(np.float32)
        taps = {m: [z @ a + self.NOISE.get(m, 1.5) * self.rng.normal(size=(n, a.shape[1])).astype(np.float32)
                    for a in self.maps[m]] for m in self.dims}
        return TaskData(taps=taps, present=np.ones((n, len(self.dims)), bool), labels=y, task=task)


def _learner(dims, cfg: Config, strategy: str):
    from training.learner import Learner, LearnerConfig

    return Learner(dims, LearnerConfig(strategy=strategy, epochs=cfg.epochs, threads=cfg.threads,
                                       max_seconds=0.0, buffer_size=cfg.buffer_samples, seed=cfg.seed))


def timing(dims, cfg: Config) -> dict:
    """Fill the buffer to its limit with earlier tasks, then time one 500-sample task."""
    out = {}
    for strategy in ("ours", "naive"):
        data = Synthetic(dims, 12, cfg.seed)
        learner = _learner(dims, cfg, strategy)
        if learner.buffer is not None:
            for t in range(5):
                learner.buffer.add_batch(*_buffer_args(data.task([2 * t, 2 * t + 1], cfg.buffer_samples // 5, t)))
        new = data.task([10, 11], cfg.new_samples, 5)
        t0 = time.perf_counter()
        report = learner.learn_task(new)
        sec = time.perf_counter() - t0
        out[strategy] = {"seconds": sec, "steps": report.steps, "buffer": len(learner.buffer or []),
                         "samples_per_s": cfg.new_samples * cfg.epochs / sec}
        log.info("learn-task %s: %.2f s, %d steps", strategy, sec, report.steps)
    out["ratio_ours_over_naive"] = out["ours"]["seconds"] / out["naive"]["seconds"]
    return out


def _buffer_args(d):
    return d.taps, d.present, d.labels, d.task, np.zeros(len(d), np.int64)


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


def storage(dims, learner, test) -> dict:
    from training.buffer import ReplayBuffer
    from training.taskdata import TaskData

    per = {"float32": sum(sum(ds) for ds in dims.values()) * 4}
    for dt in ("float16", "int8"):
        per[dt] = ReplayBuffer(10, 1 << 30, dt).sample_bytes(dims)
    acc32 = learner.evaluate(test)
    acc = {}
    for dt in ("float16", "int8"):
        q = TaskData(taps=_quantise(test.taps, dt), present=test.present, labels=test.labels, task=test.task)
        acc[dt] = learner.evaluate(q) - acc32
    return {"bytes_per_sample": per, "acc_float32": acc32, "acc_change_vs_float32": acc}


def saturation(dims, cfg: Config) -> tuple[dict, object]:
    n_tasks = cfg.tasks
    data = Synthetic(dims, 2 * n_tasks, cfg.seed + 1)
    learner = _learner(dims, cfg, "ours")
    tests, rows = [], []
    for t in range(n_tasks):
        classes = [2 * t, 2 * t + 1]
        tests.append(data.task(classes, 200, t))
        rep = learner.learn_task(data.task(classes, cfg.new_samples, t))
        accs = [learner.evaluate(x) for x in tests]
        frozen = learner.strategy.frozen_history[-1]
        rows.append({"task": t, "acc": float(np.mean(accs)), "frozen_experts": frozen,
                     "seconds": rep.seconds, "accs": accs})
        log.info("task %d: ACC %.3f, frozen experts %d, %.1f s", t, rows[-1]["acc"], frozen, rep.seconds)
    from training.metrics import average_forgetting

    r = np.full((n_tasks, n_tasks), np.nan)
    for i, row in enumerate(rows):
        r[i, : i + 1] = row["accs"]
    r = np.nan_to_num(r)
    from training.moe import moe_modules

    total = sum(m.n_experts for m in moe_modules(learner.model))
    res = {"per_task": rows, "experts_total": total, "final_acc": rows[-1]["acc"],
           "forgetting": float(average_forgetting(r)) if n_tasks > 1 else 0.0,
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
    ax.set_title("Expert saturation over a class-incremental run (synthetic features)")
    p2 = out / "method_saturation.png"
    fig.tight_layout()
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    return p1, p2


def run(cfg: Config) -> dict:
    import torch

    torch.manual_seed(cfg.seed)
    dims, source = tap_dims(cfg.models)
    result: dict = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
                    "features": "synthetic", "tap_dims": dims, "tap_dims_from": source}
    result["timing"] = timing(dims, cfg)
    sat, learner = saturation(dims, cfg)
    result["saturation"] = sat
    data = Synthetic(dims, 2 * cfg.tasks, cfg.seed + 1)  # same latents as the saturation run
    test = data.task(list(range(2 * cfg.tasks)), 1000, 0)
    result["storage"] = storage(dims, learner, test)
    result["goals"] = {"learn_task_s": result["timing"]["ours"]["seconds"],
                       "learn_task_ok": result["timing"]["ours"]["seconds"] < GOAL_LEARN_S}
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.method", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="6 tasks in the saturation run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tasks", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    a = p.parse_args(argv)
    cfg = Config(quick=a.quick, threads=a.threads, tasks=6 if a.quick else a.tasks, out=a.out)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from sensors.config import format_config

    print(format_config(cfg), file=sys.stderr)
    result = run(cfg)
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "method.json").write_text(json.dumps(result, indent=2))
    p1, p2 = plot(result, cfg.out)
    tm, st, sat = result["timing"], result["storage"], result["saturation"]
    print(f"learn-task (500 new + {tm['ours']['buffer']} buffer, {cfg.threads} threads): ours "
          f"{tm['ours']['seconds']:.2f} s ({tm['ours']['samples_per_s']:.0f} samples/s), naive "
          f"{tm['naive']['seconds']:.2f} s, ratio {tm['ratio_ours_over_naive']:.2f}")
    print(f"bytes/sample {st['bytes_per_sample']}; acc change vs float32 {st['acc_change_vs_float32']}")
    print("task  ACC    frozen")
    for r in sat["per_task"]:
        print(f"{r['task'] + 1:4d}  {r['acc']:.3f}  {r['frozen_experts']}/{sat['experts_total']}")
    summary = {"learn_task_s": round(tm["ours"]["seconds"], 2), "learn_task_ok": result["goals"]["learn_task_ok"],
               "ratio_vs_naive": round(tm["ratio_ours_over_naive"], 2),
               "bytes_per_sample": st["bytes_per_sample"],
               "acc_change_vs_float32": {k: round(v, 4) for k, v in st["acc_change_vs_float32"].items()},
               "final_acc": round(sat["final_acc"], 3), "forgetting": round(sat["forgetting"], 3),
               "frozen_final": sat["per_task"][-1]["frozen_experts"], "experts_total": sat["experts_total"],
               "features": result["features"], "json": str(cfg.out / "method.json"), "png": [str(p1), str(p2)]}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
