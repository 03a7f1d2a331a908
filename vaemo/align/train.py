"""Stage 2: inject the caption knowledge into the AV space by dual-path contrastive learning.

    python -m vaemo.align.train --shards DIR --db DIR --init STAGE1_DIR --out DIR --settings align.json [--resume]

(also the ``torchrun`` entry point). The training machinery is Stage 1's (``vaemo.train.loop``:
checkpoints with resume, bf16 on GPU, DDP); this module adds the objective:

* global path: InfoNCE between the fused AV embedding (through the ``joint`` head) and the cached
  embedding of the whole ``description``;
* modality path: InfoNCE between the video-stream embedding and ``facial_cues``, and between the
  audio-stream embedding and ``vocal_cues`` (their mean);
* optionally the Stage 1 masked reconstruction on clips without a usable caption, at ``rec_weight``.

loss = global_weight * global + modality_weight * modality (+ rec_weight * rec). Every InfoNCE is
symmetric, over the batch, with one learnable temperature. After training, every clip of the
shards is embedded into the text space: the retrieval metrics come from the captioned ones, and
all of them go to the LanceDB table ``clip_embeddings`` (``vaemo search``).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from vaemo.align.data import AlignDataError, CaptionSet, load_captions
from vaemo.align.model import PATHS, AlignedAV, save_aligned, set_trainable
from vaemo.align.search import write_clip_embeddings
from vaemo.artifacts import IngestFolder, ModelFolder
from vaemo.config import AlignConfig
from vaemo.data.config import DataConfig
from vaemo.data.loader import ShardLosses, make_loader
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
    weights_digest,
    write_rank_record,
)

log = logging.getLogger(__name__)

LOSS_KEYS = ("loss", "global", "modality", "modality_video", "modality_audio", "rec")


def make_objective(
    captions: CaptionSet, cfg: AlignConfig
) -> Callable[[torch.nn.Module, dict], dict[str, torch.Tensor]]:
    """The dual-path loss for a batch of captioned clips (joined with their cached text vectors by clip_id)."""
    index = {clip: i for i, clip in enumerate(captions.clip_ids)}
    vectors = {name: torch.from_numpy(np.ascontiguousarray(v)) for name, v in captions.vectors.items()}

    def objective(model, batch: dict) -> dict[str, torch.Tensor]:
        out = model(batch["video"], batch["audio"], batch.get("rec_video"), batch.get("rec_audio"))
        rows = torch.tensor([index[clip] for clip in batch["clip_id"]])
        text = {key: vectors[field][rows].to(out[key].device) for key, field in PATHS.items()}
        temperature = out["temperature"]
        parts = {"global": av.info_nce(out["joint"], text["joint"], temperature),
                 "modality_video": av.info_nce(out["video"], text["video"], temperature),
                 "modality_audio": av.info_nce(out["audio"], text["audio"], temperature)}
        parts["modality"] = 0.5 * (parts["modality_video"] + parts["modality_audio"])
        loss = cfg.global_weight * parts["global"] + cfg.modality_weight * parts["modality"]
        if "rec" in out:
            parts["rec"] = out["rec"]
            loss = loss + cfg.rec_weight * out["rec"]
        return {"loss": loss, **parts, "temperature": temperature.detach()}

    return objective


def _endless(make: Callable[[int], Iterable[dict]]) -> Iterator[dict]:
    """Non-empty batches of successive passes make(0), make(1), ... (each pass seeded by its number)."""
    k = 0
    while True:
        found = False
        for batch in make(k):
            if batch["clip_id"]:
                found = True
                yield batch
        if not found:
            raise AlignDataError("no clip without a caption could be decoded for the reconstruction term")
        k += 1


def _with_reconstruction(captioned: Iterable[dict], uncaptioned: Callable[[int], Iterable[dict]]) -> Iterator[dict]:
    """Each captioned batch gets a batch of uncaptioned clips as ``rec_video`` / ``rec_audio``."""
    rec = None
    for batch in captioned:
        if batch["clip_id"]:
            rec = rec or _endless(uncaptioned)
            other = next(rec)
            batch = {**batch, "rec_video": other["video"], "rec_audio": other["audio"], "rec_clip_id": other["clip_id"],
                     "skipped": int(batch.get("skipped", 0)) + int(other.get("skipped", 0))}
        yield batch


@torch.no_grad()
def embed_clips(model: AlignedAV, urls: list[str], data: DataConfig, batch_size: int, num_workers: int,
                clip_ids: list[str] | None = None,
                losses: ShardLosses | None = None) -> tuple[list[str], dict[str, np.ndarray]]:
    """Text-space embeddings (joint, video, audio) of the clips, centred windows, no augmentation."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids, parts = [], {key: [] for key in PATHS}
    for batch in make_loader(
        urls, data, train=False, batch_size=batch_size, num_workers=num_workers, clip_ids=clip_ids, losses=losses
    ):
        if not batch["clip_id"]:
            continue
        out = model.encode(video=batch["video"].to(device), audio=batch["audio"].to(device), unimodal=True)
        for key in PATHS:
            parts[key].append(out[key].float().cpu().numpy())
        ids.extend(batch["clip_id"])
    model.train(was_training)
    dim = model.text_dim
    return ids, {key: np.concatenate(v) if v else np.zeros((0, dim), np.float32) for key, v in parts.items()}


