"""Skill packages: what one robot learned for one task, as one signed, versioned file.

Why a package and not a model: robots of a fleet learn different tasks from the same frozen
backbones, but each robot's side network went its own way, so a peer's weights cannot simply
be averaged in. What travels is what another learner can consolidate from:

- a bounded set of *latent* exemplars of the task's classes (backbone taps, int8 with one scale
  per vector, the replay buffer's own layout; never camera frames or audio);
- the sender's soft targets on those exemplars (its logits over the task's classes: the
  receiver distils from them), the head rows and nearest-mean class prototypes the task
  produced, and the Fisher diagonals of those rows (the sender's importance of what it learned);
- the class names, the backbone fingerprints and the tap layout the taps come from.

File layout (format 1)::

    b"CSKILL1\\n" | uint32 big-endian header length | header (UTF-8 JSON) | payload (npz, no pickle)

The header names the payload's SHA-256 and size, and its ``signature`` is an HMAC-SHA256 with
the fleet's shared key over the canonical JSON of every other header field (``key_id``, the
first 16 hex digits of the key's SHA-256, says which key signed it). So a flipped byte in the
payload fails the checksum, a changed header field fails the signature, and a package of
another fleet is refused as "signed with key X, this fleet's key is Y" without guessing.
``read_header`` and ``sign`` are torch-free (the agent and the fleet server call them);
``build`` takes a learner and runs in the learning worker, which never sees the key.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import secrets
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import atomic_write

MAGIC = b"CSKILL1\n"
FORMAT = 1
MAX_HEADER = 1 << 20
DEFAULT_MAX_BYTES = 1_000_000  # the fleet's per-task budget (issue 15: <= 1 MB)
KEY_BYTES = 32


class SkillRefused(ValueError):
    """A package that must not be imported; ``reason`` says why in one line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ---- keys ------------------------------------------------------------------------------------
def new_key(path: str | Path, *, force: bool = False) -> Path:
    """A fresh fleet key (32 random bytes, hex), written 0600. Every robot and the server get a copy."""
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; a new fleet key locks every robot out (use --force)")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (secrets.token_hex(KEY_BYTES) + "\n").encode(), mode=0o600)
    return path


def load_key(path: str | Path) -> bytes:
    """The fleet key from ``path``; SkillRefused-free errors: ``ValueError`` naming the problem."""
    path = Path(path)
    try:
        st = path.stat()
        text = path.read_text().strip()
    except OSError as exc:
        raise ValueError(f"cannot read the fleet key {path}: {exc.strerror or exc}; "
                         "create one with `python -m runtime.fleet keygen --out PATH`") from None
    if os.name == "posix" and st.st_mode & 0o077:
        raise ValueError(f"the fleet key {path} is readable by others (mode {st.st_mode & 0o777:o}); chmod 600 it")
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"the fleet key {path} is not hex") from None
    if len(key) < 16:
        raise ValueError(f"the fleet key {path} has {len(key)} bytes; at least 16 are needed")
    return key


def key_id(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:16]


# ---- the file --------------------------------------------------------------------------------
def _canonical(header: dict[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in header.items() if k != "signature"}, sort_keys=True,
                      separators=(",", ":")).encode()


def skill_id(data: bytes) -> str:
    """Content address of a package file (the fleet names packages by it)."""
    return hashlib.sha256(data).hexdigest()[:32]


def sign(header: dict[str, Any], payload: bytes, key: bytes) -> bytes:
    """The package file: ``header`` completed with format, checksum, key id and signature."""
    h = {**header, "format": FORMAT, "payload_sha256": hashlib.sha256(payload).hexdigest(),
         "payload_bytes": len(payload), "key_id": key_id(key)}
    h["signature"] = hmac.new(key, _canonical(h), hashlib.sha256).hexdigest()
    raw = json.dumps(h, sort_keys=True).encode()
    return MAGIC + struct.pack(">I", len(raw)) + raw + payload


