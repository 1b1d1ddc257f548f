"""Backbone benchmark: latency, throughput and memory per backbone and backend.

    python -m benchmarks.backbones [--quick] [--device cpu|cuda] [--threads 2]

Measures, in one run, per backbone (image, audio, imu) and per available backend (onnxruntime,
torch eager, tensorrt): batch-1 and batch-8 latency p50/p99, throughput, peak RSS, and the
speed-up of the default backend (onnxruntime) over torch eager; then one fused sample (a camera
frame + the latest 1 s of audio, computed incrementally: one new 80 ms block, + 1 s of IMU).
Writes benchmarks/results/backbones.json and backbones.png; the last stdout line is one JSON
object. Inputs are real: scikit-learn digits, an espeak-ng word, sktime BasicMotions.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import wave
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("benchmarks.backbones")
GOAL_FUSED_MS, GOAL_SPEEDUP = 15.0, 2.0


@dataclass(kw_only=True)
class Config:
    quick: bool = False
    device: str = "cpu"
    threads: int = 2
    models: Path = Path("models")
    out: Path = Path("benchmarks/results")

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")

    @property
    def iters(self) -> int:
        return 20 if self.quick else 100


def real_inputs(batch: int = 8) -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = (load_digits().images[:batch] * (255 / 16)).astype(np.uint8)
    img = np.repeat(np.kron(digits, np.ones((28, 28), dtype=np.uint8))[..., None], 3, axis=-1)  # 224 px
    pcm = np.zeros((batch, 16000), dtype=np.int16)
    if shutil.which("espeak-ng"):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "w.wav"
            subprocess.run(["espeak-ng", "-v", "en-us", "-s", "120", "-w", str(path), "ankle boot sneaker"],
                           check=True, capture_output=True)
            with wave.open(str(path)) as w:
                rate, x = w.getframerate(), np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
        idx = np.linspace(0, len(x) - 1, int(len(x) * 16000 / rate)).astype(int)  # crude resample is fine for timing
        x = x[idx][:16000]
        pcm[:, : len(x)] = x
    from sktime.datasets import load_basic_motions

    imu, _ = load_basic_motions(split="test", return_type="numpy3D")
    return {"image": np.ascontiguousarray(img), "audio": pcm, "imu": np.ascontiguousarray(imu[:batch].astype(np.float32))}


def timeit(fn, iters: int, warmup: int = 5) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return {"p50_ms": float(np.percentile(ts, 50)), "p99_ms": float(np.percentile(ts, 99)), "n": iters}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def backend_kwargs(kind: str, cfg: Config) -> dict:
    if kind == "tensorrt":
        return {"wait": True}
    return {"device": cfg.device, "threads": cfg.threads}


def run(cfg: Config) -> dict:
    import torch

    from export import load_backend
    from export.backends import available_kinds
    from export.incremental import IncrementalAudioExtractor

    torch.set_num_threads(cfg.threads)
    kinds = [k for k, (ok, _) in available_kinds().items() if ok and (k != "tensorrt" or cfg.device == "cuda")]
    inputs = real_inputs(8)
    rows = []
    for modality, x in inputs.items():
        for kind in kinds:
            with load_backend(modality, kind, cfg.models, **backend_kwargs(kind, cfg)) as b:
                b1 = timeit(lambda b=b, x=x: b.extract(x[:1]), cfg.iters)
                b8 = timeit(lambda b=b, x=x: b.extract(x), max(cfg.iters // 4, 10))
            rows.append({"modality": modality, "backend": kind, "batch1": b1, "batch8": b8,
                         "throughput_per_s": 8e3 / b8["p50_ms"], "peak_rss_mib": peak_rss_mib()})
            log.info("%s/%s b1 p50 %.2f ms b8 p50 %.2f ms", modality, kind, b1["p50_ms"], b8["p50_ms"])
    speedup = {}
    for m in inputs:
        ort = next(r for r in rows if r["modality"] == m and r["backend"] == "onnxruntime")
        te = next(r for r in rows if r["modality"] == m and r["backend"] == "torch")
        speedup[m] = te["batch1"]["p50_ms"] / ort["batch1"]["p50_ms"]
    # fused sample, default backend: camera frame + incremental audio (one new 80 ms block) + IMU second
    img = load_backend("image", "onnxruntime", cfg.models, device=cfg.device, threads=cfg.threads)
    imu = load_backend("imu", "onnxruntime", cfg.models, device=cfg.device, threads=cfg.threads)
    inc = IncrementalAudioExtractor(cfg.models, threads=cfg.threads)
    stream = np.tile(inputs["audio"][0], 30)
    inc.push(stream[:16000])
    pos = [16000]

    def fused() -> None:
        img.extract(inputs["image"][:1])
        inc.push(stream[pos[0]:pos[0] + 1280])
        pos[0] = pos[0] + 1280 if pos[0] + 2560 < len(stream) else 16000
        assert inc.taps() is not None
        imu.extract(inputs["imu"][:1])

    fused_t = timeit(fused, cfg.iters * 2)
    audio_ort = next(r for r in rows if r["modality"] == "audio" and r["backend"] == "onnxruntime")
    fused_full = sum(next(r for r in rows if r["modality"] == m and r["backend"] == "onnxruntime")["batch1"]["p50_ms"]
                     for m in inputs)
    return {
        "config": {k: str(v) for k, v in asdict(cfg).items()},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
                    "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__},
        "rows": rows, "speedup_default_over_torch_b1": speedup,
        "fused_sample": {**fused_t, "audio_incremental": True, "sum_of_full_b1_p50_ms": fused_full,
                         "audio_full_second_b1_p50_ms": audio_ort["batch1"]["p50_ms"]},
        "goals": {"fused_p50_under_ms": GOAL_FUSED_MS, "fused_ok": fused_t["p50_ms"] < GOAL_FUSED_MS,
                  "speedup_min": GOAL_SPEEDUP, "speedup_ok": all(v >= GOAL_SPEEDUP for v in speedup.values())},
        "peak_rss_mib": peak_rss_mib(),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    mods = sorted({r["modality"] for r in rows})
    kinds = sorted({r["backend"] for r in rows})
    fig, ax = plt.subplots(figsize=(8, 4))
    w = 0.8 / len(kinds)
    for i, k in enumerate(kinds):
        vals = [next((r["batch1"]["p50_ms"] for r in rows if r["modality"] == m and r["backend"] == k), 0) for m in mods]
        ax.bar(np.arange(len(mods)) + i * w, vals, w, label=k)
    ax.axhline(result["fused_sample"]["p50_ms"], color="k", ls="--", label="fused sample (ORT, incremental audio)")
    ax.axhline(GOAL_FUSED_MS, color="r", ls=":", label=f"goal {GOAL_FUSED_MS:.0f} ms")
    ax.set_xticks(np.arange(len(mods)) + 0.4 - w / 2, mods)
    ax.set_ylabel("batch-1 latency p50 (ms)")
    ax.set_title(f"backbones, {result['config']['threads']} threads, {result['config']['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.backbones", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--models", type=Path, default=Path("models"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    a = p.parse_args(argv)
    cfg = Config(quick=a.quick, device=a.device, threads=a.threads, models=a.models, out=a.out)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    print(f"config: {cfg}", file=sys.stderr)
    result = run(cfg)
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "backbones.json").write_text(json.dumps(result, indent=2))
    plot(result, cfg.out / "backbones.png")
    for r in result["rows"]:
        print(f"{r['modality']:6s} {r['backend']:12s} b1 p50 {r['batch1']['p50_ms']:7.2f} p99 {r['batch1']['p99_ms']:7.2f}"
              f" | b8 p50 {r['batch8']['p50_ms']:7.2f} p99 {r['batch8']['p99_ms']:7.2f} | {r['throughput_per_s']:7.1f}/s"
              f" | rss {r['peak_rss_mib']:.0f} MiB")
    summary = {"fused_p50_ms": round(result["fused_sample"]["p50_ms"], 2),
               "fused_p99_ms": round(result["fused_sample"]["p99_ms"], 2),
               "speedup": {k: round(v, 2) for k, v in result["speedup_default_over_torch_b1"].items()},
               **{k: v for k, v in result["goals"].items() if k.endswith("_ok")},
               "json": str(cfg.out / "backbones.json"), "png": str(cfg.out / "backbones.png")}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
