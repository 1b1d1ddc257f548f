"""Backbone taps of the offline scenario data, extracted once and cached under ``data/features/``.

The benchmark trains dozens of learners on the same samples; running the frozen backbones once
per sample and caching their taps makes a full run minutes instead of hours. The cache key is
the sha256 of each backend manifest's ``content_hash``, the prepared-data manifest's file hashes
and :class:`FeatureConfig`, so a new export, new data or another subsample rebuilds it.

Pools (one cached entry each, rows in a fixed order independent of the scenario seed):

- ``image/train-d0``: the first ``image_train`` Fashion-MNIST training images of every class;
  ``image/test-d0``: the first ``image_test`` test images of every class. ``image/<split>-d<k>``
  for k = 1..4: the first ``domain_train`` / ``domain_test`` of those per class, corrupted with
  domain k of :data:`IMAGE_DOMAINS` (torchvision.transforms.v2, fixed seed).
- ``image/digits-train-d0`` / ``image/digits-test-d0``: the first ``digits_train`` / last ``digits_test``
  sklearn digits of every class (disjoint rows), 8x8 upscaled bilinearly to 28x28 (:func:`upscale_digits`)
  and fed through the Fashion-MNIST image path (the ``long`` hard scenario).
- ``audio/all-d0``: every speech clip (the scenario picks train/test voices and words).
- ``imu/<split>-d<k>``: all 40 BasicMotions train / test recordings, with sensor domain k of
  :data:`IMU_DOMAINS` (noise, bias, gain in units of each channel's training std, fixed seed).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import atomic_write
from common.config import require_positive
from training.errors import FeatureCacheError

log = logging.getLogger(__name__)

MODALITIES = ("image", "audio", "imu")
N_DOMAINS = 5
IMAGE_DOMAINS = ("clean", "gaussian blur (k=5, sigma=1.2)", "gaussian noise (sigma=0.3)",
                 "dark, low contrast (brightness 0.5, contrast 0.5)", "inverted (photo negative)")
IMU_DOMAINS = ("clean", "noise 0.5 std", "bias +-1 std per channel", "gain 0.6 + noise 0.3 std",
               "bias -+1 std + noise 0.5 std")
VERSION = 1
DIGITS_MIN_PER_CLASS = 174  # sklearn load_digits: the rarest class (8) has 174 of 1797 images


@dataclass(kw_only=True)
class FeatureConfig:
    image_train: int = 300
    image_test: int = 100
    domain_train: int = 60
    domain_test: int = 20
    digits_train: int = 100
    digits_test: int = 50
    backend: str = "onnxruntime"
    threads: int = 2
    batch: int = 32
    model_dir: str = "models"

    def __post_init__(self) -> None:
        require_positive(self, "image_train", "image_test", "domain_train", "domain_test", "digits_train",
                          "digits_test", "threads", "batch")
        if self.domain_train > self.image_train or self.domain_test > self.image_test:
            raise ValueError(f"FeatureConfig.domain_train/test ({self.domain_train}/{self.domain_test}) must not "
                             f"exceed image_train/test ({self.image_train}/{self.image_test})")
        if self.digits_train + self.digits_test > DIGITS_MIN_PER_CLASS:
            raise ValueError(f"FeatureConfig.digits_train + digits_test ({self.digits_train} + {self.digits_test}) "
                             f"must not exceed {DIGITS_MIN_PER_CLASS}, the rarest digit's count (disjoint rows)")
        if self.backend not in ("onnxruntime", "torch", "tensorrt", "auto"):
            raise ValueError(f"FeatureConfig.backend must be onnxruntime|torch|tensorrt|auto, got {self.backend!r}")

    def pool_fields(self) -> dict[str, int]:
        return {k: v for k, v in asdict(self).items() if k in ("image_train", "image_test", "domain_train",
                                                                "domain_test", "digits_train", "digits_test")}


@dataclass
class Pool:
    """One cached entry: ``taps`` (filled by extraction), ``labels`` (source class), ``src`` (row in the source set),
    ``voice``/``split`` for speech."""

    labels: np.ndarray
    src: np.ndarray
    taps: list[np.ndarray] | None = None
    voice: np.ndarray | None = None
    split: np.ndarray | None = None


def first_per_class(labels: np.ndarray, n: int, classes: int = 10) -> np.ndarray:
    """Indices of the first ``n`` samples of every class, grouped by class."""
    return np.concatenate([np.flatnonzero(labels == c)[:n] for c in range(classes)])


def pool_meta(cfg: FeatureConfig, data: dict[str, dict[str, np.ndarray]]) -> dict[str, Pool]:
    """Which source rows each pool holds (no extraction): the scenarios are planned from this."""
    fm, bm, sp = data["fashion_mnist"], data["basic_motions"], data["speech"]
    pools: dict[str, Pool] = {}
    for split, n, nd in (("train", cfg.image_train, cfg.domain_train), ("test", cfg.image_test, cfg.domain_test)):
        y = fm[f"y_{split}"]
        idx = first_per_class(y, n)
        pools[f"image/{split}-d0"] = Pool(labels=y[idx], src=idx)
        didx = first_per_class(y, nd)
        for k in range(1, N_DOMAINS):
            pools[f"image/{split}-d{k}"] = Pool(labels=y[didx], src=didx)
        for k in range(N_DOMAINS):
            yb = bm[f"y_{split}"]
            pools[f"imu/{split}-d{k}"] = Pool(labels=yb, src=np.arange(len(yb)))
    if "digits" in data:  # first n train rows / last n test rows of each class: disjoint
        yd = data["digits"]["y"]
        tr = np.concatenate([np.flatnonzero(yd == c)[: cfg.digits_train] for c in range(10)])
        te = np.concatenate([np.flatnonzero(yd == c)[-cfg.digits_test :] for c in range(10)])
        pools["image/digits-train-d0"] = Pool(labels=yd[tr], src=tr)
        pools["image/digits-test-d0"] = Pool(labels=yd[te], src=te)
    from demodata.store import voice_split

    split = sp["split"] if "split" in sp else voice_split(sp["voice"])
    pools["audio/all-d0"] = Pool(labels=sp["y"], src=np.arange(len(sp["y"])), voice=sp["voice"], split=split)
    return pools


def corrupt_images(x: np.ndarray, domain: int, seed: int = 0) -> np.ndarray:
    """(N, 28, 28) uint8 grey -> (N, 28, 28, 3) uint8 RGB with image domain ``domain``."""
    import torch
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as tvf

    t = torch.from_numpy(np.ascontiguousarray(x))[:, None].expand(-1, 3, -1, -1).contiguous()  # (N,3,H,W) u8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1009 + domain)
        if domain == 1:
            t = v2.GaussianBlur(kernel_size=5, sigma=1.2)(t)
        elif domain == 2:
            f = v2.GaussianNoise(sigma=0.3, clip=True)(tvf.to_dtype(t, torch.float32, scale=True))
            t = tvf.to_dtype(f, torch.uint8, scale=True)
        elif domain == 3:
            t = tvf.adjust_contrast(tvf.adjust_brightness(t, 0.5), 0.5)
        elif domain == 4:
            t = tvf.invert(t)
        elif domain != 0:
            raise ValueError(f"image domain must be 0..{N_DOMAINS - 1}, got {domain}")
    return t.permute(0, 2, 3, 1).contiguous().numpy()


def upscale_digits(x: np.ndarray, size: int = 28) -> np.ndarray:
    """(N, 8, 8) uint8 sklearn digits -> (N, size, size) uint8, bilinear: the Fashion-MNIST input geometry, so
    digits take exactly the image path Fashion-MNIST takes (grey -> RGB -> backbone)."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[:, None]
    up = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return up[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()


def corrupt_imu(x: np.ndarray, domain: int, std: np.ndarray, seed: int = 0) -> np.ndarray:
    """(N, 6, 100) float32 with IMU domain ``domain`` (``std``: per-channel training std)."""
    rng = np.random.default_rng(seed * 1009 + domain)
    s = std.reshape(1, -1, 1).astype(np.float32)
    sign = rng.choice([-1.0, 1.0], size=(1, x.shape[1], 1)).astype(np.float32)
    noise = rng.normal(size=x.shape).astype(np.float32)
    if domain == 0:
        return x.astype(np.float32)
    if domain == 1:
        return x + 0.5 * s * noise
    if domain == 2:
        return x + sign * s
    if domain == 3:
        return 0.6 * x + 0.3 * s * noise
    if domain == 4:
        return x - sign * s + 0.5 * s * noise
    raise ValueError(f"imu domain must be 0..{N_DOMAINS - 1}, got {domain}")


def load_sources() -> dict[str, dict[str, np.ndarray]]:
    from demodata.store import load

    return {name: load(name) for name in ("fashion_mnist", "digits", "basic_motions", "speech")}


def cache_key(cfg: FeatureConfig, manifests: dict[str, dict[str, Any]]) -> str:
    from demodata.store import manifest as data_manifest

    dm = data_manifest()["datasets"]
    blob = {"version": VERSION, "pools": cfg.pool_fields(),
            "backends": {m: manifests[m].get("content_hash") for m in MODALITIES},
            "data": {k: dm[k]["sha256"] for k in ("fashion_mnist", "digits", "basic_motions", "speech") if k in dm}}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def _inputs(name: str, pool: Pool, src: dict[str, dict[str, np.ndarray]]) -> np.ndarray:
    mod, _, rest = name.partition("/")
    split, _, dom = rest.partition("-d")
    domain = int(dom)
    if mod == "image" and split.startswith("digits-"):
        return corrupt_images(upscale_digits(src["digits"]["x"][pool.src]), domain)
    if mod == "image":
        return corrupt_images(src["fashion_mnist"][f"x_{split}"][pool.src], domain)
    if mod == "imu":
        bm = src["basic_motions"]
        std = bm["x_train"].std(axis=(0, 2))
        return corrupt_imu(bm[f"x_{split}"][pool.src], domain, std)
    return src["speech"]["audio"][pool.src]


def extract_pools(cfg: FeatureConfig | None = None, *, root: Path | None = None, progress: bool = True,
                  rebuild: bool = False) -> tuple[dict[str, Pool], dict[str, Any]]:
    """All pools with their taps (cached), and info: cache key, dir, tap names/dims per modality."""
    from tqdm import tqdm

    from demodata.store import data_dir
    from export import load_backend

    cfg = cfg or FeatureConfig()
    src = load_sources()
    pools = pool_meta(cfg, src)
    backends: dict[str, Any] = {}

    def backend(mod: str) -> Any:
        if mod not in backends:
            backends[mod] = load_backend(mod, cfg.backend, cfg.model_dir, threads=cfg.threads)
        return backends[mod]

    from export.backends import load_manifest

    manifests = {m: load_manifest(m, cfg.model_dir) for m in MODALITIES}
    key = cache_key(cfg, manifests)
    cache = (root or data_dir()) / "features" / key
    cache.mkdir(parents=True, exist_ok=True)
    todo = [n for n in pools if rebuild or not (cache / (n.replace("/", "__") + ".npz")).exists()]
    total = sum(len(pools[n].src) for n in todo)
    bar = tqdm(total=total, desc=f"features {key}", unit="sample", disable=not progress or not todo)
    for name, pool in pools.items():
        path = cache / (name.replace("/", "__") + ".npz")
        if name in todo:
            mod = name.partition("/")[0]
            x = _inputs(name, pool, src)
            outs: list[list[np.ndarray]] = []
            for s in range(0, len(x), cfg.batch):
                taps = backend(mod).extract(x[s : s + cfg.batch])
                outs.append(list(taps.values.values()))
                bar.update(min(cfg.batch, len(x) - s))
            arrays = {f"tap{b}": np.concatenate([o[b] for o in outs]).astype(np.float32) for b in range(len(outs[0]))}
            import io

            bio = io.BytesIO()
            np.savez(bio, src=pool.src, **arrays)
            atomic_write(path, bio.getvalue())
        try:
            with np.load(path, allow_pickle=False) as z:
                if not np.array_equal(z["src"], pool.src):
                    raise ValueError("rows differ from the pool definition")
                pool.taps = [z[f"tap{b}"] for b in range(sum(k.startswith("tap") for k in z.files))]
        except (OSError, ValueError, KeyError) as exc:
            raise FeatureCacheError(f"feature cache {path} is unusable ({exc}); delete it or pass rebuild=True") from None
    bar.close()
    for b in backends.values():
        b.close()
    info = {"key": key, "dir": str(cache), "backend": cfg.backend,
            "taps": {m: [(t["name"], int(t["dim"])) for t in manifests[m]["taps"]] for m in MODALITIES}}
    log.info("features: %d pools from %s", len(pools), cache)
    return pools, info
