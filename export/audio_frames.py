"""Framing constants of the speech backbone's input, shared by its torch and torch-free users.

Framing of the speech backbone's input (numbers only, no torch): the incremental extractor,
which runs in the torch-free serving process, and the torch backbone share them."""

from __future__ import annotations

SAMPLE_RATE = 16000
N_FFT, WIN, HOP, N_MELS, F_MIN, F_MAX, TOP_DB = 512, 400, 160, 32, 60.0, 3800.0, 80.0
BLOCK = 8  # mel frames per block (80 ms): top-db floor scope and embedding hop
WINDOW = 76  # mel frames per embedding window
N_FRAMES = 96
USED_SAMPLES = (N_FRAMES - 1) * HOP + N_FFT  # 15712
BLOCK_SAMPLES = (BLOCK - 1) * HOP + N_FFT  # 1632 samples give one block of 8 frames
WINDOW_ENDS = (80, 88, 96)
