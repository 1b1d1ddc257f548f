"""Models bundle: round trip, and every way a bundle can be wrong is refused with the old models kept."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from export.bundle import INDEX_NAME, ensure_unbundled, make_bundle, read_bundle, unbundle
from export.errors import ModelFileError
from export.manifest import load_verified, sha256_file

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bundle(models_dir: Path, tmp_path_factory) -> Path:
    return make_bundle(models_dir, tmp_path_factory.mktemp("bundle") / "models.tar").path


def _files(d: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(d.iterdir()) if p.is_file()}


def _rewrite(src: Path, dest: Path, edit) -> Path:
    """Copy a bundle member by member through ``edit(name, data) -> [(name, data, type), ...]``."""
    with tarfile.open(src) as tin, tarfile.open(dest, "w") as tout:
        for m in tin:
            for name, data, kind in edit(m.name, tin.extractfile(m).read()):
                info = tarfile.TarInfo(name)
                info.type = kind
                if kind == tarfile.SYMTYPE:
                    info.linkname = data.decode()
                    tout.addfile(info)
                else:
                    info.size = len(data)
                    tout.addfile(info, io.BytesIO(data))
    return dest


def test_round_trip_gives_the_same_verified_models(models_dir: Path, bundle: Path, tmp_path: Path):
    info = read_bundle(bundle)
    out = tmp_path / "models"
    got = unbundle(bundle, out)
    assert got.digest == info.digest
    want = _files(models_dir)
    have = _files(out)
    assert set(have) == set(info.files) | {INDEX_NAME}
    assert all(have[n] == want[n] == info.files[n]["sha256"] for n in info.files)
    for m in ("audio", "image", "imu"):
        assert load_verified(out, m)["content_hash"] == load_verified(models_dir, m)["content_hash"]
    assert (out.stat().st_mode & 0o777) == 0o755
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch folder left


def test_ensure_unbundled_unpacks_once_and_again_when_a_file_changes(bundle: Path, tmp_path: Path):
    out = tmp_path / "models"
    ensure_unbundled(bundle, out)
    inode = (out / "image.onnx").stat().st_ino
    ensure_unbundled(bundle, out)
    assert (out / "image.onnx").stat().st_ino == inode  # the same bundle, verified: nothing unpacked
    with open(out / "imu.onnx", "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    ensure_unbundled(bundle, out)
    assert load_verified(out, "imu")  # replaced from the bundle
    assert (out / "image.onnx").stat().st_ino != inode


@pytest.mark.parametrize("case", ["flipped_byte", "truncated", "extra_member", "symlink", "dotdot", "no_index",
                                  "missing_member", "not_tar", "zeros"])
def test_bad_bundle_is_refused_and_the_old_models_stay(case: str, bundle: Path, tmp_path: Path):
    out = tmp_path / "models"
    unbundle(bundle, out)
    before = _files(out)
    bad = tmp_path / "bad.tar"
    if case == "flipped_byte":
        data = bytearray(bundle.read_bytes())
        data[len(data) // 2] ^= 0x01  # inside image.onnx, the largest member
        bad.write_bytes(bytes(data))
        reason = "sha256"
    elif case == "truncated":
        bad.write_bytes(bundle.read_bytes()[: bundle.stat().st_size // 2])
        reason = "truncated"
    elif case == "not_tar":
        bad.write_bytes(b"\x00garbage" * 100)
        reason = "bundle"
    elif case == "zeros":  # Python 3.10's tarfile raises OSError on it, 3.11's returns no member
        bad.write_bytes(b"\x00" * 4096)
        reason = "bundle"
    else:
        def edit(name, data):
            if case == "extra_member" and name == "imu.onnx":
                return [(name, data, tarfile.REGTYPE), ("evil.so", b"x", tarfile.REGTYPE)]
            if case == "symlink" and name == "imu.onnx":
                return [(name, b"/etc/passwd", tarfile.SYMTYPE)]
            if case == "dotdot" and name == INDEX_NAME:
                index = json.loads(data)
                index["files"]["../escape.onnx"] = index["files"].pop("imu.onnx")
                return [(name, json.dumps(index).encode(), tarfile.REGTYPE)]
            if case == "no_index" and name == INDEX_NAME:
                return []
            if case == "missing_member" and name == "imu.onnx":
                return []
            return [(name, data, tarfile.REGTYPE)]

        _rewrite(bundle, bad, edit)
        reason = {"extra_member": "not in its index", "symlink": "not a regular file", "dotdot": "unsafe path",
                  "no_index": "does not start with its index", "missing_member": "absent"}[case]
    with pytest.raises(ModelFileError) as e:
        unbundle(bad, out)
    assert reason in str(e.value)
    assert _files(out) == before  # the old models are untouched
    assert not (tmp_path / "escape.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar", "models"]  # no scratch left


def test_bundle_refuses_a_folder_with_a_corrupt_model(models_dir: Path, tmp_path: Path):
    src = tmp_path / "src"
    shutil.copytree(models_dir, src)
    (src / "imu.onnx").write_bytes(b"not onnx")
    with pytest.raises(ModelFileError, match="sha256"):
        make_bundle(src, tmp_path / "x.tar")
    assert not (tmp_path / "x.tar").exists()


def test_cli_bundle_and_unbundle_print_json_and_refuse_with_exit_2(models_dir: Path, tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = [sys.executable, "-m", "export"]
    b = tmp_path / "m.tar"
    r = subprocess.run([*run, "bundle", "--out", str(models_dir), "--file", str(b)], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert line["files"] == len(read_bundle(b).files) and line["bytes"] > 1_000_000
    r = subprocess.run([*run, "unbundle", str(b), "--out", str(tmp_path / "models")], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["digest"] == read_bundle(b).digest[:16]
    b.write_bytes(b.read_bytes()[:4096])
    r = subprocess.run([*run, "unbundle", str(b), "--out", str(tmp_path / "models")], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=120, check=False)
    assert r.returncode == 2
    assert "unbundle refused" in r.stderr and "Traceback" not in r.stderr
