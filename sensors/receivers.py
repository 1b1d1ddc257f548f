"""Receivers of the wire format (``sensors.wire``), bounded in bytes.

Re-exported by ``sensors.transport``.

- ``LatestReceiver``: a background thread that reads everything and keeps only the newest
  message per topic, for inference. ``ZMQ_CONFLATE`` cannot do this (it breaks multipart
  messages) and a small HWM is not "latest only" (it drops the *newest* when full).
- ``LosslessReader``: reads every message in order, for capture and recording; every
  ``recv`` polls with a timeout (a dead publisher never hangs the reader).

Both decode with zero copy (payloads are read-only numpy views of the ZeroMQ frames), drop and
count malformed messages by ``WireError.reason`` (``sensors.wire.INVALID_REASONS``), count
sequence gaps as drops and a new publisher session (or, without sessions, ``seq`` going back)
as a restart (``sensors.wire.SequenceTracker``).

Why bounded in bytes: ZeroMQ's high-water marks count messages, and 10,000 queued 640x480
frames are 9 GB. So the receive HWM is derived from a byte budget, ``max_bytes //
max_message_bytes`` messages, and a message above ``max_message_bytes`` is dropped as soon as
it is read (``invalid["message_size"]``). Not ZeroMQ's ``MAXMSGSIZE``: libzmq treats a larger
frame as a protocol error and never reconnects, so one oversized frame would silence a sensor
for good. ``LosslessReader`` moves what ZeroMQ holds into its own queue on every ``recv`` and
keeps that queue within ``max_bytes`` by dropping the *oldest* messages
(``stats().overflow``): at most ``max_bytes`` plus one HWM of messages is ever held. When the
reader is not called at all, ZeroMQ's queue fills, the publisher drops, and the receiver sees
the gaps (``stats().drops``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq

from sensors.curve import CurveClient
from sensors.errors import WireError
from sensors.wire import Message, SequenceTracker, decode

log = logging.getLogger(__name__)

MAX_TOPICS = 256  # per receiver: bounds the per-topic state a stream of junk topics can create
MAX_MESSAGE_BYTES = 32 << 20  # a 3840x2160 rgb8 frame is 24.9 MB
_RATE_WINDOW_NS = 2_000_000_000  # rate_hz is measured over the last 2 s of arrivals
_PULL_BATCH = 256  # messages moved from ZeroMQ into a LosslessReader's queue per recv, at most
_LINK_EVENTS = {
    zmq.EVENT_HANDSHAKE_SUCCEEDED: "connected",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake_failed",  # a wrong Curve key ends here
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake_failed",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "handshake_failed",
    zmq.EVENT_DISCONNECTED: "disconnected",
}


@dataclass(frozen=True, slots=True)
class ReceiverStats:
    received: dict[str, int]  # valid messages taken off the wire
    invalid: dict[str, int]  # WireError.reason -> count (dropped messages)
    drops: dict[str, int]  # seq gaps within a publisher session
    restarts: dict[str, int]  # new publisher sessions (or seq resets) after the first
    last_rx_ns: dict[str, int]
    rate_hz: dict[str, float]
    overflow: dict[str, int] = field(default_factory=dict)  # received, then dropped oldest at max_bytes
    skipped: dict[str, int] = field(default_factory=dict)  # side topics skipped by name (not wire format)
    queued_bytes: int = 0  # held in the reader's own queue now
    peak_queued_bytes: int = 0  # the most it ever held (<= max_bytes)
    link: dict[str, int] = field(default_factory=dict)  # connected / handshake_failed / disconnected


def _endpoint_list(endpoints: str | Sequence[str]) -> list[str]:
    eps = [endpoints] if isinstance(endpoints, str) else list(endpoints)
    if not eps:
        raise ValueError("endpoints must name at least one endpoint")
    return eps


def derived_hwm(max_bytes: int, max_message_bytes: int) -> int:
    """ZeroMQ receive HWM (messages) that keeps its queue within ``max_bytes``."""
    if max_bytes <= 0 or not 0 < max_message_bytes <= max_bytes:
        raise ValueError(f"need 0 < max_message_bytes ({max_message_bytes}) <= max_bytes ({max_bytes})")
    return max(1, max_bytes // max_message_bytes)


def _sub_socket(ctx: zmq.Context, endpoints: list[str], topics: list[str] | None, *, rcvhwm: int,
                curve: CurveClient | None = None, monitor: bool = False) -> tuple[zmq.Socket, zmq.Socket | None]:
    """The SUB socket and, with ``monitor``, its connection-event socket (attached before connecting)."""
    if curve is not None:
        curve.check(endpoints)  # before any socket exists: an unkeyed endpoint is a config error
    sock = ctx.socket(zmq.SUB)
    mon = None
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, rcvhwm)
        for t in [""] if topics is None else topics:
            sock.setsockopt(zmq.SUBSCRIBE, t.encode())
        if monitor:
            mon = sock.get_monitor_socket(sum(set(_LINK_EVENTS)))
        for ep in endpoints:
            if curve is None:
                sock.connect(ep)
            else:
                curve.connect(sock, ep)
    except Exception:
        if mon is not None:
            sock.disable_monitor()
            mon.close(linger=0)
        sock.close(linger=0)
        raise
    return sock, mon


def _topic_of(frame: Any) -> bytes:
    try:
        return bytes(getattr(frame, "bytes", frame))[:256]
    except TypeError:
        return b""  # not a buffer: decode() counts it as frame_type


def _nbytes(frame: Any) -> int:
    try:
        return len(frame)  # zmq.Frame, bytes, memoryview of bytes: no copy
    except TypeError:
        return 0


class _Intake:
    """Decoding and bookkeeping shared by both receivers (callers hold their own locking)."""

    def __init__(self, topics: list[str] | None, max_topics: int, skip_topics: Sequence[str] = (),
                 max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        # ZeroMQ subscriptions are prefixes ("cam" also delivers "camera"): filter exactly.
        self.topics = None if topics is None else frozenset(topics)
        self.max_message_bytes = max_message_bytes
        self.skip = frozenset(t.encode() for t in skip_topics)
        self.max_topics = max_topics
        self.tracker = SequenceTracker()
        self.received: dict[str, int] = {}
        self.invalid: dict[str, int] = {}
        self.invalid_total = 0
        self.skipped: dict[str, int] = {}
        self.last_rx: dict[str, int] = {}
        self.arrivals: dict[str, deque[int]] = {}

    def accept(self, frames: list[Any], rx_ns: int) -> tuple[str, Message, int] | None:
        """(topic, message, its size in bytes), or None for a message dropped (and counted)."""
        if self.skip and frames and (name := _topic_of(frames[0])) in self.skip:
            topic = name.decode()
            self.skipped[topic] = self.skipped.get(topic, 0) + 1
            return None
        try:
            size = sum(_nbytes(f) for f in frames)
            if size > self.max_message_bytes:
                raise WireError("message_size",
                                f"message is {size} bytes, this receiver takes at most {self.max_message_bytes}")
            topic, msg = decode(frames)
            if self.topics is not None and topic not in self.topics:
                return None
            if topic not in self.received and len(self.received) >= self.max_topics:
                raise WireError("too_many_topics", f"more than {self.max_topics} topics on one receiver")
            self.tracker.update(topic, msg.session, msg.seq)
        except WireError as exc:
            self.invalid[exc.reason] = self.invalid.get(exc.reason, 0) + 1
            self.invalid_total += 1
            log.debug("dropped message: %s", exc)
            return None
        self.received[topic] = self.received.get(topic, 0) + 1
        self.last_rx[topic] = rx_ns
        arrivals = self.arrivals.get(topic)
        if arrivals is None:
            arrivals = self.arrivals[topic] = deque(maxlen=64)
        arrivals.append(rx_ns)
        return topic, msg, size

    def snapshot(self, **extra: Any) -> ReceiverStats:
        now = time.time_ns()
        rates = {}
        # list() copies in C (atomic under the GIL): status may be read while the receive thread appends
        for topic, arr in list(self.arrivals.items()):
            recent = [t for t in list(arr) if now - t <= _RATE_WINDOW_NS]
            span = recent[-1] - recent[0] if len(recent) >= 2 else 0
            rates[topic] = (len(recent) - 1) * 1e9 / span if span > 0 else 0.0
        return ReceiverStats(
            received=dict(self.received),
            invalid=dict(self.invalid),
            drops=dict(self.tracker.drops),
            restarts=dict(self.tracker.restarts),
            last_rx_ns=dict(self.last_rx),
            rate_hz=rates,
            skipped=dict(self.skipped),
            **extra,
        )


class LatestReceiver:
    """Keeps the newest message per topic, received by a background thread.

    Thread-safe queries. ZeroMQ may queue ``rcvhwm`` messages ahead of the thread (default:
    as many as fit ``max_bytes``); the thread drains continuously, so it only matters if the
    process stalls. ``curve``: authenticate the publishers (``sensors.curve``).
    """

    def __init__(
        self,
        endpoints: str | list[str],
        topics: list[str] | None = None,
        *,
        context: zmq.Context | None = None,
        poll_ms: int = 50,
        rcvhwm: int | None = None,
        max_bytes: int = 256 << 20,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        max_topics: int = MAX_TOPICS,
        curve: CurveClient | None = None,
    ) -> None:
        if poll_ms <= 0:
            raise ValueError(f"poll_ms must be > 0, got {poll_ms}")
        self._endpoints = _endpoint_list(endpoints)
        self._topics = None if topics is None else list(topics)
        self._ctx = context if context is not None else zmq.Context.instance()
        self._poll_ms = poll_ms
        self._rcvhwm = derived_hwm(max_bytes, max_message_bytes) if rcvhwm is None else rcvhwm
        self._curve = curve
        self._intake = _Intake(self._topics, max_topics, max_message_bytes=max_message_bytes)
        self._latest: dict[str, tuple[Message, int]] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> LatestReceiver:
        if self._thread is not None:
            raise RuntimeError("LatestReceiver already started")
        # Created here so that a bad endpoint raises in the caller; the thread then owns it.
        sock, _ = _sub_socket(self._ctx, self._endpoints, self._topics, rcvhwm=self._rcvhwm, curve=self._curve)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(sock,), name="latest-receiver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=self._poll_ms / 1000 + 2.0)
            if self._thread.is_alive():
                log.warning("receiver thread did not stop within %.1f s", self._poll_ms / 1000 + 2.0)
            self._thread = None

    def _run(self, sock: zmq.Socket) -> None:
        try:
            while not self._stop.is_set():
                if not sock.poll(self._poll_ms, zmq.POLLIN):
                    continue
                for _ in range(1000):  # drain what is queued, then look at the stop flag again
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._ingest(frames, time.time_ns())
        except zmq.ZMQError as exc:
            if exc.errno != zmq.ETERM:
                log.exception("receiver thread failed")
        finally:
            sock.close(linger=0)

    def _ingest(self, frames: list[Any], rx_ns: int) -> None:
        with self._cond:
            got = self._intake.accept(frames, rx_ns)
            if got is not None:
                topic, msg, _ = got
                self._latest[topic] = (msg, rx_ns)
                self._cond.notify_all()

    def latest(self, topic: str) -> tuple[Message, int] | None:
        """The newest message on ``topic`` and its receive time (ns), or None."""
        with self._cond:
            return self._latest.get(topic)

    def wait_for(self, topic: str, timeout_s: float, newer_than_seq: int | None = None) -> Message | None:
        """The newest message on ``topic``, waiting up to ``timeout_s`` for one to exist and,
        with ``newer_than_seq``, to be newer than that seq. After a publisher restart a
        message whose seq is *below* ``newer_than_seq`` is newer (it comes from the new
        session, whose seq started again from 0)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                cur = self._latest.get(topic)
                if cur is not None:
                    seq = cur[0].seq
                    if (
                        newer_than_seq is None
                        or seq > newer_than_seq
                        or (seq < newer_than_seq and self._intake.tracker.restarts.get(topic, 0) > 0)
                    ):
                        return cur[0]
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stop.is_set():
                    return None
                self._cond.wait(remaining)

    def stats(self) -> ReceiverStats:
        with self._cond:
            return self._intake.snapshot()

    def __enter__(self) -> LatestReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LosslessReader:
    """Reads every message in order on the caller's thread (capture, recording), within a byte budget.

    Every ``recv`` first moves what ZeroMQ has queued (up to 256 messages) into the reader's
    own queue, then returns the oldest. That queue holds at most ``max_bytes``: beyond it the
    oldest messages are dropped and counted in ``stats().overflow``, so a slow consumer (a
    recorder on a slow disk) costs old data, never unbounded memory. ``rcvhwm`` (default
    ``max_bytes // max_message_bytes``) bounds what ZeroMQ holds between two calls; 0 =
    unlimited, for a benchmark that wants ZeroMQ's own queue. ``skip_topics``: side topics
    that are not wire format (the demo's ``truth``), counted in ``stats().skipped``.
    """

    def __init__(
        self,
        endpoints: str | list[str],
        topics: list[str] | None = None,
        *,
        context: zmq.Context | None = None,
        rcvhwm: int | None = None,
        max_bytes: int = 256 << 20,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        max_topics: int = MAX_TOPICS,
        max_invalid_hz: float = 0.0,
        skip_topics: Sequence[str] = (),
        curve: CurveClient | None = None,
    ) -> None:
        ctx = context if context is not None else zmq.Context.instance()
        hwm = derived_hwm(max_bytes, max_message_bytes) if rcvhwm is None else rcvhwm
        self._intake = _Intake(None if topics is None else list(topics), max_topics, skip_topics, max_message_bytes)
        # Token bucket for messages that are dropped (invalid or filtered): above this rate the
        # reader sleeps (GIL released) and lets its bounded queue push back on the sender, so a
        # flood of junk costs a bounded share of a core. 0 = no limit.
        self._max_invalid_hz = max_invalid_hz
        self._tokens = max_invalid_hz / 10
        self._tokens_t = time.monotonic()
        self.max_bytes = max_bytes
        self._queue: deque[tuple[str, Message, int, int]] = deque()  # topic, msg, rx_ns, bytes
        self._queued_bytes = self._peak_bytes = 0
        self._overflow: dict[str, int] = {}
        sock, mon = _sub_socket(ctx, _endpoint_list(endpoints), None if topics is None else list(topics), rcvhwm=hwm,
                                curve=curve, monitor=True)
        self._sock: zmq.Socket | None = sock
        self._monitor: zmq.Socket | None = mon
        self._link: dict[str, int] = {}
        self._mon_lock = threading.Lock()  # stats() may run on another thread than recv()

    def recv(self, timeout_ms: int) -> tuple[str, Message, int] | None:
        """The next valid message as (topic, msg, receive time_ns), or None after ``timeout_ms``.
        Invalid messages are counted in ``stats().invalid`` and skipped."""
        sock = self.socket
        deadline = time.monotonic() + max(0, timeout_ms) / 1000
        while True:
            invalid = self._intake.invalid_total
            pulled = self._pull(sock)
            if self._queue:
                topic, msg, rx_ns, size = self._queue.popleft()
                self._queued_bytes -= size
                return topic, msg, rx_ns
            if not pulled:  # nothing queued: wait (polling only now saves a poll per message in bursts)
                remaining_ms = int((deadline - time.monotonic()) * 1000)
                if remaining_ms <= 0 or not sock.poll(remaining_ms, zmq.POLLIN):
                    return None
                continue
            if self._max_invalid_hz:  # everything pulled was dropped (invalid, filtered or skipped)
                self._throttle(deadline, max(1, self._intake.invalid_total - invalid))
            if time.monotonic() >= deadline:  # bounded even under a flood of invalid messages
                return None

    def _pull(self, sock: zmq.Socket) -> int:
        """Move up to ``_PULL_BATCH`` messages from ZeroMQ into the queue (oldest dropped beyond max_bytes)."""
        n = 0
        for n in range(1, _PULL_BATCH + 1):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return n - 1
            rx_ns = time.time_ns()
            got = self._intake.accept(frames, rx_ns)
            if got is None:
                continue
            size = got[2]
            self._queue.append((got[0], got[1], rx_ns, size))
            self._queued_bytes += size
            while self._queued_bytes > self.max_bytes:
                topic, _, _, old = self._queue.popleft()
                self._queued_bytes -= old
                self._overflow[topic] = self._overflow.get(topic, 0) + 1
            self._peak_bytes = max(self._peak_bytes, self._queued_bytes)
        return n

    @property
    def socket(self) -> zmq.Socket:
        """The SUB socket, for a caller that polls several readers (never receive on it directly)."""
        if self._sock is None:
            raise RuntimeError("reader is closed")
        return self._sock

    @property
    def pending(self) -> int:
        """Messages already in the reader's own queue (a caller polling the socket must drain these first)."""
        return len(self._queue)

    @property
    def invalid_total(self) -> int:
        """Messages dropped as invalid so far (cheap: no stats snapshot)."""
        return self._intake.invalid_total

    def _throttle(self, deadline: float, n: int) -> None:
        now = time.monotonic()
        rate = self._max_invalid_hz
        self._tokens = min(rate / 10, self._tokens + (now - self._tokens_t) * rate) - n
        self._tokens_t = now
        if self._tokens < 0:
            time.sleep(min(-self._tokens / rate, max(0.0, deadline - now)))

    def _link_events(self) -> dict[str, int]:
        from zmq.utils.monitor import recv_monitor_message

        with self._mon_lock:
            for _ in range(10_000):
                if self._monitor is None or not self._monitor.poll(0):
                    break
                name = _LINK_EVENTS.get(recv_monitor_message(self._monitor, zmq.NOBLOCK)["event"])
                if name is not None:
                    self._link[name] = self._link.get(name, 0) + 1
            return dict(self._link)

    def stats(self) -> ReceiverStats:
        return self._intake.snapshot(overflow=dict(self._overflow), queued_bytes=self._queued_bytes,
                                     peak_queued_bytes=self._peak_bytes, link=self._link_events())

    def close(self) -> None:
        with self._mon_lock:
            if self._sock is not None:
                if self._monitor is not None:
                    with contextlib.suppress(zmq.ZMQError):  # its context may be gone already
                        self._sock.disable_monitor()
                    self._monitor.close(linger=0)
                    self._monitor = None
                self._sock.close(linger=0)
                self._sock = None
        self._queue.clear()
        self._queued_bytes = 0

    def __enter__(self) -> LosslessReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
