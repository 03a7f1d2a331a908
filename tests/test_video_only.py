"""Video-only clips: a labelled file with a face but no usable audio, scored by its video alone, never trained on."""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from tests.conftest import cli_env, ingest_folder, vaemo_command
from tests.test_config import BEFORE_SPEED_UPS
from tests.test_eval import TIMEOUT
from tests.test_eval_accounting import AS_CREMA_D
from vaemo.config import EvaluateConfig, IngestConfig

# Test videos without usable audio: (path, label, speaker, fold) -> what ingest finds. The first two have a face.
SILENT = {
    ("bad/silent.mp4", "disgust", "spk01", 1): "silent_audio",
    ("bad/no_audio.mp4", "fear", "spk00", 2): "no_audio_stream",
}
FACELESS = ("bad/faceless_no_audio.mp4", "anger", "spk01", 3)


def test_the_option_changes_the_digest_only_when_on():
    before = IngestConfig(**BEFORE_SPEED_UPS)
    assert before.processing_digest() == "18e68a16f02acbf0"  # folders made before the option keep theirs
    assert "video_only_clips" not in IngestConfig().digest_view()
    assert before.model_copy(update={"video_only_clips": True}).processing_digest() not in ("18e68a16f02acbf0", "")
    assert IngestConfig(video_only_clips=True).digest_view()["video_only_clips"] is True


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> tuple[Path, pd.DataFrame, pd.DataFrame]:
    """(ingest folder made with video_only_clips, its clips table, its manifest)."""
    from vaemo import synth

    source = tmp_path_factory.mktemp("video-only-src")
    labels = synth.labelled_corpus(source, classes=3, speakers=2, clips_per_class=2, seed=4)
    good = pd.read_csv(labels)
    good["label"] = good["label"].map(AS_CREMA_D)
    good["fold"] = [i % 5 + 1 for i in range(len(good))]
    synth.talking_face_video(source / "bad/silent.mp4", audio="silent", seed=12)
    synth.talking_face_video(source / "bad/no_audio.mp4", audio="none", seed=13)
    synth.talking_face_video(source / FACELESS[0], faces=0, audio="none", seed=14)
    bad = pd.DataFrame([*SILENT, FACELESS], columns=["path", "label", "speaker", "fold"])
    pd.concat([good, bad]).to_csv(labels, index=False)

    ingest_dir = tmp_path_factory.mktemp("video-only-ingest")
    cfg = IngestConfig(video_only_clips=True)
    stats, _ = ingest_folder(source, ingest_dir, cfg, labels)
    assert stats["status_counts"] == {"ok": len(good) + 2, "no_face": 1}
    return ingest_dir, pd.read_parquet(ingest_dir / "clips.parquet"), pd.read_parquet(ingest_dir / "manifest.parquet")


def flagged_ids(clips: pd.DataFrame) -> set[str]:
    return set(clips.loc[clips["video_only"].notna(), "clip_id"])


def test_a_face_without_usable_audio_becomes_a_flagged_clip_without_audio(ingested):
    ingest_dir, clips, manifest = ingested
    rows = manifest.set_index("path")
    for (path, *_), status in SILENT.items():
        assert rows.at[path, "status"] == "ok" and rows.at[path, "n_clips"] == 1
        assert rows.at[path, "reason"].startswith(f"video-only clips, no usable audio ({status}: ")
        clip = clips[clips["source"] == path].iloc[0]
        assert clip["video_only"].startswith(f"{status}: ") and clip["audio_source"] is None
    assert "(silent_audio: the audio track is silent (peak " in rows.at["bad/silent.mp4", "reason"]
    assert rows.at[FACELESS[0], "status"] == "no_face"  # no face either: as without the option
    assert clips["video_only"].notna().sum() == 2
    members: dict[str, set[str]] = {}
    for shard in (ingest_dir / "shards").glob("*.tar"):
        with tarfile.open(shard) as tar:
            for name in tar.getnames():
                key, ext = name.split(".", 1)
                members.setdefault(key, set()).add(ext)
    assert all(members[c] == {"mp4", "json"} for c in flagged_ids(clips))  # no audio stored, not even silence
    assert all(members[c] == {"mp4", "json", "flac"} for c in set(clips["clip_id"]) - flagged_ids(clips))


