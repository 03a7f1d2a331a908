"""Downstream evaluation (docs/method.md, "Downstream protocols"): folds per protocol, linear probe, full
fine-tuning and zero-shot, metrics (UAR, WAR, macro-F1, per-class recall, confusion), figures and a
report beside the published figures."""

from vaemo.eval.metrics import classification_metrics, summarise
from vaemo.eval.protocols import EvaluationError, FoldPlan, make_folds, save_folds
from vaemo.eval.run import REPORT, RESULTS, Prepared, evaluate, prepare

__all__ = ["REPORT", "RESULTS", "EvaluationError", "FoldPlan", "Prepared", "classification_metrics", "evaluate",
           "make_folds", "prepare", "save_folds", "summarise"]
