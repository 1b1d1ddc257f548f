"""Continual-learning benchmark: strategies x seeds x scenarios on cached backbone features.

    python -m benchmarks.continual --suite hard --seeds 5          # the README's results table
    python -m benchmarks.continual --suite hard --quick            # the same suite in a few minutes
    python -m benchmarks.continual --scenario class --strategies naive,replay,ours --seeds 3
    python -m benchmarks.continual --suite hard --strategies ablations --seeds 5   # ours vs ours-no-X
    python -m benchmarks.continual --features path/to/ave_features.npz      # pre-extracted features
    python -m benchmarks.continual --suite hard --val 0.2           # tune: never the test split
    python -m benchmarks.continual --suite hard --replay-bytes 2048  # the <= 2 KB replay layout

Scenarios: ``class`` and ``domain`` (sanity checks: every method with a buffer is near joint
training there) and the hard suite (``benchmarks.hard_scenarios``): ``fewshot``, ``long``,
``conjunctive``, ``faults``; ``--suite hard`` runs the four and reports their mean. A scenario
may carry its own buffer budget (``info["buffer_per_class"]``): the buffer then holds that many
samples per class of the whole stream, for every strategy alike.

Every strategy learns the same tasks on the same side network (d=128) and the same buffer
budget; only the strategy differs. Strategy names come from ``training.registry``; the
shorthands ``baselines`` and ``ablations`` expand to lists. Per strategy: accuracy matrix R[i][j],
ACC, BWT, FWT (vs a randomly initialised model), average forgetting, seconds per task, peak RSS,
buffer bytes and bytes per buffered sample; mean and 95 % interval over seeds, and the paired-by-
seed ACC difference of "ours" against every other strategy, and of "ours-full" (every part on)
against each "ours-no-X" row: a part earns its place when that interval excludes 0 with a
positive mean. Prints tables, writes
benchmarks/results/continual[-quick][-val]-<scenario|hard>.json and PNGs; the last stdout line
is one JSON object: strategy -> metrics (``acc``, ``bwt``, ``fwt``, ``forgetting``, each with
``mean``); keys "<strategy>@<scenario>" when several scenarios run, and plain "<strategy>" for
the suite mean.

--val F: hold out a seeded fraction F of every task's *training* split and evaluate on it instead
of the test split (the remaining 1-F trains); use it for every hyperparameter choice, so the test
split is only ever read for the final report.

--quick: 2 seeds, 3 epochs, baselines + ours + seed (the hard suite in under 5 minutes on 2 cores
once features are cached; the first run extracts them, a few minutes).
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
BASELINES = ["naive", "ewc", "replay", "lwf", "ncm", "joint", "slda", "ranpac", "derpp", "er-ace"]
ABLATIONS = ["ours", "ours-full", "ours-no-moe", "ours-no-freeze", "ours-no-routing-fix", "ours-no-align", "ours-no-preserve",
             "ours-no-ewc", "ours-no-consistency", "ours-no-nme", "ours-no-wa", "ours-distill", "seed"]
SANITY = ("class", "domain")
SUITES = {"hard": ("fewshot", "long", "conjunctive", "faults")}
SCENARIOS = (*SANITY, "both", *SUITES["hard"])


@dataclass(kw_only=True)
class Config:
    quick: bool = False
    strategies: list[str] = field(default_factory=list)  # empty: all registered (quick: baselines + ours)
    scenario: str = "class"  # class | domain | both | fewshot | long | conjunctive | faults
    suite: str = ""  # "hard": every hard scenario, and their mean (overrides scenario)
    seeds: int = 3
    n_tasks: int = 5
    epochs: int = 8
    batch_size: int = 64
    lr: float = 2e-3
    buffer_size: int = 2000
    replay_bytes: int = 0  # > 0: int8 buffer with taps pooled to at most this many bytes per sample
    max_train_per_task: int = 0  # 0: all
    val: float = 0.0  # > 0: evaluate on this fraction of each task's train split, not on the test split
    threads: int = 2
    backend: str = "onnxruntime"
    features: str = ""  # a pre-extracted feature dataset instead of the offline tri-modal data
    out: Path = Path("benchmarks/results")

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ValueError(f"scenario must be one of {SCENARIOS}, got {self.scenario!r}")
        if self.suite and self.suite not in SUITES:
            raise ValueError(f"suite must be one of {sorted(SUITES)}, got {self.suite!r}")
        require_positive(self, "seeds", "n_tasks", "epochs", "batch_size", "buffer_size", "threads")
        if self.replay_bytes < 0:
            raise ValueError(f"replay_bytes must be >= 0, got {self.replay_bytes}")
        if not 0.0 <= self.val < 1.0:
            raise ValueError(f"val must be in [0, 1), got {self.val}")
        if self.quick:
            self.seeds, self.epochs = min(self.seeds, 2), min(self.epochs, 3)
            if not self.suite and self.scenario in (*SANITY, "both"):
                self.seeds = 1
                self.max_train_per_task = self.max_train_per_task or 200

    def kinds(self) -> list[str]:
        if self.suite:
            return list(SUITES[self.suite])
        return list(SANITY) if self.scenario == "both" else [self.scenario]


def load_scenarios(cfg: Config, seed: int) -> list[Any]:
    if cfg.features:
        from training.feature_files import load_feature_dataset

        return [load_feature_dataset(cfg.features, n_tasks=cfg.n_tasks, seed=seed)]
    from benchmarks.feature_cache import FeatureConfig
    from benchmarks.hard_scenarios import hard
    from benchmarks.scenarios import trimodal

    fc = FeatureConfig(backend=cfg.backend, threads=cfg.threads)
    return [trimodal(k, seed=seed, n_tasks=cfg.n_tasks, feature_config=fc, progress=True) if k in SANITY
            else hard(k, seed=seed, feature_config=fc, progress=True) for k in cfg.kinds()]


def expand(names: list[str]) -> list[str]:
    """Registry names, with the shorthands ``baselines`` and ``ablations`` expanded (order kept)."""
    out: list[str] = []
    for n in names:
        for m in BASELINES if n == "baselines" else ABLATIONS if n == "ablations" else [n]:
            if m not in out:
                out.append(m)
    return out


def buffer_size(sc: Any, cfg: Config) -> int:
    """The scenario's buffer budget (``buffer_per_class`` x classes) or the configured size."""
    per = int(sc.info.get("buffer_per_class", 0) or 0)
    return per * sc.num_classes if per > 0 else cfg.buffer_size


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


