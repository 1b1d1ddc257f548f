"""The robot's continual-learning agent: ``python -m runtime.agent``.

Usage::

    python -m runtime.agent                                   # defaults: sensors on tcp://127.0.0.1:5556
    python -m runtime.agent --config launch/robot.toml
    python -m runtime.agent --config launch/demo.toml --insecure   # development only: no CurveZMQ, loopback only
    python -m runtime.agent --config launch/robot.toml --models-bundle models.tar   # built elsewhere

The process serves predictions from the camera, microphone and IMU streams and learns new tasks
in the background when an operator asks (``python -m runtime.console``); see
``runtime.service`` (what the agent owns), ``runtime.serving`` (the per-frame loop and the
prediction message) and ``runtime.learning`` (the learn-new-task job and its worker process).
It never imports torch: the learner is served as an ONNX export and trained in a worker.
This module is only the command line: configs from TOML, effective config printed, signals.

Start-up errors are one line and exit status 2, never a traceback: a bad config (named key),
a missing or unprotected server key, an endpoint in use (or, with ``--insecure``, not on
loopback), a missing or corrupt model or bundle. Keys and the insecure endpoint are checked
before the models load, the endpoints right after (a probe bind), so each fails in seconds.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

import zmq

from common.config import ConfigError, format_config
from export.errors import ExportError
from runtime import access
from runtime.config import AgentConfig, ControlConfig, FleetConfig, ServeConfig, load_section
from runtime.errors import EndpointError, KeyFileError
from runtime.intake import IntakeConfig
from runtime.keys import server_keys
from runtime.service import Agent, initial_task
from sensors.errors import CurveKeyError
from training.config import LearnerConfig

log = logging.getLogger("continua.agent")
__all__ = ["Agent", "ServeConfig", "main"]


def check_keys(ccfg: ControlConfig) -> None:
    """The server key exists, is readable and is private (``KeyFileError`` otherwise); the insecure
    endpoint is loopback (``EndpointError``). Before the models load: a first start fails in a second."""
    if ccfg.insecure:
        access.check_insecure_endpoint(ccfg.endpoint)
    else:
        server_keys(ccfg.keys_dir)


def probe_endpoints(cfg: AgentConfig, ccfg: ControlConfig) -> None:
    """Bind and release the control and prediction endpoints: one ``EndpointError`` line if one is in use."""
    ctx = zmq.Context()
    try:
        for what, endpoint in (("control endpoint", ccfg.endpoint), ("predictions endpoint", cfg.predictions)):
            sock = ctx.socket(zmq.PUB)
            sock.linger = 0
            try:
                access.bind(sock, endpoint, what)
            finally:
                sock.close(0)
    finally:
        ctx.term()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.agent", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="TOML file with [agent], [control], [serve], [learner], [intake] tables")
    parser.add_argument("--insecure", action="store_true", help="no CurveZMQ on the control socket (development only; "
                        "a loopback [control] endpoint only; a flag only, refused in the TOML file)")
    parser.add_argument("--backend", choices=("auto", "onnxruntime", "torch", "tensorrt"))
    parser.add_argument("--state", help="checkpoint directory (overrides [agent] checkpoint_dir)")
    parser.add_argument("--models-bundle", help="models bundle from `python -m export bundle` (overrides [agent] "
                                                "model_bundle): verified, then unpacked into model_dir")
    parser.add_argument("--fleet", metavar="HOST:PORT", help="join a fleet: run Flower's SuperNode against this "
                        "SuperLink Fleet API address (overrides [fleet] address; see runtime.fleet)")
    parser.add_argument("--fleet-insecure", action="store_true", help="no TLS on the fleet link (loopback "
                        "addresses only, development only; a flag only)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_section(AgentConfig, args.config, "agent", backend=args.backend, checkpoint_dir=args.state,
                           model_bundle=args.models_bundle)
        ccfg = load_section(ControlConfig, args.config, "control", insecure=True if args.insecure else None)
        scfg = load_section(ServeConfig, args.config, "serve")
        lcfg = load_section(LearnerConfig, args.config, "learner")
        icfg = load_section(IntakeConfig, args.config, "intake", endpoints=cfg.sensors, stale_s=cfg.stale_s,
                            camera_topic=scfg.camera_topic, mic_topic=scfg.mic_topic, imu_topic=scfg.imu_topic)
        fcfg = load_section(FleetConfig, args.config, "fleet", address=args.fleet,
                            insecure=True if args.fleet_insecure else None)
    except ConfigError as exc:
        log.error("bad config: %s", exc)
        return 2
    for c in (cfg, ccfg, scfg, lcfg, icfg, fcfg):
        log.info("config: %s", format_config(c))
    # The serving thread hands the GIL back and forth with the intake and tap-stream threads around
    # every ONNX Runtime call; a 1 ms switch interval (default 5 ms) keeps that wait off the latency tail.
    sys.setswitchinterval(scfg.gil_switch_s)
    try:
        check_keys(ccfg)
    except (KeyFileError, EndpointError) as exc:
        log.error("cannot start: %s", exc)
        return 2
    try:
        agent = Agent(cfg, ccfg, scfg, lcfg, intake=icfg, fleet=fcfg)
    except CurveKeyError as exc:  # a sensor key named in [intake] is missing or unreadable
        log.error("cannot start: %s", exc)
        return 2
    except (ExportError, OSError) as exc:  # a missing, corrupt or refused model or bundle: one line, not a traceback
        log.error("cannot serve: %s", exc)
        return 2
    try:
        probe_endpoints(cfg, ccfg)
    except EndpointError as exc:
        log.error("cannot start: %s", exc)
        agent.stop()
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: agent.stop_event.set())
    try:
        resumed = agent.restore()
    except (RuntimeError, ValueError) as exc:
        log.error("cannot resume: %s", exc)
        agent.stop()
        return 2
    try:
        agent.start()
    except (KeyFileError, EndpointError, CurveKeyError, zmq.ZMQError) as exc:  # taken or changed since the checks
        log.error("cannot start: %s", exc)
        agent.stop()
        return 2
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
