"""What the dataset publishers show: the prepared samples behind each timeline segment.

Why apart from ``publish``: the streamer decides *when* (clock, sockets, scene control);
this decides *what*. Every piece of content (a camera image, a 1 s speech clip, a 100-row
BasicMotions recording) is a pure function of (seed, modality, segment key, piece index)
and of the segment's class and pool, so it can be re-derived and checked offline
(:meth:`DatasetContent.sample_index`) and never depends on how long a segment lasts.
"""

from __future__ import annotations

import logging
import zlib
from typing import TYPE_CHECKING

import numpy as np

from common.config import ConfigError
from demodata.scene import BASE, SCENE, ClassSchedule, Segment, SegmentTrack, Timeline
from demodata.store import load, speech_split

if TYPE_CHECKING:
    from demodata.publish import StreamerConfig

log = logging.getLogger("continua.demodata.publish")

MIC_RATE = 16000
IMU_RATE = 100  # Hz: replay rate of the 10 Hz BasicMotions recordings (10x compression)
IDENTITY_QUAT = (0.0, 0.0, 0.0, 1.0)


def camera_frame(img: np.ndarray, size: int, interpolation: str = "nearest") -> np.ndarray:
    """A 28x28 grey dataset image as the demo camera shows it: size x size rgb8. Also used by
    the agent's dataset source, so that taught samples look exactly like live frames."""
    if interpolation == "linear":
        import cv2

        big = cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)
    else:
        idx = np.arange(size) * img.shape[0] // size
        big = img[idx][:, idx]
    return np.ascontiguousarray(np.repeat(big[:, :, None], 3, axis=2))


def _rng(*parts: int | str) -> np.random.Generator:
    """A generator seeded by the parts (strings via crc32: stable across processes)."""
    return np.random.default_rng([zlib.crc32(p.encode()) if isinstance(p, str) else int(p) for p in parts])


def split_pool(idx: np.ndarray, share: float) -> tuple[np.ndarray, np.ndarray]:
    """(scene, base) sample indices of one class: the leading ``share`` (at least one
    sample each side) for overrides only, the rest for the schedule, so instances taught
    during an override never come back in the schedule. ``share`` 0: both get all; a class
    with fewer than two samples then has none on either side."""
    if share <= 0:
        return idx, idx
    if len(idx) < 2:
        return idx[:0], idx[:0]
    n = min(max(1, round(share * len(idx))), len(idx) - 1)
    return idx[:n], idx[n:]


def class_pools(idx_by_class: dict[int, np.ndarray], share: float) -> dict[str, dict[int, np.ndarray]]:
    """``{BASE: {class: indices}, SCENE: {class: indices}}`` by :func:`split_pool`."""
    pools: dict[str, dict[int, np.ndarray]] = {BASE: {}, SCENE: {}}
    for c, idx in idx_by_class.items():
        pools[SCENE][c], pools[BASE][c] = split_pool(idx, share)
    return pools


