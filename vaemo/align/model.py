"""The Stage 2 (text-aligned) model: the Stage 1 ``AVMAE`` plus three small projection heads into
the frozen text encoder's space (docs/method.md, "Stage 2").

* ``joint`` head: the fused AV embedding (``AVMAE.encode(...)["joint"]``) -> the embedding of the whole
  description (global path);
* ``video`` / ``audio`` heads: the unimodal stream embeddings -> ``facial_cues`` / ``vocal_cues``
  (modality path).

The AV network itself stays in ``vaemo/model/av.py``. A saved aligned model is a Stage 1 model
folder (so probing and fine-tuning read it unchanged) plus the text heads and the alignment file,
which names the text encoder, its dimension, the zero-shot prompt templates and the captions the
model was aligned on (``vaemo.artifacts.ModelFolder``). The alignment file is written last: its
presence is what marks a folder as aligned.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vaemo.artifacts import ModelFolder
from vaemo.errors import ConfigError, ModelError
from vaemo.model import av

FORMAT = 1
# which AV embedding each head reads, and which caption field it is aligned with
PATHS = {"joint": "description", "video": "facial_cues", "audio": "vocal_cues"}
TEMPERATURE_MIN, TEMPERATURE_MAX = 0.01, 1.0


class AlignmentError(ModelError):
    """A model folder that is not (or not a readable) aligned model."""


class TextHeads(nn.Module):
    """Linear maps of the pooled encoder features (dim) into the text space (text_dim), and the temperature."""

    def __init__(self, dim: int, text_dim: int, temperature_init: float = 0.07):
        super().__init__()
        self.joint = nn.Linear(dim, text_dim)
        self.video = nn.Linear(dim, text_dim)
        self.audio = nn.Linear(dim, text_dim)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature_init)))
        for head in (self.joint, self.video, self.audio):
            nn.init.xavier_uniform_(head.weight)
            nn.init.zeros_(head.bias)


class AlignedAV(nn.Module):
    """``AVMAE`` + ``TextHeads``. ``encode`` gives L2-normalised text-space embeddings under the keys of
    ``AVMAE.encode`` (``joint``, ``video``, ``audio``), so ``vaemo.embed.encode`` works with either model."""

    def __init__(self, av_model: av.AVMAE, text_dim: int, temperature_init: float = 0.07):
        super().__init__()
        self.av = av_model
        self.cfg = av_model.cfg  # the input contract, read by the data path
        self.text_dim = text_dim
        self.heads = TextHeads(av_model.cfg.dim, text_dim, temperature_init)
        self.mask_ratios = (0.0, 0.0)  # (video, audio) token masking of the training pass; not saved

    def temperature(self) -> Tensor:
        return self.heads.log_temperature.clamp(math.log(TEMPERATURE_MIN), math.log(TEMPERATURE_MAX)).exp()

    def _encoder_trains(self) -> bool:
        return any(p.requires_grad for n, p in self.av.named_parameters() if n.split(".")[0] in av.ENCODER_ROOTS)

    def to_text(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """Pooled AV features -> normalised text-space embeddings (float32), for the keys present."""
        return {
            key: F.normalize(getattr(self.heads, key)(features[key]).float(), dim=-1)
            for key in PATHS
            if key in features
        }

    def encode(
        self, video: Tensor | None = None, audio: Tensor | None = None, unimodal: bool = True
    ) -> dict[str, Tensor]:
        """Text-space embeddings: ``joint`` with both inputs; ``video`` / ``audio`` from the unimodal passes."""
        return self.to_text(self.av.encode(video=video, audio=audio, unimodal=unimodal))

    def forward(
        self, video: Tensor, audio: Tensor, rec_video: Tensor | None = None, rec_audio: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Training pass: the three text-space embeddings and the temperature; with ``rec_*`` (uncaptioned
        clips) also ``rec``, the Stage 1 masked-reconstruction loss of both modalities.

        The encoder sees the visible tokens of ``mask_ratios`` (video tube masking, audio random
        masking; (0, 0): whole clips), as Stage 1's contrastive passes did. A frozen encoder runs
        without autograd (only the heads train then)."""
        cfg = self.av.cfg
        b, ratio_v, ratio_a = video.shape[0], *self.mask_ratios
        ids_v = av.tube_mask(b, cfg.video_grid, ratio_v, device=video.device)[0] if ratio_v > 0 else None
        ids_a = av.random_mask(b, cfg.audio_tokens, ratio_a, device=audio.device)[0] if ratio_a > 0 else None
        with nullcontext() if self._encoder_trains() else torch.no_grad():
            features = self.av.encode(video=video, audio=audio, unimodal=True, video_ids=ids_v, audio_ids=ids_a)
        out = {**self.to_text(features), "temperature": self.temperature()}
        if rec_video is not None and rec_audio is not None and len(rec_video):
            stage1 = self.av(rec_video, rec_audio)
            out["rec"] = stage1["rec_video"] + stage1["rec_audio"]
        return out


