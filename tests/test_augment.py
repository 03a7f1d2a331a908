"""Raw view batches to model batches (vaemo.data.augment) on the CPU, and step metrics sent in the background."""

import mlflow
import numpy as np
import pytest
import torch
from torchvision.io import decode_jpeg, encode_jpeg

from vaemo.config import PretrainConfig
from vaemo.data.augment import materialise
from vaemo.data.config import DataConfig
from vaemo.data.samples import normalise_fbank, spec_mask, video_tensor
from vaemo.tracking import StepMetrics

CFG = DataConfig(frames=4, frame_stride=4, audio_frames=64, image_size=32)
CPU = torch.device("cpu")


def clip(seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Four JPEG frames (40 x 48, smooth so they survive the encoding) and a (64, 128) fbank."""
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.interpolate(torch.rand(1, 3, 5, 6, generator=g), size=(40, 48), mode="bilinear")[0]
    frames = [encode_jpeg((base.roll(i, dims=-1) * 255).to(torch.uint8)) for i in range(4)]
    return frames, torch.randn(64, 128, generator=g) * 4 - 4


def raw_batch(clips: dict[str, int], seeds: list[int]) -> dict:
    parts = [clip(s) for s in clips.values()]
    return {"jpeg": [p[0] for p in parts], "fbank": torch.stack([p[1] for p in parts]),
            "seed": torch.tensor(seeds, dtype=torch.int64), "clip_id": list(clips),
            "window": torch.arange(2 * len(clips), dtype=torch.float64).reshape(-1, 2), "skipped": 1,
            "skipped_clips": ["bad"], "shard_losses": []}


def reference(raw: dict, index: int, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One clip as the per-clip path makes it: decoded frames through video_tensor, then the masks."""
    rng = np.random.default_rng(int(raw["seed"][index])) if train else None
    frames = torch.stack([decode_jpeg(j) for j in raw["jpeg"][index]]).permute(0, 2, 3, 1).numpy()
    video = video_tensor(frames, CFG, rng)
    audio = normalise_fbank(raw["fbank"][index].clone(), CFG)
    return video, spec_mask(audio, CFG, rng) if train else audio


def test_eval_is_the_centre_crop_and_the_normalised_fbank_exactly():
    raw = raw_batch({"a": 1, "b": 2}, [5, 6])
    out = materialise(raw, CFG, device=CPU, train=False, repeat_aug=3)  # no repeats outside training
    assert out["video"].shape == (2, 3, 4, 32, 32) and out["audio"].shape == (2, 64, 128)
    for i in range(2):
        video, audio = reference(raw, i, train=False)
        assert torch.equal(out["video"][i], video) and torch.equal(out["audio"][i], audio)
    assert out["clip_id"] == ["a", "b"] and out["skipped"] == 1 and out["skipped_clips"] == ["bad"]
    assert "jpeg" not in out and "seed" not in out


def test_train_draws_follow_the_clip_seed_only():
    raw = raw_batch({"a": 1, "b": 2}, [5, 6])
    out = materialise(raw, CFG, device=CPU, train=True)
    for i in range(2):  # the per-clip path's draws, in its order: crop, flip, masks
        video, audio = reference(raw, i, train=True)
        assert torch.equal(out["video"][i], video) and torch.equal(out["audio"][i], audio)
    assert (out["audio"] == 0).any()  # masks were applied
    other = materialise(raw_batch({"c": 3, "a": 1}, [9, 5]), CFG, device=CPU, train=True)
    assert torch.equal(other["video"][1], out["video"][0]) and torch.equal(other["audio"][1], out["audio"][0])
    reseeded = materialise(raw_batch({"a": 1}, [7]), CFG, device=CPU, train=True)
    assert not torch.equal(reseeded["video"][0], out["video"][0])
    eval_video = materialise(raw, CFG, device=CPU, train=False)["video"]
    assert not torch.equal(eval_video[0], out["video"][0])


def test_repeat_aug_gives_k_draws_of_each_decoded_clip():
    raw = raw_batch({"a": 1, "b": 2}, [5, 6])
    once = materialise(raw, CFG, device=CPU, train=True)
    out = materialise(raw, CFG, device=CPU, train=True, repeat_aug=3)
    assert out["video"].shape == (6, 3, 4, 32, 32) and out["audio"].shape == (6, 64, 128)
    assert out["clip_id"] == ["a", "a", "a", "b", "b", "b"]
    assert torch.equal(out["window"], raw["window"].repeat_interleave(3, dim=0))
    assert torch.equal(out["video"][0], once["video"][0]) and torch.equal(out["video"][3], once["video"][1])
    for first in (0, 3):
        rows = [out["video"][first + r] for r in range(3)]
        assert not any(torch.equal(rows[i], rows[j]) for i in range(3) for j in range(i + 1, 3))
    with pytest.raises(ValueError, match="repeat_aug"):
        materialise(raw, CFG, device=CPU, train=True, repeat_aug=0)
    with pytest.raises(ValueError, match="needs the training view"):
        PretrainConfig(data={"repeat_aug": 2}, view={"enabled": False})


def test_step_metrics_all_arrive_also_when_training_fails(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("steps", artifact_location=str(tmp_path / "a"))).info.run_id
    with pytest.raises(KeyError), StepMetrics(uri, run_id) as log_step:
        for step in range(1, 41):
            log_step(step, {"loss": 1.0 / step, "lr": 0.1})
        raise KeyError("a failing training step")
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(1, 41))
    assert [m.value for m in client.get_metric_history(run_id, "lr")] == [0.1] * 40
    assert log_step.lost == 0 and log_step.error is None
