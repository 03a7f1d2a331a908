"""Captioning throughput: the whole pipeline against bare vLLM generation of the same batch.

    python benchmarks/caption_bench.py INGEST_DIR --model MODEL_DIR [--count 16] [--prompt cot-v1]

Both sides use one engine loaded once. "vLLM alone" times only ``LLM.generate`` on requests whose
media are already decoded (one batch, first attempt, same sampling and structured output);
"pipeline" times a full captioning run over the same clips: shard reading and decoding,
generation with repair rounds, parsing, text embeddings and the LanceDB upsert. On a CPU with the
tiny random model the figures only check the plumbing; the target (pipeline within 10 % of vLLM
alone) is meant for a real model on a GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from vaemo.artifacts import IngestFolder
from vaemo.caption.engines import Request, load_engine
from vaemo.caption.inputs import clip_media, shard_samples
from vaemo.caption.prompt import json_schema, load_prompt
from vaemo.caption.run import caption
from vaemo.caption.select import select_clips
from vaemo.config import CaptionConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ingest_dir", type=Path)
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompt", default="cot-v1")
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=768)
    parser.add_argument("--repeat", type=int, default=2, help="timed rounds of each side, alternating; best is kept")
    args = parser.parse_args()

    cfg = CaptionConfig(
        model=args.model, prompt=args.prompt, count=args.count, retries=0, sampling={"max_tokens": args.max_tokens}
    )
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

    bare, piped = [], []
    for _ in range(args.repeat):
        start = time.perf_counter()
        replies = engine.generate(requests, schema)
        bare.append((time.perf_counter() - start, sum(r.generated_tokens for r in replies)))
        with tempfile.TemporaryDirectory() as db:
            start = time.perf_counter()
            summary = caption(args.ingest_dir, db, cfg, engine=engine)
            piped.append((time.perf_counter() - start, summary["generated_tokens"]))

    def rate(runs):
        seconds, tokens = min(runs)
        return {"seconds": round(seconds, 2), "clips_per_s": round(len(requests) / seconds, 3),
                "tokens_per_s": round(tokens / seconds, 1)}

    result = {"machine": platform.processor() or platform.machine(), "model": cfg.model, "clips": len(requests),
              "vllm_alone": rate(bare), "pipeline": rate(piped)}
    result["pipeline_vs_vllm_clips_per_s"] = round(
        result["pipeline"]["clips_per_s"] / result["vllm_alone"]["clips_per_s"], 3
    )
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
