"""Stage 1 throughput: can the loader feed the model? Clips/s of the loader per worker core against
samples/s of the training step, with peak memory, on this machine.

    .venv/bin/python benchmarks/train_bench.py INGEST_DIR [--model tiny] [--batch-size 8] [--steps 10] [--out FILE]

Both are measured in one run on the same cores (the machine is noisy: compare the ratio). On a
GPU the step runs under bf16 autocast and MFU is reported against the card's dense bf16 peak.

With INGEST_DIR, the loader is measured twice on the same clips: from the mp4 shards
(``loader_mp4_clips_per_second_per_worker``: decode, crop, fbank in the worker) and from the
training view (``loader_view_clips_per_second_per_worker``: what a worker does when the batch is
decoded on the GPU: read the bytes, cut the window, compute its fbank), plus the view with the
JPEG decode and augmentation in the worker too (the CPU-only path). The view is built into a
temporary copy of the ingest folder, timed per source hour, and its size per clip is set beside
the mp4 shards'. ``frame_formats`` compares ways to store the view's frames (JPEG, PNG, raw uint8).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torchvision.io import decode_jpeg, decode_png, encode_jpeg, encode_png

from vaemo.artifacts import IngestFolder
from vaemo.config import PretrainConfig
from vaemo.data.loader import make_loader
from vaemo.data.samples import decode_video
from vaemo.data.view import TrainingView, build
from vaemo.model import av
from vaemo.train.loop import optimizer_for
from vaemo.train.pretrain import data_config, model_config

GPU_PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
# `base` at batch 128 on one H100, fixed tensors (README, Benchmarks): the rate the loader must feed per GPU.
BASE_128_SAMPLES_PER_SECOND = 2173.0


def loader_clips_per_second(urls: list[str], cfg: PretrainConfig, clips: int, batch_size: int, **view) -> float:
    """One DataLoader worker (one core) making training batches (``view``: make_loader's view and raw).

    One loader whose worker goes over the shards pass after pass (a fixed epoch of ``clips``), so
    the worker starts once; its start-up and first batch are left out.
    """
    data = data_config(cfg, model_config(cfg))
    iterator = iter(make_loader(urls, data, train=True, batch_size=batch_size, num_workers=1,
                                epoch_samples=clips + batch_size, **view))
    next(iterator)
    begin = time.perf_counter()
    counted = sum(len(batch["clip_id"]) for batch in iterator)
    if not counted:
        raise SystemExit("the loader benchmark needs shards with at least two batches of clips")
    return counted / (time.perf_counter() - begin)


def view_figures(ingest: IngestFolder, cfg: PretrainConfig, clips: int, batch_size: int) -> dict:
    """Build the view in a temporary copy of the ingest folder; its build time, size and the three loader rates."""
    data = data_config(cfg, model_config(cfg))
    with tempfile.TemporaryDirectory(prefix="view-bench-") as tmp:
        copy = IngestFolder(shutil.copytree(ingest.path, Path(tmp) / "ingest", ignore=shutil.ignore_patterns("views")))
        begin = time.perf_counter()
        summary = build(copy, data, cfg.view)
        seconds = time.perf_counter() - begin
        urls = TrainingView(copy, data, cfg.view).shard_urls()
        mp4_bytes = sum(Path(u).stat().st_size for u in copy.shard_urls())
        mp4 = loader_clips_per_second(copy.shard_urls(), cfg, clips, batch_size)
        raw = loader_clips_per_second(urls, cfg, 10 * clips, batch_size, view=True, raw=True)
        decoded = loader_clips_per_second(urls, cfg, clips, batch_size, view=True)
    usable = summary["clips"] - summary["skipped"]
    return {
        "loader_mp4_clips_per_second_per_worker": mp4,
        "loader_view_clips_per_second_per_worker": raw,
        "loader_view_decoded_on_cpu_clips_per_second_per_worker": decoded,
        "view_speed_up": raw / mp4,
        "view_build_seconds": seconds,
        "view_source_hours": summary["source_seconds"] / 3600,
        "view_build_seconds_per_source_hour": seconds / (summary["source_seconds"] / 3600),
        "view_clips": usable,
        "view_bytes_per_clip": summary["bytes"] / max(1, usable),
        "mp4_shard_bytes_per_clip": mp4_bytes / max(1, usable),
    }


def frame_formats(urls: list[str], clips: int = 4, stride: int = 4) -> dict:
    """Bytes per frame and decode ms per frame (one thread) of a view frame stored as JPEG q90, PNG or raw uint8."""
    frames = []
    for sample in wds.tarfile_samples(iter([{"url": u} for u in urls])):
        frames += [torch.from_numpy(f).permute(2, 0, 1).contiguous() for f in decode_video(sample["mp4"])[0][::stride]]
        clips -= 1
        if not clips:
            break
    formats = {"jpeg_q90": (lambda f: encode_jpeg(f, quality=90), decode_jpeg), "png": (encode_png, decode_png),
               "raw_uint8": (lambda f: f.reshape(-1).clone(), lambda b: b.view(3, *frames[0].shape[1:]).clone())}
    out = {}
    for name, (encode, decode) in formats.items():
        encoded = [encode(f) for f in frames]
        begin = time.perf_counter()
        for data in encoded:
            decode(data)
        out[name] = {"bytes_per_frame": float(np.mean([e.numel() for e in encoded])),
                     "decode_ms_per_frame": 1000 * (time.perf_counter() - begin) / len(encoded)}
    return out


def training_samples_per_second(cfg: PretrainConfig, steps: int, device: torch.device, compiled: bool = False) -> dict:
    """Optimizer steps on fixed tensors: the model's own consumption, without the loader.

    ``compiled``: the model under ``torch.compile`` (not used by training yet; measured here first).
    """
    model = av.AVMAE(model_config(cfg)).to(device)
    forward = torch.compile(model) if compiled else model
    optimizer = optimizer_for(model, cfg)
    video = torch.randn(cfg.batch_size, 3, 16, 160, 160, device=device)
    audio = torch.randn(cfg.batch_size, 256, 128, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with autocast:
            loss = forward(video, audio)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    begin = time.perf_counter()
    for _ in range(2 if compiled else 1):  # compilation (and a possible recompile) is not throughput
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warm_up = time.perf_counter() - begin
    begin = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - begin
    out = {"samples_per_second": cfg.batch_size * steps / seconds, "seconds_per_step": seconds / steps,
           "compiled": compiled, "warm_up_seconds": warm_up}
    if device.type == "cuda":
        out["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        flops_per_sample = 3 * av.model_info(model.cfg)["pretrain_gflops"] * 1e9  # forward + backward
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in GPU_PEAK_BF16_TFLOPS.items() if k in name), None)
        if peak:
            out["mfu"] = out["samples_per_second"] * flops_per_sample / (peak * 1e12)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("ingest_dir", nargs="?", type=Path, help="an ingest folder (omit on a GPU-only check)")
    parser.add_argument("--model", default="tiny", choices=["tiny", "small", "base"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--compile", action="store_true", help="measure the step under torch.compile")
    parser.add_argument("--loader-clips", type=int, default=60, help="clips the mp4 loader is timed on (view: 10x)")
    parser.add_argument("--loader-batch-size", type=int, default=5,
                        help="loader batch (5: the 15 clips of the shared media make whole batches)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = PretrainConfig(model=args.model, batch_size=args.batch_size)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "torch": torch.__version__},
        "model": args.model,
        "batch_size": args.batch_size,
        "train": training_samples_per_second(cfg, args.steps, device, compiled=args.compile),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    if args.ingest_dir:
        ingest = IngestFolder(args.ingest_dir)
        result.update(view_figures(ingest, cfg, args.loader_clips, args.loader_batch_size))
        result["frame_formats"] = frame_formats(ingest.shard_urls())
        view = result["loader_view_clips_per_second_per_worker"]
        result["workers_needed_to_feed_the_model"] = result["train"]["samples_per_second"] / view
        result["cores_per_gpu_base_batch_128"] = BASE_128_SAMPLES_PER_SECOND / view
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
