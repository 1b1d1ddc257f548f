"""The robot's continual-learning agent: ``python -m runtime.agent``.

Usage::

    python -m runtime.agent                                   # defaults: sensors on tcp://127.0.0.1:5556
    python -m runtime.agent --config launch/robot.toml
    python -m runtime.agent --config launch/demo.toml --insecure   # development only: no CurveZMQ
    python -m runtime.agent --config launch/robot.toml --models-bundle models.tar   # built elsewhere

The process serves predictions from the camera, microphone and IMU streams and learns new tasks
in the background when an operator asks (``python -m runtime.console``); see
``runtime.service`` (what the agent owns), ``runtime.serving`` (the per-frame loop and the
prediction message) and ``runtime.learning`` (the learn-new-task job and its worker process).
It never imports torch: the learner is served as an ONNX export and trained in a worker.
This module is only the command line: configs from TOML, effective config printed, signals.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from export.errors import ExportError
from runtime.config import AgentConfig, ControlConfig, ServeConfig
from runtime.service import Agent, initial_task
from sensors.config import ConfigError, format_config, load_config
from training.config import LearnerConfig

log = logging.getLogger("continua.agent")
__all__ = ["Agent", "ServeConfig", "main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.agent", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="TOML file with [agent], [control], [serve], [learner] tables")
    parser.add_argument("--insecure", action="store_true", help="no CurveZMQ on the control socket (development only)")
    parser.add_argument("--backend", choices=("auto", "onnxruntime", "torch", "tensorrt"))
    parser.add_argument("--state", help="checkpoint directory (overrides [agent] checkpoint_dir)")
    parser.add_argument("--models-bundle", help="models bundle from `python -m export bundle` (overrides [agent] "
                                                "model_bundle): verified, then unpacked into model_dir")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(AgentConfig, args.config, "agent", backend=args.backend, checkpoint_dir=args.state,
                          model_bundle=args.models_bundle)
        ccfg = load_config(ControlConfig, args.config, "control", insecure=True if args.insecure else None)
        scfg = load_config(ServeConfig, args.config, "serve")
        lcfg = load_config(LearnerConfig, args.config, "learner")
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    for c in (cfg, ccfg, scfg, lcfg):
        log.info("config: %s", format_config(c))
    # The serving thread hands the GIL back and forth with the intake and tap-stream threads around
    # every ONNX Runtime call; a 1 ms switch interval (default 5 ms) keeps that wait off the latency tail.
    sys.setswitchinterval(scfg.gil_switch_s)
    try:
        agent = Agent(cfg, ccfg, scfg, lcfg)
    except (ExportError, OSError) as exc:  # a missing, corrupt or refused model or bundle: one line, not a traceback
        log.error("cannot serve: %s", exc)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: agent.stop_event.set())
    try:
        resumed = agent.restore()
    except (RuntimeError, ValueError) as exc:
        log.error("cannot resume: %s", exc)
        agent.stop()
        return 2
    agent.start()
    if not resumed and scfg.initial_task:
        initial_task(agent, scfg.initial_task)
    try:
        while not agent.stop_event.wait(0.5):
            pass
    finally:
        log.info("stopping: saving state")
        agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
