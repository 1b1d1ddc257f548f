"""A command-line inspector of live sensor topics, like ``ros2 topic hz`` and ``ros2 topic echo``.

Look at live topics: rate, counts, invalid messages, drops, restarts, latency (like
``ros2 topic hz`` + ``ros2 topic echo``).

    python -m sensors.inspect --connect tcp://127.0.0.1:5555
    python -m sensors.inspect --connect tcp://robot:5555 --topic camera --seconds 10 --echo
    python -m sensors.inspect --connect tcp://127.0.0.1:5557 --count 100 --json

Stops by itself after ``--count`` valid messages or ``--seconds`` (default 5 s), whichever
comes first. Reads every message (``LosslessReader``) so the counts are exact. Latency is
receive time minus ``stamp_ns`` (both ``time.time_ns()``; across machines it includes the
clock offset). With ``--json`` the last stdout line is one JSON object:
``{"<topic>": {"count", "rate_hz", "drops", "restarts", "kind", "last_seq", "bytes",
"latency_ms": {"p50", "p99", "max"}}, ..., "invalid": {"<reason>": n}, "skipped": {"<topic>": n},
"overflow": {"<topic>": n}}``. ``skipped``: side topics that are not wire format (the demo
publishers' ``truth``, ``skip_topics``), skipped by name; ``overflow``: messages dropped oldest
at the reader's byte budget. ``--curve-key ENDPOINT=KEYFILE`` listens to a CurveZMQ publisher.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sensors.cli import run_tool
from sensors.curve import client_from
from sensors.transport import LosslessReader
from sensors.wire import Audio, Image, Imu, Message

log = logging.getLogger(__name__)

MAX_LATENCIES = 100_000  # per topic, newest kept
_NOT_TOPICS = ("invalid", "skipped", "overflow")  # keys of the result beside the topics


@dataclass(kw_only=True)
class InspectConfig:
    connect: list[str] = field(default_factory=lambda: ["tcp://127.0.0.1:5555"])
    topics: list[str] = field(default_factory=list)  # empty = every topic
    count: int = 0  # stop after this many valid messages; 0 = no limit
    seconds: float = 5.0  # stop after this long; 0 = no limit (then --count is needed)
    echo: bool = False
    json: bool = False
    skip_topics: list[str] = field(default_factory=lambda: ["truth"])  # not wire format: skipped, not invalid
    queue_bytes: int = 256 << 20
    curve_publisher_keys: dict[str, Any] = field(default_factory=dict)  # endpoint -> publisher key file(s)
    curve_secret_key: str = ""

    def __post_init__(self) -> None:
        if not self.connect:
            raise ValueError("connect must list at least one endpoint")
        if self.count < 0 or self.seconds < 0:
            raise ValueError(f"count and seconds must be >= 0, got {self.count}, {self.seconds}")
        if not self.count and not self.seconds:
            raise ValueError("set count or seconds (> 0) so that inspect stops by itself")


@dataclass
class _TopicStats:
    kind: str = ""
    count: int = 0
    nbytes: int = 0
    first_rx: int = 0
    last_rx: int = 0
    last_seq: int = -1
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_LATENCIES))

    def add(self, msg: Message, rx_ns: int) -> None:
        self.kind = msg.kind
        self.count += 1
        self.first_rx = self.first_rx or rx_ns
        self.last_rx = rx_ns
        self.last_seq = msg.seq
        self.nbytes += _payload_bytes(msg)
        self.latencies_ms.append((rx_ns - msg.stamp_ns) / 1e6)

    def summary(self, drops: int, restarts: int) -> dict[str, Any]:
        span = (self.last_rx - self.first_rx) / 1e9
        lat = np.asarray(self.latencies_ms, dtype=np.float64)
        return {
            "kind": self.kind,
            "count": self.count,
            "rate_hz": round((self.count - 1) / span, 3) if self.count > 1 and span > 0 else 0.0,
            "drops": drops,
            "restarts": restarts,
            "last_seq": self.last_seq,
            "bytes": self.nbytes,
            "latency_ms": {
                "p50": round(float(np.percentile(lat, 50)), 3) if lat.size else None,
                "p99": round(float(np.percentile(lat, 99)), 3) if lat.size else None,
                "max": round(float(lat.max()), 3) if lat.size else None,
            },
        }


def _payload_bytes(msg: Message) -> int:
    if isinstance(msg, Imu):
        return int(msg.values.nbytes + msg.stamps_ns.nbytes)
    return int(msg.data.nbytes)


def describe(topic: str, msg: Message) -> str:
    """One ``echo`` line for a message."""
    head = f"{topic} seq={msg.seq} stamp_ns={msg.stamp_ns} frame_id={msg.frame_id!r}"
    if isinstance(msg, Image):
        return f"{head} image {msg.encoding} {msg.height}x{msg.width} {msg.data.nbytes} B"
    if isinstance(msg, Audio):
        return f"{head} audio {msg.format} {msg.sample_rate} Hz {msg.data.shape[0]}x{msg.data.shape[1]}"
    if isinstance(msg, Imu):
        last = msg.values[-1]
        return (
            f"{head} imu count={len(msg.stamps_ns)} acc={np.round(last[7:10], 3).tolist()} "
            f"gyro={np.round(last[4:7], 3).tolist()}"
        )
    return head


def inspect(cfg: InspectConfig, stop: threading.Event, out: Any = None) -> dict[str, Any]:
    """Read until a limit or stop; returns ``{topic: {...}, "invalid": {...}}``."""
    per_topic: dict[str, _TopicStats] = {}
    total = 0
    t0 = time.monotonic()
    curve = client_from(cfg.curve_publisher_keys, cfg.curve_secret_key, cfg.connect)
    with LosslessReader(cfg.connect, cfg.topics or None, max_bytes=cfg.queue_bytes,
                        max_message_bytes=min(cfg.queue_bytes, 32 << 20), skip_topics=cfg.skip_topics,
                        curve=curve) as reader:
        while not stop.is_set():
            remaining_s = cfg.seconds - (time.monotonic() - t0) if cfg.seconds else 0.1
            if remaining_s <= 0:
                break
            got = reader.recv(timeout_ms=max(1, int(min(remaining_s, 0.1) * 1000)))
            if got is None:
                continue
            topic, msg, rx_ns = got
            per_topic.setdefault(topic, _TopicStats()).add(msg, rx_ns)
            total += 1
            if cfg.echo and out is not None:
                print(describe(topic, msg), file=out, flush=True)
            if cfg.count and total >= cfg.count:
                break
        st = reader.stats()
    result: dict[str, Any] = {
        topic: ts.summary(st.drops.get(topic, 0), st.restarts.get(topic, 0))
        for topic, ts in sorted(per_topic.items())
    }
    result["invalid"] = dict(st.invalid)
    result["skipped"] = dict(st.skipped)
    result["overflow"] = dict(st.overflow)
    return result


def format_table(result: dict[str, Any]) -> str:
    lines = [
        f"{'topic':<20} {'kind':<6} {'count':>7} {'rate_hz':>9} {'drops':>6} {'restarts':>8} {'lat p50 ms':>10} {'lat p99 ms':>10}"
    ]
    for topic, s in result.items():
        if topic in _NOT_TOPICS:
            continue
        lat = s["latency_ms"]
        lines.append(
            f"{topic:<20} {s['kind']:<6} {s['count']:>7} {s['rate_hz']:>9.2f} {s['drops']:>6} {s['restarts']:>8} "
            f"{lat['p50'] if lat['p50'] is not None else '-':>10} {lat['p99'] if lat['p99'] is not None else '-':>10}"
        )
    if len(lines) == 1:
        lines.append("(no valid messages)")
    inv = result.get("invalid", {})
    lines.append(f"invalid: {sum(inv.values())} {inv if inv else ''}".rstrip())
    for key in ("skipped", "overflow"):
        if result.get(key):
            lines.append(f"{key}: {sum(result[key].values())} {result[key]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sensors.inspect", description=__doc__.split("\n\n")[0])
    parser.add_argument("--connect", action="append", default=None, help="endpoint (repeatable)")
    parser.add_argument(
        "--topic", dest="topics", action="append", default=None, help="topic (repeatable; default all)"
    )
    parser.add_argument("--count", type=int, default=None, help="stop after N valid messages")
    parser.add_argument("--seconds", type=float, default=None, help="stop after S seconds (default 5)")
    parser.add_argument("--echo", action="store_true", default=None, help="print one line per message")
    parser.add_argument("--json", action="store_true", default=None, help="last stdout line: one JSON object")
    return run_tool(parser, argv, InspectConfig, "inspect", lambda cfg, stop: inspect(cfg, stop, out=sys.stdout),
                    report=_report, curve_keys=True)


def _report(cfg: InspectConfig, result: dict[str, Any]) -> None:
    print(format_table(result))
    if cfg.json:
        print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    sys.exit(main())
