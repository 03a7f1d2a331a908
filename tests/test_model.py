"""Stage 1 network (vaemo.model.av): sizes, masking, losses, learning, checkpoints, features. CPU only."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from vaemo.errors import ConfigError, ModelError
from vaemo.model import (
    AVMAE,
    AVConfig,
    config_for,
    info_nce,
    load,
    masked_mse,
    model_info,
    patchify_audio,
    patchify_video,
    random_mask,
    save,
    tube_mask,
    unpatchify_audio,
    unpatchify_video,
)
from vaemo.model.av import _normalise_patches
from vaemo.registry import MODEL_PRESETS

CONFIGS = MODEL_PRESETS.loaded()

B = 2


def clips(batch: int = B, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 16, 160, 160, generator=g), torch.randn(batch, 256, 128, generator=g)


def seeded(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def tiny() -> AVMAE:
    torch.manual_seed(0)
    return AVMAE(config_for("tiny")).eval()


@pytest.fixture(scope="module")
def infos() -> dict[str, dict]:
    return {name: model_info(CONFIGS[name]) for name in ("tiny", "base")}


# ---- sizes -----------------------------------------------------------------------------------


def test_parameter_counts_tokens_and_gflops(infos):
    for name, info in infos.items():
        params = info["params"]
        parts = {"video_patch_embed", "audio_patch_embed", "encoder", "decoder", "heads"}
        assert set(params) == parts | {"total", "inference"}
        assert sum(params[k] for k in parts) == params["total"], name
        assert params["inference"] == params["total"] - params["decoder"]
        assert info["tokens"] == {"video": 800, "audio": 128, "video_visible": 80, "audio_visible": 26}
        for key in ("pretrain_gflops", "encode_joint_gflops", "encode_video_gflops", "encode_audio_gflops"):
            assert info[key] > 0, (name, key)
        # masking makes pre-training much cheaper than a full joint pass
        assert info["pretrain_gflops"] < info["encode_joint_gflops"]
    assert infos["tiny"]["params"]["total"] < 2_000_000
    assert infos["base"]["params"]["total"] <= 40_000_000
    base = infos["base"]
    print(
        f"\nbase: {base['params']['total'] / 1e6:.1f}M parameters, pre-training forward "
        f"{base['pretrain_gflops']:.1f} GFLOPs, joint encode {base['encode_joint_gflops']:.1f} GFLOPs per clip"
    )


def test_small_preset_is_about_ten_million():
    with torch.device("meta"):
        model = AVMAE(CONFIGS["small"])
    assert 5_000_000 < sum(p.numel() for p in model.parameters()) < 15_000_000


def test_every_preset_keeps_the_same_input_contract():
    for cfg in CONFIGS.values():
        assert (cfg.frames, cfg.image_size, cfg.audio_frames, cfg.mel_bins) == (16, 160, 256, 128)
        assert (cfg.video_tokens, cfg.audio_tokens) == (800, 128)


def test_config_json_round_trip_and_unknown_keys():
    for cfg in CONFIGS.values():
        assert AVConfig.model_validate_json(cfg.model_dump_json()) == cfg
    with pytest.raises(ValidationError):
        AVConfig.model_validate({"name": "x", "dimm": 3})
    with pytest.raises(ValidationError, match="multiple of heads"):
        config_for("tiny", heads=5)
    with pytest.raises(ConfigError, match="unknown model preset 'huge'; choose one of tiny, small, base"):
        config_for("huge")


def test_wrong_input_shape_says_what_was_expected(tiny):
    video, audio = clips()
    with pytest.raises(ValueError, match=r"video must be \(B, 3, 16, 160, 160\)"):
        tiny(video[:, :, :8], audio)
    with pytest.raises(ValueError, match=r"audio must be \(B, 256, 128\)"):
        tiny.encode(audio=audio.transpose(1, 2))


# ---- patches and masks ------------------------------------------------------------------------


def test_patchify_round_trip_and_token_order(tiny):
    cfg = tiny.cfg
    video, audio = clips()
    pv, pa = patchify_video(video, cfg), patchify_audio(audio, cfg)
    assert pv.shape == (B, 800, 1536) and pa.shape == (B, 128, 256)
    assert torch.equal(unpatchify_video(pv, cfg), video)
    assert torch.equal(unpatchify_audio(pa, cfg), audio)
    # token (t, h, w) = (1, 2, 3) holds frames 2-3, rows 32-47, columns 48-63
    token = 1 * 100 + 2 * 10 + 3
    block = video[0, :, 2:4, 32:48, 48:64]
    assert torch.equal(pv[0, token].sort().values, block.flatten().sort().values)
    # audio token (time, mel) = (5, 2) holds frames 80-95, mel bins 32-47
    assert torch.equal(pa[0, 5 * 8 + 2].sort().values, audio[0, 80:96, 32:48].flatten().sort().values)


def test_tube_masking_masks_the_same_patches_in_every_temporal_slice():
    ids, mask = tube_mask(3, (8, 10, 10), 0.9, seeded())
    assert mask.shape == (3, 800) and ids.shape == (3, 80)
    per_slice = mask.view(3, 8, 100)
    assert torch.equal(per_slice, per_slice[:, :1].expand(-1, 8, -1))
    assert (~mask).sum(dim=1).tolist() == [round(0.1 * 800)] * 3
    assert not torch.equal(mask[0], mask[1])  # clips are masked independently
    assert torch.equal(mask.gather(1, ids), torch.zeros_like(ids, dtype=torch.bool))
    assert torch.equal(tube_mask(3, (8, 10, 10), 0.9, seeded())[1], mask)  # a generator makes it deterministic


def test_random_audio_masking_counts():
    ids, mask = random_mask(4, 128, 0.8, seeded())
    assert (~mask).sum(dim=1).tolist() == [round(0.2 * 128)] * 4
    assert ids.shape == (4, 26) and len(set(ids[0].tolist())) == 26


@pytest.fixture(scope="module")
def pretrain(tiny) -> dict:
    """One pre-training forward of the tiny model on a fixed batch and masks, with the gradients
    of the reconstruction losses with respect to the predictions."""
    video, audio = clips()
    out = tiny(video, audio, generator=seeded())
    rec = out["rec_video"] + out["rec_audio"]
    rec_grads = torch.autograd.grad(rec, [out["pred_video"], out["pred_audio"]], retain_graph=True)
    (temperature_grad,) = torch.autograd.grad(out["loss"], [tiny.log_temperature])
    result = {k: v.detach() for k, v in out.items()}
    result.update(grad_video=rec_grads[0], grad_audio=rec_grads[1], temperature_grad=temperature_grad)
    result.update(video=video, audio=audio)
    return result


def test_forward_masks_follow_the_config(pretrain):
    assert pretrain["mask_video"].shape == (B, 800) and pretrain["mask_audio"].shape == (B, 128)
    assert (~pretrain["mask_video"]).sum(1).tolist() == [80] * B
    assert (~pretrain["mask_audio"]).sum(1).tolist() == [26] * B
    per_slice = pretrain["mask_video"].view(B, 8, 100)
    assert torch.equal(per_slice, per_slice[:, :1].expand(-1, 8, -1))


# ---- losses -----------------------------------------------------------------------------------


def test_reconstruction_loss_sees_masked_patches_only(tiny, pretrain):
    for name in ("video", "audio"):
        grad = pretrain[f"grad_{name}"].abs().sum(dim=-1)
        mask = pretrain[f"mask_{name}"]
        assert torch.all(grad[~mask] == 0), f"visible {name} patches reach the loss"
        assert torch.all(grad[mask] > 0), f"some masked {name} patches are left out of the loss"

    # the reported loss is the MSE to the normalised patches over masked tokens
    video, audio, mask = pretrain["video"], pretrain["audio"], pretrain["mask_video"]
    target = _normalise_patches(patchify_video(video, tiny.cfg))
    assert torch.allclose(pretrain["rec_video"], masked_mse(pretrain["pred_video"], target, mask))

    # new pixels in a masked tube change the target, not the prediction: the encoder never saw them
    h, w = divmod(int(torch.nonzero(mask[0, :100])[0]), 10)
    changed = video.clone()
    changed[0, :, :, h * 16 : (h + 1) * 16, w * 16 : (w + 1) * 16] = torch.randn(3, 16, 16, 16)
    with torch.no_grad():
        again = tiny(changed, audio, generator=seeded())
    assert torch.allclose(again["pred_video"], pretrain["pred_video"], atol=1e-6)
    new_target = _normalise_patches(patchify_video(changed, tiny.cfg))
    assert torch.allclose(again["rec_video"], masked_mse(pretrain["pred_video"], new_target, mask))
    assert not torch.equal(again["rec_video"], pretrain["rec_video"])


def test_masked_mse_ignores_visible_positions():
    g = seeded()
    pred, target = torch.randn(2, 10, 4, generator=g), torch.randn(2, 10, 4, generator=g)
    mask = torch.rand(2, 10, generator=g) < 0.5
    base = masked_mse(pred, target, mask)
    garbage = torch.where(mask.unsqueeze(-1), pred, pred + 100.0)
    assert torch.allclose(masked_mse(garbage, target, mask), base)
    manual = ((pred - target) ** 2).mean(-1)[mask].mean()
    assert torch.allclose(base, manual)


def test_info_nce_prefers_aligned_pairs_and_is_symmetric():
    g = seeded()
    a = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1)
    b = torch.nn.functional.normalize(a + 0.05 * torch.randn(8, 16, generator=g), dim=-1)
    shuffled = b[torch.roll(torch.arange(8), 1)]
    aligned = info_nce(a, b, 0.07)
    assert aligned < info_nce(a, shuffled, 0.07)
    assert aligned < 0.1 * torch.log(torch.tensor(8.0))
    assert torch.allclose(info_nce(a, b, 0.07), info_nce(b, a, 0.07))
    assert torch.allclose(info_nce(a, shuffled, 0.07), info_nce(shuffled, a, 0.07))


def test_loss_combines_the_terms_and_temperature_is_learnable(tiny, pretrain):
    expected = pretrain["rec_video"] + pretrain["rec_audio"] + tiny.cfg.contrastive_weight * pretrain["contrastive"]
    assert torch.allclose(pretrain["loss"], expected)
    assert torch.isclose(pretrain["temperature"], torch.tensor(0.07))
    for key in ("video_proj", "audio_proj"):
        assert pretrain[key].shape == (B, tiny.cfg.proj_dim)
        assert torch.allclose(pretrain[key].norm(dim=-1), torch.ones(B), atol=1e-5)
    assert pretrain["temperature_grad"] != 0


# ---- learning ---------------------------------------------------------------------------------


def test_tiny_overfits_a_fixed_batch():
    """Pure noise is unpredictable, so masked patches would stay at the per-patch variance whatever
    the model; random textures tiled over space and time make them predictable from the visible ones."""
    torch.manual_seed(0)
    g = seeded(0)
    video = torch.randn(4, 3, 2, 16, 16, generator=g).repeat(1, 1, 8, 10, 10)
    video = video + 0.1 * torch.randn(4, 3, 16, 160, 160, generator=g)
    audio = torch.randn(4, 16, 16, generator=g).repeat(1, 16, 8) + 0.1 * torch.randn(4, 256, 128, generator=g)
    model = AVMAE(config_for("tiny")).train()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        out = model(video, audio, generator=seeded(1))  # the same masks every step
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
        if losses[-1] < 0.7 * losses[0]:
            break
    assert losses[-1] < 0.7 * losses[0], losses


def test_cpu_bfloat16_autocast_runs(tiny):
    video, audio = clips()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny(video, audio, generator=seeded())
        feats = tiny.encode(video[:1], audio[:1], unimodal=False)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    assert torch.isfinite(feats["joint"].float()).all()


# ---- checkpoints ------------------------------------------------------------------------------


def test_save_load_round_trip(tiny, pretrain, tmp_path):
    folder = save(tiny, tmp_path / "ckpt")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert AVConfig.model_validate(json.loads((folder / "config.json").read_text())) == tiny.cfg
    loaded = load(folder).eval()
    assert loaded.cfg == tiny.cfg
    with torch.no_grad():
        out = loaded(pretrain["video"], pretrain["audio"], generator=seeded())
        a, b = tiny.encode(audio=pretrain["audio"]), loaded.encode(audio=pretrain["audio"])
    for key in ("loss", "pred_video", "pred_audio", "video_proj", "audio_proj"):
        assert torch.equal(out[key], pretrain[key]), key
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_load_names_missing_and_unexpected_keys(tiny, tmp_path):
    folder = save(tiny, tmp_path / "ckpt")
    state = load_file(str(folder / "model.safetensors"))
    state["norm.weight_renamed"] = state.pop("norm.weight")
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ModelError) as err:
        load(folder)
    message = str(err.value)
    assert "missing keys: norm.weight" in message and "unexpected keys: norm.weight_renamed" in message


def test_load_refuses_a_checkpoint_of_another_size(tiny, tmp_path):
    folder = save(tiny, tmp_path / "ckpt")
    (folder / "config.json").write_text(config_for("tiny", decoder_dim=32).model_dump_json())
    with pytest.raises(ModelError, match=r"wrong shapes: .*decoder_embed\.weight \(64, 128\) != \(32, 128\)"):
        load(folder)
    with pytest.raises(ModelError, match="nowhere is not a model folder: it needs config.json and model.safetensors"):
        load(tmp_path / "nowhere")


# ---- features ---------------------------------------------------------------------------------


def test_encode_shapes(tiny, pretrain):
    video, audio = pretrain["video"], pretrain["audio"]
    d, p = tiny.cfg.dim, tiny.cfg.proj_dim
    with torch.no_grad():
        v = tiny.encode(video=video)
        a = tiny.encode(audio=audio)
        j = tiny.encode(video, audio)
        j_only = tiny.encode(video[:1], audio[:1], unimodal=False)
        tokens = tiny.encode(video[:1], audio[:1], pool="tokens")
    assert set(v) == {"video", "video_proj"} and v["video"].shape == (B, d) and v["video_proj"].shape == (B, p)
    assert set(a) == {"audio", "audio_proj"} and a["audio"].shape == (B, d) and a["audio_proj"].shape == (B, p)
    assert set(j) == {"video", "video_proj", "audio", "audio_proj", "joint", "joint_video", "joint_audio"}
    assert j["joint"].shape == j["joint_video"].shape == j["joint_audio"].shape == (B, d)
    assert torch.allclose(j["video"], v["video"], atol=1e-5)  # the unimodal pass does not see the audio
    assert not torch.allclose(j["joint_video"], v["video"], atol=1e-3)  # the joint pass does
    assert set(j_only) == {"joint", "joint_video", "joint_audio"}
    assert torch.allclose(j_only["joint"], j["joint"][:1], atol=1e-5)
    assert tokens["video"].shape == (1, 800, d) and tokens["audio"].shape == (1, 128, d)
    assert tokens["joint"].shape == (1, 928, d)
    with pytest.raises(ValueError):
        tiny.encode()


def test_modality_specific_layers():
    shared = AVMAE(config_for("tiny"))
    model = AVMAE(config_for("tiny", modality_specific_layers=1))
    assert len(model.video_blocks) == len(model.audio_blocks) == 1 and len(model.blocks) == 3
    block = sum(p.numel() for p in model.video_blocks.parameters())
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in shared.parameters()) + block
    video, audio = clips()
    out = model(video, audio, generator=seeded())
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is not None for p in model.video_blocks.parameters())
    assert all(p.grad is not None for p in model.audio_blocks.parameters())
    with torch.no_grad():
        feats = model.encode(video[:1], audio[:1])
    assert feats["joint"].shape == (1, 128) and feats["video"].shape == (1, 128)