def text_retrieval(ids: list[str], embeddings: dict[str, np.ndarray], captions: CaptionSet, prefix: str = "") -> dict:
    """Top-1 retrieval of each captioned clip's own text among all captioned clips' texts, per path.

    ``text_retrieval_top1``: fused AV -> description (the global path); ``video_facial_top1`` and
    ``audio_vocal_top1``: the modality path. A hit is a retrieved text equal to the clip's own
    (identical texts of two clips are not told apart). Chance: 1 / clips."""
    where = {clip: i for i, clip in enumerate(ids)}
    present = [i for i, clip in enumerate(captions.clip_ids) if clip in where]
    n = len(present)
    if n == 0:
        raise AlignDataError("none of the captioned clips could be decoded for the retrieval metric")
    rows = [where[captions.clip_ids[i]] for i in present]
    result = {}
    for key, field, name in (("joint", "description", "text_retrieval_top1"),
                             ("video", "facial_cues", "video_facial_top1"),
                             ("audio", "vocal_cues", "audio_vocal_top1")):
        clips = embeddings[key][rows]
        texts = captions.vectors[field][present]
        best = (clips @ texts.T).argmax(axis=1)
        words = [captions.texts[field][i] for i in present]
        result[prefix + name] = float(np.mean([words[b] == words[i] for i, b in enumerate(best)]))
    if not prefix:
        result.update(text_retrieval_chance=1.0 / n, text_retrieval_clips=n)
    return result


# ---- the run --------------------------------------------------------------------------------

def _reconstruction(cfg: AlignConfig, captions: CaptionSet, world: int) -> tuple[bool, str]:
    if cfg.rec_weight <= 0:
        return False, "off (rec_weight 0)"
    if cfg.trainable == "heads":
        return False, "off (trainable=heads: the encoder and decoder are frozen)"
    if len(captions.uncaptioned) < world:
        return False, "off (no clip without a caption)"
    return True, f"on {len(captions.uncaptioned)} uncaptioned clips at weight {cfg.rec_weight}"


