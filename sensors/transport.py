"""ZeroMQ publishers and receivers for the wire format (``sensors.wire``).

Three roles; the receivers live in ``sensors.receivers`` and are re-exported here:

- ``Publisher``: an XPUB socket. XPUB (not PUB) because it *sees* subscriptions, so
  ``wait_for_subscribers`` can wait for the slow joiner instead of sleeping and hoping.
  ``publish`` numbers messages per topic, never blocks, and sends payloads without a copy.
  With ``curve`` (``sensors.curve.CurveServer``) it is the CurveZMQ server: only subscribers
  that know its public key (and, with an allow-list, only listed subscribers) get data.
- ``LatestReceiver``: a background thread that keeps only the newest message per topic.
- ``LosslessReader``: reads every message in order within a byte budget, for capture.

    with Publisher("tcp://127.0.0.1:5556") as pub, LatestReceiver(pub.endpoint, ["camera"]) as rx:
        pub.wait_for_subscribers(1)
        pub.publish("camera", Image(data=frame))
        msg = rx.wait_for("camera", timeout_s=1.0)
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import zmq

from sensors.curve import CurveServer
from sensors.receivers import MAX_TOPICS, LatestReceiver, LosslessReader, ReceiverStats
from sensors.wire import Message, encode, new_session_id

log = logging.getLogger(__name__)

__all__ = ["MAX_TOPICS", "LatestReceiver", "LosslessReader", "Publisher", "PublisherStats", "ReceiverStats"]
_BIND_RETRY_S = 2.0  # a restarted publisher may find its port still held for a moment
_DRAIN_EVERY_S = 0.1  # publish() reads pending subscription messages at most this often


@dataclass(frozen=True, slots=True)
class PublisherStats:
    sent: dict[str, int]
    dropped_hwm: dict[str, int]  # refused at the send HWM (only with nodrop=True, see Publisher)
    subscriptions: int  # active subscriptions seen on the XPUB socket


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

    ``curve``: be the CurveZMQ server with this key pair. With its ``allow_dir`` a ZAP handler
    admits only the listed subscriber keys; it needs a context of its own (one ZAP handler per
    context), so one is created when ``context`` is None.
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
        curve: CurveServer | None = None,
    ) -> None:
        if sndhwm < 0:
            raise ValueError(f"sndhwm must be >= 0 (0 = unlimited), got {sndhwm}")
        self.session = new_session_id() if session is None else int(session)
        own = context is None and curve is not None and curve.allow_dir is not None
        self._own_ctx: zmq.Context | None = zmq.Context() if own else None
        self._ctx = self._own_ctx or (context if context is not None else zmq.Context.instance())
        self._auth: Any = None
        self._lock = threading.Lock()
        self._seq: dict[str, int] = {}
        self._sent: dict[str, int] = {}
        self._dropped: dict[str, int] = {}
        self._subs: dict[bytes, int] = {}  # subscription prefix -> active count
        self._next_drain = 0.0
        try:
            if curve is not None:
                self._auth = curve.start_authenticator(self._ctx)  # before bind: see CurveServer
            sock = self._ctx.socket(zmq.XPUB)
        except Exception:
            self._release()
            raise
        try:
            if curve is not None:
                curve.apply(sock)
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
            self._release()
            raise
        self._sock: zmq.Socket | None = sock
        log.debug(
            "publisher %s session %d on %s%s", "bound" if bind else "connected", self.session, self.endpoint,
            "" if curve is None else " (CurveZMQ" + (", subscriber allow-list)" if self._auth else ")"),
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
            self._release()

    def _release(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._own_ctx is not None:
            self._own_ctx.destroy(linger=0)
            self._own_ctx = None

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
