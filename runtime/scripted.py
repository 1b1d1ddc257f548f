"""A scripted operator for the demo and the live benchmark: show, teach, learn, and score live.

It does what a person at the robot does, through the same interfaces: it holds a class in front
of the robot (the demo publishers' scene control, ``demodata.scene_control``), labels
the live samples with ``teach``, asks ``learn-new-task --source taught``, and watches the
predictions. Live accuracy is scored against the publishers' ground-truth topic (one message
per camera frame: stamp and class) by the camera stamp each prediction carries, on the classes
the robot has learned, leaving out the first ``settle_s`` after each class change (the audio and
IMU windows still hold the previous class then).
"""

from __future__ import annotations

import bisect
import logging
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any

import msgpack
import numpy as np
import zmq

log = logging.getLogger(__name__)


def wait_job(client: Any, job: str, timeout_s: float, *, quiet: bool = False, on_poll: Any = None,
             poll_s: float = 0.2) -> dict[str, Any]:
    """Follow a job: a tqdm bar on a terminal, one line per phase kind in a log; bounded (then
    cancelled). ``on_poll(snapshot)`` is called on every poll, every ``poll_s``."""
    from tqdm import tqdm

    end = time.monotonic() + timeout_s
    tty = sys.stderr.isatty() and not quiet
    last_kind = ""
    with tqdm(total=100, unit="%", file=sys.stderr, disable=not tty,
              bar_format="{desc:<40} {percentage:3.0f}%|{bar}| {elapsed}") as bar:
        while time.monotonic() < end:
            snap = client.request("job", {"id": job})
            if on_poll is not None:
                on_poll(snap)
            phase = str(snap.get("phase", ""))
            bar.n = round(100 * float(snap.get("progress", 0.0)))
            bar.set_description_str(phase[:40], refresh=False)
            bar.refresh()
            kind = phase.split(" ", maxsplit=1)[0]
            if not tty and not quiet and kind != last_kind:
                print(f"  {snap.get('name')}: {phase} ({100 * float(snap.get('progress', 0.0)):.0f}%)", flush=True)
                last_kind = kind
            if snap.get("state") != "running":
                return snap
            time.sleep(poll_s)
    client.request("cancel")
    raise TimeoutError(f"job {job} did not finish within {timeout_s} s")


def teach_shown(client: Any, scene: Any, label: str, class_id: int, seconds: float, *, settle_s: float = 1.0,
                timeout_s: float = 120.0) -> dict[str, Any]:
    """Show ``class_id`` (the publishers' scene control), let ``settle_s`` pass, teach ``label``
    for ``seconds`` of live samples; returns the teach job's result."""
    scene.show(class_id, settle_s + seconds + 1.0)
    time.sleep(settle_s)
    snap = wait_job(client, client.request("teach", {"label": label, "seconds": seconds})["job"], timeout_s, quiet=True)
    if snap.get("state") != "done":
        raise RuntimeError(f"teach {label!r} ended {snap.get('state')}: {snap.get('error')}")
    return snap["result"]


def learn_live(client: Any, scene: Any, name: str, *, labels: list[str], class_of: dict[str, int], seconds: float,
               timeout_s: float = 300.0, on_poll: Any = None) -> dict[str, Any]:
    """``learn-new-task --source live:SECONDS``, showing each label when the agent asks for it
    (its job phase says "show 'LABEL' now"); returns the final job snapshot."""
    job = client.request("learn-new-task", {"name": name, "labels": labels, "source": f"live:{seconds:g}"})["job"]
    shown: set[str] = set()

    def poll(snap: dict[str, Any]) -> None:
        if on_poll is not None:
            on_poll(snap)
        phase = str(snap.get("phase", ""))
        for lab in labels:
            if lab not in shown and phase.startswith(f"show {lab!r} now"):
                scene.show(class_of[lab], seconds + 3.0)  # the lead, the capture, a margin
                shown.add(lab)

    try:
        snap = wait_job(client, job, timeout_s, quiet=True, on_poll=poll, poll_s=0.05)
    except TimeoutError as exc:
        raise TimeoutError(f"learn-new-task {name} did not finish within {timeout_s} s") from exc
    scene.resume()
    return snap


def show_sequence(scene: Any, learned: list[int], *, reps: int, dwell_s: float, rng: np.random.Generator
                  ) -> list[int]:
    """Show each learned class ``reps`` times and as many not-learned ones, shuffled, from the
    schedule's pool (never a teaching sample); returns the sequence shown."""
    others = [c for c in range(10) if c not in learned]
    seq = list(learned) * reps + list(rng.permutation(others)[: len(learned)])
    seq = [int(c) for c in rng.permutation(seq)]
    for c in seq:
        scene.show(c, dwell_s, pool="base")
        time.sleep(dwell_s)
    return seq


