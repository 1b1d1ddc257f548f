"""Pre-extracted feature datasets (e.g. AVE or UESTC-MMEA features) under the same protocol.

Format: one ``.npz`` file (or a directory holding ``features.npz``) with

- ``<modality>`` (N, dim) float32 — one feature vector per sample, or
  ``<modality>__<b>`` (N, dim_b) for b = 0, 1, ... — several taps, shallow to deep;
- ``labels`` (N,) int — class ids 0..C-1;
- ``split`` (N,) str ``"train"``/``"test"`` (or ``is_test`` (N,) bool);
- optional ``task`` (N,) int — the task of each sample (domain-incremental: a domain id);
  without it, classes are split into ``n_tasks`` consecutive groups (class-incremental) in a
  seeded order;
- optional ``present__<modality>`` (N,) bool — False where the modality is missing;
- optional ``class_names`` (C,) str.

Modalities are every key that is not one of the reserved names, in sorted order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.errors import FeatureDatasetError
from training.taskdata import Scenario, TaskData

RESERVED = {"labels", "split", "is_test", "task", "class_names"}


def _split_taps(arrays: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    mods: dict[str, dict[int, np.ndarray]] = {}
    for key, arr in arrays.items():
        if key in RESERVED or key.startswith("present__"):
            continue
        mod, _, level = key.partition("__")
        if level and not level.isdigit():
            raise FeatureDatasetError(f"feature key {key!r}: expected <modality> or <modality>__<level number>")
        if arr.ndim != 2:
            raise FeatureDatasetError(f"feature {key!r} must be (N, dim), got shape {arr.shape}")
        mods.setdefault(mod, {})[int(level) if level else 0] = arr.astype(np.float32)
    if not mods:
        raise FeatureDatasetError("no modality arrays found (expected e.g. 'audio' and 'visual' (N, dim) arrays)")
    out = {}
    for mod in sorted(mods):
        levels = mods[mod]
        if sorted(levels) != list(range(len(levels))):
            raise FeatureDatasetError(f"modality {mod!r} has taps {sorted(levels)}; expected 0..{len(levels) - 1}")
        out[mod] = [levels[b] for b in range(len(levels))]
    return out


def load_feature_dataset(path: str | Path, *, n_tasks: int = 5, seed: int = 0, name: str = "") -> Scenario:
    """A Scenario from a pre-extracted feature file (format in the module docstring)."""
    p = Path(path)
    if p.is_dir():
        p = p / "features.npz"
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise FeatureDatasetError(f"cannot read feature dataset {p}: {exc}") from None
    if "labels" not in arrays:
        raise FeatureDatasetError(f"{p}: missing 'labels'")
    labels = arrays["labels"].astype(np.int64).reshape(-1)
    n = len(labels)
    taps = _split_taps(arrays)
    for m, lv in taps.items():
        for b, x in enumerate(lv):
            if x.shape[0] != n:
                raise FeatureDatasetError(f"{p}: {m}[{b}] has {x.shape[0]} rows, labels has {n}")
    if "split" in arrays:
        is_test = arrays["split"].astype(str) == "test"
    elif "is_test" in arrays:
        is_test = arrays["is_test"].astype(bool)
    else:
        raise FeatureDatasetError(f"{p}: missing 'split' (train/test per sample) or 'is_test'")
    present = np.stack([arrays.get(f"present__{m}", np.ones(n, bool)).astype(bool) for m in taps], axis=1)
    classes = np.unique(labels)
    kind = "domain" if "task" in arrays else "class"
    if kind == "domain":
        task_of = arrays["task"].astype(np.int64)
        order = classes
        new_label = labels
    else:
        if len(classes) < n_tasks:
            raise FeatureDatasetError(f"{p}: {len(classes)} classes cannot make {n_tasks} tasks")
        order = np.random.default_rng(seed).permutation(classes)
        rank = {int(c): i for i, c in enumerate(order)}
        new_label = np.asarray([rank[int(y)] for y in labels], np.int64)
        bounds = np.array_split(np.arange(len(order)), n_tasks)
        task_of_rank = np.concatenate([np.full(len(b), t) for t, b in enumerate(bounds)])
        task_of = task_of_rank[new_label]
    full = TaskData(taps=taps, present=present, labels=new_label, task=0)
    train, test = [], []
    for t in np.unique(task_of):
        for split_mask, out in ((~is_test, train), (is_test, test)):
            sub = full.subset(np.flatnonzero((task_of == t) & split_mask))
            sub.task, sub.name = int(t), f"task{int(t)}"
            out.append(sub)
    names = arrays["class_names"].astype(str).tolist() if "class_names" in arrays else [str(c) for c in classes]
    if kind == "class" and "class_names" in arrays:
        names = [names[int(c)] for c in order]
    return Scenario(name=name or (p.parent.name if p.name == "features.npz" else p.stem), kind=kind, train=train,
                    test=test, class_names=names, info={"source": str(p)})
