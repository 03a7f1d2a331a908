"""Full fine-tuning of the Stage 1 encoder on one fold (recipe after HiCMAE, every value in the config).

The classifier is the encoder (without decoder and contrastive heads) plus a LayerNorm + linear
head on the pooled embedding of the chosen input: ``joint`` (both modalities in the shared
encoder), ``video`` or ``audio`` alone. AdamW with layer-wise lr decay (block i of L gets
lr x decay^(L + 1 - i), the patch embeddings decay^(L + 1)), linear warm-up then cosine, label
smoothing, and mixup of both modalities with one coefficient per batch. Training windows are
augmented by the data path (random window, crop, flip, SpecAugment); validation and test use the
deterministic centred window. Like the probe, the "last" and "best_val" weights are kept and the
test part is scored once, at the end.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from vaemo.config import FinetuneConfig, TrainConfig
from vaemo.data.config import DataConfig
from vaemo.data.loader import ShardLosses, make_loader
from vaemo.eval.metrics import classification_metrics
from vaemo.eval.probe import EpochLogger, HeadResult, Selector
from vaemo.eval.protocols import EvaluationError
from vaemo.model import av
from vaemo.registry import MODALITIES
from vaemo.train.loop import autocast, lr_factor


class Classifier(nn.Module):
    """Stage 1 encoder + head; ``modality`` picks the pooled embedding that is classified."""

    def __init__(self, encoder: av.AVMAE, n_classes: int, modality: str):
        super().__init__()
        self.encoder, self.modality = encoder, modality
        self.head_norm = nn.LayerNorm(encoder.cfg.dim)
        self.head = nn.Linear(encoder.cfg.dim, n_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, video: Tensor | None, audio: Tensor | None) -> Tensor:
        features = self.encoder.encode(video=video, audio=audio, unimodal=self.modality != "av")
        return self.head(self.head_norm(features[MODALITIES[self.modality]]))


def load_classifier(model_dir: Path, n_classes: int, modality: str, drop_path: float) -> Classifier:
    """The Stage 1 weights in a fresh encoder built with fine-tuning's stochastic depth."""
    trained = av.load(model_dir)
    encoder = av.AVMAE(trained.cfg.model_copy(update={"drop_path": drop_path}))
    encoder.load_state_dict(trained.state_dict())
    return Classifier(encoder, n_classes, modality)


def layer_id(name: str, cfg: av.AVConfig) -> int | None:
    """0 for the embeddings, i + 1 for block i, depth + 1 for the final norm and the head; None: unused here."""
    parts = name.split(".")
    if parts[0] != "encoder":
        return cfg.depth + 1  # head_norm, head
    root = parts[1]
    if root not in av.ENCODER_ROOTS:
        return None  # decoder and contrastive heads take no part in classification
    if root in ("video_embed", "audio_embed", "modality"):
        return 0
    if root in ("video_blocks", "audio_blocks"):
        return int(parts[2]) + 1
    if root == "blocks":
        return cfg.modality_specific_layers + int(parts[2]) + 1
    return cfg.depth + 1  # norm


def param_groups(model: Classifier, cfg: FinetuneConfig) -> list[dict]:
    """AdamW groups with ``lr_scale`` per layer; biases, norms and the modality embedding get no weight decay."""
    depth = model.encoder.cfg.depth
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        layer = layer_id(name, model.encoder.cfg)
        if layer is None:
            param.requires_grad_(False)
            continue
        decay = param.ndim >= 2 and "modality" not in name
        group = groups.setdefault((layer, decay), {
            "params": [], "weight_decay": cfg.weight_decay if decay else 0.0,
            "lr_scale": cfg.layer_decay ** (depth + 1 - layer), "layer": layer,
        })
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def _inputs(batch: dict, modality: str, device: torch.device) -> tuple[Tensor | None, Tensor | None]:
    video = batch["video"].to(device) if modality != "audio" else None
    audio = batch["audio"].to(device) if modality != "video" else None
    return video, audio


def _soft_targets(y: Tensor, n_classes: int, smoothing: float) -> Tensor:
    return F.one_hot(y, n_classes).float() * (1 - smoothing) + smoothing / n_classes


@torch.no_grad()
def predict(model: Classifier, urls: list[str], data: DataConfig, clip_ids: list[str], batch_size: int,
            num_workers: int, device: torch.device, losses: ShardLosses | None = None) -> tuple[list[str], np.ndarray]:
    """Logits of the given clips (centred windows, no augmentation), in loader order."""
    model.eval()
    ids, logits = [], []
    loader = make_loader(urls, data, train=False, batch_size=batch_size, num_workers=num_workers, clip_ids=clip_ids,
                         losses=losses)
    for batch in loader:
        if not batch["clip_id"]:
            continue
        logits.append(model(*_inputs(batch, model.modality, device)).float().cpu())
        ids.extend(batch["clip_id"])
    return ids, (torch.cat(logits).numpy() if logits else np.zeros((0, model.head.out_features), np.float32))


