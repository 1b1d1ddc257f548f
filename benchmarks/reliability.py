"""Reliability report: kills, corrupt state, malformed floods, unauthenticated control, soak.

Usage::

    python -m benchmarks.reliability                 # 10-minute soak, 10 kills (fault points + random)
    python -m benchmarks.reliability --minutes 3     # shorter soak

Everything runs as real processes on 127.0.0.1: dataset publishers
(``python -m demodata.publish``) and the agent (``python -m runtime.agent --config
<tmp toml>``). The first part of this module is the process harness shared with
``tests/runtime/test_reliability.py`` (via ``tests/runtime/conftest.py``): free ports, keys,
config TOML, bounded start/stop. The report then runs

- a SIGKILL/restart loop (``benchmarks.kill_loop``): at each named fault point of a checkpoint
  write in turn (``kill_points`` counts them), and at random moments of idle, capture, training
  and saves, checking after each restart that the agent resumed the last committed state bit
  for bit;
- a flood of malformed sensor messages (random bytes and mutated valid messages) while
  serving, with p99 prediction latency compared to a clean run measured just before;
- a flood of control requests without a valid CurveZMQ key;
- a soak at full sensor rate, sampling the agent's RSS.

and prints one JSON line; ``benchmarks/results/reliability.json`` and
``benchmarks/results/reliability_rss.png`` are written.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zmq

from benchmarks.harness import (
    REPO,
    SLOW_SAVE_ENV,  # noqa: F401 - the tests import it from here
    Agent,
    AgentSetup,
    Proc,
    collect_predictions,
    free_port,
    make_keys,
    scratch_dir,
    start_publisher,
    subscribe_predictions,
)
from benchmarks.kill_loop import committed, diff_states, kill_loop, load_copy  # noqa: F401 - shared with the tests
from runtime import keys

TASK0 = ["t-shirt", "trouser"]
TASK1 = ["pullover", "dress"]


# --------------------------------------------------------------------------- malformed sensor messages
SENSOR_TOPICS = ("camera", "mic", "imu")


def valid_frames(rng: np.random.Generator) -> list[bytes]:
    """One well-formed wire message on a random sensor topic (the seed of a mutation)."""
    from sensors.wire import Audio, Image, Imu, encode, new_session_id

    topic = SENSOR_TOPICS[int(rng.integers(3))]
    common = {"seq": int(rng.integers(1 << 20)), "stamp_ns": time.time_ns(), "session": new_session_id()}
    if topic == "camera":
        msg: Any = Image(data=rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), **common)
    elif topic == "mic":
        msg = Audio(data=rng.integers(-99, 99, (320, 1), dtype=np.int16), **common)
    else:
        msg = Imu(stamps_ns=np.arange(10, dtype=np.int64) + common["stamp_ns"], values=rng.normal(size=(10, 10)), **common)
    return [bytes(memoryview(f)) for f in encode(topic, msg)]


def mutate(frames: list[bytes], rng: np.random.Generator) -> list[bytes]:
    """A broken copy: bit flips, truncation, wrong frame count, junk header, bad topic bytes."""
    out = list(frames)
    how = int(rng.integers(7))
    if how == 0:  # flip bytes in the header
        h = bytearray(out[1])
        for i in rng.integers(0, len(h), size=int(rng.integers(1, 4))):
            h[i] ^= 1 << int(rng.integers(8))
        out[1] = bytes(h)
    elif how == 1:  # truncate or extend a payload
        i = int(rng.integers(2, len(out)))
        out[i] = out[i][: int(rng.integers(len(out[i])))] if rng.random() < 0.5 else out[i] + b"\0" * int(rng.integers(1, 64))
    elif how == 2:  # drop or add a frame
        out = out[:-1] if rng.random() < 0.5 else [*out, rng.bytes(int(rng.integers(0, 32)))]
    elif how == 3:  # random bytes as the header
        out[1] = rng.bytes(int(rng.integers(0, 64)))
    elif how == 4:  # a header field of the wrong type or range
        import msgpack as mp

        h = mp.unpackb(out[1])
        key = list(h)[int(rng.integers(len(h)))]
        h[key] = [None, -1, 2**64 - 1, "x" * 300, 1.5, [], {}][int(rng.integers(7))]
        out[1] = mp.packb(h)
    elif how == 5:  # a topic that is not UTF-8 (still matches the subscription prefix)
        out[0] = out[0] + b"\xff\xfe"
    else:  # a bare topic, or the topic and random bytes
        out = [out[0]] if rng.random() < 0.5 else [out[0], rng.bytes(int(rng.integers(0, 256)))]
    return out


def wire_reason(frames: list[bytes]) -> str | None:
    """The ``WireError.reason`` the agent's receiver will count for ``frames`` (None: valid)."""
    from sensors.errors import WireError
    from sensors.wire import decode

    try:
        decode(frames)
    except WireError as exc:
        return exc.reason
    return None


