"""Benchmark evaluation: folds per protocol, honest validation, metrics, refusals, and the CLI end to end."""

from __future__ import annotations

import base64
import json
import re
import sqlite3
import subprocess
import tarfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from tests.conftest import cli_env, ingest_folder, vaemo_command
from vaemo.eval import EvaluationError, classification_metrics, make_folds, save_folds, summarise

TIMEOUT = 600


def fake_ingest(folder: Path, rows: list[dict]) -> Path:
    """An ingest folder holding only what fold planning reads: clips.parquet (and an empty shard)."""
    folder.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(
        [
            {"clip_id": f"{i:016x}_00000000_00002000", "dataset": "generic", "fold": None, "speaker": None, **row}
            for i, row in enumerate(rows)
        ]
    )
    table.to_parquet(folder / "clips.parquet", index=False)
    (folder / "shards").mkdir(exist_ok=True)
    with tarfile.open(folder / "shards" / "empty-000.tar", "w"):
        pass
    return folder


def speaker_rows(speakers: int, labels=("a", "b", "c"), per_class: int = 2) -> list[dict]:
    return [{"label": label, "speaker": f"s{s:02d}", "source": f"s{s:02d}/{label}_{i}.mp4"}
            for s in range(speakers) for label in labels for i in range(per_class)]


def speakers_of(plan, ids) -> set[str]:
    return set(plan.clips.loc[list(ids), "speaker"])


def test_speaker_folds_are_deterministic_subject_independent_and_validate_on_training_speakers(tmp_path):
    data = fake_ingest(tmp_path / "data", speaker_rows(10))
    plan = make_folds(data, "generic", folds=5, val_fraction=0.2, seed=3)
    again = make_folds(data, "generic", folds=5, val_fraction=0.2, seed=3)
    assert [(f.train, f.val, f.test) for f in plan.folds] == [(f.train, f.val, f.test) for f in again.folds]
    assert len(plan.folds) == 5 and "subject-independent" in plan.rule
    tested = [clip for fold in plan.folds for clip in fold.test]
    assert sorted(tested) == sorted(plan.clips.index)  # every clip is tested exactly once
    for fold in plan.folds:
        test, train, val = speakers_of(plan, fold.test), speakers_of(plan, fold.train), speakers_of(plan, fold.val)
        assert fold.validation_split == "speakers" and val and train
        assert not test & (train | val), f"fold {fold.number}: a test speaker is also trained or validated on"
        assert not train & val  # validation holds out whole training speakers
        assert set(fold.train) | set(fold.val) | set(fold.test) == set(plan.clips.index)

    paths = save_folds(plan, tmp_path / "out")
    saved = pd.read_csv(paths[0])
    assert list(saved.columns) == ["clip_id", "source", "speaker", "label", "split"]
    assert not any(Path(p).is_absolute() for p in saved["source"])  # relative to the corpus root
    assert set(saved.loc[saved["split"] == "test", "clip_id"]) == set(plan.folds[0].test)


def test_official_crema_d_folds_and_stratified_folds_without_speakers(tmp_path):
    from vaemo.ingest.adapters.cremad import EMOTIONS, fold_of

    actors = [1001, 1010, 1019, 1030, 1037, 1050, 1056, 1070, 1075, 1091]
    rows = [
        {"label": emotion, "speaker": str(actor), "fold": fold_of(actor), "dataset": "crema-d",
         "source": f"VideoFlash/{actor}_DFA_{code}_XX.flv"}
        for actor in actors
        for code, emotion in EMOTIONS.items()
    ]
    plan = make_folds(fake_ingest(tmp_path / "crema", rows), "crema-d")
    assert plan.official and plan.classes == list(EMOTIONS.values())
    assert [sorted(speakers_of(plan,
                               f.test)) for f in plan.folds] == [["1001", "1010"], ["1019", "1030"], ["1037", "1050"],
                                                                 ["1056", "1070"], ["1075", "1091"]]
    assert all(not speakers_of(plan, f.test) & speakers_of(plan, f.train + f.val) for f in plan.folds)
    custom = make_folds(tmp_path / "crema", "crema-d", folds=2)
    assert not custom.official and len(custom.folds) == 2

    no_speakers = [{"label": label, "source": f"{label}_{i}.mp4"} for label in ("x", "y") for i in range(6)]
    plan = make_folds(fake_ingest(tmp_path / "plain", no_speakers), "generic", folds=3, seed=1)
    assert "stratified" in plan.rule and plan.folds[0].validation_split == "clips"
    for fold in plan.folds:
        assert plan.clips.loc[fold.test, "label"].value_counts().to_dict() == {"x": 2, "y": 2}
        assert not set(fold.val) & set(fold.test) and set(fold.val) <= set(plan.clips.index) - set(fold.test)


