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

from vaemo.config import PretrainConfig
from vaemo.data.loader import make_loader, shard_urls
from vaemo.model import av
from vaemo.train.loop import optimizer_for
from vaemo.train.pretrain import data_config, model_config

GPU_PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def loader_clips_per_second(urls: list[str], cfg: PretrainConfig, batches: int) -> float:
    """One DataLoader worker (one core) decoding training windows with augmentation."""
    data = data_config(cfg, model_config(cfg))
    loader = make_loader(urls, data, train=True, batch_size=cfg.batch_size, num_workers=1, epoch_samples=batches * cfg.batch_size)
    iterator, clips = iter(loader), 0
    next(iterator)  # worker start-up and first decode are not throughput
    begin = time.perf_counter()
    for batch in iterator:
        clips += len(batch["clip_id"])
        if clips >= batches * cfg.batch_size:
            break
    return clips / (time.perf_counter() - begin)


def training_samples_per_second(cfg: PretrainConfig, steps: int, device: torch.device) -> dict:
    """Optimizer steps on fixed tensors: the model's own consumption, without the loader."""
    model = av.AVMAE(model_config(cfg)).to(device)
    optimizer = optimizer_for(model, cfg)
    video = torch.randn(cfg.batch_size, 3, 16, 160, 160, device=device)
    audio = torch.randn(cfg.batch_size, 256, 128, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with autocast:
            loss = model(video, audio)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    begin = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - begin
    out = {"samples_per_second": cfg.batch_size * steps / seconds, "seconds_per_step": seconds / steps}
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
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = PretrainConfig(model=args.model, batch_size=args.batch_size)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__},
        "model": args.model,
        "batch_size": args.batch_size,
        "train": training_samples_per_second(cfg, args.steps, device),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    if args.ingest_dir:
        clips = loader_clips_per_second(shard_urls(args.ingest_dir), cfg, batches=max(2, args.steps // 2))
        result["loader_clips_per_second_per_worker"] = clips
        result["workers_needed_to_feed_the_model"] = result["train"]["samples_per_second"] / clips
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