def run_one(name: str, sc: Any, train: list[Any], *, seed: int, cfg: Config,
            bar: Any) -> tuple[Any, int, dict[str, Any]]:
    """One strategy on one scenario: its metrics, the bytes one buffered sample costs, and its MoE
    routing per task (shares per level and expert; share sent to experts frozen before the task)."""
    import torch

    from training import registry
    from training.buffer import fit_pool, stored_sample_bytes
    from training.metrics import peak_rss_bytes, summarize
    from training.model import ModelConfig, SideNetwork
    from training.strategies.base import StrategyConfig

    cls = registry.get(name)
    torch.manual_seed(seed)
    dtype = "int8" if cfg.replay_bytes else "float16"
    pool = fit_pool(sc.tap_dims, dtype, cfg.replay_bytes) if cfg.replay_bytes else {}
    model = SideNetwork(ModelConfig(tap_dims=sc.tap_dims, tap_pool=pool, **cls.model_overrides({})))
    scfg = StrategyConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, buffer_size=buffer_size(sc, cfg),
                          buffer_dtype=dtype, threads=cfg.threads, seed=seed,
                          max_seconds=0.0)  # no deadline: every epoch runs
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
    per_sample = stored_sample_bytes(strategy.model.config.pooled_dims(), dtype) if buf is not None else 0
    m = summarize(r, random_init_accuracy(sc, seed, cfg.threads), task_seconds=seconds,
                  peak_rss=peak_rss_bytes(), buffer_bytes=buf.nbytes if buf is not None else 0)
    routing = {"shares": getattr(strategy, "share_history", []),  # task -> level -> expert
               "to_frozen": getattr(strategy, "frozen_share_history", [])}  # task -> level
    return m, per_sample, routing


def _doc(cfg: Config, t0: float, **kw: Any) -> str:
    return json.dumps({"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()},
                       "seconds": time.perf_counter() - t0, **kw}, indent=1, default=str)


def _slim(r: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in r.items() if k not in ("matrices", "routing")}


