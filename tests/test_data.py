"""The data path: shard samples to aligned face windows and voice fbanks, bad samples skipped and counted."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from pydantic import ValidationError
from torchaudio.compliance import kaldi

from vaemo.artifacts import IngestFolder
from vaemo.data.config import DataConfig
from vaemo.data.loader import count_samples, make_loader
from vaemo.data.samples import choose_window, decode_audio, decode_video, load_sample, window_frames, window_waveform
from vaemo.errors import ArtifactError
from vaemo.ingest import media

CFG = DataConfig()
# Train mode with only the window random: checks that look at content need no crop, flip or masks.
WINDOW_ONLY = DataConfig(crop_scale=None, flip_p=0.0, freq_mask=0, time_mask=0)


@pytest.fixture(scope="module")
def urls(shards) -> list[str]:
    return IngestFolder(shards).shard_urls()


@pytest.fixture(scope="module")
def raw(urls) -> list[dict]:
    """The shards' samples as bytes, without webdataset's bookkeeping keys."""
    found = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    return [{k: v for k, v in s.items() if k in ("__key__", "mp4", "flac", "json")} for s in found]


def write_shard(path: Path, samples: list[dict]) -> str:
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)
    return str(path)


def clip_sample(key: str, frames: np.ndarray, audio: np.ndarray, fps: float = 25.0) -> dict:
    """A shard sample made the way ingest makes one: H.264 mp4, flac, json."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "clip.mp4"
        media.encode_video(frames, fps, 18, "veryfast", out, 60)
        video = out.read_bytes()
    meta = {"clip_id": key, "fps": fps, "frames": len(frames), "start": 0.0, "end": len(frames) / fps}
    return {"__key__": key, "mp4": video, "flac": media.encode_audio(audio, 16000, "flac", 60),
            "json": json.dumps(meta).encode()}


# --- shard listing and configuration -------------------------------------------------------------


def test_shard_urls_lists_committed_shards_and_explains_an_empty_folder(shards, urls, tmp_path):
    assert urls == sorted(urls) and len(urls) == 3 and all(u.endswith(".tar") for u in urls)
    assert count_samples(urls) == 3
    with pytest.raises(ArtifactError, match="does not exist"):
        IngestFolder(tmp_path).shard_urls()
    (tmp_path / "shards").mkdir()
    with pytest.raises(ArtifactError, match="no .tar files"):
        IngestFolder(tmp_path).shard_urls()


def test_config_is_strict_and_keeps_audio_and_video_windows_equal():
    assert CFG.window_seconds == 2.56 and CFG.window_samples == 40960 and CFG.natural_audio_frames == 256
    with pytest.raises(ValidationError):
        DataConfig(frame=16)  # a typo is an error, not a silent default
    with pytest.raises(ValidationError, match="does not cover the video window"):
        DataConfig(frames=8)  # 1.28 s of video with 256 fbank frames (2.56 s)
    assert DataConfig(frames=8, audio_frames=128).natural_audio_frames == 128
    assert "2 x 4.569" in CFG.audio_convention


# --- one sample ----------------------------------------------------------------------------------


def test_a_real_sample_decodes_to_the_model_shapes(raw):
    for sample in raw:
        out = load_sample(sample, CFG, train=False)
        assert out["video"].shape == (3, 16, 160, 160) and out["video"].dtype == torch.float32
        assert out["audio"].shape == (256, 128) and out["audio"].dtype == torch.float32
        assert torch.isfinite(out["video"]).all() and torch.isfinite(out["audio"]).all()
        assert out["clip_id"] == sample["__key__"]
        meta = json.loads(sample["json"])
        window = out["window"]
        assert not window.looped and 0 <= window.start and window.end <= meta["end"] - meta["start"] + 1e-6
        # Evaluation is centred: the same margin before and after the window (to a stride step of 4 frames).
        assert abs(window.start - (meta["end"] - meta["start"] - window.end)) <= 4 / 25 + 1e-6
        trained = load_sample(sample, CFG, train=True, rng=np.random.default_rng(0))
        assert trained["video"].shape == (3, 16, 160, 160) and trained["audio"].shape == (256, 128)


