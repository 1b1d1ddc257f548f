"""Tables, plots and paired comparisons of benchmark.continual runs (kept apart: the runner stays short)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

METRICS = ("acc", "bwt", "fwt", "forgetting")


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
    """One row per strategy: mean +- 95 % interval (over seeds) of each metric, seconds per task,
    buffer KiB and bytes per buffered sample (where the strategy keeps samples)."""
    from training.metrics import fmt_mean_std

    lines = [f"== {title} ==",
             f"{'strategy':<20} {'ACC %':>13} {'BWT %':>13} {'FWT %':>13} {'forget %':>13} {'s/task':>7} "
             f"{'buf KiB':>8} {'B/sample':>8}"]
    for name, r in results.items():
        extra = ""
        if "mean_task_seconds" in r:
            extra = (f" {r['mean_task_seconds']['mean']:>7.2f} {r['buffer_bytes']['mean'] / 1024:>8.0f} "
                     f"{r.get('bytes_per_sample', 0):>8}")
        lines.append(f"{name:<20} {fmt_mean_std(r['acc']):>13} {fmt_mean_std(r['bwt']):>13} "
                     f"{fmt_mean_std(r['fwt']):>13} {fmt_mean_std(r['forgetting']):>13}{extra}")
    return "\n".join(lines)


def suite_mean(per_kind: dict[str, dict[str, list[Any]]]) -> dict[str, dict[str, Any]]:
    """Per strategy, each metric's per-seed mean over the scenarios, with mean and 95 % interval
    over seeds (the suite's headline: a seed is one draw of every scenario)."""
    from training.metrics import ci95

    kinds = list(per_kind)
    names = [n for n in per_kind[kinds[0]] if all(n in per_kind[k] for k in kinds)]
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        seeds = min(len(per_kind[k][name]) for k in kinds)
        row: dict[str, Any] = {"seeds": seeds, "scenarios": kinds}
        for key in METRICS:
            vals = [float(np.mean([getattr(per_kind[k][name][s], key) for k in kinds])) for s in range(seeds)]
            row[key] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "ci95": ci95(vals),
                        "per_seed": vals}
        out[name] = row
    return out


def comparisons(results: dict[str, dict[str, Any]], reference: str = "ours", full: str = "ours-full") -> dict[str, Any]:
    """Paired-by-seed ACC differences ``reference - X`` for every other strategy (95 % interval),
    and the ablation verdicts: part X of the full method (``full``, else ``reference``) "earns its
    place" when removing it ("ours-no-X") lowers mean ACC and the interval of the difference
    excludes 0."""
    from training.metrics import paired_difference

    out: dict[str, Any] = {}
    if reference in results:
        ref = results[reference]["acc"]["per_seed"]
        out = {"reference": reference, "acc_difference": {
            name: paired_difference(ref, r["acc"]["per_seed"]) for name, r in results.items() if name != reference}}
    base = full if full in results else reference
    if base in results:
        ref = results[base]["acc"]["per_seed"]
        verdicts = {}
        for name, r in results.items():
            if name.startswith("ours-no-"):
                d = paired_difference(ref, r["acc"]["per_seed"])
                verdicts[name[len("ours-no-"):]] = {**d, "earns_place": bool(d["excludes_zero"] and d["mean"] > 0)}
        out.update(ablation_reference=base, ablations=verdicts)
    return out


def comparison_table(comp: dict[str, Any]) -> str:
    if not comp:
        return ""
    lines = [f"-- paired by seed: ACC({comp.get('reference')}) - ACC(X), 95 % interval --"]
    for name, d in comp.get("acc_difference", {}).items():
        verdict = "" if not d["excludes_zero"] else (" better" if d["mean"] > 0 else " worse")
        lines.append(f"{name:<22} {d['mean'] * 100:+6.1f} [{d['low'] * 100:+6.1f}, {d['high'] * 100:+6.1f}]"
                     f"{verdict or ' no difference'}")
    for part, v in comp.get("ablations", {}).items():
        lines.append(f"part {part:<17} of {comp['ablation_reference']}: {v['mean'] * 100:+.1f} "
                     f"[{v['low'] * 100:+.1f}, {v['high'] * 100:+.1f}] "
                     f"{'earns its place' if v['earns_place'] else 'does NOT earn its place'}")
    return "\n".join(lines)
