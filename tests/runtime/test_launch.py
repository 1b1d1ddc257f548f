"""Launch files parse into every process's config, and the launcher stops what it started."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from common.config import ConfigError, load_config
from demodata.publish import StreamerConfig
from runtime.agent import ServeConfig
from runtime.config import AgentConfig, ControlConfig
from runtime.demo import DemoConfig
from runtime.launch import LaunchConfig, Launcher, ProcessSpec, load_launch
from training.learner import LearnerConfig

LAUNCH = Path(__file__).resolve().parents[2] / "launch"


@pytest.mark.parametrize("name", ["demo.toml", "robot.toml", "web-demo.toml"])
def test_launch_files_load_every_section(name: str) -> None:
    path = LAUNCH / name
    agent = load_config(AgentConfig, path, "agent")
    assert agent.sensors and agent.predictions.startswith("tcp://")
    assert agent.model_bundle == (Path("models.tar") if name == "robot.toml" else None)
    load_config(ControlConfig, path, "control")
    load_config(ServeConfig, path, "serve")
    load_config(LearnerConfig, path, "learner")
    if name == "web-demo.toml":  # runs until Ctrl-C: nothing is required
        cfg, procs = load_launch(path)
        assert [(p.name, p.module, p.required) for p in procs] == [
            ("publishers", "demodata.publish", False), ("agent", "runtime.agent", False),
            ("web", "runtime.web", False)]
        assert "--foxglove" in procs[2].args and cfg.timeout_s == 0
        assert load_config(StreamerConfig, path, "publishers").endpoint == agent.sensors[0]
    if name == "demo.toml":
        cfg, procs = load_launch(path)
        assert [p.name for p in procs] == ["publishers", "agent", "web", "console"]
        assert [p.required for p in procs] == [False, False, False, True]
        demo = load_config(DemoConfig, path, "demo")
        assert len(demo.tasks) == 5 and all(len(t) == 2 for t in demo.tasks)
        pubs = load_config(StreamerConfig, path, "publishers")
        assert pubs.endpoint == agent.sensors[0]


def test_bad_launch_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[process]]\nname = "a"\nmodule = "x"\ntypo = 1\n')
    with pytest.raises(ConfigError, match="typo"):
        load_launch(bad)
    bad.write_text("[launch]\ngrace_s = 1.0\n")
    with pytest.raises(ConfigError, match="no \\[\\[process\\]\\]"):
        load_launch(bad)


def test_required_process_ends_the_launch_and_the_rest_is_stopped(tmp_path: Path) -> None:
    long = ProcessSpec(name="publishers", module="demodata.publish",
                       args=["--endpoint", "tcp://127.0.0.1:0", "--seconds", "60"])
    short = ProcessSpec(name="keys", module="runtime.keys", args=["list", "--dir", str(tmp_path)], required=True,
                        delay_s=0.5)
    launcher = Launcher(LaunchConfig(grace_s=5.0, timeout_s=60.0), [long, short])
    t0 = time.monotonic()
    launcher.start()
    rc = launcher.wait()
    launcher.shutdown()
    assert rc == 0
    assert launcher.procs["publishers"].poll() is not None  # stopped by the launcher, not by its 60 s
    assert time.monotonic() - t0 < 40
