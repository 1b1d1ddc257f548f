"""Record live topics to an MCAP file (opens in Foxglove and ``ros2 bag``), dropping nothing.

    python -m sensors.record --connect tcp://robot:5555 --connect tcp://robot:5556 --out run1.mcap
    python -m sensors.record --connect tcp://127.0.0.1:5557 --topic imu --seconds 60 --out imu.mcap
    python -m sensors.record --connect tcp://robot:5556 --curve-key tcp://robot:5556=keys/sensors/camera.key

Why ``LosslessReader``: a recording is training data, so every message is read in order
instead of newest-only, within a byte budget (``queue_bytes``): a disk slower than the
sensors drops the oldest queued messages (``overflow`` in the summary) instead of growing
memory without bound; sequence gaps that happen upstream (a publisher's own send HWM) are
``drops``. Side topics that are not wire format (the demo publishers' ``truth``) are skipped
by name (``skip_topics``) and reported as ``skipped``, not as invalid. With
``curve_publisher_keys`` (endpoint -> publisher key file, ``sensors.curve``) only those
publishers are heard. Stops on SIGINT/SIGTERM, after ``--seconds`` or ``--max-messages``; the
last stdout line is a JSON summary.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sensors.cli import run_tool
from sensors.curve import client_from
from sensors.errors import WireError
from sensors.mcap_io import Recorder
from sensors.transport import LosslessReader

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class RecordConfig:
    connect: list[str] = field(default_factory=lambda: ["tcp://127.0.0.1:5555"])
    out: str = "recording.mcap"
    topics: list[str] = field(default_factory=list)  # empty = every topic
    seconds: float = 0.0  # 0 = until a signal
    max_messages: int = 0  # 0 = unlimited
    compression: str = "zstd"
    log_every_s: float = 5.0
    skip_topics: list[str] = field(default_factory=lambda: ["truth"])  # not wire format: skipped, not invalid
    queue_bytes: int = 256 << 20  # messages read but not yet written, at most (oldest dropped beyond)
    max_message_bytes: int = 32 << 20  # a larger message is dropped unread (invalid "message_size")
    curve_publisher_keys: dict[str, Any] = field(default_factory=dict)  # endpoint -> publisher key file(s)
    curve_secret_key: str = ""  # this recorder's key pair ("" = a fresh one)

    def __post_init__(self) -> None:
        if not self.connect:
            raise ValueError("connect must list at least one endpoint")
        if not self.out:
            raise ValueError("out must be a file path")
        if self.seconds < 0 or self.max_messages < 0:
            raise ValueError(
                f"seconds and max_messages must be >= 0, got {self.seconds}, {self.max_messages}"
            )
        if self.compression not in ("zstd", "lz4", "none"):
            raise ValueError(f"compression must be zstd, lz4 or none, got {self.compression!r}")
        if self.log_every_s <= 0:
            raise ValueError(f"log_every_s must be > 0, got {self.log_every_s}")
        if not 0 < self.max_message_bytes <= self.queue_bytes:
            raise ValueError(
                f"need 0 < max_message_bytes <= queue_bytes, got {self.max_message_bytes}, {self.queue_bytes}"
            )


def record(cfg: RecordConfig, stop: threading.Event) -> dict[str, Any]:
    """Record until stop or a limit; returns the summary (counts, drops, invalid)."""
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    total, unwritable = 0, 0
    curve = client_from(cfg.curve_publisher_keys, cfg.curve_secret_key, cfg.connect)
    with (
        LosslessReader(cfg.connect, cfg.topics or None, max_bytes=cfg.queue_bytes,
                       max_message_bytes=cfg.max_message_bytes, skip_topics=cfg.skip_topics, curve=curve) as reader,
        Recorder(cfg.out, compression=cfg.compression) as rec,
    ):
        last_log = t0
        while not stop.is_set():
            now = time.monotonic()
            if cfg.seconds and now - t0 >= cfg.seconds:
                break
            got = reader.recv(timeout_ms=100)
            if got is not None:
                topic, msg, _rx_ns = got
                try:
                    rec.write(topic, msg)
                except WireError as exc:  # e.g. a stamp beyond 2038 or a NUL in frame_id
                    unwritable += 1
                    log.warning("message on %r not recordable: %s", topic, exc)
                    continue
                total += 1
                if cfg.max_messages and total >= cfg.max_messages:
                    break
            if now - last_log >= cfg.log_every_s:
                st = reader.stats()
                log.info(
                    "recorded %d messages %s; rate %s; drops %s; overflow %s; invalid %s; skipped %s",
                    total,
                    dict(rec.counts),
                    st.rate_hz,
                    st.drops,
                    st.overflow,
                    st.invalid,
                    st.skipped,
                )
                last_log = now
        st = reader.stats()
        counts = dict(rec.counts)
        records = rec.records
    return {
        "out": cfg.out,
        "messages": total,
        "records": records,
        "per_topic": counts,
        "drops": st.drops,
        "restarts": st.restarts,
        "invalid": st.invalid,
        "skipped": st.skipped,
        "overflow": st.overflow,
        "peak_queued_bytes": st.peak_queued_bytes,
        "link": st.link,
        "unwritable": unwritable,
        "seconds": round(time.monotonic() - t0, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sensors.record", description=__doc__.split("\n\n")[0])
    parser.add_argument("--connect", action="append", default=None, help="endpoint to read (repeatable)")
    parser.add_argument("--out", default=None, help="output .mcap file")
    parser.add_argument(
        "--topic",
        dest="topics",
        action="append",
        default=None,
        help="topic to record (repeatable; default all)",
    )
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--max-messages", type=int, default=None)
    parser.add_argument("--compression", choices=["zstd", "lz4", "none"], default=None)
    return run_tool(parser, argv, RecordConfig, "record", record, curve_keys=True)


if __name__ == "__main__":
    sys.exit(main())
