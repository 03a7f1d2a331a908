"""Does Stage 1 learn? The learning check of benchmarks/stage1_learning.yaml over several seeds.

    .venv/bin/python benchmarks/stage1_learning.py INGEST_DIR [--seeds 0 1 2] [--mp4] [--out DIR]

Each seed trains `tiny` from scratch with the file's settings (the seed changes the initial
weights and the data stream) and is judged against the targets: loss_last <= 0.6 x loss_first
and video->audio top-1 >= 5 x chance on the training clips. Prints one row per seed and writes
``summary.json`` beside the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from vaemo.config import load_settings
from vaemo.train.pretrain import pretrain

SETTINGS = Path(__file__).with_name("stage1_learning.yaml")
MAX_LOSS_RATIO = 0.6
MIN_TIMES_CHANCE = 5.0


def judged(metrics: dict, seconds: float) -> dict:
    ratio = metrics["loss_last"] / metrics["loss_first"]
    times_chance = metrics["av_retrieval_top1"] / metrics["av_retrieval_chance"]
    return {
        "minutes": round(seconds / 60, 2),
        "loss_first": round(metrics["loss_first"], 3),
        "loss_last": round(metrics["loss_last"], 3),
        "loss_ratio": round(ratio, 3),
        "av_retrieval_top1": round(metrics["av_retrieval_top1"], 3),
        "times_chance": round(times_chance, 2),
        "clips": metrics["av_retrieval_clips"],
        "passed": ratio <= MAX_LOSS_RATIO and times_chance >= MIN_TIMES_CHANCE - 1e-6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ingest_dir", type=Path, help="an ingest output folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--settings", type=Path, default=SETTINGS, help="a pipelines file whose stages.pretrain is used"
    )
    parser.add_argument("--mp4", action="store_true",
                        help="train from the mp4 shards (the reference path) instead of the training view")
    parser.add_argument("--out", type=Path, help="where the runs go (default: a new temporary folder)")
    args = parser.parse_args()
    base = load_settings(args.settings).stages.pretrain
    if args.mp4:
        base = base.model_copy(update={"view": base.view.model_copy(update={"enabled": False})})
    out = args.out or Path(tempfile.mkdtemp(prefix="stage1-learning-"))
    rows = {}
    print(f"settings {args.settings}, {'mp4 shards' if args.mp4 else 'training view'}, runs in {out}")
    print("seed  minutes  loss_first -> loss_last  ratio  top-1  x chance  passed")
    for seed in args.seeds:
        begin = time.perf_counter()
        metrics = pretrain(args.ingest_dir, out / f"seed-{seed}", base.model_copy(update={"seed": seed}))
        row = rows[seed] = judged(metrics, time.perf_counter() - begin)
        print(
            f"{seed:>4}  {row['minutes']:>7}  {row['loss_first']:>10} -> {row['loss_last']:<9}  {row['loss_ratio']:>5}"
            f"  {row['av_retrieval_top1']:>5}  {row['times_chance']:>8}  {row['passed']}",
            flush=True,
        )
    summary = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load": os.getloadavg()},
        "settings": base.model_dump(mode="json"),
        "reads": "mp4 shards" if args.mp4 else "training view",
        "targets": {"max_loss_ratio": MAX_LOSS_RATIO, "min_times_chance": MIN_TIMES_CHANCE},
        "seeds": rows,
        "all_passed": all(row["passed"] for row in rows.values()),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"all passed: {summary['all_passed']} ({out / 'summary.json'})")


if __name__ == "__main__":
    main()