def test_training_stages_never_use_a_clip_without_audio(ingested, tmp_path):
    from vaemo.caption.select import eligible
    from vaemo.config import CaptionConfig, PretrainConfig
    from vaemo.train.pretrain import pretrain

    ingest_dir, clips, _ = ingested
    flagged = flagged_ids(clips)
    metrics = pretrain(ingest_dir, tmp_path / "model", PretrainConfig(
        steps=3, batch_size=4, num_workers=0, warmup_steps=1, eval_clips=4, checkpoint_every=100))
    seen = json.loads(next((tmp_path / "model").rglob("rank-0.json")).read_text())["clips_seen"]
    assert seen and not flagged & set(seen)
    assert metrics["skipped_samples"] >= len(flagged)  # passed over and counted, never silently
    assert not flagged & set(eligible(clips, CaptionConfig())["clip_id"])  # the captioning model must hear them


def evaluate_in_process(ingest_dir: Path, model: Path, out: Path, **settings) -> dict:
    from vaemo.eval import evaluate, prepare

    cfg = EvaluateConfig.model_validate(
        {"protocol": "crema-d", "mode": "probe", "probe": {"epochs": 3}, "tsne_clips": 0, **settings})
    return evaluate(prepare(model, ingest_dir, cfg), out)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from vaemo.model import av

    return av.save(av.AVMAE(av.config_for("tiny")), tmp_path_factory.mktemp("video-only-model") / "model")


def test_without_the_fallback_clips_without_audio_count_as_not_evaluated(ingested, tiny_model, tmp_path):
    ingest_dir, _, _ = ingested
    test_set = evaluate_in_process(ingest_dir, tiny_model, tmp_path / "eval")["test_set"]
    assert test_set["total"]["reasons"] == {"video_only": 2, "no_face": 1}
    assert test_set["total"]["scored_video_only"] == 0 and test_set["total"]["not_evaluated"] == 3
    listed = {e["path"]: e for e in test_set["not_evaluated"]}
    for (path, _, _, fold), status in SILENT.items():
        assert listed[path]["status"] == "video_only" and listed[path]["fold"] == fold
        assert listed[path]["reason"].startswith(f"ingested without audio ({status}: ")


def test_the_fallback_needs_probe_mode_and_av_input(ingested, tiny_model, tmp_path):
    from vaemo.errors import VaemoError

    for settings in ({"mode": "finetune"}, {"modality": "video"}):
        with pytest.raises(VaemoError, match="video_only_fallback needs mode probe and modality av"):
            evaluate_in_process(ingested[0], tiny_model, tmp_path, video_only_fallback=True, **settings)


def test_with_the_fallback_clips_without_audio_are_scored_by_their_video(ingested, tiny_model, tmp_path):
    ingest_dir, clips, _ = ingested
    work, out = tmp_path / "work", tmp_path / "eval"
    config = tmp_path / "pipelines.yaml"
    config.write_text("stages:\n  evaluate:\n    probe: {epochs: 3}\n    tsne_clips: 0\n"
                      "    video_only_fallback: true\n")
    done = subprocess.run(
        vaemo_command("--config", str(config), "--work-dir", str(work), "evaluate", "--model", str(tiny_model),
                      "--data", str(ingest_dir), "--protocol", "crema-d", "--mode", "probe", "--out", str(out)),
        capture_output=True, text=True, timeout=TIMEOUT, env=cli_env(work),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    line = f"scored {len(clips)} of {len(clips) + 1} test videos (2 video-only); 1 not evaluated: 1 no_face"
    assert line in done.stdout

    results = json.loads((out / "results.json").read_text())
    folds = {f["fold"]: f for f in results["test_set"]["folds"]}
    for (_, _, _, fold), _status in SILENT.items():
        assert folds[fold]["scored_video_only"] == 1 and "video_only" not in folds[fold]["reasons"]
        assert results["folds"][fold - 1]["sizes"]["test_video_only"] == 1
        assert results["folds"][fold - 1]["sizes"]["test"] == folds[fold]["scored"]  # merged into the fold's metrics
    assert results["test_set"]["total"]["scored_video_only"] == 2
    predictions = pd.read_csv(out / "predictions.csv").set_index("clip_id")
    assert set(predictions.index[predictions["input"] == "video"]) == flagged_ids(clips)
    assert set(predictions["input"]) == {"av", "video"}
    assert f"**{line.capitalize().replace('test videos', 'test videos in all')}.**" in (out / "report.md").read_text()

    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    metrics = mlflow.search_runs(experiment_names=["vaemo"], output_format="list")[0].data.metrics
    assert metrics["test_set.scored_video_only"] == 2 and metrics["fold1.test_set.scored_video_only"] == 1
