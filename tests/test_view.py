"""The training view: incremental builds, its digest, windows equal to the mp4 path's, resume and broken shards."""

import json
import shutil

import numpy as np
import pytest
import torch
from torchvision.io import decode_jpeg

from vaemo.artifacts import IngestFolder
from vaemo.data.config import DataConfig, ViewConfig
from vaemo.data.loader import make_loader
from vaemo.data.samples import audio_bytes, choose_window, decode_audio, decode_video, fbank
from vaemo.data.view import TrainingView, _view_frames, build, view_data, view_rate
from vaemo.train.pretrain import training_view

CFG = DataConfig(frames=4, frame_stride=4, audio_frames=64)  # a 0.64 s window: short clips are not looped
ONE_PER_TASK = ViewConfig(ingest_shards_per_task=1)


@pytest.fixture()
def ingest(shards, tmp_path) -> IngestFolder:
    """A private copy of the session's ingest folder (three committed shards of one clip each), without the views
    that other tests' pre-training built in it."""
    return IngestFolder(shutil.copytree(shards, tmp_path / "ingest", ignore=shutil.ignore_patterns("views")))


def test_view_build_is_incremental_and_idempotent(ingest):
    markers = sorted((ingest.path / "batches").glob("*.json"))
    held_back = markers[-1].read_text()
    markers[-1].unlink()  # the folder before its last ingest batch was committed
    first = build(ingest, CFG, ONE_PER_TASK)
    view = TrainingView(ingest, CFG, ONE_PER_TASK)
    built = {p.name: p.stat().st_mtime_ns for p in view.shards_dir.glob("*.tar")}
    assert first["clips"] == 2 and len(built) == 2 and view.is_current()
    assert build(ingest, CFG, ONE_PER_TASK) == first and view.plan(1) == []  # nothing to do again

    markers[-1].write_text(held_back)  # the new ingest batch
    assert not view.is_current() and len(view.plan(1)) == 1
    second = build(ingest, CFG, ONE_PER_TASK)
    after = {p.name: p.stat().st_mtime_ns for p in view.shards_dir.glob("*.tar")}
    assert second["clips"] == 3 and len(after) == 3 and {n: after[n] for n in built} == built  # only one added
    assert second["digest"] != first["digest"]


def test_a_second_builder_waits_for_the_first_and_finds_the_view_built(ingest):
    """Planning removes unfinished work, so two builders at once (two runs on one ingest folder) must not overlap."""
    import threading

    view = TrainingView(ingest, CFG, ONE_PER_TASK)
    results = []
    with view.building():  # the first builder, still at work
        second = threading.Thread(target=lambda: results.append(build(ingest, CFG, ONE_PER_TASK)))
        second.start()
        second.join(timeout=1.0)
        assert second.is_alive() and not view.shards_dir.exists()  # waiting, touching nothing
    second.join(timeout=60)
    assert not second.is_alive() and results[0]["clips"] == 3 and view.is_current()


def test_view_digest_and_folder_follow_the_settings(shards):
    ingest = IngestFolder(shards)
    base = TrainingView(ingest, CFG, ViewConfig())
    for other in (TrainingView(ingest, CFG, ViewConfig(jpeg_quality=80)),
                  TrainingView(ingest, CFG.model_copy(update={"frame_stride": 2, "audio_frames": 32}), ViewConfig())):
        assert other.expected_digest() != base.expected_digest() and other.path != base.path
    assert TrainingView(ingest, CFG, ViewConfig(enabled=False)).expected_digest() == base.expected_digest()


