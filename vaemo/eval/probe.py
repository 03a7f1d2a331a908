"""Linear probe on frozen clip embeddings, with the checkpoint chosen on validation, not on test.

Features are standardised with the training part's mean and std. One linear layer is trained
with AdamW for ``epochs`` passes; after every epoch the validation part is scored. Two heads are
kept: the one after the last epoch ("last") and the one with the best validation UAR ("best_val",
ties broken by the lower validation loss, then the earlier epoch). The test part is scored once
at the end, for both heads.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vaemo.config import ProbeConfig
from vaemo.eval.metrics import classification_metrics

EpochLogger = Callable[[int, dict[str, float]], None]
RULES = {
    "last": "the weights after the last epoch",
    "best_val": "the epoch with the highest validation UAR (validation carved from the fold's training part, "
    "whole speakers when known; ties: lower validation loss, then the earlier epoch)",
}


@dataclass
class HeadResult:
    """What one fold's training left: the curves, the chosen epoch and test predictions per rule."""

    history: list[dict] = field(default_factory=list)  # one row per epoch
    best_epoch: int | None = None
    predictions: dict[str, np.ndarray] = field(default_factory=dict)  # rule -> predicted class per test clip
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # rule -> class probabilities per test clip


class Selector:
    """Keeps the state with the best (validation UAR, -validation loss); earlier epochs win ties."""

    def __init__(self):
        self.key: tuple[float, float] | None = None
        self.epoch: int | None = None
        self.state = None

    def offer(self, epoch: int, uar: float, loss: float, state_fn: Callable[[], object]) -> bool:
        key = (uar, -loss)
        if self.key is None or key > self.key:
            self.key, self.epoch, self.state = key, epoch, state_fn()
            return True
        return False


def class_weights(y: np.ndarray, n_classes: int) -> torch.Tensor:
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / max((counts > 0).sum(), 1), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def linear_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    x_test: np.ndarray,
    classes: list[str],
    cfg: ProbeConfig,
    seed: int = 0,
    log_epoch: EpochLogger | None = None,
) -> HeadResult:
    """Train a linear head on (x_train, y_train); score x_test with the last and the best-on-validation head."""
    n_classes = len(classes)
    mean = x_train.mean(axis=0, keepdims=True)
    std = x_train.std(axis=0, keepdims=True) + 1e-6

    def prepare(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(((x - mean) / std).astype(np.float32))

    xt, yt = prepare(x_train), torch.from_numpy(np.asarray(y_train, dtype=np.int64))
    xv, yv = (prepare(x_val), torch.from_numpy(np.asarray(y_val, dtype=np.int64))) if len(x_val) else (None, None)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = nn.Linear(xt.shape[1], n_classes)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = -(-len(xt) // cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs * steps_per_epoch)
    weight = class_weights(np.asarray(y_train), n_classes) if cfg.balanced_loss else None
    result, selector = HeadResult(), Selector()
    for epoch in range(1, cfg.epochs + 1):
        head.train()
        order = torch.randperm(len(xt), generator=generator)
        total = 0.0
        for begin in range(0, len(xt), cfg.batch_size):
            index = order[begin : begin + cfg.batch_size]
            loss = F.cross_entropy(head(xt[index]), yt[index], weight=weight, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(index)
        row = {"epoch": epoch, "train_loss": total / len(xt), "lr": scheduler.get_last_lr()[0]}
        head.eval()
        with torch.no_grad():
            row["train_acc"] = float((head(xt).argmax(1) == yt).float().mean())
            if xv is not None:
                logits = head(xv)
                row["val_loss"] = float(F.cross_entropy(logits, yv))
                scored = classification_metrics(yv.numpy(), logits.argmax(1).numpy(), classes)
                row["val_uar"], row["val_war"] = scored["uar"], scored["war"]
                selector.offer(epoch, row["val_uar"], row["val_loss"], lambda: copy.deepcopy(head.state_dict()))
        result.history.append(row)
        if log_epoch:
            log_epoch(epoch, row)
    heads = {"last": head.state_dict()}
    heads["best_val"] = selector.state if selector.state is not None else head.state_dict()
    result.best_epoch = selector.epoch if selector.epoch is not None else cfg.epochs
    x_test_t = prepare(x_test)
    with torch.no_grad():  # the test part is scored here, once, with heads chosen without it
        for rule, state in heads.items():
            head.load_state_dict(state)
            probabilities = head(x_test_t).softmax(dim=1).numpy()
            result.scores[rule], result.predictions[rule] = probabilities, probabilities.argmax(axis=1)
    return result
