"""Background jobs of the agent: at most one runs, its progress is polled, it can be cancelled.

Control handlers run on the server thread and must be quick; long work (``learn-new-task``) is
started with ``JobTracker.start`` and returns a job id at once. The job's function gets a
``JobHandle`` to report progress and phase and to see cancellation between its steps. Progress
is *polled*: the server's built-in ``job`` command returns ``JobTracker.snapshot`` (progress
0..1, phase, state, result/error). Polling instead of a PUB event socket: one socket, one Curve
setup, no slow-joiner losses, and every poll doubles as the console's heartbeat.

Usage (the agent)::

    jobs = JobTracker()
    job_id = jobs.start("learn", lambda h: (h.update(0.5, "training"), h.check_cancelled()))
    jobs.snapshot(job_id)["state"]  # running | done | failed | cancelled
"""

from __future__ import annotations

import logging
import math
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from runtime.errors import BusyError, JobCancelledError

log = logging.getLogger(__name__)


class JobHandle:
    """Given to a job's function: report progress, see cancellation."""

    def __init__(self, tracker: JobTracker, job_id: str) -> None:
        self._tracker = tracker
        self.id = job_id
        self.cancel_event = threading.Event()

    def update(self, progress: float | None = None, phase: str | None = None) -> None:
        self._tracker._update(self.id, progress, phase)

    def set_meta(self, **meta: Any) -> None:
        """Add facts to the job's ``meta`` (e.g. the worker's pid) while it runs."""
        self._tracker._update(self.id, None, None, meta)

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def check_cancelled(self) -> None:
        """Raise ``JobCancelledError`` when a cancel was requested (call between steps)."""
        if self.cancel_event.is_set():
            raise JobCancelledError(f"job {self.id} cancelled")


class JobTracker:
    """At most one active background job; a bounded history of finished ones.

    ``start`` raises ``BusyError`` (reply code ``busy``) while a job runs. The job function
    returns its result (msgpack-able) or raises; ``JobCancelledError`` or returning after
    ``cancel`` marks it ``cancelled``, any other exception ``failed`` with its message.
    """

    def __init__(self, *, history: int = 16) -> None:
        self._lock = threading.Lock()
        self._jobs: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._handles: dict[str, JobHandle] = {}
        self._active: str | None = None
        self._history = history
        self._threads: dict[str, threading.Thread] = {}

    def start(self, name: str, fn: Callable[[JobHandle], Any], *, meta: dict | None = None) -> str:
        with self._lock:
            if self._active is not None:
                job = self._jobs[self._active]
                raise BusyError(f"job {job['id']} ({job['name']}) is running: {job['phase']} "
                                f"{job['progress']:.0%}; cancel it or wait")
            job_id = uuid.uuid4().hex[:12]
            self._jobs[job_id] = {"id": job_id, "name": name, "state": "running", "progress": 0.0,
                                  "phase": "starting", "result": None, "error": None,
                                  "started_ns": time.time_ns(), "ended_ns": None, "meta": dict(meta or {})}
            while len(self._jobs) > self._history:
                oldest = next(iter(self._jobs))
                if oldest == job_id:
                    break
                self._jobs.pop(oldest)
            handle = JobHandle(self, job_id)
            self._handles[job_id] = handle
            self._active = job_id
            thread = threading.Thread(target=self._run, args=(handle, fn), name=f"job-{name}", daemon=True)
            self._threads[job_id] = thread
        thread.start()
        return job_id

    def _run(self, handle: JobHandle, fn: Callable[[JobHandle], Any]) -> None:
        state, result, error = "done", None, None
        try:
            result = fn(handle)
            if handle.cancelled:
                state = "cancelled"
        except JobCancelledError:
            state = "cancelled"
        except Exception as exc:
            log.error("job %s failed: %s", handle.id, traceback.format_exc())
            state, error = "failed", f"{type(exc).__name__}: {exc}"
        with self._lock:
            job = self._jobs.get(handle.id)
            if job is not None:
                job.update(state=state, result=result if state == "done" else None, error=error,
                           ended_ns=time.time_ns())
                if state == "done":
                    job["progress"] = 1.0
            self._active = None
            self._handles.pop(handle.id, None)
            self._threads.pop(handle.id, None)
        log.info("job %s %s", handle.id, state)

    def _update(self, job_id: str, progress: float | None, phase: str | None, meta: dict | None = None) -> None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job["state"] != "running":
                return
            if meta:
                job["meta"].update(meta)
            if progress is not None and math.isfinite(progress):
                job["progress"] = min(1.0, max(0.0, float(progress)))
            if phase is not None:
                job["phase"] = str(phase)

    def snapshot(self, job_id: str | None = None) -> dict[str, Any] | None:
        """A copy of one job (default: the active one, else the newest), or None."""
        with self._lock:
            if job_id is None:
                job_id = self._active or (next(reversed(self._jobs)) if self._jobs else None)
            job = self._jobs.get(job_id) if job_id is not None else None
            return dict(job, meta=dict(job["meta"])) if job is not None else None

    def active(self) -> str | None:
        with self._lock:
            return self._active

    def cancel(self, job_id: str | None = None) -> bool:
        """Ask the active job (or ``job_id`` if it is the active one) to stop; True if asked."""
        with self._lock:
            target = self._active if job_id is None else job_id
            handle = self._handles.get(target) if target is not None else None
        if handle is None:
            return False
        handle.cancel_event.set()
        return True

    def wait(self, job_id: str | None = None, timeout_s: float = 10.0) -> dict[str, Any] | None:
        """Join the job's thread (bounded) and return its snapshot."""
        with self._lock:
            target = job_id or self._active
            thread = self._threads.get(target) if target else None
        if thread is not None:
            thread.join(timeout_s)
        return self.snapshot(target)
