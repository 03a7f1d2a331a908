"""One source for names: every registered dataset, protocol, preset and engine loads and is what its name says, and
the configuration accepts exactly the registered names."""

from __future__ import annotations

import typing

import pytest
from pydantic import ValidationError

from vaemo.caption.engines import CaptionEngine
from vaemo.config import CaptionConfig, CorpusConfig, EvaluateConfig, PretrainConfig
from vaemo.errors import ConfigError
from vaemo.eval.protocols import Protocol
from vaemo.model.av import AVConfig
from vaemo.registry import DATASETS, ENGINES, MODALITIES, MODEL_PRESETS, PROTOCOLS, Modality


def test_every_registered_implementation_loads_and_matches_its_name():
    for name, adapter in DATASETS.loaded().items():
        assert callable(adapter.scan), name
    for name, protocol in PROTOCOLS.loaded().items():
        assert isinstance(protocol, Protocol) and protocol.name == name
    for name, preset in MODEL_PRESETS.loaded().items():
        assert isinstance(preset, AVConfig) and preset.name == name
    for name, engine in ENGINES.loaded().items():
        assert engine.name == name and callable(engine.generate)
        hints = typing.get_type_hints(CaptionEngine.generate)
        assert typing.get_type_hints(engine.generate) == hints, f"{name} does not implement CaptionEngine.generate"
    assert set(MODALITIES) == set(typing.get_args(Modality)) == {"av", "video", "audio"}


def test_configuration_accepts_exactly_the_registered_names(tmp_path):
    assert typing.get_args(CorpusConfig.model_fields["dataset"].annotation) == ("auto", *DATASETS.names)
    for model, field, registry in ((PretrainConfig, "model", MODEL_PRESETS), (EvaluateConfig, "protocol", PROTOCOLS),
                                   (CaptionConfig, "engine", ENGINES)):
        assert typing.get_args(model.model_fields[field].annotation) == registry.names
        with pytest.raises(ValidationError):
            model(**{field: "nonesuch"})
    with pytest.raises(ConfigError, match="unknown dataset 'nonesuch'; choose one of generic, ravdess"):
        DATASETS.load("nonesuch")
