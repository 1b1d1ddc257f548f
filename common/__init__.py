"""Helpers every layer may import: TOML configs and CLI start-up, crash-safe writes, threads, errors.

Nothing here knows about sensors, models or the agent, so ``sensors``, ``export``, ``training``,
``runtime``, ``demodata`` and ``benchmarks`` all import from it without breaking the left-to-right
data flow of the packages.
"""
