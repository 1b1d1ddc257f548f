"""TensorRT engine cache on disk and a background build with progress.

An engine is keyed by TensorRT version, GPU compute capability, the ONNX file's sha256 and the
build flags; ``<key>.engine`` sits beside ``<key>.json`` (key fields + engine sha256). A file
whose sidecar is missing, unreadable or whose hash differs is rejected (logged with its path
and reason), deleted and rebuilt: never silently used. No tensorrt import here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common.atomic import atomic_write

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class EngineKey:
    trt_version: str
    compute_capability: str  # e.g. "8.7" (Orin)
    onnx_sha256: str
    flags: tuple[str, ...]  # e.g. ("fp16", "ws=1024MiB", "profile=1/1/8")

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:32]


class EngineCache:
    def __init__(self, root: str | Path = "engines") -> None:
        self.root = Path(root)

    def paths(self, key: EngineKey) -> tuple[Path, Path]:
        d = key.digest()
        return self.root / f"{d}.engine", self.root / f"{d}.json"

    def timing_cache_path(self, trt_version: str, compute_capability: str) -> Path:
        return self.root / f"timing_{trt_version}_sm{compute_capability.replace('.', '')}.cache"

    def load(self, key: EngineKey) -> bytes | None:
        """Engine bytes for ``key``, or None (absent, or rejected and removed)."""
        engine, meta = self.paths(key)
        if not engine.exists():
            return None
        reason = None
        try:
            info = json.loads(meta.read_text())
            data = engine.read_bytes()
            if info.get("key") != json.loads(json.dumps(asdict(key))):
                reason = "sidecar key differs from the requested key"
            elif hashlib.sha256(data).hexdigest() != info.get("sha256"):
                reason = "engine sha256 does not match its sidecar (corrupt or truncated)"
        except (OSError, json.JSONDecodeError) as e:
            reason = f"sidecar unreadable: {e}"
        if reason:
            log.warning("rejecting cached engine %s: %s; it will be rebuilt", engine, reason)
            self.remove(key)
            return None
        return data

    def store(self, key: EngineKey, data: bytes) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        engine, meta = self.paths(key)
        atomic_write(engine, data)
        info = {"key": asdict(key), "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        atomic_write(meta, json.dumps(info, indent=2).encode())
        return engine

    def remove(self, key: EngineKey) -> None:
        for p in self.paths(key):
            p.unlink(missing_ok=True)


@dataclass
class BuildProgress:
    """Thread-safe-enough progress record (single writer: the build thread)."""

    phase: str = "queued"
    fraction: float = 0.0
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    error: str | None = None


class BackgroundBuild:
    """Runs ``fn(progress) -> bytes`` on a daemon thread; the caller polls ``done``/``result``."""

    def __init__(self, name: str, fn: Callable[[BuildProgress], bytes],
                 on_done: Callable[[bytes], None] | None = None) -> None:
        self.progress = BuildProgress()
        self._fn, self._on_done = fn, on_done
        self._result: bytes | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._main, name=f"trt-build-{name}", daemon=True)

    def start(self) -> BackgroundBuild:
        self._thread.start()
        return self

    def _main(self) -> None:
        try:
            self.progress.phase = "building"
            data = self._fn(self.progress)
            if self._on_done is not None:
                self._on_done(data)
            self._result = data
            self.progress.phase, self.progress.fraction = "done", 1.0
        except Exception as e:  # reported to the caller through progress.error, and logged
            self.progress.phase, self.progress.error = "failed", f"{type(e).__name__}: {e}"
            log.error("engine build %s failed: %s", self._thread.name, self.progress.error)
        finally:
            self.progress.finished = time.monotonic()
            self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    @property
    def result(self) -> bytes | None:
        return self._result
