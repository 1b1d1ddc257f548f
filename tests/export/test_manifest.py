"""Manifests, compatibility checks, build cache, and rejection + rebuild of corrupt files."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys

import pytest

from export import ManifestMismatchError, ModelFileError, build, check_compatible, fingerprint, load_backend
from export.manifest import load_verified, manifest_path, read_manifest


@pytest.mark.parametrize("modality", ["image", "audio", "imu"])
def test_manifest_records_what_the_graph_computes(models_dir, modality):
    import onnx

    man = load_verified(models_dir, modality)
    assert len(man["taps"]) == 4 and all(t["dtype"] == "float32" and t["shape"][0] == "batch" for t in man["taps"])
    assert man["opset"] == 18 and man["preprocessing"] and "torch" in man["source_versions"]
    model = onnx.load(str(models_dir / man["onnx"]))
    onnx.checker.check_model(model)
    assert [o.name for o in model.graph.output] == man["outputs"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch


def test_check_compatible(models_dir):
    man = load_verified(models_dir, "imu")
    check_compatible(man, fingerprint(json.loads(json.dumps(man))))  # passes after a JSON round trip
    other = fingerprint(man) | {"taps": [dict(t, dim=t["dim"] + 1) for t in man["taps"]]}
    with pytest.raises(ManifestMismatchError, match="taps"):
        check_compatible(man, other)
    with pytest.raises(ManifestMismatchError, match="content_hash"):
        check_compatible(man, {"content_hash": "0" * 64})
    with pytest.raises(ManifestMismatchError, match="modality"):
        check_compatible(man, fingerprint(load_verified(models_dir, "audio")))


def test_build_is_cached(models_dir):
    mpath = manifest_path(models_dir, "imu")
    before = mpath.stat().st_mtime_ns
    build("imu", models_dir)
    assert mpath.stat().st_mtime_ns == before


@pytest.fixture
def imu_copy(models_dir, tmp_path):
    for name in ("imu.onnx", "imu.manifest.json"):
        shutil.copy(models_dir / name, tmp_path / name)
    return tmp_path


def test_corrupt_onnx_is_rejected_with_path_and_rebuilt(imu_copy, caplog, real_imu):
    onnx_path = imu_copy / "imu.onnx"
    data = bytearray(onnx_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx_path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError) as e:
        load_verified(imu_copy, "imu")
    assert e.value.path == onnx_path and "sha256" in e.value.reason
    with caplog.at_level(logging.WARNING):
        b = load_backend("imu", "onnxruntime", imu_copy)
    assert any(str(onnx_path) in r.getMessage() and "rebuilding" in r.getMessage() for r in caplog.records)
    load_verified(imu_copy, "imu")  # now valid
    assert b.extract(real_imu).batch_size == len(real_imu)


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": 1}), json.dumps([1, 2])])
def test_corrupt_manifest_is_rejected_and_rebuilt(imu_copy, content):
    mpath = imu_copy / "imu.manifest.json"
    mpath.write_text(content)
    with pytest.raises(ModelFileError) as e:
        read_manifest(mpath)
    assert e.value.path == mpath
    build("imu", imu_copy)
    assert read_manifest(mpath)["modality"] == "imu"


def test_without_build_a_bad_file_is_an_error_not_used(imu_copy):
    (imu_copy / "imu.onnx").write_bytes(b"garbage")
    with pytest.raises(ModelFileError, match="imu.onnx"):
        load_backend("imu", "onnxruntime", imu_copy, build=False)


def test_cli_build_last_line_is_json(imu_copy):
    r = subprocess.run([sys.executable, "-m", "export", "build", "--modality", "imu", "--out", str(imu_copy)],
                       capture_output=True, text=True, check=True, timeout=300)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["imu"]["taps"] == {"d1": 168, "d2": 168, "d4": 168, "d8": 168}
