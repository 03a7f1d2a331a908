"""Stage 1: pre-train the unified AV encoder on ingest shards; also the ``torchrun`` entry point.

Training reads the ingest folder's training view (:mod:`vaemo.data.view`, built when missing) unless
``view.enabled`` is false; the retrieval metric at the end reads the mp4 shards, the source of truth.

    python -m vaemo.train.pretrain --shards DIR --out DIR --settings settings.json [--resume]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from vaemo.artifacts import IngestFolder, ModelFolder
from vaemo.config import PretrainConfig
from vaemo.data.augment import materialise
from vaemo.data.config import DataConfig
from vaemo.data.loader import ShardLosses, make_loader
from vaemo.data.view import TrainingView, build
from vaemo.errors import ArtifactError
from vaemo.model import av
from vaemo.train.loop import (
    StepLogger,
    edge_mean,
    entry_point,
    init_distributed,
    read_step_log,
    run_summary,
    single_process,
    train,
    write_rank_record,
)


def model_config(cfg: PretrainConfig) -> av.AVConfig:
    return av.config_for(cfg.model, **cfg.model_overrides)


def data_config(cfg: PretrainConfig, model_cfg: av.AVConfig) -> DataConfig:
    return cfg.data.for_model(model_cfg)


def pretraining_objective(model, batch: dict) -> dict[str, torch.Tensor]:
    out = model(batch["video"], batch["audio"])
    return {k: out[k] for k in ("loss", "rec_video", "rec_audio", "contrastive", "temperature")}


@torch.no_grad()
def av_retrieval(model: av.AVMAE, urls: list[str], data: DataConfig, max_clips: int, batch_size: int,
                 num_workers: int, losses: ShardLosses | None = None) -> dict:
    """Video-to-audio retrieval top-1 among the evaluated clips (centred windows, no augmentation)."""
    model.eval()
    device = next(model.parameters()).device
    videos, audios, ids = [], [], []
    loader = make_loader(urls, data, train=False, batch_size=batch_size, num_workers=num_workers, losses=losses)
    for batch in loader:
        if not batch["clip_id"]:
            continue
        out = model.encode(video=batch["video"].to(device), audio=batch["audio"].to(device))
        videos.append(out["video_proj"].float().cpu())
        audios.append(out["audio_proj"].float().cpu())
        ids.extend(batch["clip_id"])
        if len(ids) >= max_clips:
            break
    video, audio = torch.cat(videos)[:max_clips], torch.cat(audios)[:max_clips]
    n = len(video)
    top1 = (video @ audio.T).argmax(dim=1).eq(torch.arange(n)).float().mean().item()
    model.train()
    return {"av_retrieval_top1": top1, "av_retrieval_chance": 1.0 / n, "av_retrieval_clips": n}


def training_view(ingest: IngestFolder, data: DataConfig, cfg: PretrainConfig, world: int) -> TrainingView:
    """The ingest folder's training view, built here when it is not current (one process; the flow builds it
    with tasks beforehand)."""
    view = TrainingView(ingest, data, cfg.view)
    if not view.is_current():
        if world > 1:
            raise ArtifactError(f"the training view {view.path} is missing or out of date: build it before launching "
                                "several processes (the pretrain flow does)")
        build(ingest, data, cfg.view)
    return view


def pretrain(
    shards: Path, out: Path, cfg: PretrainConfig, *, resume: bool = False, log_step: StepLogger | None = None
) -> dict:
    """Train; save the model and its metrics into the model folder ``out``; return the metrics."""
    env = init_distributed()
    ingest = IngestFolder(shards)
    urls = ingest.shard_urls()
    model_cfg = model_config(cfg)
    data = data_config(cfg, model_cfg)
    train_urls = training_view(ingest, data, cfg, env.world).shard_urls() if cfg.view.enabled else urls
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and in every re-run
    model = av.AVMAE(model_cfg)
    if cfg.init is not None:
        av.load_weights(model, cfg.init)  # continued pre-training; checkpoints of a resumed run replace these

    broken = ShardLosses()  # one for every loader of the run: each broken shard is warned about and counted once
    # On a GPU the view's batches stay raw (workers only read bytes) and are decoded and augmented on the device.
    raw = cfg.view.enabled and env.device.type == "cuda"

    def batches(epoch: int, skip: int):
        # Seeded by epoch, so a resumed run replays exactly the stream it left (the view's without decoding it).
        return make_loader(train_urls, data, train=True, seed=cfg.seed * 1000 + epoch, batch_size=cfg.batch_size,
                           num_workers=cfg.num_workers, losses=broken, view=cfg.view.enabled, raw=raw,
                           skip_batches=skip if cfg.view.enabled else 0)

    def prepare(batch: dict, device: torch.device) -> dict:
        return materialise(batch, data, device=device, train=True, repeat_aug=data.repeat_aug)

    seen: list[str] = []
    result = train(model, pretraining_objective, batches, cfg, out, resume=resume, log_step=log_step, seen_clips=seen,
                   prepare=prepare)
    write_rank_record(out, env.rank, seen, model)
    broken.gather()
    if env.world > 1:
        torch.distributed.barrier()
    if not env.main:
        return {}
    with single_process():
        retrieval = av_retrieval(model, urls, data, cfg.eval_clips, cfg.batch_size, cfg.num_workers, broken)
    av.save(model, out)
    losses = [row["loss"] for row in read_step_log(out)]
    metrics = {"loss_first": edge_mean(losses, first=True), "loss_last": edge_mean(losses, first=False),
               "steps": len(losses), **run_summary(result, env.world, broken), **retrieval}
    folder = ModelFolder(out)
    (folder / folder.METRICS).write_text(json.dumps(metrics, indent=1))
    folder.settings_file("pretrain").write_text(cfg.model_dump_json(indent=1))
    return metrics


main = entry_point(
    "python -m vaemo.train.pretrain", __doc__, PretrainConfig,
    lambda parser: parser.add_argument("--shards", required=True, type=Path, help="an ingest output folder"),
    lambda args, cfg, log_step: pretrain(args.shards, args.out, cfg, resume=args.resume, log_step=log_step),
)


if __name__ == "__main__":
    sys.exit(main())
