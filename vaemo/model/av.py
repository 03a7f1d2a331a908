"""Stage 1 of VAEmo: the unified audio-visual masked autoencoder (``AVMAE``) and its losses.

One file holds the whole Stage 1 network so that it can be read top to bottom:

1. ``AVConfig`` and the presets ``tiny`` / ``small`` / ``base`` (named in ``vaemo.registry``);
2. input helpers: ``patchify`` / ``unpatchify``, masking, sin-cos positions;
3. the Transformer block (``scaled_dot_product_attention``, no loops over tokens);
4. ``AVMAE``: pre-training ``forward`` (masked reconstruction + contrastive) and ``encode``;
5. losses: ``masked_mse`` and ``info_nce``;
6. ``save`` / ``load`` (safetensors only, never unpickles) and ``model_info`` (parameters, GFLOPs).

Input contract, identical for every preset so that shards and loaders are shared:

* video ``(B, 3, T=16, H=160, W=160)`` float, already normalised with the mean/std stored in the
  config (the data path, ``vaemo.data.samples``, does it); tubes of 2x16x16 give 8x10x10 = 800
  tokens, ordered (t, h, w);
* audio ``(B, 256, 128)`` Kaldi log-mel fbank, (time, mel), already normalised with the
  convention stored in the config (also the data path's); 16x16 patches give 16x8 = 128 tokens,
  ordered (time, frequency).

Design (our reading of "unified and lightweight", see docs/method.md): modality-specific patch
embeddings, fixed sin-cos positions on a time axis shared by both modalities, a learned modality
embedding, then one shared Transformer over the visible tokens of both modalities together
(optionally the first ``modality_specific_layers`` blocks are per modality). A light shared
decoder reconstructs normalised patches of both modalities; a contrastive loss aligns the
unimodal passes of the same encoder.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from vaemo.artifacts import ModelFolder
from vaemo.errors import ModelError
from vaemo.registry import MODEL_PRESETS

VIDEO, AUDIO = 0, 1  # rows of the modality embeddings

# --------------------------------------------------------------------------------------------
# 1. Configuration
# --------------------------------------------------------------------------------------------


class AVConfig(BaseModel):
    """Every size and objective setting of the Stage 1 network; stored as ``config.json``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str = Field("custom", description="preset name, or any label for a custom configuration")

    # video input
    frames: int = Field(16, ge=1, description="frames per clip (our design, after HiCMAE: 16 at stride 4, 25 fps)")
    image_size: int = Field(160, ge=16, description="face crop side in pixels (our design, after HiCMAE)")
    tubelet: int = Field(2, ge=1, description="frames per video tube (our design)")
    patch: int = Field(16, ge=1, description="video patch side in pixels (our design)")
    video_mean: tuple[float, float, float] = Field((0.485, 0.456, 0.406), description="ImageNet RGB mean")
    video_std: tuple[float, float, float] = Field((0.229, 0.224, 0.225), description="ImageNet RGB std")

    # audio input
    audio_frames: int = Field(
        256, ge=1, description="10 ms fbank frames per clip: 2.56 s, the video window (our design)"
    )
    mel_bins: int = Field(128, ge=1, description="Kaldi fbank mel bins (our design, after AudioMAE/HiCMAE)")
    audio_patch: int = Field(16, ge=1, description="audio patch side (time and mel) (our design)")
    audio_mean: float = Field(-4.2677393, description="fbank mean of the normalisation convention (AudioMAE/HiCMAE)")
    audio_std: float = Field(4.5689974, gt=0, description="fbank std of the normalisation convention (AudioMAE/HiCMAE)")
    audio_double_std: bool = Field(
        True, description="normalise as (x - mean) / (2 std), the AudioMAE/HiCMAE convention; False: (x - mean) / std"
    )

    # encoder
    dim: int = Field(512, ge=8, description="encoder width (our design)")
    depth: int = Field(12, ge=1, description="encoder blocks in all, modality-specific ones included (our design)")
    heads: int = Field(8, ge=1, description="encoder attention heads (our design)")
    mlp_ratio: float = Field(4.0, gt=0, description="MLP hidden width / model width")
    modality_specific_layers: int = Field(
        0,
        ge=0,
        description="the first k blocks run separately per modality, then one shared Transformer (our design; k=0)",
    )
    drop_path: float = Field(
        0.0, ge=0, lt=1, description="stochastic depth at the last block, linear from 0 (for fine-tuning)"
    )

    # decoder
    decoder_dim: int = Field(256, ge=8, description="width of the light shared decoder (our design)")
    decoder_depth: int = Field(2, ge=1, description="blocks of the shared decoder (our design)")
    decoder_heads: int = Field(8, ge=1, description="decoder attention heads (our design)")

    # masking
    video_mask_ratio: float = Field(
        0.9, ge=0, lt=1, description="tube masking ratio on video (our design, after VideoMAE/HiCMAE)"
    )
    audio_mask_ratio: float = Field(
        0.8, ge=0, lt=1, description="random masking ratio on audio (our design, after AudioMAE/HiCMAE)"
    )

    # losses
    contrastive_weight: float = Field(
        0.01,
        ge=0,
        description="lambda in L_rec_video + L_rec_audio + lambda L_contrastive (our design, CAV-MAE's 0.01)",
    )
    temperature_init: float = Field(
        0.07, gt=0, description="initial InfoNCE temperature, learnable (our design, after CLIP)"
    )
    temperature_min: float = Field(
        0.01, gt=0, description="the learnable temperature is clamped to [min, max] (our design)"
    )
    temperature_max: float = Field(1.0, gt=0, description="upper clamp of the learnable temperature (our design)")
    proj_dim: int = Field(256, ge=1, description="width of the contrastive projection of each modality (our design)")
    norm_pix_loss: bool = Field(True, description="reconstruct per-patch normalised targets (our design, after MAE)")

    @model_validator(mode="after")
    def _check(self) -> AVConfig:
        problems = []
        if self.frames % self.tubelet:
            problems.append(f"frames={self.frames} is not a multiple of tubelet={self.tubelet}")
        if self.image_size % self.patch:
            problems.append(f"image_size={self.image_size} is not a multiple of patch={self.patch}")
        if self.audio_frames % self.audio_patch or self.mel_bins % self.audio_patch:
            problems.append(
                f"audio_frames={self.audio_frames} and mel_bins={self.mel_bins} "
                f"must be multiples of audio_patch={self.audio_patch}"
            )
        if self.dim % self.heads or self.dim % 2:
            problems.append(f"dim={self.dim} must be even and a multiple of heads={self.heads}")
        if self.decoder_dim % self.decoder_heads or self.decoder_dim % 2:
            problems.append(
                f"decoder_dim={self.decoder_dim} must be even and a multiple of decoder_heads={self.decoder_heads}"
            )
        if self.modality_specific_layers > self.depth:
            problems.append(f"modality_specific_layers={self.modality_specific_layers} exceeds depth={self.depth}")
        if self.temperature_min > self.temperature_init or self.temperature_init > self.temperature_max:
            problems.append("temperature_init must lie in [temperature_min, temperature_max]")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    # derived sizes
    @property
    def video_grid(self) -> tuple[int, int, int]:
        """(t, h, w) token grid of a clip: (8, 10, 10) by default."""
        return self.frames // self.tubelet, self.image_size // self.patch, self.image_size // self.patch

    @property
    def audio_grid(self) -> tuple[int, int]:
        """(time, frequency) token grid of a clip: (16, 8) by default."""
        return self.audio_frames // self.audio_patch, self.mel_bins // self.audio_patch

    @property
    def video_tokens(self) -> int:
        t, h, w = self.video_grid
        return t * h * w

    @property
    def audio_tokens(self) -> int:
        t, f = self.audio_grid
        return t * f

    @property
    def video_patch_dim(self) -> int:
        return 3 * self.tubelet * self.patch * self.patch

    @property
    def audio_patch_dim(self) -> int:
        return self.audio_patch * self.audio_patch

    @property
    def video_visible(self) -> int:
        """Visible video tokens under tube masking: every temporal slice keeps the same patches."""
        t, h, w = self.video_grid
        return t * visible_count(h * w, self.video_mask_ratio)

    @property
    def audio_visible(self) -> int:
        return visible_count(self.audio_tokens, self.audio_mask_ratio)


