"""Prepare the offline demo data into ``data/`` (``$CONTINUA_DATA``): run by ``make data``.

Usage::

    python -m demodata.prepare                  # everything; < 2 s when cached
    python -m demodata.prepare --only speech --force --voices 8

Sources, all offline (DESIGN.md section 9):

- ``fashion_mnist``: Debian ``dataset-fashion-mnist`` (idx gz files; MIT, Zalando SE 2017)
- ``digits``: scikit-learn ``load_digits`` (1,797 real 8x8 digits, 0..16 scaled to 0..255)
- ``basic_motions``: sktime ``load_basic_motions`` (UEA archive; smartwatch acc + gyro)
- ``speech``: the ten Fashion-MNIST class names and the ten digit names spoken by espeak-ng (8 English accents x 8
  timbre variants) and flite (5 voices), converted with sox to 16 kHz mono s16, each word
  in 4 versions (``clean``, ``noise``, ``reverb+noise``, ``tempo+pitch``), trimmed, gain
  normalised, centred in exactly 1 s. Every clip records ``engine:voice`` so that
  evaluation can leave voices out (``store.voice_split``). Synthesis is deterministic
  (seeded speed/pitch/augmentation per clip, ``sox -R``).

Each dataset is written atomically (temp file, fsync, rename) as ``<name>.npz``; the
manifest records sha256, sizes, array specs, the build key (builder version, parameters,
source package versions) and the source licences. A dataset whose file and key match the
manifest is skipped (a cached run hashes the files and returns); a corrupt or stale one is
rebuilt. Concurrent runs serialise on ``data/.prepare.lock``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import atomic_write
from demodata.store import DATASETS, MANIFEST, data_dir, file_sha256, voice_split

log = logging.getLogger("continua.demodata.prepare")

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
# fmt: off
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# word c is class c: the ten Fashion-MNIST names (labels 0..9), then the ten digit names (labels 10..19) so that
# the scenarios pairing sklearn digits (benchmarks.hard_scenarios "long") give every class its own word
WORDS = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
         "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MOTIONS = ("standing", "walking", "running", "badminton")  # label order: increasing intensity

ESPEAK_ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp",
                  "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029", "en-us-nyc")
# timbres; store.TEST_ESPEAK_VARIANTS are held out for test
ESPEAK_VARIANTS = ("m1", "m2", "m3", "m5", "m7", "f1", "f2", "f4")
FLITE_VOICES = ("kal", "kal16", "awb", "rms", "slt")  # built-in; awb_time only speaks times of day
# fmt: on
AUGS = ("clean", "noise", "reverb+noise", "tempo+pitch")
RATE = 16000
CLIP = 16000  # exactly 1 s
FIT = 15200  # a word longer than this after trimming is tempo-compressed to it

LICENCES = {
    "fashion_mnist": "MIT (Expat), Copyright 2017 Zalando SE (/usr/share/doc/dataset-fashion-mnist/copyright)",
    "digits": "scikit-learn is BSD-3-Clause; the data is the UCI 'Optical Recognition of Handwritten Digits' "
    "test set (E. Alpaydin, C. Kaynak 1998; UCI lists CC BY 4.0, the installed descr text names no licence)",
    "basic_motions": "shipped inside sktime (BSD-3-Clause); data from the UEA/UCR time series classification "
    "archive (timeseriesclassification.com, BasicMotions); the .ts file carries no separate licence text",
    "speech": "synthesised here; the generated audio is ours (program output is not covered by the engine "
    "licences). Tools: espeak-ng GPL-3.0-or-later, flite BSD-style CMU licence (+ parts under other "
    "permissive licences, /usr/share/doc/flite/copyright), sox GPL-2.0-or-later / LGPL",
}

ORIGINS = {
    "fashion_mnist": f"Debian package dataset-fashion-mnist, {FASHION_DIR}/*-idx?-ubyte.gz",
    "digits": "scikit-learn sklearn.datasets.load_digits()",
    "basic_motions": "sktime sktime.datasets.load_basic_motions(split=train|test, return_type='numpy3D')",
    "speech": "espeak-ng -w / flite -o, then sox -R -D to 16 kHz mono s16 with augmentation effects",
}

# bump when a builder's output changes for the same sources
BUILDER_VERSION = {"fashion_mnist": 1, "digits": 1, "basic_motions": 1, "speech": 2}  # speech 2: 20 words
# the per-clip synthesis seed keeps version 1, so words 0..9 sound exactly as they did with 10 words
SPEECH_SEED_VERSION = 1


# --------------------------------------------------------------------------- sources
def _dpkg_version(pkg: str) -> str | None:
    if not shutil.which("dpkg-query"):
        return None
    r = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True, check=False
    )
    if r.returncode != 0:
        return None
    return r.stdout.strip() or None


def _py_version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


SOURCES: dict[str, Callable[[], dict[str, str | None]]] = {
    "fashion_mnist": lambda: {"deb:dataset-fashion-mnist": _dpkg_version("dataset-fashion-mnist")},
    "digits": lambda: {"py:scikit-learn": _py_version("scikit-learn")},
    "basic_motions": lambda: {"py:sktime": _py_version("sktime")},
    "speech": lambda: {f"deb:{p}": _dpkg_version(p) for p in ("espeak-ng", "flite", "sox")},
}


@dataclass(kw_only=True)
class Options:
    voices: int | None = None  # speech: only the first N voices (tests); None = all
    jobs: int = 2

    def params(self, name: str) -> dict[str, Any]:
        return {"voices": self.voices} if name == "speech" else {}


def _key(name: str, opts: Options) -> dict[str, Any]:
    return {"builder": BUILDER_VERSION[name], "params": opts.params(name), "sources": SOURCES[name]()}


def _key_matches(old: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    """Same builder and params; a source we cannot see now (tool missing) counts as unchanged."""
    if not old or old.get("builder") != new["builder"] or old.get("params") != new["params"]:
        return False
    old_src = old.get("sources", {})
    return all(v is None or old_src.get(k) == v for k, v in new["sources"].items())


# --------------------------------------------------------------------------- builders
def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = raw[0:2], raw[2], raw[3]
    if zero != b"\0\0" or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: {data.size} values, header says {dims}")
    return data.reshape(dims)


def build_fashion_mnist(opts: Options) -> dict[str, np.ndarray]:
    if not FASHION_DIR.is_dir():
        raise FileNotFoundError(
            f"{FASHION_DIR} missing: install the Debian package dataset-fashion-mnist (make sysdeps)"
        )
    out: dict[str, np.ndarray] = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        out[f"x_{split}"] = _read_idx(FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz")
        out[f"y_{split}"] = _read_idx(FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    out["class_names"] = np.array(FASHION_CLASSES)
    return out


def build_digits(opts: Options) -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.round(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return {"x": x, "y": d.target.astype(np.int64)}


def build_basic_motions(opts: Options) -> dict[str, np.ndarray]:
    from sktime.datasets import load_basic_motions

    out: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        x, y = load_basic_motions(split=split, return_type="numpy3D")
        names = [str(s).lower() for s in y]
        unknown = sorted(set(names) - set(MOTIONS))
        if unknown:
            raise ValueError(f"BasicMotions labels {unknown} not in {MOTIONS}")
        out[f"x_{split}"] = np.ascontiguousarray(x, dtype=np.float32)
        out[f"y_{split}"] = np.array([MOTIONS.index(n) for n in names], dtype=np.int64)
    out["class_names"] = np.array(MOTIONS)
    return out


# --------------------------------------------------------------------------- speech
def speech_voices() -> list[str]:
    """All voices, ordered round-robin over (engine, split) so that any prefix mixes them."""
    esp = [f"espeak-ng:{a}+{v}" for v in ESPEAK_VARIANTS for a in ESPEAK_ACCENTS]
    fl = [f"flite:{v}" for v in FLITE_VOICES]
    groups = []
    for vs in (esp, fl):
        split = voice_split(vs)
        groups += [[v for v, s in zip(vs, split, strict=True) if s == want] for want in ("train", "test")]
    order: list[str] = []
    while any(groups):
        for g in groups:
            if g:
                order.append(g.pop(0))
    return order


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "little")


def _run(cmd: list[str], stdin: bytes | None = None) -> bytes:
    r = subprocess.run(cmd, input=stdin, capture_output=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.decode(errors='replace').strip()}"
        )
    return r.stdout


_RAW = ["-t", "raw", "-e", "signed", "-b", "16", "-c", "1", "-r", str(RATE), "-L"]


def _sox(src: str | None, effects: list[str], stdin: bytes | None = None) -> np.ndarray:
    """Run sox (repeatable, no dither) to 16 kHz mono s16; ``src=None`` reads raw from stdin."""
    inp = [src] if src else [*_RAW, "-"]
    out = _run(["sox", "-R", "-D", "-q", *inp, *_RAW, "-", *effects], stdin)
    return np.frombuffer(out, dtype="<i2").astype(np.float32)


def _trim(x: np.ndarray) -> np.ndarray:
    peak = float(np.abs(x).max()) if x.size else 0.0
    if peak < 1.0:
        raise RuntimeError("synthesiser produced silence")
    idx = np.flatnonzero(np.abs(x) > 0.02 * peak)
    margin = RATE * 30 // 1000
    return x[max(0, idx[0] - margin) : idx[-1] + margin]


def _finish(x: np.ndarray, aug: str, rng: np.random.Generator) -> np.ndarray:
    """Trim, fit into 1 s, normalise the peak, centre, add noise; -> int16 (CLIP,)."""
    x = _trim(x)
    if len(x) > FIT:
        x = _trim(_sox(None, ["tempo", "-s", f"{len(x) / FIT:.4f}"], x.astype("<i2").tobytes()))[:CLIP]
    x = x * (10 ** (rng.uniform(-12.0, -2.0) / 20) * 32767 / np.abs(x).max())
    out = np.zeros(CLIP, dtype=np.float64)
    start = (CLIP - len(x)) // 2
    out[start : start + len(x)] = x
    if "noise" in aug:  # white noise over the whole second, SNR 8..30 dB against the word
        rms = float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))
        out += rng.normal(0.0, rms / 10 ** (rng.uniform(8.0, 30.0) / 20), CLIP)
    return np.clip(np.round(out), -32768, 32767).astype(np.int16)


def synth_word(voice: str, word_index: int) -> list[tuple[str, np.ndarray]]:
    """One word by one voice in every augmentation: [(aug, int16 (16000,))]."""
    rng = np.random.default_rng(_seed("speech", SPEECH_SEED_VERSION, voice, word_index))
    engine, _, name = voice.partition(":")
    text = WORDS[word_index]
    with tempfile.TemporaryDirectory(prefix="continua-speech-") as tmp:
        wav = os.path.join(tmp, "w.wav")
        if engine == "espeak-ng":
            speed, pitch = int(rng.integers(135, 196)), int(rng.integers(25, 76))
            _run(["espeak-ng", "-v", name, "-s", str(speed), "-p", str(pitch), "-w", wav, text])
        else:
            stretch, f0 = rng.uniform(0.85, 1.2), rng.uniform(0.85, 1.15)
            base_f0 = 180.0 if name == "slt" else 105.0
            _run(
                [
                    "flite",
                    "-voice",
                    name,
                    "--setf",
                    f"duration_stretch={stretch:.3f}",
                    "--setf",
                    f"int_f0_target_mean={base_f0 * f0:.1f}",
                    "-t",
                    text,
                    "-o",
                    wav,
                ]
            )
        out = []
        for aug in AUGS:
            if aug == "reverb+noise":
                fx = f"pad 0 0.4 reverb {rng.uniform(20, 70):.0f} 50 {rng.uniform(30, 90):.0f}".split()
            elif aug == "tempo+pitch":
                fx = f"tempo -s {rng.uniform(0.85, 1.15):.3f} pitch {rng.uniform(-250, 250):.0f}".split()
            else:
                fx = []
            out.append((aug, _finish(_sox(wav, fx), aug, rng)))
    return out


def _synth_task(task: tuple[str, int]) -> tuple[str, int, list[tuple[str, np.ndarray]]]:
    return task[0], task[1], synth_word(*task)


def build_speech(opts: Options) -> dict[str, np.ndarray]:
    for tool in ("espeak-ng", "flite", "sox"):
        if not shutil.which(tool):
            raise FileNotFoundError(
                f"{tool} not found: install the Debian packages espeak-ng flite sox (make sysdeps)"
            )
    voices = speech_voices()[: opts.voices] if opts.voices else speech_voices()
    tasks = [(v, w) for v in voices for w in range(len(WORDS))]
    from multiprocessing import get_context

    from tqdm import tqdm

    results: dict[tuple[str, int], list[tuple[str, np.ndarray]]] = {}
    with get_context("fork").Pool(max(1, opts.jobs)) as pool:
        it = pool.imap_unordered(_synth_task, tasks, chunksize=4)
        bar = tqdm(
            it, total=len(tasks), desc="speech", unit="word", mininterval=0.5 if sys.stderr.isatty() else 5.0
        )
        for voice, w, clips in bar:
            results[(voice, w)] = clips
    rows = [(v, w, aug, pcm) for v, w in tasks for aug, pcm in results[(v, w)]]
    voice_arr = np.array([r[0] for r in rows])
    return {
        "audio": np.stack([r[3] for r in rows]),
        "y": np.array([r[1] for r in rows], dtype=np.int64),
        "voice": voice_arr,
        "aug": np.array([r[2] for r in rows]),
        "words": np.array(WORDS),
        "split": voice_split(voice_arr),
    }


BUILDERS: dict[str, Callable[[Options], dict[str, np.ndarray]]] = {
    "fashion_mnist": build_fashion_mnist,
    "digits": build_digits,
    "basic_motions": build_basic_motions,
    "speech": build_speech,
}


# --------------------------------------------------------------------------- writing
@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read_manifest(root: Path) -> dict[str, Any]:
    try:
        data = json.loads((root / MANIFEST).read_text())
        if isinstance(data, dict) and isinstance(data.get("datasets"), dict):
            return data
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        pass
    return {"format": 1, "datasets": {}}


def _write_manifest(root: Path, man: dict[str, Any]) -> None:
    atomic_write(root / MANIFEST, lambda f: f.write(json.dumps(man, indent=1, sort_keys=True).encode()))


def _is_cached(root: Path, entry: dict[str, Any] | None, key: dict[str, Any]) -> bool:
    if not entry or not _key_matches(entry.get("key"), key):
        return False
    path = root / entry["file"]
    try:
        if path.stat().st_size != entry["bytes"]:
            return False
    except FileNotFoundError:
        return False
    return file_sha256(path) == entry["sha256"]


def prepare(
    names: list[str] | None = None,
    *,
    force: bool = False,
    opts: Options | None = None,
    root: Path | None = None,
) -> dict[str, Any]:
    """Build the named datasets (default all) unless cached; returns the manifest."""
    opts = opts or Options()
    root = root or data_dir()
    names = list(names or DATASETS)
    for n in names:
        if n not in BUILDERS:
            raise ValueError(f"unknown dataset {n!r}; expected one of {list(DATASETS)}")
    with _locked(root):
        man = _read_manifest(root)
        for name in names:
            key = _key(name, opts)
            entry = man["datasets"].get(name)
            if not force and _is_cached(root, entry, key):
                log.info("%s: cached (%s, %.1f MB)", name, entry["file"], entry["bytes"] / 1e6)
                meta = {"source": ORIGINS[name], "licence": LICENCES[name]}
                if any(entry.get(k) != v for k, v in meta.items()):  # descriptive text only: no rebuild
                    entry.update(meta)
                    _write_manifest(root, man)
                continue
            t0 = time.perf_counter()
            arrays = BUILDERS[name](opts)
            path = root / f"{name}.npz"
            atomic_write(path, lambda f, a=arrays: np.savez(f, **a))
            seconds = time.perf_counter() - t0
            entry = {
                "file": path.name,
                "bytes": path.stat().st_size,
                "sha256": file_sha256(path),
                "arrays": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in arrays.items()},
                "key": key,
                "source": ORIGINS[name],
                "licence": LICENCES[name],
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "build_s": round(seconds, 2),
            }
            if name == "speech":
                entry["summary"] = {
                    "clips": int(len(arrays["y"])),
                    "voices": int(len(set(arrays["voice"].tolist()))),
                    "voices_by_split": {
                        s: int(len(set(arrays["voice"][arrays["split"] == s].tolist())))
                        for s in ("train", "test")
                    },
                    "augs": list(AUGS),
                }
            man["datasets"][name] = entry
            _write_manifest(root, man)
            log.info("%s: built in %.1f s -> %s (%.1f MB)", name, seconds, path, entry["bytes"] / 1e6)
    return man


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m demodata.prepare", description=__doc__.split("\n")[0]
    )
    ap.add_argument(
        "--only",
        action="append",
        choices=DATASETS,
        metavar="NAME",
        help=f"only this dataset (repeatable): {', '.join(DATASETS)}",
    )
    ap.add_argument("--force", action="store_true", help="rebuild even when cached")
    ap.add_argument("--voices", type=int, default=None, help="speech: only the first N voices (default all)")
    ap.add_argument("--jobs", type=int, default=2, help="speech synthesis processes (default 2)")
    args = ap.parse_args(argv)
    if args.voices is not None and args.voices < 1:
        ap.error(f"--voices must be >= 1, got {args.voices}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    t0 = time.perf_counter()
    try:
        prepare(args.only, force=args.force, opts=Options(voices=args.voices, jobs=args.jobs))
    except (FileNotFoundError, RuntimeError, ValueError) as exc:
        log.error("%s", exc)
        return 1
    log.info("data ready in %s (%.2f s)", data_dir(), time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