def malformed_corpus(n: int, seed: int = 0) -> list[tuple[list[bytes], str]]:
    """``n`` messages that the wire decoder must reject, each with the reason it will count."""
    rng = np.random.default_rng(seed)
    out: list[tuple[list[bytes], str]] = []
    while len(out) < n:
        frames = mutate(valid_frames(rng), rng)
        reason = wire_reason(frames)
        if reason is not None:
            out.append((frames, reason))
    return out


def flood(endpoint: str, corpus: list[tuple[list[bytes], str]], *, seconds: float, max_messages: int = 10**9,
          rate_hz: float = 0.0) -> dict[str, int]:
    """Send the corpus round and round from a bound XPUB with an unlimited queue; returns the
    reasons sent once every message has left (own context, lingering close: nothing is lost).
    ``rate_hz`` 0 = as fast as this thread can; the agent's bounded receive queue then pushes back."""
    sent: dict[str, int] = {}
    ctx = zmq.Context()
    sock = ctx.socket(zmq.XPUB)
    try:
        sock.sndhwm = 0
        sock.bind(endpoint)
        subs, deadline = set(), time.monotonic() + 10.0
        while len(subs) < len(SENSOR_TOPICS):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no subscriber on {endpoint}")
            if sock.poll(100):
                ev = sock.recv()
                if ev[:1] == b"\x01":
                    subs.add(ev[1:])
        time.sleep(0.5)  # every connected subscriber has subscribed by now (XPUB reports a prefix once)
        t0 = time.monotonic()
        end = t0 + seconds
        i = 0
        while i < max_messages and time.monotonic() < end:
            frames, reason = corpus[i % len(corpus)]
            sock.send_multipart(frames, copy=False)
            sent[reason] = sent.get(reason, 0) + 1
            i += 1
            if rate_hz and i % 100 == 0:
                lag = t0 + i / rate_hz - time.monotonic()
                if lag > 0:
                    time.sleep(lag)
    finally:
        sock.close(linger=60_000)
        ctx.term()  # returns once the queue has been sent (or after the linger)
    return sent


