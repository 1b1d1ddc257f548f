"""Export each backbone once to ONNX (all taps as graph outputs, dynamic batch), check, manifest.

Cached by content: a build key hashes the backbone's weights, graph version, source package
versions, opset and exporter version; when the manifest on disk has the same key and the ONNX
file still has its recorded sha256, ``build`` returns at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from export.backbones import Backbone, create, modalities
from export.errors import ModelFileError
from export.manifest import MANIFEST_FORMAT, load_verified, manifest_path, sha256_file, write_manifest
from export.taps import INPUT_NAME, tap_output_name

log = logging.getLogger(__name__)
OPSET = 18
EXPORT_FORMAT = 1  # bump when this module changes what it writes


def build_key(backbone: Backbone) -> str:
    spec = {
        "backbone": backbone.name, "version": backbone.version, "weights": backbone.weights_hash(),
        "sources": backbone.source_versions(), "opset": OPSET, "torch": torch.__version__,
        "export_format": EXPORT_FORMAT, "input": backbone.input_spec.to_dict(),
        "taps": [t.to_dict() for t in backbone.tap_specs],
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _dynamic_shapes(example: torch.Tensor, dynamic_dims: tuple[int, ...]) -> tuple[dict[int, Any]]:
    dims = {}
    for i in dynamic_dims:
        dims[i] = torch.export.Dim("batch" if i == 0 else f"d{i}", min=1 if i == 0 else 16, max=4096)
    return (dims,)


def export_graph(module: torch.nn.Module, example: torch.Tensor, output_names: list[str], path: Path,
                 dynamic_dims: tuple[int, ...] = (0,)) -> None:
    """torch.onnx.export (dynamo) -> single-file ONNX at ``path`` checked by onnx.checker.

    The example batch must be >= 2: with batch 1 the exporter silently drops the dynamic batch.
    """
    import onnx

    if example.shape[0] < 2:
        raise ValueError("export with an example batch >= 2 (batch 1 loses the dynamic batch dim)")
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        tmp_path = Path(tmp) / "model.onnx"
        program = torch.onnx.export(
            module.eval(), (example,), input_names=[INPUT_NAME], output_names=output_names,
            dynamic_shapes=_dynamic_shapes(example, dynamic_dims), opset_version=OPSET, dynamo=True,
            verbose=False,
        )
        program.save(str(tmp_path))
        model = onnx.load(str(tmp_path))  # pulls the .onnx.data external weights in
    model.producer_name = "continua.export"
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    if batch_dim.dim_param == "" and batch_dim.dim_value != 0:
        raise ModelFileError(path, f"exported input has a static batch dim {batch_dim.dim_value}")
    onnx.checker.check_model(model, full_check=True)
    tmp_out = path.with_suffix(".onnx.tmp")
    onnx.save(model, str(tmp_out))  # one file: < 2 GB, so no external data
    tmp_out.replace(path)


def build_one(modality: str, out_dir: str | Path = "models", *, force: bool = False) -> Path:
    """Export ``modality`` (and its parts) unless a verified build with the same key exists.
    Returns the manifest path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    backbone = create(modality)
    key = build_key(backbone)
    mpath = manifest_path(out_dir, modality)
    if not force and mpath.exists():
        try:
            old = load_verified(out_dir, modality)
            if old["build_key"] == key:
                log.debug("%s: cached build %s", modality, mpath)
                return mpath
            log.info("%s: build key changed, re-exporting", modality)
        except ModelFileError as e:
            log.warning("rejecting %s (%s); rebuilding", e.path, e.reason)
    t0 = time.perf_counter()
    outputs = [tap_output_name(t.name) for t in backbone.tap_specs]
    onnx_path = out_dir / f"{modality}.onnx"
    dyn = tuple(i for i, d in enumerate(backbone.input_spec.shape) if d is None)
    export_graph(backbone, backbone.example_input(2), outputs, onnx_path, dyn)
    parts = {}
    for name, part in backbone.parts().items():
        ppath = out_dir / f"{modality}_{name}.onnx"
        export_graph(part.module, part.example, list(part.output_names), ppath, (0,))
        parts[name] = {"onnx": ppath.name, "sha256": sha256_file(ppath), "outputs": list(part.output_names),
                       "input_shape": ["batch", *part.example.shape[1:]]}
    import onnx

    manifest = {
        "format": MANIFEST_FORMAT, "modality": modality, "backbone": backbone.name,
        "backbone_version": backbone.version, "onnx": onnx_path.name, "content_hash": sha256_file(onnx_path),
        "build_key": key, "input": backbone.input_spec.to_dict(), "outputs": outputs,
        "taps": [t.to_dict() for t in backbone.tap_specs], "preprocessing": backbone.preprocessing(),
        "opset": OPSET, "source_versions": backbone.source_versions(),
        "exporter": {"torch": torch.__version__, "onnx": onnx.__version__}, "parts": parts,
        "weights_sha256": backbone.weights_hash(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_manifest(mpath, manifest)
    log.info("%s: exported %s in %.1f s", modality, onnx_path, time.perf_counter() - t0)
    return mpath


def build(modality: str | None = None, out_dir: str | Path = "models", *, force: bool = False) -> list[Path]:
    """Export one modality or all of them; returns the ONNX paths (manifests lie beside them)."""
    names = [modality] if modality else modalities()
    paths = []
    for m in names:
        mpath = build_one(m, out_dir, force=force)
        paths.append(Path(out_dir) / json.loads(mpath.read_text())["onnx"])
    return paths
