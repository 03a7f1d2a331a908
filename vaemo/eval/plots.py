"""Evaluation figures: confusion matrix, a 2-D t-SNE map of clip embeddings, training curves."""

from __future__ import annotations

import numpy as np

from vaemo.plots import plt  # the Agg backend is chosen there


def confusion_figure(matrix, classes: list[str], title: str):
    """Row-normalised confusion matrix (recall on the diagonal) with the counts written in each cell."""
    counts = np.asarray(matrix, dtype=float)
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    side = max(4.0, 0.55 * len(classes) + 2.5)
    fig, ax = plt.subplots(figsize=(side, side * 0.9))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(classes)):
        for j in range(len(classes)):
            if counts[i, j]:
                ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=8,
                        color="white" if share[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def tsne_figure(
    features: np.ndarray, labels: list[str], classes: list[str], title: str, *, perplexity: float = 30.0, seed: int = 0
):
    """t-SNE of standardised embeddings, one colour per class; perplexity is lowered for small sets."""
    from sklearn.manifold import TSNE

    x = (features - features.mean(axis=0)) / (features.std(axis=0) + 1e-6)
    perplexity = float(min(perplexity, max(1.0, (len(x) - 1) / 3)))
    points = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    fig, ax = plt.subplots(figsize=(6, 5))
    colours = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    labels = np.asarray(labels)
    for index, name in enumerate(classes):
        chosen = labels == name
        if chosen.any():
            ax.scatter(
                points[chosen, 0], points[chosen, 1], s=14, alpha=0.8, color=colours(index % colours.N), label=name
            )
    ax.legend(fontsize=8, markerscale=1.5, loc="best")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def curves_figure(histories: dict[int, list[dict]], title: str):
    """Training loss and validation UAR per epoch, one line per fold."""
    keys = [
        k for k in ("train_loss", "val_uar", "val_loss") if any(k in row for rows in histories.values() for row in rows)
    ]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.3), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for fold, rows in sorted(histories.items()):
            points = [(r["epoch"], r[key]) for r in rows if key in r]
            ax.plot([p[0] for p in points], [p[1] for p in points], lw=1.2, label=f"fold {fold}")
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def save(fig, path) -> None:
    fig.savefig(path, dpi=120)
    plt.close(fig)
