"""Durability helpers beside :mod:`common.atomic`: sealed JSON manifests and named fault points.

Sealed manifests. A checksummed manifest guards the files it lists, but a manifest is itself a
file that every load opens: a flipped byte in its metadata (a version, a sample count, a dtype)
would be loaded as if it were true. ``seal`` stores the sha256 of the manifest's own content
(canonical JSON, the digest key left out) in the manifest, and ``unseal`` refuses a manifest
whose content does not match it. A manifest without the key is *unsealed* (written before
manifests were sealed); the caller decides whether its format may be loaded that way.

Fault points. Crash tests need to kill a process at a precise step of a save (after the temp
files, between the state and the buffer, after the rename...), not at a random moment that
lands there by chance. Each such step calls ``fault_point(name)``; with the environment
variable ``CONTINUA_FAULT_AT=<name>[:<n>]`` set, the process SIGKILLs itself the ``n``-th time
(default: the first) it reaches that point, exactly like a power cut: no cleanup, no flush, no
``finally``. Unset (production), ``fault_point`` returns at once: the variable is read once, at
import, so the cost is one comparison.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sys
from typing import Any

log = logging.getLogger(__name__)

SEAL_KEY = "manifest_sha256"
FAULT_ENV = "CONTINUA_FAULT_AT"

# Every fault point of the code base, in the order a save reaches them (kept here so that a test
# or a kill loop can cycle through all of them and a typo in FAULT_ENV is reported).
CHECKPOINT_POINTS = (
    "checkpoint.between_entries",  # the first entry's files (the learner state) written, the buffer's not yet
    "checkpoint.before_rename",  # temp dir complete and fsynced, not renamed into place
    "checkpoint.after_rename",  # renamed into place (committed), LATEST not yet updated
    "checkpoint.after_latest",  # LATEST updated, older checkpoints not yet pruned
)
BUFFER_POINTS = (
    "buffer.segments_written",  # the new generation's segments written, manifest not yet replaced
    "buffer.manifest_replaced",  # the new manifest in place, the old generation's segments not yet deleted
)
LEARNER_POINTS = (
    "learner.between_state_and_buffer",  # learner state files written in the temp dir, buffer files not yet
    "learner.before_rename",  # temp dir complete and fsynced, not renamed into place
    "learner.after_rename",  # renamed into place (committed), older generations not yet pruned
)
FAULT_POINTS = CHECKPOINT_POINTS + BUFFER_POINTS + LEARNER_POINTS


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True).encode()


def seal(manifest: dict[str, Any], *, indent: int | None = 1) -> bytes:
    """The manifest as JSON bytes with the sha256 of its own canonical content under ``SEAL_KEY``.

    The content is normalised through JSON first (tuples -> lists, int keys -> str), so that the
    digest a reader recomputes from the parsed file is the one written here."""
    body = json.loads(json.dumps({k: v for k, v in manifest.items() if k != SEAL_KEY}, allow_nan=True))
    body[SEAL_KEY] = hashlib.sha256(_canonical(body)).hexdigest()
    return json.dumps(body, indent=indent, allow_nan=True).encode()


def unseal(data: bytes, where: str = "manifest") -> tuple[dict[str, Any], bool]:
    """(manifest without the seal, sealed?) from JSON bytes; ``ValueError`` naming ``where`` when
    the bytes are not a JSON object or the seal does not match the content."""
    try:
        m = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(m, dict):
        raise ValueError(f"{where}: not a JSON object")
    digest = m.pop(SEAL_KEY, None)
    if digest is None:
        return m, False
    if not isinstance(digest, str) or hashlib.sha256(_canonical(m)).hexdigest() != digest:
        raise ValueError(f"{where}: sha256 mismatch (the manifest's own checksum: corrupt or edited)")
    return m, True


def _parse(spec: str | None) -> tuple[str, int] | None:
    if not spec:
        return None
    name, _, nth = spec.partition(":")
    try:
        n = int(nth) if nth else 1
    except ValueError:
        n = 0
    if name not in FAULT_POINTS or n < 1:
        log.error("%s=%r names no fault point (known: %s, optionally :N for the N-th hit); ignored",
                  FAULT_ENV, spec, ", ".join(FAULT_POINTS))
        return None
    return name, n


_ARMED = _parse(os.environ.get(FAULT_ENV))
_hits = 0


def fault_point(name: str) -> None:
    """SIGKILL this process here when ``CONTINUA_FAULT_AT`` names this point (test hook, see module doc)."""
    global _hits
    if _ARMED is None or _ARMED[0] != name:
        return
    _hits += 1
    if _hits < _ARMED[1]:
        return
    sys.stderr.write(f"continua fault point {name} reached (hit {_hits}): SIGKILL\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
