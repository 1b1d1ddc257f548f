"""Replay an MCAP recording as live wire messages on a ZeroMQ endpoint.

    python -m sensors.play run1.mcap --endpoint tcp://*:5560
    python -m sensors.play run1.mcap --endpoint tcp://*:5560 --rate 2.0 --loop --topic camera
    python -m sensors.play run1.mcap --endpoint tcp://*:5560 --fast --keep-stamps --wait-subscribers 1

Timing: message i goes out at start + (stamp_i - stamp_0) / rate, or back to back with
``--fast``. By default each message is re-stamped to the time it is sent (IMU samples are
shifted by the same offset) so that the agent's staleness and latency checks treat the
replay as a live sensor; ``--keep-stamps`` keeps the recorded stamps. Sequence numbers are
assigned afresh by the publisher. The last stdout line is a JSON summary. ``curve_secret_key``
/ ``curve_allow_dir``: publish with CurveZMQ, as ``sensors.publish`` does.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sensors.cli import run_tool
from sensors.curve import CurveServerConfig
from sensors.errors import CurveKeyError
from sensors.mcap_io import Player
from sensors.transport import Publisher

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class PlayConfig(CurveServerConfig):
    file: str = ""
    endpoint: str = "tcp://*:5560"
    rate: float = 1.0
    fast: bool = False
    loop: bool = False
    topics: list[str] = field(default_factory=list)  # empty = every topic
    keep_stamps: bool = False
    sndhwm: int = 1000
    wait_subscribers: int = 0
    wait_timeout_s: float = 10.0
    linger_s: float = 0.5

    def __post_init__(self) -> None:
        if not self.file:
            raise ValueError("file must name an .mcap file")
        if not self.rate > 0:
            raise ValueError(f"rate must be > 0, got {self.rate}")
        if self.sndhwm < 0 or self.wait_subscribers < 0 or self.wait_timeout_s < 0 or self.linger_s < 0:
            raise ValueError("sndhwm, wait_subscribers, wait_timeout_s and linger_s must be >= 0")


def play(cfg: PlayConfig, stop: threading.Event) -> dict[str, Any]:
    if not Path(cfg.file).is_file():
        raise FileNotFoundError(f"recording {cfg.file} does not exist")
    counts: Counter[str] = Counter()
    t0 = time.monotonic()
    player = Player(
        cfg.file,
        topics=cfg.topics or None,
        rate=cfg.rate,
        fast=cfg.fast,
        loop=cfg.loop,
        restamp=not cfg.keep_stamps,
        stop=stop,
    )
    with Publisher(cfg.endpoint, sndhwm=cfg.sndhwm, curve=cfg.curve_server()) as pub:
        log.info("playing %s on %s", cfg.file, pub.endpoint)
        if cfg.wait_subscribers and not pub.wait_for_subscribers(cfg.wait_subscribers, cfg.wait_timeout_s):
            log.warning(
                "only %d subscription(s) after %.1f s; playing anyway",
                pub.stats.subscriptions,
                cfg.wait_timeout_s,
            )
        for topic, msg in player:
            pub.publish(topic, msg)
            counts[topic] += 1
        if cfg.linger_s and not stop.is_set():
            time.sleep(cfg.linger_s)  # let ZeroMQ flush before the socket closes
        dropped = pub.stats.dropped_hwm
    return {
        "file": cfg.file,
        "published": dict(counts),
        "loops": player.loops,
        "dropped_hwm": dropped,
        "skipped": dict(player.skipped),
        "seconds": round(time.monotonic() - t0, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sensors.play", description=__doc__.split("\n\n")[0])
    parser.add_argument("file", nargs="?", default=None, help=".mcap file")
    parser.add_argument("--endpoint", default=None)
    parser.add_argument("--rate", type=float, default=None, help="speed factor (1.0 = real time)")
    parser.add_argument("--fast", action="store_true", default=None, help="as fast as possible")
    parser.add_argument("--loop", action="store_true", default=None)
    parser.add_argument(
        "--topic", dest="topics", action="append", default=None, help="topic to play (repeatable)"
    )
    parser.add_argument("--keep-stamps", action="store_true", default=None, help="keep recorded stamp_ns")
    parser.add_argument("--sndhwm", type=int, default=None)
    parser.add_argument("--wait-subscribers", type=int, default=None)
    parser.add_argument("--wait-timeout-s", type=float, default=None)
    return run_tool(parser, argv, PlayConfig, "play", play, failures=(((FileNotFoundError, CurveKeyError), "", 2),))


if __name__ == "__main__":
    sys.exit(main())
