"""One video at a time: good clips become samples, every bad input gets a status and a reason."""

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from vaemo.config import IngestConfig
from vaemo.ingest import media
from vaemo.ingest.process import content_hash, process_video, video_id_of
from vaemo.ingest.records import SourceRecord

CFG = IngestConfig()


def run(path: Path, whole_file: bool = False, cfg: IngestConfig = CFG, **record):
    rec = SourceRecord(path=path.name, dataset="generic", whole_file=whole_file, **record)
    return process_video(path.parent, rec, video_id_of(content_hash(path.parent, rec)), cfg)


EXPECTED = {
    "zero_byte": "empty_file",
    "not_a_video": "not_a_video",
    "no_audio_stream": "no_audio_stream",
    "silent_audio": "silent_audio",
    "no_face": "no_face",
    "several_faces": "ok",  # the dominant face is followed; faces_max records the crowd
    "rotated": "ok",
    "variable_fps": "ok",
    "flv_mp3": "ok",
    "non_ascii_name": "ok",
    "spaces_and_quotes": "ok",
    "long": "ok",
}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_bad_input_gets_a_status_and_reason(bad_cases, case):
    outcome = run(bad_cases[case])
    assert outcome.status == EXPECTED[case], outcome.reason
    if outcome.status != "ok":
        assert outcome.reason and not outcome.clips
    else:
        assert outcome.clips


def test_a_truncated_file_says_what_it_claims_and_what_decodes(bad_cases):
    """The index still claims the full length; only the first 0.65 s decode, too short for a clip."""
    outcome = run(bad_cases["truncated"])
    assert outcome.status == "truncated" and not outcome.clips
    assert re.fullmatch(r"the container claims 4\.\d+ s but its audio decodes 0\.\d+ s; what decodes gives "
                        r"too_short: 0\.\d+ s is under min_source_seconds=1\.0", outcome.reason), outcome.reason


def test_a_truncated_file_keeps_only_what_decodes(corpus, tmp_path):
    """A container that claims 20 s of which about 4 s decode: clips from those, and the reason says so."""
    looped = tmp_path / "looped.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-stream_loop", "4", "-i", str(sorted(corpus.glob("*.mp4"))[0]), "-c",
                    "copy", "-movflags", "+faststart", str(looped)], check=True)
    data = looped.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 4])
    assert media.probe(cut, 10).duration > 15
    outcome = run(cut)
    assert outcome.status == "ok" and outcome.clips and outcome.duration < 6, outcome.reason
    assert re.match(r"the container claims \d\d\.\d+ s but its audio decodes \d\.\d+ s", outcome.reason)
    assert all(clip.meta["end"] <= outcome.duration + 1e-3 for clip in outcome.clips)


def test_clip_content_and_metadata(corpus):
    path = sorted(corpus.glob("*.mp4"))[0]
    outcome = run(path, whole_file=True, label="happy", speaker="s1", fold=2)
    assert outcome.status == "ok" and len(outcome.clips) == 1
    clip = outcome.clips[0]
    meta = clip.meta
    side = CFG.crop_size + CFG.crop_margin
    assert meta["label"] == "happy" and meta["speaker"] == "s1" and meta["fold"] == 2
    assert meta["source"] == path.name and meta["start"] == 0.0
    assert meta["face_prob_mean"] > 0.9 and meta["face_coverage"] >= CFG.min_face_coverage
    assert meta["speech_ratio"] > 0.3
    assert clip.clip_id.startswith(meta["video_id"])
    # The stored face clip decodes to square crops of the configured size at 25 fps ...
    tmp = path.parent / "check.mp4"
    tmp.write_bytes(clip.video)
    info = media.probe(tmp, 10, require_video=True)
    assert (info.width, info.height) == (side, side) and abs(info.fps - 25) < 0.01
    frames = media.decode_frames(tmp, 0, 60, 25, (side, side), 30)
    assert abs(len(frames) - meta["frames"]) <= 1
    tmp.unlink()
    # ... and the voice is 16 kHz mono FLAC of the same span.
    flac = path.parent / "check.flac"
    flac.write_bytes(clip.audio)
    samples = media.decode_audio(flac, 16000, 10)
    flac.unlink()
    assert abs(len(samples) / 16000 - (meta["end"] - meta["start"])) < 0.05
    assert np.abs(samples).max() > 0.05