# Presets: one input contract (16x160x160 video, 256x128 fbank), sizes differ by width and depth.
# head_dim is 32 (tiny) or 64 (small, base). `base` stays under 40M parameters in all, decoder
# included: HiCMAE-B has about 81M.
TINY = AVConfig(name="tiny", dim=128, depth=4, heads=4, decoder_dim=64, decoder_depth=1, decoder_heads=2, proj_dim=64)
SMALL = AVConfig(
    name="small", dim=256, depth=12, heads=4, decoder_dim=192, decoder_depth=2, decoder_heads=3, proj_dim=128
)
BASE = AVConfig(
    name="base", dim=512, depth=11, heads=8, decoder_dim=256, decoder_depth=2, decoder_heads=4, proj_dim=256
)


def config_for(name: str, **overrides) -> AVConfig:
    """A preset by name (a ConfigError for an unknown one), optionally with some fields changed (validated)."""
    return AVConfig.model_validate({**MODEL_PRESETS.load(name).model_dump(), **overrides})


# --------------------------------------------------------------------------------------------
# 2. Inputs: patches, masks, positions
# --------------------------------------------------------------------------------------------


def patchify_video(video: Tensor, cfg: AVConfig) -> Tensor:
    """(B, 3, T, H, W) -> (B, t*h*w, tubelet*patch*patch*3); tokens ordered (t, h, w)."""
    b = video.shape[0]
    t, h, w = cfg.video_grid
    pt, p = cfg.tubelet, cfg.patch
    x = video.reshape(b, 3, t, pt, h, p, w, p)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # b, t, h, w, pt, p, p, c
    return x.reshape(b, t * h * w, pt * p * p * 3)


