"""vaemo.synth: every generated file is checked with ffprobe, ffmpeg and MTCNN for what it claims."""

from __future__ import annotations

import io
import json
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vaemo import synth
from vaemo.errors import ToolError

TIMEOUT = 60


def ffprobe(path: Path, *extra: str) -> dict:
    args = ["ffprobe", "-v", "error", "-print_format", "json", "-show_format", "-show_streams", *extra, str(path)]
    return json.loads(subprocess.run(args, capture_output=True, check=True, timeout=TIMEOUT).stdout)


def probe_fails(path: Path) -> bool:
    args = ["ffprobe", "-v", "error", "-show_streams", str(path)]
    return subprocess.run(args, capture_output=True, timeout=TIMEOUT).returncode != 0


def streams(info: dict, kind: str) -> list[dict]:
    return [s for s in info["streams"] if s["codec_type"] == kind]


def stream_ends(path: Path) -> dict[str, float]:
    """Where each stream's last packet ends (pts + duration), by codec type; works for any container."""
    info = ffprobe(path, "-show_packets")
    kinds = {s["index"]: s["codec_type"] for s in info["streams"]}
    ends: dict[str, float] = {}
    for packet in info["packets"]:
        end = float(packet["pts_time"]) + float(packet.get("duration_time", 0.0))
        kind = kinds[packet["stream_index"]]
        ends[kind] = max(ends.get(kind, 0.0), end)
    return ends


def frame_at(path: Path, seconds: float) -> np.ndarray:
    """The displayed frame at ``seconds`` (ffmpeg applies rotation metadata) as RGB uint8."""
    args = ["ffmpeg", "-v", "error", "-ss", f"{seconds}", "-i", str(path), "-frames:v", "1",
            "-f", "image2pipe", "-c:v", "png", "pipe:1"]
    png = subprocess.run(args, capture_output=True, check=True, timeout=TIMEOUT).stdout
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def audio_samples(path: Path, start: float = 0.0, rate: int = 16000) -> np.ndarray:
    args = ["ffmpeg", "-v", "error", "-ss", f"{start}", "-i", str(path), "-map", "0:a:0", "-ac", "1",
            "-ar", str(rate), "-f", "s16le", "pipe:1"]
    raw = subprocess.run(args, capture_output=True, check=True, timeout=TIMEOUT).stdout
    return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0


def wav_seconds(path: Path) -> float:
    with wave.open(str(path), "rb") as reader:
        return reader.getnframes() / reader.getframerate()


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("synth")
    return {
        "default": synth.talking_face_video(root / "default.mp4"),
        "three_seconds": synth.talking_face_video(root / "three_seconds.mp4", seconds=3.0),
        "cases": synth.bad_inputs(root / "bad"),
        "demo": synth.demo_corpus(root / "demo", n_videos=2),
        "root": root,
    }


@pytest.fixture(scope="module")
def detect_faces():
    from facenet_pytorch import MTCNN

    mtcnn = MTCNN(keep_all=True, device="cpu")

    def detect(frame: np.ndarray) -> np.ndarray:
        boxes, _ = mtcnn.detect(frame)
        # numpy 2: boxes is an object array; None means no face.
        return np.zeros((0, 4)) if boxes is None else np.asarray(boxes, dtype=float)

    return detect


def test_require_tools_names_the_missing_tool_and_the_fix() -> None:
    synth.require_tools("ffmpeg", "ffprobe", "espeak-ng")
    with pytest.raises(ToolError, match=r"no-such-tool-x not found on PATH: install it with 'apt-get install"):
        synth.require_tools("ffmpeg", "no-such-tool-x")


def test_speak_writes_22k_wav_and_pads_with_digital_silence(tmp_path: Path) -> None:
    plain = synth.speak("Hello there, how are you?", tmp_path / "plain.wav")
    padded = synth.speak("Hello there, how are you?", tmp_path / "padded.wav", pad_seconds=0.5)
    with wave.open(str(padded), "rb") as reader:
        assert (reader.getframerate(), reader.getnchannels(), reader.getsampwidth()) == (22050, 1, 2)
        samples = np.frombuffer(reader.readframes(reader.getnframes()), dtype="<i2")
    assert wav_seconds(padded) == pytest.approx(wav_seconds(plain) + 1.0, abs=2 / 22050)
    assert not samples[:11025].any() and not samples[-11025:].any()
    assert np.abs(samples).max() > 3000  # there is speech in between


