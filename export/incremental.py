"""Incremental audio taps for a live stream, so that each block of audio is computed only once.

Each 80 ms block of audio is turned into mel frames and
one new embedding window exactly once; the taps of "the latest 1 s" average the last 3 windows.

Equal (to float rounding) to ``extract`` on the 16000 samples ending at the latest block
boundary: sample 1280*b + 1632 after block b (blocks counted from the first sample pushed).
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from export.audio_frames import BLOCK, BLOCK_SAMPLES, HOP, WINDOW, WINDOW_ENDS
from export.errors import InputSpecError
from export.taps import INPUT_NAME, Taps, TapSpec

BLOCK_HOP = BLOCK * HOP  # 1280 samples = 80 ms
BLOCKS_PER_WINDOW = -(-WINDOW // BLOCK)  # 10 blocks cover a 76-frame window


class IncrementalAudioExtractor:
    """push(pcm chunk) as audio arrives; taps() returns batch-1 Taps of the latest second."""

    def __init__(self, model_dir: str | Path = "models", kind: str = "onnxruntime", *, threads: int | None = None,
                 build: bool = True) -> None:
        from export.backends import load_manifest

        self.manifest = load_manifest("audio", model_dir, build=build)
        self.tap_specs = [TapSpec(t["name"], int(t["dim"])) for t in self.manifest["taps"]]
        self.kind = kind
        if kind == "onnxruntime":
            from export.backends.onnxruntime import make_session

            parts = self.manifest["parts"]
            self._mel = make_session(Path(model_dir) / parts["melblock"]["onnx"], threads=threads)
            self._emb = make_session(Path(model_dir) / parts["embed"]["onnx"], threads=threads)
            self._emb_out = parts["embed"]["outputs"]
        elif kind == "torch":
            from export.backbones import create

            self._model = create("audio")
        else:
            raise ValueError(f"kind must be 'onnxruntime' or 'torch', got {kind!r}")
        self.reset()

    def reset(self) -> None:
        self._buf = np.zeros(0, dtype=np.float32)
        self._buf_start = 0  # global index of self._buf[0]
        self._next_block = 0
        self._blocks: deque[np.ndarray] = deque(maxlen=BLOCKS_PER_WINDOW)
        self._windows: deque[list[np.ndarray]] = deque(maxlen=len(WINDOW_ENDS))
        self.samples_seen = 0

    def _melblocks(self, pcm: np.ndarray) -> np.ndarray:
        if self.kind == "onnxruntime":
            return self._mel.run(None, {INPUT_NAME: pcm})[0]
        import torch

        from export.backbones.audio import MelBlock

        with torch.inference_mode():
            return MelBlock(self._model.front)(torch.from_numpy(pcm)).numpy()

    def _embed(self, frames: np.ndarray) -> list[np.ndarray]:
        if self.kind == "onnxruntime":
            return self._emb.run(self._emb_out, {INPUT_NAME: frames})
        import torch

        with torch.inference_mode():
            return [t.numpy() for t in self._model.embed(torch.from_numpy(frames))]

    def push(self, pcm: np.ndarray) -> int:
        """Add a chunk of 16 kHz mono PCM (int16, or float32 in [-1, 1]); returns new windows computed."""
        if not isinstance(pcm, np.ndarray) or pcm.ndim != 1 or pcm.dtype.name not in ("int16", "float32"):
            got = f"{getattr(pcm, 'dtype', type(pcm).__name__)} {getattr(pcm, 'shape', '')}"
            raise InputSpecError("audio", f"chunk {got}", "1-D int16 or float32 [-1, 1] PCM at 16 kHz")
        x = pcm.astype(np.float32) * (32768.0 if pcm.dtype == np.float32 else 1.0)
        self._buf = np.concatenate([self._buf, x])
        self.samples_seen += len(pcm)
        end = self._buf_start + len(self._buf)
        new = []
        while BLOCK_HOP * self._next_block + BLOCK_SAMPLES <= end:
            new.append(self._next_block)
            self._next_block += 1
        if not new:
            return 0
        starts = [BLOCK_HOP * b - self._buf_start for b in new]
        mel = self._melblocks(np.stack([self._buf[s:s + BLOCK_SAMPLES] for s in starts]))
        drop = BLOCK_HOP * self._next_block - self._buf_start
        self._buf, self._buf_start = self._buf[drop:], self._buf_start + drop
        windows = []
        for b, frames in zip(new, mel, strict=True):
            self._blocks.append(frames)
            if b + 1 >= BLOCKS_PER_WINDOW:
                windows.append(np.concatenate(self._blocks)[-WINDOW:])
        if windows:
            taps = self._embed(np.stack(windows).astype(np.float32))
            for i in range(len(windows)):
                self._windows.append([t[i] for t in taps])
        return len(windows)

    @property
    def covered_samples(self) -> int:
        """Samples pushed since ``reset`` that the latest taps cover (end of the newest block; 0 before)."""
        return 0 if self._next_block == 0 else BLOCK_HOP * (self._next_block - 1) + BLOCK_SAMPLES

    def taps(self) -> Taps | None:
        """Taps (batch 1) of the latest second, or None before a full second has arrived."""
        if len(self._windows) < len(WINDOW_ENDS):
            return None
        values = {spec.name: np.mean([w[i] for w in self._windows], axis=0)[None].astype(np.float32)
                  for i, spec in enumerate(self.tap_specs)}
        return Taps("audio", values)

    def stats(self) -> dict[str, Any]:
        return {"samples_seen": self.samples_seen, "blocks": self._next_block, "windows": len(self._windows)}