def routing_to_frozen(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Mean over seeds, levels and tasks 2.. of the share of a task's routing that went to experts
    frozen before it (the collapse measure), and its maximum."""
    vals = [x for r in runs for task in r["to_frozen"][1:] for x in task]
    return {"mean": float(np.mean(vals)) if vals else 0.0, "max": float(np.max(vals)) if vals else 0.0}


def main(argv: list[str] | None = None) -> int:
    from common.config import format_config, load_config

    ap = argparse.ArgumentParser(prog="python -m benchmarks.continual", description=__doc__.split("\n")[0])
    ap.add_argument("--config", help="TOML file with Config keys")
    ap.add_argument("--quick", action="store_true", default=None)
    ap.add_argument("--strategies", help="comma-separated registry names, or baselines / ablations "
                    "(default: all registered)")
    ap.add_argument("--scenario", choices=list(SCENARIOS))
    ap.add_argument("--suite", choices=sorted(SUITES))
    ap.add_argument("--seeds", type=int)
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--replay-bytes", type=int, dest="replay_bytes",
                    help="int8 buffer, taps pooled to at most this many bytes per sample (2048: the 2 KB layout)")
    ap.add_argument("--val", type=float, help="evaluate on this fraction of each task's train split (tuning)")
    ap.add_argument("--features", help="pre-extracted feature dataset (.npz or directory)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    strategies = [s for s in args.strategies.split(",") if s] if args.strategies else None
    cfg = load_config(Config, args.config, quick=args.quick, strategies=strategies, scenario=args.scenario,
                      suite=args.suite, seeds=args.seeds, epochs=args.epochs, replay_bytes=args.replay_bytes,
                      val=args.val, features=args.features, out=args.out)
    log.info("config: %s", format_config(cfg))
    from tqdm import tqdm

    from benchmarks.continual_report import comparison_table, comparisons, plot, suite_mean, table
    from training import registry
    from training.metrics import aggregate

    names = expand(cfg.strategies) if cfg.strategies else (
        [n for n in [*BASELINES, "ours", "seed"] if n in registry.names()] if cfg.quick else registry.names())
    for n in names:
        registry.get(n)  # unknown names fail before any work
    t0 = time.perf_counter()
    runs: dict[str, dict[str, list[Any]]] = {}
    per_sample: dict[str, int] = {}
    routing: dict[str, dict[str, list[Any]]] = {}
    scen_info: dict[str, Any] = {}
    bar = None
    for seed in range(cfg.seeds):
        scenarios = [carve_val(raw, cfg.val, seed) for raw in load_scenarios(cfg, seed)]
        if bar is None:
            bar = tqdm(total=cfg.seeds * len(names) * sum(sc.n_tasks for sc in scenarios), desc="continual",
                       unit="task", file=sys.stderr)
        for sc in scenarios:
            scen_info.setdefault(sc.kind, {"name": sc.name, "tasks": sc.n_tasks, "classes": sc.num_classes,
                                           "buffer_size": buffer_size(sc, cfg), "plan_sha256": [],
                                           "train_sizes": [len(t) for t in sc.train],
                                           "test_sizes": [len(t) for t in sc.test], **sc.info})
            scen_info[sc.kind]["plan_sha256"].append(sc.plan_hash)
            train = subsample(sc.train, cfg.max_train_per_task, seed)
            for name in names:
                metrics, nbytes, route = run_one(name, sc, train, seed=seed, cfg=cfg, bar=bar)
                runs.setdefault(sc.kind, {}).setdefault(name, []).append(metrics)
                per_sample[name] = nbytes
                if route["shares"]:
                    routing.setdefault(sc.kind, {}).setdefault(name, []).append(route)
    if bar is not None:
        bar.close()
    cfg.out.mkdir(parents=True, exist_ok=True)
    tag = f"continual{'-quick' if cfg.quick else ''}{'-val' if cfg.val else ''}"
    last: dict[str, Any] = {}
    for kind, per in runs.items():
        results = {}
        for name, ms in per.items():
            agg = aggregate(ms)
            agg["matrices"] = [m.matrix for m in ms]
            agg["bytes_per_sample"] = per_sample[name]
            if name in routing.get(kind, {}):
                agg["routing"] = routing[kind][name]
                agg["routing_to_frozen"] = routing_to_frozen(routing[kind][name])
            results[name] = agg
        title = f"{scen_info[kind]['name']}" + (" (quick)" if cfg.quick else "") + (" [validation]" if cfg.val else "")
        comp = comparisons(results)
        print(table(results, title))
        print(comparison_table(comp))
        prefix = cfg.out / f"{tag}-{kind}"
        pngs = plot(results, title, prefix)
        prefix.with_suffix(".json").write_text(_doc(cfg, t0, scenario=scen_info[kind], results=results,
                                                    comparisons=comp, png=[str(p) for p in pngs]))
        for name, r in results.items():
            last[name if len(runs) == 1 else f"{name}@{kind}"] = _slim(r)
    if cfg.suite and len(runs) > 1:
        mean = suite_mean(runs)
        for name, r in mean.items():
            r["bytes_per_sample"] = per_sample[name]
        comp = comparisons(mean)
        print(table(mean, f"{cfg.suite} suite: mean over {', '.join(runs)}"))
        print(comparison_table(comp))
        (cfg.out / f"{tag}-{cfg.suite}.json").write_text(_doc(cfg, t0, scenarios=scen_info, results=mean,
                                                              comparisons=comp))
        last.update(mean)
    log.info("bytes per buffered sample: %s", per_sample)
    log.info("done in %.1f s", time.perf_counter() - t0)
    print(json.dumps(last))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