def finetune_fold(
    model_dir: Path,
    urls: list[str],
    data: DataConfig,
    label_of: dict[str, int],
    train: list[str],
    val: list[str],
    test: list[str],
    classes: list[str],
    modality: str,
    cfg: FinetuneConfig,
    *,
    eval_batch_size: int = 16,
    num_workers: int = 0,
    seed: int = 0,
    device: torch.device | None = None,
    log_epoch: EpochLogger | None = None,
    losses: ShardLosses | None = None,
) -> tuple[HeadResult, list[str]]:
    """Fine-tune on ``train``, select on ``val``; returns the result and the test clip ids in prediction order.

    ``losses`` collects what broken shards lost; an epoch without a training clip is an EvaluationError.
    """
    device = device or torch.device("cpu")
    n_classes = len(classes)
    torch.manual_seed(seed)
    model = load_classifier(model_dir, n_classes, modality, cfg.drop_path).to(device)
    groups = param_groups(model, cfg)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999))
    batch_size = max(1, min(cfg.batch_size, len(train)))
    steps_per_epoch = max(1, len(train) // batch_size)
    schedule = TrainConfig(steps=cfg.epochs * steps_per_epoch, warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
                           min_lr_ratio=cfg.min_lr_ratio)
    rng = np.random.default_rng(seed)
    result, selector, step = HeadResult(), Selector(), 0
    y_val = np.array([label_of[c] for c in val])
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        begin, total, seen = time.perf_counter(), 0.0, 0
        loader = make_loader(urls, data, train=True, seed=seed * 1000 + epoch, batch_size=batch_size,
                             num_workers=num_workers, clip_ids=train, losses=losses)
        for batch in tqdm(
            loader, desc=f"fine-tune epoch {epoch}/{cfg.epochs}", unit="batch", total=steps_per_epoch, leave=False
        ):
            if not batch["clip_id"]:
                continue
            y = torch.tensor([label_of[c] for c in batch["clip_id"]], device=device)
            video, audio = _inputs(batch, modality, device)
            targets = _soft_targets(y, n_classes, cfg.label_smoothing)
            if cfg.mixup_alpha > 0 and len(y) > 1 and rng.random() < cfg.mixup_prob:
                lam = float(rng.beta(cfg.mixup_alpha, cfg.mixup_alpha))
                perm = torch.from_numpy(rng.permutation(len(y))).to(device)
                video = None if video is None else lam * video + (1 - lam) * video[perm]
                audio = None if audio is None else lam * audio + (1 - lam) * audio[perm]
                targets = lam * targets + (1 - lam) * targets[perm]
            factor = lr_factor(step, schedule)
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * factor * group["lr_scale"]
            with autocast(cfg.precision, device):
                logits = model(video, audio)
            loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=1), dim=1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.grad_clip)
            optimizer.step()
            step += 1
            total, seen = total + float(loss.detach()) * len(y), seen + len(y)
        if not seen:
            raise EvaluationError(f"fine-tuning epoch {epoch}: none of the {len(train)} training clips of this fold "
                                  "could be decoded")
        row = {"epoch": epoch, "train_loss": total / max(seen, 1), "lr": cfg.lr * lr_factor(max(step - 1, 0), schedule),
               "epoch_seconds": time.perf_counter() - begin}
        if val:
            ids, logits = predict(model, urls, data, val, eval_batch_size, num_workers, device, losses)
            truth = np.array([label_of[c] for c in ids]) if ids else y_val[:0]
            if len(ids):
                row["val_loss"] = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(truth)))
                scored = classification_metrics(truth, logits.argmax(1), classes)
                row["val_uar"], row["val_war"] = scored["uar"], scored["war"]
                selector.offer(epoch, row["val_uar"], row["val_loss"], lambda: copy.deepcopy(model.state_dict()))
        if not math.isfinite(row["train_loss"]):
            raise FloatingPointError(
                f"fine-tuning diverged in epoch {epoch} (loss {row['train_loss']}); lower finetune.lr"
            )
        result.history.append(row)
        if log_epoch:
            log_epoch(epoch, row)
    states = {"last": copy.deepcopy(model.state_dict())}
    states["best_val"] = selector.state if selector.state is not None else states["last"]
    result.best_epoch = selector.epoch if selector.epoch is not None else cfg.epochs
    test_ids: list[str] = []
    for rule, state in states.items():  # the test part, once, with weights chosen without it
        model.load_state_dict(state)
        test_ids, logits = predict(model, urls, data, test, eval_batch_size, num_workers, device, losses)
        probabilities = torch.from_numpy(logits).softmax(dim=1).numpy()
        result.scores[rule], result.predictions[rule] = probabilities, probabilities.argmax(axis=1)
    return result, test_ids
