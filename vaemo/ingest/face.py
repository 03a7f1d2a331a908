"""The speaker's face: MTCNN on a subsample of frames, one track, smoothed square crops.

Detection runs on every n-th frame, downscaled (on the GPU when there is one, the frames of the videos processed
together in one call); the chosen track is interpolated to every frame, smoothed, widened to a square with margin,
and cropped + resized frame by frame.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import box_iou

from vaemo.config import IngestConfig
from vaemo.errors import ConfigError

LINK_IOU = 0.3  # boxes of consecutive detections overlapping this much belong to one face
# A face that moved fast between two detections: centres within this many face sides, similar size.
LINK_SHIFT = 0.75
LINK_SIZE_RATIO = 1.5


def detector_device(cfg: IngestConfig) -> str:
    """Where MTCNN runs: ``detect_device``, with ``auto`` the GPU when torch sees one."""
    if cfg.detect_device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.detect_device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("ingest.detect_device is 'cuda' but torch sees no GPU here: set it to 'auto' or 'cpu'")
    return cfg.detect_device


@lru_cache(maxsize=4)
def _mtcnn(min_face_size: int, factor: float, device: str):
    from facenet_pytorch import MTCNN

    detector = MTCNN(keep_all=True, device=device, post_process=False, min_face_size=min_face_size, factor=factor)
    # Its pooling layers run about 3x faster channels-last on CPU, with the same detections.
    return detector.to(memory_format=torch.channels_last) if device == "cpu" else detector


@dataclass
class _Request:
    frames: torch.Tensor  # (N, H, W, 3) float, already downscaled
    key: tuple  # what must be equal to share an MTCNN call: frame size, min face size, pyramid factor
    found: list | None = None
    error: Exception | None = None


class FaceDetector:
    """MTCNN on one device, shared by the threads that process the videos of an ingest batch together.

    A thread's detection frames wait in a queue; whichever thread finds the detector idle runs every waiting request
    of the same frame size and settings through it at once, ``max_frames`` frames a call. So a GPU sees the frames
    of many videos in each call while the threads decode and encode; one thread alone gets its own frames run at once.
    """

    def __init__(self, device: str, max_frames: int):
        self.device, self.max_frames = device, max_frames
        self.calls = 0  # MTCNN calls made
        self._changed = threading.Condition()
        self._waiting: list[_Request] = []
        self._busy = False

    @classmethod
    def for_config(cls, cfg: IngestConfig) -> FaceDetector:
        device = detector_device(cfg)
        return cls(device, cfg.detect_batch_cuda if device == "cuda" else cfg.detect_batch)

    def detect(self, frames: torch.Tensor, min_face_size: int, factor: float) -> list[tuple]:
        """MTCNN's (boxes, probs) for each of ``frames``, as ``MTCNN.detect`` gives them."""
        request = _Request(frames, (tuple(frames.shape[1:]), min_face_size, factor))
        with self._changed:
            self._waiting.append(request)
            while request.found is None and request.error is None:
                if self._busy:
                    self._changed.wait()
                    continue
                group = [r for r in self._waiting if r.key == self._waiting[0].key]
                self._waiting = [r for r in self._waiting if r.key != group[0].key]
                self._busy = True
                self._changed.release()
                try:
                    self._run(group)
                finally:
                    self._changed.acquire()
                    self._busy = False
                    self._changed.notify_all()
        if request.error is not None:
            raise request.error
        return request.found

    def _run(self, group: list[_Request]) -> None:
        try:
            _, min_face_size, factor = group[0].key
            detector = _mtcnn(min_face_size, factor, self.device)
            frames = torch.cat([r.frames for r in group])
            found = []
            for begin in range(0, len(frames), self.max_frames):
                boxes, probs = detector.detect(frames[begin : begin + self.max_frames])
                self.calls += 1
                found.extend(zip(boxes, probs, strict=True))
        except Exception as exc:  # noqa: BLE001 - raised again in every thread whose frames it held
            for r in group:
                r.error = exc
            return
        at = 0
        for r in group:
            r.found, at = found[at : at + len(r.frames)], at + len(r.frames)


