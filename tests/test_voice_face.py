"""Speech windows and face tracks on known inputs."""

import threading

import numpy as np
import pytest
import torch

from vaemo import synth
from vaemo.config import IngestConfig
from vaemo.errors import ConfigError
from vaemo.ingest import face, media, voice


def test_speech_windows_merge_split_and_widen():
    segments = [(0.0, 4.0), (4.3, 9.0), (12.0, 13.5), (20.0, 20.3)]
    windows = voice.speech_windows(segments, 30.0, merge_gap=0.5, window=4.0, min_length=2.56, min_speech=0.35)
    # 0-9 s merges and splits into 3 equal parts; 12-13.5 widens to 2.56 s; 20-20.3 is too little speech.
    assert windows[:3] == [(0.0, 3.0), (3.0, 6.0), (6.0, 9.0)]
    assert windows[3] == pytest.approx((11.47, 14.03), abs=1e-3) and len(windows) == 4


def test_short_recording_is_one_window_or_none():
    assert voice.speech_windows([(0.3, 1.5)], 2.0, 0.5, 8.0, 2.0, 0.35) == [(0.0, 2.0)]
    assert voice.speech_windows([(0.3, 0.5)], 2.0, 0.5, 8.0, 2.0, 0.35) == []
    assert voice.speech_ratio([(0.0, 1.0), (2.0, 3.0)], 0.5, 2.5) == pytest.approx(0.5)


def test_vad_hears_speech_and_not_a_tone(tmp_path):
    speech = media.decode_audio(synth.speak("the weather is lovely today", tmp_path / "s.wav"), 16000, 30)
    tone = np.sin(2 * np.pi * 220 * np.arange(32000) / 16000).astype(np.float32) * 0.5
    spans = voice.speech_segments(speech, 16000, 0.5)
    assert spans and sum(e - s for s, e in spans) > 0.5 * len(speech) / 16000
    assert voice.speech_segments(tone, 16000, 0.5) == []
    assert voice.peak_dbfs(np.zeros(100, np.float32)) == -120.0


def test_vad_in_threads_at_once_hears_what_it_hears_alone(tmp_path):
    """Its recurrent state lives in the model: threads at once must not share one."""
    recordings = [media.decode_audio(synth.speak(text, tmp_path / f"{i}.wav"), 16000, 30)
                  for i, text in enumerate(["the weather is lovely today", "please call me back tomorrow morning"])]
    recordings.append(np.concatenate([np.zeros(16000, np.float32), recordings[0]]))
    alone = [voice.speech_segments(samples, 16000, 0.5) for samples in recordings]
    start, together = threading.Barrier(len(recordings) * 2), {}

    def hear(index: int) -> None:
        start.wait()
        together[index] = voice.speech_segments(recordings[index % len(recordings)], 16000, 0.5)

    threads = [threading.Thread(target=hear, args=(i,)) for i in range(len(recordings) * 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert [together[i] for i in range(len(threads))] == alone * 2


def box(x, y, side=40):
    return np.array([x, y, x + side, y + side], dtype=float)


def test_link_tracks_follows_moving_faces_apart():
    """Two faces; the first moves 25 px per detection (IoU < 0.3) and is still one track."""
    detections = [(np.stack([box(10 + 25 * i, 10), box(200, 100)]), np.array([0.99, 0.98])) for i in range(6)]
    tracks = face.link_tracks(detections)
    assert sorted(len(t.frames) for t in tracks) == [6, 6]
    moving = min(tracks, key=lambda t: t.boxes[0][0])
    assert [b[0] for b in moving.boxes] == [10 + 25 * i for i in range(6)]


def test_link_tracks_splits_at_a_jump_and_a_long_gap():
    detections = [(np.stack([box(10, 10)]), np.array([0.99]))] * 3 + [(np.stack([box(300, 300)]), np.array([0.99]))]
    assert sorted(len(t.frames) for t in face.link_tracks(detections)) == [1, 3]
    empty = (np.zeros((0, 4)), np.zeros(0))
    gapped = [detections[0], empty, empty, empty, empty, detections[0]]
    assert len(face.link_tracks(gapped, max_gap=2)) == 2


def test_crop_boxes_are_square_smooth_and_cover_every_frame():
    cfg = IngestConfig(detect_every=5, smooth_frames=5, face_scale=1.5, crop_size=160, crop_margin=32)
    track = face.FaceTrack([0, 1, 2], [box(0, 0, 40), box(10, 0, 40), box(20, 0, 40)], [1.0] * 3)
    boxes = face.crop_boxes(track, np.array([0, 5, 10]), 11, cfg)
    sides = boxes[:, 2] - boxes[:, 0]
    assert boxes.shape == (11, 4) and np.allclose(sides, boxes[:, 3] - boxes[:, 1])
    assert np.allclose(sides, 40 * 1.5 * (1 + 32 / 160))
    centres = (boxes[:, 0] + boxes[:, 2]) / 2
    assert np.all(np.diff(centres) >= -1e-9) and centres[0] >= 20 - 1e-9 and centres[-1] <= 40 + 1e-9


def test_crop_pads_outside_the_frame_with_black():
    frames = np.full((2, 50, 50, 3), 200, np.uint8)
    out = face.crop(frames, np.array([[-50.0, -50.0, 50.0, 50.0]] * 2), 20)
    assert out.shape == (2, 20, 20, 3)
    assert out[:, :8, :8].max() == 0 and out[:, 12:, 12:].min() >= 190


def test_a_shared_detector_runs_the_frames_of_several_threads_together_and_gives_each_its_own(corpus):
    cfg = IngestConfig()
    videos = []
    for path in sorted(corpus.glob("*.mp4")):
        info = media.probe(path, 30)
        size = media.frame_size(info.width, info.height, info.rotation, cfg.decode_short_side)
        videos.append(media.decode_frames(path, 0.0, 2.0, cfg.fps, size, 60)[:: cfg.detect_every * 2])
    alone = [face.detect(frames, cfg) for frames in videos]
    assert all(len(boxes) for found in alone for boxes, _ in found)  # a face in every frame of every video

    shared = face.FaceDetector("cpu", max_frames=64)
    start, results = threading.Barrier(len(videos)), {}

    def detect(index: int) -> None:
        start.wait()
        results[index] = face.detect(videos[index], cfg, shared)

    threads = [threading.Thread(target=detect, args=(i,)) for i in range(len(videos))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(results) == list(range(len(videos)))
    # The threads that arrived while the first ran shared one call.
    assert shared.calls < len(videos)
    for index, found in enumerate(alone):
        for (boxes, probs), (shared_boxes, shared_probs) in zip(found, results[index], strict=True):
            assert np.allclose(boxes, shared_boxes, atol=0.5) and np.allclose(probs, shared_probs, atol=1e-3)


def test_a_detector_error_reaches_every_thread_whose_frames_it_held():
    shared = face.FaceDetector("cpu", max_frames=8)
    with pytest.raises(RuntimeError):  # MTCNN refuses frames without 3 colour channels
        shared.detect(torch.zeros((2, 64, 64, 5)), 12, 0.6)
    # and the detector is free again afterwards
    found = shared.detect(torch.zeros((1, 64, 64, 3)), 12, 0.6)
    assert len(found) == 1 and found[0][0] is None


def test_cuda_detection_without_a_gpu_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="detect_device"):
        face.detector_device(IngestConfig(detect_device="cuda"))
    assert face.detector_device(IngestConfig()) == "cpu"