@pytest.mark.parametrize("n_frames", [30, 63, 64, 65, 107, 200])
def test_frames_and_audio_come_from_the_same_instants(n_frames):
    """Frame k shows the instant k/fps; the sample at that instant must carry the same k, looped or not."""
    sr_per_frame = 16000 // 25
    frames = np.arange(n_frames)
    audio = np.arange(n_frames * sr_per_frame) / sr_per_frame  # each sample holds its time in frames
    rng = np.random.default_rng(n_frames)
    for draw in [None] + [rng] * 20:
        window = choose_window(n_frames, 25.0, CFG, draw)
        shown = window_frames(frames, window)
        wave = window_waveform(audio, window, n_frames, 25.0, 16000)
        assert len(shown) == 16 and len(wave) == 40960 == window.audio_samples
        assert window.looped == (n_frames < 64) and window.start == window.start_frame / 25
        assert window.end - window.start == pytest.approx(2.56)
        assert window.audio_start == window.start_frame * sr_per_frame
        # The sample under sampled frame i (displayed 4i frames into the window) is that frame's instant.
        np.testing.assert_array_equal(np.floor(wave[np.arange(16) * 4 * sr_per_frame]), shown)
        if draw is None:
            # centred on the stride step (4 frames) nearest the middle
            assert window.start_frame == (0 if n_frames < 64 else 4 * int((n_frames - 64) / 8 + 0.5))


def test_video_and_audio_onsets_agree_through_real_encoding():
    """A face that lights up at 2.0 s and a tone that starts at 2.0 s must start together in every window."""
    fps, n, onset = 25, 100, 50
    frames = np.full((n, 192, 192, 3), 30, np.uint8)
    frames[onset:] = 220
    t = np.arange(n * 640) / 16000
    audio = np.where(t >= onset / fps, 0.5 * np.sin(2 * np.pi * 440 * t), 1e-3 * np.sin(2 * np.pi * 97 * t)).astype(
        np.float32
    )
    sample = clip_sample("sync_clip", frames, audio)
    rng = np.random.default_rng(3)
    for _ in range(6):
        out = load_sample(sample, WINDOW_ONLY, train=True, rng=rng)
        window = out["window"]
        lit = out["video"].mean(dim=(0, 2, 3)) > 0  # per sampled frame: bright after normalisation
        level = out["audio"].amax(dim=1)  # per fbank frame: the strongest band
        loud = level > (level.max() + level.min()) / 2
        onset_s = onset / fps - window.start  # where both onsets must be, seconds into the window
        assert 0 < onset_s < 2.56  # the clip's 4 s leave every window both sides of the onset
        first_lit = int(torch.nonzero(lit)[0])
        assert first_lit == int(np.ceil(onset_s * fps / 4 - 1e-9)) and lit[first_lit:].all()
        first_loud = int(torch.nonzero(loud)[0])
        assert abs(first_loud - onset_s * 100) <= 2 and loud[first_loud:].all()  # fbank frames are 10 ms apart


