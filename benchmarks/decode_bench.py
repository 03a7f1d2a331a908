"""Window decoding in the loader: PyAV (what vaemo uses) against torchcodec, on the same shard samples.

    .venv/bin/python benchmarks/decode_bench.py INGEST_DIR [--repeats 5]

Both decode the 16 frames of a training window (random start, stride 4 at 25 fps) from the
sample's mp4 bytes to uint8 RGB on one thread, as one DataLoader worker does. torchcodec is not a
dependency of vaemo: install it beside the environment to compare (for example
``pip install --no-deps --target /tmp/tc torchcodec==0.17.0`` and ``PYTHONPATH=/tmp/tc``).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from vaemo.artifacts import IngestFolder
from vaemo.data.config import DataConfig
from vaemo.data.samples import choose_window, decode_video


def samples(ingest_dir: Path) -> list[dict]:
    return list(wds.DataPipeline(wds.SimpleShardList(IngestFolder(ingest_dir).shard_urls()), wds.tarfile_to_samples()))


def pyav_window(data: bytes, start_seed: int, cfg: DataConfig) -> np.ndarray:
    rng = np.random.default_rng(start_seed)
    frames, _, _, _ = decode_video(data, lambda n, fps: choose_window(n, fps, cfg, rng))
    return frames


def torchcodec_window(data: bytes, start_seed: int, cfg: DataConfig) -> np.ndarray:
    from torchcodec.decoders import VideoDecoder

    decoder = VideoDecoder(data, num_ffmpeg_threads=1, seek_mode="approximate")
    meta = decoder.metadata
    window = choose_window(meta.num_frames, meta.average_fps, cfg, np.random.default_rng(start_seed))
    batch = decoder.get_frames_at(list(window.frame_indices))  # (T, 3, H, W) uint8
    return batch.data.permute(0, 2, 3, 1).numpy()


def timed(decode, items: list[dict], cfg: DataConfig, repeats: int) -> tuple[float, float, list[np.ndarray]]:
    """Seconds of the first call (a fresh worker pays it: library loading), seconds per window after
    it, and each clip's frames."""
    begin = time.perf_counter()
    out = [decode(items[0]["mp4"], 0, cfg)]
    first = time.perf_counter() - begin
    out += [decode(s["mp4"], i, cfg) for i, s in enumerate(items) if i]
    begin = time.perf_counter()
    for _ in range(repeats):
        for i, sample in enumerate(items):
            decode(sample["mp4"], i, cfg)
    return first, (time.perf_counter() - begin) / (repeats * len(items)), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ingest_dir", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg, items = DataConfig(), samples(args.ingest_dir)
    result = {"machine": platform.processor() or platform.machine(), "clips": len(items)}
    first, seconds, reference = timed(pyav_window, items, cfg, args.repeats)
    result["pyav_ms_first_call"], result["pyav_ms_per_window"] = 1000 * first, 1000 * seconds
    try:
        first, seconds, frames = timed(torchcodec_window, items, cfg, args.repeats)
    except ImportError as err:
        result["torchcodec"] = f"not importable: {err}"
    else:
        result["torchcodec_ms_first_call"], result["torchcodec_ms_per_window"] = 1000 * first, 1000 * seconds
        result["torchcodec_over_pyav"] = result["torchcodec_ms_per_window"] / result["pyav_ms_per_window"]
        result["same_frames_mean_abs_diff"] = float(
            np.mean([np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(reference, frames, strict=True)])
        )
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