def unpatchify_video(patches: Tensor, cfg: AVConfig) -> Tensor:
    """Inverse of ``patchify_video``."""
    b = patches.shape[0]
    t, h, w = cfg.video_grid
    pt, p = cfg.tubelet, cfg.patch
    x = patches.reshape(b, t, h, w, pt, p, p, 3)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # b, c, t, pt, h, p, w, p
    return x.reshape(b, 3, t * pt, h * p, w * p)


def patchify_audio(audio: Tensor, cfg: AVConfig) -> Tensor:
    """(B, frames, mel) -> (B, t*f, patch*patch); tokens ordered (time, frequency)."""
    b = audio.shape[0]
    t, f = cfg.audio_grid
    p = cfg.audio_patch
    x = audio.reshape(b, t, p, f, p).permute(0, 1, 3, 2, 4)  # b, t, f, p_time, p_mel
    return x.reshape(b, t * f, p * p)


def unpatchify_audio(patches: Tensor, cfg: AVConfig) -> Tensor:
    """Inverse of ``patchify_audio``."""
    b = patches.shape[0]
    t, f = cfg.audio_grid
    p = cfg.audio_patch
    x = patches.reshape(b, t, f, p, p).permute(0, 1, 3, 2, 4)
    return x.reshape(b, t * p, f * p)


def visible_count(tokens: int, ratio: float) -> int:
    """round((1 - ratio) * tokens), at least one token."""
    return max(1, int(round((1.0 - ratio) * tokens)))


def _noise(batch: int, n: int, device: torch.device, generator: torch.Generator | None) -> Tensor:
    if generator is None:
        return torch.rand(batch, n, device=device)
    return torch.rand(batch, n, generator=generator, device=generator.device).to(device)


