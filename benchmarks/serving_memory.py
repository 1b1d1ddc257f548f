"""Measures what torch would cost the serving process in resident memory.

What torch would cost the serving process: the agent's resident memory as shipped (ONNX Runtime
only; torch lives in the learning worker) and with torch imported into it, in one run.

Usage::

    python -m benchmarks.serving_memory                    # models from models/, bundled first
    python -m benchmarks.serving_memory --bundle models.tar --seconds 10

Both agents serve from the same models bundle (``python -m export bundle``), from fresh state,
on the same publishers (camera, mic, IMU on loopback). Each one serves ``seconds`` seconds, learns
one task (``dataset:train``, through its worker process) and serves ``seconds`` more on the
learned model; its RSS is sampled every 0.25 s throughout (the serving process only, not the
worker). The same command is the serving half of ``make robot-check``, where it runs in a venv
that holds only the robot's dependencies (``pip install .``).

Prints one JSON line (and writes ``benchmarks/results/serving_memory.json``):
``rss_mb`` per variant (``serving``, before learning; ``learned``, after the swap; ``max``),
``torch_cost_mb`` and ``ratio`` (with torch / without, max RSS), ``accepted`` per variant,
``torch_in_serving`` (libtorch mapped into the serving process: must be false without preload),
and the versions of torch, ONNX Runtime and Python.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import REPO, Agent, collect_predictions, maps_library, report, subscribe_predictions
from benchmarks.reliability import Sensors, fresh_setup
from export.bundle import make_bundle

log = logging.getLogger("benchmarks.serving_memory")
VARIANTS = {"without_torch": (), "with_torch": ("torch",)}


def _sample(agent: Agent, seconds: float) -> list[float]:
    out, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        out.append(agent.proc.rss_mb())
        time.sleep(0.25)
    return out


def run_variant(root: Path, sensors: Sensors, bundle: Path, name: str, seconds: float) -> dict[str, Any]:
    setup = fresh_setup(root, sensors, None, name, agent={"model_dir": root / f"models-{name}", "model_bundle": bundle})
    agent = Agent(setup, tag=f"{name}-agent", preload=VARIANTS[name])
    try:
        agent.wait_ready(120)
        serving = _sample(agent, seconds)
        snap = agent.wait_job(agent.learn("task0", ["t-shirt", "trouser"]), 300)
        accepted = snap["state"] == "done" and bool(snap["result"] and snap["result"].get("accepted"))
        learned = _sample(agent, seconds)
        sub = subscribe_predictions(setup.pred_ep)
        preds = collect_predictions(sub, 2.0, 60)
        sub.close(0)
        torch_mapped = maps_library(agent.proc.pid, "libtorch")  # still serving here
    finally:
        agent.stop()
    return {"rss_mb": {"serving": round(max(serving), 1), "learned": round(max(learned), 1),
                       "max": round(max(serving + learned), 1)},
            "accepted": accepted, "job": {"state": snap["state"], "error": snap.get("error")},
            "predictions_after": len(preds), "model_version_after": preds[-1]["model_version"] if preds else None,
            "torch_in_serving": torch_mapped}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.serving_memory", description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, help="models bundle (default: bundle models/ first)")
    ap.add_argument("--seconds", type=float, default=8.0, help="seconds of serving sampled before and after learning")
    ap.add_argument("--name", default="serving_memory", help="results file name (benchmarks/results/NAME.json)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(f"config: {vars(a)}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="continua-mem-") as tmp:
        root = Path(tmp)
        bundle = a.bundle or make_bundle(REPO / "models", root / "models.tar").path
        sensors = Sensors(root)
        try:
            res = {name: run_variant(root, sensors, bundle, name, a.seconds) for name in VARIANTS}
        finally:
            sensors.stop()
    without, with_ = res["without_torch"]["rss_mb"]["max"], res["with_torch"]["rss_mb"]["max"]
    import onnxruntime
    import torch

    out = {"variants": res, "torch_cost_mb": round(with_ - without, 1), "ratio": round(with_ / without, 3),
           "seconds": a.seconds, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
           "python": platform.python_version()}
    report(a.name, out)
    ok = res["without_torch"]["accepted"] and not res["without_torch"]["torch_in_serving"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
