"""A labelled ingest folder for the captioning benchmark: many short talking-face clips, one clip per video.

    python benchmarks/caption_corpus.py OUT_DIR [--speakers 6] [--clips-per-class 12]

Makes ``OUT_DIR/videos`` (vaemo.synth.labelled_corpus: 3 classes, about 3 s each) and ingests it into
``OUT_DIR/ingest`` with the default ingest settings (8 videos per shard), in this process.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vaemo import synth
from vaemo.config import IngestConfig
from vaemo.ingest import shards as shard_io
from vaemo.ingest.run import IngestRun


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--speakers", type=int, default=6)
    parser.add_argument("--clips-per-class", type=int, default=12)
    args = parser.parse_args()
    videos, ingest = args.out / "videos", args.out / "ingest"
    labels = synth.labelled_corpus(videos, speakers=args.speakers, clips_per_class=args.clips_per_class)
    cfg = IngestConfig()
    with IngestRun(videos, ingest, "generic", cfg, labels=labels) as run:
        plan = run.plan()
        for batch in plan.batches:
            shard_io.run_batch(batch, ingest, cfg)
        stats = run.finalize(plan)
    print(f"{ingest}: {stats.get('clips')} clips from {stats.get('videos', len(list(videos.rglob('*.mp4'))))} videos")


if __name__ == "__main__":
    main()