class DatasetContent:
    """The prepared datasets, their sample pools and the timeline; content by segment."""

    def __init__(self, cfg: StreamerConfig) -> None:
        self.cfg = cfg
        fm = load("fashion_mnist")
        self.class_names = [str(s) for s in fm["class_names"]]
        self.images = fm[f"x_{cfg.split}"]
        sp = speech_split(load("speech"), cfg.split)
        self.clips = sp["audio"]
        bm = load("basic_motions")
        self.motions = bm[f"x_{cfg.split}"]
        # modality -> BASE | SCENE -> class (imu: activity) -> sample indices
        self.pools = {
            "camera": class_pools(
                {c: np.flatnonzero(fm[f"y_{cfg.split}"] == c) for c in range(10)}, cfg.scene_share
            ),
            "mic": class_pools({c: np.flatnonzero(sp["y"] == c) for c in range(10)}, cfg.scene_share),
            "imu": class_pools(
                {a: np.flatnonzero(bm[f"y_{cfg.split}"] == a) for a in range(4)}, cfg.scene_share
            ),
        }
        self.showable = [c for c in range(10) if self._has_samples(c, SCENE)]  # classes show() accepts
        for c in cfg.classes:
            if not self._has_samples(c, BASE):
                kept = f" once scene_share={cfg.scene_share} keeps some for shows" if cfg.scene_share else ""
                raise ConfigError(f"class {c} has no samples in split {cfg.split!r} of every dataset{kept}")
        self.schedule = ClassSchedule(cfg.classes, cfg.order, cfg.seed)
        self.dwell_ns = round(cfg.dwell_s * 1e9)
        self.timeline = Timeline(self.schedule, self.dwell_ns)
        clip_len = self.clips.shape[1]
        self.mic = SegmentTrack(
            MIC_RATE,
            self.timeline,
            clip_len,
            self._mic_piece,
            # a segment planned shorter than a clip hears the middle of the word
            phase=lambda seg: max(0, (clip_len - round(seg.planned_ns * MIC_RATE / 1e9)) // 2),
        )
        self.imu = SegmentTrack(IMU_RATE, self.timeline, self.motions.shape[2], self._imu_piece)
        self._frame_cache: tuple[tuple, np.ndarray] | None = None
        log.info(
            "%d images, %d speech clips (%d voices), %d IMU recordings from split %r; showable %s",
            len(self.images),
            len(self.clips),
            len(set(sp["voice"].tolist())),
            len(self.motions),
            cfg.split,
            self.showable,
        )

    def _has_samples(self, c: int, pool: str) -> bool:
        return all(len(self.pools[m][pool][c % 4 if m == "imu" else c]) for m in self.pools)

    def label_at(self, offset_ns: int) -> int:
        """The class shown ``offset_ns`` after the start (overrides included)."""
        return self.timeline.segment(offset_ns).class_id

    def sample_index(self, modality: str, seg: Segment, piece: int) -> int:
        """The dataset index (into ``images``, ``clips`` or ``motions``) that piece ``piece``
        of segment ``seg`` shows: drawn from the segment's pool for its class, seeded by
        (seed, modality, segment key, piece). Camera pieces: 0 ("dwell") or the frame."""
        c = seg.class_id % 4 if modality == "imu" else seg.class_id
        return int(_rng(self.cfg.seed, modality, *seg.key, piece).choice(self.pools[modality][seg.pool][c]))

    def _resize(self, img: np.ndarray) -> np.ndarray:
        return camera_frame(img, self.cfg.image_size, self.cfg.interpolation)

    def frame(self, k: int, offset_ns: int) -> tuple[int, np.ndarray]:
        """(label, rgb8 image) of camera frame ``k`` taken ``offset_ns`` after the start."""
        seg = self.timeline.segment(offset_ns)
        if self.cfg.camera_resample == "frame":
            return seg.class_id, self._resize(self.images[self.sample_index("camera", seg, k)])
        key = (seg.key, seg.class_id)
        if self._frame_cache is None or self._frame_cache[0] != key:
            self._frame_cache = (key, self._resize(self.images[self.sample_index("camera", seg, 0)]))
        return seg.class_id, self._frame_cache[1]

    def _mic_piece(self, seg: Segment, q: int) -> np.ndarray:
        """One 1 s clip of the segment's class over background noise."""
        clip = self.clips[self.sample_index("mic", seg, q)]
        rng = _rng(self.cfg.seed, "mic-noise", *seg.key, q)
        noise = rng.normal(0.0, 32767 * 10 ** (self.cfg.mic_noise_dbfs / 20), len(clip))
        return np.clip(clip + np.round(noise), -32768, 32767).astype(np.int16)

    def _imu_piece(self, seg: Segment, q: int) -> np.ndarray:
        """One recording (100 rows) of the segment's activity as Imu values rows."""
        rows = self.motions[self.sample_index("imu", seg, q)].T.astype(np.float64)  # (100, 6)
        out = np.empty((len(rows), 10), dtype=np.float64)
        out[:, 0:4] = IDENTITY_QUAT
        out[:, 4:7] = rows[:, 3:6]  # gyro -> angular_velocity
        out[:, 7:10] = rows[:, 0:3]  # accelerometer -> linear_acceleration
        return out
