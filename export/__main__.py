"""Command line of the export package.

    python -m export build    [--modality image|audio|imu] [--out models] [--force]
    python -m export info     [--out models]
    python -m export bundle   [--out models] [--file models.tar]
    python -m export unbundle FILE [--out models]

``build`` exports each backbone to ONNX (taps as outputs, dynamic batch), checks it with
onnx.checker and writes ``<modality>.manifest.json`` beside it; cached by content hash. It
needs the ``export`` extra (torch's exporter, onnxscript, the weights' packages): a workstation
job. ``bundle`` packs the verified models into one file for the robot; ``unbundle`` verifies a
bundle and swaps it into ``--out`` (see :mod:`export.bundle`); neither imports torch.
The last stdout line is one JSON object; a refused bundle is one error line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(kw_only=True)
class Config:
    command: str
    modality: str | None = None
    out: Path = Path("models")
    force: bool = False
    file: Path | None = None

    def __post_init__(self) -> None:
        if self.modality not in (None, "image", "audio", "imu"):
            raise ValueError(f"modality must be image, audio or imu, got {self.modality!r}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["build", "info", "bundle", "unbundle"])
    p.add_argument("file", nargs="?", type=Path, help="bundle file (unbundle)")
    p.add_argument("--modality", choices=["image", "audio", "imu"])
    p.add_argument("--out", type=Path, default=Path("models"))
    p.add_argument("--force", action="store_true", help="re-export even when the cache is valid")
    p.add_argument("--file", dest="bundle_file", type=Path, help="bundle file to write (bundle; default models.tar)")
    a = p.parse_args(argv)
    if a.command == "unbundle" and a.file is None:
        p.error("unbundle needs the bundle FILE")
    if a.command == "bundle" and a.file is not None:
        p.error("bundle writes --file FILE")
    target = {"unbundle": a.file, "bundle": a.bundle_file or Path("models.tar")}.get(a.command)
    cfg = Config(command=a.command, modality=a.modality, out=a.out, force=a.force, file=target)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    print(f"config: {cfg}", file=sys.stderr)
    if cfg.command in ("bundle", "unbundle"):
        return _bundle_command(cfg)
    from export import available_kinds, build
    from export.manifest import load_verified

    if cfg.command == "build":
        build(cfg.modality, cfg.out, force=cfg.force)
    result = {}
    for m in [cfg.modality] if cfg.modality else ["audio", "image", "imu"]:
        try:
            man = load_verified(cfg.out, m)
            result[m] = {"onnx": str(cfg.out / man["onnx"]), "content_hash": man["content_hash"][:16],
                         "taps": {t["name"]: t["dim"] for t in man["taps"]}, "opset": man["opset"]}
        except Exception as e:  # info reports what is wrong instead of stopping
            result[m] = {"error": str(e)}
    result["backends"] = {k: ok for k, (ok, _) in available_kinds().items()}
    print(json.dumps(result))
    return 0


def _bundle_command(cfg: Config) -> int:
    from export.bundle import describe, make_bundle, unbundle
    from export.errors import ModelFileError

    assert cfg.file is not None
    try:
        info = make_bundle(cfg.out, cfg.file) if cfg.command == "bundle" else unbundle(cfg.file, cfg.out)
    except (ModelFileError, OSError) as exc:
        print(f"error: {cfg.command} refused: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({**describe(info), "models_dir": str(cfg.out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
