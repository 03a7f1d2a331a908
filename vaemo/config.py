"""Configuration: one pydantic model per stage, loaded from ``pipelines.yaml``.

Relative paths in the file are resolved against the file's own folder, so a project folder can be
moved or shared. Every error names the file, the key and what was expected.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vaemo.data.config import DataConfig

DatasetName = Literal["auto", "generic", "ravdess", "crema-d", "mafw", "dfew", "voxceleb2"]


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the file."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class IngestConfig(Strict):
    """How one video becomes face + voice clips. Values marked (our design) follow method.md."""

    fps: float = Field(25.0, gt=0, description="frame rate of the stored face clips (our design)")
    sample_rate: int = Field(16000, description="voice sample rate in Hz, mono")
    decode_short_side: int = Field(
        360, ge=64, description="frames are downscaled by ffmpeg to this short side before detection"
    )
    detect_every: int = Field(10, ge=1, description="run MTCNN on every n-th decoded frame")
    detect_batch: int = Field(16, ge=1, description="frames per batched MTCNN call")
    detect_max_side: int = Field(
        256, ge=64, description="detection frames are downscaled further to this long side"
    )
    min_face_prob: float = Field(0.9, ge=0, le=1)
    min_face_fraction: float = Field(
        0.1, gt=0, le=1, description="smallest face side as a fraction of the frame's short side"
    )
    min_face_coverage: float = Field(
        0.6, ge=0, le=1, description="share of detection frames in a clip where the speaker's face must be found"
    )
    multi_face: Literal["largest", "skip"] = Field(
        "largest", description="several faces: follow the dominant track, or skip the clip"
    )
    smooth_frames: int = Field(7, ge=1, description="moving-average window for box smoothing")
    crop_size: int = Field(160, ge=32, description="face crop side in pixels (our design, after HiCMAE)")
    crop_margin: int = Field(32, ge=0, description="extra pixels stored around the crop for random crops")
    face_scale: float = Field(1.4, ge=1.0, description="square crop side = face box side x this")
    video_crf: int = Field(20, ge=0, le=51)
    video_preset: str = "veryfast"
    audio_format: Literal["flac", "wav"] = "flac"
    vad_threshold: float = Field(0.5, gt=0, lt=1)
    silence_dbfs: float = Field(-60.0, description="audio peaking below this level counts as silent")
    window_seconds: float = Field(8.0, gt=0, description="longest clip cut from unlabelled speech")
    min_clip_seconds: float = Field(
        2.56, gt=0, description="shortest clip cut from a longer recording (one training window)"
    )
    min_source_seconds: float = Field(1.0, gt=0, description="shorter source videos are refused")
    min_speech_ratio: float = Field(0.35, ge=0, le=1, description="least speech share of a widened short clip")
    speech_merge_gap: float = Field(0.5, ge=0, description="speech segments closer than this are merged")
    max_duration_seconds: float = Field(1800.0, gt=0, description="longer source videos are refused")
    max_clip_seconds: float = Field(30.0, gt=0, description="labelled files longer than this are trimmed")
    probe_timeout: float = Field(30.0, gt=0)
    decode_timeout_per_second: float = Field(
        4.0, gt=0, description="subprocess timeout per second of media (plus a fixed 30 s)"
    )
    videos_per_batch: int = Field(8, ge=1, description="videos per task; one batch commits as one unit")
    samples_per_shard: int = Field(500, ge=1)
    torch_threads: int = Field(1, ge=1, description="CPU threads per ingest worker")
    batch_timeout_seconds: float = Field(3600.0, gt=0, description="a batch task running longer fails (and is retried)")

    def processing_digest(self) -> str:
        """Digest of the settings that change the clips' content (batching, threads and timeouts do not)."""
        relevant = self.model_dump(exclude={"videos_per_batch", "samples_per_shard", "torch_threads", "batch_timeout_seconds"})
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


class DaskConfig(Strict):
    address: str | None = Field(None, description="an existing Dask scheduler; None starts a local cluster")
    workers: int = Field(2, ge=1)


class TrackingConfig(Strict):
    mlflow_uri: str | None = Field(None, description="default: sqlite:///<work_dir>/mlflow.db")
    experiment: str = "vaemo"

    def uri(self, work_dir: Path) -> str:
        return self.mlflow_uri or f"sqlite:///{(Path(work_dir) / 'mlflow.db').as_posix()}"


