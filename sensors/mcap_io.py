"""Record wire messages to an MCAP file (ROS 2 profile) and read / replay them back.

The messages' ROS 2 definitions and CDR bytes come from ``sensors.ros2_messages``; this
module owns the file: channels, record times, regrouping and pacing.

MCAP record fields: ``log_time`` = acquisition stamp (per sample for IMU), ``publish_time``
= the wire message's ``stamp_ns`` (the batch stamp for IMU), ``sequence`` = wire ``seq``
mod 2**32. Schemas are written with encoding ``ros2msg``, channels with message encoding
``cdr``. Reading regroups consecutive IMU samples with the same (channel, sequence,
publish_time) into one batch, so record -> read reproduces stamps, seq (< 2**32), frame_id
and payload bytes exactly; the publisher ``session`` is not stored (read back as 0).
Files written by rosbag2 read too (each file's own schema text drives the decoding).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import numpy as np
from mcap.reader import make_reader
from mcap.writer import CompressionType, Writer

from sensors.errors import WireError
from sensors.ros2_messages import IMU, SCHEMAS, CdrDecoder, ImuSample, to_cdr
from sensors.wire import MAX_IMU_BATCH, Imu, Message

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- writer
class Recorder:
    """Writes wire messages of any topics to one MCAP file (context manager).

    One channel per (topic, schema); a topic that switches schema (rgb8 -> jpeg) gets a
    second channel with the same name. Thread-safe ``write``.
    """

    def __init__(
        self, path: str | Path, *, compression: str = "zstd", chunk_size: int = 4 * 1024 * 1024
    ) -> None:
        kinds = {"zstd": CompressionType.ZSTD, "lz4": CompressionType.LZ4, "none": CompressionType.NONE}
        if compression not in kinds:
            raise ValueError(f"compression must be one of {sorted(kinds)}, got {compression!r}")
        self.path = Path(path)
        self._file: IO[bytes] | None = self.path.open("wb")
        self._writer = Writer(self._file, compression=kinds[compression], chunk_size=chunk_size)
        self._writer.start(profile="ros2", library="continua")
        self._schemas: dict[str, int] = {}
        self._channels: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()  # wire messages per topic
        self.records = 0  # MCAP messages (IMU samples count one each)

    def write(self, topic: str, msg: Message) -> int:
        """Append one wire message; returns the number of MCAP records written."""
        records = to_cdr(msg)
        with self._lock:
            if self._file is None:
                raise RuntimeError(f"recorder for {self.path} is closed")
            for schema, data, log_time in records:
                channel = self._channel(topic, schema)
                self._writer.add_message(
                    channel_id=channel,
                    log_time=max(0, log_time),
                    data=data,
                    publish_time=int(msg.stamp_ns),
                    sequence=int(msg.seq) & 0xFFFFFFFF,
                )
            self.counts[topic] += 1
            self.records += len(records)
        return len(records)

    def _channel(self, topic: str, schema: str) -> int:
        key = (topic, schema)
        if key not in self._channels:
            if schema not in self._schemas:
                self._schemas[schema] = self._writer.register_schema(
                    name=schema, encoding="ros2msg", data=SCHEMAS[schema].encode()
                )
            self._channels[key] = self._writer.register_channel(
                topic=topic,
                message_encoding="cdr",
                schema_id=self._schemas[schema],
                metadata={"offered_qos_profiles": ""},
            )
        return self._channels[key]

    def close(self) -> None:
        with self._lock:
            if self._file is None:
                return
            try:
                self._writer.finish()
            finally:
                self._file.close()
                self._file = None
        log.info("wrote %s: %d records, %s", self.path, self.records, dict(self.counts))

    def __enter__(self) -> Recorder:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# --------------------------------------------------------------------------- reader
class McapReader:
    """Iterates an MCAP file back as wire messages, in file (= recording) order.

    Records it cannot map (other schemas, encodings such as png or 16UC1, corrupt CDR) are
    skipped and counted in ``skipped[reason]``. Bounded: an IMU batch being regrouped holds at
    most ``MAX_IMU_BATCH`` samples (a file whose records all share one key is split, not
    gathered into memory whole), and records come one chunk at a time from the mcap reader.
    """

    def __init__(self, path: str | Path, topics: Iterable[str] | None = None) -> None:
        self.path = Path(path)
        self.topics = None if topics is None else list(topics)
        self.skipped: Counter[str] = Counter()

    def __iter__(self) -> Iterator[tuple[str, Message]]:
        pending: list[tuple[str, Any, ImuSample]] = []  # IMU samples of the batch being regrouped
        pending_key: tuple[int, int, int] | None = None
        decoder = CdrDecoder()  # per file: decoders are cached by the file's schema ids
        with self.path.open("rb") as f:
            for schema, channel, record in make_reader(f).iter_messages(
                topics=self.topics, log_time_order=False
            ):
                is_imu = schema is not None and schema.name == IMU and channel.message_encoding == "cdr"
                if pending and (
                    not is_imu
                    or (channel.id, record.sequence, record.publish_time) != pending_key
                    or len(pending) >= MAX_IMU_BATCH
                ):
                    yield _imu_batch(pending)
                    pending = []
                try:
                    msg = decoder.decode(schema, channel.message_encoding, record.data)
                except WireError as exc:
                    self._skip(exc.reason, channel.topic, exc)
                    continue
                if isinstance(msg, ImuSample):
                    pending.append((channel.topic, record, msg))
                    pending_key = (channel.id, record.sequence, record.publish_time)
                    continue
                msg.seq = record.sequence
                yield channel.topic, msg
        if pending:
            yield _imu_batch(pending)

    def _skip(self, reason: str, topic: str, detail: Any) -> None:
        self.skipped[reason] += 1
        if self.skipped[reason] <= 3:
            log.warning("skipped a record on %r (%s): %s", topic, reason, detail)


def _imu_batch(samples: list[tuple[str, Any, ImuSample]]) -> tuple[str, Imu]:
    topic, record, first = samples[0]
    msg = Imu(
        stamps_ns=np.array([s.stamp_ns for _, _, s in samples], dtype=np.int64),
        values=np.stack([s.values for _, _, s in samples]),
        orientation_covariance=first.covariances[0],
        angular_velocity_covariance=first.covariances[1],
        linear_acceleration_covariance=first.covariances[2],
        stamp_ns=record.publish_time,
        seq=record.sequence,
        frame_id=first.frame_id,
    )
    return topic, msg


def read_messages(path: str | Path, topics: Iterable[str] | None = None) -> list[tuple[str, Message]]:
    """All messages of a (small) file as a list; use ``McapReader`` to stream big ones."""
    return list(McapReader(path, topics))


# --------------------------------------------------------------------------- player
class Player:
    """Yields (topic, msg) at the pace they were recorded: message i is released at
    ``start + (stamp_i - stamp_0) / rate`` (wall clock), or immediately with ``fast``.

    With ``restamp`` (default) each message's ``stamp_ns`` becomes the release time
    (``time.time_ns()``) and IMU sample stamps move by the same offset, so consumers that
    check latency or sync against live sensors see a live stream. ``stop`` (an Event) ends
    playback early, including during a wait.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        topics: Iterable[str] | None = None,
        rate: float = 1.0,
        fast: bool = False,
        loop: bool = False,
        restamp: bool = True,
        stop: threading.Event | None = None,
    ) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        self.path, self.topics, self.rate, self.fast, self.loop, self.restamp = (
            Path(path),
            topics,
            rate,
            fast,
            loop,
            restamp,
        )
        self.stop = stop if stop is not None else threading.Event()
        self.played = 0
        self.loops = 0
        self.skipped: Counter[str] = Counter()  # unreadable records, summed over loops

    def __iter__(self) -> Iterator[tuple[str, Message]]:
        while not self.stop.is_set():
            reader = McapReader(self.path, None if self.topics is None else list(self.topics))
            start_wall = time.monotonic()
            first: int | None = None
            n = 0
            try:
                for topic, msg in reader:
                    if first is None:
                        first = msg.stamp_ns
                    if not self.fast:
                        delay = start_wall + (msg.stamp_ns - first) / 1e9 / self.rate - time.monotonic()
                        if delay > 0 and self.stop.wait(delay):
                            return
                    if self.stop.is_set():
                        return
                    if self.restamp:
                        _restamp(msg, time.time_ns())
                    n += 1
                    self.played += 1
                    yield topic, msg
            finally:
                self.skipped.update(reader.skipped)
            self.loops += 1
            if not self.loop or n == 0:
                return


def _restamp(msg: Message, now_ns: int) -> None:
    if isinstance(msg, Imu):
        msg.stamps_ns = np.asarray(msg.stamps_ns, dtype=np.int64) + (now_ns - msg.stamp_ns)
    msg.stamp_ns = now_ns
