"""Console main() against a real ControlServer driven by a fake agent (real ZeroMQ, fake learner)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime import console, keys
from runtime.commands import COMMANDS, parse_source
from runtime.config import ControlConfig
from runtime.console import ControlClient
from runtime.control import ControlServer
from runtime.errors import CommandError
from runtime.jobs import JobHandle, JobTracker


class FakeAgent:
    """Handlers with the agreed schemas; learning is a short scripted job."""

    def __init__(self) -> None:
        self.jobs = JobTracker()
        self.task_names = ["fashion"]
        self.calls: list[tuple[str, dict]] = []

    def attach(self, server: ControlServer) -> None:
        for name in COMMANDS:
            server.register(name, getattr(self, name.replace("-", "_")), COMMANDS[name])

    def status(self) -> dict:
        return {"model_version": 3, "tasks": len(self.task_names), "job": self.jobs.snapshot()}

    def tasks(self) -> list[str]:
        return self.task_names

    def learn_new_task(self, name: str, labels: list[str], source: str) -> dict:
        self.calls.append(("learn-new-task", {"name": name, "labels": labels, "source": source}))
        src = parse_source(source)

        def job(h: JobHandle) -> dict:
            if name == "broken":
                raise RuntimeError("no samples collected")
            for i, phase in enumerate(["collecting", "training", "evaluating"]):
                h.update(i / 3, phase)
                for _ in range(30 if name == "slow" else 10):
                    h.check_cancelled()
                    time.sleep(0.03)
            self.task_names.append(name)
            return {"task": name, "accuracy": 0.93, "old_task_drop": 0.02, "source": src["kind"]}

        return {"job": self.jobs.start("learn-new-task", job, meta={"task": name})}

    def teach(self, label: str, seconds: float) -> dict:
        self.calls.append(("teach", {"label": label, "seconds": seconds}))
        return {"label": label, "seconds": seconds, "samples": 12}

    def export_skill(self, task: str) -> dict:
        self.calls.append(("export-skill", {"task": task}))
        if task not in self.task_names:
            raise CommandError("bad_args", f"no learned task {task!r}")
        return {"job": self.jobs.start("export-skill", lambda h: {"task": task, "skill_bytes": 578_000})}

    def import_skill(self, path: str) -> dict:
        self.calls.append(("import-skill", {"path": path}))
        return {"job": self.jobs.start("import-skill", lambda h: {"task": "peer", "accepted": True})}

    def cancel(self) -> dict:
        return {"cancelled": self.jobs.cancel()}

    def rollback(self) -> dict:
        raise CommandError("no_checkpoint", "nothing to roll back to")

    def save(self) -> dict:
        return {"checkpoint": "ckpt-000004"}

    def shutdown(self) -> dict:
        return {"stopping": True}


@pytest.fixture
def agent() -> Iterator[tuple[FakeAgent, str]]:
    fake = FakeAgent()
    server = ControlServer(ControlConfig(endpoint="tcp://127.0.0.1:*", insecure=True), jobs=fake.jobs)
    fake.attach(server)
    with server:
        yield fake, server.endpoint


def run_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, list[dict]]:
    code = console.main(argv)
    out = capsys.readouterr().out
    return code, [json.loads(line) for line in out.splitlines() if line.strip()]


def test_simple_commands_json(agent: tuple[FakeAgent, str], capsys: pytest.CaptureFixture[str]) -> None:
    fake, ep = agent
    base = ["--connect", ep, "--insecure", "--json"]
    code, lines = run_json(capsys, [*base, "status"])
    assert code == 0 and len(lines) == 1
    assert lines[0]["ok"] and lines[0]["result"]["model_version"] == 3
    code, lines = run_json(capsys, [*base, "tasks"])
    assert code == 0 and lines[-1]["result"] == ["fashion"]
    code, lines = run_json(capsys, [*base, "teach", "hammer", "--seconds", "2.5"])
    assert code == 0 and lines[-1]["result"] == {"label": "hammer", "seconds": 2.5, "samples": 12}
    assert fake.calls[-1] == ("teach", {"label": "hammer", "seconds": 2.5})
    code, lines = run_json(capsys, [*base, "ping"])
    assert code == 0 and lines[-1]["result"]["pong"] is True
    code, lines = run_json(capsys, [*base, "save"])
    assert code == 0 and lines[-1]["result"] == {"checkpoint": "ckpt-000004"}
    code, lines = run_json(capsys, [*base, "rollback"])
    assert code == 1 and lines[-1]["ok"] is False and lines[-1]["error"]["code"] == "no_checkpoint"
    code, lines = run_json(capsys, [*base, "shutdown"])
    assert code == 0 and lines[-1]["result"] == {"stopping": True}
    code, lines = run_json(capsys, [*base, "export-skill", "fashion"])
    assert code == 0 and lines[-1]["result"]["result"] == {"task": "fashion", "skill_bytes": 578_000}
    assert fake.calls[-1] == ("export-skill", {"task": "fashion"})
    code, lines = run_json(capsys, [*base, "export-skill", "nope"])
    assert code == 1 and lines[-1]["error"]["code"] == "bad_args"
    code, lines = run_json(capsys, [*base, "import-skill", "shirts-1a2b.skill"])
    assert code == 0 and lines[-1]["result"]["result"] == {"task": "peer", "accepted": True}
    assert fake.calls[-1] == ("import-skill", {"path": "shirts-1a2b.skill"})


def test_learn_new_task_follows_job_json(agent: tuple[FakeAgent, str], capsys: pytest.CaptureFixture[str],
                                         tmp_path: Path) -> None:
    fake, ep = agent
    cfg = tmp_path / "console.toml"
    cfg.write_text("[console]\npoll_s = 0.03\n")  # ~10 polls per 0.3 s phase
    code, lines = run_json(capsys, ["--config", str(cfg), "--connect", ep, "--insecure", "--json",
                                    "learn-new-task", "tools",
                                    "--labels", "hammer, wrench,saw", "--source", "live:30"])
    assert code == 0
    assert fake.calls[-1] == ("learn-new-task", {"name": "tools", "labels": ["hammer", "wrench", "saw"],
                                                 "source": "live:30"})
    job_id = lines[0]["result"]["job"]
    polls = [line["result"] for line in lines[1:]]
    assert all(p["id"] == job_id for p in polls)
    phases = [p["phase"] for p in polls]
    assert [p for i, p in enumerate(phases) if i == 0 or phases[i - 1] != p][-3:] == [
        "collecting", "training", "evaluating"]
    progress = [p["progress"] for p in polls]
    assert progress == sorted(progress)
    final = lines[-1]["result"]
    assert final["state"] == "done" and final["progress"] == 1.0
    assert final["result"] == {"task": "tools", "accuracy": 0.93, "old_task_drop": 0.02, "source": "live"}
    assert "tools" in fake.task_names


def test_learn_progress_bar_human(agent: tuple[FakeAgent, str], capsys: pytest.CaptureFixture[str]) -> None:
    _, ep = agent
    code = console.main(["--connect", ep, "--insecure", "learn-new-task", "digits", "--labels", "0,1",
                         "--source", "dataset:train"])
    out, err = capsys.readouterr()
    assert code == 0
    assert "100%" in err and "job " in err  # the tqdm bar and the job line go to stderr
    assert "accuracy: 0.93" in out


def test_failed_and_busy_and_cancelled(agent: tuple[FakeAgent, str], capsys: pytest.CaptureFixture[str]) -> None:
    fake, ep = agent
    base = ["--connect", ep, "--insecure", "--json"]
    code, lines = run_json(capsys, [*base, "learn-new-task", "broken", "--labels", "a", "--source", "live:1"])
    assert code == 1 and lines[-1]["result"]["state"] == "failed"
    assert "no samples collected" in lines[-1]["result"]["error"]

    # a slow job: a second learn gets "busy", cancel ends the first as "cancelled"
    result: dict[str, object] = {}

    def follow() -> None:
        result["code"], result["lines"] = run_json(capsys, [*base, "learn-new-task", "slow", "--labels", "a",
                                                            "--source", "mcap:/tmp/x.mcap"])

    t = threading.Thread(target=follow)
    t.start()
    with ControlClient(ep, insecure=True, timeout_s=5) as c:
        deadline = time.monotonic() + 5
        while fake.jobs.active() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        reply = c.call("learn-new-task", {"name": "other", "labels": ["b"], "source": "live:1"})
        assert reply["ok"] is False and reply["error"]["code"] == "busy"
        assert c.request("cancel") == {"cancelled": True}
    t.join(10)
    assert result["code"] == 4 and result["lines"][-1]["result"]["state"] == "cancelled"


def test_usage_errors_and_timeout(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert console.main(["--insecure", "learn-new-task", "x", "--labels", "a", "--source", "usb:3"]) == 2
    assert "unknown source kind" in capsys.readouterr().err
    assert console.main(["--insecure", "learn-new-task", "x", "--labels", ",", "--source", "live:3"]) == 2
    # nothing listens there: a clear timeout, exit 3, JSON error line
    code, lines = run_json(capsys, ["--connect", "tcp://127.0.0.1:1", "--insecure", "--timeout", "0.3",
                                    "--json", "status"])
    assert code == 3 and lines[-1]["error"]["code"] == "timeout" and "no reply" in lines[-1]["error"]["message"]
    # no keys at all: exit 3 with a hint
    assert console.main(["--connect", "tcp://127.0.0.1:1", "--keys", str(tmp_path), "status"]) == 3
    assert "runtime.keys create" in capsys.readouterr().err


def test_curve_console(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys.create("server", tmp_path)
    keys.create("alice", tmp_path)
    keys.create("bob", tmp_path)
    fake = FakeAgent()
    server = ControlServer(ControlConfig(endpoint="tcp://127.0.0.1:*", keys_dir=tmp_path), jobs=fake.jobs)
    fake.attach(server)
    with server:
        code, lines = run_json(capsys, ["--connect", server.endpoint, "--keys", str(tmp_path), "--key-name",
                                        "bob", "--json", "status"])
        assert code == 0 and lines[-1]["result"]["tasks"] == 1
        assert server.sessions()[0]["user"] == keys.client_keys(tmp_path, "bob")[0].decode()
        # two operator keys and none named: refuse locally
        assert console.main(["--connect", server.endpoint, "--keys", str(tmp_path), "status"]) == 3


def test_insecure_is_a_flag_only_and_loopback_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = tmp_path / "console.toml"
    old.write_text('[console]\nconnect = "tcp://127.0.0.1:5570"\ninsecure = true\n')
    assert console.main(["--config", str(old), "status"]) == 2
    err = capsys.readouterr().err
    assert "'insecure' is now a command-line flag only" in err and "--insecure" in err and str(old) in err
    # the flag is refused for an endpoint off this machine: nothing is sent in the clear
    assert console.main(["--connect", "tcp://10.1.2.3:5570", "--insecure", "status"]) == 2
    assert "loopback" in capsys.readouterr().err
    assert console.main(["--config", str(tmp_path / "none.toml"), "status"]) == 2  # a missing file is named
    assert "none.toml" in capsys.readouterr().err


def test_viewer_console_is_refused_what_it_may_not_do(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys.create("server", tmp_path)
    keys.create("wall", tmp_path, role="viewer")
    fake = FakeAgent()
    server = ControlServer(ControlConfig(endpoint="tcp://127.0.0.1:*", keys_dir=tmp_path), jobs=fake.jobs)
    fake.attach(server)
    with server:
        base = ["--connect", server.endpoint, "--keys", str(tmp_path), "--key-name", "wall"]
        code, lines = run_json(capsys, [*base, "--json", "status"])
        assert code == 0 and lines[-1]["result"]["model_version"] == 3
        code, lines = run_json(capsys, [*base, "--json", "shutdown"])
        assert code == 1 and lines[-1]["error"]["code"] == "forbidden"
        assert console.main([*base, "learn-new-task", "x", "--labels", "a", "--source", "live:1"]) == 1
        assert "error forbidden: 'learn-new-task' is forbidden for role viewer" in capsys.readouterr().err
        assert fake.calls == [] and server.stats()["errors"] == {"forbidden": 2}
