"""Ingest throughput against a decode-only baseline, on the same pinned CPU cores.

    .venv/bin/python benchmarks/ingest_bench.py SRC [--dataset generic] [--out JSON] [--cores 1]
        [--repeat 1] [--config pipelines.yaml] [--set key=value ...] [--with-flow]

For a folder of real clips it measures:

1. decode-only: ffmpeg decoding each whole file at the ingest's output (video at ``cfg.fps``,
   scaled to ``media.frame_size(..., cfg.decode_short_side)``, rgb24 to a pipe; audio as 16 kHz
   mono s16le), through the project's own ``media.decode_frames`` / ``media.decode_audio``;
2. the whole ingest in-process: ``IngestRun`` -> ``plan`` -> ``shards.run_batch`` -> ``finalize``
   into a temporary folder, all videos in one batch (no Prefect, no Dask);
3. where the ingest time goes: the batch marker's per-stage timings plus content hashing;
4. MTCNN milliseconds per detection frame (every ``cfg.detect_every``-th decoded frame);
5. ingest / decode-only ratio (the target is at most 1.3x on one core) and the
   realtime factor (source seconds per ingest second);
6. the same ingest with the reference settings (``REFERENCE``: the defaults before the speed-ups
   of the detection and media settings), on the same files in the same run: its ratio, split and statuses beside the new
   ones, and how well the new settings' face boxes agree with the reference's (below);
7. with ``--with-flow``, a full ``vaemo ingest`` (Prefect + Dask, one worker) as a subprocess, for
   the fixed start-up cost the orchestration adds.

Face-box agreement: for every clip the reference ingest stored, the frames of its span are decoded
once and ``face.face_span`` runs on them with both settings (the function the pipeline crops
with). Per frame that both settings give a box for, the IoU is taken of the face squares (the
interpolated, smoothed square crop box shrunk back by ``face_scale * (1 + crop_margin /
crop_size)`` to the face's side); the report gives the mean per clip and over clips.

``--set key=value`` overrides an ``IngestConfig`` field, to measure options such as
``detect_every`` or ``video_preset`` without editing ``pipelines.yaml``.

The process is pinned to cores ``0..N-1`` before anything runs; ffmpeg children inherit the
affinity, and ffmpeg's automatic thread count follows it (libavutil counts the CPUs of the
affinity mask), so the decode-only baseline runs the same command lines on the same cores.
``torch`` gets N threads (``cfg.torch_threads`` is set to N, because ``run_batch`` applies it).
Models are loaded and called once before any timing; their load times are reported apart.
With ``--repeat`` every measurement is repeated and the fastest run is kept.

Markdown goes to stdout, progress to stderr, the full report as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import yaml
from pydantic import ValidationError
from tqdm import tqdm

from vaemo.artifacts import IngestFolder
from vaemo.config import IngestConfig, load_settings
from vaemo.ingest import face, media, shards, voice
from vaemo.ingest.adapters import scan_corpus
from vaemo.ingest.process import content_hash, video_id_of
from vaemo.ingest.records import LeftOut
from vaemo.ingest.run import IngestRun

REPO = Path(__file__).resolve().parents[1]
STAGES = ("hash", "probe", "decode", "vad", "detect", "encode", "write")
TARGET_RATIO = 1.3
MIN_MEAN_IOU = 0.9
# The ingest settings before the detection and media speed-ups: the reference every run is compared with.
REFERENCE = {
    "detect_every": 10, "detect_max_side": 256, "detect_pyramid_factor": 0.709, "media_io": "ffmpeg",
    "video_preset": "veryfast", "video_crf": 20,
}


# ---------------------------------------------------------------- set-up


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path, help="folder of videos")
    p.add_argument("--dataset", default="generic", help="dataset adapter (default: %(default)s)")
    p.add_argument("--out", type=Path, help="write the full report as JSON here")
    p.add_argument(
        "--cores", type=int, default=1, help="pin to cores 0..N-1 and use N torch threads (default: %(default)s)"
    )
    p.add_argument(
        "--repeat", type=int, default=1, help="repeat every measurement, keep the fastest (default: %(default)s)"
    )
    p.add_argument("--config", type=Path, default=REPO / "pipelines.yaml",
                   help="stages.ingest settings (default: the project's pipelines.yaml; defaults if absent)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one IngestConfig field, e.g. --set detect_every=20 (repeatable)")
    p.add_argument("--no-reference", action="store_true",
                   help="skip the ingest with the REFERENCE settings and the face-box comparison")
    p.add_argument("--with-flow", action="store_true",
                   help="also time a full `vaemo ingest` (Prefect + Dask, one worker) as a subprocess")
    args = p.parse_args(argv)
    available = len(os.sched_getaffinity(0))
    if not 1 <= args.cores <= available:
        p.error(f"--cores must be between 1 and {available} (the CPUs this process may use)")
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    return args


def pin_cores(cores: int) -> list[int]:
    os.sched_setaffinity(0, set(range(cores)))
    torch.set_num_threads(cores)
    return sorted(os.sched_getaffinity(0))


def load_config(path: Path, overrides: list[str], cores: int, videos: int) -> IngestConfig:
    """The project's ingest settings, with --set overrides, N torch threads and one batch for all videos."""
    cfg = load_settings(path).stages.ingest if path.is_file() else IngestConfig()
    cfg = cfg.model_copy()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in IngestConfig.model_fields:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE with KEY one of {sorted(IngestConfig.model_fields)}")
        try:
            setattr(cfg, key, value)  # validate_assignment converts and checks the value
        except ValidationError as exc:
            raise SystemExit(f"--set {item!r}: {exc.errors()[0]['msg']}") from None
    cfg.torch_threads = cores
    cfg.videos_per_batch = max(1, videos)
    return cfg


