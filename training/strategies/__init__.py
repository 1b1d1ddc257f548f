"""Continual-learning strategies, one short file each, found by the registry automatically.

See ``base.py`` for the hooks and
``training.registry`` for lookup by name (every module here is discovered automatically)."""
