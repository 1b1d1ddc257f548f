"""Benchmarks and reliability checks of continua, each run as ``python -m benchmarks.<name>``."""
