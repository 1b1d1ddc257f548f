"""Two real agents started with a fleet address (in this process: real publishers, backbones,
workers) and a real fleet server (`python -m runtime.fleet server`: SuperLink + the ServerApp) on
loopback: a task taught on one robot reaches the other through Flower, is imported through the
gate and served there, while both keep predicting."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.harness import free_ports, wait_job
from runtime.agent import ServeConfig
from runtime.config import FleetConfig
from tests.runtime.inprocess import agent_system, learn_from_dataset
from training import skills
from training.config import StrategyConfig
from training.learner import LearnerConfig

REPO = Path(__file__).resolve().parents[2]
TASK_A = ["t-shirt", "trouser"]
TASK_B = ["pullover", "dress"]


def _until(check, timeout_s: float, what: str) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def test_agent_refuses_an_unsafe_fleet_link_in_one_line(tmp_path):
    cfg = tmp_path / "robot.toml"
    cfg.write_text("[fleet]\ninsecure = true\n")
    for args, says in ((["--fleet", "10.0.0.5:9092", "--fleet-insecure"], "without TLS the fleet link must stay on loopback"),
                       (["--config", str(cfg)], "start with --fleet-insecure")):
        res = subprocess.run([sys.executable, "-m", "runtime.agent", *args], cwd=tmp_path, capture_output=True,
                             text=True, timeout=60, check=False)
        assert res.returncode == 2 and says in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_a_task_taught_on_one_robot_is_served_by_the_other_after_a_fleet_round(tmp_path):
    key = skills.new_key(tmp_path / "fleet.key")
    port, node_a, node_b = free_ports(3)
    cfg = tmp_path / "fleet.toml"
    cfg.write_text(f'[fleet_server]\nstore_dir = "{tmp_path / "store"}"\nkey_file = "{key}"\npoll_s = 1.0\n'
                   f'min_nodes = 2\nround_every_s = 3600\nsuperlink = "127.0.0.1:{port}"\n')
    log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen([sys.executable, "-m", "runtime.fleet", "server", "--config", str(cfg), "--insecure"],
                              cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    serve = ServeConfig(dataset_per_class=40, eval_per_class=20)
    learner = LearnerConfig(training=StrategyConfig(epochs=4))

    def fleet(robot: str, node_port: int) -> FleetConfig:
        return FleetConfig(address=f"127.0.0.1:{port}", insecure=True, key_file=key, robot=robot, node_port=node_port,
                           import_poll_s=0.5)

    try:
        with agent_system(tmp_path / "a", classes=[0, 1], serve=serve, learner=learner,
                          fleet=fleet("robot-a", node_a)) as a, \
             agent_system(tmp_path / "b", classes=[0, 1, 2, 3], serve=serve, learner=learner,
                          fleet=fleet("robot-b", node_b)) as b:
            ra = learn_from_dataset(a["client"], "shirts", TASK_A)
            assert ra["skill"]["shared"] and ra["skill"]["fleet_outbox"], ra  # signed and queued at once
            learn_from_dataset(b["client"], "tops", TASK_B)
            served_b = b["client"].request("status")["predictions"]
            _until(lambda: {t["name"] for t in b["agent"].tasks} >= {"shirts", "tops"}
                   and {t["name"] for t in a["agent"].tasks} >= {"shirts", "tops"}, 240,
                   "both robots to serve both tasks (see server.log and each spool's supernode.log)")
            shirts = next(t for t in b["agent"].tasks if t["name"] == "shirts")
            assert shirts["origin"] == "robot-a" and shirts["skill"] == ra["skill"]["skill_id"]
            assert b["client"].request("status")["predictions"] > served_b  # served all along
            ev = wait_job(b["client"], b["client"].request("evaluate", {"split": "test"})["job"], 120)
            acc = {t["task"]: t["accuracy"] for t in ev["result"]["tasks"]}
            assert acc["shirts"] >= 0.8 and acc["tops"] >= 0.8, ev
            st = b["agent"].skills.stats()
            assert st["imported"] == 1 and st["spool"]["imported"] == 1 and st["node_alive"], st
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
        log.close()
