"""Shared pytest setup: hypothesis profiles sized for 2-core CI machines, a ZeroMQ context per test."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import zmq
from hypothesis import HealthCheck, settings

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
