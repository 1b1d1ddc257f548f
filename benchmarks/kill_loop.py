"""Reliability kill loop: SIGKILL the agent at checkpoint fault points and check it resumes intact.

The kill loop of the reliability report: SIGKILL the agent inside each checkpoint fault point
and at random moments, restart it, and check it resumed the last committed state bit for bit.

Used by ``python -m benchmarks.reliability`` and ``tests/runtime/test_reliability.py`` (which
imports it through ``benchmarks.reliability``). The fault points are the named steps of a
checkpoint write (``sensors.durable.CHECKPOINT_POINTS``); an agent started with
``CONTINUA_FAULT_AT=<point>:2`` kills itself at that step of its second checkpoint write, so a
round lands where it is meant to instead of where a random sleep happens to end.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.harness import SLOW_SAVE_ENV, Agent, AgentSetup
from runtime.checkpoints import CheckpointStore, LoadResult
from runtime.errors import ControlTimeoutError, RemoteError
from sensors.durable import CHECKPOINT_POINTS, FAULT_ENV


# --------------------------------------------------------------------------- committed state
def committed(state_dir: Path) -> tuple[dict, dict] | None:
    """(state, meta) of the latest good checkpoint, read from a *copy* (nothing moves on disk)."""
    res = load_copy(state_dir)
    return None if res is None else (res.state, res.meta)


def load_copy(state_dir: Path) -> LoadResult | None:
    """``CheckpointStore.load_latest`` of a *copy* of ``state_dir`` (corrupt ones met are listed in
    the result, not moved on the real disk); None when there is no usable checkpoint."""
    if not state_dir.is_dir():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "s"
        shutil.copytree(state_dir, copy, ignore=shutil.ignore_patterns(".tmp-*"))
        try:
            return CheckpointStore(copy).load_latest()
        except Exception:
            return None


def diff_states(a: Any, b: Any, where: str = "") -> list[str]:
    """Differences between two checkpoint states (empty: bit-identical)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        ok = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
              and a.shape == b.shape and torch.equal(a, b))
        return [] if ok else [where]
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        ok = (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
              and a.shape == b.shape and a.tobytes() == b.tobytes())
        return [] if ok else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where} keys {sorted(map(str, set(a) ^ set(b)))}"]
        return [d for k in a for d in diff_states(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return [f"{where} len {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in diff_states(x, y, f"{where}[{i}]")]
    if a != b and not (isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b)):
        return [f"{where}: {a!r} != {b!r}"]
    return []


# --------------------------------------------------------------------------- randomised kill loop
LABEL_PAIRS = [["pullover", "dress"], ["coat", "sandal"], ["shirt", "sneaker"], ["bag", "ankle boot"]]


def _same(a: tuple | None, b: tuple | None) -> bool:
    return a is not None and b is not None and not diff_states(a[0], b[0]) and not diff_states(a[1], b[1])


# the fault points a crash there commits the new checkpoint (its directory is renamed into place)
COMMITTED_POINTS = ("checkpoint.after_rename", "checkpoint.after_latest")


def _env(plan: str, slow_save_s: float) -> dict[str, str] | None:
    """The agent's environment for one round: a fault point armed for the *second* checkpoint write
    (the first is the save that verifies the previous round), or the slow-save hook."""
    if plan in CHECKPOINT_POINTS:
        return {FAULT_ENV: f"{plan}:2"}
    return {SLOW_SAVE_ENV: str(slow_save_s)} if slow_save_s else None


def _die_at_fault(agent: Agent, point: str, trigger: str, name: str, labels: list[str]) -> tuple[bool, str]:
    """Make the agent write a checkpoint (commit a learned task, or ``save``) and wait for the armed
    fault point to SIGKILL it. (landed at ``point``, what finally triggered it)."""
    deadline = time.monotonic() + (420.0 if trigger == "learn" else 60.0)
    if trigger == "learn":
        try:
            job = agent.learn(name, labels)
            while agent.proc.alive() and time.monotonic() < deadline:
                if agent.client.request("job", {"id": job}, timeout_s=2.0)["state"] != "running":
                    break  # rejected by the gate or failed: nothing to commit, so save instead
                time.sleep(0.5)
        except (ControlTimeoutError, RemoteError):
            pass  # the fault killed it while we asked
        if agent.proc.alive():
            trigger = "save (learn committed nothing)"
    if agent.proc.alive():
        with contextlib.suppress(ControlTimeoutError, RemoteError):
            agent.client.call("save", timeout_s=30.0)
    rc = agent.proc.wait(max(1.0, deadline - time.monotonic()))
    landed = rc == -9 and f"fault point {point} reached" in agent.proc.log_text()
    if rc is None:  # armed but never reached: end it the usual way
        agent.kill()
    else:
        agent.client.close()
    return landed, trigger


def kill_loop(setup: AgentSetup, *, restarts: int, seed: int = 0, slow_save_s: float = 0.02,
              fault_points: tuple[str, ...] = CHECKPOINT_POINTS, random_kills: bool = True,
              fault_trigger: str = "alternate", progress: Any = None) -> dict[str, Any]:
    """SIGKILL the agent inside each checkpoint fault point in turn, and at random moments; restart, verify.

    Round ``i`` plays ``[*fault_points, "random"][i % n]`` (no "random" without ``random_kills``):

    - a fault point (``sensors.durable``): the agent runs with ``CONTINUA_FAULT_AT=<point>:2`` and
      kills itself at exactly that step of its second checkpoint write: the commit of a learned
      task or a ``save`` (``fault_trigger``: "learn", "save", or "alternate": learn on the first
      pass over the points, save on the next...; save whenever no label pair is left). A kill
      before the rename must leave the previous checkpoint bit for bit; one after it, the new
      version (previous + 1, with the new task);
    - random: a random activity (idle, capture, learn, save) killed at a random moment;
      ``slow_save_s`` stretches saves (test hook) so that some land inside checkpoint writes.

    Verified after every kill: no checkpoint is corrupt, the committed state only moves forward (the
    same one bit for bit, or a newer complete one), the restarted agent reports it (version,
    tasks) and holds it in memory (a ``save`` right after the restart writes the same arrays).
    ``kill_points`` counts the rounds that landed on each point (``missed``: armed, not reached).
    """
    if fault_trigger not in ("alternate", "learn", "save"):
        raise ValueError(f"fault_trigger={fault_trigger!r}: expected alternate, learn or save")
    rng = random.Random(seed)
    plans = [*fault_points, *(["random"] if random_kills or not fault_points else [])]
    agent = Agent(setup, env=_env(plans[0], slow_save_s), tag="loop-0")
    agent.wait_ready(90, predictions=False)
    agent.client.request("save", timeout_s=30.0)  # the first write: every round's agent has made one
    res: dict[str, Any] = {"restarts": 0, "verified": 0, "states_lost": 0, "actions": {}, "phases": {},
                           "kill_points": {p: 0 for p in fault_points}, "missed": {}, "corrupt_after_kill": 0,
                           "versions_committed": [], "failures": []}
    for i in range(restarts):
        plan = plans[i % len(plans)]
        before = committed(setup.state)
        n_tasks = len(before[1]["tasks"]) if before else 0
        can_learn = 1 <= n_tasks <= len(LABEL_PAIRS)
        expect = "forward"
        if plan in fault_points:
            learn = fault_trigger == "learn" or (fault_trigger == "alternate" and (i // len(plans)) % 2 == 0)
            trigger = "learn" if learn and can_learn else "save"
            landed, action = _die_at_fault(agent, plan, trigger, f"task{n_tasks}-{i}", LABEL_PAIRS[n_tasks - 1])
            phase = plan
            if landed:
                res["kill_points"][plan] += 1
                expect = "new" if action == "learn" and plan in COMMITTED_POINTS else "same"
            else:
                res["missed"][plan] = res["missed"].get(plan, 0) + 1
                expect = "landed"  # fails the round
        else:
            action = rng.choice(["idle", "capture", "learn", "learn", "save"])
            if action == "learn" and not can_learn:
                action = "save"
            try:
                if action == "capture":
                    agent.client.request("teach", {"label": "mug", "seconds": 3.0})
                elif action == "learn":
                    agent.learn(f"task{n_tasks}-{i}", LABEL_PAIRS[n_tasks - 1])
                elif action == "save":
                    agent.client.call("save", timeout_s=0.05)
            except (ControlTimeoutError, RemoteError):
                pass
            time.sleep(rng.uniform(0.0, 14.0 if action == "learn" else 2.0))
            try:
                job = agent.client.request("status", timeout_s=1.0)["job"]
                phase = job["phase"].split(" ")[0] if job and job["state"] == "running" else "idle"
            except (ControlTimeoutError, RemoteError):
                phase = "busy"
            agent.kill()
        loaded = load_copy(setup.state)
        after = None if loaded is None else (loaded.state, loaded.meta)
        clean = loaded is not None and not loaded.corrupt
        res["corrupt_after_kill"] += int(loaded is not None and bool(loaded.corrupt))
        if expect == "same":
            ok = _same(before, after)
        elif expect == "new":
            ok = (after is not None and before is not None and after[1]["version"] == before[1]["version"] + 1
                  and len(after[1]["tasks"]) == n_tasks + 1)
        elif expect == "forward":
            ok = after is not None and (_same(before, after) or after[1]["version"] > before[1]["version"])
        else:
            ok = False
        ok = ok and clean
        nxt = plans[(i + 1) % len(plans)]
        agent = Agent(setup, env=_env(nxt, slow_save_s), tag=f"loop-{i + 1}")
        st = agent.wait_ready(90, predictions=False)
        ok = (ok and after is not None and st["model_version"] == after[1]["version"]
              and st["tasks"] == [t["name"] for t in after[1]["tasks"]])
        agent.client.request("save", timeout_s=30.0)  # the next round's first write (its fault point's hit 1)
        ok = ok and _same(after, committed(setup.state))
        res["restarts"] += 1
        res["verified"] += int(ok)
        res["states_lost"] += int(not ok)
        res["actions"][action] = res["actions"].get(action, 0) + 1
        res["phases"][phase] = res["phases"].get(phase, 0) + 1
        res["versions_committed"].append(after[1]["version"] if after else None)
        if not ok:
            res["failures"].append({"i": i, "plan": plan, "action": action, "phase": phase, "expect": expect,
                                    "corrupt": [c.reason for c in loaded.corrupt] if loaded else None, "status": st})
        if progress is not None:
            progress(i, action, phase, ok)
    agent.stop()
    return res
