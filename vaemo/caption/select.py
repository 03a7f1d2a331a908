"""Which clips get a description: a small, stratified, reproducible subset that never touches a test fold."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pandas as pd

from vaemo.config import CaptionConfig
from vaemo.errors import ConfigError


class SelectionError(ConfigError):
    pass


def _rank(seed: int, clip_id: str) -> str:
    """A stable pseudo-random rank per clip: adding clips to a corpus keeps earlier picks picked."""
    return hashlib.sha256(f"{seed}:{clip_id}".encode()).hexdigest()


def excluded_ids(cfg: CaptionConfig) -> set[str]:
    if cfg.exclude_clips is None:
        return set()
    path = Path(cfg.exclude_clips)
    if not path.is_file():
        raise SelectionError(f"exclude_clips: {path} is not a file (expected one clip id per line)")
    return {line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}


def eligible(clips: pd.DataFrame, cfg: CaptionConfig) -> pd.DataFrame:
    """Clips that may be captioned: not in an excluded (test) fold, not listed in exclude_clips, with audio."""
    keep = ~clips["clip_id"].isin(excluded_ids(cfg))
    if "video_only" in clips:  # ingested without audio (video_only_clips): the captioning model must hear the voice
        keep &= clips["video_only"].isna()
    if cfg.exclude_folds and "fold" in clips:
        keep &= ~clips["fold"].isin(cfg.exclude_folds)
    return clips[keep]


def _allocate(sizes: pd.Series, total: int) -> pd.Series:
    """Spread `total` over groups in proportion to their sizes (largest remainder), never over a group's size."""
    share = sizes / sizes.sum() * total
    counts = share.apply(math.floor).clip(upper=sizes)
    order = (share - counts).sort_values(ascending=False).index
    for key in order:
        if counts.sum() >= total:
            break
        if counts[key] < sizes[key]:
            counts[key] += 1
    return counts.astype(int)


def select_clips(clips: pd.DataFrame, cfg: CaptionConfig) -> pd.DataFrame:
    """The subset to caption, sorted by shard and clip id.

    The size is `count` (or `fraction` of the eligible clips, at least one), spread over the groups
    of the `stratify_by` keys the corpus actually has; within a group the clips with the lowest
    seeded rank are taken.
    """
    pool = eligible(clips, cfg)
    if pool.empty:
        raise SelectionError(f"no clip may be captioned: {len(clips)} clips, all in excluded folds or in exclude_clips")
    total = min(cfg.count, len(pool)) if cfg.count else max(1, round(cfg.fraction * len(pool)))
    keys = [k for k in cfg.stratify_by if k in pool and pool[k].notna().any()]
    pool = pool.assign(_rank=[_rank(cfg.seed, c) for c in pool["clip_id"]])
    if keys:
        pool["_group"] = pool[keys].fillna("").astype(str).agg("\x1f".join, axis=1)
        groups = pool.groupby("_group", sort=True)
        counts = _allocate(groups.size(), total)
        picked = pd.concat([g.sort_values("_rank").head(counts[name]) for name, g in groups if counts[name] > 0])
        picked = picked.drop(columns="_group")
    else:
        picked = pool.sort_values("_rank").head(total)
    return picked.drop(columns="_rank").sort_values(["shard", "clip_id"]).reset_index(drop=True)