def test_face_crop_follows_the_face(corpus):
    """The crop is centred on the face: MTCNN finds one large face in the stored frames."""
    from facenet_pytorch import MTCNN

    clip = run(sorted(corpus.glob("*.mp4"))[1]).clips[0]
    tmp = corpus / "follow.mp4"
    tmp.write_bytes(clip.video)
    side = CFG.crop_size + CFG.crop_margin
    frames = media.decode_frames(tmp, 0, 60, 25, (side, side), 30)
    tmp.unlink()
    boxes, _ = MTCNN(keep_all=True, device="cpu").detect(frames[:: max(1, len(frames) // 4)])
    for found in boxes:
        found = np.asarray(found, dtype=float)
        assert len(found) == 1
        centre = (found[0, :2] + found[0, 2:]) / 2
        assert np.all(np.abs(centre - side / 2) < side * 0.2), centre


def test_unlabelled_recording_is_cut_into_speech_windows(bad_cases):
    outcome = run(bad_cases["long"], cfg=IngestConfig(max_cut_seconds=6))
    assert outcome.status == "ok" and len(outcome.clips) >= 4
    spans = [(c.meta["start"], c.meta["end"]) for c in outcome.clips]
    assert all(CFG.min_clip_seconds - 0.2 <= e - s <= 6 + 1e-3 for s, e in spans)
    assert all(a[1] <= b[0] + 1e-3 for a, b in zip(spans, spans[1:], strict=False))  # in order, no overlap
    assert len({c.clip_id for c in outcome.clips}) == len(spans)


def test_too_long_and_skip_several_faces(bad_cases):
    assert run(bad_cases["long"], cfg=IngestConfig(max_duration_seconds=20)).status == "too_long"
    crowded = run(bad_cases["several_faces"], cfg=IngestConfig(multi_face="skip"))
    assert crowded.status == "several_faces" and "2 faces" in crowded.reason
    assert run(bad_cases["several_faces"]).clips[0].meta["faces_max"] == 2


def test_separate_audio_file_is_used_and_hashed(corpus, tmp_path):
    """CREMA-D ships a clean WAV beside the Flash video: the clip takes its audio from there."""
    import shutil

    from vaemo import synth

    video = sorted(corpus.glob("*.mp4"))[0]
    shutil.copy(video, tmp_path / "v.mp4")
    synth.speak("a completely different sentence is spoken here", tmp_path / "v.wav")
    with_wav = SourceRecord(path="v.mp4", dataset="crema-d", audio_path="v.wav", whole_file=True)
    without = SourceRecord(path="v.mp4", dataset="crema-d", whole_file=True)
    assert content_hash(tmp_path, with_wav) != content_hash(tmp_path, without)
    outcome = process_video(tmp_path, with_wav, "x" * 16, CFG)
    assert outcome.status == "ok" and outcome.clips[0].meta["audio_source"] == "v.wav"


def test_timeout_is_a_status_not_a_hang(corpus):
    outcome = run(sorted(corpus.glob("*.mp4"))[0], cfg=IngestConfig(probe_timeout=0.001))
    assert outcome.status == "timeout" and "within" in outcome.reason


def test_in_process_audio_matches_ffmpeg_and_keeps_the_statuses(corpus, tmp_path):
    """media_io: pyav decodes and encodes the voice as the ffmpeg processes do, with the same error statuses."""
    path = sorted(corpus.glob("*.mp4"))[0]
    ours, theirs = media.decode_audio(path, 16000, 30, backend="pyav"), media.decode_audio(path, 16000, 30)
    count = min(len(ours), len(theirs))
    assert abs(len(ours) - len(theirs)) <= 160 and np.abs(ours[:count] - theirs[:count]).max() < 1e-3
    flac = tmp_path / "voice.flac"
    flac.write_bytes(media.encode_audio(ours, 16000, "flac", 30, backend="pyav"))
    assert np.abs(media.decode_audio(flac, 16000, 30) - ours).max() < 1e-4  # lossless but for the int16 scaling
    info = media.probe(flac, 30, require_video=False, backend="pyav")
    assert info.has_audio and abs(info.duration - len(ours) / 16000) < 0.05
    junk = tmp_path / "junk.wav"
    junk.write_text("not audio at all\n" * 50)
    for call, status in (
        (lambda: media.probe(junk, 30, require_video=False, backend="pyav"), "not_a_video"),
        (lambda: media.decode_audio(junk, 16000, 30, backend="pyav"), "decode_error"),
        (lambda: media.probe(flac, 1e-6, require_video=False, backend="pyav"), "timeout"),
    ):
        with pytest.raises(media.MediaError) as caught:
            call()
        assert caught.value.status == status and caught.value.reason


def test_in_process_probe_reports_what_ffprobe_does(bad_cases, corpus):
    """media_io: pyav probes every generated case as ffprobe does: the same fields (codec names aside, FFmpeg's
    decoder names are not ffprobe's) or the same refusal."""
    def described(path: Path, backend: str):
        try:
            info = media.probe(path, 30, backend=backend)
        except media.MediaError as error:
            return error.status
        return {**vars(info), "vcodec": None, "acodec": info.has_audio}

    paths = [*bad_cases.values(), *sorted(corpus.glob("*.mp4"))[:2]]
    found = {path.name: (described(path, "pyav"), described(path, "ffmpeg")) for path in paths}
    assert all(ours == theirs for ours, theirs in found.values()), found
    assert found[bad_cases["rotated"].name][0]["rotation"] == 90 and found[bad_cases["variable_fps"].name][0][
        "variable_fps"]
    assert {status for status, _ in found.values() if isinstance(status, str)} >= {"empty_file", "not_a_video"}


def test_a_video_processed_twice_gives_the_same_clips(corpus):
    """In-process encoding is reproducible: the same video gives the same bytes, first call or later."""
    path = sorted(corpus.glob("*.mp4"))[0]
    first, again, third = (run(path) for _ in range(3))
    assert first.status == "ok" and first.clips
    for a, b, c in zip(first.clips, again.clips, third.clips, strict=True):
        assert a.video == b.video == c.video and a.audio == b.audio == c.audio
