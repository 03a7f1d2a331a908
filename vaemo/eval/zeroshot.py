"""Zero-shot classification, possible only once Stage 2 has aligned the AV space with text.

A clip is scored against one text prompt per class (``EvaluateConfig.zeroshot_prompt``, e.g. "a
person who sounds and looks angry"): the class whose prompt embedding is closest (cosine) to the
clip's aligned embedding wins (:func:`zero_shot_predict`). An aligned model folder is recognised by
its alignment file (written by Stage 2, ``vaemo.align``, beside the weights: the text encoder, the
projections, the prompt templates; ``vaemo.artifacts.ModelFolder.aligned``); a Stage 1 folder has
none, and zero-shot refuses it with a clear message. Clips are embedded into the text space by
:func:`load_clip_encoder` (the aligned model, usable with ``vaemo.embed.encode``), prompts by
:func:`load_prompt_encoder`;
:func:`score_clips` is what ``vaemo zeroshot`` runs (several templates per label, averaged, and
per-clip probabilities with the model's learned temperature).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from vaemo.artifacts import ModelFolder
from vaemo.eval.protocols import EvaluationError

# (clip embeddings (N, D), class prompts) -> prompt embeddings (C, D) in the same aligned space
PromptEncoder = Callable[[list[str]], np.ndarray]


def require_aligned(model_dir: Path) -> None:
    if not ModelFolder(model_dir).aligned:
        raise EvaluationError(
            f"--mode zeroshot needs a Stage 2 (text-aligned) model, and {model_dir} is a Stage 1 model with no text "
            f"alignment (no {ModelFolder.ALIGNMENT}); align it with Stage 2 first, or use --mode probe or --mode "
            "finetune"
        )


def class_prompts(classes: list[str], template: str) -> list[str]:
    return [template.format(label=name) for name in classes]


def zero_shot_predict(clip_embeddings: np.ndarray, prompt_embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class per clip, cosine similarity (N, C)) of clips against one prompt embedding per class."""
    clips = clip_embeddings / np.maximum(np.linalg.norm(clip_embeddings, axis=1, keepdims=True), 1e-12)
    prompts = prompt_embeddings / np.maximum(np.linalg.norm(prompt_embeddings, axis=1, keepdims=True), 1e-12)
    similarity = clips @ prompts.T
    return similarity.argmax(axis=1), similarity


def load_prompt_encoder(model_dir: Path) -> PromptEncoder:
    """The text side of an aligned model: its frozen text encoder (L2-normalised sentence embeddings)."""
    from vaemo.align.model import read_alignment
    from vaemo.text import text_encoder

    require_aligned(model_dir)
    info = read_alignment(model_dir)
    encoder = text_encoder(info["text_encoder"])
    if encoder.dim != int(info["text_dim"]):
        raise EvaluationError(f"{model_dir}: the text encoder {info['text_encoder']!r} gives {encoder.dim}-d vectors, "
                              f"the model was aligned to {info['text_dim']}-d")
    return encoder.encode


def load_clip_encoder(model_dir: Path, device="cpu"):
    """The AV side of an aligned model: ``encode`` gives text-space clip embeddings (works with
    ``vaemo.embed.encode``)."""
    from vaemo.align.model import load_aligned

    require_aligned(model_dir)
    return load_aligned(model_dir, map_location=device)[0]


def prompt_embeddings(encode: PromptEncoder, classes: list[str], templates: list[str]) -> np.ndarray:
    """One L2-normalised embedding per class: the mean over the templates' prompts (prompt ensembling, as CLIP)."""
    vectors = np.stack([encode(class_prompts(classes, template)) for template in templates])  # (T, C, D)
    mean = vectors.mean(axis=0)
    return mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)


def probabilities(similarity: np.ndarray, temperature: float) -> np.ndarray:
    """Softmax over classes of cosine / temperature (each row sums to 1)."""
    logits = similarity / temperature
    logits = logits - logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=1, keepdims=True)


def score_clips(source: Path, model_dir: Path, classes: list[str], *, templates: list[str] | None = None,
                modality: str = "av", batch_size: int = 8):
    """Per-clip class probabilities for a video file, a folder of videos or an ingest folder, as a DataFrame
    (clip_id, predicted, p_<class>...). ``templates``: default the model's own (its alignment file)."""
    import pandas as pd

    from vaemo.align.model import read_alignment
    from vaemo.embed import encode

    classes = [c.strip() for c in classes if c.strip()]
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise EvaluationError(f"zero-shot needs at least 2 distinct labels, got {classes}")
    if not ModelFolder(model_dir).aligned:
        raise EvaluationError(f"{model_dir} is not a Stage 2 (text-aligned) model: it has no {ModelFolder.ALIGNMENT}; "
                              "align a Stage 1 model with `vaemo align` first")
    model = load_clip_encoder(model_dir)
    info = read_alignment(model_dir)
    templates = templates or info["prompt_templates"]
    bad = [t for t in templates if "{label}" not in t]
    if bad:
        raise EvaluationError(f"a prompt template must contain {{label}}: {bad}")
    prompts = prompt_embeddings(load_prompt_encoder(model_dir), classes, templates)
    vectors = encode(source, model, modality, batch_size=batch_size)
    if not vectors:
        raise EvaluationError(f"no clip of {source} could be embedded")
    ids = sorted(vectors)
    predicted, similarity = zero_shot_predict(np.stack([vectors[i] for i in ids]), prompts)
    probs = probabilities(similarity, float(info.get("temperature", 0.07)))
    frame = pd.DataFrame({"clip_id": ids, "predicted": [classes[k] for k in predicted]})
    for k, name in enumerate(classes):
        frame[f"p_{name}"] = probs[:, k]
    return frame


def write_scores(source: Path, model_dir: Path, classes: list[str], out: Path, templates: list[str] | None = None,
                 modality: str = "av", batch_size: int = 8) -> str:
    """``vaemo zeroshot``: per-clip probabilities as CSV (or JSON for a .json ``out``); a line saying so."""
    frame = score_clips(source, model_dir, classes, templates=templates, modality=modality, batch_size=batch_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".json":
        out.write_text(frame.to_json(orient="records", indent=1))
    else:
        frame.to_csv(out, index=False)
    counts = ", ".join(f"{k} {v}" for k, v in frame["predicted"].value_counts().items())
    return f"{len(frame)} clips scored against {','.join(classes)} ({counts}); probabilities in {out}"