def test_default_clip_is_h264_aac_and_lasts_as_long_as_its_speech(media: dict, tmp_path: Path) -> None:
    info = ffprobe(media["default"])
    (video,), (audio,) = streams(info, "video"), streams(info, "audio")
    assert (video["codec_name"], video["pix_fmt"], video["width"], video["height"]) == ("h264", "yuv420p", 320, 240)
    assert video["avg_frame_rate"] == "25/1" and audio["codec_name"] == "aac"
    speech = wav_seconds(synth.speak(synth.DEFAULT_TEXT, tmp_path / "speech.wav"))
    ends = stream_ends(media["default"])
    assert ends["audio"] == pytest.approx(speech, abs=0.05)
    assert ends["video"] == pytest.approx(ends["audio"], abs=0.1)


def test_a_clip_lasts_the_seconds_asked_for(media: dict) -> None:
    assert stream_ends(media["three_seconds"])["video"] == pytest.approx(3.0, abs=0.05)


@pytest.mark.parametrize(("which", "expected"), [("default", 1), ("several_faces", 2), ("no_face", 0)])
def test_mtcnn_finds_the_intended_number_of_faces(media: dict, detect_faces, which: str, expected: int) -> None:
    path = media["default"] if which == "default" else media["cases"][which]
    for seconds in (0.5, 2.5):
        boxes = detect_faces(frame_at(path, seconds))
        assert len(boxes) == expected, f"{which} at {seconds}s: {boxes}"
    if expected == 2:  # side by side, of similar size
        widths = boxes[:, 2] - boxes[:, 0]
        assert widths.min() > 0.75 * widths.max()
        assert boxes[:, 0].max() > boxes[:, 2].min()


def test_faces_move_over_time(media: dict, detect_faces) -> None:
    first, later = (detect_faces(frame_at(media["default"], t))[0] for t in (0.2, 1.2))
    assert np.abs(first - later).max() > 5  # pixels: a tracker has real motion to follow


def test_broken_files_are_broken(media: dict) -> None:
    cases = media["cases"]
    assert cases["zero_byte"].stat().st_size == 0 and probe_fails(cases["zero_byte"])
    assert cases["not_a_video"].suffix == ".mp4" and probe_fails(cases["not_a_video"])
    # The index survives the cut (faststart), so the file probes but most packets are gone.
    info = ffprobe(cases["truncated"], "-count_packets", "-select_streams", "v:0")
    (video,) = info["streams"]
    assert float(video["duration"]) > 3.0
    assert int(video["nb_read_packets"]) < 0.5 * int(video["nb_frames"])


@pytest.mark.parametrize(
    "case",
    ["no_audio_stream", "silent_audio", "no_face", "several_faces", "rotated", "variable_fps", "flv_mp3",
     "non_ascii_name", "spaces_and_quotes", "long"],
)
def test_playable_cases_end_video_with_audio(media: dict, case: str) -> None:
    path = media["cases"][case]
    info = ffprobe(path)
    assert len(streams(info, "video")) == 1
    ends = stream_ends(path)
    if case == "no_audio_stream":
        assert streams(info, "audio") == [] and "audio" not in ends
        return
    assert len(streams(info, "audio")) == 1
    assert ends["video"] == pytest.approx(ends["audio"], abs=0.1)
    loudness = np.abs(audio_samples(path)).max()
    assert loudness == 0.0 if case == "silent_audio" else loudness > 0.1


def test_rotated_case_stores_turned_frames_and_displays_upright(media: dict, detect_faces) -> None:
    path = media["cases"]["rotated"]
    (video,) = streams(ffprobe(path), "video")
    assert (video["width"], video["height"]) == (240, 320)
    rotations = [side["rotation"] for side in video.get("side_data_list", []) if "rotation" in side]
    assert rotations and int(rotations[0]) % 360 == 90
    frame = frame_at(path, 1.0)
    assert frame.shape == (240, 320, 3)
    assert len(detect_faces(frame)) == 1


def test_variable_fps_case_has_uneven_frame_timing(media: dict) -> None:
    path = media["cases"]["variable_fps"]
    (video,) = streams(ffprobe(path), "video")
    assert video["r_frame_rate"] != video["avg_frame_rate"]
    num, den = map(int, video["avg_frame_rate"].split("/"))
    assert num / den == pytest.approx(25, rel=0.05)
    info = ffprobe(path, "-show_packets", "-select_streams", "v:0")
    pts = np.sort([float(p["pts_time"]) for p in info["packets"]])
    steps = np.round(np.diff(pts), 3)
    assert len(set(steps.tolist())) >= 2 and steps.min() < 0.03 < 0.05 < steps.max()


