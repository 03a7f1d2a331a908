"""Stage 1 throughput: can the loader feed the model? Clips/s of the loader per worker core against
samples/s of the training step, with peak memory, on this machine.

    .venv/bin/python benchmarks/train_bench.py INGEST_DIR [--model tiny] [--batch-size 8] [--steps 10]

Both are measured in one run on the same cores (the machine is noisy: compare the ratio). On a
GPU the step runs under bf16 autocast and MFU is reported against the card's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import torch

from vaemo.artifacts import IngestFolder
from vaemo.config import PretrainConfig
from vaemo.data.loader import make_loader
from vaemo.model import av
from vaemo.train.loop import optimizer_for
from vaemo.train.pretrain import data_config, model_config

GPU_PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def loader_clips_per_second(urls: list[str], cfg: PretrainConfig, clips: int) -> float:
    """One DataLoader worker (one core) decoding training windows with augmentation.

    Counted per clip (batches of one), pass after pass over the shards, so that a corpus smaller
    than a batch still measures; each pass's worker start-up and first decode are left out.
    """
    data = data_config(cfg, model_config(cfg))
    decoded, seconds, epoch = 0, 0.0, 0
    while decoded < clips:
        iterator = iter(make_loader(urls, data, train=True, seed=epoch, batch_size=1, num_workers=1))
        next(iterator, None)
        begin = time.perf_counter()
        counted = sum(len(batch["clip_id"]) for batch in iterator)
        if not counted:
            raise SystemExit("the loader benchmark needs shards with at least two clips")
        decoded += counted
        seconds += time.perf_counter() - begin
        epoch += 1
    return decoded / seconds


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
        clips = loader_clips_per_second(
            IngestFolder(args.ingest_dir).shard_urls(), cfg, clips=max(2, args.steps // 2) * args.batch_size
        )
        result["loader_clips_per_second_per_worker"] = clips
        result["workers_needed_to_feed_the_model"] = result["train"]["samples_per_second"] / clips
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