def align(shards: str | Path, db: str | Path, init: str | Path, out: str | Path, cfg: AlignConfig, *,
          resume: bool = False, log_step: StepLogger | None = None) -> dict:
    """Train; save the aligned model and its metrics into the model folder ``out``; write the clip-embeddings
    table; return the metrics."""
    env = init_distributed()
    shards, out, init = Path(shards), Path(out), Path(init)
    urls = IngestFolder(shards).shard_urls()
    captions = load_captions(db, shards, cfg)
    stage1 = av.load(init)
    data = cfg.data.for_model(stage1.cfg)
    rec, rec_note = _reconstruction(cfg, captions, env.world)
    torch.manual_seed(cfg.seed)  # the same heads on every rank and in every re-run
    model = AlignedAV(stage1, captions.dim, cfg.temperature_init)
    model.mask_ratios = (stage1.cfg.video_mask_ratio if cfg.video_mask_ratio is None else cfg.video_mask_ratio,
                         stage1.cfg.audio_mask_ratio if cfg.audio_mask_ratio is None else cfg.audio_mask_ratio)
    trainable = set_trainable(model, cfg.trainable, cfg.last_k, reconstruction=rec)
    batch_size = min(cfg.batch_size, len(captions.clip_ids) // env.world)
    if batch_size < 2:
        raise AlignDataError(
            f"{len(captions.clip_ids)} captioned clips for {env.world} process(es): a contrastive batch needs 2 per "
            "process"
        )
    if batch_size < cfg.batch_size:
        log.warning(
            "batch size %d lowered to %d: only %d captioned clips", cfg.batch_size, batch_size, len(captions.clip_ids)
        )
    rec_size = max(1, min(batch_size, len(captions.uncaptioned) // env.world))

    broken = ShardLosses()  # one for every loader of the run: each broken shard is warned about and counted once
    before = {}
    if env.main and cfg.retrieval_before:
        with single_process():
            ids, emb = embed_clips(model.to(env.device), urls, data, batch_size, cfg.num_workers, captions.clip_ids,
                                   broken)
        before = text_retrieval(ids, emb, captions, prefix="init_")

    def batches(epoch: int, _skip: int):
        # Seeded by epoch (and pass), so a resumed run replays exactly the stream it left (decoding it again).
        captioned = make_loader(urls, data, train=True, seed=cfg.seed * 1000 + epoch, batch_size=batch_size,
                                num_workers=cfg.num_workers, clip_ids=captions.clip_ids, losses=broken)
        if not rec:
            return captioned
        return _with_reconstruction(captioned, lambda k: make_loader(
            urls, data, train=True, seed=cfg.seed * 1000 + 500_000 + 1000 * epoch + k, batch_size=rec_size,
            num_workers=cfg.num_workers, clip_ids=captions.uncaptioned, losses=broken))

    seen: list[str] = []
    result = train(
        model, make_objective(captions, cfg), batches, cfg, out, resume=resume, log_step=log_step, seen_clips=seen
    )
    write_rank_record(out, env.rank, seen, model)
    broken.gather()
    if env.world > 1:
        torch.distributed.barrier()
    if not env.main:
        return {}

    with single_process():
        ids, emb = embed_clips(
            model, urls, data, batch_size, cfg.num_workers, None if cfg.embeddings_table else captions.clip_ids, broken
        )
    retrieval = text_retrieval(ids, emb, captions)
    info = {"text_encoder": captions.text_encoder, "prompt_templates": list(cfg.prompt_templates),
            "init": str(init.resolve()), "captions": captions.summary(), "trainable": cfg.trainable}
    save_aligned(model, out, info)
    model_key = weights_digest(model)[:16]
    embeddings = (write_clip_embeddings(db, cfg.embeddings_table, shards, ids, emb, captions, model_key, out,
                                        cfg.store)
                  if cfg.embeddings_table else None)
    rows = read_step_log(out)
    metrics = {
        **{f"{k}_{edge}": edge_mean([r[k] for r in rows if k in r], first=edge == "first")
           for k in LOSS_KEYS if any(k in r for r in rows) for edge in ("first", "last")},
        "steps": len(rows),
        **retrieval,
        **before,
        "batch_size": batch_size,
        "reconstruction": rec_note,
        "mask_ratios": {"video": model.mask_ratios[0], "audio": model.mask_ratios[1]},
        "trainable_params": trainable,
        "captions": captions.summary(),
        "captions_ok": captions.counts["captions_ok"],
        "captions_skipped": captions.counts["captions_skipped"],
        "embeddings": embeddings,
        "model_key": model_key,
        **run_summary(result, env.world, broken),
    }
    folder = ModelFolder(out)
    (folder / folder.METRICS).write_text(json.dumps(metrics, indent=1))
    folder.settings_file("align").write_text(cfg.model_dump_json(indent=1))
    return metrics


def _inputs(parser) -> None:
    parser.add_argument("--shards", required=True, type=Path, help="an ingest output folder")
    parser.add_argument("--db", required=True, type=Path, help="the LanceDB folder with the captions table")
    parser.add_argument("--init", required=True, type=Path, help="the Stage 1 model folder")


main = entry_point(
    "python -m vaemo.align.train",
    __doc__,
    AlignConfig,
    _inputs,
    lambda args, cfg, log_step: align(
        args.shards, args.db, args.init, args.out, cfg, resume=args.resume, log_step=log_step
    ),
)


if __name__ == "__main__":
    sys.exit(main())