def test_a_view_window_shows_the_mp4_clips_frames_and_voice(ingest):
    view = TrainingView(ingest, CFG, ViewConfig())
    build(ingest, CFG, ViewConfig())
    raw = next(b for b in make_loader(view.shard_urls(), CFG, train=False, batch_size=8, view=True, raw=True))
    import webdataset as wds

    sources = {s["__key__"]: s for url in ingest.shard_urls() for s in wds.tarfile_samples(iter([{"url": url}]))}
    for i, clip in enumerate(raw["clip_id"]):
        frames, clip_fps, _, _ = decode_video(sources[clip]["mp4"])
        audio = decode_audio(audio_bytes(sources[clip]), CFG.sample_rate)
        start = round(raw["window"][i, 0].item() * clip_fps)  # a stored frame on the stride
        assert start % 4 == 0
        want = frames[start : start + 16 : 4].astype(np.float32)
        got = torch.stack([decode_jpeg(j) for j in raw["jpeg"][i]]).permute(0, 2, 3, 1).float().numpy()
        assert got.shape == want.shape and np.abs(got - want).mean() < 4.0  # JPEG error only
        begin = round(raw["window"][i, 0].item() * CFG.sample_rate)
        reference = fbank(audio[begin : begin + CFG.window_samples], CFG)
        assert raw["fbank"][i].shape == (CFG.audio_frames, CFG.mel_bins)
        # float16 rows of the clip's fbank; the edge rows see the clip's samples instead of a reflection
        assert torch.allclose(raw["fbank"][i][1:-1], reference[1:-1], atol=0.02)
        assert raw["seed"].dtype == torch.int64


@pytest.mark.parametrize("clip_fps", [25.0, 30.0])
def test_the_centred_window_is_the_same_from_the_mp4_shards_and_from_the_view(clip_fps):
    """Evaluation's window starts on a frame the view stores, the one the view's own centred window starts on."""
    view_cfg = view_data(CFG)
    for n_frames in range(16, 400):
        stored = _view_frames(n_frames, clip_fps, CFG)
        mp4 = choose_window(n_frames, clip_fps, CFG, None)
        view = choose_window(len(stored), view_rate(CFG), view_cfg, None)
        assert mp4.start_frame == stored[view.start_frame], n_frames
        if not mp4.looped:  # centred to within two stride steps (one when a step is a whole number of frames)
            step = CFG.frame_stride * clip_fps / CFG.fps
            margin_after = n_frames - (mp4.start_frame + round(CFG.frames * step))
            slack = step if step.is_integer() else 2 * step
            assert 0 <= margin_after and abs(mp4.start_frame - margin_after) <= slack, n_frames


def test_resume_skips_batches_without_reading_their_bytes(ingest):
    urls = training_view(ingest, CFG, _pretrain(), 1).shard_urls()
    kwargs = dict(train=True, seed=3, batch_size=1, view=True, raw=True)
    whole = list(make_loader(urls, CFG, **kwargs))
    resumed = list(make_loader(urls, CFG, skip_batches=2, **kwargs))
    assert [b["jpeg"] is None for b in resumed] == [True, True, False]
    for a, b in zip(whole, resumed, strict=True):
        assert a["clip_id"] == b["clip_id"] and torch.equal(a["window"], b["window"])
        assert torch.equal(a["seed"], b["seed"])
    assert torch.equal(whole[2]["fbank"], resumed[2]["fbank"])
    decoded = next(iter(make_loader(urls, CFG, train=True, seed=3, batch_size=1, view=True)))  # the CPU path
    assert decoded["video"].shape == (1, 3, 4, CFG.image_size, CFG.image_size)
    assert decoded["audio"].shape == (1, 64, 128)


def test_a_broken_view_shard_is_counted_and_a_missing_one_rebuilt(ingest):
    view = training_view(ingest, CFG, _pretrain(), 1)
    urls = view.shard_urls()
    data = open(urls[0], "rb").read()
    open(urls[0], "wb").write(data[:1000])  # truncated in its first member
    batches = list(make_loader(urls, CFG, train=False, batch_size=8, view=True))
    losses = [loss for b in batches for loss in b["shard_losses"]]
    assert [(loss.shard, loss.lost) for loss in losses] == [(urls[0], 1)]  # like a broken ingest shard
    assert sum(len(b["clip_id"]) for b in batches) == 2

    marker = json.loads(next((view.path / "batches").glob("*.json")).read_text())
    (view.shards_dir / marker["shards"][0]["name"]).unlink()
    assert not view.is_current()
    assert len(training_view(ingest, CFG, _pretrain(), 1).shard_urls()) == 3 and view.is_current()


def _pretrain():
    from vaemo.config import PretrainConfig

    return PretrainConfig(view=ONE_PER_TASK)
