"""Hard continual-learning scenarios over the offline tri-modal data: few-shot, long, conjunctive, faults.

The sanity scenarios of :mod:`benchmarks.scenarios` are nearly solved by any method with a buffer;
a robot meets harder streams: few labelled samples per new object, many tasks, classes that only
a combination of senses tells apart, and sensors that drop out or report stale readings. Every
scenario pairs one image, one spoken clip and one IMU recording per sample (images each used
once, clips and recordings cycled through seeded permutations; speech test voices are never
training voices) and renumbers classes in a seeded order, task t holding labels [t*k, (t+1)*k).

- ``fewshot``: the 10 classes of the class scenario (Fashion-MNIST c + word c + activity c % 4),
  5 tasks of 2, 20 training samples per class, 50 test; buffer 5 per class.
- ``long``: 20 classes (Fashion-MNIST 0..9, then sklearn digits 0..9 as classes 10..19, word c,
  activity c % 4), 10 tasks of 2, 50 training / 30 test per class; buffer 10 per class.
- ``conjunctive``: 16 classes (i, a) = image class :data:`CONJ_IMAGES` [i] with activity a, spoken word
  :data:`CONJ_WORDS` [(i + a) % 4] (a Latin square): each single modality sorts the classes into only
  4 groups of 4, any two identify the class. 8 tasks of 2, 36 training / 25 test per class; buffer 8.
- ``faults``: the 10-class stream, 5 tasks, 60 training / 40 test per class, 30 % of the samples of
  every task split with exactly one faulted modality (uniform over modalities): half *missing*
  (``present`` False, taps zeroed), half *stale* (taps of a sample of another class from the same
  pool and split: a wrong or frozen sensor reading, the fault a mask cannot flag); buffer 10.

The plan (rows, pools, faults) is a pure function of pool metadata and the seed, written to
``data/splits/hard-<kind>-seed<seed>-<features key>.json`` with its sha256 and verified on load.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.feature_cache import Pool
from benchmarks.scenarios import MODS, _cycle, plan_hash, read_plan
from training.errors import ScenarioError
from training.taskdata import Scenario, TaskData

log = logging.getLogger(__name__)

HARD = ("fewshot", "long", "conjunctive", "faults")
PLAN_VERSION = 1
CONJ_IMAGES = (0, 1, 7, 8)  # T-shirt/top, Trouser, Sneaker, Bag: visually distinct, so the image alone is easy
CONJ_WORDS = (10, 11, 12, 13)  # "zero".."three": words unrelated to the pictured objects
FAULT_FRACTION = 0.3
FAULT_KINDS = ("missing", "stale")

# per kind: tasks, training / test samples per class, buffer samples per class, description
SPECS: dict[str, dict[str, Any]] = {
    "fewshot": {"tasks": 5, "train": 20, "test": 50, "buffer_per_class": 5,
                "description": "few-shot class-incremental: 10 tri-modal classes, 5 tasks of 2, 20 training "
                               "samples per class, buffer 5 per class"},
    "long": {"tasks": 10, "train": 50, "test": 30, "buffer_per_class": 10,
             "description": "long class-incremental: 20 classes (Fashion-MNIST + sklearn digits, each with its "
                            "own spoken word, activity c % 4), 10 tasks of 2"},
    "conjunctive": {"tasks": 8, "train": 36, "test": 25, "buffer_per_class": 8,
                    "description": "conjunctive: 16 classes = (image class, activity) with spoken word "
                                   "(image + activity) mod 4; one modality separates only a quarter of the "
                                   "classes, any two identify the class; 8 tasks of 2"},
    "faults": {"tasks": 5, "train": 60, "test": 40, "buffer_per_class": 10,
               "description": "sensor faults: the 10-class stream, 5 tasks of 2, 30 % of train and test "
                              "samples with one modality faulted (half missing, half a stale reading of "
                              "another class)"},
}


def class_specs(kind: str) -> list[dict[str, Any]]:
    """Source class k -> image pool family + label, spoken word, IMU activity (the pairing rule of ``kind``)."""
    if kind in ("fewshot", "faults"):
        return [{"image": "image/{split}-d0", "image_label": c, "word": c, "activity": c % 4} for c in range(10)]
    if kind == "long":
        return [{"image": "image/{split}-d0" if c < 10 else "image/digits-{split}-d0", "image_label": c % 10,
                 "word": c, "activity": c % 4} for c in range(20)]
    if kind == "conjunctive":
        return [{"image": "image/{split}-d0", "image_label": CONJ_IMAGES[i], "word": CONJ_WORDS[(i + a) % 4],
                 "activity": a} for i in range(4) for a in range(4)]
    raise ScenarioError(f"hard scenario kind must be one of {HARD}, got {kind!r}")


def separability(specs: list[dict[str, Any]]) -> dict[str, float]:
    """Per modality: distinct source values / classes, the largest fraction of classes it alone can tell apart."""
    keys = {"image": lambda s: (s["image"], s["image_label"]), "audio": lambda s: s["word"],
            "imu": lambda s: s["activity"]}
    return {m: len({f(s) for s in specs}) / len(specs) for m, f in keys.items()}


def _faults(rng: np.random.Generator, rows: dict[str, Any], pools: dict[str, Pool], split: str,
            used: dict[str, set[int]]) -> None:
    """Mark round(FAULT_FRACTION * n) rows with one faulted modality each (in place); stale rows name the
    replacement: a row of the same pool and split whose source label differs and is one the scenario uses."""
    n = len(rows["label"])
    nf = int(round(FAULT_FRACTION * n))
    which = rng.choice(n, nf, replace=False)
    mods = _cycle(rng, np.arange(len(MODS)), nf) if nf else np.zeros(0, np.int64)
    kinds = rng.permutation([0] * (nf // 2) + [1] * (nf - nf // 2))
    for i, mi, k in zip(which.tolist(), mods.tolist(), kinds.tolist(), strict=True):
        m = MODS[mi]
        rows["fault_mod"][i], rows["fault_kind"][i] = mi, FAULT_KINDS[k]
        if FAULT_KINDS[k] == "stale":
            pool = pools[rows["pools"][m][rows[f"{m}_pool"][i]]]
            own = pool.labels[rows[m][i]]
            ok = (pool.labels != own) & np.isin(pool.labels, sorted(used[m]))
            if m == "audio":
                assert pool.split is not None
                ok &= pool.split == split
            rows["stale"][i] = int(rng.choice(np.flatnonzero(ok)))


def build_hard_plan(kind: str, pools: dict[str, Pool], *, seed: int = 0) -> dict[str, Any]:
    """Which pool row each sample of each task uses, and its faults (pure: pool metadata and the seed only)."""
    specs = class_specs(kind)
    spec = SPECS[kind]
    n_cls, n_tasks = len(specs), spec["tasks"]
    rng = np.random.default_rng([seed, HARD.index(kind)])
    audio = pools.get("audio/all-d0")
    if audio is None or audio.split is None:
        raise ScenarioError("hard scenarios need the pool audio/all-d0 with voice splits")
    order = rng.permutation(n_cls)
    per = n_cls // n_tasks
    # images are drawn without replacement per (pool, label), across all classes sharing that image class
    queues: dict[tuple[str, int], list[int]] = {}
    used = {"image": {s["image_label"] for s in specs}, "audio": {s["word"] for s in specs}, "imu": {s["activity"] for s in specs}}
    tasks: list[dict[str, Any]] = []
    for t in range(n_tasks):
        classes = order[t * per : (t + 1) * per]
        entry: dict[str, Any] = {"task": t, "domain": 0, "classes": [int(c) for c in classes]}
        for split in ("train", "test"):
            keys = {"image": [], "audio": ["audio/all-d0"], "imu": [f"imu/{split}-d0"]}
            rows: dict[str, Any] = {m: [] for m in ("label", *MODS, *(f"{m}_pool" for m in MODS))}
            for c in classes:
                s, n = specs[int(c)], spec[split]
                img_key = s["image"].format(split=split)
                if img_key not in pools or keys["imu"][0] not in pools:
                    raise ScenarioError(f"{kind}: pool {img_key} or {keys['imu'][0]} missing; extract features first")
                q = queues.setdefault((img_key, s["image_label"]), rng.permutation(
                    np.flatnonzero(pools[img_key].labels == s["image_label"])).tolist())
                if len(q) < n:
                    raise ScenarioError(f"{kind}: {img_key} has {len(q)} unused images of class {s['image_label']}, "
                                        f"{n} needed; raise the FeatureConfig pool sizes")
                if img_key not in keys["image"]:
                    keys["image"].append(img_key)
                rows["image"] += q[:n]
                del q[:n]
                ok = (audio.split == split) & (audio.labels == s["word"])
                rows["audio"] += _cycle(rng, np.flatnonzero(ok), n).tolist()
                imu = pools[keys["imu"][0]]
                rows["imu"] += _cycle(rng, np.flatnonzero(imu.labels == s["activity"]), n).tolist()
                rows["image_pool"] += [keys["image"].index(img_key)] * n
                rows["audio_pool"] += [0] * n
                rows["imu_pool"] += [0] * n
                rows["label"] += [int(np.flatnonzero(order == c)[0])] * n
            total = len(rows["label"])
            rows.update(pools=keys, fault_mod=[-1] * total, fault_kind=[""] * total, stale=[-1] * total)
            if kind == "faults":
                _faults(rng, rows, pools, split, used)
            entry[split] = rows
        tasks.append(entry)
    sep = separability(specs)
    return {"version": PLAN_VERSION, "kind": kind, "seed": seed, "n_tasks": n_tasks, "n_classes": n_cls,
            "class_order": [int(c) for c in order], "classes": specs, "separability": sep,
            "fault_fraction": FAULT_FRACTION if kind == "faults" else 0.0, "tasks": tasks}


def saved_hard_plan(kind: str, pools: dict[str, Pool], *, seed: int, directory: Path,
                    pools_id: str = "") -> dict[str, Any]:
    """The plan from ``directory`` if present (hash verified), else built and written (atomically)."""
    from common.atomic import atomic_write

    path = directory / f"hard-{kind}-seed{seed}{'-' + pools_id if pools_id else ''}.json"
    if path.exists():
        plan = read_plan(path)
        if plan.get("kind") != kind or plan.get("seed") != seed:
            raise ScenarioError(f"split file {path} holds {plan.get('kind')!r} seed {plan.get('seed')}; delete it")
        return plan
    plan = build_hard_plan(kind, pools, seed=seed)
    plan["sha256"] = plan_hash(plan)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(plan).encode())
    log.info("wrote split %s (sha256 %s)", path, plan["sha256"][:16])
    return plan


def _gather(e: dict[str, Any], m: str, pools: dict[str, Pool], rows_key: str, sel: np.ndarray) -> list[np.ndarray]:
    """Taps of modality ``m`` for the rows ``e[rows_key]`` where ``sel``; zeros elsewhere."""
    pidx = np.asarray(e[f"{m}_pool"], dtype=np.int64)
    rows = np.asarray(e[rows_key], dtype=np.int64)
    out: list[np.ndarray] | None = None
    for j, key in enumerate(e["pools"][m]):
        pool = pools[key]
        if pool.taps is None:
            raise ScenarioError(f"pool {key} has no taps; extract features first")
        if out is None:
            out = [np.zeros((len(rows), x.shape[1]), np.float32) for x in pool.taps]
        mine = sel & (pidx == j)
        for b, x in enumerate(pool.taps):
            out[b][mine] = x[rows[mine]]
    assert out is not None
    return out


def assemble_hard(plan: dict[str, Any], pools: dict[str, Pool], class_names: list[str], name: str = "") -> Scenario:
    """TaskData per task from a hard plan and pools with taps; faults applied as planned (missing: taps zero and
    ``present`` False; stale: the planned replacement row's taps, ``present`` True)."""
    train, test = [], []
    for entry in plan["tasks"]:
        for split, out in (("train", train), ("test", test)):
            e = entry[split]
            labels = np.asarray(e["label"], dtype=np.int64)
            present = np.ones((len(labels), len(MODS)), bool)
            fmod, fkind = np.asarray(e["fault_mod"], np.int64), np.asarray(e["fault_kind"], dtype=str)
            taps = {}
            for mi, m in enumerate(MODS):
                mine = fmod == mi
                stale, missing = mine & (fkind == "stale"), mine & (fkind == "missing")
                levels = _gather(e, m, pools, m, ~stale & ~missing)
                if stale.any():
                    for b, x in enumerate(_gather(e, m, pools, "stale", stale)):
                        levels[b][stale] = x[stale]
                present[missing, mi] = False
                taps[m] = levels
            out.append(TaskData(taps=taps, present=present, labels=labels, task=entry["task"],
                                name=f"{split}-t{entry['task']}"))
    names = [class_names[c] for c in plan["class_order"]]
    return Scenario(name=name or f"hard-{plan['kind']}", kind=plan["kind"], train=train, test=test,
                    class_names=names, plan_hash=plan["sha256"] if "sha256" in plan else plan_hash(plan))


def source_names(kind: str, fashion: list[str], motions: list[str], words: list[str]) -> list[str]:
    """Human names of the source classes of ``kind`` (before the seeded renumbering)."""
    specs = class_specs(kind)
    if kind == "conjunctive":
        return [f"{fashion[s['image_label']]} + {motions[s['activity']]} + '{words[s['word']]}'" for s in specs]
    return [fashion[c] if c < 10 else f"digit {c - 10}" for c in range(len(specs))]


def fault_counts(sc: Scenario) -> dict[str, Any]:
    """Missing modality counts per split (stale faults are invisible in the TaskData, by design)."""
    return {split: int(sum((~t.present).any(axis=1).sum() for t in tds))
            for split, tds in (("train", sc.train), ("test", sc.test))}


def hard(kind: str, *, seed: int = 0, feature_config: Any = None, progress: bool = True) -> Scenario:
    """One hard scenario: features extracted/cached, split loaded or written, assembled, info filled."""
    from benchmarks.feature_cache import extract_pools
    from demodata import store

    if kind not in HARD:
        raise ScenarioError(f"hard scenario kind must be one of {HARD}, got {kind!r}")
    pools, info = extract_pools(feature_config, progress=progress)
    words = [str(w) for w in store.load("speech", verify=False)["words"]]
    need = max(s["word"] for s in class_specs(kind))
    if need >= len(words):
        raise ScenarioError(f"{kind} needs spoken word {need} but speech has {len(words)} words; run "
                            "`python -m demodata.prepare --only speech --force`")
    plan = saved_hard_plan(kind, pools, seed=seed, directory=store.data_dir() / "splits", pools_id=info["key"])
    fashion = [str(x) for x in store.load("fashion_mnist", verify=False)["class_names"]]
    motions = [str(x) for x in store.load("basic_motions", verify=False)["class_names"]]
    sc = assemble_hard(plan, pools, source_names(kind, fashion, motions, words))
    spec = SPECS[kind]
    sep = plan["separability"]
    sc.info = {"description": spec["description"], "buffer_per_class": spec["buffer_per_class"],
               "features": info, "seed": seed, "train_per_class": spec["train"], "test_per_class": spec["test"],
               "single_modality_fraction": sep, "max_single_modality_fraction": max(sep.values())}
    if kind == "faults":
        sc.info.update(fault_fraction=FAULT_FRACTION, fault_kinds=list(FAULT_KINDS), missing_rows=fault_counts(sc),
                       fault_note="exactly one modality per faulted sample, uniform over modalities; missing: "
                                  "present False + taps zero; stale: taps of another class's sample, present True")
    return sc
