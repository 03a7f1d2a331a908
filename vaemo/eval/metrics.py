"""Classification metrics of the AVER benchmarks, per fold and over folds.

UAR (unweighted average recall) is the mean of the per-class recalls over the classes that occur
in the test labels; WAR (weighted average recall) is plain accuracy; macro-F1 averages the
per-class F1 over the same classes (a class that is never predicted has F1 0). The spread over
folds is the sample standard deviation (ddof=1; 0 for a single fold).
"""

from __future__ import annotations

import numpy as np

SCALARS = ("uar", "war", "macro_f1")


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(true class, predicted class) counts."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)), 1)
    return matrix


def classification_metrics(y_true, y_pred, classes: list[str]) -> dict:
    """uar, war, macro_f1, per_class_recall {class: recall or None}, confusion (rows true), support."""
    y_true, y_pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    if len(y_true) == 0:
        raise ValueError("no test clips to score")
    matrix = confusion(y_true, y_pred, len(classes))
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    hits = np.diag(matrix)
    present = support > 0
    recall = np.where(present, hits / np.maximum(support, 1), np.nan)
    precision = np.where(predicted > 0, hits / np.maximum(predicted, 1), 0.0)
    denominator = precision + np.nan_to_num(recall)
    f1 = np.where(
        denominator > 0, 2 * precision * np.nan_to_num(recall) / np.where(denominator > 0, denominator, 1), 0.0
    )
    return {
        "uar": float(recall[present].mean()),
        "war": float(hits.sum() / len(y_true)),
        "macro_f1": float(f1[present].mean()),
        "per_class_recall": {name: (None if not present[i] else float(recall[i])) for i, name in enumerate(classes)},
        "confusion": matrix.tolist(),
        "support": {name: int(support[i]) for i, name in enumerate(classes)},
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def summarise(per_fold: list[dict], classes: list[str]) -> dict:
    """Mean and std over folds of uar/war/macro_f1, the mean per-class recall, and the summed confusion."""
    out: dict = {}
    for key in SCALARS:
        out[key], out[f"{key}_std"] = _mean_std([m[key] for m in per_fold])
    out["per_class_recall"] = {}
    for name in classes:
        values = [m["per_class_recall"][name] for m in per_fold if m["per_class_recall"][name] is not None]
        out["per_class_recall"][name] = float(np.mean(values)) if values else None
    out["confusion"] = np.sum([np.asarray(m["confusion"]) for m in per_fold], axis=0).tolist()
    out["folds"] = len(per_fold)
    return out
