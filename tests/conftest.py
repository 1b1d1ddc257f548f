"""Shared pytest setup (hypothesis profiles, a ZeroMQ context per test) and helpers the test modules import."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, settings

if TYPE_CHECKING:
    from training.learner import LabelledSamples, LearnerConfig

REPO = Path(__file__).resolve().parents[1]

settings.register_profile(
    "ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    """A real ZeroMQ context of the test's own, destroyed (linger 0) when it ends."""
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


# ---- helpers shared by test modules (``from tests.conftest import ...``) -------------------------
def wait_for(pred: Callable[[], Any], what: str, timeout_s: float, *, poll_s: float = 0.01,
             state: Callable[[], Any] | None = None) -> Any:
    """Poll ``pred`` until it returns something truthy (returned) or ``timeout_s`` passes; the
    AssertionError names ``what`` and, with ``state``, what things looked like at the end, so a
    timed-out wait on a loaded 2-core machine says more than "timed out"."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}"
                         + ("" if state is None else f"; now: {state()}"))


def assert_imports_without_torch(modules: str) -> None:
    """Import ``modules`` (comma-separated) in a fresh interpreter and assert torch was not pulled
    in: a fresh process, because this one has long imported torch through other tests."""
    code = (f"import sys, {modules}; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]; "
            "assert not bad, bad; print('ok')")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         check=False)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def assert_each_byte_flip_refused(path: Path, read: Callable[[], object], error: type[Exception]) -> None:
    """Flip one bit of each byte of ``path`` in turn: ``read()`` must raise ``error`` every time
    (exhaustive, not sampled: a sealed manifest must leave no byte unchecked). The file is
    restored afterwards, also when an assertion fails."""
    original = path.read_bytes()
    try:
        for at in range(len(original)):
            data = bytearray(original)
            data[at] ^= 0x01
            path.write_bytes(bytes(data))
            with pytest.raises(error):
                read()
    finally:
        path.write_bytes(original)


# Small synthetic tap features for the learner tests: one normal prototype per class and tap
# (fixed seed 0), samples = prototype + 0.5 noise; learnable in a few epochs on one core.
LEARNER_DIMS = {"image": [12, 20], "audio": [10], "imu": [8]}
LEARNER_NAMES = ["cup", "ball", "box", "pen"]
_PROTO_RNG = np.random.default_rng(0)
LEARNER_PROTOS = {m: [_PROTO_RNG.normal(size=(len(LEARNER_NAMES), d)).astype(np.float32) for d in ds]
                  for m, ds in LEARNER_DIMS.items()}


def learner_samples(classes: list[int], n: int, seed: int) -> LabelledSamples:
    """``n`` labelled samples of ``classes`` (indices into LEARNER_NAMES), all modalities present."""
    from training.learner import LabelledSamples

    rng = np.random.default_rng(seed)
    y = rng.choice(classes, n)
    taps = {m: [LEARNER_PROTOS[m][b][y] + 0.5 * rng.normal(size=(n, d)).astype(np.float32)
                for b, d in enumerate(ds)]
            for m, ds in LEARNER_DIMS.items()}
    return LabelledSamples(taps=taps, present=np.ones((n, 3), bool), names=[LEARNER_NAMES[i] for i in y])


def small_learner_config(epochs: int, strategy: str = "ours", **training: Any) -> LearnerConfig:
    """A LearnerConfig sized for the tests (small side network, one thread, no deadline);
    ``training``: more ``[learner.training]`` knobs."""
    from training.config import LearnerConfig, ModelConfig, StrategyConfig

    base: dict[str, Any] = dict(epochs=epochs, batch_size=32, replay_batch=32, max_seconds=0.0, threads=1,
                                buffer_size=200)
    return LearnerConfig(strategy=strategy, model=ModelConfig(d=16, bottleneck=8, proj_dim=16, n_experts=6),
                         training=StrategyConfig(**{**base, **training}))
