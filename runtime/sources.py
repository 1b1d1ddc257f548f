"""Where the samples of a learn-new-task come from when they are not captured live.

A dataset split or an MCAP recording
(live capture is done by the agent's serving loop, see ``runtime.agent``).

Why raw samples and not cached features: every source goes through the agent's own
backbones (``runtime.backbone_stage.FeatureExtractor``), exactly as live frames do, so a task
taught from a recording or a dataset trains on the same taps the robot will see.

The dataset source pairs modalities by class as the demo streams do (class ``c`` =
Fashion-MNIST image of class ``c`` + spoken name of class ``c`` + BasicMotions activity
``c % 4``; synthetic pairing, as AV-MNIST); speech voices are split leave-voices-out.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from demodata.publish import camera_frame
from demodata.store import load, speech_split
from runtime.errors import CommandError
from runtime.intake import Sample
from sensors.mcap_io import read_messages
from sensors.window import StreamWindow
from sensors.wire import Audio, Image, Imu

log = logging.getLogger(__name__)

IMAGE_SIZE = 224


def _class_index(class_names: list[str], words: list[str]) -> dict[str, int]:
    """Class id by spoken word ("t-shirt") or dataset name ("T-shirt/top"), case-insensitive; only
    the words of the image classes (the speech set also holds the digit names, ids 10..19)."""
    index = {n.lower(): i for i, n in enumerate(class_names)}
    index.update({w.lower(): i for i, w in enumerate(words[: len(class_names)])})
    return index


def dataset_samples(labels: list[str], split: str, *, per_class: int, seed: int = 0) -> tuple[list[Sample], list[str]]:
    """``per_class`` paired samples for each class name in ``labels`` from ``split``."""
    if split not in ("train", "test"):
        raise CommandError("bad_args", f"dataset split must be 'train' or 'test', got {split!r}")
    fm = load("fashion_mnist")
    speech = load("speech")
    index = _class_index([str(s) for s in fm["class_names"]], [str(w) for w in speech["words"]])
    unknown = [lab for lab in labels if lab.lower() not in index]
    if unknown:
        raise CommandError("bad_args", f"labels {unknown} are not dataset classes; known: {[str(w) for w in speech['words'][: len(fm['class_names'])]]}")
    sp = speech_split(speech, split)
    bm = load("basic_motions")
    rng = np.random.default_rng([seed, len(split)])
    samples: list[Sample] = []
    out_labels: list[str] = []
    for lab in labels:
        c = index[lab.lower()]
        imgs = np.flatnonzero(fm[f"y_{split}"] == c)
        clips = np.flatnonzero(sp["y"] == c)
        motions = np.flatnonzero(bm[f"y_{split}"] == c % 4)
        # distinct images (a holdout must not repeat a training image); clips and motions are fewer
        picks = rng.choice(imgs, per_class, replace=per_class > len(imgs))
        for pick in picks:
            img = camera_frame(fm[f"x_{split}"][pick], IMAGE_SIZE)
            audio = sp["audio"][rng.choice(clips)].astype(np.float32) / 32768.0
            imu = bm[f"x_{split}"][rng.choice(motions)].astype(np.float32)  # (6, 100): acc xyz, gyro xyz
            samples.append(Sample(stamp_ns=0, image=img, audio=audio, imu=np.ascontiguousarray(imu)))
            out_labels.append(lab)
    return samples, out_labels


def mcap_samples(paths: list[Path], labels: list[str], *, topics: dict[str, str], max_per_file: int = 2000,
                 audio_window: int = 16000, imu_window: int = 100) -> tuple[list[Sample], list[str]]:
    """One sample per recorded camera frame (with the audio/IMU windows at that moment),
    labelled by the recording it comes from: ``paths[i]`` shows ``labels[i]``."""
    if len(paths) != len(labels):
        raise CommandError("bad_args", f"mcap source needs one recording per label: {len(paths)} files for {len(labels)} labels")
    samples: list[Sample] = []
    out: list[str] = []
    for path, lab in zip(paths, labels, strict=True):
        if not path.is_file():
            raise CommandError("bad_args", f"recording {path} does not exist")
        audio = StreamWindow(kind="audio", window=audio_window, channels=1, rate_hz=16000.0)
        imu = StreamWindow(kind="imu", window=imu_window, channels=6, rate_hz=100.0)
        count = 0
        for topic, msg in read_messages(path):
            if topic == topics["audio"] and isinstance(msg, Audio):
                audio.push(msg)
            elif topic == topics["imu"] and isinstance(msg, Imu):
                imu.push(msg)
            elif topic == topics["image"] and isinstance(msg, Image) and msg.encoding != "jpeg":
                a, m = audio.latest(), imu.latest()
                rgb = msg.data if msg.encoding == "rgb8" else (msg.data[:, :, ::-1] if msg.encoding == "bgr8" else np.repeat(msg.data, 3, axis=2))
                samples.append(Sample(stamp_ns=msg.stamp_ns, image=np.ascontiguousarray(rgb),
                                      audio=None if a is None else a[:, 0].copy(),
                                      imu=None if m is None else np.ascontiguousarray(m.T)))
                out.append(lab)
                count += 1
                if count >= max_per_file:
                    break
        log.info("%s: %d samples labelled %r", path, count, lab)
    if not samples:
        raise CommandError("bad_args", f"no camera frames on topic {topics['image']!r} in {[str(p) for p in paths]}")
    return samples, out
