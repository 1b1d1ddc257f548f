"""Process harness shared by the benchmarks and the process-level tests.

Everything runs as real processes on 127.0.0.1: dataset publishers
(``python -m demodata.publish``) and the agent (``python -m runtime.agent --config
<tmp toml>``), with free ports, CurveZMQ keys and a config TOML written per run. Every wait is
bounded; a process's output goes to a log file beside its config.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import zmq

from runtime import keys
from runtime.console import ControlClient
from runtime.errors import ControlTimeoutError
from sensors.durable import FAULT_ENV

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"  # ignored by git: runs leave the tree clean
SLOW_SAVE_ENV = "CONTINUA_TEST_SLOW_SAVE_S"


def save_figure(fig: Any, name: str) -> Path:
    """``fig`` as ``results/<name>`` (110 dpi), then closed."""
    import matplotlib.pyplot as plt

    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(RESULTS / name, dpi=110)
    plt.close(fig)
    return RESULTS / name


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A run's keys, configs, state and process logs under the system temp folder.

    Removed when the run ends normally, kept and named on stderr when it raises: the agent's
    log in it is what explains a failed run, and a clean run should not leave ~60 MB behind.
    """
    root = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield root
    except BaseException:
        print(f"run files kept for inspection: {root}", file=sys.stderr)
        raise
    shutil.rmtree(root, ignore_errors=True)


def report(name: str, res: dict[str, Any]) -> None:
    """The benchmark's result: ``results/<name>.json`` and one JSON line on stdout."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res))


def _port_range() -> tuple[int, int]:
    """Ports below the kernel's ephemeral range: one handed out inside it can be taken, between
    this check and the real bind, as the local port of an outgoing connection (ZeroMQ sockets
    reconnecting to a stopped peer churn through them several times a second)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
    except (OSError, ValueError):
        return 49152, 65536
    return (20000, low) if low > 21000 else (high + 1, 65536)


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (all held at once, so none is handed out twice).

    Checked with plain sockets, whose close is synchronous: a ZeroMQ socket's close returns
    before its I/O thread has released the port, and a bind right after could fail.
    """
    lo, hi = _port_range()
    rng = random.Random()
    held: list[socket.socket] = []
    try:
        for _ in range(100 * n):
            if len(held) == n:
                break
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind(("127.0.0.1", rng.randrange(lo, hi)))
            except OSError:
                s.close()
                continue
            held.append(s)
        if len(held) < n:
            raise RuntimeError(f"no {n} free loopback ports in [{lo}, {hi})")
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def make_keys(root: Path) -> Path:
    kdir = root / "keys"
    if not (kdir / "server.key_secret").exists():
        keys.create("server", kdir)
        keys.create("op", kdir)
        keys.create("op2", kdir)
    return kdir


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml(v)}" for k, v in value.items()) + "}"
    return repr(value)


def write_toml(path: Path, tables: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for name, table in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml(v)}" for k, v in table.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


class Proc:
    """A child process with its output in a log file; every wait is bounded."""

    def __init__(self, name: str, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name, self.log_path = name, log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in wait()
        full_env = {k: v for k, v in os.environ.items() if k not in (SLOW_SAVE_ENV, FAULT_ENV)}  # only on purpose
        full_env.update(PYTHONUNBUFFERED="1", **(env or {}))
        self.popen = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
                                      env=full_env, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL, the power cut."""
        if self.alive():
            self.popen.send_signal(signal.SIGKILL)
        self.wait(10.0)

    def stop(self, timeout_s: float = 20.0) -> int | None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
        rc = self.wait(timeout_s)
        if rc is None:
            self.kill()
        return self.popen.returncode

    def wait(self, timeout_s: float) -> int | None:
        try:
            rc = self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None
        self._log.close()
        return rc

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def rss_mb(self) -> float:
        return proc_rss_mb(self.pid)


def start_publisher(root: Path, name: str, endpoint: str, *, topics: tuple[str, ...] = ("camera", "mic", "imu"),
                    classes: tuple[int, ...] = (0, 1), seed: int = 0, truth: bool = False, **table: Any) -> Proc:
    """Dataset publishers as a process; topics not in ``topics`` go to names the agent ignores.
    ``truth``: publish the ground-truth topic as ``truth``; ``table``: more [publishers] keys."""
    cfg_table: dict[str, Any] = {"endpoint": endpoint, "split": "test", "classes": list(classes), "dwell_s": 1.0,
                                 "camera_resample": "frame", "seed": seed,
                                 "truth_topic": "truth" if truth else f"off-truth-{name}", **table}
    for t, key in (("camera", "camera_topic"), ("mic", "mic_topic"), ("imu", "imu_topic")):
        cfg_table[key] = t if t in topics else f"off-{t}"
    cfg = write_toml(root / f"pub-{name}.toml", {"publishers": cfg_table})
    return Proc(f"pub-{name}", ["-m", "demodata.publish", "--config", str(cfg)], root / f"pub-{name}.log")