# --------------------------------------------------------------------------- sensors and baseline
class Sensors:
    """Two publisher processes, ``av`` (camera + mic) and ``imu``, and a flood endpoint."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ports = {"av": free_port(), "imu": free_port()}
        self.flood_ep = f"tcp://127.0.0.1:{free_port()}"  # bound by a flooder only while flooding
        self.topics = {"av": ("camera", "mic"), "imu": ("imu",)}
        self.procs = {name: self._start(name) for name in self.ports}

    def _start(self, name: str) -> Proc:
        return start_publisher(self.root, name, self.endpoint(name), topics=self.topics[name], seed=len(name))

    def endpoint(self, name: str) -> str:
        return f"tcp://127.0.0.1:{self.ports[name]}"

    @property
    def endpoints(self) -> list[str]:
        return [*(self.endpoint(n) for n in self.ports), self.flood_ep]

    def kill(self, name: str) -> None:
        self.procs[name].kill()

    def restart(self, name: str) -> None:
        self.procs[name].kill()
        self.procs[name] = self._start(name)

    def ensure(self) -> None:
        for name, proc in self.procs.items():
            if not proc.alive():
                self.procs[name] = self._start(name)

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.stop(5.0)


def fresh_setup(root: Path, sensors: Sensors, state_from: Path | None, name: str, *, flood: bool = False,
                **kw: Any) -> AgentSetup:
    """A new directory with (a copy of) a committed state, new ports, the shared keys;
    ``flood``: also connect to the flood endpoint."""
    d = root / f"{name}-{time.monotonic_ns()}"
    d.mkdir()
    state = d / "state"
    if state_from is not None:
        shutil.copytree(state_from, state)
    eps = sensors.endpoints if flood else [e for e in sensors.endpoints if e != sensors.flood_ep]
    return AgentSetup(root=d, kdir=make_keys(root), sensors=eps, state=state, **kw)


def make_baseline(root: Path, sensors: Sensors, tasks: int = 2) -> dict[str, Path]:
    """Committed states ``v1`` (task0) and ``v2`` (task0, task1), copied aside as templates."""
    setup = fresh_setup(root, sensors, None, "baseline")
    agent = Agent(setup, tag="baseline-agent")
    out = {}
    try:
        agent.wait_ready(90)
        for version, (name, labels) in enumerate((("task0", TASK0), ("task1", TASK1))[:tasks], start=1):
            snap = agent.wait_job(agent.learn(name, labels), 180)
            if snap["state"] != "done" or not snap["result"]["accepted"]:
                raise RuntimeError(f"baseline task {name} not learned: {snap}")
            out[f"v{version}"] = root / f"template-v{version}"
            shutil.copytree(setup.state, out[f"v{version}"])
    finally:
        agent.stop()
    return out


# --------------------------------------------------------------------------- report
def unauth_flood(setup: AgentSetup, root: Path, *, requests: int) -> dict[str, int]:
    """Control requests from clients without a valid key (no Curve, unknown key).

    ``tried`` counts send calls; ``sent`` only those zmq took (``zmq.Again`` means the request
    never left this client, so it is counted as ``not_sent``); ``replies`` counts answers. The
    agent's own count of requests that reached its control server is the caller's to take
    (``status()["control"]["requests"]`` before and after)."""
    other = root / "mallory-keys"
    if not other.exists():
        keys.create("mallory", other)
        shutil.copy(setup.kdir / "server.key", other / "server.key")
    ctx = zmq.Context()
    tried = sent = replies = 0
    try:
        pub, sec = keys.client_keys(other, "mallory")
        socks = []
        for curve in (False, True) * 4:
            s = ctx.socket(zmq.DEALER)
            s.linger = 0
            if curve:
                s.curve_serverkey, s.curve_publickey, s.curve_secretkey = keys.server_public_key(setup.kdir), pub, sec
            s.connect(setup.control_ep)
            socks.append(s)
        cmds = ["shutdown", "rollback", "save", "status", "learn-new-task"]
        end = time.monotonic() + 60.0
        while tried < requests and time.monotonic() < end:
            s = socks[tried % len(socks)]
            try:
                s.send(msgpack.packb({"id": tried, "cmd": cmds[tried % len(cmds)], "args": {}}), zmq.NOBLOCK)
                sent += 1
            except zmq.Again:
                time.sleep(0.001)
            tried += 1
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            for s in socks:
                while s.poll(0):
                    s.recv_multipart()
                    replies += 1
            time.sleep(0.05)
    finally:
        ctx.destroy(0)
    return {"tried": tried, "sent": sent, "not_sent": tried - sent, "replies": replies}


def _p99(preds: list[dict]) -> float | None:
    return round(float(np.percentile([p["latency_ms"] for p in preds], 99)), 2) if preds else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.reliability", description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="soak length")
    ap.add_argument("--restarts", type=int, default=10, help="kill/restart cycles (each checkpoint fault point, then random)")
    ap.add_argument("--flood-rate", type=float, default=5000.0, help="malformed messages per second sent")
    ap.add_argument("--flood-seconds", type=float, default=22.0)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    print(f"config: {vars(args)}", file=sys.stderr)
    with scratch_dir("continua-reliability-") as root:
        sensors = Sensors(root)
        res: dict[str, Any] = {"crashes": 0}
        try:
            base = make_baseline(root, sensors, tasks=1)
            print("kill loop...", file=sys.stderr)
            loop = kill_loop(fresh_setup(root, sensors, base["v1"], "loop"), restarts=args.restarts, seed=int(time.time()),
                             progress=lambda i, a, p, ok: print(f"  restart {i + 1}: {a} ({p}) ok={ok}", file=sys.stderr))
            res.update(restarts=loop["restarts"], committed_states_verified=loop["verified"],
                       states_lost=loop["states_lost"], kill_actions=loop["actions"], kill_phases=loop["phases"],
                       kill_points=loop["kill_points"], kill_points_missed=loop["missed"],
                       corrupt_after_kill=loop["corrupt_after_kill"])
            setup = fresh_setup(root, sensors, base["v1"], "serve", flood=True)
            agent = Agent(setup, tag="serve-agent")
            agent.wait_ready(90)
            sub = subscribe_predictions(setup.pred_ep)
            collect_predictions(sub, 2.0)
            clean = collect_predictions(sub, 10.0)
            print("flood...", file=sys.stderr)
            before = agent.status()["intake"]["invalid"]
            out: dict[str, Any] = {}
            corpus = malformed_corpus(20_000, seed=2)
            th = threading.Thread(target=lambda: out.update(sent=flood(sensors.flood_ep, corpus, seconds=args.flood_seconds,
                                                                         rate_hz=args.flood_rate)))
            th.start()
            time.sleep(2.0)
            flooded = collect_predictions(sub, max(2.0, args.flood_seconds - 4.0))
            th.join(600)
            sent = sum(out["sent"].values())
            end = time.monotonic() + 300
            while time.monotonic() < end and sum(agent.status()["intake"]["invalid"].values()) - sum(before.values()) < sent:
                time.sleep(1.0)
            after = agent.status()["intake"]["invalid"]
            counted = sum(after.values()) - sum(before.values())
            res["crashes"] += int(not agent.proc.alive())
            res.update(malformed_tried=sent, malformed_counted=counted, malformed_by_reason=out["sent"],
                       flood_rate_hz=args.flood_rate, p99_latency_ms_clean=_p99(clean), p99_latency_ms_flood=_p99(flooded),
                       predictions_per_s_clean=round(len(clean) / 10.0, 1),
                       predictions_per_s_flood=round(len(flooded) / max(2.0, args.flood_seconds - 4.0), 1))
            print("unauthenticated control flood...", file=sys.stderr)
            v0 = agent.status()["model_version"]
            before = agent.status()["control"]["requests"]
            ua = unauth_flood(setup, root, requests=20_000)
            reached = agent.status()["control"]["requests"] - before - 1  # less this status request itself
            res.update(unauth_requests_tried=ua["tried"], unauth_requests_sent=ua["sent"],
                       unauth_requests_not_sent=ua["not_sent"], unauth_requests_reached_server=reached,
                       unauth_requests_accepted=ua["replies"])
            res["crashes"] += int(not agent.proc.alive() or agent.status()["model_version"] != v0)
            print(f"soak {args.minutes} min...", file=sys.stderr)
            t0 = time.monotonic()
            series: list[tuple[float, float]] = []
            while time.monotonic() - t0 < args.minutes * 60:
                series.append((time.monotonic() - t0, agent.proc.rss_mb()))
                time.sleep(2.0)
            soak_preds = collect_predictions(sub, 5.0)
            sub.close(0)
            warm = [r for t, r in series if t >= min(30.0, args.minutes * 30)]
            res.update(soak_minutes=args.minutes, rss_mb_start=round(warm[0], 1), rss_mb_end=round(series[-1][1], 1),
                       rss_growth_mb=round(max(r for _, r in series[-5:]) - warm[0], 1),
                       soak_p99_latency_ms=_p99(soak_preds))
            res["crashes"] += int(not agent.proc.alive())
            agent.stop()
            args.out.mkdir(parents=True, exist_ok=True)
            _plot(series, args.out / "reliability_rss.png")
        finally:
            sensors.stop()
    (args.out / "reliability.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res))
    return 0 if res["states_lost"] == 0 and res["crashes"] == 0 and res["unauth_requests_accepted"] == 0 else 1


def _plot(series: list[tuple[float, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([t / 60 for t, _ in series], [r for _, r in series])
    ax.set_xlabel("minutes at full sensor rate")
    ax.set_ylabel("agent RSS (MB)")
    ax.set_title("continua agent soak: resident memory")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
