"""TensorRT: engine cache and background build (no TensorRT needed), then the engine itself
(skipped, with the reason, where TensorRT is not importable)."""

from __future__ import annotations

import logging

import pytest

from export import load_backend
from export.backends import available_kinds
from export.backends.tensorrt import _profile_shapes
from export.engine_cache import BackgroundBuild, EngineCache, EngineKey
from export.manifest import load_verified

TRT_OK, TRT_WHY = available_kinds()["tensorrt"]
KEY = EngineKey(trt_version="10.3.0", compute_capability="8.7", onnx_sha256="ab" * 32, flags=("fp16",))


def test_engine_cache_roundtrip_and_key(tmp_path):
    cache = EngineCache(tmp_path)
    assert cache.load(KEY) is None
    cache.store(KEY, b"engine-bytes")
    assert cache.load(KEY) == b"engine-bytes"
    other = EngineKey(trt_version="10.3.0", compute_capability="8.7", onnx_sha256="ab" * 32, flags=())
    assert other.digest() != KEY.digest() and cache.load(other) is None


def test_corrupt_engine_is_rejected_and_removed(tmp_path, caplog):
    cache = EngineCache(tmp_path)
    engine, meta = cache.paths(KEY)
    cache.store(KEY, b"engine-bytes")
    engine.write_bytes(b"engine-bytez")
    with caplog.at_level(logging.WARNING):
        assert cache.load(KEY) is None
    assert str(engine) in caplog.text and "sha256" in caplog.text
    assert not engine.exists() and not meta.exists()


def test_background_build_reports_progress_and_errors(tmp_path):
    cache = EngineCache(tmp_path)

    def fn(progress):
        progress.fraction = 0.5
        return b"built"

    ok = BackgroundBuild("t", fn, on_done=lambda d: cache.store(KEY, d)).start()
    assert ok.wait(10) and ok.result == b"built" and ok.progress.phase == "done" and cache.load(KEY) == b"built"

    def boom(progress):
        raise RuntimeError("parser failed")

    bad = BackgroundBuild("t", boom).start()
    assert bad.wait(10) and bad.result is None and "parser failed" in bad.progress.error


def test_profile_covers_batch_and_image_sizes(models_dir):
    mn, opt, mx = _profile_shapes(load_verified(models_dir, "image"), max_batch=16)
    assert mn == (1, 16, 16, 3) and opt == (1, 224, 224, 3) and mx[0] == 16
    mn, opt, mx = _profile_shapes(load_verified(models_dir, "audio"), max_batch=8)
    assert mn == (1, 16000) and mx == (8, 16000)


def test_auto_falls_back_with_one_log_line(models_dir, caplog):
    if TRT_OK:
        pytest.skip("TensorRT is available here: auto picks it")
    with caplog.at_level(logging.INFO, logger="export.backends"):
        b = load_backend("imu", "auto", models_dir)
    assert b.kind == "onnxruntime"
    lines = [r for r in caplog.records if "TensorRT unavailable" in r.getMessage()]
    assert len(lines) == 1


@pytest.mark.skipif(not TRT_OK, reason=f"TensorRT unavailable: {TRT_WHY}")
def test_engine_builds_caches_and_serves(models_dir, tmp_path, real_imu):
    b = load_backend("imu", "tensorrt", models_dir, engine_dir=tmp_path)
    first = b.extract(real_imu)  # served by ONNX Runtime until the engine is ready
    assert b.build is None or b.build.wait(600)
    taps = b.extract(real_imu)
    assert b.ready and list(taps.values) == list(first.values)
    again = load_backend("imu", "tensorrt", models_dir, engine_dir=tmp_path)
    assert again.ready  # loaded from the cache, no rebuild
