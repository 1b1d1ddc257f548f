"""Continual-learning benchmark: strategies x seeds x scenarios on cached backbone features.

    python -m benchmarks.continual --quick
    python -m benchmarks.continual --strategies naive,replay,ours --scenario domain --seeds 3
    python -m benchmarks.continual --features path/to/ave_features.npz      # pre-extracted features
    python -m benchmarks.continual --quick --strategies replay,ours --val 0.2   # tune: never the test split

Every strategy learns the same tasks on the same side network (d=128) and the same buffer
budget; only the strategy differs. Strategy names come from ``training.registry`` (so "ours"
and its ablations appear when registered). Per strategy: accuracy matrix R[i][j], ACC, BWT,
FWT (vs a randomly initialised model), average forgetting, seconds per task, process peak RSS
(cumulative over the run, ru_maxrss), buffer bytes; mean +- std over seeds. Prints a table,
writes benchmarks/results/continual[-quick]-<scenario>.json and two PNGs (accuracy-matrix heat
maps, average accuracy after each task); the last stdout line is one JSON object:
strategy -> metrics (keys "<strategy>@<scenario>" when several scenarios run).

--val F: hold out a seeded fraction F of every task's *training* split and evaluate on it instead
of the test split (the remaining 1-F trains); use it for every hyperparameter choice, so the test
split is only ever read for the final report. Outputs are then named continual[-quick]-val-<scenario>.

--quick: 1 seed, 3 epochs, 200 training samples per task, baselines + "ours" (under 3 minutes
on 2 cores once features are cached; the first run extracts them, a few minutes).
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

from common.config import require_positive

log = logging.getLogger("benchmarks.continual")
BASELINES = ["naive", "ewc", "replay", "lwf", "ncm", "joint"]


@dataclass(kw_only=True)
class Config:
    quick: bool = False
    strategies: list[str] = field(default_factory=list)  # empty: all registered (quick: baselines + ours)
    scenario: str = "class"  # class | domain | both
    seeds: int = 3
    n_tasks: int = 5
    epochs: int = 8
    batch_size: int = 64
    lr: float = 2e-3
    buffer_size: int = 2000
    max_train_per_task: int = 0  # 0: all
    val: float = 0.0  # > 0: evaluate on this fraction of each task's train split, not on the test split
    threads: int = 2
    backend: str = "onnxruntime"
    features: str = ""  # a pre-extracted feature dataset instead of the offline tri-modal data
    out: Path = Path("benchmarks/results")

    def __post_init__(self) -> None:
        if self.scenario not in ("class", "domain", "both"):
            raise ValueError(f"scenario must be class, domain or both, got {self.scenario!r}")
        require_positive(self, "seeds", "n_tasks", "epochs", "batch_size", "buffer_size", "threads")
        if not 0.0 <= self.val < 1.0:
            raise ValueError(f"val must be in [0, 1), got {self.val}")
        if self.quick:
            self.seeds, self.epochs = 1, min(self.epochs, 3)
            self.max_train_per_task = self.max_train_per_task or 200


def load_scenarios(cfg: Config, seed: int) -> list[Any]:
    if cfg.features:
        from training.feature_files import load_feature_dataset

        return [load_feature_dataset(cfg.features, n_tasks=cfg.n_tasks, seed=seed)]
    from benchmarks.feature_cache import FeatureConfig
    from benchmarks.scenarios import trimodal

    kinds = ["class", "domain"] if cfg.scenario == "both" else [cfg.scenario]
    fc = FeatureConfig(backend=cfg.backend, threads=cfg.threads)
    return [trimodal(k, seed=seed, n_tasks=cfg.n_tasks, feature_config=fc, progress=True) for k in kinds]


def carve_val(sc: Any, frac: float, seed: int) -> Any:
    """Replace ``sc.train``/``sc.test`` by (1-frac, frac) seeded per-task splits of the train split."""
    if frac <= 0:
        return sc
    rng = np.random.default_rng(10_000 + seed)
    train, val = [], []
    for t in sc.train:
        perm = rng.permutation(len(t))
        k = max(1, int(round(frac * len(t))))
        val.append(t.subset(np.sort(perm[:k])))
        train.append(t.subset(np.sort(perm[k:])))
    sc.train, sc.test = train, val
    sc.info = {**sc.info, "evaluated_on": f"validation: {frac:.0%} of each task's train split (seed {seed})"}
    return sc


def subsample(train: list[Any], n: int, seed: int) -> list[Any]:
    if n <= 0:
        return train
    rng = np.random.default_rng(seed)
    return [t if len(t) <= n else t.subset(np.sort(rng.choice(len(t), n, replace=False))) for t in train]


def random_init_accuracy(sc: Any, seed: int, threads: int) -> list[float]:
    """b_j: accuracy of a randomly initialised side network (head over every class) on each task."""
    import torch

    from training.model import ModelConfig, SideNetwork
    from training.strategies.base import Strategy, StrategyConfig

    torch.manual_seed(seed)
    model = SideNetwork(ModelConfig(tap_dims=sc.tap_dims, num_classes=sc.num_classes))
    s = Strategy(model, StrategyConfig(threads=threads, seed=seed))  # evaluation only: threads and seed
    return [s.evaluate(t) for t in sc.test]


def run_one(name: str, sc: Any, train: list[Any], *, seed: int, cfg: Config, bar: Any) -> Any:
    import torch

    from training import registry
    from training.metrics import peak_rss_bytes, summarize
    from training.model import ModelConfig, SideNetwork
    from training.strategies.base import StrategyConfig

    cls = registry.get(name)
    torch.manual_seed(seed)
    model = SideNetwork(ModelConfig(tap_dims=sc.tap_dims, **cls.model_overrides({})))
    scfg = StrategyConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, buffer_size=cfg.buffer_size,
                          threads=cfg.threads, seed=seed, max_seconds=0.0)  # no deadline: every epoch runs
    strategy = cls(model, scfg)
    t = len(train)
    r = np.zeros((t, t))
    seconds = []
    for i, task in enumerate(train):
        rep = strategy.learn_task(task)
        seconds.append(rep.seconds)
        r[i] = [strategy.evaluate(x) for x in sc.test]
        bar.update(1)
        bar.set_postfix_str(f"{sc.kind} s{seed} {name} t{i} acc={np.mean(r[i, : i + 1]):.2f}")
    buf = strategy.buffer
    return summarize(r, random_init_accuracy(sc, seed, cfg.threads), task_seconds=seconds,
                     peak_rss=peak_rss_bytes(), buffer_bytes=buf.nbytes if buf is not None else 0)


def plot(results: dict[str, Any], title: str, path_prefix: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names, strict=False):
        m = np.asarray(results[name]["matrix_mean"]) * 100
        ax.imshow(m, vmin=0, vmax=100, cmap="viridis")
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="w" if v < 60 else "k")
        ax.set_title(f"{name}: ACC {results[name]['acc']['mean'] * 100:.1f}", fontsize=9)
        ax.set_xlabel("evaluated task j", fontsize=8)
        ax.set_ylabel("after task i", fontsize=8)
        ax.set_xticks(range(m.shape[0]))
        ax.set_yticks(range(m.shape[0]))
    fig.suptitle(f"{title}: accuracy matrix R[i][j] (%)")
    fig.tight_layout()
    heat = path_prefix.with_name(path_prefix.name + "-matrices.png")
    fig.savefig(heat, dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name in names:
        per_seed = np.asarray(results[name]["matrices"])  # (S, T, T)
        curve = np.stack([[s[i, : i + 1].mean() for i in range(s.shape[0])] for s in per_seed]) * 100
        x = np.arange(1, curve.shape[1] + 1)
        ax.plot(x, curve.mean(0), marker="o", label=name)
        ax.fill_between(x, curve.mean(0) - curve.std(0), curve.mean(0) + curve.std(0), alpha=0.15)
    ax.set_xlabel("tasks learned")
    ax.set_ylabel("average accuracy on tasks seen (%)")
    ax.set_title(f"{title}: accuracy after each task")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    curves = path_prefix.with_name(path_prefix.name + "-curves.png")
    fig.savefig(curves, dpi=110)
    plt.close(fig)
    return [heat, curves]


def table(results: dict[str, Any], title: str) -> str:
    from training.metrics import fmt_mean_std

    lines = [f"== {title} ==",
             f"{'strategy':<20} {'ACC %':>13} {'BWT %':>13} {'FWT %':>13} {'forget %':>13} {'s/task':>7} {'buf KiB':>8}"]
    for name, r in results.items():
        lines.append(f"{name:<20} {fmt_mean_std(r['acc']):>13} {fmt_mean_std(r['bwt']):>13} "
                     f"{fmt_mean_std(r['fwt']):>13} {fmt_mean_std(r['forgetting']):>13} "
                     f"{r['mean_task_seconds']['mean']:>7.2f} {r['buffer_bytes']['mean'] / 1024:>8.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from common.config import format_config, load_config

    ap = argparse.ArgumentParser(prog="python -m benchmarks.continual", description=__doc__.split("\n")[0])
    ap.add_argument("--config", help="TOML file with Config keys")
    ap.add_argument("--quick", action="store_true", default=None)
    ap.add_argument("--strategies", help="comma-separated registry names (default: all registered)")
    ap.add_argument("--scenario", choices=["class", "domain", "both"])
    ap.add_argument("--seeds", type=int)
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--val", type=float, help="evaluate on this fraction of each task's train split (tuning)")
    ap.add_argument("--features", help="pre-extracted feature dataset (.npz or directory)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    strategies = [s for s in args.strategies.split(",") if s] if args.strategies else None
    cfg = load_config(Config, args.config, quick=args.quick, strategies=strategies, scenario=args.scenario,
                      seeds=args.seeds, epochs=args.epochs, val=args.val, features=args.features, out=args.out)
    log.info("config: %s", format_config(cfg))
    from tqdm import tqdm

    from training import registry
    from training.metrics import aggregate

    names = cfg.strategies or ([n for n in [*BASELINES, "ours"] if n in registry.names()] if cfg.quick
                               else registry.names())
    for n in names:
        registry.get(n)  # unknown names fail before any work
    t0 = time.perf_counter()
    runs: dict[str, dict[str, list[Any]]] = {}
    scen_info: dict[str, Any] = {}
    bar = None
    for seed in range(cfg.seeds):
        for raw in load_scenarios(cfg, seed):
            sc = carve_val(raw, cfg.val, seed)
            if bar is None:
                n_sc = 2 if cfg.scenario == "both" and not cfg.features else 1
                bar = tqdm(total=cfg.seeds * n_sc * len(names) * sc.n_tasks, desc="continual", unit="task",
                           file=sys.stderr)
            scen_info.setdefault(sc.kind, {"name": sc.name, "tasks": sc.n_tasks, "plan_sha256": [],
                                           "train_sizes": [len(t) for t in sc.train],
                                           "test_sizes": [len(t) for t in sc.test], **sc.info})
            scen_info[sc.kind]["plan_sha256"].append(sc.plan_hash)
            train = subsample(sc.train, cfg.max_train_per_task, seed)
            for name in names:
                runs.setdefault(sc.kind, {}).setdefault(name, []).append(run_one(name, sc, train, seed=seed, cfg=cfg, bar=bar))
    if bar is not None:
        bar.close()
    cfg.out.mkdir(parents=True, exist_ok=True)
    last: dict[str, Any] = {}
    for kind, per in runs.items():
        results = {}
        for name, ms in per.items():
            agg = aggregate(ms)
            agg["matrices"] = [m.matrix for m in ms]
            results[name] = agg
        title = f"{scen_info[kind]['name']}" + (" (quick)" if cfg.quick else "") + (" [validation]" if cfg.val else "")
        print(table(results, title))
        prefix = cfg.out / f"continual{'-quick' if cfg.quick else ''}{'-val' if cfg.val else ''}-{kind}"
        pngs = plot(results, title, prefix)
        doc = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()},
               "scenario": scen_info[kind], "results": results, "seconds": time.perf_counter() - t0,
               "png": [str(p) for p in pngs]}
        prefix.with_suffix(".json").write_text(json.dumps(doc, indent=1, default=str))
        for name, r in results.items():
            slim = {k: v for k, v in r.items() if k != "matrices"}
            last[name if len(runs) == 1 else f"{name}@{kind}"] = slim
    log.info("done in %.1f s", time.perf_counter() - t0)
    print(json.dumps(last))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
