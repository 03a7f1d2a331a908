"""The MLflow model of every vaemo model folder, as a model from code: ``mlflow.pyfunc.log_model`` is given this
file, and MLflow runs it to load a logged Stage 1 or Stage 2 model (no pickled objects; see
:func:`vaemo.tracking.log_model`)."""

from __future__ import annotations

import warnings

from mlflow.models import ModelSignature, set_model
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import Array

# Sources in (video files, folders of videos, ingest folders), one row per clip out; the modality as a parameter.
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string")]),
    outputs=Schema([ColSpec("string", "source"), ColSpec("string", "clip_id"),
                    ColSpec(Array(DataType.double), "embedding")]),
    params=ParamSchema([ParamSpec("modality", "string", "av")]))


# The explicit signature carries the modality parameter, which predict's type hints cannot express; MLflow
# warns about the missing hints (through a filter of its own, so only recording the warnings keeps them out).
with warnings.catch_warnings(record=True):

    class ClipEmbedder(PythonModel):
        """A vaemo model folder as an MLflow model: ``predict`` embeds clips the way ``vaemo embed`` does.

        ``mlflow.pyfunc.load_model("models:/vaemo-stage1@<pipeline>").predict(["clip.mp4", "ingest/"])`` gives one
        row per clip: the source it came from, its clip id and its embedding (``params={"modality": "video"}``
        for video-only, ``"audio"`` for audio-only; the joint one by default).
        """

        def load_context(self, context) -> None:
            from vaemo.model import av

            self.model = av.load(context.artifacts["model"])

        def predict(self, context, model_input, params: dict | None = None):
            import pandas as pd

            from vaemo.embed import encode

            sources = model_input.iloc[:, 0].tolist() if isinstance(model_input, pd.DataFrame) else list(model_input)
            modality = (params or {}).get("modality", "av")
            rows = [{"source": source, "clip_id": clip_id, "embedding": vector.tolist()}
                    for source in sources for clip_id, vector in sorted(encode(source, self.model, modality).items())]
            return pd.DataFrame(rows, columns=["source", "clip_id", "embedding"])

    set_model(ClipEmbedder())
