"""Continual-learning scenarios over the offline tri-modal data (image + speech + IMU), paired by class.

Pairing rule (synthetic pairing, as AV-MNIST): a sample of class c (0..9) is
  - a Fashion-MNIST image of class c,
  - a spoken clip of word c (the class name, e.g. "ankle boot", synthesised by espeak-ng/flite),
  - a BasicMotions recording of activity c % 4 (standing, walking, running, badminton),
drawn independently within the class (images each once; clips and IMU recordings cycled through
a seeded permutation, since there are fewer of them). The IMU alone therefore separates only
4 groups of classes: fusion is needed. Speech test voices are never training voices
(``demodata.store.voice_split``: leave-voices-out).

- ``class``: the 10 classes in a seeded order, ``n_tasks`` tasks of 10/n_tasks new classes each;
  labels are renumbered in that order so task t holds the classes [t*k, (t+1)*k).
- ``domain``: every task has all 10 classes; task t is domain t: images corrupted
  (:data:`benchmarks.feature_cache.IMAGE_DOMAINS`), IMU with sensor noise/bias/gain
  (:data:`benchmarks.feature_cache.IMU_DOMAINS`), and speech from a new group of voices (training voices
  split into n_tasks disjoint groups, test voices likewise).

The plan (which pool row every sample uses) is written to ``data/splits/<kind>-seed<seed>.json``
with the sha256 of its content; a later run loads and verifies it, so every run sees the same
data (a file that fails its hash is an error naming the fix).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.feature_cache import Pool
from training.errors import ScenarioError
from training.taskdata import Scenario, TaskData

log = logging.getLogger(__name__)
KINDS = ("class", "domain")
MODS = ("image", "audio", "imu")
N_CLASSES = 10
PLAN_VERSION = 1


def _cycle(rng: np.random.Generator, candidates: np.ndarray, n: int) -> np.ndarray:
    """``n`` draws from ``candidates``: whole seeded permutations, repeated as needed (balanced reuse)."""
    if len(candidates) == 0:
        raise ScenarioError("no candidate samples to pair with")
    reps = -(-n // len(candidates))
    return np.concatenate([rng.permutation(candidates) for _ in range(reps)])[:n]


def voice_groups(voices: np.ndarray, n: int, rng: np.random.Generator) -> list[list[str]]:
    """Split distinct voices into ``n`` disjoint, near-equal groups (seeded)."""
    uniq = rng.permutation(np.unique(voices))
    if len(uniq) < n:
        raise ScenarioError(f"{len(uniq)} voices cannot make {n} disjoint voice groups")
    return [sorted(str(v) for v in g) for g in np.array_split(uniq, n)]


def build_plan(kind: str, pools: dict[str, Pool], *, seed: int = 0, n_tasks: int = 5) -> dict[str, Any]:
    """Which pool row each sample of each task uses (pure: depends only on pool metadata and the seed)."""
    if kind not in KINDS:
        raise ScenarioError(f"scenario kind must be one of {KINDS}, got {kind!r}")
    if kind == "class" and (n_tasks < 1 or N_CLASSES % n_tasks):
        raise ScenarioError(f"class scenario: n_tasks must divide {N_CLASSES}, got {n_tasks}")
    rng = np.random.default_rng(seed)
    audio = pools["audio/all-d0"]
    assert audio.voice is not None and audio.split is not None
    order = rng.permutation(N_CLASSES) if kind == "class" else np.arange(N_CLASSES)
    groups = {s: voice_groups(audio.voice[audio.split == s], n_tasks if kind == "domain" else 1, rng)
              for s in ("train", "test")}
    tasks: list[dict[str, Any]] = []
    per = N_CLASSES // n_tasks
    for t in range(n_tasks):
        dom = t if kind == "domain" else 0
        classes = order[t * per : (t + 1) * per] if kind == "class" else order
        entry: dict[str, Any] = {"task": t, "domain": dom, "classes": [int(c) for c in classes]}
        for split in ("train", "test"):
            img_key, imu_key = f"image/{split}-d{dom}", f"imu/{split}-d{dom}"
            voices = groups[split][t if kind == "domain" else 0]
            ok_voice = np.isin(audio.voice, voices) & (audio.split == split)
            rows: dict[str, list[int]] = {"label": [], "image": [], "audio": [], "imu": []}
            for c in classes:
                img = np.flatnonzero(pools[img_key].labels == c)
                if kind == "domain":  # every domain the same size (the clean pool is larger)
                    img = img[: int((pools[f"image/{split}-d1"].labels == c).sum())]
                n = len(img)
                rows["image"] += img.tolist()
                rows["audio"] += _cycle(rng, np.flatnonzero(ok_voice & (audio.labels == c)), n).tolist()
                rows["imu"] += _cycle(rng, np.flatnonzero(pools[imu_key].labels == c % 4), n).tolist()
                rows["label"] += [int(np.flatnonzero(order == c)[0]) if kind == "class" else int(c)] * n
            entry[split] = {"pools": {"image": img_key, "audio": "audio/all-d0", "imu": imu_key},
                            "voices": voices, **rows}
        tasks.append(entry)
    return {"version": PLAN_VERSION, "kind": kind, "seed": seed, "n_tasks": n_tasks,
            "class_order": [int(c) for c in order], "tasks": tasks}


def plan_hash(plan: dict[str, Any]) -> str:
    body = {k: v for k, v in plan.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_plan(path: Path) -> dict[str, Any]:
    """A saved plan, refused (``ScenarioError`` naming the fix) when unreadable or not matching its sha256."""
    try:
        plan = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ScenarioError(f"split file {path} is unreadable ({exc}); delete it to rebuild") from None
    if plan.get("sha256") != plan_hash(plan):
        raise ScenarioError(f"split file {path} does not match its sha256; delete it to rebuild")
    return plan


def saved_plan(kind: str, pools: dict[str, Pool], *, seed: int, n_tasks: int, directory: Path,
               pools_id: str = "") -> dict[str, Any]:
    """The plan from ``directory`` if present (hash verified), else built and written (atomically)."""
    from common.atomic import atomic_write

    path = directory / f"{kind}-seed{seed}-t{n_tasks}{'-' + pools_id if pools_id else ''}.json"
    if path.exists():
        return read_plan(path)
    plan = build_plan(kind, pools, seed=seed, n_tasks=n_tasks)
    plan["sha256"] = plan_hash(plan)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(plan).encode())
    log.info("wrote split %s (sha256 %s)", path, plan["sha256"][:16])
    return plan


def assemble(plan: dict[str, Any], pools: dict[str, Pool], class_names: list[str], name: str = "") -> Scenario:
    """TaskData per task from a plan and pools whose taps are filled."""
    train, test = [], []
    for entry in plan["tasks"]:
        for split, out in (("train", train), ("test", test)):
            e = entry[split]
            taps = {}
            for m in MODS:
                pool = pools[e["pools"][m]]
                if pool.taps is None:
                    raise ScenarioError(f"pool {e['pools'][m]} has no taps; extract features first")
                rows = np.asarray(e[m], dtype=np.int64)
                taps[m] = [x[rows] for x in pool.taps]
            labels = np.asarray(e["label"], dtype=np.int64)
            out.append(TaskData(taps=taps, present=np.ones((len(labels), len(MODS)), bool), labels=labels,
                                task=entry["task"], name=f"{split}-t{entry['task']}-d{entry['domain']}"))
    order = plan["class_order"]
    names = [class_names[c] for c in order] if plan["kind"] == "class" else list(class_names)
    return Scenario(name=name or f"trimodal-{plan['kind']}", kind=plan["kind"], train=train, test=test,
                    class_names=names, plan_hash=plan["sha256"] if "sha256" in plan else plan_hash(plan))


def trimodal(kind: str = "class", *, seed: int = 0, n_tasks: int = 5, feature_config: Any = None,
             progress: bool = True) -> Scenario:
    """The offline tri-modal scenario: features extracted/cached, split loaded or written, assembled."""
    from benchmarks.feature_cache import extract_pools
    from demodata.store import data_dir

    pools, info = extract_pools(feature_config, progress=progress)
    plan = saved_plan(kind, pools, seed=seed, n_tasks=n_tasks, directory=data_dir() / "splits",
                      pools_id=info["key"])
    from demodata import store

    names = [str(x) for x in store.load("fashion_mnist", verify=False)["class_names"]]
    sc = assemble(plan, pools, names)
    sc.info = {"features": info, "seed": seed, "pairing": "class c = Fashion-MNIST c + spoken word c + "
               "BasicMotions activity c % 4"}
    return sc
