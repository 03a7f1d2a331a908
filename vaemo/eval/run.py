"""One evaluation: folds, features or fine-tuning per fold, metrics, figures, ``results.json`` and ``report.md``.

The orchestrator (the ``evaluate`` Prefect flow, a notebook) calls :func:`prepare` (cheap; raises
:class:`EvaluationError` with a clear message before any work) and then :func:`evaluate`, which
can report each epoch and each finished fold through callbacks.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from vaemo.artifacts import IngestFolder
from vaemo.config import EvaluateConfig
from vaemo.data.loader import ShardLosses
from vaemo.embed import encode
from vaemo.eval import plots
from vaemo.eval.accounting import account
from vaemo.eval.finetune import finetune_fold
from vaemo.eval.metrics import classification_metrics, summarise
from vaemo.eval.probe import RULES, HeadResult, linear_probe
from vaemo.eval.protocols import FOLDS_DIR, EvaluationError, FoldPlan, make_folds, save_folds
from vaemo.eval.report import markdown, published_for, test_set_line
from vaemo.eval.zeroshot import (
    class_prompts,
    load_clip_encoder,
    load_prompt_encoder,
    require_aligned,
    zero_shot_predict,
)
from vaemo.model import av

log = logging.getLogger(__name__)

RESULTS, REPORT, PREDICTIONS = "results.json", "report.md", "predictions.csv"
ZERO_SHOT_RULES = {"last": "zero-shot: no training, no checkpoint to choose",
                   "best_val": "zero-shot: no training (identical to last)"}
EpochHook = Callable[[int, int, dict], None]  # (fold, epoch, row)
FoldHook = Callable[[int, int, dict], None]  # (fold, folds in all, fold result)


@dataclass
class Prepared:
    model_dir: Path
    ingest_dir: Path
    cfg: EvaluateConfig
    plan: FoldPlan
    model_cfg: av.AVConfig


def prepare(model_dir: Path, ingest_dir: Path, cfg: EvaluateConfig) -> Prepared:
    """Check the model, the mode and the data, and make the folds; every refusal is a VaemoError."""
    model_dir, ingest_dir = Path(model_dir), Path(ingest_dir)
    model_cfg = av.load_config(model_dir)
    if cfg.video_only_fallback and (cfg.mode != "probe" or cfg.modality != "av"):
        raise EvaluationError(
            f"video_only_fallback needs mode probe and modality av (got {cfg.mode}, {cfg.modality}): only a linear "
            "probe on video embeddings can score the clips without audio; turn the option off"
        )
    if cfg.mode == "zeroshot":
        require_aligned(model_dir)
    IngestFolder(ingest_dir).shard_urls()
    plan = make_folds(ingest_dir, cfg.protocol, folds=cfg.folds, val_fraction=cfg.val_fraction, seed=cfg.seed)
    return Prepared(model_dir, ingest_dir, cfg, plan, model_cfg)


def _device(cfg: EvaluateConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise EvaluationError("device: cuda was asked for, but torch sees no GPU")
    return torch.device(
        "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    )


def _params(model_dir: Path) -> dict:
    model = av.load(model_dir)
    encoder = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] in av.ENCODER_ROOTS)
    return {"dir": str(model_dir), "name": model.cfg.name, "encoder_params": int(encoder),
            "total_params": int(sum(p.numel() for p in model.parameters()))}


def features(prepared: Prepared, device: torch.device, losses: ShardLosses | None = None,
             modality: str | None = None) -> dict[str, np.ndarray]:
    """Frozen clip embeddings of the chosen input (or ``modality``; centred window), as `vaemo embed` makes them."""
    cfg = prepared.cfg
    if cfg.mode == "zeroshot":  # the aligned model's text-space embeddings, comparable with the prompts'
        model = load_clip_encoder(prepared.model_dir, device)
    else:
        model = av.load(prepared.model_dir, map_location=device)
    return encode(prepared.ingest_dir, model, modality or cfg.modality, batch_size=cfg.batch_size,
                  num_workers=cfg.num_workers, progress=True, losses=losses)


def _with_video_probe(result, test_ids, video_ids, fold, seen, stack, label_of, classes, cfg):
    """The fold's AV predictions followed by those of a video probe for its test clips without audio.

    The video probe trains like the AV one, on the video embeddings of the fold's training part.
    """
    train, val = ([c for c in part if c in seen] for part in (fold.train, fold.val))
    video = linear_probe(stack(train, seen), np.array([label_of[c] for c in train]), stack(val, seen),
                         np.array([label_of[c] for c in val]), stack(video_ids, seen), classes, cfg.probe,
                         seed=cfg.seed + fold.number)
    merged = HeadResult(result.history, result.best_epoch,
                        {r: np.concatenate([result.predictions[r], video.predictions[r]]) for r in result.predictions},
                        {r: np.concatenate([result.scores[r], video.scores[r]]) for r in result.scores})
    return merged, test_ids + video_ids


def _scored(result: HeadResult, truth: np.ndarray, classes: list[str]) -> dict:
    return {rule: classification_metrics(truth, result.predictions[rule], classes) for rule in ("last", "best_val")}


def evaluate(
    prepared: Prepared, out_dir: Path, *, on_epoch: EpochHook | None = None, on_fold: FoldHook | None = None
) -> dict:
    """Run every fold; write results.json, report.md, predictions.csv, figures and fold files into out_dir."""
    cfg, plan = prepared.cfg, prepared.plan
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fold_files = save_folds(plan, out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = _device(cfg)
    classes = plan.classes
    index = {name: i for i, name in enumerate(classes)}
    label_of = {clip: index[label] for clip, label in plan.clips["label"].items()}

    broken = ShardLosses()  # every pass over the shards reports here: each broken shard counted once
    needs_features = cfg.mode in ("probe", "zeroshot") or cfg.tsne_clips > 0
    vectors = features(prepared, device, broken) if needs_features else {}
    # Clips ingested without audio (video_only): the chosen input cannot use them unless it is the video alone.
    unheard = set(plan.clips.index[plan.clips["video_only"].notna()]) - set(vectors)
    missing = sorted(set(plan.clips.index) - set(vectors) - unheard) if needs_features else []
    if missing:
        log.warning("%d labelled clips could not be decoded and are left out, e.g. %s", len(missing), missing[0])
    if needs_features and len(missing) + len(unheard) == len(plan.clips):
        raise EvaluationError(f"none of the {len(plan.clips)} labelled clips of {prepared.ingest_dir} could be decoded")
    keep = set(plan.clips.index) - set(missing) - unheard
    # The fallback's own probe sees video embeddings only; every clip with a decodable video has one.
    seen = features(prepared, device, broken, "video") if cfg.video_only_fallback and unheard else {}

    prompts = None
    if cfg.mode == "zeroshot":
        prompts = load_prompt_encoder(prepared.model_dir)(class_prompts(classes, cfg.zeroshot_prompt))

    urls = IngestFolder(prepared.ingest_dir).shard_urls()
    data = cfg.data.for_model(prepared.model_cfg)
    fold_results, histories, prediction_rows, scored_ids, by_video = [], {}, [], {}, {}

    def stack(ids: list[str], table: dict[str, np.ndarray] = vectors) -> np.ndarray:
        dim = len(next(iter(table.values()))) if table else 0
        return np.stack([table[c] for c in ids]) if ids else np.zeros((0, dim), np.float32)

    for fold in plan.folds:
        train, val, test = ([c for c in part if c in keep] for part in (fold.train, fold.val, fold.test))
        hook = (lambda epoch, row, number=fold.number: on_epoch(number, epoch, row)) if on_epoch else None
        if cfg.mode == "probe":
            result = linear_probe(stack(train), np.array([label_of[c] for c in train]), stack(val),
                                  np.array([label_of[c] for c in val]), stack(test), classes, cfg.probe,
                                  seed=cfg.seed + fold.number, log_epoch=hook)
            test_ids = test
            by_video[fold.number] = [c for c in fold.test if c in unheard and c in seen]
            if by_video[fold.number]:
                result, test_ids = _with_video_probe(result, test_ids, by_video[fold.number], fold, seen, stack,
                                                     label_of, classes, cfg)
        elif cfg.mode == "finetune":
            result, test_ids = finetune_fold(prepared.model_dir, urls, data, label_of, fold.train, fold.val, fold.test,
                                             classes, cfg.modality, cfg.finetune, eval_batch_size=cfg.batch_size,
                                             num_workers=cfg.num_workers, seed=cfg.seed + fold.number, device=device,
                                             log_epoch=hook, losses=broken)
        else:
            predicted, similarity = zero_shot_predict(np.stack([vectors[c] for c in test]), prompts)
            result = HeadResult(best_epoch=0, predictions={"last": predicted, "best_val": predicted},
                                scores={"last": similarity, "best_val": similarity})
            test_ids = test
        if not test_ids:
            raise EvaluationError(f"fold {fold.number}: no test clip could be decoded")
        scored_ids[fold.number] = test_ids
        truth = np.array([label_of[c] for c in test_ids])
        scored = _scored(result, truth, classes)
        sizes = {"train": len(train), "val": len(val), "test": len(test_ids)}
        if by_video.get(fold.number):
            sizes["test_video_only"] = len(by_video[fold.number])
        entry = {"fold": fold.number, "sizes": sizes,
                 "test_speakers": fold.test_speakers, "validation_split": fold.validation_split,
                 "best_epoch": result.best_epoch, **scored}
        fold_results.append(entry)
        histories[fold.number] = result.history
        for i, clip in enumerate(test_ids):
            prediction_rows.append(
                {"clip_id": clip, "fold": fold.number, "label": classes[truth[i]],
                 "input": "video" if clip in unheard else cfg.modality,
                 **{f"pred_{rule}": classes[result.predictions[rule][i]] for rule in ("last", "best_val")}}
            )
        if on_fold:
            on_fold(fold.number, len(plan.folds), entry)

    test_set = account(prepared.ingest_dir, plan, scored_ids, by_video)
    if test_set["total"]["not_evaluated"]:
        log.warning("%s", test_set_line(test_set["total"], "test videos of the protocol"))
    rules = ZERO_SHOT_RULES if cfg.mode == "zeroshot" else RULES
    results = {
        "setup": {"protocol": cfg.protocol, "mode": cfg.mode, "modality": cfg.modality, "seed": cfg.seed,
                  "val_fraction": cfg.val_fraction, "device": str(device)},
        "settings": cfg.model_dump(mode="json"),
        "model": _params(prepared.model_dir),
        "data": {"dir": str(prepared.ingest_dir), **plan.summary(), "left_out_clips": missing, **broken.summary()},
        "checkpoint_rules": rules,
        "primary_rule": "best_val",
        "test_set": test_set,
        "folds": fold_results,
        "mean": {rule: summarise([f[rule] for f in fold_results], classes) for rule in ("last", "best_val")},
        "chance_uar": 1 / len(classes),
        "published": published_for(cfg.protocol),
        "fold_files_dir": FOLDS_DIR,
        "fold_files": [str(p.relative_to(out)) for p in fold_files],
    }
    results["figures"] = _figures(results, histories, vectors, plan, out, cfg)
    pd.DataFrame(prediction_rows).to_csv(out / PREDICTIONS, index=False)
    (out / RESULTS).write_text(json.dumps(results, indent=1), encoding="utf-8")
    (out / REPORT).write_text(markdown(results), encoding="utf-8")
    return results


def _figures(
    results: dict, histories: dict, vectors: dict, plan: FoldPlan, out: Path, cfg: EvaluateConfig
) -> dict[str, str]:
    """Write the PNGs; return {file name: caption}."""
    figures: dict[str, str] = {}
    what = f"{cfg.protocol}, {cfg.mode}, {cfg.modality}"
    for rule in ("best_val", "last"):
        name = f"confusion_{rule}.png"
        mean = results["mean"][rule]
        plots.save(
            plots.confusion_figure(
                mean["confusion"],
                plan.classes,
                f"{what}: test folds summed, {rule} rule\nUAR {100 * mean['uar']:.1f} %, WAR {100 * mean['war']:.1f} %",
            ),
            out / name,
        )
        figures[name] = f"confusion matrix, {rule} rule, all test folds"
    if cfg.tsne_clips > 0 and len(vectors) >= 5:
        clips = [c for c in plan.clips.index if c in vectors]
        if len(clips) > cfg.tsne_clips:
            clips = sorted(np.random.default_rng(cfg.seed).choice(clips, cfg.tsne_clips, replace=False))
        x = np.stack([vectors[c] for c in clips])
        plots.save(plots.tsne_figure(x, plan.clips.loc[clips, "label"].tolist(), plan.classes,
                                     f"t-SNE of frozen {cfg.modality} embeddings ({len(clips)} clips)",
                                     perplexity=cfg.tsne_perplexity, seed=cfg.seed), out / "embedding_tsne.png")
        figures["embedding_tsne.png"] = "t-SNE map of the frozen embeddings, coloured by label"
    if any(histories.values()):
        plots.save(plots.curves_figure(histories, f"{what}: training curves"), out / "training_curves.png")
        figures["training_curves.png"] = "training loss and validation UAR per epoch, per fold"
    return figures