def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    if not data.startswith(MAGIC):
        raise SkillRefused("not a continua skill package (bad magic)")
    if len(data) < len(MAGIC) + 4:
        raise SkillRefused("truncated skill package (no header length)")
    (n,) = struct.unpack(">I", data[len(MAGIC):len(MAGIC) + 4])
    start = len(MAGIC) + 4
    if n > MAX_HEADER or start + n > len(data):
        raise SkillRefused(f"truncated or corrupt skill package (header of {n} bytes, file of {len(data)})")
    try:
        header = json.loads(data[start:start + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SkillRefused(f"corrupt skill package header ({exc})") from None
    if not isinstance(header, dict):
        raise SkillRefused("corrupt skill package header (not an object)")
    return header, data[start + n:]


def read_header(data: bytes, key: bytes | None) -> dict[str, Any]:
    """The verified header: format, checksum and (with ``key``) signature. SkillRefused otherwise."""
    header, payload = _split(data)
    if header.get("format") != FORMAT:
        raise SkillRefused(f"skill package format {header.get('format')!r}; this continua reads {FORMAT}")
    if header.get("payload_bytes") != len(payload) or \
            header.get("payload_sha256") != hashlib.sha256(payload).hexdigest():
        raise SkillRefused("checksum mismatch: the payload was changed or truncated after signing")
    if key is not None:
        if header.get("key_id") != key_id(key):
            raise SkillRefused(f"signed with another fleet's key ({header.get('key_id')}); "
                               f"this fleet's key is {key_id(key)}")
        want = hmac.new(key, _canonical(header), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(str(header.get("signature", "")), want):
            raise SkillRefused("bad signature: the header was changed after signing")
    for k in ("task", "labels", "fingerprints", "tap_dims", "modalities", "stored_dims"):
        if k not in header:
            raise SkillRefused(f"skill package header lacks {k!r}")
    return header


def payload_arrays(data: bytes) -> dict[str, np.ndarray]:
    """The payload's arrays (call ``read_header`` first: this checks nothing but the npz)."""
    _, payload = _split(data)
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError) as exc:
        raise SkillRefused(f"corrupt skill payload ({exc})") from None


def check_compatible(header: dict[str, Any], *, fingerprints: dict[str, str], tap_dims: dict[str, list[int]],
                     known_labels: dict[str, str]) -> None:
    """SkillRefused unless the package fits this robot: same backbones, same taps, no label it
    already has (``known_labels``: label -> the task that owns it)."""
    theirs = header["fingerprints"]
    if theirs != fingerprints:
        diff = sorted(m for m in set(theirs) | set(fingerprints) if theirs.get(m) != fingerprints.get(m))
        raise SkillRefused(f"backbone mismatch on {diff}: the package's fingerprints {theirs} differ from this "
                           f"robot's {fingerprints}; both must run the same exported models")
    if {m: list(d) for m, d in header["tap_dims"].items()} != {m: list(d) for m, d in tap_dims.items()}:
        raise SkillRefused(f"tap layout {header['tap_dims']} differs from this robot's {tap_dims}")
    if {m: list(d) for m, d in header["stored_dims"].items()} != {m: list(d) for m, d in header["tap_dims"].items()}:
        raise SkillRefused(f"the package stores pooled taps {header['stored_dims']} (a replay_sample_bytes layout); "
                           "import needs full-width taps: export from a learner without tap pooling")
    clash = {lab: known_labels[lab] for lab in header["labels"] if lab in known_labels}
    if clash:
        raise SkillRefused(f"class names clash: {sorted(clash)} already learned here (task(s) "
                           f"{sorted(set(clash.values()))}); rename the task's labels on the sender")


def verify(data: bytes, key: bytes, *, fingerprints: dict[str, str], tap_dims: dict[str, list[int]],
           tasks: list[dict[str, Any]]) -> dict[str, Any]:
    """``read_header`` and ``check_compatible`` against a robot's learned ``tasks`` (name, labels):
    the verified header, or SkillRefused. What the agent and the fleet benchmark both run."""
    header = read_header(data, key)
    check_compatible(header, fingerprints=fingerprints, tap_dims=tap_dims,
                     known_labels={lab: t["name"] for t in tasks for lab in t["labels"]})
    return header


# ---- building and reading the content (learning worker) -------------------------------------
@dataclass
class Exemplars:
    """Dequantised exemplars: taps per modality, presence, label names, sender's logits (N, k)."""

    taps: dict[str, list[np.ndarray]]
    present: np.ndarray
    names: list[str]
    soft: np.ndarray


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def build(learner: Any, *, task: str, labels: list[str], fingerprints: dict[str, str], origin: str,
          max_bytes: int = DEFAULT_MAX_BYTES, seed: int = 0, dtype: str = "int8") -> tuple[dict[str, Any], bytes]:
    """The (unsigned header, payload) of ``labels`` (one task) from a learner: exemplars from its
    replay buffer (class-balanced, as many as ``max_bytes`` leaves room for), its soft targets on
    them, the head rows, class prototypes and head Fisher of those classes. ``sign`` makes the
    file: the worker that builds never holds the fleet key, the agent signs. ValueError if the
    buffer holds no sample of a label."""
    import torch

    from training.buffer import ReplayBuffer, stored_sample_bytes

    idx = [learner.class_names.index(lab) for lab in labels if lab in learner.class_names]
    if len(idx) != len(labels):
        raise ValueError(f"labels {sorted(set(labels) - set(learner.class_names))} are not learned here")
    rb = learner.buffer.all() if learner.buffer is not None else None
    keep = np.isin(rb.labels, idx) if rb is not None else np.zeros(0, bool)
    missing = [lab for lab, i in zip(labels, idx, strict=True) if rb is None or not (rb.labels[keep] == i).any()]
    if missing:
        raise ValueError(f"the replay buffer holds no sample of {missing}: nothing to share for task {task!r}")
    taps = {m: [x[keep] for x in lv] for m, lv in rb.taps.items()}
    present, lab = rb.present[keep], rb.labels[keep]
    # the fixed part first, then as many exemplars as fit (one sample's stored bytes + its soft row)
    state = learner.model.state_dict()
    head_w, head_b = state["head.weight"][idx].float().numpy(), state["head.bias"][idx].float().numpy()
    fixed: dict[str, np.ndarray] = {"head_weight": head_w, "head_bias": head_b}
    extra = learner.strategy.extra_state()
    means = extra.get("class_means")
    if means is not None and len(means) > max(idx):
        fixed["class_means"] = np.asarray(torch.as_tensor(means)[idx].float().numpy())
    fisher = (extra.get("ewc") or {}).get("fisher") if isinstance(extra.get("ewc"), dict) else None
    if fisher and "head.weight" in fisher and len(fisher["head.weight"]) > max(idx):
        fixed["fisher_head_weight"] = torch.as_tensor(fisher["head.weight"])[idx].float().numpy().astype(np.float16)
        fixed["fisher_head_bias"] = torch.as_tensor(fisher["head.bias"])[idx].float().numpy().astype(np.float16)
    schema = {m: [x.shape[1] for x in lv] for m, lv in taps.items()}
    room = max_bytes - len(_npz(fixed)) - 4096  # the header and npz overhead
    order = np.random.default_rng(seed).permutation(len(lab))
    learner.model.eval()

    def pack(n: int) -> tuple[bytes, dict[str, Any]]:
        sub = ReplayBuffer(max_samples=n, max_bytes=n * stored_sample_bytes(schema, dtype) + 1, dtype=dtype, seed=seed)
        sub.add_batch({m: [x[order] for x in lv] for m, lv in taps.items()}, present[order], lab[order], 0,
                      np.zeros(len(lab), np.int64))  # class-balanced: the reservoir's own rule
        st = sub.state_dict()
        ex = sub.all()
        with torch.no_grad():  # the head's own logits: a strategy's predict may be a saturated log-prob mix
            logits = learner.model({m: [torch.from_numpy(x) for x in lv] for m, lv in ex.taps.items()},
                                   torch.from_numpy(ex.present)).logits.float()
        arrays = {**fixed, "present": st["present"],
                  "labels": np.asarray([idx.index(int(v)) for v in st["labels"]], np.int16),
                  "soft": logits[:, idx].numpy().astype(np.float16)}
        for m, lv in st["taps"].items():
            for b, x in enumerate(lv):
                arrays[f"tap__{m}__{b}"] = x
                arrays[f"scale__{m}__{b}"] = st["scales"][m][b].astype(np.float32)
        return _npz(arrays), st

    # The budget is on the compressed file: start from what fits uncompressed, then scale by the
    # measured compression (taps of ReLU features compress ~2x) until the next step would not fit.
    n = min(len(lab), room // (stored_sample_bytes(schema, dtype) + 2 * len(idx)))
    if n < len(idx):
        raise ValueError(f"max_bytes={max_bytes} leaves room for {max(n, 0)} exemplars, fewer than the "
                         f"{len(idx)} classes of task {task!r}")
    payload, st = pack(n)
    for _ in range(4):
        grow = min(len(lab), int(n * room / max(len(payload), 1) * 0.97))
        if grow <= n:
            break
        bigger = pack(grow)
        if len(bigger[0]) > room:
            break
        n, (payload, st) = grow, bigger
    header = {"task": task, "labels": list(labels), "origin": origin, "created_s": round(time.time(), 3),
              "fingerprints": dict(fingerprints), "tap_dims": {m: list(d) for m, d in learner.tap_dims.items()},
              "modalities": list(schema), "stored_dims": schema, "dtype": dtype, "exemplars": int(len(st["labels"])),
              "per_class": {lab_: int((st["labels"] == i).sum()) for lab_, i in zip(labels, idx, strict=True)},
              "strategy": learner.config.strategy}
    return header, payload


def exemplars(data: bytes, header: dict[str, Any]) -> Exemplars:
    """The package's exemplars, dequantised to float32 (``header``: ``read_header``'s)."""
    arrays = payload_arrays(data)
    try:
        present = np.asarray(arrays["present"], bool)
        labels = np.asarray(arrays["labels"], np.int64)
        q = header.get("dtype", "int8") == "int8"  # float16 taps carry no scale
        taps = {m: [arrays[f"tap__{m}__{b}"].astype(np.float32) * (arrays[f"scale__{m}__{b}"][:, None] if q else 1.0)
                    for b in range(len(header["stored_dims"][m]))] for m in header["modalities"]}
        soft = np.asarray(arrays["soft"], np.float32)
    except KeyError as exc:
        raise SkillRefused(f"skill payload lacks {exc.args[0]!r}") from None
    n = len(labels)
    if present.shape != (n, len(taps)) or soft.shape != (n, len(header["labels"])) or \
            any(x.shape[0] != n for lv in taps.values() for x in lv) or (n and labels.max() >= len(header["labels"])):
        raise SkillRefused("skill payload arrays disagree on the number of exemplars or classes")
    if not np.isfinite(soft).all() or any(not np.isfinite(x).all() for lv in taps.values() for x in lv):
        raise SkillRefused("skill payload holds non-finite values")
    return Exemplars(taps=taps, present=present, names=[header["labels"][i] for i in labels], soft=soft)
