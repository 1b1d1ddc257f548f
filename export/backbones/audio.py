"""Audio backbone: Google's speech-embedding model as shipped in openwakeword 0.4.0, in torch.

Graph input: (B, 16000) float32, 1 s of 16 kHz mono PCM in int16 range (``extract`` converts
int16 as is and float32 in [-1, 1] times 32768).

Front end (torch/torchaudio, built independently of the shipped ONNX file and checked against
``melspectrogram.onnx`` in the tests): 512-point DFT of a periodic Hann window of 400 samples
centred in 512, hop 160 (a conv1d, which exports everywhere and is fast in ONNX Runtime),
power, 32 Slaney mel bands 60-3800 Hz (``torchaudio.functional.melscale_fbanks``), 10 log10
(clamped at 1e-10), floor at (max - 80 dB), then x / 10 + 2 as openwakeword does. The shipped
model takes the max over its whole input; we take it per block of 8 frames (80 ms), which is
what openwakeword's own streaming does (it runs the mel model on ~1280-sample chunks) and
which keeps a sample independent of its batch and lets the incremental extractor reuse frames.

The last 15712 samples of the second give 96 frames (12 blocks). The embedding network (20
convs, rebuilt in torch from ``embedding_model.onnx``'s initializers) runs on the 3 windows of
76 frames ending at frames 80, 88 and 96 (hop 8 = 80 ms, so a stream needs one new window per
80 ms). Taps: outputs of max-pools 2, 3, 4 (48, 72, 96 ch) and the 96-d embedding, each
averaged over time/frequency and then over the 3 windows.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio
from torch import nn

from export.audio_frames import (  # noqa: F401  (re-exported: the backbone's framing)
    BLOCK,
    BLOCK_SAMPLES,
    F_MAX,
    F_MIN,
    HOP,
    N_FFT,
    N_FRAMES,
    N_MELS,
    SAMPLE_RATE,
    TOP_DB,
    USED_SAMPLES,
    WIN,
    WINDOW,
    WINDOW_ENDS,
)
from export.backbones import register
from export.backbones.base import Backbone, GraphPart, pool
from export.taps import InputSpec, TapSpec

TAPS = {"pool2": 48, "pool3": 72, "pool4": 96, "embedding": 96}
_TAP_NODES = ("model/max_pooling2d_1/MaxPool", "model/max_pooling2d_2/MaxPool",
              "model/max_pooling2d_3/MaxPool", "model/conv2d_19/Conv2D")


def openwakeword_models_dir() -> Path:
    """openwakeword's resources/models folder, found without importing the package."""
    spec = importlib.util.find_spec("openwakeword")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("openwakeword==0.4.0 is not installed (it ships the speech-embedding model)")
    return Path(next(iter(spec.submodule_search_locations))) / "resources" / "models"


