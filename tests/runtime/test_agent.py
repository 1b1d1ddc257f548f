"""End to end on loopback: dataset publishers -> a real agent (ONNX Runtime backbones,
CurveZMQ control) -> a real console client. Teach tasks, see predictions, roll back,
restart from the checkpoint."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from benchmarks.harness import free_ports, wait_job, write_toml
from runtime import keys
from runtime.agent import Agent, ServeConfig
from runtime.console import ControlClient
from runtime.errors import ControlTimeoutError
from tests.runtime.inprocess import agent_system
from training.learner import LearnerConfig

TASK0 = ["t-shirt", "trouser"]
TASK1 = ["pullover", "dress"]


def _wait(client: ControlClient, job: str, timeout_s: float = 120.0) -> dict:
    return wait_job(client, job, timeout_s)


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    with agent_system(tmp_path_factory.mktemp("agent"), classes=[0, 1],
                      serve=ServeConfig(dataset_per_class=30, eval_per_class=20), learner=LearnerConfig()) as sys_:
        yield sys_


def test_learns_first_task_and_serves_predictions(system):
    client: ControlClient = system["client"]
    job = client.request("learn-new-task", {"name": "task0", "labels": TASK0, "source": "dataset:train"})["job"]
    snap = _wait(client, job)
    assert snap["state"] == "done", snap
    res = snap["result"]
    assert res["accepted"] is True and res["model_version"] == 1
    assert res["new_task_acc"] >= 0.5
    st = client.request("status")
    assert st["classes"] == TASK0 and st["tasks"] == ["task0"] and st["persisted"] is True
    # predictions on the PUB socket: the publisher shows classes 0 and 1 = TASK0
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.connect(f"tcp://127.0.0.1:{system['ports']['pred']}")
    sub.subscribe(b"prediction")
    got = []
    end = time.monotonic() + 20
    while len(got) < 20 and time.monotonic() < end:
        if sub.poll(500):
            got.append(msgpack.unpackb(sub.recv_multipart()[-1]))
    sub.close(0)
    assert len(got) >= 20
    assert all(p["label"] in TASK0 and p["model_version"] == 1 for p in got)
    assert all(p["present"] == {"image": True, "audio": True, "imu": True} for p in got[-5:])
    assert all(0.0 < p["latency_ms"] < 5000 for p in got)
    assert all(abs(sum(x for _, x in p["topk"]) - 1.0) < 1e-3 for p in got if len(p["topk"]) == 2)


def test_learns_second_task_without_forgetting_and_rejects_bad_requests(system):
    client: ControlClient = system["client"]
    job = client.request("learn-new-task", {"name": "task1", "labels": TASK1, "source": "dataset:train"})["job"]
    # a second learn-new-task while one runs is refused as busy
    reply = client.call("learn-new-task", {"name": "task9", "labels": ["coat"], "source": "dataset:train"})
    assert reply["ok"] is False and reply["error"]["code"] == "busy"
    snap = _wait(client, job)
    assert snap["state"] == "done" and snap["result"]["accepted"] is True, snap
    assert client.request("status")["model_version"] == 2
    ev = _wait(client, client.request("evaluate", {"split": "test"})["job"])
    accs = {t["task"]: t["accuracy"] for t in ev["result"]["tasks"]}
    assert set(accs) == {"task0", "task1"}
    assert accs["task0"] > 0.6 and accs["task1"] > 0.6, accs
    # bad requests get error replies, never a crash
    assert client.call("fly-to-the-moon")["error"]["code"] == "unknown_command"
    assert client.call("learn-new-task", {"name": "x", "labels": "coat", "source": "dataset:train"})["error"]["code"] == "bad_args"
    bad = client.call("learn-new-task", {"name": "x", "labels": ["unicorn"], "source": "dataset:train"})
    assert bad["ok"] is True  # accepted as a job, fails with a clear error
    snap = _wait(client, bad["result"]["job"])
    assert snap["state"] == "failed" and "unicorn" in snap["error"]["message"] if isinstance(snap["error"], dict) else "unicorn" in str(snap["error"])
    dup = _wait(client, client.request("learn-new-task", {"name": "task1", "labels": ["coat"], "source": "dataset:train"})["job"])
    assert dup["state"] == "failed" and "exists" in str(dup["error"])


def test_teach_live_samples(system):
    client: ControlClient = system["client"]
    snap = _wait(client, client.request("teach", {"label": "mug", "seconds": 1.5})["job"])
    assert snap["state"] == "done" and snap["result"]["samples"] >= 3, snap
    assert client.request("status")["taught"]["mug"] == snap["result"]["samples"]


def test_rollback_and_restart_resume(system):
    client: ControlClient = system["client"]
    res = client.request("rollback")
    assert res["model_version"] == 1 and res["tasks"] == ["task0"]
    st = client.request("status")
    assert st["classes"] == TASK0 and st["model_version"] == 1
    # a fresh agent on the same state directory resumes the committed model
    cfg, ccfg, scfg, lcfg = system["cfgs"]
    agent2 = Agent(cfg, ccfg, scfg, lcfg)
    try:
        assert agent2.restore() is True
        assert agent2.version == 1 and [t["name"] for t in agent2.tasks] == ["task0"]
        a, b = system["agent"].files, agent2.files
        assert a is not None and b is not None and a.entries == b.entries
        assert all(a.files[f] == b.files[f] for f in a.files)  # learner, buffer, reservoir, ONNX: bit for bit
        assert agent2.server.served.class_names == tuple(TASK0)
    finally:
        agent2.stop()


def test_unauthenticated_console_gets_nothing(system, tmp_path: Path):
    other = tmp_path / "keys"
    keys.create("server", other)
    keys.create("mallory", other)
    # mallory knows the real server key but is not on the allow-list
    (other / "server.key").write_bytes((system["kdir"] / "server.key").read_bytes())
    endpoint = system["agent"].control.config.endpoint
    with ControlClient(endpoint, keys_dir=other, key_name="mallory", timeout_s=1.5) as c, \
            pytest.raises(Exception, match="no reply"):
        c.request("status")


# --------------------------------------------------------------------------- start-up errors
# `python -m runtime.agent` as a real process: each problem is one ERROR line naming it, exit 2,
# no traceback; keys and the insecure endpoint are checked before the models load.
REPO = Path(__file__).resolve().parents[2]


def _agent_toml(root: Path, *, control: dict | None = None, agent: dict | None = None,
                intake: dict | None = None, learner: dict | None = None) -> tuple[Path, dict]:
    sensors, pred, ctl = free_ports(3)
    tables = {"agent": {"sensors": [f"tcp://127.0.0.1:{sensors}"], "predictions": f"tcp://127.0.0.1:{pred}",
                        "backend": "onnxruntime", "model_dir": REPO / "models", "checkpoint_dir": root / "state",
                        "recordings_dir": root / "recordings", **(agent or {})},
              "control": {"endpoint": f"tcp://127.0.0.1:{ctl}", "keys_dir": root / "keys", **(control or {})},
              **({"intake": intake} if intake else {}), **({"learner": learner} if learner else {})}
    return write_toml(root / "agent.toml", tables), {"pred": pred, "control": ctl}


def _run_agent(cfg: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime.agent", "--config", str(cfg), *extra], capture_output=True,
                          text=True, cwd=REPO, timeout=180, check=False)


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, r.stderr[-3000:]
    return errors[0]


def test_startup_missing_or_unprotected_server_key(tmp_path: Path) -> None:
    cfg, _ = _agent_toml(tmp_path)
    line = _one_error_line(_run_agent(cfg))
    secret = tmp_path / "keys" / "server.key_secret"
    assert f"cannot start: no server key {secret}" in line and "python -m runtime.keys create server" in line
    keys.create("server", tmp_path / "keys")
    secret.chmod(0o644)
    line = _one_error_line(_run_agent(cfg))
    assert f"secret key {secret} is accessible by group or others (mode 0644)" in line and "chmod 600" in line


@pytest.mark.parametrize("tables, needle", [
    ({"control": {"endpoint": "nowhere"}}, "endpoint='nowhere' is not a ZeroMQ endpoint"),
    ({"agent": {"sensorz": ["tcp://127.0.0.1:1"]}}, "unknown config key(s) ['sensorz']"),
    ({"control": {"insecure": True}}, "'insecure' is now a command-line flag only"),
    ({"agent": {"keep_checkpoints": 1}}, "keep_checkpoints=1 must be >= 2"),
    ({"learner": {"strategy": "nope"}}, "unknown strategy 'nope'"),
    ({"learner": {"epochs": 3}}, "[learner] epochs moved to [learner.training] epochs"),
])
def test_startup_bad_config(tmp_path: Path, tables: dict, needle: str) -> None:
    cfg, _ = _agent_toml(tmp_path, **tables)
    line = _one_error_line(_run_agent(cfg))
    assert "bad config" in line and needle in line, line


def test_startup_reads_the_intake_table_and_names_a_missing_sensor_key(tmp_path: Path) -> None:
    """[intake] reaches the agent: a Curve sensor key it names but cannot read stops the start."""
    keys.create("server", tmp_path / "keys")
    sensor = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    cfg, _ = _agent_toml(tmp_path, agent={"sensors": [sensor]},
                         intake={"curve_publisher_keys": {sensor: str(tmp_path / "camera.key")}})
    line = _one_error_line(_run_agent(cfg))
    assert "cannot start" in line and f"no CurveZMQ key file {tmp_path / 'camera.key'}" in line, line
    cfg, _ = _agent_toml(tmp_path, intake={"queue_bytes": 10})
    line = _one_error_line(_run_agent(cfg))
    assert "bad config" in line and "queue_bytes" in line, line


def test_startup_bad_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[agent\nsensors = 3\n")
    assert "is not valid TOML" in _one_error_line(_run_agent(bad))
    assert "does not exist" in _one_error_line(_run_agent(tmp_path / "missing.toml"))


def test_startup_insecure_refuses_a_non_loopback_endpoint(tmp_path: Path) -> None:
    cfg, ports = _agent_toml(tmp_path, control={"endpoint": f"tcp://0.0.0.0:{free_ports(1)[0]}"})
    line = _one_error_line(_run_agent(cfg, "--insecure"))
    assert "--insecure refuses endpoint='tcp://0.0.0.0:" in line and "loopback" in line


@pytest.mark.parametrize("which, what", [("control", "control endpoint"), ("pred", "predictions endpoint")])
def test_startup_port_in_use(tmp_path: Path, which: str, what: str) -> None:
    keys.create("server", tmp_path / "keys")
    cfg, ports = _agent_toml(tmp_path)
    ctx = zmq.Context()
    squatter = ctx.socket(zmq.ROUTER)
    squatter.linger = 0
    try:
        squatter.bind(f"tcp://127.0.0.1:{ports[which]}")
        line = _one_error_line(_run_agent(cfg))
    finally:
        squatter.close(0)
        ctx.term()
    assert f"cannot bind the {what} tcp://127.0.0.1:{ports[which]}: Address already in use" in line, line


def test_startup_missing_models(tmp_path: Path) -> None:
    keys.create("server", tmp_path / "keys")
    bundle = tmp_path / "models.tar"
    cfg, _ = _agent_toml(tmp_path, agent={"model_dir": tmp_path / "models", "model_bundle": bundle})
    line = _one_error_line(_run_agent(cfg))
    assert f"cannot serve: {bundle}: models bundle missing" in line, line


def test_launch_configs_still_load() -> None:
    """The shipped launch files load through the same checked loader (none sets insecure)."""
    from runtime.config import AgentConfig, ConsoleConfig, ControlConfig, load_section
    from runtime.demo import DemoConfig
    from runtime.web.config import WebConfig

    for toml in ("demo.toml", "robot.toml", "web-demo.toml"):
        path = REPO / "launch" / toml
        assert load_section(AgentConfig, path, "agent").recordings_dir == Path("recordings")
        assert load_section(ControlConfig, path, "control").insecure is False
    for toml in ("demo.toml", "web-demo.toml"):  # the web console watches the agent the launch file starts
        web = load_section(WebConfig, REPO / "launch" / toml, "web")
        agent = load_section(AgentConfig, REPO / "launch" / toml, "agent")
        control = load_section(ControlConfig, REPO / "launch" / toml, "control")
        assert (web.control, web.predictions, web.sensors) == (control.endpoint, agent.predictions, agent.sensors)
        assert web.keys_dir == control.keys_dir and web.key_name == "web" and web.loopback
    robot_web = load_section(WebConfig, REPO / "launch" / "robot.toml", "web")
    assert robot_web.loopback and robot_web.sensors[0] == load_section(AgentConfig, REPO / "launch" / "robot.toml",
                                                                       "agent").sensors[0]
    demo = load_section(DemoConfig, REPO / "launch" / "demo.toml", "demo", insecure=True)  # `runtime.demo --insecure`
    assert demo.insecure and demo.keys_dir == Path("state/demo/keys")
    assert load_section(ConsoleConfig, None, "console").insecure is False


def test_demo_refuses_insecure_in_its_toml(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from runtime import demo

    old = tmp_path / "demo.toml"
    text = (REPO / "launch" / "demo.toml").read_text()
    old.write_text(text.replace('key_name = "demo"', 'key_name = "demo"\ninsecure = true'))
    assert demo.main(["--config", str(old)]) == 2
    assert any("'insecure' is now a command-line flag only" in r.getMessage() for r in caplog.records)


def test_running_agent_roles_and_recordings(tmp_path: Path) -> None:
    """A real agent process: a viewer key cannot shut it down, mcap sources stay in recordings_dir."""
    kdir = tmp_path / "keys"
    keys.create("server", kdir)
    keys.create("op", kdir)
    keys.create("wall", kdir, role="viewer")
    (tmp_path / "recordings").mkdir()
    cfg, ports = _agent_toml(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "runtime.agent", "--config", str(cfg)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ep = f"tcp://127.0.0.1:{ports['control']}"
    try:
        with ControlClient(ep, keys_dir=kdir, key_name="wall", timeout_s=2.0) as viewer, \
                ControlClient(ep, keys_dir=kdir, key_name="op", timeout_s=5.0) as op:
            end = time.monotonic() + 120
            while True:
                assert proc.poll() is None, proc.stderr.read()[-3000:]
                try:
                    st = viewer.request("status")
                    break
                except ControlTimeoutError:
                    assert time.monotonic() < end, "agent did not answer within 120 s"
            assert st["model_version"] == 0
            reply = viewer.call("shutdown")
            assert reply["ok"] is False and reply["error"]["code"] == "forbidden", reply
            assert "forbidden for role viewer" in reply["error"]["message"]
            for source, needle in [("mcap:/etc/passwd", "outside the recordings directory"),
                                   ("mcap:../agent.toml", "'..' is not allowed"),
                                   ("mcap:a.mcap,b.mcap", "no recording 'a.mcap'")]:
                reply = op.call("learn-new-task", {"name": "x", "labels": ["a", "b"], "source": source})
                assert reply["ok"] is False and reply["error"]["code"] == "bad_args", reply
                assert needle in reply["error"]["message"], reply
            assert op.request("shutdown") == {"stopping": True}
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
