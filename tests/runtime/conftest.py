"""Process-level fixtures for the reliability tests: keys, sensor publishers, a committed
baseline state, and the agent as ``python -m runtime.agent --config <tmp toml>``.

The harness itself (``AgentSetup``, ``Agent``, ``Proc``...) lives in
``benchmarks.reliability`` so that the report runs exactly what the tests run. Tests marked
``slow`` run only with ``-m slow`` or ``CONTINUA_SLOW=1``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmarks.reliability import REPO, Agent, Sensors, fresh_setup, make_baseline


def pytest_collection_modifyitems(config, items):
    if os.environ.get("CONTINUA_SLOW") or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow, CONTINUA_SLOW=1 or python -m benchmarks.reliability")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def rel_root(tmp_path_factory) -> Path:
    assert (REPO / "models" / "image.onnx").exists(), "models/ not built (python -m export build)"
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="session")
def sensors(rel_root):
    s = Sensors(rel_root)
    yield s
    s.stop()


@pytest.fixture(scope="session")
def baseline(rel_root, sensors) -> dict[str, Path]:
    """Committed states: ``v1`` (task0) and ``v2`` (task0, task1), learned once per session."""
    return make_baseline(rel_root, sensors)


agent_setup = fresh_setup


@pytest.fixture(scope="module")
def shared_agent(rel_root, sensors, baseline):
    """One running agent at v2 for the tests that do not kill it."""
    setup = agent_setup(rel_root, sensors, baseline["v2"], "shared", flood=True, control={"heartbeat_timeout_s": 2.0})
    agent = Agent(setup, tag="shared-agent")
    agent.wait_ready(90)
    yield agent
    agent.stop()
