"""Run one sensor driver and publish its messages on a ZeroMQ endpoint until SIGINT/SIGTERM.

    python -m sensors.publish camera --endpoint tcp://*:5555 --device 0 --width 640 --height 480
    python -m sensors.publish mic --endpoint tcp://*:5556 --chunk-ms 20
    python -m sensors.publish imu --endpoint tcp://*:5557 --port /dev/ttyUSB0 --baudrate 115200
    python -m sensors.publish imu --endpoint tcp://*:5557 --file imu.csv --max-rate-hz 10 --wait-subscribers 1
    python -m sensors.publish camera --config robot.toml   # [publish] and [camera] tables
    python -m sensors.publish camera --endpoint tcp://*:5555 --curve-secret-key keys/sensors/camera.key_secret

Every driver option (``--device``, ``--file``, ``--batch``...) comes from the driver's config
dataclass, so the CLI, TOML and code cannot drift. A finite source (video or CSV file,
closed pipe) ends the run; the last stdout line is a JSON summary. With ``curve_secret_key``
the publisher is a CurveZMQ server (``sensors.curve``): subscribers must know its public key,
and with ``curve_allow_dir`` only the subscriber keys in that directory are let in.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import threading
import time
import typing
from dataclasses import dataclass
from typing import Any

from common.config import ConfigError, format_config, load_config, require_non_negative, require_positive
from sensors.cli import CONFIG_FAILURES, run_until_stopped
from sensors.curve import CurveServerConfig
from sensors.drivers import DRIVERS
from sensors.errors import DeviceNotAvailableError
from sensors.transport import Publisher

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class PublishConfig(CurveServerConfig):
    """``topic`` "" = the driver's default ("camera", "mic", "imu"). ``max_rate_hz`` paces
    fast sources (files); ``max_messages``/``seconds`` 0 = unlimited."""

    endpoint: str = "tcp://*:5555"
    topic: str = ""
    sndhwm: int = 100
    wait_subscribers: int = 0
    wait_timeout_s: float = 10.0
    max_rate_hz: float = 0.0
    max_messages: int = 0
    seconds: float = 0.0
    log_every_s: float = 5.0
    linger_s: float = 0.5

    def __post_init__(self) -> None:
        require_non_negative(self, "sndhwm", "wait_subscribers", "max_messages", "wait_timeout_s", "max_rate_hz",
                             "seconds", "linger_s")
        require_positive(self, "log_every_s")


# --------------------------------------------------------------------------- CLI helpers
def add_config_args(parser: argparse.ArgumentParser, cls: type, prefix: str) -> None:
    """One ``--field-name`` option per dataclass field, default None (= keep config/TOML value)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        opt = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        if typ is bool:
            parser.add_argument(
                opt,
                dest=prefix + f.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"(default {default})",
            )
        elif typ in (int, float, str):
            parser.add_argument(
                opt, dest=prefix + f.name, type=typ, default=None, help=f"(default {default!r})"
            )


def picked(ns: argparse.Namespace, prefix: str) -> dict[str, Any]:
    return {k[len(prefix) :]: v for k, v in vars(ns).items() if k.startswith(prefix) and v is not None}


# --------------------------------------------------------------------------- run
def run(driver_name: str, cfg: PublishConfig, driver_cfg: Any, stop: threading.Event) -> dict[str, Any]:
    """Publish until stop/limit/end of source; returns the summary."""
    driver = DRIVERS[driver_name](driver_cfg)
    topic = cfg.topic or driver.default_topic
    published = 0
    t0 = time.monotonic()
    with Publisher(cfg.endpoint, sndhwm=cfg.sndhwm, curve=cfg.curve_server()) as pub, driver:
        log.info("publishing %s on %s topic %r", driver_name, pub.endpoint, topic)
        if cfg.wait_subscribers and not pub.wait_for_subscribers(
            cfg.wait_subscribers, cfg.wait_timeout_s, topic=topic
        ):
            log.warning(
                "only %d subscription(s) after %.1f s; publishing anyway",
                pub.stats.subscriptions,
                cfg.wait_timeout_s,
            )
        last_log, last_count, next_due, ended = time.monotonic(), 0, time.monotonic(), False
        while not stop.is_set():
            if cfg.seconds and time.monotonic() - t0 >= cfg.seconds:
                break
            try:
                msg = driver.read(timeout_s=0.5)
            except TimeoutError:
                continue
            except EOFError as exc:
                log.info("source ended: %s", exc)
                ended = True
                break
            pub.publish(topic, msg)
            published += 1
            if cfg.max_messages and published >= cfg.max_messages:
                ended = True
                break
            now = time.monotonic()
            if cfg.max_rate_hz:
                next_due = max(next_due + 1.0 / cfg.max_rate_hz, now - 1.0)
                if next_due > now:
                    stop.wait(next_due - now)
            if now - last_log >= cfg.log_every_s:
                rate = (published - last_count) / (now - last_log)
                log.info(
                    "%s: %.1f msg/s, %d published, driver %s, publisher %s",
                    topic,
                    rate,
                    published,
                    driver.stats(),
                    pub.stats,
                )
                last_log, last_count = now, published
        if ended and cfg.linger_s:
            time.sleep(cfg.linger_s)  # let ZeroMQ's I/O thread flush before the socket closes
        sent, dropped = pub.stats.sent.get(topic, 0), pub.stats.dropped_hwm.get(topic, 0)
    elapsed = time.monotonic() - t0
    return {
        "driver": driver_name,
        "topic": topic,
        "published": published,
        "sent": sent,
        "dropped_hwm": dropped,
        "seconds": round(elapsed, 3),
        "rate_hz": round(published / elapsed, 3) if elapsed > 0 else 0.0,
        "driver_stats": driver.stats(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sensors.publish", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="driver", required=True)
    for name, cls in sorted(DRIVERS.items()):
        p = sub.add_parser(name, help=f"{cls.__name__} ({cls.config_cls.__name__})")
        p.add_argument("--config", default=None, help=f"TOML file with [publish] and [{name}] tables")
        p.add_argument("--log-level", default="INFO")
        add_config_args(p, PublishConfig, "pub__")
        add_config_args(p, cls.config_cls, "drv__")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        cfg = load_config(PublishConfig, args.config, "publish", **picked(args, "pub__"))
        driver_cfg = load_config(
            DRIVERS[args.driver].config_cls, args.config, args.driver, **picked(args, "drv__")
        )
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    log.info("effective config: %s", format_config(cfg))
    log.info("effective config: %s", format_config(driver_cfg))
    return run_until_stopped(
        lambda stop: run(args.driver, cfg, driver_cfg, stop),
        failures=((DeviceNotAvailableError, "device not available: ", 3), *CONFIG_FAILURES),
    )


if __name__ == "__main__":
    sys.exit(main())
