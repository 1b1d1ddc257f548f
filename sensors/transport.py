"""ZeroMQ publishers and receivers for the wire format (``sensors.wire``).

Three roles, one file:

- ``Publisher``: an XPUB socket. XPUB (not PUB) because it *sees* subscriptions, so
  ``wait_for_subscribers`` can wait for the slow joiner instead of sleeping and hoping.
  ``publish`` numbers messages per topic, never blocks, and sends payloads without a copy.
- ``LatestReceiver``: a background thread that reads everything and keeps only the newest
  message per topic, for inference. ``ZMQ_CONFLATE`` cannot do this (it breaks multipart
  messages) and a small HWM is not "latest only" (it drops the *newest* when full).
- ``LosslessReader``: reads every message in order, for capture and recording; every
  ``recv`` polls with a timeout (a dead publisher never hangs the reader).

Both receivers decode with zero copy (payloads are read-only numpy views of the ZeroMQ
frames), drop and count malformed messages by ``WireError.reason``, count sequence gaps as
drops and a new publisher session as a restart (``sensors.wire.SequenceTracker``).

    with Publisher("tcp://127.0.0.1:5556") as pub, LatestReceiver(pub.endpoint, ["camera"]) as rx:
        pub.wait_for_subscribers(1)
        pub.publish("camera", Image(data=frame))
        msg = rx.wait_for("camera", timeout_s=1.0)
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import zmq

from sensors.errors import WireError
from sensors.wire import Message, SequenceTracker, decode, encode, new_session_id

log = logging.getLogger(__name__)

MAX_TOPICS = 256  # per receiver: bounds the per-topic state a stream of junk topics can create
_RATE_WINDOW_NS = 2_000_000_000  # rate_hz is measured over the last 2 s of arrivals
_BIND_RETRY_S = 2.0  # a restarted publisher may find its port still held for a moment
_DRAIN_EVERY_S = 0.1  # publish() reads pending subscription messages at most this often


@dataclass(frozen=True, slots=True)
class PublisherStats:
    sent: dict[str, int]
    dropped_hwm: dict[str, int]  # refused at the send HWM (only with nodrop=True, see Publisher)
    subscriptions: int  # active subscriptions seen on the XPUB socket


@dataclass(frozen=True, slots=True)
class ReceiverStats:
    received: dict[str, int]
    invalid: dict[str, int]  # WireError.reason -> count (dropped messages)
    drops: dict[str, int]  # seq gaps within a publisher session
    restarts: dict[str, int]  # new publisher sessions after the first
    last_rx_ns: dict[str, int]
    rate_hz: dict[str, float]


# --------------------------------------------------------------------------- publisher
class Publisher:
    """Publishes wire messages on one endpoint (binds by default). Thread-safe.

    ``sndhwm`` caps the queue per subscriber (0 = unlimited). By default the socket is lossy
    like a PUB: a subscriber whose queue is full misses messages (it sees the seq gap) and the
    others are unaffected. With ``nodrop=True`` a message that would overflow any matching
    subscriber's queue is not sent at all and is counted in ``stats.dropped_hwm``.

    libzmq counts a queue lazily (the sender learns of its peer's reads in batches of
    sndhwm/2, about once per ms), so a burst of more than ~sndhwm/2 messages within a
    millisecond can be dropped even while the receiver keeps up. Sensors at camera/mic/IMU
    rates never come close; a publisher that replays as fast as it can, feeding a
    ``LosslessReader``, should use ``sndhwm=0`` (unlimited) or pace itself.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        bind: bool = True,
        context: zmq.Context | None = None,
        sndhwm: int = 100,
        session: int | None = None,
        nodrop: bool = False,
    ) -> None:
        if sndhwm < 0:
            raise ValueError(f"sndhwm must be >= 0 (0 = unlimited), got {sndhwm}")
        self.session = new_session_id() if session is None else int(session)
        self._ctx = context if context is not None else zmq.Context.instance()
        self._lock = threading.Lock()
        self._seq: dict[str, int] = {}
        self._sent: dict[str, int] = {}
        self._dropped: dict[str, int] = {}
        self._subs: dict[bytes, int] = {}  # subscription prefix -> active count
        self._next_drain = 0.0
        sock = self._ctx.socket(zmq.XPUB)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, sndhwm)
            sock.setsockopt(zmq.XPUB_VERBOSER, 1)  # every subscribe *and* unsubscribe reaches us
            if nodrop:
                sock.setsockopt(zmq.XPUB_NODROP, 1)
            if bind:
                _bind_with_retry(sock, endpoint)
                self.endpoint: str = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            else:
                sock.connect(endpoint)
                self.endpoint = endpoint
        except Exception:
            sock.close(linger=0)
            raise
        self._sock: zmq.Socket | None = sock
        log.debug(
            "publisher %s session %d on %s", "bound" if bind else "connected", self.session, self.endpoint
        )

    # ------------------------------------------------------------------ sending
    def publish(self, topic: str, msg: Message) -> int:
        """Send ``msg`` on ``topic``; sets ``msg.seq``, ``msg.session`` and ``msg.stamp_ns``
        (when 0). Never blocks. Raises ``WireError`` for a message that cannot be encoded."""
        with self._lock:
            sock = self._require_open()
            self._drain_subscriptions(sock, throttled=True)
            seq = self._seq.get(topic, 0)
            msg.seq = seq
            msg.session = self.session
            if msg.stamp_ns == 0:
                msg.stamp_ns = time.time_ns()
            frames = encode(topic, msg)  # raises before the seq is consumed
            self._seq[topic] = seq + 1
            try:
                sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                self._dropped[topic] = self._dropped.get(topic, 0) + 1
            else:
                self._sent[topic] = self._sent.get(topic, 0) + 1
            return seq

    def send_raw(self, frames: list) -> None:
        """Send arbitrary frames as they are (fuzz tests, bridges). Never blocks."""
        with self._lock:
            sock = self._require_open()
            self._drain_subscriptions(sock, throttled=True)
            key = bytes(frames[0])[:64].decode(errors="replace") if frames else ""
            try:
                sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                self._dropped[key] = self._dropped.get(key, 0) + 1

    # ------------------------------------------------------------------ subscriptions
    def wait_for_subscribers(self, n: int = 1, timeout_s: float = 5.0, *, topic: str | None = None) -> bool:
        """Wait until at least ``n`` subscriptions are active; True if they are.

        Counts subscriptions, not peers: a receiver of 3 topics counts 3 (one that receives
        everything counts 1). With ``topic``, counts only subscriptions that deliver it.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                sock = self._require_open()
                self._drain_subscriptions(sock)
                if self._count_subscriptions(topic) >= n:
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                # Short slices so that publish() from other threads is not held up.
                sock.poll(max(1, min(int(remaining * 1000), 10)), zmq.POLLIN)

    def _count_subscriptions(self, topic: str | None) -> int:
        if topic is None:
            return sum(self._subs.values())
        t = topic.encode()
        return sum(c for prefix, c in self._subs.items() if t.startswith(prefix))

    def _drain_subscriptions(self, sock: zmq.Socket, *, throttled: bool = False) -> None:
        """Read pending (un)subscription messages. Sends do not need them, so ``publish``
        (throttled) looks only every ``_DRAIN_EVERY_S``: a few microseconds saved per message."""
        if throttled:
            now = time.monotonic()
            if now < self._next_drain:
                return
            self._next_drain = now + _DRAIN_EVERY_S
        for _ in range(10_000):  # bounded: a flood of subscriptions cannot stall a publish forever
            if not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                return
            try:
                event = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if not event or event[0] not in (0, 1):
                continue
            prefix = event[1:]
            count = self._subs.get(prefix, 0) + (1 if event[0] == 1 else -1)
            if count > 0:
                self._subs[prefix] = count
            else:
                self._subs.pop(prefix, None)

    # ------------------------------------------------------------------ state
    @property
    def stats(self) -> PublisherStats:
        with self._lock:
            if self._sock is not None:
                self._drain_subscriptions(self._sock)
            return PublisherStats(
                sent=dict(self._sent), dropped_hwm=dict(self._dropped), subscriptions=sum(self._subs.values())
            )

    def _require_open(self) -> zmq.Socket:
        if self._sock is None:
            raise RuntimeError("publisher is closed")
        return self._sock

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close(linger=0)
                self._sock = None

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _bind_with_retry(sock: zmq.Socket, endpoint: str) -> None:
    deadline = time.monotonic() + _BIND_RETRY_S
    while True:
        try:
            sock.bind(endpoint)
            return
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EADDRINUSE or time.monotonic() >= deadline:
                raise
            time.sleep(0.02)


# --------------------------------------------------------------------------- receiving
def _endpoint_list(endpoints: str | list[str]) -> list[str]:
    eps = [endpoints] if isinstance(endpoints, str) else list(endpoints)
    if not eps:
        raise ValueError("endpoints must name at least one endpoint")
    return eps


def _sub_socket(ctx: zmq.Context, endpoints: list[str], topics: list[str] | None, rcvhwm: int) -> zmq.Socket:
    sock = ctx.socket(zmq.SUB)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, rcvhwm)
        for t in [""] if topics is None else topics:
            sock.setsockopt(zmq.SUBSCRIBE, t.encode())
        for ep in endpoints:
            sock.connect(ep)
    except Exception:
        sock.close(linger=0)
        raise
    return sock


class _Intake:
    """Decoding and bookkeeping shared by both receivers (callers hold their own locking)."""

    def __init__(self, topics: list[str] | None, max_topics: int) -> None:
        # ZeroMQ subscriptions are prefixes ("cam" also delivers "camera"): filter exactly.
        self.topics = None if topics is None else frozenset(topics)
        self.max_topics = max_topics
        self.tracker = SequenceTracker()
        self.received: dict[str, int] = {}
        self.invalid: dict[str, int] = {}
        self.invalid_total = 0
        self.last_rx: dict[str, int] = {}
        self.arrivals: dict[str, deque[int]] = {}

    def accept(self, frames: list[Any], rx_ns: int) -> tuple[str, Message] | None:
        try:
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
        return topic, msg

    def snapshot(self) -> ReceiverStats:
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
        )


class LatestReceiver:
    """Keeps the newest message per topic, received by a background thread.

    Thread-safe queries. ``rcvhwm`` bounds what ZeroMQ may queue ahead of the thread (the
    thread drains continuously, so it only matters if the process stalls).
    """

    def __init__(
        self,
        endpoints: str | list[str],
        topics: list[str] | None = None,
        *,
        context: zmq.Context | None = None,
        poll_ms: int = 50,
        rcvhwm: int = 32,
        max_topics: int = MAX_TOPICS,
    ) -> None:
        if poll_ms <= 0:
            raise ValueError(f"poll_ms must be > 0, got {poll_ms}")
        self._endpoints = _endpoint_list(endpoints)
        self._topics = None if topics is None else list(topics)
        self._ctx = context if context is not None else zmq.Context.instance()
        self._poll_ms = poll_ms
        self._rcvhwm = rcvhwm
        self._intake = _Intake(self._topics, max_topics)
        self._latest: dict[str, tuple[Message, int]] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> LatestReceiver:
        if self._thread is not None:
            raise RuntimeError("LatestReceiver already started")
        # Created here so that a bad endpoint raises in the caller; the thread then owns it.
        sock = _sub_socket(self._ctx, self._endpoints, self._topics, self._rcvhwm)
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
                topic, msg = got
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
    """Reads every message in order on the caller's thread (capture, recording).

    ``rcvhwm=0`` lets ZeroMQ queue without limit so nothing is lost while the caller is
    busy; the publisher's own ``sndhwm`` must also be large enough for its bursts.
    """

    def __init__(
        self,
        endpoints: str | list[str],
        topics: list[str] | None = None,
        *,
        context: zmq.Context | None = None,
        rcvhwm: int = 0,
        max_topics: int = MAX_TOPICS,
        max_invalid_hz: float = 0.0,
    ) -> None:
        ctx = context if context is not None else zmq.Context.instance()
        self._intake = _Intake(None if topics is None else list(topics), max_topics)
        # Token bucket for messages that are dropped (invalid or filtered): above this rate the
        # reader sleeps (GIL released) and lets its bounded queue push back on the sender, so a
        # flood of junk costs a bounded share of a core. 0 = no limit.
        self._max_invalid_hz = max_invalid_hz
        self._tokens = max_invalid_hz / 10
        self._tokens_t = time.monotonic()
        self._sock: zmq.Socket | None = _sub_socket(
            ctx, _endpoint_list(endpoints), None if topics is None else list(topics), rcvhwm
        )

    def recv(self, timeout_ms: int) -> tuple[str, Message, int] | None:
        """The next valid message as (topic, msg, receive time_ns), or None after ``timeout_ms``.
        Invalid messages are counted in ``stats().invalid`` and skipped."""
        if self._sock is None:
            raise RuntimeError("reader is closed")
        deadline = time.monotonic() + max(0, timeout_ms) / 1000
        while True:
            remaining_ms = max(0, int((deadline - time.monotonic()) * 1000))
            try:  # try first, poll only when nothing is queued: saves a poll per message in bursts
                frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                if not self._sock.poll(remaining_ms, zmq.POLLIN):
                    return None
                continue
            rx_ns = time.time_ns()
            got = self._intake.accept(frames, rx_ns)
            if got is not None:
                return got[0], got[1], rx_ns
            if self._max_invalid_hz:
                self._throttle(deadline)
            if remaining_ms == 0:  # bounded even under a flood of invalid messages
                return None

    @property
    def socket(self) -> zmq.Socket:
        """The SUB socket, for a caller that polls several readers (never receive on it directly)."""
        if self._sock is None:
            raise RuntimeError("reader is closed")
        return self._sock

    @property
    def invalid_total(self) -> int:
        """Messages dropped as invalid so far (cheap: no stats snapshot)."""
        return self._intake.invalid_total

    def _throttle(self, deadline: float) -> None:
        now = time.monotonic()
        rate = self._max_invalid_hz
        self._tokens = min(rate / 10, self._tokens + (now - self._tokens_t) * rate) - 1
        self._tokens_t = now
        if self._tokens < 0:
            time.sleep(min(-self._tokens / rate, max(0.0, deadline - now)))

    def stats(self) -> ReceiverStats:
        return self._intake.snapshot()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def __enter__(self) -> LosslessReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
