"""Class-balanced replay buffer of backbone taps, bounded by sample count and bytes, persisted crash-safely.

Why taps: the backbone is frozen, so replaying its taps is exact, ~100x smaller than frames and
keeps no raw images or audio on the robot. Storage is float16, or int8 with one float32 scale
per vector (``x ~ q * scale``, ``scale = max|x| / 127``).

Selection is class-balanced reservoir sampling (CBRS, Chrysakis & Moens 2020): while there is
room every sample is kept; when full, a sample of a class that is not among the largest ones
evicts a random sample of a largest class, and a sample of a largest class replaces a random
sample of its own class with probability stored_c / seen_c (reservoir within the class).
Invariant (property-tested): a class holds at least one fewer sample than another only when it
has stored everything it has seen.

Persistence (``save``/``load``): samples are written in segments of ``SEGMENT`` samples, each an
``.npz`` written to a temp file, fsynced and renamed, under a new generation number; then a
``manifest.json`` with each segment's sha256 replaces the old one the same way, and only then
are the previous generation's files deleted. A crash at any point leaves a complete old or new
buffer (fault points ``buffer.segments_written`` and ``buffer.manifest_replaced`` let a test
kill the process there). The manifest is sealed (``sensors.durable.seal``: it carries the sha256
of its own content), so a flipped byte in a count, a dtype or the schema is refused
(``BufferCorruptError``) instead of loaded. On load a segment that is missing or fails its
checksum is logged and skipped; the rest is kept (``load_report`` says what was lost). A buffer
that is saved together with a model belongs in that model's checkpoint instead
(``state_dict``): one commit for both.

The reservoir's random generator is part of the state (``state_dict``, the manifest): a loaded
buffer evicts exactly as the saved one would have.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import atomic_write, fsync_dir
from sensors.durable import fault_point, seal, unseal
from training.errors import BufferCorruptError, ReplayBufferError

log = logging.getLogger(__name__)

DTYPES = ("float16", "int8")
SEGMENT = 256
MANIFEST = "manifest.json"
FORMAT = 1  # of ``state_dict``
MANIFEST_FORMAT = 2  # of a saved directory's manifest; 2: sealed (1: unsealed, still read)
_META_BYTES = 8 + 4 + 8  # label int64, task int32, stamp int64 (+ K bytes of present mask)


def stored_sample_bytes(schema: dict[str, list[int]], dtype: str) -> int:
    """Bytes one stored sample costs (tap payload + int8 scales + label/task/stamp + present mask)."""
    dims = [d for ds in schema.values() for d in ds]
    return sum(dims) * (2 if dtype == "float16" else 1) + (0 if dtype == "float16" else 4 * len(dims)) \
        + _META_BYTES + len(schema)


def fit_pool(tap_dims: dict[str, list[int]], dtype: str, max_bytes: int) -> dict[str, list[int]]:
    """The tap pooling (``ModelConfig.tap_pool``) that fits one stored sample into ``max_bytes``:
    halve the widest tap (mean over adjacent pairs) until it fits; empty when it already does.

    Why the widest first: it is the deepest image tap (1280 of ~2,900 features here), the one with
    the most redundancy per byte; halving it alone brings the int8 layout under 2 KB. Raises
    ``ReplayBufferError`` when no halving can reach the bound.
    """
    factors = {m: [1] * len(ds) for m, ds in tap_dims.items()}

    def pooled() -> dict[str, list[int]]:
        return {m: [d // f for d, f in zip(ds, factors[m], strict=True)] for m, ds in tap_dims.items()}

    while stored_sample_bytes(pooled(), dtype) > max_bytes:
        dims = pooled()
        cands = [(d, m, b) for m, ds in dims.items() for b, d in enumerate(ds) if d % 2 == 0 and d > 1]
        if not cands:
            raise ReplayBufferError(f"no tap pooling fits a {dtype} sample of taps {tap_dims} into {max_bytes} "
                                    f"bytes (smallest reachable: {stored_sample_bytes(dims, dtype)})")
        _, m, b = max(cands)
        factors[m][b] *= 2
    return {m: fs for m, fs in factors.items() if any(f > 1 for f in fs)}


@dataclass
class ReplayBatch:
    """Sampled replay data: taps modality -> list of (n, dim_b) float32; present (n, K); labels/tasks/stamps (n,)."""

    taps: dict[str, list[np.ndarray]]
    present: np.ndarray
    labels: np.ndarray
    tasks: np.ndarray
    stamps: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class LoadReport:
    segments_ok: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (segment file, reason)
    samples_lost: int = 0


class ReplayBuffer:
    """Class-balanced reservoir of tap vectors. Schema (modalities, tap dims) is fixed by the first ``add``."""

    def __init__(self, max_samples: int = 2000, max_bytes: int = 64 << 20, dtype: str = "float16",
                 seed: int = 0) -> None:
        if max_samples <= 0:
            raise ValueError(f"ReplayBuffer.max_samples must be > 0, got {max_samples}")
        if max_bytes <= 0:
            raise ValueError(f"ReplayBuffer.max_bytes must be > 0, got {max_bytes}")
        if dtype not in DTYPES:
            raise ValueError(f"ReplayBuffer.dtype must be one of {DTYPES}, got {dtype!r}")
        self.max_samples = int(max_samples)
        self.max_bytes = int(max_bytes)
        self.dtype = dtype
        self._rng = np.random.default_rng(seed)
        self.schema: dict[str, list[int]] | None = None
        self.seen: dict[int, int] = {}
        self._n = 0
        self.capacity = 0
        self.load_report: LoadReport | None = None

    # ---- layout -------------------------------------------------------------------------------
    def sample_bytes(self, schema: dict[str, list[int]] | None = None) -> int:
        """Bytes one stored sample costs (tap payload + scales + label/task/stamp + present mask)."""
        schema = schema or self.schema
        return 0 if schema is None else stored_sample_bytes(schema, self.dtype)

    def _allocate(self, schema: dict[str, list[int]]) -> None:
        per = self.sample_bytes(schema)
        cap = min(self.max_samples, self.max_bytes // per)
        if cap < 1:
            raise ReplayBufferError(f"max_bytes={self.max_bytes} is smaller than one sample ({per} bytes)")
        self.schema = {m: list(ds) for m, ds in schema.items()}
        self.capacity = int(cap)
        store = np.float16 if self.dtype == "float16" else np.int8
        self._taps = {m: [np.zeros((cap, d), store) for d in ds] for m, ds in schema.items()}
        self._scales = {m: [np.zeros(cap, np.float32) for _ in ds] for m, ds in schema.items()}
        self._present = np.zeros((cap, len(schema)), bool)
        self._labels = np.zeros(cap, np.int64)
        self._tasks = np.zeros(cap, np.int32)
        self._stamps = np.zeros(cap, np.int64)

    @property
    def modalities(self) -> list[str]:
        return list(self.schema or {})

    def __len__(self) -> int:
        return self._n

    @property
    def nbytes(self) -> int:
        return self._n * self.sample_bytes()

    @property
    def labels(self) -> np.ndarray:
        return self._labels[: self._n].copy() if self.schema else np.zeros(0, np.int64)

    def class_counts(self) -> dict[int, int]:
        labels, counts = np.unique(self.labels, return_counts=True)
        return {int(c): int(n) for c, n in zip(labels, counts, strict=True)}

    # ---- insertion ----------------------------------------------------------------------------
    def _write(self, slots: np.ndarray, taps: dict[str, list[np.ndarray]], present: np.ndarray, *,
               labels: np.ndarray, task: int, stamps: np.ndarray) -> None:
        """Store rows (taps (n, dim) per level) into ``slots`` (quantising vector by vector)."""
        assert self.schema is not None
        for m, dims in self.schema.items():
            for b, dim in enumerate(dims):
                x = np.asarray(taps[m][b], np.float32).reshape(len(slots), -1)
                if x.shape[1] != dim:
                    raise ValueError(f"tap {m}[{b}] has {x.shape[1]} values, the buffer stores {dim}")
                if self.dtype == "float16":
                    self._taps[m][b][slots] = np.clip(x, -65504, 65504).astype(np.float16)
                else:
                    amax = np.abs(x).max(axis=1) if dim else np.zeros(len(slots), np.float32)
                    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
                    self._taps[m][b][slots] = np.clip(np.rint(x / scale[:, None]), -127, 127).astype(np.int8)
                    self._scales[m][b][slots] = scale
        self._present[slots] = present
        self._labels[slots] = labels
        self._tasks[slots] = task
        self._stamps[slots] = stamps

    def add(self, taps: dict[str, list[np.ndarray]], present: np.ndarray, label: int, task: int,
            stamp_ns: int = 0) -> None:
        """Offer one sample (each tap a (dim,) or (1, dim) vector); it may be stored, replace one, or be dropped."""
        if self.schema is None:
            self._allocate({m: [int(np.asarray(x).reshape(-1).shape[0]) for x in levels] for m, levels in taps.items()})
        assert self.schema is not None
        if list(taps) != list(self.schema):
            raise ValueError(f"taps name modalities {list(taps)}, the buffer stores {list(self.schema)} in that order")
        present = np.asarray(present, bool).reshape(-1)
        if present.shape[0] != len(self.schema):
            raise ValueError(f"present has {present.shape[0]} entries, expected {len(self.schema)}")
        label = int(label)
        self.seen[label] = self.seen.get(label, 0) + 1
        one = {m: [np.asarray(x).reshape(1, -1) for x in lv] for m, lv in taps.items()}
        if self._n < self.capacity:
            self._write(np.array([self._n]), one, present[None], labels=np.array([label]), task=task,
                        stamps=np.array([stamp_ns]))
            self._n += 1
            return
        labels = self._labels[: self._n]
        classes, counts = np.unique(labels, return_counts=True)
        largest = classes[counts == counts.max()]
        if label not in largest:
            victim_class = int(self._rng.choice(largest))
            slot = int(self._rng.choice(np.flatnonzero(labels == victim_class)))
        else:
            own = np.flatnonzero(labels == label)
            if self._rng.random() >= len(own) / self.seen[label]:
                return
            slot = int(self._rng.choice(own))
        self._write(np.array([slot]), one, present[None], labels=np.array([label]), task=task,
                    stamps=np.array([stamp_ns]))

    def add_batch(self, taps: dict[str, list[np.ndarray]], present: np.ndarray, labels: np.ndarray, task: int,
                  stamps: np.ndarray | None = None) -> None:
        """``add`` for each row of (N, dim) tap arrays, in order (rows that fit in free slots in one write)."""
        labels = np.asarray(labels, np.int64).reshape(-1)
        n = len(labels)
        present = np.asarray(present, bool).reshape(n, -1)
        stamps = np.zeros(n, np.int64) if stamps is None else np.asarray(stamps, np.int64)
        start = 0
        if n and self.schema is None:
            self.add({m: [x[0] for x in lv] for m, lv in taps.items()}, present[0], int(labels[0]), task, int(stamps[0]))
            start = 1
        if self.schema is not None and n > start and list(taps) == list(self.schema):
            free = min(self.capacity - self._n, n - start)
            if free > 0:
                rows = slice(start, start + free)
                self._write(np.arange(self._n, self._n + free), {m: [x[rows] for x in lv] for m, lv in taps.items()},
                            present[rows], labels=labels[rows], task=task, stamps=stamps[rows])
                for y in labels[rows]:
                    self.seen[int(y)] = self.seen.get(int(y), 0) + 1
                self._n += free
                start += free
        for i in range(start, n):
            self.add({m: [x[i] for x in lv] for m, lv in taps.items()}, present[i], int(labels[i]), task, int(stamps[i]))

    # ---- reading ------------------------------------------------------------------------------
    def _gather(self, idx: np.ndarray) -> ReplayBatch:
        assert self.schema is not None
        taps = {}
        for m, dims in self.schema.items():
            levels = []
            for b in range(len(dims)):
                x = self._taps[m][b][idx].astype(np.float32)
                if self.dtype == "int8":
                    x *= self._scales[m][b][idx, None]
                levels.append(x)
            taps[m] = levels
        return ReplayBatch(taps=taps, present=self._present[idx].copy(), labels=self._labels[idx].copy(),
                           tasks=self._tasks[idx].astype(np.int64), stamps=self._stamps[idx].copy())

    def sample(self, n: int, rng: np.random.Generator | None = None) -> ReplayBatch:
        """``min(n, len)`` distinct stored samples, uniformly (dequantised to float32)."""
        if self._n == 0 or self.schema is None:
            raise ReplayBufferError("cannot sample from an empty replay buffer")
        rng = rng if rng is not None else self._rng
        idx = np.sort(rng.choice(self._n, size=min(n, self._n), replace=False))
        return self._gather(idx)

    def all(self) -> ReplayBatch:
        """Every stored sample, in slot order."""
        if self.schema is None:
            raise ReplayBufferError("the replay buffer is empty")
        return self._gather(np.arange(self._n))

    # ---- persistence --------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Persist crash-safely (see module docstring); returns the manifest path."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        old = self._read_manifest(d) if (d / MANIFEST).exists() else None
        gen = int(old["generation"]) + 1 if old else 0
        segments = []
        for start in range(0, self._n, SEGMENT):
            idx = np.arange(start, min(start + SEGMENT, self._n))
            arrays: dict[str, np.ndarray] = {"labels": self._labels[idx], "tasks": self._tasks[idx],
                                             "stamps": self._stamps[idx], "present": self._present[idx]}
            for m, dims in (self.schema or {}).items():
                for b in range(len(dims)):
                    arrays[f"tap__{m}__{b}"] = self._taps[m][b][idx]
                    if self.dtype == "int8":
                        arrays[f"scale__{m}__{b}"] = self._scales[m][b][idx]
            bio = io.BytesIO()
            np.savez(bio, **arrays)
            data = bio.getvalue()
            name = f"seg-{gen:06d}-{start // SEGMENT:05d}.npz"
            atomic_write(d / name, data)
            segments.append({"file": name, "samples": len(idx), "bytes": len(data),
                             "sha256": hashlib.sha256(data).hexdigest()})
        manifest = {"format": MANIFEST_FORMAT, "generation": gen, "dtype": self.dtype,
                    "max_samples": self.max_samples, "max_bytes": self.max_bytes, "schema": self.schema,
                    "samples": self._n, "seen": {str(k): v for k, v in self.seen.items()},
                    "rng": self._rng.bit_generator.state, "segments": segments}
        fault_point("buffer.segments_written")
        atomic_write(d / MANIFEST, seal(manifest))
        fsync_dir(d)
        fault_point("buffer.manifest_replaced")
        keep = {s["file"] for s in segments}
        for f in d.glob("seg-*.npz"):
            if f.name not in keep:
                f.unlink(missing_ok=True)
        return d / MANIFEST

    @staticmethod
    def _read_manifest(d: Path) -> dict[str, Any]:
        path = d / MANIFEST
        try:
            m, sealed = unseal(path.read_bytes(), str(path))
        except FileNotFoundError:
            raise BufferCorruptError(f"no replay buffer at {d}: {path} does not exist") from None
        except OSError as exc:
            raise BufferCorruptError(f"cannot read {path}: {exc}") from None
        except ValueError as exc:
            raise BufferCorruptError(str(exc)) from None
        fmt = m.get("format")
        if (sealed and fmt != MANIFEST_FORMAT) or (not sealed and fmt != 1) or not isinstance(m.get("segments"), list):
            raise BufferCorruptError(f"{path} is not a format-{MANIFEST_FORMAT} replay buffer manifest "
                                     f"(format {fmt!r}, {'sealed' if sealed else 'unsealed'})")
        if not sealed:
            log.warning("%s: format-1 manifest without its own checksum (written before manifests were sealed); "
                        "its segments are verified, its counts cannot be; the next save seals it", path)
        bad = [s.get("file") for s in m["segments"]
               if not isinstance(s, dict) or not isinstance(s.get("file"), str) or "/" in s["file"]
               or not s["file"].startswith("seg-")]
        if bad:
            raise BufferCorruptError(f"{path} lists bad segment names {bad}")
        return m

    @classmethod
    def load(cls, directory: str | Path, seed: int = 0) -> ReplayBuffer:
        """Reload a saved buffer; corrupt or missing segments are skipped and reported in ``load_report``."""
        d = Path(directory)
        m = cls._read_manifest(d)
        try:
            buf = cls(max_samples=m["max_samples"], max_bytes=m["max_bytes"], dtype=m["dtype"], seed=seed)
            buf.seen = {int(k): int(v) for k, v in m.get("seen", {}).items()}
            if m.get("rng") is not None:
                buf._rng.bit_generator.state = m["rng"]
        except (KeyError, TypeError, ValueError) as exc:
            raise BufferCorruptError(f"{d / MANIFEST}: bad field ({type(exc).__name__}: {exc})") from None
        report = LoadReport()
        buf.load_report = report
        if m["schema"] is None:
            return buf
        buf._allocate({k: list(v) for k, v in m["schema"].items()})
        for seg in m["segments"]:
            path = d / seg["file"]
            try:
                data = path.read_bytes()
                if hashlib.sha256(data).hexdigest() != seg["sha256"]:
                    raise ValueError("sha256 mismatch")
                with np.load(io.BytesIO(data), allow_pickle=False) as z:
                    arrays = {k: z[k] for k in z.files}
                n = len(arrays["labels"])
                if n != seg["samples"] or buf._n + n > buf.capacity:
                    raise ValueError(f"{n} samples, manifest says {seg['samples']}")
            except (OSError, ValueError, KeyError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
                log.warning("replay buffer %s: skipping segment %s (%s)", d, seg["file"], reason)
                report.skipped.append((seg["file"], reason))
                report.samples_lost += int(seg["samples"])
                continue
            sl = slice(buf._n, buf._n + n)
            buf._labels[sl], buf._tasks[sl] = arrays["labels"], arrays["tasks"]
            buf._stamps[sl], buf._present[sl] = arrays["stamps"], arrays["present"]
            for mod, dims in buf.schema.items():
                for b in range(len(dims)):
                    buf._taps[mod][b][sl] = arrays[f"tap__{mod}__{b}"]
                    if buf.dtype == "int8":
                        buf._scales[mod][b][sl] = arrays[f"scale__{mod}__{b}"]
            buf._n += n
            report.segments_ok += 1
        return buf

    # ---- state for checkpoints ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The exact stored content (quantised arrays, not dequantised copies) and the reservoir
        counters, as plain values and numpy arrays: a checkpoint that holds it restores the
        buffer bit for bit, atomically with the model it belongs to."""
        n = self._n
        state: dict[str, Any] = {"format": FORMAT, "max_samples": self.max_samples, "max_bytes": self.max_bytes,
                                 "dtype": self.dtype, "schema": self.schema, "samples": n,
                                 "seen": {str(k): int(v) for k, v in self.seen.items()},
                                 "rng": self._rng.bit_generator.state}
        if self.schema is not None:
            state.update(labels=self._labels[:n].copy(), tasks=self._tasks[:n].copy(), stamps=self._stamps[:n].copy(),
                         present=self._present[:n].copy(),
                         taps={m: [x[:n].copy() for x in lv] for m, lv in self._taps.items()},
                         scales={m: [x[:n].copy() for x in lv] for m, lv in self._scales.items()})
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], seed: int = 0) -> ReplayBuffer:
        if state.get("format") != FORMAT:
            raise BufferCorruptError(f"replay buffer state format {state.get('format')!r}, expected {FORMAT}")
        buf = cls(max_samples=state["max_samples"], max_bytes=state["max_bytes"], dtype=state["dtype"], seed=seed)
        buf.seen = {int(k): int(v) for k, v in state.get("seen", {}).items()}
        if state.get("rng") is not None:  # older states have none: the generator starts from ``seed``
            try:
                buf._rng.bit_generator.state = state["rng"]
            except (TypeError, ValueError, KeyError) as exc:
                raise BufferCorruptError(f"replay buffer state has a bad rng state ({exc})") from None
        if state.get("schema") is None:
            return buf
        buf._allocate({m: list(d) for m, d in state["schema"].items()})
        n = int(state["samples"])
        if n > buf.capacity:
            raise BufferCorruptError(f"replay buffer state holds {n} samples, capacity is {buf.capacity}")
        buf._labels[:n], buf._tasks[:n], buf._stamps[:n] = state["labels"], state["tasks"], state["stamps"]
        buf._present[:n] = state["present"]
        for m, dims in buf.schema.items():
            for b in range(len(dims)):
                buf._taps[m][b][:n] = state["taps"][m][b]
                buf._scales[m][b][:n] = state["scales"][m][b]
        buf._n = n
        return buf

    def __repr__(self) -> str:
        return (f"ReplayBuffer({self._n}/{self.capacity} samples, {self.nbytes} B of {self.max_bytes}, "
                f"{self.dtype}, classes={self.class_counts()})")
