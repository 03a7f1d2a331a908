"""Captioning throughput: the whole pipeline against bare vLLM generation of the same clips.

    python benchmarks/caption_bench.py INGEST_DIR --model MODEL_DIR [--count 16] [--prompt cot-v1]
        [--max-tokens 768] [--batch-clips B] [--replicas N]

Both sides use one engine loaded once, with the same settings. "vLLM alone" times only
``LLM.generate`` on requests whose media are already decoded (all clips in one call, first
attempt, same sampling and structured output); "pipeline" times a full captioning run over the
same clips: shard reading and decoding, generation in chunks of ``--batch-clips`` (repair rounds
included), parsing, text embeddings and the LanceDB upserts, overlapped as the run does them.
``--replicas N`` instead times the pipeline with one engine replica pinned to one CPU core against
N replicas on N cores (replica start-up excluded), and beside it what the machine's cores allow:
single-threaded matrix products on N cores against one (virtual cores may share physical ones). On a
CPU with the tiny random model the figures check the plumbing; the real target is a real model on GPUs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import tempfile
import time
from pathlib import Path

from vaemo.artifacts import IngestFolder
from vaemo.caption.engines import Request, load_engine
from vaemo.caption.inputs import clip_media, shard_samples
from vaemo.caption.prompt import json_schema, load_prompt
from vaemo.caption.replicas import ReplicaPool
from vaemo.caption.run import CaptionRun, caption
from vaemo.caption.select import select_clips
from vaemo.config import CaptionConfig


def bare_and_pipeline(args, cfg: CaptionConfig) -> dict:
    engine = load_engine(cfg)
    prompt = load_prompt(cfg.prompt)
    picked = select_clips(IngestFolder(args.ingest_dir).clips(), cfg)
    media = []
    for shard, group in picked.groupby("shard"):
        media += [
            clip_media(s, cfg.frames)
            for _, s in shard_samples(IngestFolder(args.ingest_dir).shards_dir / shard, set(group["clip_id"]))
        ]
    requests = [Request(m.clip_id, prompt.messages(), m, 0) for m in media]
    schema = json_schema(prompt.limits)
    engine.generate(requests[:2], schema)  # warm-up: first-batch compilation and caches

    bare, piped, engines = [], [], {}
    for _ in range(args.repeat):
        start = time.perf_counter()
        replies = engine.generate(requests, schema)
        bare.append((time.perf_counter() - start, sum(r.generated_tokens for r in replies)))
        with tempfile.TemporaryDirectory() as db:
            start = time.perf_counter()
            summary = caption(args.ingest_dir, db, cfg, engine=engine)
            piped.append((time.perf_counter() - start, summary["generated_tokens"]))
            engines = summary["engines"]

    def rate(runs):
        seconds, tokens = min(runs)
        return {"seconds": round(seconds, 2), "clips_per_s": round(len(requests) / seconds, 3),
                "tokens_per_s": round(tokens / seconds, 1)}

    result = {"clips": len(requests), "vllm_alone": rate(bare), "pipeline": rate(piped),
              "requests_per_generate_call": engines["requests_per_generate_call"],
              "engine_wait_share": engines["wait_share"]}
    result["pipeline_vs_vllm_clips_per_s"] = round(
        result["pipeline"]["clips_per_s"] / result["vllm_alone"]["clips_per_s"], 3
    )
    return result


def _matrix_products(core: int, seconds: float) -> float:
    import torch

    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    a = torch.rand(256, 256)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ a
        count += 1
    return count / seconds


def core_scaling(cores: list[int], seconds: float = 10.0) -> float:
    """Products per second on all ``cores`` at once against one core alone: the most that N processes,
    one per core, can gain on this machine."""
    with multiprocessing.get_context("spawn").Pool(len(cores)) as pool:
        one = pool.apply(_matrix_products, (cores[0], seconds))
        together = pool.starmap(_matrix_products, [(core, seconds) for core in cores])
    return round(sum(together) / one, 3)


def replica_scaling(args, cfg: CaptionConfig) -> dict:
    """The pipeline with one replica on one core, then ``--replicas`` replicas on as many cores."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < args.replicas:
        raise SystemExit(f"--replicas {args.replicas} needs as many CPU cores; this process may use {len(cores)}")
    result = {}
    for count in (1, args.replicas):
        os.sched_setaffinity(0, cores[:count])  # the replicas split what this process may use
        try:
            with tempfile.TemporaryDirectory() as db, CaptionRun(args.ingest_dir, db, cfg) as run:
                plan = run.plan()
                pool = ReplicaPool(cfg, run.prompt, run.schema, count)
                try:
                    start = time.perf_counter()
                    run.caption_all(plan, pool)
                    seconds = time.perf_counter() - start
                finally:
                    pool.close()
                engines = pool.tracker.summary()
        finally:
            os.sched_setaffinity(0, cores)
        result[f"replicas_{count}"] = {"seconds": round(seconds, 2), "clips_per_s": round(plan.clips_todo / seconds, 3),
                                       "requests_per_generate_call": engines["requests_per_generate_call"],
                                       "engine_wait_share": engines["wait_share"], "by_replica": engines["replica"]}
    result[f"replicas_{args.replicas}_vs_1_clips_per_s"] = round(
        result[f"replicas_{args.replicas}"]["clips_per_s"] / result["replicas_1"]["clips_per_s"], 3
    )
    result[f"cores_{args.replicas}_vs_1_matrix_products_per_s"] = core_scaling(cores[:args.replicas])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ingest_dir", type=Path)
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompt", default="cot-v1")
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=768)
    parser.add_argument("--batch-clips", type=int, default=CaptionConfig().batch_clips,
                        help="clips per generate call in the pipeline")
    parser.add_argument("--repeat", type=int, default=2, help="timed rounds of each side, alternating; best is kept")
    parser.add_argument("--replicas", type=int, default=0,
                        help="N > 1: time N replicas (one core each) against one instead")
    args = parser.parse_args()

    cfg = CaptionConfig(
        model=args.model, prompt=args.prompt, count=args.count, retries=0, sampling={"max_tokens": args.max_tokens},
        batch_clips=args.batch_clips,
    )
    result = {"machine": platform.processor() or platform.machine(), "cores": len(os.sched_getaffinity(0)),
              "model": cfg.model, "batch_clips": cfg.batch_clips}
    result.update(replica_scaling(args, cfg) if args.replicas > 1 else bare_and_pipeline(args, cfg))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