def test_flv_case_is_sorenson_and_mp3_like_crema_d(media: dict) -> None:
    info = ffprobe(media["cases"]["flv_mp3"])
    assert "flv" in info["format"]["format_name"]
    assert [s["codec_name"] for s in streams(info, "video")] == ["flv1"]
    assert [s["codec_name"] for s in streams(info, "audio")] == ["mp3"]


def test_awkward_file_names(media: dict, detect_faces) -> None:
    odd = media["cases"]["non_ascii_name"].name
    assert not odd.isascii() and "中文" in odd
    quoted = media["cases"]["spaces_and_quotes"].name
    assert all(char in quoted for char in (" ", "'", '"'))
    for case in ("non_ascii_name", "spaces_and_quotes"):
        assert len(detect_faces(frame_at(media["cases"][case], 1.0))) == 1


def test_long_case_has_a_face_and_speech_to_the_end(media: dict, detect_faces) -> None:
    path = media["cases"]["long"]
    (video,) = streams(ffprobe(path), "video")
    assert (video["width"], video["height"]) == (160, 120)
    assert stream_ends(path)["video"] == pytest.approx(40.0, abs=0.1)
    assert len(detect_faces(frame_at(path, 35.0))) == 1
    assert np.abs(audio_samples(path, start=30.0)).max() > 0.1


def test_demo_corpus_clips_are_short_and_filled_with_speech(media: dict, detect_faces) -> None:
    demo = media["demo"]
    assert len(demo) == 2 and len({p.read_bytes() for p in demo}) == 2
    for path in demo:
        ends = stream_ends(path)
        assert 3.0 - 0.05 <= ends["audio"] <= 5.0 + 0.05
        assert ends["video"] == pytest.approx(ends["audio"], abs=0.1)
        samples = audio_samples(path)
        windows = samples[: samples.size // 4000 * 4000].reshape(-1, 4000)  # 0.25 s
        loud = np.sqrt((windows**2).mean(axis=1)) > 0.02
        assert loud.mean() > 0.6
        assert len(detect_faces(frame_at(path, 1.5))) == 1


def test_face_tint_changes_the_face_colour(media: dict, detect_faces, tmp_path: Path) -> None:
    tinted = synth.talking_face_video(
        tmp_path / "red.mp4", seconds=1.0, audio="none", face_tint=(1.3, 0.7, 0.7)
    )
    plain_frame, tinted_frame = frame_at(media["default"], 0.5), frame_at(tinted, 0.5)
    x1, y1, x2, y2 = detect_faces(plain_frame)[0].round().astype(int)

    def red_share(frame: np.ndarray) -> float:
        face = frame[y1:y2, x1:x2].astype(float)
        return face[..., 0].mean() / face.mean()

    assert red_share(tinted_frame) > red_share(plain_frame) + 0.1


@pytest.mark.parametrize(
    ("suffix", "vcodec", "acodec"),
    [(".avi", "mpeg4", "mp3"), (".mkv", "h264", "vorbis"), (".webm", "vp9", "opus")],
)
def test_container_defaults_and_tone_audio(tmp_path: Path, suffix: str, vcodec: str, acodec: str) -> None:
    path = synth.talking_face_video(tmp_path / f"clip{suffix}", seconds=1.0, audio="tone")
    info = ffprobe(path)
    assert [s["codec_name"] for s in streams(info, "video")] == [vcodec]
    assert [s["codec_name"] for s in streams(info, "audio")] == [acodec]
    ends = stream_ends(path)
    assert ends["video"] == pytest.approx(ends["audio"], abs=0.1)
    assert np.abs(audio_samples(path)).max() > 0.05  # lavfi's sine peaks at 1/8


def test_invalid_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rotation"):
        synth.talking_face_video(tmp_path / "a.flv", rotate=90)
    with pytest.raises(ValueError, match="variable frame rate"):
        synth.talking_face_video(tmp_path / "a.avi", variable_fps=True)
    with pytest.raises(ValueError, match="audio must be"):
        synth.talking_face_video(tmp_path / "a.mp4", audio="music")
    with pytest.raises(ValueError, match="even"):
        synth.talking_face_video(tmp_path / "a.mp4", size=(321, 240))