def test_fbank_normalisation_matches_the_formula(raw):
    sample = raw[0]
    frames, fps, n, _ = decode_video(sample["mp4"])
    audio = decode_audio(sample["flac"], 16000)
    window = choose_window(n, fps, CFG, None)
    wave = torch.from_numpy(window_waveform(audio, window, n, fps, 16000))[None]
    reference = kaldi.fbank(
        wave, htk_compat=True, sample_frequency=16000, use_energy=False, window_type="hanning",
        num_mel_bins=128, dither=0.0, frame_shift=10, frame_length=25, snip_edges=False,
    )
    assert reference.shape == (256, 128)
    hicmae = load_sample(sample, CFG, train=False)["audio"]
    torch.testing.assert_close(hicmae, (reference + 4.2677393) / (2 * 4.5689974))
    cav = DataConfig(audio_mean=-5.081, audio_std=4.4849, audio_double_std=False)
    torch.testing.assert_close(load_sample(sample, cav, train=False)["audio"], (reference + 5.081) / 4.4849)
    # The AudioMAE framing gives 254 frames: the last one is repeated, never padded with zeros.
    snipped = load_sample(sample, DataConfig(snip_edges=True), train=False)["audio"]
    assert torch.equal(snipped[253], snipped[254]) and torch.equal(snipped[254], snipped[255])


def test_short_clips_loop_both_modalities_instead_of_zero_padding(raw):
    frames, _, _, _ = decode_video(raw[0]["mp4"])
    audio = decode_audio(raw[0]["flac"], 16000)
    short = clip_sample("short_clip", frames[:30], audio[: 30 * 640])  # 1.2 s, under the 2.56 s window
    out = load_sample(short, CFG, train=False)
    window, video, feats = out["window"], out["video"], out["audio"]
    assert window.looped and window.frame_indices == tuple(4 * i % 30 for i in range(16))
    # Sampled frames 0 and 15 are both stored frame 0 (0 and 60 mod 30): the loop repeats real frames.
    assert torch.equal(video[:, 0], video[:, 15]) and not torch.equal(video[:, 0], video[:, 14])
    black = (torch.zeros(3) - torch.tensor(CFG.video_mean)) / torch.tensor(CFG.video_std)
    assert all((video[:, i] - black.view(3, 1, 1)).abs().max() > 0.5 for i in range(16))
    # The audio loops with the same period: 1.2 s = 120 fbank frames, away from the reflected edges.
    torch.testing.assert_close(feats[2:130], feats[122:250], atol=1e-3, rtol=1e-3)
    # The window's samples are the clip's own, repeated from its start: no appended silence.
    stored = decode_audio(short["flac"], 16000)
    wave = window_waveform(stored, window, 30, 25.0, 16000)
    np.testing.assert_array_equal(wave, np.resize(stored, 40960))


# --- loaders -------------------------------------------------------------------------------------


def test_corrupt_samples_are_skipped_counted_and_never_swapped(raw, tmp_path):
    good, other = raw[0], raw[1]
    bad = [
        {**other, "__key__": "bad_mp4", "mp4": b"\x00garbage" * 100,
         "json": json.dumps({"clip_id": "bad_mp4"}).encode()},
        {**other, "__key__": "bad_flac", "flac": b"fLaC-not-really" * 10,
         "json": json.dumps({"clip_id": "bad_flac"}).encode()},
        {**other, "__key__": "bad_json", "json": b"{not json"},
        {**other, "__key__": "wrong_json"},  # its json names another clip
    ]
    url = write_shard(tmp_path / "mixed.tar", [bad[0], good, *bad[1:]])
    expected = load_sample(good, CFG, train=False)
    for batch_size in (1, 8):
        batches = list(make_loader([url], CFG, train=False, batch_size=batch_size, num_workers=0))
        assert len(batches) == 1
        batch = batches[0]
        assert batch["clip_id"] == [good["__key__"]] and batch["skipped"] == 4
        assert sorted(batch["skipped_clips"]) == sorted(b["__key__"] for b in bad)
        # The good clip keeps its own audio (and video): nothing was redrawn from a neighbour.
        assert torch.equal(batch["audio"][0], expected["audio"]) and torch.equal(batch["video"][0], expected["video"])
        assert not torch.allclose(batch["audio"][0], load_sample(other, CFG, train=False)["audio"])

    # A worker that meets only bad samples still reports them, in a batch without clips.
    only_bad = write_shard(tmp_path / "bad.tar", bad)
    (batch,) = list(make_loader([only_bad], CFG, train=False, batch_size=2, num_workers=0))
    assert batch["video"].shape == (0, 3, 16, 160, 160) and batch["clip_id"] == [] and batch["skipped"] == 4

    # A truncated shard counts once, by its url, and the clips before the cut still come through.
    data = Path(url).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    batches = list(make_loader([str(cut)], CFG, train=False, batch_size=8, num_workers=0))
    assert str(cut) in [c for b in batches for c in b["skipped_clips"]]
    assert sum(b["skipped"] for b in batches) == sum(len(b["skipped_clips"]) for b in batches) >= 1