class LiveMonitor:
    """Predictions (with receive time) and ground truth, collected in the background."""

    def __init__(self, predictions: str, sensors: str, ctx: zmq.Context, *, truth_topic: str = "truth") -> None:
        self._pred = ctx.socket(zmq.SUB)
        self._pred.connect(predictions)
        self._pred.subscribe(b"prediction")
        self._truth = ctx.socket(zmq.SUB)
        self._truth.connect(sensors)
        self._truth.subscribe(truth_topic.encode())
        for s in (self._pred, self._truth):
            s.setsockopt(zmq.LINGER, 0)
        self._truth_stamps: list[int] = []  # sorted camera stamps
        self._truth_labels: list[int] = []
        self.preds: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="live-monitor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._pred, zmq.POLLIN)
        poller.register(self._truth, zmq.POLLIN)
        while not self._stop.is_set():
            for sock, _ in poller.poll(100):
                frames = sock.recv_multipart()
                rx = time.time_ns()
                try:
                    body = msgpack.unpackb(frames[-1], raw=False)
                except Exception:  # not ours to judge; skip
                    continue
                if not isinstance(body, dict):
                    continue
                with self._lock:
                    if sock is self._pred:
                        body["rx_ns"] = rx
                        self.preds.append(body)
                    elif "stamp_ns" in body:
                        i = bisect.bisect(self._truth_stamps, int(body["stamp_ns"]))
                        self._truth_stamps.insert(i, int(body["stamp_ns"]))
                        self._truth_labels.insert(i, int(body.get("label", -1)))

    def mark(self) -> int:
        with self._lock:
            return len(self.preds)

    def truth_of(self, stamp: int) -> tuple[int, float] | None:
        """(class shown at this exact frame stamp, seconds since that class came into view)."""
        with self._lock:
            i = bisect.bisect_left(self._truth_stamps, stamp)
            if i >= len(self._truth_stamps) or self._truth_stamps[i] != stamp:
                return None
            label, j = self._truth_labels[i], i
            while j > 0 and self._truth_labels[j - 1] == label:
                j -= 1
            return label, (stamp - self._truth_stamps[j]) / 1e9 if j > 0 else float("inf")

    def score(self, since: int, until: int | None, learned: Iterable[str], class_of: dict[str, int], *,
              settle_s: float = 1.0) -> dict[str, Any]:
        """Live figures of predictions ``since``..``until`` (indices from ``mark``)."""
        with self._lock:
            preds = self.preds[since:until]
        learned_ids = {class_of[x] for x in learned if x in class_of}
        rows = []
        for p in preds:
            t = self.truth_of(int(p.get("frame_stamp_ns") or 0))
            if t is None or t[1] < settle_s:
                continue
            rows.append((t[0], class_of.get(p.get("label") or "", -2), p.get("smoothed_label"), bool(p.get("unknown"))))
        known = [r for r in rows if r[0] in learned_ids]
        novel = [r for r in rows if r[0] not in learned_ids]
        lat = [(p["rx_ns"] - p["frame_stamp_ns"]) / 1e6 for p in preds if p.get("frame_stamp_ns")]

        def mean(xs: list[bool]) -> float | None:
            return round(float(np.mean(xs)), 4) if xs else None

        name_of = {i: n for n, i in class_of.items()}
        wrong: dict[str, int] = {}
        for truth, pred, _, _ in known:
            if pred != truth:
                key = f"{name_of.get(truth, truth)}->{name_of.get(pred, pred)}"
                wrong[key] = wrong.get(key, 0) + 1

        return {"predictions": len(preds), "scored": len(known),
                "live_accuracy": mean([r[1] == r[0] for r in known]),
                "live_accuracy_smoothed": mean([class_of.get(r[2] or "", -2) == r[0] for r in known]),
                "unknown_rate_learned": mean([r[2] == "unknown" for r in known]),
                "unknown_rate_not_learned": mean([r[2] == "unknown" for r in novel]), "not_learned_scored": len(novel),
                "errors": dict(sorted(wrong.items(), key=lambda kv: -kv[1])[:6]),
                "latency_p50_ms": round(float(np.percentile(lat, 50)), 3) if lat else None,
                "latency_p99_ms": round(float(np.percentile(lat, 99)), 3) if lat else None}

    def latencies(self, since: int, until: int | None = None) -> list[float]:
        with self._lock:
            preds = self.preds[since:until]
        return [(p["rx_ns"] - p["frame_stamp_ns"]) / 1e6 for p in preds if p.get("frame_stamp_ns")]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        self._pred.close(0)
        self._truth.close(0)


def class_ids() -> dict[str, int]:
    """Spoken word (the robot's label, e.g. "t-shirt") -> dataset class id, from the prepared data."""
    from demodata.store import load

    n = len(load("fashion_mnist", verify=False)["class_names"])  # the speech set also has the digit names
    return {str(w): i for i, w in enumerate(load("speech")["words"][:n])}