class MelFrontEnd(nn.Module):
    """PCM (B, S) int16-range float -> log-mel dB frames (B, T, 32), before the top-db floor."""

    def __init__(self) -> None:
        super().__init__()
        window = torch.zeros(N_FFT, dtype=torch.float64)
        off = (N_FFT - WIN) // 2
        window[off:off + WIN] = torch.hann_window(WIN, periodic=True, dtype=torch.float64)
        n = torch.arange(N_FFT, dtype=torch.float64)
        k = torch.arange(N_FFT // 2 + 1, dtype=torch.float64)[:, None]
        ang = 2 * torch.pi * k * n / N_FFT
        kernel = torch.cat([window * torch.cos(ang), -window * torch.sin(ang)])  # (514, 512)
        self.register_buffer("dft", kernel.float().unsqueeze(1))
        fb = torchaudio.functional.melscale_fbanks(
            N_FFT // 2 + 1, F_MIN, F_MAX, N_MELS, SAMPLE_RATE, norm="slaney", mel_scale="slaney"
        )
        self.register_buffer("fbank", fb.float())

    def forward(self, pcm: torch.Tensor) -> torch.Tensor:
        spec = F.conv1d(pcm.unsqueeze(1), self.dft, stride=HOP)  # (B, 514, T)
        nb = N_FFT // 2 + 1
        power = spec[:, :nb] ** 2 + spec[:, nb:] ** 2
        mel = torch.matmul(power.transpose(1, 2), self.fbank)  # (B, T, 32)
        return 10.0 * torch.log10(torch.clamp(mel, min=1e-10))


def block_floor(db: torch.Tensor) -> torch.Tensor:
    """Top-db floor per block of 8 frames, then openwakeword's x / 10 + 2. (B, T, 32), T % 8 == 0."""
    b, t, m = db.shape
    blocks = db.reshape(b, t // BLOCK, BLOCK * m)
    peak = blocks.amax(dim=2, keepdim=True)
    blocks = torch.maximum(blocks, peak - TOP_DB)
    return blocks.reshape(b, t, m) / 10.0 + 2.0


class MelBlock(nn.Module):
    """(B, 1632) PCM -> one block of 8 scaled mel frames (B, 8, 32): the incremental front end."""

    def __init__(self, front: MelFrontEnd) -> None:
        super().__init__()
        self.front = front

    def forward(self, pcm: torch.Tensor) -> torch.Tensor:
        return block_floor(self.front(pcm))


class _ClampMin(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, min=self.value)


class EmbeddingNet(nn.Module):
    """The speech-embedding CNN rebuilt from embedding_model.onnx: (N, 76, 32) -> pooled taps."""

    def __init__(self, onnx_path: Path | None = None) -> None:
        super().__init__()
        import onnx
        from onnx import numpy_helper

        path = onnx_path or openwakeword_models_dir() / "embedding_model.onnx"
        graph = onnx.load(str(path)).graph
        init = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}
        layers: list[nn.Module] = []
        self.tap_index: list[int] = []
        for node in graph.node:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            op = node.op_type
            if op in ("Pad", "Reshape"):
                continue  # input pad (freq 1 each side) and NHWC<->NCHW reshapes are in forward
            if op == "Conv":
                w = init[node.input[1]]
                pads = attrs.get("pads", [0, 0, 0, 0])
                if pads[:2] != pads[2:]:
                    raise ValueError(f"{node.name}: asymmetric pads {pads} not supported")
                conv = nn.Conv2d(w.shape[1], w.shape[0], tuple(w.shape[2:]), stride=tuple(attrs.get("strides", [1, 1])),
                                 padding=tuple(pads[:2]), bias=len(node.input) > 2)
                conv.weight.data.copy_(w)
                if len(node.input) > 2:
                    conv.bias.data.copy_(init[node.input[2]])
                layers.append(conv)
            elif op == "Relu":
                layers.append(nn.ReLU())
            elif op == "BatchNormalization":
                scale, bias, mean, var = (init[n] for n in node.input[1:5])
                bn = nn.BatchNorm2d(scale.numel(), eps=attrs.get("epsilon", 1e-5))
                bn.weight.data.copy_(scale), bn.bias.data.copy_(bias)
                bn.running_mean.copy_(mean), bn.running_var.copy_(var)
                layers.append(bn)
            elif op == "LeakyRelu":
                layers.append(nn.LeakyReLU(attrs["alpha"]))
            elif op == "Max":
                layers.append(_ClampMin(float(init[node.input[1]].flatten()[0])))
            elif op == "MaxPool":
                layers.append(nn.MaxPool2d(tuple(attrs["kernel_shape"]), stride=tuple(attrs["strides"])))
            else:
                raise ValueError(f"embedding_model.onnx: unexpected op {op} ({node.name})")
            if node.name in _TAP_NODES:
                self.tap_index.append(len(layers) - 1)
        if len(self.tap_index) != len(_TAP_NODES):
            raise ValueError(f"{path}: tap nodes {_TAP_NODES} not all found")
        self.layers = nn.ModuleList(layers)

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = F.pad(frames.unsqueeze(1), (1, 1))  # (N, 1, 76, 34), as the ONNX Pad on NHWC
        taps = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i in self.tap_index:
                taps.append(pool(x))
        return tuple(taps)


@register
class AudioBackbone(Backbone):
    modality = "audio"
    name = "openwakeword_speech_embedding"
    source_packages = ("torch", "torchaudio", "openwakeword")
    version = 1

    def __init__(self) -> None:
        super().__init__()
        self.front = MelFrontEnd()
        self.embed = EmbeddingNet()
        self.input_spec = InputSpec(
            shape=(None, SAMPLE_RATE),
            dtype="float32",
            host_dtypes=("int16", "float32"),
            description="1 s of 16 kHz mono PCM: int16, or float32 in [-1, 1]",
            opt_shape=(1, SAMPLE_RATE),
            max_shape=(32, SAMPLE_RATE),
            extra={"dim_names": ["batch", "samples"], "sample_rate": SAMPLE_RATE,
                   "host_scale": {"int16": 1.0, "float32": 32768.0}, "float_abs_max": 1.0},
        )
        self.tap_specs = [TapSpec(n, d) for n, d in TAPS.items()]

    def frames(self, pcm: torch.Tensor) -> torch.Tensor:
        """(B, 16000) -> (B, 96, 32) scaled mel frames."""
        return block_floor(self.front(pcm[:, -USED_SAMPLES:]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        mel = self.frames(x)
        windows = torch.stack([mel[:, e - WINDOW:e] for e in WINDOW_ENDS], dim=1)  # (B, 3, 76, 32)
        b = windows.shape[0]
        taps = self.embed(windows.reshape(b * len(WINDOW_ENDS), WINDOW, N_MELS))
        return tuple(t.reshape(b, len(WINDOW_ENDS), t.shape[1]).mean(dim=1) for t in taps)

    def example_input(self, batch: int) -> torch.Tensor:
        t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
        tone = 3000 * np.sin(2 * np.pi * 440 * t) * np.hanning(SAMPLE_RATE)
        return torch.from_numpy(np.repeat(tone[None].astype(np.float32), batch, axis=0))

    def parts(self) -> dict[str, GraphPart]:
        ex = self.example_input(2)
        mel = self.frames(ex)
        return {
            "melblock": GraphPart(MelBlock(self.front), ex[:, :BLOCK_SAMPLES].contiguous(), ("mel",)),
            "embed": GraphPart(self.embed, mel[:, :WINDOW].contiguous(), tuple(f"tap_{n}" for n in TAPS)),
        }

    def preprocessing(self) -> dict[str, Any]:
        return {
            "sample_rate": SAMPLE_RATE, "pcm_scale": "int16 range (float32 [-1,1] x 32768)",
            "used_samples": USED_SAMPLES, "stft": {"n_fft": N_FFT, "win_length": WIN, "hop": HOP,
                                                   "window": "hann periodic, centred"},
            "mel": {"n_mels": N_MELS, "f_min": F_MIN, "f_max": F_MAX, "norm": "slaney", "scale": "slaney"},
            "log": "10*log10(clamp(1e-10)), floor max-80 dB per 8-frame block, x/10+2",
            "windows": {"frames": WINDOW, "ends": list(WINDOW_ENDS)}, "window_pool": "mean",
        }
