"""Test-set accounting: every test video of the protocol is either scored or counted with why it was not."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from collections import Counter
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from tests.conftest import cli_env, ingest_folder, vaemo_command
from tests.test_eval import TIMEOUT, fake_ingest
from vaemo.eval import make_folds
from vaemo.eval.accounting import NOT_DECODABLE, account

# The generated labels as CREMA-D emotions, so the official crema-d protocol (5 folds by fold number) applies.
AS_CREMA_D = {"warm": "anger", "cold": "disgust", "pale": "fear"}
# Test videos that cannot ingest: (path, label, speaker, fold) -> the status ingest gives them.
BROKEN = {
    ("bad/no_face.mp4", "anger", "spk00", 1): "no_face",
    ("bad/silent.mp4", "disgust", "spk01", 1): "silent_audio",
    ("bad/no_audio.mp4", "fear", "spk00", 2): "no_audio_stream",
    ("bad/not_a_video.mp4", "anger", "spk01", 4): "not_a_video",
}
UNDECODABLE_FOLD = 3  # one ingested clip of this fold is made undecodable in its shard


def expected_line(videos: int, lost: list[str], what: str) -> str:
    line = f"scored {videos - len(lost)} of {videos} {what}"
    if lost:
        counts = sorted(Counter(lost).items(), key=lambda item: (-item[1], item[0]))
        line += f"; {len(lost)} not evaluated: " + ", ".join(f"{n} {status}" for status, n in counts)
    return line


def break_clip_in_shard(ingest_dir: Path, clip_id: str) -> None:
    """Rewrite the shard holding clip_id with garbage in place of its video (a sound tar, an unreadable clip)."""
    for shard in sorted((ingest_dir / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        if not any(m.name == f"{clip_id}.mp4" for m, _ in members):
            continue
        with tarfile.open(shard, "w") as tar:
            for member, data in members:
                data = b"not an mp4 at all" if member.name == f"{clip_id}.mp4" else data
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
        return
    raise AssertionError(f"{clip_id} is in no shard")


@pytest.fixture(scope="module")
def broken_test_set(tmp_path_factory) -> tuple[Path, dict[int, tuple[int, list[str]]], str]:
    """(ingest folder, fold -> (its test videos, the statuses of those that cannot be scored), the undecodable one)."""
    from vaemo import synth
    from vaemo.config import IngestConfig

    source = tmp_path_factory.mktemp("accounting-src")
    labels = synth.labelled_corpus(source, classes=3, speakers=2, clips_per_class=2, seed=4)
    good = pd.read_csv(labels)
    good["label"] = good["label"].map(AS_CREMA_D)
    good["fold"] = [i % 5 + 1 for i in range(len(good))]  # every fold tests a few clips of each speaker
    synth.talking_face_video(source / "bad/no_face.mp4", faces=0, seed=11)
    synth.talking_face_video(source / "bad/silent.mp4", audio="silent", seed=12)
    synth.talking_face_video(source / "bad/no_audio.mp4", audio="none", seed=13)
    (source / "bad/not_a_video.mp4").write_text("only a name that looks like a video\n", encoding="utf-8")
    (source / "unlabelled.mp4").write_text("no label: in no protocol's test set\n", encoding="utf-8")
    bad = pd.DataFrame([key for key in BROKEN], columns=["path", "label", "speaker", "fold"])
    pd.concat([good, bad]).to_csv(labels, index=False)

    ingest_dir = tmp_path_factory.mktemp("accounting-ingest")
    cfg = IngestConfig()
    stats, _ = ingest_folder(source, ingest_dir, cfg, labels)
    assert stats["status_counts"] == {"ok": len(good), "not_a_video": 2, "no_face": 1, "silent_audio": 1,
                                      "no_audio_stream": 1}
    clips = pd.read_parquet(ingest_dir / "clips.parquet")
    victim = sorted(good.loc[good["fold"] == UNDECODABLE_FOLD, "path"])[0]
    break_clip_in_shard(ingest_dir, clips.loc[clips["source"] == victim, "clip_id"].item())

    lost: dict[int, list[str]] = {fold: [] for fold in range(1, 6)}
    for (_, _, _, fold), status in BROKEN.items():
        lost[fold].append(status)
    lost[UNDECODABLE_FOLD].append(NOT_DECODABLE)
    videos = Counter(good["fold"]) + Counter(key[3] for key in BROKEN)
    return ingest_dir, {fold: (videos[fold], statuses) for fold, statuses in lost.items()}, victim


def test_results_report_and_mlflow_count_every_test_video_not_evaluated(broken_test_set, tmp_path):
    from vaemo.model import av

    ingest_dir, expected, victim = broken_test_set
    model = av.save(av.AVMAE(av.config_for("tiny")), tmp_path / "model")
    work, out = tmp_path / "work", tmp_path / "eval"
    config = tmp_path / "pipelines.yaml"
    config.write_text("stages:\n  evaluate:\n    probe: {epochs: 3}\n    tsne_clips: 0\n")
    done = subprocess.run(
        vaemo_command("--config", str(config), "--work-dir", str(work), "evaluate", "--model", str(model), "--data",
                      str(ingest_dir), "--protocol", "crema-d", "--mode", "probe", "--out", str(out)),
        capture_output=True, text=True, timeout=TIMEOUT, env=cli_env(work),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    total_videos = sum(videos for videos, _ in expected.values())
    all_lost = [status for _, statuses in expected.values() for status in statuses]
    assert total_videos == 16 and len(all_lost) == 5
    assert expected_line(total_videos, all_lost, "test videos") in done.stdout

    results = json.loads((out / "results.json").read_text())
    test_set = results["test_set"]
    assert results["data"]["official_folds"] and test_set["manifest"] == str(ingest_dir / "manifest.parquet")
    assert [f["fold"] for f in test_set["folds"]] == [1, 2, 3, 4, 5]
    for fold in test_set["folds"]:
        videos, lost = expected[fold["fold"]]
        assert (fold["test_videos"], fold["scored"], fold["not_evaluated"]) == (videos, videos - len(lost), len(lost))
        assert fold["reasons"] == dict(Counter(lost))
        assert results["folds"][fold["fold"] - 1]["sizes"]["test"] == fold["scored"]  # the figures' own test size
    assert test_set["total"] == {"test_videos": total_videos, "scored": total_videos - 5, "scored_video_only": 0,
                                 "not_evaluated": 5, "reasons": dict(Counter(all_lost))}
    listed = {(e["fold"], e["path"]): e for e in test_set["not_evaluated"]}
    assert set(listed) == {(key[3], key[0]) for key in BROKEN} | {(UNDECODABLE_FOLD, victim)}
    for key, status in BROKEN.items():
        entry = listed[(key[3], key[0])]
        assert entry["status"] == status and entry["reason"]  # the ingest manifest's reason, as it was written
    assert listed[(1, "bad/silent.mp4")]["reason"].startswith("the audio track is silent")
    assert listed[(UNDECODABLE_FOLD, victim)]["status"] == NOT_DECODABLE and test_set["no_fold"] == 0

    report = (out / "report.md").read_text()
    assert f"**{expected_line(total_videos, all_lost, 'test videos in all').capitalize()}.**" in report
    for fold, (videos, lost) in expected.items():
        assert f"- {expected_line(videos, lost, f'test videos of fold {fold}')}\n" in report
    assert report.index("## Test set") < report.index("## Our results")  # before any figure
    assert "| 4 | bad/not_a_video.mp4 | not_a_video |" in report and "unlabelled.mp4" not in report

    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    metrics = mlflow.search_runs(experiment_names=["vaemo"], output_format="list")[0].data.metrics
    assert metrics["test_set.test_videos"] == total_videos and metrics["test_set.scored"] == total_videos - 5
    assert metrics["test_set.not_evaluated"] == 5 and metrics["test_set.no_fold"] == 0
    assert {k: v for k, v in metrics.items() if k.startswith("test_set.reasons.")} == {
        f"test_set.reasons.{status}": n for status, n in Counter(all_lost).items()
    }
    for fold, (videos, lost) in expected.items():
        assert metrics[f"fold{fold}.test_set.test_videos"] == videos
        assert metrics[f"fold{fold}.test_set.not_evaluated"] == len(lost)
        for status, n in Counter(lost).items():
            assert metrics[f"fold{fold}.test_set.reasons.{status}"] == n


def manifest(folder: Path, rows: list[dict]) -> None:
    """Beside the clips of fake_ingest: a manifest of those clips (ok) and of the videos in ``rows``."""
    clips = pd.read_parquet(folder / "clips.parquet")
    ok = [{"path": c["source"], "status": "ok", "reason": "", "label": c["label"], "speaker": c["speaker"],
           "fold": c["fold"]} for c in clips.to_dict("records")]
    failed = [{"status": "no_face", "reason": "no face found", "speaker": None, "fold": None, **row} for row in rows]
    pd.DataFrame(ok + failed).to_parquet(folder / "manifest.parquet", index=False)


def scored_all_but(plan, lost: set[str]) -> dict[int, list[str]]:
    return {f.number: [c for c in f.test if c not in lost] for f in plan.folds}


def test_which_fold_claims_a_video_without_clips(tmp_path):
    from vaemo.ingest.adapters.mafw import EMOTIONS

    # Official split files, only the first 2 of 5 folds run: videos of folds 3-5 are no part of this test set.
    rows = [{"label": label, "fold": fold, "dataset": "mafw", "source": f"{fold}_{label}_{i}.mp4"}
            for fold in range(1, 6) for label in EMOTIONS[:2] for i in range(2)]
    data = fake_ingest(tmp_path / "mafw", rows)
    manifest(data, [{"path": "x1.mp4", "label": "fear", "fold": 1, "status": "no_audio_stream"},
                    {"path": "x2.mp4", "label": "anger", "fold": 2},
                    {"path": "x4.mp4", "label": "anger", "fold": 4},
                    {"path": "unlabelled.mp4", "label": None, "fold": 1},
                    {"path": "other.mp4", "label": "calm", "fold": 1}])  # not a mafw class
    plan = make_folds(data, "mafw", folds=2)
    undecodable = plan.folds[1].test[0]
    got = account(data, plan, scored_all_but(plan, {undecodable}))
    assert [(f["test_videos"], f["scored"], f["reasons"]) for f in got["folds"]] == [
        (5, 4, {"no_audio_stream": 1}), (5, 3, {"no_face": 1, NOT_DECODABLE: 1})
    ]
    assert got["total"]["test_videos"] == 10 and got["total"]["not_evaluated"] == 3 and got["no_fold"] == 0

    # Folds of speakers: a video goes with its speaker; one whose speaker has no clip at all is in no fold.
    rows = [{"label": label, "speaker": f"s{s}", "source": f"s{s}/{label}_{i}.mp4"}
            for s in range(3) for label in ("a", "b") for i in range(2)]
    data = fake_ingest(tmp_path / "speakers", rows)
    manifest(data, [{"path": "s1/c.mp4", "label": "a", "speaker": "s1"},
                    {"path": "s9/a.mp4", "label": "b", "speaker": "s9", "status": "silent_audio"}])
    plan = make_folds(data, "generic", folds=3)
    got = account(data, plan, scored_all_but(plan, set()))
    claimed = next(f for f in plan.folds if "s1" in f.test_speakers).number
    assert [f["not_evaluated"] for f in got["folds"]] == [int(f.number == claimed) for f in plan.folds]
    assert got["no_fold"] == 1 and got["total"] == {"test_videos": 14, "scored": 12, "scored_video_only": 0,
                                                    "not_evaluated": 2, "reasons": {"no_face": 1, "silent_audio": 1}}
    assert got["not_evaluated"][-1] == {"fold": None, "path": "s9/a.mp4", "status": "silent_audio",
                                        "reason": "no face found"}

    # Stratified folds (no speakers): a video without a clip is counted in the total only.
    rows = [{"label": label, "source": f"{label}_{i}.mp4"} for label in ("x", "y") for i in range(4)]
    data = fake_ingest(tmp_path / "plain", rows)
    manifest(data, [{"path": "z.mp4", "label": "x"}])
    plan = make_folds(data, "generic", folds=2)
    got = account(data, plan, scored_all_but(plan, set()))
    assert sum(f["test_videos"] for f in got["folds"]) == 8 and got["total"]["test_videos"] == 9
    assert got["no_fold"] == 1 and got["total"]["reasons"] == {"no_face": 1}

    # Without a manifest only what did not decode can be counted, and the result says so.
    (data / "manifest.parquet").unlink()
    got = account(data, plan, scored_all_but(plan, {plan.folds[0].test[0]}))
    assert got["manifest"] is None and got["total"] == {"test_videos": 8, "scored": 7, "scored_video_only": 0,
                                                        "not_evaluated": 1, "reasons": {NOT_DECODABLE: 1}}