def machine_info(cores: list[int]) -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown",
    )
    ffmpeg_line = subprocess.run(
        ["ffmpeg", "-version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()[:1]
    return {"cpu": cpu, "cpus_on_machine": os.cpu_count(), "cores_used": cores, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "ffmpeg": ffmpeg_line[0].split(" Copyright")[0] if ffmpeg_line else "unknown",
            "python": sys.version.split()[0]}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


@contextmanager
def stopwatch(into: dict, key: str):
    begin = time.perf_counter()
    try:
        yield
    finally:
        into[key] = time.perf_counter() - begin


def keep_fastest(best: dict | None, new: dict, key: str) -> dict:
    """The faster of two measurements; one without ``key`` (it failed) counts as slowest."""
    if best is None:
        return new
    return new if new.get(key, float("inf")) < best.get(key, float("inf")) else best


# ---------------------------------------------------------------- measurements


def corpus(source: Path, dataset: str) -> list[dict]:
    """The videos the ingest will process: one per content hash, as the ingest's planning does."""
    videos, seen = [], set()
    for record in scan_corpus(source, dataset, None):
        if isinstance(record, LeftOut):
            continue
        video_id = video_id_of(content_hash(source, record))
        if video_id not in seen:
            seen.add(video_id)
            videos.append({"record": record, "video_id": video_id})
    return videos


def time_hashing(source: Path, videos: list[dict]) -> float:
    """content_hash runs during planning; timed here on its own (files already in the page cache)."""
    begin = time.perf_counter()
    for video in videos:
        content_hash(source, video["record"])
    return time.perf_counter() - begin


def warm_up(cfgs: list[IngestConfig], sizes: set[tuple[int, int]]) -> dict:
    """Load silero-VAD and MTCNN and call each once, so no timed run pays for a model load.

    MTCNN is cached per minimum face size, which follows from the frame size, so there is one
    warm-up detection per distinct decoded frame size.
    """
    timings, cfg = {}, cfgs[0]
    with stopwatch(timings, "vad_load_and_first_call_s"):
        voice.speech_segments(np.zeros(cfg.sample_rate, np.float32), cfg.sample_rate, cfg.vad_threshold)
    with stopwatch(timings, "mtcnn_load_and_first_call_s"):
        for width, height in sorted(sizes):
            for each in cfgs:
                face.detect(np.zeros((1, height, width, 3), np.uint8), each)
    timings["mtcnn_frame_sizes"] = len(sizes)
    return timings


def detection_size(size: tuple[int, int], cfg: IngestConfig) -> tuple[int, int]:
    """(width, height) MTCNN sees: the decoded frame downscaled to ``detect_max_side`` as in ``face.detect``."""
    width, height = size
    scale = min(1.0, cfg.detect_max_side / max(width, height))
    return round(width * scale), round(height * scale)


def decode_only(
    source: Path, record, info: media.ProbeInfo, size: tuple[int, int], cfg: IngestConfig
) -> tuple[dict, np.ndarray]:
    """Decode the whole file as the ingest does (frames + 16 kHz mono audio); return timings and frames."""
    timeout = media.decode_timeout(info.duration, cfg.decode_timeout_per_second)
    result = {"audio_s": 0.0}
    if record.audio_path or info.has_audio:
        with stopwatch(result, "audio_s"):
            media.decode_audio(source / (record.audio_path or record.path), cfg.sample_rate, timeout)
    with stopwatch(result, "video_s"):
        frames = media.decode_frames(source / record.path, 0.0, info.duration, cfg.fps, size, timeout)
    result["decode_s"] = result["audio_s"] + result["video_s"]
    result["frames"] = len(frames)
    return result, frames


def mtcnn_speed(frames: np.ndarray, cfg: IngestConfig) -> dict:
    """Milliseconds per detection frame of ``face.detect`` on every ``detect_every``-th frame."""
    sampled = frames[:: cfg.detect_every]
    if len(sampled) == 0:
        return {"detect_frames": 0, "detect_s": 0.0, "detect_ms_per_frame": None}
    result = {"detect_frames": len(sampled)}
    with stopwatch(result, "detect_s"):
        face.detect(sampled, cfg)
    result["detect_ms_per_frame"] = 1000.0 * result["detect_s"] / len(sampled)
    return result


def measure_video(source: Path, video: dict, cfgs: dict[str, IngestConfig]) -> dict:
    """Decode-only time and MTCNN speed under each setting of one video (the frames are decoded once for all)."""
    cfg = cfgs["new"]
    record = video["record"]
    row = {"path": record.path, "video_id": video["video_id"]}
    try:
        info = media.probe(source / record.path, cfg.probe_timeout)
        row.update(duration=info.duration, source_size=f"{info.width}x{info.height}")
        size = media.frame_size(info.width, info.height, info.rotation, cfg.decode_short_side)
        decoded, frames = decode_only(source, record, info, size, cfg)
    except media.MediaError as exc:
        return {**row, "error": f"{exc.status}: {exc.reason}"}
    row.update(decoded, decode_size="{}x{}".format(*size), detect_size="{}x{}".format(*detection_size(size, cfg)))
    row["mtcnn"] = {name: mtcnn_speed(frames, each) for name, each in cfgs.items()}
    row.update(row["mtcnn"]["new"])
    return row


def face_squares(boxes: np.ndarray, cfg: IngestConfig) -> np.ndarray:
    """Square crop boxes shrunk back around their centres to the face's side (see ``face.crop_boxes``)."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) / 2 / (cfg.face_scale * (1 + cfg.crop_margin / cfg.crop_size))
    return np.concatenate([centre - half, centre + half], 1)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of paired boxes (N, 4)."""
    low, high = np.maximum(a[:, :2], b[:, :2]), np.minimum(a[:, 2:], b[:, 2:])
    inter = np.prod(np.clip(high - low, 0, None), axis=1)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def box_agreement(source: Path, videos: list[dict], clips: dict[str, list[dict]], cfgs: dict) -> list[dict]:
    """Per reference clip: mean IoU of the new settings' face squares against the reference's, same frames."""
    ref, new = cfgs["reference"], cfgs["new"]
    rows = []
    for video in videos:
        path = source / video["record"].path
        for clip in clips.get(video["video_id"], []):
            info = media.probe(path, ref.probe_timeout)
            size = media.frame_size(info.width, info.height, info.rotation, ref.decode_short_side)
            length = clip["end"] - clip["start"]
            frames = media.decode_frames(path, clip["start"], length, ref.fps, size, 60.0 + 4 * length)
            frames = frames[: clip["frames"]]
            boxes = {}
            for name, cfg in (("reference", ref), ("new", new)):
                try:
                    found = face.face_span(frames, cfg, 1)
                except face.NoFace as exc:
                    boxes[name] = (None, exc.status)
                    continue
                per_frame = np.full((len(frames), 4), np.nan)
                per_frame[found.span[0] : found.span[1]] = face_squares(found.boxes, cfg)
                boxes[name] = (per_frame, "ok")
            row = {"clip_id": clip["clip_id"], "path": video["record"].path, "frames": len(frames),
                   "new_status": boxes["new"][1], "common_frames": 0, "mean_iou": None}
            if boxes["reference"][0] is not None and boxes["new"][0] is not None:
                a, b = boxes["reference"][0], boxes["new"][0]
                both = ~np.isnan(a[:, 0]) & ~np.isnan(b[:, 0])
                row["common_frames"] = int(both.sum())
                if both.any():
                    iou = box_iou(a[both], b[both])
                    row.update(mean_iou=float(iou.mean()), min_iou=float(iou.min()))
            rows.append(row)
    return rows


def ingest(source: Path, dataset: str, cfg: IngestConfig) -> dict:
    """The library path end to end (plan, one batch, finalize) into a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="vaemo-bench-") as tmp:
        out = Path(tmp) / "out"
        timings, markers = {}, []
        begin = time.perf_counter()
        with IngestRun(source, out, dataset, cfg) as run:
            with stopwatch(timings, "plan_s"):
                plan = run.plan()
            with stopwatch(timings, "batches_s"):
                markers = [shards.run_batch(batch, out, cfg) for batch in plan.batches]
            with stopwatch(timings, "finalize_s"):
                stats = run.finalize(plan)
        timings["total_s"] = time.perf_counter() - begin
    stages: dict[str, float] = {}
    for marker in markers:
        for stage, seconds in marker["timings"].items():
            stages[stage] = stages.get(stage, 0.0) + seconds
    rows = {row["video_id"]: row for marker in markers for row in marker["videos"]}
    return {**timings, "stages": stages, "videos": rows, "stats": stats}


def flow_wall_time(source: Path, dataset: str, cfg: IngestConfig) -> dict:
    """A full ``vaemo ingest`` (Prefect server, Dask cluster of one worker, MLflow) with the same settings."""
    with tempfile.TemporaryDirectory(prefix="vaemo-bench-flow-") as tmp:
        work = Path(tmp)
        config = work / "pipelines.yaml"
        config.write_text(
            yaml.safe_dump({"work_dir": str(work), "dask": {"workers": 1}, "stages": {"ingest": cfg.model_dump()}})
        )
        command = [str(Path(sys.executable).parent / "vaemo"), "--config", str(config), "--work-dir", str(work),
                   "ingest", str(source), "--dataset", dataset, "--out", str(work / "out"), "--workers", "1"]
        begin = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - begin
        stats_file = IngestFolder(work / "out") / IngestFolder.STATS
        stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
    return {
        "wall_s": seconds,
        "run_s": stats.get("last_run", {}).get("seconds"),  # IngestRun open to finalize, inside the flow
        "stages": stats.get("timings_total", {}),  # per-stage seconds on the Dask worker
        "returncode": done.returncode,
        "command": " ".join(command[1:]),
        "stderr_tail": done.stderr.strip().splitlines()[-3:],
    }


# ---------------------------------------------------------------- report


def stage_split(run: dict, hash_s: float) -> list[dict]:
    """Seconds and share of the end-to-end ingest per stage; 'other' is planning, shard commit, parquet."""
    seconds = {"hash": hash_s, **{s: run["stages"].get(s, 0.0) for s in STAGES if s != "hash"}}
    seconds["other"] = run["total_s"] - sum(seconds.values())
    return [
        {"stage": s, "seconds": round(v, 3), "percent": round(100.0 * v / run["total_s"], 1)}
        for s, v in seconds.items()
    ]


def summarise(rows: list[dict], run: dict, cfg: IngestConfig, name: str = "new") -> dict:
    measured = [r for r in rows if "error" not in r]
    decode_s = sum(r["decode_s"] for r in measured)
    source_s = sum(r["duration"] for r in measured)
    detect_frames = sum(r["mtcnn"][name]["detect_frames"] for r in measured)
    detect_s = sum(r["mtcnn"][name]["detect_s"] for r in measured)
    return {
        "ok_videos": sum(1 for v in run["videos"].values() if v["status"] == "ok"),
        "ok_clips": sum(v["n_clips"] for v in run["videos"].values() if v["status"] == "ok"),
        "videos": len(rows),
        "clips": run["stats"]["clips"],
        "status_counts": run["stats"]["status_counts"],
        "source_seconds": round(source_s, 2),
        "decode_only_s": round(decode_s, 3),
        "ingest_s": round(run["total_s"], 3),
        "ingest_batches_only_s": round(run["batches_s"], 3),
        "ratio_ingest_to_decode": round(run["total_s"] / decode_s, 2) if decode_s else None,
        "ratio_batches_to_decode": round(run["batches_s"] / decode_s, 2) if decode_s else None,
        "target_ratio": TARGET_RATIO,
        "realtime_factor": round(source_s / run["total_s"], 2),
        "decode_only_realtime_factor": round(source_s / decode_s, 2) if decode_s else None,
        "mtcnn_ms_per_frame": round(1000.0 * detect_s / detect_frames, 2) if detect_frames else None,
        "mtcnn_frames": detect_frames,
        "detect_every": cfg.detect_every,
    }


def compare(ref: dict, new: dict, rows: list[dict], agreement: list[dict]) -> dict:
    """The acceptance: every video ``ok`` with the reference stays ``ok``, and the mean face-box IoU."""
    lost = [r["path"] for r in rows if r.get("reference_status") == "ok" and r.get("status") != "ok"]
    ious = [a["mean_iou"] for a in agreement if a["mean_iou"] is not None]
    mean_iou = float(np.mean(ious)) if ious else None
    return {
        "ratio_reference": ref["ratio_ingest_to_decode"],
        "ratio_new": new["ratio_ingest_to_decode"],
        "speed_up": round(ref["ingest_s"] / new["ingest_s"], 2),
        "ok_lost": lost,
        "clips_compared": len(agreement),
        "clips_without_new_box": [a["clip_id"] for a in agreement if a["mean_iou"] is None],
        "mean_iou": None if mean_iou is None else round(mean_iou, 4),
        "min_clip_iou": None if not ious else round(min(ious), 4),
        "accepted": not lost and mean_iou is not None and mean_iou >= MIN_MEAN_IOU and len(ious) == len(agreement),
        "clips": agreement,
    }


def comparison_markdown(report: dict) -> list[str]:
    c, ref, new = report["comparison"], report["reference"], report
    head = ["settings", "ingest s", "ingest / decode-only", "MTCNN frames", "MTCNN ms/frame", "ok videos",
            "ok clips", "statuses"]
    summary = [
        [name, fmt(r["summary"]["ingest_s"]), f"{r['summary']['ratio_ingest_to_decode']}x",
         r["summary"]["mtcnn_frames"], r["summary"]["mtcnn_ms_per_frame"], r["summary"]["ok_videos"],
         r["summary"]["ok_clips"], r["summary"]["status_counts"]]
        for name, r in (("reference", ref), ("new", new))
    ]
    split = [[stage["stage"], f"{fmt(stage['seconds'], 2)} s ({fmt(stage['percent'], 1)} %)",
              f"{fmt(new_stage['seconds'], 2)} s ({fmt(new_stage['percent'], 1)} %)"]
             for stage, new_stage in zip(ref["stages"], new["stages"], strict=True)]
    return [
        "## Reference settings against the new ones (same files, same run)",
        f"Reference: {report['reference_settings']} over the same settings otherwise (processing digest "
        f"{ref['processing_digest']}); new: {report['processing_digest']}. Speed-up {c['speed_up']}x, ratio "
        f"{c['ratio_reference']}x -> {c['ratio_new']}x (target <= {TARGET_RATIO}x).",
        table(head, summary),
        table(["stage", "reference", "new"], split),
        f"Face boxes of the new settings against the reference on {c['clips_compared']} reference clips: mean IoU "
        f"**{c['mean_iou']}** (lowest clip {c['min_clip_iou']}; acceptance >= {MIN_MEAN_IOU}); clips without a box "
        f"under the new settings: {c['clips_without_new_box'] or 'none'}; videos `ok` before and not now: "
        f"{c['ok_lost'] or 'none'}. **Acceptance: {'met' if c['accepted'] else 'NOT met'}.**",
        table(["clip", "source", "frames", "new", "frames with both boxes", "mean IoU", "lowest IoU"],
              [[a["clip_id"], a["path"], a["frames"], a["new_status"], a["common_frames"], fmt(a["mean_iou"], 3),
                fmt(a.get("min_iou"), 3)] for a in c["clips"]]),
        "Boxes: `face.face_span` with each setting on the same decoded frames of every reference clip; the IoU is of "
        "the face squares (the smoothed crop box shrunk back to the face's side), over the frames both settings cover.",
    ]


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value, digits: int = 2):
    return None if value is None else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    m, s, w = report["machine"], report["summary"], report["warm_up"]
    parts = [
        "# Ingest benchmark",
        f"CPU {m['cpu']} ({m['cpus_on_machine']} on the machine), pinned to cores {m['cores_used']}, "
        f"torch {m['torch']} with {m['torch_threads']} threads, {m['ffmpeg']}. "
        f"Load average (1/5/15 min) at start {report['load_start']}, at end {report['load_end']}. "
        f"Best of {report['repeat']} run(s). Settings: {report['config_source']}"
        + (f", overrides {report['overrides']}" if report["overrides"] else "")
        + f" (processing digest {report['processing_digest']}).",
        f"Models were loaded and called once before timing: silero-VAD {w['vad_load_and_first_call_s']:.2f} s, "
        f"MTCNN {w['mtcnn_load_and_first_call_s']:.2f} s ({w['mtcnn_frame_sizes']} frame sizes). "
        "The ingest ran in-process (no Prefect, no Dask); a full `vaemo ingest` adds a fixed start-up "
        "cost (Prefect server, Dask cluster, MLflow, model loads in the worker), measured separately with "
        "`--with-flow`.",
        "## Summary",
        table(
            ["videos", "clips", "source s", "decode-only s", "ingest s", "ingest / decode-only",
             "batches only / decode-only", "target", "realtime x (ingest)", "realtime x (decode-only)",
             "MTCNN ms/frame"],
            [
                [s["videos"], s["clips"], fmt(s["source_seconds"], 1), fmt(s["decode_only_s"]), fmt(s["ingest_s"]),
                 f"{s['ratio_ingest_to_decode']}x", f"{s['ratio_batches_to_decode']}x", f"<= {s['target_ratio']}x",
                 s["realtime_factor"], s["decode_only_realtime_factor"], s["mtcnn_ms_per_frame"]]
            ],
        ),
        f"Statuses: {s['status_counts']}. Ingest phases: plan {report['ingest']['plan_s']:.2f} s, "
        f"batches {report['ingest']['batches_s']:.2f} s, finalize {report['ingest']['finalize_s']:.2f} s.",
        "## Where the ingest time goes",
        table(["stage", "seconds", "% of ingest"],
              [[r["stage"], fmt(r["seconds"], 3), fmt(r["percent"], 1)] for r in report["stages"]]),
        "`hash` is timed on its own (it runs inside planning); `detect` is the whole face step (MTCNN on every "
        "`detect_every`-th frame, track linking, and the crop + resize of every frame); `other` is the rest of "
        "planning, shard commit and the parquet files.",
        *(comparison_markdown(report) if report.get("comparison") else []),
        "## Per video",
        table(
            ["video", "source", "s", "status", "reference status", "clips", "decode size",
             "decode-only s (audio+video)", "ingest s", "ingest / decode",
             f"MTCNN frames (every {s['detect_every']})", "detect size", "MTCNN ms/frame"],
            [
                [
                    r["path"],
                    r.get("source_size"),
                    fmt(r.get("duration"), 1),
                    r.get("status", r.get("error")),
                    r.get("reference_status"),
                    r.get("n_clips"),
                    r.get("decode_size"),
                    f"{fmt(r.get('decode_s'), 3)} ({fmt(r.get('audio_s'), 3)}+{fmt(r.get('video_s'), 3)})"
                    if "decode_s" in r
                    else None,
                    fmt(r.get("ingest_s"), 3),
                    fmt(r.get("ratio")),
                    r.get("detect_frames"),
                    r.get("detect_size"),
                    fmt(r.get("detect_ms_per_frame"), 1),
                ]
                for r in report["per_video"]
            ],
        ),
        "Per-video ingest seconds come from the batch marker (process + write of that video; hashing and planning "
        "are not in it).",
    ]
    if report.get("flow"):
        f = report["flow"]
        parts += [
            "## Full `vaemo ingest` (orchestration)",
            f"`{f['command']}`: {f['wall_s']:.2f} s wall (exit {f['returncode']}), "
            f"{f['wall_s'] - s['ingest_s']:.2f} s more than the in-process ingest; the ingest run inside it "
            f"(IngestRun open to finalize, batches on the Dask worker) took {fmt(f['run_s'])} s, so start-up and "
            "shut-down of Prefect, Dask and MLflow took about "
            f"{fmt(f['wall_s'] - f['run_s'] if f['run_s'] else None)} s. "
            "All of it ran on the same pinned cores. Stages on the worker: "
            + ", ".join(f"{k} {v:.2f} s" for k, v in f["stages"].items())
            + f" (sum {sum(f['stages'].values()):.2f} s; in-process: {sum(report['ingest_stages'].values()):.2f} s).",
        ]
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cores = pin_cores(args.cores)
    load_start = load_average()
    media.require_ffmpeg()
    videos = corpus(args.source, args.dataset)
    cfg = load_config(args.config, args.overrides, args.cores, len(videos))
    cfgs = {"new": cfg} if args.no_reference else {"reference": cfg.model_copy(update=REFERENCE), "new": cfg}
    infos = {}
    for video in videos:
        try:
            infos[video["video_id"]] = media.probe(args.source / video["record"].path, cfg.probe_timeout)
        except media.MediaError:
            pass  # reported per video by measure_video
    sizes = {media.frame_size(i.width, i.height, i.rotation, cfg.decode_short_side) for i in infos.values()}
    warm = warm_up(list(cfgs.values()), sizes)

    best_rows: dict[str, dict] = {}
    best_runs: dict[str, dict | None] = dict.fromkeys(cfgs)
    best_hash = None
    with tqdm(total=args.repeat * (len(videos) + 1 + len(cfgs)), unit="step", file=sys.stderr) as bar:
        for repeat in range(args.repeat):
            bar.set_description(f"decode-only + MTCNN ({repeat + 1}/{args.repeat})")
            for video in videos:
                best_rows[video["video_id"]] = keep_fastest(
                    best_rows.get(video["video_id"]), measure_video(args.source, video, cfgs), "decode_s"
                )
                bar.update()
            bar.set_description(f"hashing ({repeat + 1}/{args.repeat})")
            hash_s = time_hashing(args.source, videos)
            best_hash = hash_s if best_hash is None else min(best_hash, hash_s)
            bar.update()
            for name, each in cfgs.items():
                bar.set_description(f"ingest, {name} settings ({repeat + 1}/{args.repeat})")
                best_runs[name] = keep_fastest(best_runs[name], ingest(args.source, args.dataset, each), "total_s")
                bar.update()
        agreement = None
        if "reference" in cfgs:
            bar.set_description("face boxes, reference vs new")
            clips = {vid: row["clips"] for vid, row in best_runs["reference"]["videos"].items()}
            agreement = box_agreement(args.source, videos, clips, cfgs)
        flow = None
        if args.with_flow:
            bar.set_description("full vaemo ingest")
            flow = flow_wall_time(args.source, args.dataset, cfg)

    best_run = best_runs["new"]
    rows = []
    for video in videos:
        row = dict(best_rows[video["video_id"]])
        done = best_run["videos"].get(video["video_id"], {})
        row.update(status=done.get("status"), n_clips=done.get("n_clips"), ingest_s=done.get("seconds"))
        if "reference" in cfgs:
            row["reference_status"] = best_runs["reference"]["videos"].get(video["video_id"], {}).get("status")
        if row.get("ingest_s") is not None and row.get("decode_s"):
            row["ratio"] = row["ingest_s"] / row["decode_s"]
        rows.append(row)
    report = {
        "source": str(args.source),
        "dataset": args.dataset,
        "repeat": args.repeat,
        "machine": machine_info(cores),
        "load_start": load_start,
        "config_source": str(args.config) if args.config.is_file() else "IngestConfig defaults",
        "overrides": args.overrides,
        "processing_digest": cfg.processing_digest(),
        "config": cfg.model_dump(),
        "reference_settings": None if args.no_reference else REFERENCE,
        "warm_up": warm,
        "summary": summarise(rows, best_run, cfg),
        "stages": stage_split(best_run, best_hash),
        "ingest": {k: best_run[k] for k in ("plan_s", "batches_s", "finalize_s", "total_s")},
        "ingest_stages": best_run["stages"],
        "per_video": rows,
        "flow": flow,
        "notes": [
            "ingest ran in-process (IngestRun + run_batch + finalize), no Prefect, no Dask; the orchestration adds a "
            "fixed start-up cost, measured by --with-flow",
            "models were loaded and called once before timing; their load times are in warm_up",
            "ffmpeg children inherit the CPU affinity and size their thread pools to it",
        ],
    }
    if "reference" in cfgs:
        ref = best_runs["reference"]
        report["reference"] = {
            "summary": summarise(rows, ref, cfgs["reference"], "reference"),
            "stages": stage_split(ref, best_hash),
            "processing_digest": cfgs["reference"].processing_digest(),
        }
        report["comparison"] = compare(report["reference"]["summary"], report["summary"], rows, agreement)
    report["load_end"] = load_average()
    print(markdown(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
