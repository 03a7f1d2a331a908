"""Pictures people would rather see than read, as matplotlib figures (logged to MLflow)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; no display on training nodes
import matplotlib.pyplot as plt  # noqa: E402


def training_curves(rows: list[dict], keys: tuple[str, ...], title: str):
    """One panel per metric in ``keys`` against the step, from a training step log."""
    present = [k for k in keys if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3.2), squeeze=False)
    for ax, key in zip(axes[0], present, strict=True):
        points = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], lw=1.2)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