def detect(
    frames: np.ndarray, cfg: IngestConfig, detector: FaceDetector | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(boxes (N,4) in frame pixels, probs (N,)) per frame, filtered by probability and size; through ``detector``
    (default: one of its own for ``cfg``)."""
    height, width = frames.shape[1:3]
    scale = min(1.0, cfg.detect_max_side / max(height, width))
    small = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    if scale < 1.0:
        small = F.interpolate(small, size=(round(height * scale), round(width * scale)), mode="area")
    small = small.permute(0, 2, 3, 1).contiguous()
    min_side = cfg.min_face_fraction * min(height, width)
    # Faces smaller than min_side are dropped anyway; telling MTCNN skips its largest pyramid levels.
    detector = detector or FaceDetector.for_config(cfg)
    results = []
    for boxes, probs in detector.detect(small, max(12, int(min_side * scale)), cfg.detect_pyramid_factor):
        if boxes is None:
            results.append((np.zeros((0, 4)), np.zeros(0)))
            continue
        # numpy 2 hands back object arrays here; cast before any arithmetic.
        boxes = np.asarray(boxes, dtype=float).reshape(-1, 4) / scale
        probs = np.asarray(probs, dtype=float).reshape(-1)
        sides = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        keep = (probs >= cfg.min_face_prob) & (sides >= min_side)
        results.append((boxes[keep], probs[keep]))
    return results


@dataclass
class FaceTrack:
    frames: list[int]  # indices (into the detection list) where the face was found
    boxes: list[np.ndarray]
    probs: list[float]

    @property
    def score(self) -> float:
        # Large and long-lasting wins: the speaker of a talking-face video fills the frame.
        return float(sum((b[2] - b[0]) * (b[3] - b[1]) for b in self.boxes))


def _centres(boxes: np.ndarray) -> np.ndarray:
    return np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], 1)


def _affinity(boxes: np.ndarray, last: np.ndarray) -> np.ndarray:
    """How well each new box continues each track's last box: IoU, or a near shift of a same-size face."""
    iou = box_iou(torch.tensor(boxes), torch.tensor(last)).numpy()
    sides_new = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])[:, None]
    sides_old = np.maximum(last[:, 2] - last[:, 0], last[:, 3] - last[:, 1])[None, :]
    shift = np.linalg.norm(_centres(boxes)[:, None, :] - _centres(last)[None, :, :], axis=2) / np.maximum(sides_old, 1)
    ratio = np.maximum(sides_new / sides_old, sides_old / sides_new)
    near = (shift <= LINK_SHIFT) & (ratio <= LINK_SIZE_RATIO)
    return np.where(near, np.maximum(iou, LINK_IOU), iou)


def link_tracks(detections: list[tuple[np.ndarray, np.ndarray]], max_gap: int = 2) -> list[FaceTrack]:
    """Greedy linking of per-frame detections into face tracks, best continuations first."""
    tracks: list[FaceTrack] = []
    for index, (boxes, probs) in enumerate(detections):
        open_tracks = [t for t in tracks if index - t.frames[-1] <= max_gap + 1]
        used: set[int] = set()
        if open_tracks and len(boxes):
            affinity = _affinity(boxes, np.stack([t.boxes[-1] for t in open_tracks]))
            for flat in np.argsort(-affinity, axis=None):
                box_i, track_i = np.unravel_index(flat, affinity.shape)
                if affinity[box_i, track_i] < LINK_IOU:
                    break
                track = open_tracks[track_i]
                if box_i in used or track.frames[-1] == index:
                    continue
                track.frames.append(index)
                track.boxes.append(boxes[box_i])
                track.probs.append(float(probs[box_i]))
                used.add(int(box_i))
        for box_i in range(len(boxes)):
            if box_i not in used:
                tracks.append(FaceTrack([index], [boxes[box_i]], [float(probs[box_i])]))
    return tracks


@dataclass
class FaceSpan:
    boxes: np.ndarray  # (T, 4) square crop boxes in frame pixels, the frames of ``span`` only
    span: tuple[int, int]  # [first, last) input frames where the speaker's face is visible
    coverage: float  # share of detection frames in the span where the face was found
    prob_mean: float
    prob_min: float
    faces_max: int  # most faces seen in one detection frame
    tracks: int


@dataclass
class FaceCrop(FaceSpan):
    frames: np.ndarray  # uint8 (T, S, S, 3), cut from the frames of ``span`` along ``boxes``


