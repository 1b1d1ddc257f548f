"""IMU backbone: a frozen MiniRocket-style random-kernel transform (no pretrained IMU model ships).

Graph input: (B, 6, 100) float32, 1 s at 100 Hz; channels acc x, y, z (m/s^2) then gyro
x, y, z (rad/s). Acceleration is divided by 9.80665 (-> g), gyro by 1 rad/s.

Transform (Dempster et al., MiniRocket, 2021, made data independent so it is frozen before any
data is seen): the 84 length-9 kernels with weights -1 and three 2s (all 9-choose-3 placements,
so each kernel sums to zero and ignores gravity and gyro offsets); 4 dilation groups
(1, 2, 4, 8), each a tap, so taps see increasing temporal scales; per dilation group each kernel
sums the convolutions of a random subset of 1-3 channels, and is compared with 2 biases; each
(kernel, bias) gives a PPV feature (proportion of positive values over time). Unlike MiniRocket
the biases are not fitted on training data: they are N(0, 1) draws (the kernel output on
signals in g and rad/s is of order 1). Seed 20240611 (numpy default_rng); channel subsets and
biases are the only random parts. Each tap is (B, 84 * 2 = 168).
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from export.backbones import register
from export.backbones.base import Backbone
from export.taps import InputSpec, TapSpec

SEED = 20240611
CHANNELS, LENGTH, RATE_HZ = 6, 100, 100
DILATIONS = (1, 2, 4, 8)
BIASES_PER_KERNEL = 2
ACC_SCALE, GYRO_SCALE = 9.80665, 1.0


def minirocket_kernels() -> np.ndarray:
    """The 84 MiniRocket kernels (84, 9): -1 everywhere, 2 at three positions."""
    ks = []
    for idx in itertools.combinations(range(9), 3):
        k = -np.ones(9, dtype=np.float32)
        k[list(idx)] = 2.0
        ks.append(k)
    return np.stack(ks)


@register
class ImuBackbone(Backbone):
    modality = "imu"
    name = "minirocket_frozen"
    source_packages = ("torch", "numpy")
    version = 2

    def __init__(self, seed: int = SEED) -> None:
        super().__init__()
        rng = np.random.default_rng(seed)
        kernels = minirocket_kernels()
        n_k = kernels.shape[0]
        masks, biases = [], []
        for _ in DILATIONS:
            m = np.zeros((n_k, CHANNELS), dtype=np.float32)
            for k in range(n_k):
                n_ch = int(rng.integers(1, 4))
                m[k, rng.choice(CHANNELS, size=n_ch, replace=False)] = 1.0
            masks.append(m)
            biases.append(rng.standard_normal((n_k, BIASES_PER_KERNEL)).astype(np.float32))
        # channel subset folded into the weights: kernel k of group g sums the convolutions of its
        # channels, i.e. one conv1d with weight[k, c] = mask[g, k, c] * kernel[k]
        weights = np.stack([m[:, :, None] * kernels[:, None, :] for m in masks])  # (G, 84, 6, 9)
        self.register_buffer("weights", torch.from_numpy(weights))
        self.register_buffer("biases", torch.from_numpy(np.stack(biases)))  # (G, 84, 2)
        scale = np.array([ACC_SCALE] * 3 + [GYRO_SCALE] * 3, dtype=np.float32)
        self.register_buffer("inv_scale", torch.from_numpy(1.0 / scale).view(1, CHANNELS, 1))
        self.seed = seed
        self.input_spec = InputSpec(
            shape=(None, CHANNELS, LENGTH),
            dtype="float32",
            host_dtypes=("float32", "float64"),
            description="1 s IMU window at 100 Hz: acc x,y,z (m/s^2) then gyro x,y,z (rad/s)",
            opt_shape=(1, CHANNELS, LENGTH),
            max_shape=(64, CHANNELS, LENGTH),
            extra={"dim_names": ["batch", "channels", "time"], "rate_hz": RATE_HZ},
        )
        self.tap_specs = [TapSpec(f"d{d}", n_k * BIASES_PER_KERNEL) for d in DILATIONS]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b = x.shape[0]
        x = x * self.inv_scale
        taps = []
        for g, d in enumerate(DILATIONS):
            z = F.conv1d(x, self.weights[g], dilation=d, padding=4 * d)  # (B, 84, L)
            above = (z.unsqueeze(2) > self.biases[g].unsqueeze(-1)).to(torch.float32)  # (B, 84, 2, L)
            taps.append(above.mean(dim=3).reshape(b, -1))
        return tuple(taps)

    def example_input(self, batch: int) -> torch.Tensor:
        t = np.arange(LENGTH) / RATE_HZ
        sig = np.stack([np.sin(2 * np.pi * (c + 1) * t + c) * (9.8 if c < 3 else 2.0) for c in range(CHANNELS)])
        return torch.from_numpy(np.repeat(sig[None].astype(np.float32), batch, axis=0))

    def preprocessing(self) -> dict[str, Any]:
        return {
            "channels": ["acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z"],
            "scale": {"acc": f"/ {ACC_SCALE} (m/s^2 -> g)", "gyro": f"/ {GYRO_SCALE} (rad/s)"},
            "transform": "MiniRocket-style, data-independent biases N(0,1)", "seed": self.seed,
            "dilations": list(DILATIONS), "kernels": 84, "biases_per_kernel": BIASES_PER_KERNEL,
            "pooling": "PPV", "padding": "zeros, 4*dilation each side",
        }
