"""Voice activity: where in a recording someone speaks (silero-VAD, whose weights ship in its wheel)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

# silero-VAD keeps its recurrent state in the model between the chunks of one call, so a model serves one call at a
# time: threads that find none idle load their own, kept here for later calls.
_idle_models: list = []
_idle_models_lock = threading.Lock()


@contextmanager
def _vad_model() -> Iterator:
    with _idle_models_lock:
        model = _idle_models.pop() if _idle_models else None
    if model is None:
        from silero_vad import load_silero_vad

        model = load_silero_vad()
    try:
        yield model
    finally:
        with _idle_models_lock:
            _idle_models.append(model)


def peak_dbfs(samples: np.ndarray) -> float:
    peak = float(np.max(np.abs(samples))) if samples.size else 0.0
    return -120.0 if peak <= 0 else 20.0 * float(np.log10(peak))


def speech_segments(samples: np.ndarray, sample_rate: int, threshold: float) -> list[tuple[float, float]]:
    """Speech spans in seconds. The tensor is passed directly: silero's own file reader is not used."""
    from silero_vad import get_speech_timestamps

    with _vad_model() as model:
        spans = get_speech_timestamps(
            torch.from_numpy(np.ascontiguousarray(samples)),
            model,
            sampling_rate=sample_rate,
            threshold=threshold,
            return_seconds=True,
        )
    return [(float(s["start"]), float(s["end"])) for s in spans]


def speech_ratio(segments: list[tuple[float, float]], start: float, end: float) -> float:
    """Share of ``[start, end)`` covered by speech."""
    if end <= start:
        return 0.0
    covered = sum(max(0.0, min(e, end) - max(s, start)) for s, e in segments)
    return min(1.0, covered / (end - start))


def speech_windows(
    segments: list[tuple[float, float]],
    duration: float,
    merge_gap: float,
    window: float,
    min_length: float,
    min_speech: float,
) -> list[tuple[float, float]]:
    """Cut speech into clips of ``min_length`` to ``window`` seconds.

    Segments closer than ``merge_gap`` are merged. A long utterance is split into equal parts, so
    no short remainder is thrown away; a short one is widened around its centre to ``min_length``
    and kept when at least ``min_speech`` of the widened clip is speech.
    """
    merged: list[list[float]] = []
    for start, end in sorted(segments):
        if merged and start - merged[-1][1] <= merge_gap:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    windows: list[tuple[float, float]] = []
    for start, end in merged:
        length = end - start
        if length < min_length:
            if duration < min_length:
                continue
            start = min(max(0.0, (start + end - min_length) / 2), duration - min_length)
            end = start + min_length
            if speech_ratio(segments, start, end) < min_speech or (windows and start < windows[-1][1]):
                continue
            windows.append((start, end))
            continue
        parts = int(np.ceil(length / window))
        step = length / parts
        windows.extend((start + i * step, start + (i + 1) * step) for i in range(parts))
    return [(round(s, 3), round(e, 3)) for s, e in windows]