def maps_library(pid: int, needle: str) -> bool:
    """Whether a shared library whose path contains ``needle`` is mapped into process ``pid``
    (``"libtorch"``: torch was imported). OSError when the process is gone."""
    with open(f"/proc/{pid}/maps") as f:
        return any(needle in line for line in f)


def proc_rss_mb(pid: int) -> float:
    """Resident memory of a process (MB); nan when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


@dataclass
class AgentSetup:
    """Everything needed to (re)start one agent: ports, keys, state directory, config file."""

    root: Path
    kdir: Path
    sensors: list[str]
    state: Path
    pred_port: int = field(default_factory=free_port)
    control_port: int = field(default_factory=free_port)
    serve: dict[str, Any] = field(default_factory=dict)
    control: dict[str, Any] = field(default_factory=dict)
    agent: dict[str, Any] = field(default_factory=dict)  # more [agent] keys
    learner: dict[str, Any] = field(default_factory=lambda: {"training": {"threads": 1}})  # [learner] tree

    @property
    def control_ep(self) -> str:
        return f"tcp://127.0.0.1:{self.control_port}"

    @property
    def pred_ep(self) -> str:
        return f"tcp://127.0.0.1:{self.pred_port}"

    def config(self) -> Path:
        return write_toml(self.root / "agent.toml", {
            "agent": {"sensors": self.sensors, "predictions": self.pred_ep, "backend": "onnxruntime",
                      "model_dir": REPO / "models", "checkpoint_dir": self.state, "min_new_task_acc": 0.3,
                      "max_old_task_drop": 0.6, **self.agent},
            "control": {"endpoint": self.control_ep, "keys_dir": self.kdir, **self.control},
            "serve": {"dataset_per_class": 30, "eval_per_class": 20, **self.serve},
            "learner": self.learner,
        })

    def client(self, key: str = "op", timeout_s: float = 10.0) -> ControlClient:
        return ControlClient(self.control_ep, keys_dir=self.kdir, key_name=key, timeout_s=timeout_s)


def wait_job(client: ControlClient, job: str, timeout_s: float = 120.0, until: Any = None) -> dict:
    """Poll the job until it ends (or ``until(snapshot)`` is true); bounded."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        snap = client.request("job", {"id": job})
        if snap["state"] != "running" or (until is not None and until(snap)):
            return snap
        time.sleep(0.05)
    raise TimeoutError(f"job {job} still running after {timeout_s} s")


class Agent:
    """``python -m runtime.agent --config`` as a process plus a console client."""

    def __init__(self, setup: AgentSetup, *, env: dict[str, str] | None = None, tag: str = "agent",
                 preload: tuple[str, ...] = ()) -> None:
        """``preload``: modules the process imports before the agent starts (what they cost it)."""
        self.setup = setup
        if preload:
            code = (f"import runpy, {', '.join(preload)}; "
                    "runpy.run_module('runtime.agent', run_name='__main__', alter_sys=True)")
            launch = ["-c", code]
        else:
            launch = ["-m", "runtime.agent"]
        self.proc = Proc(tag, [*launch, "--config", str(setup.config())], setup.root / f"{tag}.log", env)
        self.client = setup.client()

    def wait_ready(self, timeout_s: float = 60.0, predictions: bool = True) -> dict:
        """Status once the control socket answers (and, with ``predictions``, it has predicted)."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if not self.proc.alive():
                raise RuntimeError(f"agent exited with {self.proc.popen.returncode}:\n{self.proc.log_text()[-3000:]}")
            try:
                st = self.client.request("status", timeout_s=2.0)
            except ControlTimeoutError:
                continue
            if not predictions or st["predictions"] > 0:
                return st
            time.sleep(0.2)
        raise TimeoutError(f"agent not ready in {timeout_s} s:\n{self.proc.log_text()[-3000:]}")

    def status(self) -> dict:
        return self.client.request("status")

    def wait_job(self, job: str, timeout_s: float = 120.0, until: Any = None) -> dict:
        return wait_job(self.client, job, timeout_s, until)

    def learn(self, name: str, labels: list[str]) -> str:
        return self.client.request("learn-new-task", {"name": name, "labels": labels, "source": "dataset:train"})["job"]

    def kill(self) -> None:
        self.client.close()
        self.proc.kill()

    def stop(self) -> int | None:
        self.client.close()
        return self.proc.stop()


def subscribe_predictions(endpoint: str) -> zmq.Socket:
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.linger = 0
    sub.connect(endpoint)
    sub.subscribe(b"prediction")
    return sub


def drain(sub: zmq.Socket) -> int:
    """Drop what the socket queued so far (a window must not count messages from before it)."""
    n = 0
    while sub.poll(0):
        sub.recv_multipart()
        n += 1
    return n


def collect_predictions(sub: zmq.Socket, seconds: float, max_n: int = 100_000) -> list[dict]:
    out: list[dict] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end and len(out) < max_n:
        if sub.poll(100):
            out.append(msgpack.unpackb(sub.recv_multipart()[-1]))
    return out
