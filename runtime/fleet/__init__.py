"""The fleet: robots share skill packages through a Flower server (``flwr``), never raw data or weights.

- ``spool``: the robot-side directory the agent and the ClientApp exchange packages through;
- ``store``: the server-side store that verifies every package and knows who has which;
- ``apps``: the Flower ServerApp and ClientApp, and ``simulate`` on Flower's simulation engine;
- ``node``: the ``flower-supernode`` command of a real robot; ``python -m runtime.fleet``: the server.

Why telemetry is switched off here: Flower reports usage to its own servers unless
``FLWR_TELEMETRY_ENABLED=0``; a robot must not phone home. It is read once, when Flower is first
imported, so it is set (unless the environment already decides) before ``apps`` imports Flower.
``apps`` is not imported here, so the spool and the store import without Flower installed.
"""

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from runtime.fleet.spool import Spool
from runtime.fleet.store import SkillStore

__all__ = ["SkillStore", "Spool"]
