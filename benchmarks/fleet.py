"""Fleet benchmark: robots that learned different tasks share them in Flower rounds.

    python -m benchmarks.fleet --robots 4 [--seeds 5] [--quick]   (--quick: 1 seed, 2 epochs)

Per seed, on the offline tri-modal class-incremental stream (``benchmarks.scenarios.trimodal``:
5 tasks of 2 classes, cached ONNX backbone features), with R robots:

1. robot ``i`` learns tasks ``i, i + R, ...`` of the first four through the agent's own learning
   path (``runtime.training_job.learn``: holdout split, the gate, the candidate's state files)
   and exports each as a skill package (``training.skills``: signed with a fleet key, at most
   ``--max-skill-bytes``) into its Flower spool's outbox;
2. round 1 on Flower's simulation engine (``runtime.fleet.apps.simulate``), every robot online;
   then every robot imports what arrived in its inbox through the same path and gate as a local
   task. ``fleet_vs_single_ratio`` is measured here: each robot's accuracy on the test split of
   every task learned anywhere in the fleet / that of a single robot that learned all those
   tasks itself, in order;
3. robot 0 learns the fifth task (a new local task); round 2 runs with the last robot offline;
   round 3 with every robot: the last robot must catch up (``late_robot``);
4. ``own_task_forgetting``: the drop on each robot's own tasks from before round 1 to after
   round 3; ``bytes_per_task``: package sizes; seconds per round: the Flower round (Ray start
   included) and the slowest robot's imports.

Accuracies are the learner's (torch) on the test split; the agent serves the same model as an
ONNX export (checked against torch at every export).
Writes benchmarks/results/fleet.json and fleet.png; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import RESULTS, save_figure
from common.config import format_config
from runtime.config import AgentConfig, ServeConfig
from runtime.gate import GateConfig, decide
from training.metrics import ci95

log = logging.getLogger("benchmarks.fleet")


@dataclass
class Config:
    robots: int = 4
    seeds: int = 5
    seed: int = 0
    epochs: int = 4  # the robot's default (training.config.StrategyConfig.epochs)
    max_skill_bytes: int = 1_000_000
    quick: bool = False


def _samples(data: Any, names: list[str]) -> Any:
    from runtime.training_job import TaskSamples

    return TaskSamples(taps={m: list(lv) for m, lv in data.taps.items()}, present=data.present,
                       stamps=np.zeros(len(data), np.int64), names=[names[i] for i in data.labels])


class Robot:
    """One simulated agent: its committed state files and task list, changed only through the
    agent's learning path and gate."""

    def __init__(self, name: str, root: Path, dims: dict[str, list[int]], lcfg: Any, seed: int) -> None:
        from runtime.fleet.spool import Spool

        self.name, self.dims, self.lcfg, self.seed = name, dims, lcfg, seed
        self.files: Any = None
        self.tasks: list[dict[str, Any]] = []
        self.spool = Spool(root / name, name)
        s, a = ServeConfig(), AgentConfig()
        from runtime.training_job import LearnSettings

        self.settings = LearnSettings(holdout=s.holdout, holdout_guard_s=s.holdout_guard_s,
                                      reservoir_size=s.reservoir_size, reservoir_bytes=s.reservoir_bytes,
                                      open_set_quantile=s.open_set_quantile, open_set_margin=s.open_set_margin,
                                      open_set_rule=s.open_set_rule, seed=seed)
        self.gate = GateConfig(min_new_task_acc=a.min_new_task_acc, max_old_task_drop=a.max_old_task_drop)

    def learner(self) -> Any:
        from runtime.training_job import load_state

        return load_state(self.files, self.dims, self.lcfg)

    def learn(self, name: str, labels: list[str], samples: Any, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        from runtime.training_job import learn

        cand = learn(self.learner(), samples, name=name, labels=labels, tasks=self.tasks, tap_dims=self.dims,
                     settings=dataclasses.replace(self.settings, seed=self.seed + len(self.tasks)),
                     progress=lambda *_: None, cancel=None)
        r = cand.report
        g = decide(new_task_acc=r["new_task_acc"], old_acc_before=r["old_acc_before"],
                   old_acc_after=r["old_acc_after"], config=self.gate)
        if g.accepted:
            self.files = cand.files
            self.tasks.append({"name": name, "labels": labels, **(extra or {})})
        return {"task": name, "accepted": g.accepted, "reason": g.reason, "new_task_acc": r["new_task_acc"],
                "old_drop": round(g.old_drop, 4), "train_seconds": r["train_seconds"]}

    def export(self, task: dict[str, Any], key: bytes, fingerprints: dict[str, str], max_bytes: int) -> bytes:
        from training import skills

        header, payload = skills.build(self.learner()[0], task=task["name"], labels=task["labels"],
                                       fingerprints=fingerprints, origin=self.name, max_bytes=max_bytes,
                                       seed=self.seed)
        data = skills.sign(header, payload, key)
        self.spool.put_outbox(data)
        return data

    def import_inbox(self, key: bytes, fingerprints: dict[str, str]) -> list[dict[str, Any]]:
        """Every received package, as the agent's inbox watcher does it: verify, learn through the gate, settle."""
        from runtime.training_job import skill_samples
        from training import skills

        out = []
        while (path := self.spool.next_inbox()) is not None:
            data = path.read_bytes()
            try:
                h = skills.verify(data, key, fingerprints=fingerprints, tap_dims=self.dims, tasks=self.tasks)
            except skills.SkillRefused as exc:
                self.spool.settle(path, imported=False, reason=exc.reason)
                out.append({"task": None, "accepted": False, "reason": exc.reason})
                continue
            r = self.learn(h["task"], list(h["labels"]), skill_samples(data), {"origin": h["origin"]})
            self.spool.settle(path, imported=r["accepted"], reason=r["reason"] or "")
            out.append({**r, "origin": h["origin"], "bytes": len(data)})
        return out

    def accuracy(self, tests: list[tuple[str, Any]]) -> dict[str, float]:
        from training.learner import LabelledSamples

        lr = self.learner()[0] if self.files is not None else None
        out = {}
        for name, s in tests:
            if lr is None:
                out[name] = 0.0
                continue
            out[name] = float(lr.evaluate(LabelledSamples(taps=s.taps, present=s.present, names=s.names)))
        return out


def fingerprints(model_dir: Path) -> dict[str, str]:
    from export.backends import load_manifest
    from export.manifest import fingerprint

    return {m: fingerprint(load_manifest(m, model_dir, build=False)) for m in ("image", "audio", "imu")}


def run_seed(cfg: Config, seed: int, root: Path) -> dict[str, Any]:
    from benchmarks.scenarios import trimodal
    from runtime.fleet.apps import simulate
    from training.config import LearnerConfig, StrategyConfig

    sc = trimodal("class", seed=seed, progress=False)
    names = list(sc.class_names)
    dims = sc.tap_dims
    lcfg = LearnerConfig(training=StrategyConfig(epochs=cfg.epochs, seed=seed))
    fps = fingerprints(AgentConfig().model_dir)
    key = bytes(np.random.default_rng(seed).integers(0, 256, 32, dtype=np.uint8))
    tasks = [{"name": f"task{i}", "labels": [names[c] for c in np.unique(t.labels)]} for i, t in enumerate(sc.train)]
    tests = [(t["name"], _samples(d, names)) for t, d in zip(tasks, sc.test, strict=True)]
    robots = [Robot(f"robot-{r}", root / f"seed{seed}", dims, lcfg, seed) for r in range(cfg.robots)]
    own: dict[str, list[str]] = {r.name: [] for r in robots}
    local, packages = [], []

    def teach(r: Robot, i: int) -> None:  # a local task, then its package into the robot's outbox
        local.append({"robot": r.name, **r.learn(tasks[i]["name"], tasks[i]["labels"], _samples(sc.train[i], names))})
        own[r.name].append(tasks[i]["name"])
        packages.append(len(r.export(r.tasks[-1], key, fps, cfg.max_skill_bytes)))

    held = len(tasks) - 1  # the last task is learned after round 1: the new local task of round 2
    for i in range(held):
        teach(robots[i % cfg.robots], i)
    before = {r.name: r.accuracy([x for x in tests if x[0] in own[r.name]]) for r in robots}  # own tasks
    single = Robot("single", root / f"seed{seed}", dims, lcfg, seed)  # learns every task itself, in order
    single_at: dict[int, dict[str, float]] = {}
    for i, t in enumerate(tasks):
        single.learn(t["name"], t["labels"], _samples(sc.train[i], names))
        single_at[i + 1] = single.accuracy(tests[: i + 1])
    late = robots[-1]
    rounds = []

    def fleet_round(rnd: int, offline: list[Robot], known: int) -> None:
        for r in offline:
            (r.spool.root / "offline").touch()
        t0 = time.perf_counter()
        records = simulate([(r.spool.root, r.name) for r in robots], root / f"seed{seed}" / "server", key, rounds=1)
        flower_s = time.perf_counter() - t0
        for r in offline:
            (r.spool.root / "offline").unlink()
        imports, slowest = {}, 0.0
        for r in robots:
            t1 = time.perf_counter()
            imports[r.name] = r.import_inbox(key, fps)
            slowest = max(slowest, time.perf_counter() - t1)
        acc = {r.name: r.accuracy(tests[:known]) for r in robots}
        ref = float(np.mean(list(single_at[known].values())))
        rounds.append({"round": rnd, "offline": [r.name for r in offline], "tasks_in_fleet": known,
                       "flower_seconds": round(flower_s, 2), "slowest_import_seconds": round(slowest, 2),
                       "flower": records, "imports": imports, "accuracy": acc, "single_mean": ref,
                       "ratio": {n: float(np.mean(list(a.values()))) / ref for n, a in acc.items()}})

    fleet_round(1, [], held)  # every robot online: the goal is measured after this one round
    teach(robots[0], held)  # a new local task on robot 0 ...
    fleet_round(2, [late] if cfg.robots > 2 else [], len(tasks))  # ... shared while the last robot is offline
    fleet_round(3, [], len(tasks))  # ... which catches up here
    final = rounds[-1]["accuracy"]
    forgetting = {r.name: float(np.mean([a - final[r.name][t] for t, a in before[r.name].items()]))
                  for r in robots if before[r.name]}
    got_late = [x["task"] for x in rounds[-1]["imports"][late.name] if x.get("accepted")]
    return {"seed": seed, "local": local, "single": single_at[len(tasks)], "before_rounds": before, "rounds": rounds,
            "own_tasks": own, "ratio": rounds[0]["ratio"], "ratio_final": rounds[-1]["ratio"],
            "own_task_forgetting": forgetting, "bytes_per_task": packages, "late_robot": late.name,
            "late_missed": rounds[1]["offline"] == [late.name] and tasks[held]["name"] not in
            {x["task"] for x in rounds[1]["imports"][late.name]},
            "late_caught_up": tasks[held]["name"] in got_late}


def _plot(seed_run: dict[str, Any], tasks: list[str]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [*seed_run["rounds"][-1]["accuracy"], "single"]
    mat = np.array([[seed_run["rounds"][-1]["accuracy"][r][t] if r != "single" else seed_run["single"][t]
                     for t in tasks] for r in rows])
    fig, ax = plt.subplots(figsize=(1.1 * len(tasks) + 2.5, 0.6 * len(rows) + 1.5))
    im = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_yticks(range(len(rows)), rows)
    for i in range(len(rows)):
        for j in range(len(tasks)):
            own = rows[i] != "single" and tasks[j] in seed_run["own_tasks"][rows[i]]
            ax.text(j, i, f"{mat[i, j]:.2f}{'*' if own else ''}", ha="center", va="center",
                    color="w" if mat[i, j] < 0.6 else "k", fontsize=8)
    ax.set_title(f"test accuracy after round 3 (seed {seed_run['seed']}; * = learned locally)")
    fig.colorbar(im, ax=ax, fraction=0.03)
    return save_figure(fig, "fleet.png")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.fleet", description=__doc__.split("\n")[0])
    ap.add_argument("--robots", type=int, default=Config.robots)
    ap.add_argument("--seeds", type=int, default=Config.seeds)
    ap.add_argument("--seed", type=int, default=Config.seed)
    ap.add_argument("--epochs", type=int, default=Config.epochs)
    ap.add_argument("--max-skill-bytes", type=int, default=Config.max_skill_bytes)
    ap.add_argument("--quick", action="store_true", help="1 seed, 2 epochs")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = Config(robots=args.robots, seeds=1 if args.quick else args.seeds, seed=args.seed,
                 epochs=2 if args.quick else args.epochs, max_skill_bytes=args.max_skill_bytes, quick=args.quick)
    if cfg.robots < 2:
        print("--robots must be >= 2 (a fleet)", file=sys.stderr)
        return 2
    print(f"config: {format_config(cfg)}", file=sys.stderr)
    import flwr
    from tqdm import tqdm

    t0 = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory(prefix="continua-fleet-") as tmp:
        for s in tqdm(range(cfg.seed, cfg.seed + cfg.seeds), desc="seeds", file=sys.stderr):
            runs.append(run_seed(cfg, s, Path(tmp)))
    min_ratio = [min(r["ratio"].values()) for r in runs]
    worst_forget = [max(r["own_task_forgetting"].values()) for r in runs]
    sizes = [b for r in runs for b in r["bytes_per_task"]]
    res = {
        "benchmark": "fleet", "engine": {"name": "flower", "version": flwr.__version__}, "config": dataclasses.asdict(cfg),
        "robots": cfg.robots, "seeds": cfg.seeds,
        "fleet_vs_single_ratio": {"min_over_robots": {"mean": float(np.mean(min_ratio)), "ci95": ci95(min_ratio),
                                                      "per_seed": min_ratio},
                                  "per_robot": {n: float(np.mean([r["ratio"][n] for r in runs])) for n in runs[0]["ratio"]}},
        "ratio_final": {n: float(np.mean([r["ratio_final"][n] for r in runs])) for n in runs[0]["ratio_final"]},
        "own_task_forgetting": {"max_over_robots": {"mean": float(np.mean(worst_forget)), "ci95": ci95(worst_forget),
                                                    "per_seed": worst_forget},
                                "per_robot": {n: float(np.mean([r["own_task_forgetting"][n] for r in runs]))
                                              for n in runs[0]["own_task_forgetting"]}},
        "bytes_per_task": {"mean": float(np.mean(sizes)), "max": int(max(sizes))},
        "seconds_per_round": {"flower": float(np.mean([x["flower_seconds"] for r in runs for x in r["rounds"]])),
                              "slowest_import": float(np.mean([x["slowest_import_seconds"] for r in runs
                                                               for x in r["rounds"]]))},
        "late_robot": {"missed_round_2": all(r["late_missed"] for r in runs),
                       "caught_up_in_round_3": all(r["late_caught_up"] for r in runs)},
        "single_mean_acc": float(np.mean([np.mean(list(r["single"].values())) for r in runs])),
        "accuracy_matrix": {n: runs[0]["rounds"][-1]["accuracy"][n] for n in runs[0]["rounds"][-1]["accuracy"]},
        "seconds": round(time.perf_counter() - t0, 1), "runs": runs,
    }
    _plot(runs[0], [t for t in runs[0]["single"]])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fleet.json").write_text(json.dumps(res, indent=1, default=str))  # with every seed's detail
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