@pytest.mark.timeout(120)
def test_fewer_shards_than_workers_resamples_instead_of_hanging(urls, raw, caplog):
    with caplog.at_level(logging.WARNING, logger="vaemo.data.loader"):
        loader = make_loader(
            urls[:1], CFG, train=True, seed=1, epoch_samples=8, batch_size=2, num_workers=2, timeout=60
        )
    assert "resampling shards" in caplog.text
    batches = list(loader)
    # 8 samples over 2 readers: 4 each, 2 batches of 2 each.
    assert len(batches) == 4 and all(b["video"].shape == (2, 3, 16, 160, 160) for b in batches)
    assert {c for b in batches for c in b["clip_id"]} == {raw[0]["__key__"]}  # the one clip of that shard
    # The two workers draw their own windows, not copies of each other's.
    windows = [tuple(w) for b in batches for w in b["window"].tolist()]
    assert len(set(windows)) > len(windows) // 2


@pytest.mark.timeout(120)
def test_evaluation_reads_every_clip_once_and_deterministically(urls, raw, caplog):
    keys = sorted(s["__key__"] for s in raw)

    def run(shard_list, workers):
        batches = list(make_loader(shard_list, CFG, train=False, batch_size=2, num_workers=workers, timeout=60))
        assert sum(b["skipped"] for b in batches) == 0
        return {c: (b["video"][i], b["audio"][i]) for b in batches for i, c in enumerate(b["clip_id"])}, batches

    first, batches = run(urls, 2)
    ids = [c for b in batches for c in b["clip_id"]]
    assert sorted(ids) == keys  # each exactly once
    second, _ = run(urls, 2)
    for clip in keys:
        assert torch.equal(first[clip][0], second[clip][0]) and torch.equal(first[clip][1], second[clip][1])
    # One shard, two workers: the idle worker is warned about and the clip still comes exactly once.
    with caplog.at_level(logging.WARNING, logger="vaemo.data.loader"):
        alone, batches = run(urls[:1], 2)
    assert "idle" in caplog.text and len([c for b in batches for c in b["clip_id"]]) == 1
    (clip,) = alone
    assert torch.equal(alone[clip][0], first[clip][0])


def test_ranks_partition_the_shards_and_train_for_equal_steps(urls, monkeypatch):
    """Under DDP (RANK/WORLD_SIZE), evaluation splits the clips; training runs equal steps on every rank."""
    seen, steps = [], []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        seen.append([c for b in make_loader(urls, CFG, train=False, batch_size=4, num_workers=0) for c in b["clip_id"]])
        steps.append(len(list(make_loader(urls, WINDOW_ONLY, train=True, seed=5, batch_size=1, num_workers=0))))
    assert len(seen[0]) + len(seen[1]) == 3 and len(set(seen[0]) | set(seen[1])) == 3
    assert steps[0] == steps[1] == 2  # 3 clips over 2 ranks: ceil(3 / 2) each


def test_training_windows_follow_the_seed(urls):
    def windows(seed):
        loader = make_loader(urls, WINDOW_ONLY, train=True, seed=seed, batch_size=1, num_workers=0)
        return [(b["clip_id"][0], tuple(b["window"][0].tolist())) for b in loader]

    first = windows(7)
    assert len(first) == 3 and first == windows(7) and first != windows(8)
