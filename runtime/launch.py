"""Start a whole continua system from one TOML launch file, like ``ros2 launch``.

Usage::

    python -m runtime.launch launch/demo.toml

A launch file lists processes; each is ``python -m MODULE ARGS...`` in its own process
group with its output prefixed by its name. Processes marked ``required`` end the launch
when they exit (the scripted console of the demo, say); on that, on SIGINT/SIGTERM or on a
non-zero exit of a ``required`` process, the others get SIGINT, then SIGTERM, then SIGKILL,
each after a grace period, so that agents save their state before they go::

    [launch]
    grace_s = 10.0

    [[process]]
    name = "publishers"
    module = "demodata.publish"
    args = ["--config", "launch/publishers.toml"]

    [[process]]
    name = "console"
    module = "runtime.demo"
    required = true          # the launch ends when this one ends
    delay_s = 2.0            # start after the others had time to bind

Why not shell scripts: the launch has to stop everything it started, in order, even when
one part crashes, and say which one did; a prefixed log of every process in one terminal
is what a robot operator reads first.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.config import ConfigError, from_dict, read_toml

log = logging.getLogger("continua.launch")


@dataclass(kw_only=True)
class ProcessSpec:
    name: str
    module: str
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    required: bool = False
    delay_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.name or not self.module:
            raise ValueError(f"process needs a name and a module, got name={self.name!r} module={self.module!r}")
        if self.delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, got {self.delay_s}")


@dataclass(kw_only=True)
class LaunchConfig:
    grace_s: float = 10.0
    timeout_s: float = 0.0  # 0 = no limit


def load_launch(path: str | Path) -> tuple[LaunchConfig, list[ProcessSpec]]:
    p = Path(path)
    data = read_toml(p, "launch file")
    cfg = from_dict(LaunchConfig, data.get("launch", {}), prefix="launch.")
    procs = [from_dict(ProcessSpec, d, prefix=f"process[{i}].") for i, d in enumerate(data.get("process", []))]
    if not procs:
        raise ConfigError(f"launch file {p} lists no [[process]]")
    names = [s.name for s in procs]
    if len(set(names)) != len(names):
        raise ConfigError(f"process names must be unique, got {names}")
    return cfg, procs


class Launcher:
    """Runs the processes of a launch file and stops them all, in reverse order."""

    def __init__(self, cfg: LaunchConfig, specs: list[ProcessSpec]) -> None:
        self.cfg = cfg
        self.specs = specs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._stop = threading.Event()
        self._pumps: list[threading.Thread] = []

    def _pump(self, name: str, stream) -> None:
        width = max(len(s.name) for s in self.specs)
        for raw in iter(stream.readline, b""):
            sys.stdout.write(f"[{name:<{width}}] {raw.decode(errors='replace')}")
            sys.stdout.flush()

    def start(self) -> None:
        for spec in self.specs:
            if spec.delay_s and self._stop.wait(spec.delay_s):
                return
            env = {**os.environ, "PYTHONUNBUFFERED": "1", **spec.env}
            proc = subprocess.Popen(
                [sys.executable, "-m", spec.module, *spec.args],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
            self.procs[spec.name] = proc
            pump = threading.Thread(target=self._pump, args=(spec.name, proc.stdout), daemon=True)
            pump.start()
            self._pumps.append(pump)
            log.info("started %s (pid %d): python -m %s %s", spec.name, proc.pid, spec.module, " ".join(spec.args))

    def wait(self) -> int:
        """Block until a required process ends, any process fails, a signal, or the timeout."""
        deadline = time.monotonic() + self.cfg.timeout_s if self.cfg.timeout_s > 0 else None
        required = {s.name for s in self.specs if s.required}
        while not self._stop.is_set():
            for name, proc in self.procs.items():
                rc = proc.poll()
                if rc is None:
                    continue
                if name in required or rc != 0:
                    level = logging.INFO if rc == 0 else logging.ERROR
                    log.log(level, "%s exited with status %d; stopping the launch", name, rc)
                    return rc
            if deadline is not None and time.monotonic() > deadline:
                log.error("launch timed out after %.0f s", self.cfg.timeout_s)
                return 124
            self._stop.wait(0.2)
        return 130

    def request_stop(self) -> None:
        self._stop.set()

    def shutdown(self) -> None:
        """SIGINT, then SIGTERM, then SIGKILL, in reverse start order, each after grace_s."""
        alive = [(n, p) for n, p in reversed(list(self.procs.items())) if p.poll() is None]
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            for name, proc in alive:
                if proc.poll() is None:
                    log.info("sending %s to %s", sig.name, name)
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, sig)
            end = time.monotonic() + self.cfg.grace_s
            while time.monotonic() < end and any(p.poll() is None for _, p in alive):
                time.sleep(0.1)
            alive = [(n, p) for n, p in alive if p.poll() is None]
            if not alive:
                break
        for pump in self._pumps:
            pump.join(timeout=2.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.launch", description=__doc__.split("\n")[0])
    parser.add_argument("launch_file")
    parser.add_argument("--timeout-s", type=float, default=None, help="stop everything after this long")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg, specs = load_launch(args.launch_file)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    if args.timeout_s is not None:
        cfg.timeout_s = args.timeout_s
    launcher = Launcher(cfg, specs)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: launcher.request_stop())
    rc = 1
    try:
        launcher.start()
        rc = launcher.wait()
    finally:
        launcher.shutdown()
    return rc


if __name__ == "__main__":
    sys.exit(main())