def set_trainable(model: AlignedAV, mode: str, last_k: int = 2, reconstruction: bool = False) -> dict[str, int]:
    """Freeze what does not train; every trainable parameter must get a gradient each step (DDP needs that).

    ``all``: the whole encoder; ``last_k``: the last ``last_k`` shared blocks and the final norm;
    ``heads``: nothing of the AV model. The text heads always train. The decoder trains only with the
    reconstruction term (and an encoder that trains); the Stage 1 contrastive heads never do.
    Returns trainable parameter counts per part.
    """
    for param in model.av.parameters():
        param.requires_grad_(False)
    blocks = len(model.av.blocks)
    if mode == "all":
        for name, param in model.av.named_parameters():
            if name.split(".")[0] in av.ENCODER_ROOTS:
                param.requires_grad_(True)
    elif mode == "last_k":
        if last_k > blocks:
            raise ConfigError(f"last_k={last_k} exceeds the {blocks} shared encoder blocks of this model")
        for module in [*model.av.blocks[blocks - last_k:], model.av.norm]:
            for param in module.parameters():
                param.requires_grad_(True)
    elif mode != "heads":
        raise ConfigError(f"trainable must be all, heads or last_k, got {mode!r}")
    if reconstruction and mode != "heads":
        for name, param in model.av.named_parameters():
            if name.split(".")[0] in av.DECODER_ROOTS:
                param.requires_grad_(True)
    for param in model.heads.parameters():
        param.requires_grad_(True)
    count = lambda params: sum(p.numel() for p in params if p.requires_grad)  # noqa: E731
    return {"heads": count(model.heads.parameters()),
            "encoder": count(p for n, p in model.av.named_parameters() if n.split(".")[0] in av.ENCODER_ROOTS),
            "decoder": count(p for n, p in model.av.named_parameters() if n.split(".")[0] in av.DECODER_ROOTS),
            "total": count(model.parameters())}


# ---- files ----------------------------------------------------------------------------------

def save_aligned(model: AlignedAV, folder: str | os.PathLike, info: dict) -> Path:
    """The AV weights as a Stage 1 folder, the heads beside them, then the alignment file (written
    last: a folder with it is complete). ``info`` must name ``text_encoder`` and ``prompt_templates``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    av.save(model.av, folder)
    state = {k: v.detach().cpu().contiguous() for k, v in model.heads.state_dict().items()}
    heads, alignment_file = folder / ModelFolder.HEADS, folder / ModelFolder.ALIGNMENT
    tmp = heads.with_name(heads.name + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, heads)
    alignment = {"format": FORMAT, "text_dim": model.text_dim, "heads_file": heads.name, "paths": PATHS,
                 "temperature": float(model.temperature().detach()), **info}
    tmp = alignment_file.with_name(alignment_file.name + ".tmp")
    tmp.write_text(json.dumps(alignment, indent=1, default=str) + "\n")
    os.replace(tmp, alignment_file)
    return folder


def read_alignment(folder: str | os.PathLike) -> dict:
    """The alignment file of a Stage 2 folder; an AlignmentError for any other folder."""
    path = Path(folder) / ModelFolder.ALIGNMENT
    if not ModelFolder(folder).aligned:
        raise AlignmentError(
            f"{folder} is not a text-aligned (Stage 2) model: it has no {path.name}; run `vaemo align` first"
        )
    try:
        info = json.loads(path.read_text())
        for key in ("text_encoder", "text_dim", "prompt_templates"):
            info[key]
    except (ValueError, KeyError) as err:
        raise AlignmentError(f"{path}: not a valid alignment file ({type(err).__name__}: {err})") from None
    return info


def load_aligned(folder: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[AlignedAV, dict]:
    """(model in eval mode, the alignment info) from ``save_aligned``'s folder; safetensors only."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    info = read_alignment(folder)
    model = AlignedAV(av.load(folder), int(info["text_dim"]))
    try:
        heads = folder / info.get("heads_file", ModelFolder.HEADS)
        state = load_file(str(heads), device="cpu")
        model.heads.load_state_dict(state, strict=True)
    except (SafetensorError, OSError, RuntimeError) as err:
        raise AlignmentError(f"{heads}: not readable text heads for this model: {err}") from None
    return model.to(map_location).eval(), info