class CorpusConfig(Strict):
    path: Path
    dataset: DatasetName = "auto"
    labels: Path | None = Field(None, description="label/speaker CSV or split folder, if the dataset needs one")


class TrainConfig(Strict):
    """The training loop shared by Stage 1 and Stage 2 (AdamW, warm-up + cosine, checkpoints)."""

    steps: int = Field(300, ge=1, description="optimizer steps")
    batch_size: int = Field(8, ge=1, description="clips per micro-batch and process")
    accumulation: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(3e-4, gt=0, description="peak learning rate (HiCMAE pre-training: 3e-4)")
    min_lr_ratio: float = Field(0.01, ge=0, le=1, description="cosine floor as a fraction of lr")
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, gt=0)
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 autocast on GPU, fp32 on CPU")
    checkpoint_every: int = Field(100, ge=1, description="steps between checkpoints")
    keep_checkpoints: int = Field(2, ge=1)
    processes: int = Field(1, ge=1, description="processes on this node; more than 1 launches torchrun (DDP)")
    num_workers: int = Field(1, ge=0, description="DataLoader workers per process")
    threads: int = Field(0, ge=0, description="CPU threads per process; 0: the cores its DataLoader workers leave free")
    seed: int = 0
    log_every: int = Field(1, ge=1)


class PretrainConfig(TrainConfig):
    """Stage 1: masked reconstruction + contrastive pre-training of the unified AV encoder."""

    model: Literal["tiny", "small", "base"] = "tiny"
    model_overrides: dict = Field(
        default_factory=dict,
        description="AVConfig fields to change (mask ratios, contrastive_weight, modality_specific_layers, ...)",
    )
    data: DataConfig = DataConfig()
    eval_clips: int = Field(256, ge=2, description="clips used for the video-to-audio retrieval metric")


class StagesConfig(Strict):
    ingest: IngestConfig = IngestConfig()
    pretrain: PretrainConfig = PretrainConfig()


class PipelineSpec(Strict):
    corpora: list[str] = Field(min_length=1)
    stages: list[Literal["ingest", "pretrain"]] = ["ingest"]


class Settings(Strict):
    """The whole of ``pipelines.yaml``."""

    work_dir: Path = Path("vaemo-work")
    tracking: TrackingConfig = TrackingConfig()
    dask: DaskConfig = DaskConfig()
    corpora: dict[str, CorpusConfig] = {}
    stages: StagesConfig = StagesConfig()
    pipelines: dict[str, PipelineSpec] = {}

    @model_validator(mode="after")
    def _pipelines_name_known_corpora(self) -> Settings:
        for name, spec in self.pipelines.items():
            unknown = [c for c in spec.corpora if c not in self.corpora]
            if unknown:
                raise ValueError(
                    f"pipelines.{name}.corpora names {unknown}, which are not under 'corpora' "
                    f"(known: {sorted(self.corpora)})"
                )
        return self

    def mlflow_uri(self) -> str:
        return self.tracking.uri(self.work_dir)

    def check_corpus_paths(self, names: list[str] | None = None, source: str = "pipelines.yaml") -> None:
        for name in names if names is not None else list(self.corpora):
            corpus = self.corpora[name]
            for key in ("path", "labels"):
                value = getattr(corpus, key)
                if value is not None and not value.exists():
                    raise ConfigError(f"{source}: corpora.{name}.{key}: path does not exist: {value}")


def _format_errors(source: str, error: ValidationError) -> str:
    lines = [f"{source}: invalid configuration"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            lines.append(f"  {key}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def _resolve_paths(settings: Settings, base: Path) -> Settings:
    def resolve(path: Path | None) -> Path | None:
        return None if path is None else (path if path.is_absolute() else base / path)

    settings.work_dir = resolve(settings.work_dir)
    for corpus in settings.corpora.values():
        corpus.path = resolve(corpus.path)
        corpus.labels = resolve(corpus.labels)
    return settings


def load_settings(path: Path) -> Settings:
    """Read and validate ``pipelines.yaml``; raise ConfigError with a readable message."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: configuration file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(str(path), exc)) from None
    return _resolve_paths(settings, path.resolve().parent)
