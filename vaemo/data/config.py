"""Settings of the training/evaluation data path: one window of face frames plus the voice of the same span.

The defaults follow docs/method.md ("Inputs", our design after HiCMAE): 16 frames with stride 4 at 25 fps
(a 2.56 s window), 160x160 RGB with ImageNet mean/std, and a 128-bin Kaldi fbank of 256 frames over
the same 2.56 s. The fbank normalisation (mean, std, whether std is doubled) belongs to the model
config, because published checkpoints differ; the caller copies those three numbers in here.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# AudioSet fbank statistics with the doubled std, the AudioMAE / HiCMAE convention (docs/method.md, "Inputs").
AUDIOSET_MEAN, AUDIOSET_STD = -4.2677393, 4.5689974


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # The fields a model's config fixes: its input contract and its audio normalisation.
    MODEL_FIELDS: ClassVar[tuple[str,
                                 ...]] = ("frames", "image_size", "audio_frames", "mel_bins", "audio_mean", "audio_std",
                                          "audio_double_std")

    def for_model(self, model_cfg) -> DataConfig:
        """This data path with the model's input contract and normalisation (any object with those fields)."""
        return self.model_copy(update={name: getattr(model_cfg, name) for name in self.MODEL_FIELDS})

    # The window
    frames: int = Field(16, ge=1, description="video frames per window")
    frame_stride: int = Field(4, ge=1, description="stride between sampled frames, in frames at `fps`")
    fps: float = Field(25.0, gt=0, description="frame rate the stride refers to (the stored clips' rate)")
    image_size: int = Field(160, ge=8, description="side of the square frames the model sees")
    video_mean: tuple[float, float, float] = IMAGENET_MEAN
    video_std: tuple[float, float, float] = IMAGENET_STD

    # Audio features (torchaudio.compliance.kaldi.fbank)
    sample_rate: int = Field(16000, gt=0)
    audio_frames: int = Field(256, ge=1, description="fbank frames per window (2.56 s / 10 ms)")
    mel_bins: int = Field(128, ge=1)
    fbank_window_ms: float = Field(25.0, gt=0)
    fbank_shift_ms: float = Field(10.0, gt=0)
    fbank_window_type: Literal["hanning", "hamming", "povey", "rectangular", "blackman"] = "hanning"
    htk_compat: bool = True
    dither: float = Field(0.0, ge=0)
    snip_edges: bool = Field(
        False,
        description=(
            "False (default): Kaldi centres frame k on (k + 0.5) x shift and reflects the signal at the "
            "window's edges, so 2.56 s give exactly 256 frames from the window's own samples. True: the "
            "AudioMAE/HiCMAE framing, 254 frames, the last one repeated to reach audio_frames"
        ),
    )
    audio_mean: float = Field(AUDIOSET_MEAN, description="fbank mean, from the model config")
    audio_std: float = Field(AUDIOSET_STD, gt=0, description="fbank std, from the model config")
    audio_double_std: bool = Field(True, description="normalise by 2 x std (AudioMAE/HiCMAE) instead of std (CAV-MAE)")

    # Augmentation, used only when train=True
    crop_scale: tuple[float, float] | None = Field(
        (0.5, 1.0),
        description=(
            "random resized crop: area range as a fraction of the stored frame (192 px by default), "
            "resized to image_size. The evaluation centre crop (160 of 192 px) is 0.69 of the area, "
            "inside the default range. None: the evaluation centre crop in training too"
        ),
    )
    crop_ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="aspect ratio range of the random crop")
    flip_p: float = Field(0.5, ge=0, le=1, description="horizontal flip probability")
    freq_mask: int = Field(48, ge=0, description="widest SpecAugment frequency mask in mel bins (0: off)")
    time_mask: int = Field(48, ge=0, description="widest SpecAugment time mask in fbank frames (0: off)")
    repeat_aug: int = Field(
        1, ge=1,
        description=(
            "repeated augmentation (MAE-ST): each decoded clip is trained on this many times per batch, each "
            "with its own crop, flip and masks, so a step sees batch_size x repeat_aug rows (training view only)"
        ),
    )

    # Loading (batch size and workers belong to the stage that loads: TrainConfig, EvaluateConfig)
    shuffle_buffer: int = Field(256, ge=0, description="samples held for shuffling in each worker (train)")
    max_av_mismatch_s: float = Field(
        0.1, ge=0, description="a clip whose audio and video durations differ by more is skipped as corrupt"
    )

    @model_validator(mode="after")
    def _consistent(self) -> DataConfig:
        if self.crop_scale is not None and not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"crop_ratio must satisfy 0 < low <= high, got {self.crop_ratio}")
        natural = self.natural_audio_frames
        if abs(natural - self.audio_frames) > 2:
            raise ValueError(
                f"audio_frames={self.audio_frames} does not cover the video window: {self.window_seconds:.3f} s "
                f"gives {natural} fbank frames at a {self.fbank_shift_ms} ms shift; change frames, frame_stride, "
                "fps and audio_frames together"
            )
        return self

    @property
    def window_seconds(self) -> float:
        return self.frames * self.frame_stride / self.fps

    @property
    def window_samples(self) -> int:
        return round(self.window_seconds * self.sample_rate)

    @property
    def natural_audio_frames(self) -> int:
        """fbank frames the window's samples give before any fitting to audio_frames."""
        shift = int(self.sample_rate * self.fbank_shift_ms * 0.001)
        length = int(self.sample_rate * self.fbank_window_ms * 0.001)
        if not self.snip_edges:
            return (self.window_samples + shift // 2) // shift
        return 0 if self.window_samples < length else 1 + (self.window_samples - length) // shift

    @property
    def audio_norm_divisor(self) -> float:
        return self.audio_std * (2.0 if self.audio_double_std else 1.0)

    @property
    def audio_convention(self) -> str:
        """One string to log with a run, so a checkpoint is only ever fed features it was trained on."""
        edges = "snip" if self.snip_edges else "centred"
        return (
            f"kaldi-fbank {self.mel_bins} bins {self.fbank_window_ms:g}/{self.fbank_shift_ms:g} ms "
            f"{self.fbank_window_type} "
            f"{edges}, (x - {self.audio_mean:g}) / ({'2 x ' if self.audio_double_std else ''}{self.audio_std:g})"
        )

    @staticmethod
    def readers(world_size: int, num_workers: int) -> int:
        """Processes that read shards at the same time: ranks x DataLoader workers (the main process counts as one)."""
        return world_size * max(num_workers, 1)

    def per_reader(self, epoch_samples: int, world_size: int, num_workers: int) -> int:
        return math.ceil(epoch_samples / self.readers(world_size, num_workers))


class ViewConfig(BaseModel):
    """The training view: the ingest shards re-packed for fast reading at the model's frame stride (vaemo.data.view)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = Field(True, description="train through the view (false: decode the mp4 shards, the reference path)")
    jpeg_quality: int = Field(90, ge=1, le=100, description="JPEG quality of the stored face frames")
    samples_per_shard: int = Field(2000, ge=1, description="clips per view shard (at most)")
    max_shard_bytes: int = Field(1_000_000_000, ge=1 << 20, description="bytes per view shard (at most)")
    ingest_shards_per_task: int = Field(
        16, ge=1, description="ingest shards one build task re-packs; each task writes its own view shards"
    )