def random_mask(
    batch: int, tokens: int, ratio: float, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """Independent random masking per clip.

    Returns ``ids_keep`` (B, n_visible) token indices and ``mask`` (B, tokens) bool, True = masked.
    """
    device = torch.device(device)
    keep = visible_count(tokens, ratio)
    ids_keep = _noise(batch, tokens, device, generator).argsort(dim=1)[:, :keep]
    mask = torch.ones(batch, tokens, dtype=torch.bool, device=device)
    mask.scatter_(1, ids_keep, False)
    return ids_keep, mask


def tube_mask(
    batch: int,
    grid: tuple[int, int, int],
    ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """Tube masking: the same spatial patches are masked in every temporal slice.

    ``grid`` is (t, h, w); the visible count is t * round((1 - ratio) * h * w).
    Returns ``ids_keep`` (B, n_visible) and ``mask`` (B, t*h*w) bool, True = masked.
    """
    device = torch.device(device)
    t, h, w = grid
    spatial = h * w
    keep = visible_count(spatial, ratio)
    keep_s = _noise(batch, spatial, device, generator).argsort(dim=1)[:, :keep]  # (B, keep)
    offsets = torch.arange(t, device=device).view(1, t, 1) * spatial
    ids_keep = (keep_s.unsqueeze(1) + offsets).reshape(batch, t * keep)
    mask = torch.ones(batch, t * spatial, dtype=torch.bool, device=device)
    mask.scatter_(1, ids_keep, False)
    return ids_keep, mask


def _sincos(positions: Tensor, dim: int) -> Tensor:
    """1-D sin-cos embedding of float positions (N,) -> (N, dim); dim even."""
    freqs = 1.0 / (10000.0 ** (torch.arange(dim // 2, dtype=torch.float64, device="cpu") / (dim / 2)))
    angles = positions.double().unsqueeze(1) * freqs.unsqueeze(0)
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def _split_dims(dim: int) -> tuple[int, int]:
    """Channels for the time axis and for each of the two other axes (all even)."""
    side = 2 * (dim // 6)
    return dim - 2 * side, side


def sincos_positions(cfg: AVConfig, dim: int) -> tuple[Tensor, Tensor]:
    """Fixed positional embeddings (video (Nv, dim), audio (Na, dim)) on a shared time axis.

    Our design: the first channels encode time, measured for both modalities in units of one audio
    patch (0.16 s) at each token's centre, so the two modalities share one time scale (a video
    tube's code lies between those of the two audio patches it overlaps); the other channels
    encode (h, w) for video and the mel band for audio. Fixed, not learned: no parameters, so
    checkpoints do not depend on them, and the decoder gets its own at its width.
    """
    d_time, d_side = _split_dims(dim)
    tv, h, w = cfg.video_grid
    ta, fa = cfg.audio_grid

    def axis(n: int) -> Tensor:  # computed on the CPU even under a default-device context
        return torch.arange(n, dtype=torch.float64, device="cpu")

    time_v = (axis(tv) + 0.5) * (ta / tv)
    time_a = axis(ta) + 0.5
    gt, gh, gw = torch.meshgrid(time_v, axis(h), axis(w), indexing="ij")
    video = torch.cat(
        [_sincos(gt.flatten(), d_time), _sincos(gh.flatten(), d_side), _sincos(gw.flatten(), d_side)], dim=1
    )
    at, af = torch.meshgrid(time_a, axis(fa), indexing="ij")
    audio = torch.cat([_sincos(at.flatten(), d_time), _sincos(af.flatten(), 2 * d_side)], dim=1)
    return video, audio


# --------------------------------------------------------------------------------------------
# 3. Transformer block
# --------------------------------------------------------------------------------------------


class DropPath(nn.Module):
    """Stochastic depth: drops a residual branch per sample while training."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = torch.empty(x.shape[0], *([1] * (x.ndim - 1)), device=x.device, dtype=x.dtype).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Block(nn.Module):
    """Pre-norm Transformer block: fused qkv, ``scaled_dot_product_attention``, GELU MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, drop_path: float = 0.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path)

    def attention(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (b, heads, n, head_dim)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attention(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


# --------------------------------------------------------------------------------------------
# 4. The model
# --------------------------------------------------------------------------------------------


class AVMAE(nn.Module):
    """Unified audio-visual masked autoencoder with a contrastive objective (Stage 1).

    Parameter groups (names used by ``model_info`` and by layer-wise learning-rate decay):
    ``video_embed`` / ``audio_embed`` (patch embeddings), encoder (``modality``,
    ``video_blocks`` / ``audio_blocks`` for the optional modality-specific blocks, ``blocks``,
    ``norm``), decoder (``decoder_*``, ``mask_token``, ``video_pred`` / ``audio_pred``) and heads
    (``video_proj`` / ``audio_proj``, ``log_temperature``).
    """

    def __init__(self, cfg: AVConfig):
        super().__init__()
        self.cfg = cfg
        d, dd = cfg.dim, cfg.decoder_dim
        k = cfg.modality_specific_layers

        # patch embeddings as linear maps of patchified inputs (a strided convolution in effect):
        # pre-training then embeds only the visible patches
        self.video_embed = nn.Linear(cfg.video_patch_dim, d)
        self.audio_embed = nn.Linear(cfg.audio_patch_dim, d)
        self.modality = nn.Parameter(torch.zeros(2, d))  # learned modality embedding: row 0 video, row 1 audio
        here = self.modality.device  # the default device (meta inside model_info)
        pos_v, pos_a = sincos_positions(cfg, d)
        self.register_buffer("video_pos", pos_v.unsqueeze(0).to(here), persistent=False)
        self.register_buffer("audio_pos", pos_a.unsqueeze(0).to(here), persistent=False)

        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.video_blocks = nn.ModuleList(Block(d, cfg.heads, cfg.mlp_ratio, rates[i]) for i in range(k))
        self.audio_blocks = nn.ModuleList(Block(d, cfg.heads, cfg.mlp_ratio, rates[i]) for i in range(k))
        self.blocks = nn.ModuleList(Block(d, cfg.heads, cfg.mlp_ratio, rates[i]) for i in range(k, cfg.depth))
        self.norm = nn.LayerNorm(d)

        # light shared decoder: one token sequence for both modalities, told apart by modality embeddings
        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_modality = nn.Parameter(torch.zeros(2, dd))
        dpos_v, dpos_a = sincos_positions(cfg, dd)
        self.register_buffer("decoder_video_pos", dpos_v.unsqueeze(0).to(here), persistent=False)
        self.register_buffer("decoder_audio_pos", dpos_a.unsqueeze(0).to(here), persistent=False)
        self.decoder_blocks = nn.ModuleList(
            Block(dd, cfg.decoder_heads, cfg.mlp_ratio) for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(dd)
        self.video_pred = nn.Linear(dd, cfg.video_patch_dim)
        self.audio_pred = nn.Linear(dd, cfg.audio_patch_dim)

        # contrastive heads
        self.video_proj = nn.Linear(d, cfg.proj_dim)
        self.audio_proj = nn.Linear(d, cfg.proj_dim)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(cfg.temperature_init)))

        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for p in (self.modality, self.decoder_modality, self.mask_token):
            nn.init.normal_(p, std=0.02)

    # ---- input checks and embeddings ----------------------------------------------------

    def _check_video(self, video: Tensor) -> None:
        c = self.cfg
        want = (3, c.frames, c.image_size, c.image_size)
        if video.ndim != 5 or tuple(video.shape[1:]) != want:
            raise ValueError(f"video must be (B, {', '.join(map(str, want))}), got {tuple(video.shape)}")

    def _check_audio(self, audio: Tensor) -> None:
        c = self.cfg
        if audio.ndim != 3 or tuple(audio.shape[1:]) != (c.audio_frames, c.mel_bins):
            raise ValueError(
                f"audio must be (B, {c.audio_frames}, {c.mel_bins}) fbank frames x mel bins, got {tuple(audio.shape)}"
            )

    def embed_video(self, patches: Tensor, ids: Tensor | None = None) -> Tensor:
        """Video patches (B, Nv, patch_dim) -> tokens with positions and the video modality
        embedding; only the tokens at ``ids`` (B, K) when given."""
        return self._embed(patches, ids, self.video_embed, self.video_pos, VIDEO)

    def embed_audio(self, patches: Tensor, ids: Tensor | None = None) -> Tensor:
        """Audio patches (B, Na, patch_dim) -> tokens, as ``embed_video``."""
        return self._embed(patches, ids, self.audio_embed, self.audio_pos, AUDIO)

    def _embed(self, patches: Tensor, ids: Tensor | None, linear: nn.Linear, pos: Tensor, modality: int) -> Tensor:
        pos = pos.expand(patches.shape[0], -1, -1)
        if ids is not None:
            patches, pos = _gather(patches, ids), _gather(pos, ids)
        return linear(patches) + pos + self.modality[modality]

    def specific(self, x: Tensor, modality: int) -> Tensor:
        """The optional modality-specific blocks (identity when modality_specific_layers = 0)."""
        for block in self.video_blocks if modality == VIDEO else self.audio_blocks:
            x = block(x)
        return x

    def shared(self, x: Tensor) -> Tensor:
        """The shared Transformer and the final norm, over any token sequence."""
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def project(self, pooled: Tensor, modality: int) -> Tensor:
        """Pooled encoder output -> L2-normalised contrastive embedding (proj_dim)."""
        head = self.video_proj if modality == VIDEO else self.audio_proj
        return F.normalize(head(pooled).float(), dim=-1)

    def temperature(self) -> Tensor:
        lo, hi = math.log(self.cfg.temperature_min), math.log(self.cfg.temperature_max)
        return self.log_temperature.clamp(lo, hi).exp()

    # ---- pre-training --------------------------------------------------------------------

    def forward(self, video: Tensor, audio: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Masked reconstruction of both modalities + video-audio InfoNCE.

        Returns ``loss`` = ``rec_video`` + ``rec_audio`` + contrastive_weight * ``contrastive``, the
        clamped ``temperature``, the normalised unimodal embeddings ``video_proj`` / ``audio_proj``
        (B, proj_dim), the predictions ``pred_video`` / ``pred_audio`` (B, N, patch_dim) for all
        tokens and the masks ``mask_video`` / ``mask_audio`` (B, N) bool, True = masked.
        """
        cfg = self.cfg
        self._check_video(video)
        self._check_audio(audio)
        b = video.shape[0]
        if audio.shape[0] != b:
            raise ValueError(f"video and audio batch sizes differ: {b} vs {audio.shape[0]}")
        patches_v = patchify_video(video, cfg)
        patches_a = patchify_audio(audio, cfg)
        ids_v, mask_v = tube_mask(b, cfg.video_grid, cfg.video_mask_ratio, generator, video.device)
        ids_a, mask_a = random_mask(b, cfg.audio_tokens, cfg.audio_mask_ratio, generator, audio.device)
        v = self.specific(self.embed_video(patches_v, ids_v), VIDEO)
        a = self.specific(self.embed_audio(patches_a, ids_a), AUDIO)

        # joint stream: visible tokens of both modalities in one sequence
        joint = self.shared(torch.cat([v, a], dim=1))
        pred_v, pred_a = self.decode(joint, ids_v, ids_a)
        target_v, target_a = patches_v, patches_a
        if cfg.norm_pix_loss:
            target_v, target_a = _normalise_patches(target_v), _normalise_patches(target_a)
        rec_v = masked_mse(pred_v, target_v, mask_v)
        rec_a = masked_mse(pred_a, target_a, mask_a)

        # unimodal passes of the same encoder for the contrastive objective
        emb_v = self.project(self.shared(v).mean(dim=1), VIDEO)
        emb_a = self.project(self.shared(a).mean(dim=1), AUDIO)
        temperature = self.temperature()
        contrastive = info_nce(emb_v, emb_a, temperature)

        loss = rec_v + rec_a + cfg.contrastive_weight * contrastive
        return {
            "loss": loss,
            "rec_video": rec_v,
            "rec_audio": rec_a,
            "contrastive": contrastive,
            "temperature": temperature.detach(),
            "video_proj": emb_v,
            "audio_proj": emb_a,
            "pred_video": pred_v,
            "pred_audio": pred_a,
            "mask_video": mask_v,
            "mask_audio": mask_a,
        }

    def decode(self, joint: Tensor, ids_v: Tensor, ids_a: Tensor) -> tuple[Tensor, Tensor]:
        """Visible encoder outputs (video first) -> patch predictions for every token of both."""
        cfg = self.cfg
        x = self.decoder_embed(joint)
        nv = ids_v.shape[1]
        xv = _place(x[:, :nv], ids_v, self.mask_token, cfg.video_tokens)
        xa = _place(x[:, nv:], ids_a, self.mask_token, cfg.audio_tokens)
        xv = xv + self.decoder_video_pos + self.decoder_modality[VIDEO]
        xa = xa + self.decoder_audio_pos + self.decoder_modality[AUDIO]
        x = torch.cat([xv, xa], dim=1)
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_norm(x)
        return self.video_pred(x[:, : cfg.video_tokens]), self.audio_pred(x[:, cfg.video_tokens :])

    # ---- features ------------------------------------------------------------------------

    def encode(
        self,
        video: Tensor | None = None,
        audio: Tensor | None = None,
        pool: Literal["mean", "tokens"] = "mean",
        unimodal: bool = True,
        video_ids: Tensor | None = None,
        audio_ids: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Features without masking, for fine-tuning, probing and Stage 2.

        Keys present depend on the inputs:

        * ``video`` / ``audio``: the encoder run on that modality alone (the unimodal pass the
          contrastive loss trains), mean-pooled (B, dim), or (B, N, dim) with ``pool="tokens"``;
          ``video_proj`` / ``audio_proj``: their L2-normalised projections (B, proj_dim).
          With both inputs these passes run only when ``unimodal`` is True.
        * ``joint`` (both inputs): the joint pass over all tokens; pooled as the mean of the
          video-token mean and the audio-token mean, so 800 video tokens do not outweigh 128
          audio tokens (our design); ``joint_video`` / ``joint_audio``: the per-modality means of
          the joint pass. With ``pool="tokens"``, ``joint`` is (B, Nv + Na, dim), video first.
        * ``video_ids`` / ``audio_ids`` (B, K): encode only these tokens (e.g. the visible tokens of
          ``tube_mask`` / ``random_mask``), as pre-training does; Stage 2 trains that way for speed.
        """
        if video is None and audio is None:
            raise ValueError("encode needs video, audio or both")
        if pool not in ("mean", "tokens"):
            raise ValueError(f"pool must be 'mean' or 'tokens', got {pool!r}")
        out: dict[str, Tensor] = {}
        v = a = None
        if video is not None:
            self._check_video(video)
            v = self.specific(self.embed_video(patchify_video(video, self.cfg), video_ids), VIDEO)
        if audio is not None:
            self._check_audio(audio)
            a = self.specific(self.embed_audio(patchify_audio(audio, self.cfg), audio_ids), AUDIO)
        both = v is not None and a is not None
        for name, tokens, modality in (("video", v, VIDEO), ("audio", a, AUDIO)):
            if tokens is None or (both and not unimodal):
                continue
            h = self.shared(tokens)
            pooled = h.mean(dim=1)
            out[name] = pooled if pool == "mean" else h
            out[f"{name}_proj"] = self.project(pooled, modality)
        if both:
            h = self.shared(torch.cat([v, a], dim=1))
            nv = v.shape[1]
            out["joint_video"] = h[:, :nv].mean(dim=1)
            out["joint_audio"] = h[:, nv:].mean(dim=1)
            out["joint"] = 0.5 * (out["joint_video"] + out["joint_audio"]) if pool == "mean" else h
        return out

    # convenience wrappers bound to this model's configuration
    def patchify_video(self, video: Tensor) -> Tensor:
        return patchify_video(video, self.cfg)

    def unpatchify_video(self, patches: Tensor) -> Tensor:
        return unpatchify_video(patches, self.cfg)

    def patchify_audio(self, audio: Tensor) -> Tensor:
        return patchify_audio(audio, self.cfg)

    def unpatchify_audio(self, patches: Tensor) -> Tensor:
        return unpatchify_audio(patches, self.cfg)


def _gather(x: Tensor, ids: Tensor) -> Tensor:
    """Tokens x (B, N, D) at indices ids (B, K) -> (B, K, D)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _place(visible: Tensor, ids: Tensor, mask_token: Tensor, n: int) -> Tensor:
    """A full (B, n, D) sequence of mask tokens with the visible tokens written at ids."""
    b, _, d = visible.shape
    full = mask_token.to(visible.dtype).expand(b, n, d)
    return full.scatter(1, ids.unsqueeze(-1).expand(-1, -1, d), visible)


def _normalise_patches(patches: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-patch zero mean and unit variance (the norm_pix_loss target)."""
    patches = patches.float()
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True, unbiased=False)
    return (patches - mean) / (var + eps).sqrt()


# --------------------------------------------------------------------------------------------
# 5. Losses
# --------------------------------------------------------------------------------------------


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error over the masked tokens only (mask True = masked), in float32."""
    per_token = (pred.float() - target.float()).pow(2).mean(dim=-1)
    weight = mask.to(per_token.dtype)
    return (per_token * weight).sum() / weight.sum().clamp_min(1.0)


def info_nce(a: Tensor, b: Tensor, temperature: Tensor | float) -> Tensor:
    """Symmetric InfoNCE between L2-normalised rows: row i of ``a`` and row i of ``b`` are a pair,
    every other row of the batch is a negative. Mean of the a->b and b->a cross-entropies."""
    logits = a.float() @ b.float().t() / temperature
    labels = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


# --------------------------------------------------------------------------------------------
# 6. Checkpoints and model information
# --------------------------------------------------------------------------------------------

def save(model: AVMAE, folder: str | os.PathLike) -> Path:
    """Write the weights and the config into a model folder (each replaced atomically)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config_json = model.cfg.model_dump_json(indent=2)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    weights, config = folder / ModelFolder.WEIGHTS, folder / ModelFolder.CONFIG
    tmp = weights.with_name(weights.name + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "config": config_json})
    os.replace(tmp, weights)
    tmp = config.with_name(config.name + ".tmp")
    tmp.write_text(config_json + "\n")
    os.replace(tmp, config)
    return folder


def load_config(folder: str | os.PathLike) -> AVConfig:
    """The ``AVConfig`` of a model folder; a ModelError for a missing folder or an invalid config."""
    path = ModelFolder(folder).require() / ModelFolder.CONFIG
    try:
        return AVConfig.model_validate_json(path.read_text())
    except ValueError as err:  # pydantic's ValidationError and JSON errors are ValueErrors
        raise ModelError(f"{path}: not a valid model config: {err}") from None


def load(folder: str | os.PathLike, map_location: str | torch.device = "cpu") -> AVMAE:
    """Rebuild an ``AVMAE`` from ``save``'s folder; safetensors only, with a strict key check (ModelError)."""
    model = AVMAE(load_config(folder))
    load_weights(model, folder)
    return model.to(map_location)


def load_weights(model: AVMAE, folder: str | os.PathLike) -> None:
    """Copy the weights of ``save``'s folder into ``model``: every key, every shape, or a ModelError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights_path = ModelFolder(folder).require() / ModelFolder.WEIGHTS
    try:
        state = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError) as err:
        raise ModelError(f"{weights_path}: not a readable safetensors file: {err}") from err
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"missing keys: {_listed(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_listed(unexpected)}")
        if wrong_shape:
            parts.append(f"wrong shapes: {_listed(wrong_shape)}")
        raise ModelError(f"{weights_path} does not match the {model.cfg.name!r} model: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def _listed(items: list[str], limit: int = 8) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


# Top-level parameter names of AVMAE by part: what an encoder-only use (fine-tuning, alignment)
# keeps, what only pre-training needs, and the contrastive heads.
ENCODER_ROOTS = ("video_embed", "audio_embed", "modality", "video_blocks", "audio_blocks", "blocks", "norm")
DECODER_ROOTS = ("decoder_embed", "mask_token", "decoder_modality", "decoder_blocks", "decoder_norm", "video_pred",
                 "audio_pred")
HEAD_ROOTS = ("video_proj", "audio_proj", "log_temperature")


def _parameter_groups(model: AVMAE) -> dict[str, int]:
    groups = {"video_patch_embed": 0, "audio_patch_embed": 0, "encoder": 0, "decoder": 0, "heads": 0}
    for name, p in model.named_parameters():
        root = name.split(".")[0]
        if root == "video_embed":
            group = "video_patch_embed"
        elif root == "audio_embed":
            group = "audio_patch_embed"
        elif root in ENCODER_ROOTS:
            group = "encoder"
        elif root in DECODER_ROOTS:
            group = "decoder"
        elif root in HEAD_ROOTS:
            group = "heads"
        else:  # a new parameter must be given a group here
            raise AssertionError(f"parameter {name} belongs to no group")
        groups[group] += p.numel()
    return groups


def model_info(cfg: AVConfig) -> dict:
    """Parameters per part and GFLOPs per clip (batch of 1).

    FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` with the model on the meta device
    (no memory, no compute; it also counts attention, which the CPU kernel would hide). Convention:
    one multiply-add = 2 FLOPs; matrix products, convolutions and attention are counted,
    element-wise operations (norms, softmax, GELU) are not. ``pretrain_gflops`` is the whole
    pre-training forward (joint pass, decoder, both unimodal passes); ``encode_joint_gflops`` one
    joint pass over all 928 tokens without masking; ``encode_video_gflops`` /
    ``encode_audio_gflops`` the unimodal passes.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = AVMAE(cfg)
        video = torch.empty(1, 3, cfg.frames, cfg.image_size, cfg.image_size)
        audio = torch.empty(1, cfg.audio_frames, cfg.mel_bins)
    model.eval()
    params = _parameter_groups(model)
    params["total"] = sum(p.numel() for p in model.parameters())
    params["inference"] = params["total"] - params["decoder"]

    def gflops(fn) -> float:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / 1e9

    return {
        "name": cfg.name,
        "params": params,
        "tokens": {
            "video": cfg.video_tokens,
            "audio": cfg.audio_tokens,
            "video_visible": cfg.video_visible,
            "audio_visible": cfg.audio_visible,
        },
        "pretrain_gflops": gflops(lambda: model(video, audio)),
        "encode_joint_gflops": gflops(lambda: model.encode(video, audio, unimodal=False)),
        "encode_video_gflops": gflops(lambda: model.encode(video=video)),
        "encode_audio_gflops": gflops(lambda: model.encode(audio=audio)),
        "flop_convention": "FlopCounterMode, batch 1, multiply-add = 2 FLOPs, element-wise ops not counted",
    }


def describe(info: dict) -> str:
    """``model_info`` as text: parameters per part, GFLOPs per clip, tokens (``vaemo model-info``)."""
    lines = [f"model {info['name']}"] + [f"  params.{part:<18} {count:>12,}" for part, count in info["params"].items()]
    lines += [f"  {key:<25} {info[key]:>10.2f}" for key in info if key.endswith("gflops")]
    return "\n".join(lines + [f"  tokens: {info['tokens']}"])
