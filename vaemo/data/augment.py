"""Raw view batches (encoded frames, fbank) to the model's batches, on the training device.

One implementation for both devices: on CUDA the JPEGs decode in one batched nvJPEG call and the
crops, normalisation and masks run on the GPU; on the CPU (CPU training, in the loader's workers;
tests) the same code runs with torchvision's CPU decoder. Every random choice (crop box, flip,
SpecAugment bands) is drawn on the CPU from a generator seeded by the clip's ``seed``, by the rules
of :mod:`vaemo.data.samples` and in their order (crop, flip, then masks), so a clip's augmentation
depends on its seed only, not on the device or on the other clips of its batch.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.io import decode_jpeg

from vaemo.data.config import DataConfig
from vaemo.data.samples import crop_frames, draw_masks, draw_video_aug, normalise_fbank, normalise_video

RAW_KEYS = ("jpeg", "fbank", "seed")


def materialise(raw: dict, cfg: DataConfig, *, device: torch.device, train: bool, repeat_aug: int = 1) -> dict:
    """A raw batch ({"jpeg": B lists of T encoded frames, "fbank": (B,F,M), "seed": (B,), ...}) to
    {"video": (B*k,3,T,S,S), "audio": (B*k,F,M), ...} on ``device``, k = ``repeat_aug``.

    train=False: the centre crop, no flip, no masks. train=True: random resized crop and flip (one for
    all frames of a clip) and the masks, from the clip's seed. ``repeat_aug``: k augmentations of each
    clip, decoded once (MAE-ST's repeated augmentation); the rows of one clip are consecutive, and the
    first equals the draw of repeat_aug=1. The other keys (clip_id, window, ...) are repeated to match.
    """
    if repeat_aug < 1:
        raise ValueError(f"repeat_aug must be at least 1, got {repeat_aug}")
    repeat = repeat_aug if train else 1
    counts = [len(clip) for clip in raw["jpeg"]]
    flat = [frame for clip in raw["jpeg"] for frame in clip]
    decoded = decode_jpeg(flat, device=device) if flat else []
    feats = normalise_fbank(raw["fbank"].to(device, torch.float32), cfg)
    videos, bands, begin = [], [], 0
    for count, seed in zip(counts, raw["seed"].tolist(), strict=True):
        frames = torch.stack(decoded[begin : begin + count])  # T, 3, H, W, uint8
        begin += count
        rng = np.random.default_rng(seed) if train else None
        for _ in range(repeat):
            videos.append(crop_frames(frames, draw_video_aug(*frames.shape[-2:], cfg, rng), cfg.image_size))
            if rng is not None:
                bands.append(draw_masks(*feats.shape[1:], cfg, rng))
    rows = torch.arange(len(counts), device=device).repeat_interleave(repeat)
    audio = feats[rows]
    if bands:
        audio = audio.masked_fill(_mask(bands, *feats.shape[1:], device), 0.0)
    video = (normalise_video(torch.stack(videos).permute(0, 2, 1, 3, 4), cfg) if videos else
             torch.empty(0, 3, cfg.frames, cfg.image_size, cfg.image_size, device=device))
    return {"video": video.contiguous(), "audio": audio.contiguous(), **_repeated(raw, repeat)}


def _mask(bands: list, frames: int, bins: int, device: torch.device) -> torch.Tensor:
    """(N, frames, bins) True where one of the row's bands (frequency or time) covers the cell."""
    freq_first, freq_width, time_first, time_width = torch.tensor([[*f, *t] for f, t in bands], device=device).T
    freq, time = torch.arange(bins, device=device), torch.arange(frames, device=device)
    in_freq = (freq >= freq_first[:, None]) & (freq < (freq_first + freq_width)[:, None])
    in_time = (time >= time_first[:, None]) & (time < (time_first + time_width)[:, None])
    return in_time[:, :, None] | in_freq[:, None, :]


def _repeated(raw: dict, repeat: int) -> dict:
    """The batch's other keys with each clip's entries repeated ``repeat`` times (the records as they are)."""
    rest = {k: v for k, v in raw.items() if k not in RAW_KEYS}
    if repeat > 1:
        rest["clip_id"] = [c for c in rest["clip_id"] for _ in range(repeat)]
        rest["window"] = rest["window"].repeat_interleave(repeat, dim=0)
    return rest
