"""Every name a user can choose, in one place: datasets, protocols, model presets, modalities, engines.

A registry maps each name to where its implementation lives (``module`` or ``module:attribute``),
imported only when it is used, so the configuration and the command line know every choice
without importing torch. Config ``Literal`` types and command-line ``choices`` come from here; a
new dataset adapter is its module plus one line below.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any, Literal

from vaemo.errors import ConfigError


class Registry:
    """Names of one kind of choice and the implementation of each."""

    def __init__(self, kind: str, entries: dict[str, str]):
        self.kind, self.entries = kind, dict(entries)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.entries)

    def literal(self, *extra: str) -> Any:
        """The ``Literal`` type of these names (plus ``extra`` ones such as "auto"), for pydantic fields."""
        return Literal[(*extra, *self.names)]

    def check(self, name: str) -> str:
        if name not in self.entries:
            raise ConfigError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names)}")
        return name

    def load(self, name: str) -> Any:
        """The implementation registered under ``name``: a module, or an attribute of one."""
        module, _, attribute = self.entries[self.check(name)].partition(":")
        found = import_module(module)
        return getattr(found, attribute) if attribute else found

    def loaded(self) -> dict[str, Any]:
        return {name: self.load(name) for name in self.names}


# Dataset adapters: a module with ``scan(root, labels)``; ``is_named_like(path)`` when file names
# identify the dataset, ``marks_splits(folder)`` when its split files do (see vaemo.ingest.adapters).
DATASETS = Registry("dataset",
                    {"generic": "vaemo.ingest.adapters.generic", "ravdess": "vaemo.ingest.adapters.ravdess",
                     "crema-d": "vaemo.ingest.adapters.cremad", "mafw": "vaemo.ingest.adapters.mafw",
                     "dfew": "vaemo.ingest.adapters.dfew", "voxceleb2": "vaemo.ingest.adapters.voxceleb2"})

# Benchmark protocols: classes and folds (vaemo.eval.protocols.Protocol).
PROTOCOLS = Registry("protocol",
                     {"crema-d": "vaemo.eval.protocols:CREMA_D", "mafw": "vaemo.eval.protocols:MAFW",
                      "ravdess": "vaemo.eval.protocols:RAVDESS", "dfew": "vaemo.eval.protocols:DFEW",
                      "generic": "vaemo.eval.protocols:GENERIC"})

# Stage 1 model sizes (vaemo.model.av.AVConfig).
MODEL_PRESETS = Registry("model preset",
                         {"tiny": "vaemo.model.av:TINY", "small": "vaemo.model.av:SMALL",
                          "base": "vaemo.model.av:BASE"})

# Captioning engines (classes implementing vaemo.caption.engines.CaptionEngine).
ENGINES = Registry("captioning engine",
                   {"vllm": "vaemo.caption.engines:VLLMEngine",
                    "transformers": "vaemo.caption.engines:TransformersEngine"})

# Inputs a clip can be embedded or classified from: the name, and the key of AVMAE.encode's output it reads.
MODALITIES = {"av": "joint", "video": "video", "audio": "audio"}
Modality = Literal[tuple(MODALITIES)]