def test_too_small_sets_get_a_clear_error_with_counts(tmp_path):
    # The shape of the CREMA-D clips in the shared media: one actor, one clip per emotion.
    from vaemo.ingest.adapters.cremad import EMOTIONS

    rows = [{"label": emotion, "speaker": "1001", "fold": 1, "dataset": "crema-d", "source": f"1001_DFA_{code}_XX.flv"}
            for code, emotion in EMOTIONS.items()]
    data = fake_ingest(tmp_path / "one-actor", rows)
    for folds in (None, 2):
        with pytest.raises(EvaluationError) as err:
            make_folds(data, "crema-d", folds=folds)
        message = str(err.value)
        assert "1 speaker (1001)" in message and "6 labelled clips" in message
        assert "clips per class: anger 1, disgust 1, fear 1, happy 1, neutral 1, sad 1" in message
    few = fake_ingest(tmp_path / "few", [{"label": "x", "source": "a.mp4"}, {"label": "x", "source": "b.mp4"},
                                         {"label": "y", "source": "c.mp4"}, {"label": "y", "source": "d.mp4"}])
    with pytest.raises(EvaluationError, match=r"3 stratified folds need at least 3 clips in every class.*x 2, y 2"):
        make_folds(few, "generic", folds=3)
    with pytest.raises(EvaluationError, match=r"labels \['x', 'y'\] that the crema-d protocol does not have"):
        make_folds(few, "crema-d")

    from vaemo.model import av

    model = av.save(av.AVMAE(av.config_for("tiny")), tmp_path / "model")
    done = subprocess.run(
        vaemo_command("--work-dir", str(tmp_path / "work"), "evaluate", "--model", str(model), "--data", str(data),
                      "--protocol", "crema-d", "--mode", "probe", "--out", str(tmp_path / "out"), "--folds", "2"),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=cli_env(tmp_path / "work"),
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().startswith("vaemo: error: crema-d: 2 subject-independent folds need at least 2 speakers")
    assert len(done.stderr.strip().splitlines()) == 1


def test_metrics_against_hand_computed_values():
    # true 0 0 0 1 1 2, predicted 0 0 1 1 2 2: recall 2/3, 1/2, 1; precision 1, 1/2, 1/2
    got = classification_metrics([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2], ["a", "b", "c"])
    assert got["uar"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert got["war"] == pytest.approx(4 / 6)
    assert got["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)  # F1 = 2PR / (P + R)
    assert got["per_class_recall"] == pytest.approx({"a": 2 / 3, "b": 0.5, "c": 1.0})
    assert got["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    # A class absent from the test labels has no recall and does not count in UAR.
    absent = classification_metrics([0, 0, 1, 1], [0, 1, 1, 2], ["a", "b", "c"])  # recall a 1/2, b 1/2
    assert absent["uar"] == pytest.approx(0.5) and absent["per_class_recall"]["c"] is None
    assert absent["macro_f1"] == pytest.approx((2 / 3 + 0.5) / 2)  # a: P 1, R 1/2; b: P 1/2, R 1/2
    over = summarise([got, absent], ["a", "b", "c"])
    assert over["uar"] == pytest.approx((got["uar"] + 0.5) / 2)
    assert over["uar_std"] == pytest.approx(np.std([got["uar"], 0.5], ddof=1))
    assert over["per_class_recall"]["c"] == pytest.approx(1.0)  # only the fold that has the class


def test_zero_shot_needs_a_text_aligned_model(tmp_path):
    from vaemo.config import EvaluateConfig
    from vaemo.eval import prepare
    from vaemo.eval.zeroshot import zero_shot_predict
    from vaemo.model import av

    model = av.save(av.AVMAE(av.config_for("tiny")), tmp_path / "model")
    data = fake_ingest(tmp_path / "data", speaker_rows(4))
    with pytest.raises(EvaluationError, match="needs a Stage 2 \\(text-aligned\\) model"):
        prepare(model, data, EvaluateConfig(mode="zeroshot"))
    predicted, similarity = zero_shot_predict(np.array([[1.0, 0.1], [0.0, 2.0]]), np.array([[1.0, 0.0], [0.0, 1.0]]))
    assert predicted.tolist() == [0, 1] and similarity.shape == (2, 2)


# ---- end to end on generated media ----------------------------------------------------------

SPEAKERS, CLIPS_PER_CLASS = 3, 2


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> tuple[Path, Path]:
    """(ingest folder, Stage 1 model) of a generated set whose label changes both the face and the voice."""
    from vaemo import synth
    from vaemo.config import IngestConfig, PretrainConfig
    from vaemo.train.pretrain import pretrain

    source = tmp_path_factory.mktemp("labelled-src")
    labels = synth.labelled_corpus(source, classes=3, speakers=SPEAKERS, clips_per_class=CLIPS_PER_CLASS, seed=2)
    ingest_dir = tmp_path_factory.mktemp("labelled-ingest")
    cfg = IngestConfig()
    stats, _ = ingest_folder(source, ingest_dir, cfg, labels)
    assert stats["status_counts"] == {"ok": 3 * SPEAKERS * CLIPS_PER_CLASS}
    model = tmp_path_factory.mktemp("labelled-model")
    pretrain(ingest_dir, model,
             PretrainConfig(steps=5, batch_size=4, num_workers=0, warmup_steps=1, eval_clips=4, checkpoint_every=100))
    return ingest_dir, model


def test_probe_on_trained_features_beats_chance_through_the_cli(labelled, tmp_path):
    ingest_dir, model = labelled
    work, out = tmp_path / "work", tmp_path / "eval"
    config = tmp_path / "pipelines.yaml"
    config.write_text("stages:\n  evaluate:\n    probe: {epochs: 40}\n")
    done = subprocess.run(
        vaemo_command("--config", str(config), "--work-dir", str(work), "evaluate", "--model", str(model), "--data",
                      str(ingest_dir), "--protocol", "generic", "--mode", "probe", "--out", str(out), "--folds",
                      str(SPEAKERS)),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=cli_env(work),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    chance = 1 / 3  # three balanced classes: a guess has UAR 1/3
    assert results["chance_uar"] == pytest.approx(chance)
    for rule in ("last", "best_val"):
        assert results["mean"][rule]["uar"] >= chance + 0.3, results["mean"][rule]  # clearly above chance
        assert {"uar", "war", "macro_f1", "per_class_recall", "uar_std"} <= set(results["mean"][rule])
    assert set(results["checkpoint_rules"]) == {"last", "best_val"} and results["settings"]["probe"]["epochs"] == 40
    assert len(results["folds"]) == SPEAKERS and all({"last", "best_val"} <= set(f) for f in results["folds"])
    assert all(len(f["test_speakers"]) == 1 for f in results["folds"])
    report = (out / "report.md").read_text()
    assert "best_val" in report and "Chance level: UAR 33.33 %" in report and "encoder parameters" in report
    for name in ("confusion_best_val.png", "confusion_last.png", "embedding_tsne.png", "training_curves.png"):
        assert (out / name).stat().st_size > 1000, name
    assert sorted(p.name for p in (out / "folds").glob("*.csv")) == [f"fold-{k}.csv" for k in range(1, SPEAKERS + 1)]

    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    run = mlflow.search_runs(experiment_names=["vaemo"], output_format="list")[0]
    assert run.info.status == "FINISHED" and run.data.tags["vaemo.stage"] == "evaluate"
    assert run.data.metrics["best_val.uar"] == pytest.approx(results["mean"]["best_val"]["uar"])
    assert "fold1.test.last.uar" in run.data.metrics and "fold1.train_loss" in run.data.metrics
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"results.json", "report.md", "confusion_best_val.png", "embedding_tsne.png", "folds"} <= artifacts
    published = dict(sqlite3.connect(work / "prefect" / "prefect.db").execute("select key, data from artifact"))
    assert {"evaluate-results", "evaluate-report", "evaluate-progress"} <= set(published)
    # the report as Prefect's UI shows it: the same text, its figures inside it (the UI has no files beside it)
    shown = json.loads(published["evaluate-report"]) if published["evaluate-report"].startswith('"') else \
        published["evaluate-report"]
    embedded = dict(re.findall(r"!\[([^]]*)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", shown))
    linked = dict(re.findall(r"!\[([^]]*)\]\(([^)]+\.png)\)", report))
    assert len(linked) == 4 and set(embedded) == set(linked), (sorted(embedded), sorted(linked))
    assert all(base64.b64decode(embedded[caption]) == (out / name).read_bytes() for caption, name in linked.items())
    assert re.sub(r"\(data:image/png;base64,[^)]+\)", "", shown) == re.sub(r"\([^)]+\.png\)", "", report)


def test_finetune_runs_a_fold_and_keeps_both_checkpoint_rules(labelled, tmp_path):
    from vaemo.config import EvaluateConfig
    from vaemo.eval import evaluate, prepare

    ingest_dir, model = labelled
    epochs = []
    cfg = EvaluateConfig(
        mode="finetune", modality="audio", folds=2, tsne_clips=0, finetune={"epochs": 2, "batch_size": 3}
    )
    results = evaluate(
        prepare(model, ingest_dir, cfg), tmp_path / "ft", on_epoch=lambda fold, epoch, row: epochs.append((fold, epoch))
    )
    assert epochs == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert {f["best_epoch"] for f in results["folds"]} <= {1, 2} and len(results["folds"]) == 2
    for fold in results["folds"]:
        assert sum(fold["best_val"]["support"].values()) == fold["sizes"]["test"] > 0
    assert (tmp_path / "ft" / "training_curves.png").exists() and (tmp_path / "ft" / "report.md").exists()
