"""Taught samples: the taps an operator labelled live with ``teach``, bounded and persisted.

Why persisted: teaching is the operator's time in front of the robot. A restart (power cut,
update) must not lose what was shown, so every capture is written as one segment file and a
manifest before ``teach`` reports done; a restarted agent offers the same samples to
``learn-new-task --source taught``.

Why bounded in bytes: a robot teaches for weeks. When a new capture does not fit, the oldest
captures are dropped whole (``dropped_samples`` counts them, a notice says so); a single capture
larger than the budget keeps its newest samples. Taps are stored as float16 (like the replay
buffer): 2,608 values per sample, ~5 KB.

Layout of ``root``: ``manifest.json`` (segments in order: file, label, n, sha256) and
``seg-000012.npz`` files (``{modality}_{level}`` float16, ``present`` bool, ``stamps`` int64),
each written to a temp file, fsynced and renamed (``common.atomic``). A segment that is missing
or fails its checksum on load is skipped and counted; files not in the manifest are removed.
A failed write (read-only or full disk) keeps the capture in memory and counts
``persist_errors``: teaching still works until the next restart.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import atomic_write

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


@dataclass
class Segment:
    label: str
    taps: dict[str, list[np.ndarray]]  # float16 (n, dim)
    present: np.ndarray  # (n, K) bool
    stamps: np.ndarray  # (n,) int64 camera stamps
    seq: int = 0
    file: str = ""

    def __len__(self) -> int:
        return len(self.stamps)

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for lv in self.taps.values() for x in lv) + self.present.nbytes + self.stamps.nbytes

    def head(self, n: int) -> Segment:
        """The newest ``n`` samples."""
        cut = slice(len(self) - n, None)
        return Segment(self.label, {m: [x[cut] for x in lv] for m, lv in self.taps.items()}, self.present[cut],
                       self.stamps[cut], self.seq, self.file)


@dataclass
class TaughtSamples:
    taps: dict[str, list[np.ndarray]]  # float32 (N, dim)
    present: np.ndarray
    stamps: np.ndarray
    names: list[str] = field(default_factory=list)


class TaughtStore:
    """Thread-safe; ``root=None`` keeps everything in memory."""

    def __init__(self, root: str | Path | None, *, max_bytes: int = 64 << 20,
                 modalities: tuple[str, ...] = ("image", "audio", "imu")) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes={max_bytes!r} must be > 0")
        self.root = None if root is None else Path(root)
        self.max_bytes = int(max_bytes)
        self.modalities = tuple(modalities)
        self._lock = threading.Lock()
        self._segments: list[Segment] = []
        self._seq = 0
        self.dropped_samples = 0
        self.persist_errors = 0
        self.load_skipped: list[tuple[str, str]] = []
        self._digests: dict[str, str] = {}
        if self.root is not None:
            self._load()

    # ---- queries
    def _counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self._segments:
            out[s.label] = out.get(s.label, 0) + len(s)
        return out

    def counts(self) -> dict[str, int]:
        with self._lock:  # ``teach`` adds from the control thread while ``status`` reads
            return self._counts()

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(s.nbytes for s in self._segments)

    def stats(self) -> dict[str, Any]:
        """One snapshot, taken under the lock: bytes, samples and drops always describe the same store."""
        with self._lock:
            return {"bytes": sum(s.nbytes for s in self._segments), "max_bytes": self.max_bytes,
                    "samples": self._counts(), "dropped_samples": self.dropped_samples,
                    "persist_errors": self.persist_errors, "load_skipped": [list(x) for x in self.load_skipped]}

    def get(self, labels: list[str]) -> TaughtSamples:
        """Every stored sample of ``labels`` (float32), in capture order; KeyError names missing labels."""
        with self._lock:
            segs = [s for s in self._segments if s.label in labels]
        missing = [lab for lab in labels if not any(s.label == lab for s in segs)]
        if missing:
            raise KeyError(missing)
        taps = {m: [np.concatenate([s.taps[m][b] for s in segs]).astype(np.float32)
                    for b in range(len(segs[0].taps[m]))] for m in segs[0].taps}
        return TaughtSamples(taps=taps, present=np.concatenate([s.present for s in segs]),
                             stamps=np.concatenate([s.stamps for s in segs]),
                             names=[s.label for s in segs for _ in range(len(s))])

    # ---- changes
    def add(self, label: str, taps: dict[str, list[np.ndarray]], present: np.ndarray, stamps: np.ndarray) -> int:
        """Store one capture; returns the samples kept (fewer when it alone exceeds ``max_bytes``)."""
        if set(taps) != set(self.modalities):
            raise ValueError(f"taught taps must have modalities {self.modalities}, got {sorted(taps)}")
        stamps = np.asarray(stamps, np.int64).reshape(-1)
        n = len(stamps)
        present = np.asarray(present, bool).reshape(n, len(self.modalities))
        if n == 0:
            return 0
        seg = Segment(label, {m: [np.asarray(x, np.float16).reshape(n, -1) for x in taps[m]] for m in self.modalities},
                      present, stamps)
        with self._lock:
            if seg.nbytes > self.max_bytes:
                keep = max(1, int(n * self.max_bytes / seg.nbytes))
                self._drop(n - keep, f"capture of {label!r} is larger than max_bytes={self.max_bytes}")
                seg = seg.head(keep)
            while self._segments and sum(s.nbytes for s in self._segments) + seg.nbytes > self.max_bytes:
                old = self._segments.pop(0)
                self._drop(len(old), f"oldest capture ({old.label!r}) dropped to stay within max_bytes")
                self._unlink(old)
            self._seq += 1
            seg.seq, seg.file = self._seq, f"seg-{self._seq:06d}.npz"
            self._segments.append(seg)
            self._persist(seg)
        return len(seg)

    def remove(self, labels: list[str]) -> int:
        """Forget the samples of ``labels`` (after a task learned them); returns how many."""
        with self._lock:
            gone = [s for s in self._segments if s.label in labels]
            self._segments = [s for s in self._segments if s.label not in labels]
            if gone:
                self._persist(None)
                for s in gone:
                    self._unlink(s)
        return sum(len(s) for s in gone)

    def _drop(self, n: int, why: str) -> None:
        self.dropped_samples += n
        log.warning("taught samples: %d dropped: %s", n, why)

    # ---- persistence
    def _persist(self, seg: Segment | None) -> None:
        if self.root is None:
            return
        try:
            if seg is not None:
                bio = io.BytesIO()
                arrays = {f"{m}_{b}": x for m, lv in seg.taps.items() for b, x in enumerate(lv)}
                np.savez(bio, present=seg.present, stamps=seg.stamps, **arrays)
                data = bio.getvalue()
                atomic_write(self.root / seg.file, data)
                self._digests[seg.file] = hashlib.sha256(data).hexdigest()
            manifest = {"format": 1, "seq": self._seq, "segments": [
                {"file": s.file, "label": s.label, "n": len(s), "sha256": self._digests.get(s.file, "")}
                for s in self._segments]}
            atomic_write(self.root / MANIFEST, json.dumps(manifest, indent=1).encode())
        except OSError as exc:
            self.persist_errors += 1
            log.error("taught samples not persisted (kept in memory until restart): %s", exc)

    def _unlink(self, seg: Segment) -> None:
        if self.root is not None and seg.file:
            with contextlib.suppress(OSError):
                (self.root / seg.file).unlink()
            self._digests.pop(seg.file, None)

    def _load(self) -> None:
        assert self.root is not None
        path = self.root / MANIFEST
        if not path.exists():
            return
        try:
            manifest = json.loads(path.read_text())
            entries = list(manifest["segments"])
            self._seq = int(manifest.get("seq", 0))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.load_skipped.append((MANIFEST, f"unreadable: {exc}"))
            log.error("taught samples: %s unreadable (%s); starting empty", path, exc)
            return
        for e in entries:
            fname = str(e.get("file", ""))
            try:
                if "/" in fname or not fname.startswith("seg-"):
                    raise ValueError(f"bad file name {fname!r}")
                data = (self.root / fname).read_bytes()
                if hashlib.sha256(data).hexdigest() != e["sha256"]:
                    raise ValueError("sha256 mismatch (truncated or corrupt)")
                with np.load(io.BytesIO(data), allow_pickle=False) as z:
                    taps = {m: [z[f"{m}_{b}"] for b in range(sum(k.startswith(f"{m}_") for k in z.files))]
                            for m in self.modalities}
                    seg = Segment(str(e["label"]), taps, z["present"], z["stamps"], int(fname[4:10]), fname)
                if len(seg) != int(e["n"]):
                    raise ValueError(f"holds {len(seg)} samples, manifest says {e['n']}")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                self.load_skipped.append((fname, str(exc)))
                log.error("taught samples: segment %s skipped: %s", fname, exc)
                continue
            self._segments.append(seg)
            self._digests[fname] = str(e["sha256"])
        known = {str(e.get("file", "")) for e in entries}  # corrupt ones stay until the manifest drops them
        for p in self.root.glob("seg-*.npz"):  # written before a crash, never listed: not taught
            if p.name not in known:
                with contextlib.suppress(OSError):
                    p.unlink()
        log.info("taught samples: %s loaded from %s", self.counts(), self.root)