class NoFace(Exception):
    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) < 2:
        return values
    pad = window // 2
    padded = np.pad(values, ((pad, window - 1 - pad), (0, 0)), mode="edge")
    kernel = np.ones(window) / window
    return np.stack([np.convolve(padded[:, c], kernel, mode="valid") for c in range(values.shape[1])], axis=1)


def crop_boxes(track: FaceTrack, detected_at: np.ndarray, count: int, cfg: IngestConfig) -> np.ndarray:
    """Square crop boxes (count, 4) for every frame: interpolated, smoothed, widened with margin."""
    at = detected_at[track.frames]
    boxes = np.stack(track.boxes)
    every = np.arange(count)
    centres = np.stack(
                       [np.interp(every, at, (boxes[:, 0] + boxes[:, 2]) / 2),
                        np.interp(every, at, (boxes[:, 1] + boxes[:, 3]) / 2)],
                       1)
    sides = np.interp(every, at, np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]))
    smoothed = _smooth(np.concatenate([centres, sides[:, None]], 1), cfg.smooth_frames)
    half = smoothed[:, 2] * cfg.face_scale * (1 + cfg.crop_margin / cfg.crop_size) / 2
    return np.stack([smoothed[:, 0] - half, smoothed[:, 1] - half, smoothed[:, 0] + half, smoothed[:, 1] + half], 1)


def crop(frames: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Crop and resize every frame to (size, size); outside the frame is black.

    Pillow's crop pads out-of-frame regions with black and its bilinear resize is several times
    faster than a tensor op per frame here; boxes are rounded to whole pixels.
    """
    out = np.empty((len(frames), size, size, 3), np.uint8)
    for index, (frame, box) in enumerate(zip(frames, np.rint(boxes).astype(int), strict=True)):
        out[index] = np.asarray(Image.fromarray(frame).crop(tuple(box)).resize((size, size), Image.Resampling.BILINEAR))
    return out


def face_crop(frames: np.ndarray, cfg: IngestConfig, min_frames: int, detector: FaceDetector | None = None) -> FaceCrop:
    """Follow the speaker's face through ``frames`` (T, H, W, 3) and return square crops (see ``face_span``)."""
    found = face_span(frames, cfg, min_frames, detector)
    first, last = found.span
    return FaceCrop(**vars(found), frames=crop(frames[first:last], found.boxes, cfg.crop_size + cfg.crop_margin))


def face_span(frames: np.ndarray, cfg: IngestConfig, min_frames: int, detector: FaceDetector | None = None) -> FaceSpan:
    """Where the speaker's face is in ``frames`` (T, H, W, 3): the span and a square crop box per frame of it.

    The clip is trimmed to the span where the chosen face is visible (a shot change or the
    speaker leaving the frame ends it); a span under ``min_frames`` is refused.
    """
    detected_at = np.arange(0, len(frames), cfg.detect_every)
    detections = detect(frames[detected_at], cfg, detector)
    faces_max = max((len(b) for b, _ in detections), default=0)
    tracks = link_tracks(detections)
    if not tracks:
        raise NoFace("no_face", "no face found in any sampled frame")
    if cfg.multi_face == "skip" and faces_max > 1:
        raise NoFace("several_faces", f"{faces_max} faces in one frame and multi_face is 'skip'")
    best = max(tracks, key=lambda t: t.score)
    half = cfg.detect_every // 2
    first = 0 if best.frames[0] == 0 else int(detected_at[best.frames[0]]) - half
    last = len(frames) if best.frames[-1] == len(detected_at) - 1 else int(detected_at[best.frames[-1]]) + half + 1
    if last - first < min_frames:
        raise NoFace(
            "no_face",
            f"the speaker's face is visible for {(last - first) / cfg.fps:.2f} s, under {min_frames / cfg.fps:.2f} s",
        )
    coverage = len(best.frames) / (best.frames[-1] - best.frames[0] + 1)
    if coverage < cfg.min_face_coverage:
        raise NoFace(
            "no_face",
            f"the speaker's face is found in {coverage:.0%} of sampled frames (needs {cfg.min_face_coverage:.0%})",
        )
    return FaceSpan(
        boxes=crop_boxes(best, detected_at, len(frames), cfg)[first:last],
        span=(first, last),
        coverage=coverage,
        prob_mean=float(np.mean(best.probs)),
        prob_min=float(np.min(best.probs)),
        faces_max=faces_max,
        tracks=len(tracks),
    )
