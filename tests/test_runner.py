"""The pipeline runner (vaemo.pipeline) without Prefect: keys, skips, resume from checkpoints, clearing on a new key,
failures, and the MLflow parent and child runs, with an executor that writes each stage's artifacts as the stage
flows do. The real flows run end to end in tests/test_pipeline.py."""

from __future__ import annotations

import json

import mlflow
import pytest

from vaemo import tracking
from vaemo.artifacts import IngestFolder, ModelFolder
from vaemo.config import CorpusConfig, PipelineSpec, Settings
from vaemo.pipeline import PipelineFailed, StepFailed, layout, read_marker, run_pipeline
from vaemo.pipeline.stages import STAGES

ALL = ["ingest", "pretrain", "caption", "align", "evaluate"]


class Recorder:
    """What the MLflow recorder is told, kept in memory."""

    parent_id = "parent"

    def __init__(self):
        self.events: list[tuple] = []

    def skipped(self, step, marker):
        self.events.append(("skipped", step.label, marker["run_id"]))
        return {**marker.get("result", {}), "mlflow_run_id": f"skip-of-{marker['run_id']}"}

    def done(self, label, result):
        self.events.append(("done", label))

    def failed(self, label, message):
        self.events.append(("failed", label, message))
        return f"failed-{label}"

    def finished(self):
        self.events.append(("finished",))


class Stages:
    """An executor that writes what each stage flow leaves behind, and remembers its calls."""

    def __init__(self):
        self.calls: list[tuple[str, bool]] = []
        self.fail: dict[str, BaseException] = {}  # label -> raised once, after the outputs written so far

    def __call__(self, step, resume: bool) -> dict:
        self.calls.append((step.label, resume))
        run_id = f"run-{len(self.calls)}"
        out = step.out
        out.mkdir(parents=True, exist_ok=True)
        if step.stage == "ingest":
            folder = IngestFolder(out)
            folder.shards_dir.mkdir(exist_ok=True)
            (folder.shards_dir / "b-000.tar").write_bytes(b"shard of " + step.key.encode())
            (out / folder.BATCHES).mkdir(exist_ok=True)
            shard = {"name": "b-000.tar", "sha256": step.key, "samples": 3}
            (out / folder.BATCHES / "b.json").write_text(json.dumps({"committed_at": 1.0, "shards": [shard]}))
            return {"mlflow_run_id": run_id, "shard_set_digest": folder.digest(), "clips": 3}
        if step.trained:
            model = ModelFolder(out)
            model.checkpoints_dir.mkdir(exist_ok=True)
            (model.checkpoints_dir / "step-00000001.pt").write_bytes(b"state")
        if step.label in self.fail:
            raise self.fail.pop(step.label)
        if step.trained:
            (out / ModelFolder.WEIGHTS).write_bytes(f"weights of {step.key}".encode())
            (out / ModelFolder.CONFIG).write_text("{}")
            return {"mlflow_run_id": run_id, "model_id": f"m-{run_id}", "loss_last": 1.0}
        if step.stage == "caption":
            return {"mlflow_run_id": run_id, "tag": f"caption-{run_id}", "version": 3, "table": "captions"}
        return {"mlflow_run_id": run_id, "mean": {"uar": 0.5}, "chance_uar": 0.5, "folds": 3}

    def labels(self) -> list[str]:
        return [label for label, _ in self.calls]


def settings(tmp_path, stages=ALL, overrides=None) -> Settings:
    source = tmp_path / "source"
    if not source.exists():
        source.mkdir()
        (source / "a.mp4").write_bytes(b"video")
    return Settings(work_dir=tmp_path / "work", corpora={"c": CorpusConfig(path=source)},
                    pipelines={"p": PipelineSpec(corpora=["c"], stages=stages, stage_overrides=overrides or {})})


def test_every_stage_runs_once_then_a_rerun_skips_them_all(tmp_path):
    cfg, run = settings(tmp_path), Stages()
    first = run_pipeline("p", cfg, STAGES, run, Recorder())
    assert run.labels() == ["ingest:c", "pretrain", "caption", "align", "evaluate"]
    assert first["skipped"] == [] and first["children"]["evaluate"] == "run-5"
    assert [(o.label, o.stage, o.corpus, o.outcome, o.run_id, o.reused_run_id) for o in first["outcomes"][:2]] == [
        ("ingest:c", "ingest", "c", "ran", "run-1", None), ("pretrain", "pretrain", "", "ran", "run-2", None)]
    assert all(o.seconds >= 0 for o in first["outcomes"]) and len(first["outcomes"]) == 5
    dirs = layout(cfg.work_dir, "p")
    markers = {
        label: read_marker(path)
        for label, path in (("ingest:c", dirs["corpora"] / "c"), ("pretrain", dirs["pretrain"]),
                            ("caption", dirs["caption"]), ("align", dirs["align"]), ("evaluate", dirs["evaluate"]))
    }
    assert all(m["state"] == "done" for m in markers.values())
    assert markers["caption"]["result"] == {"tag": "caption-run-3", "version": 3, "table": "captions"}
    assert (
        markers["pretrain"]["result"] == {"model_id": "m-run-2", "loss_last": 1.0}
        and markers["pretrain"]["run_id"] == "run-2"
    )

    recorder = Recorder()
    again = run_pipeline("p", cfg, STAGES, run, recorder)
    assert len(run.calls) == 5, "nothing ran a second time"
    assert again["skipped"] == ["ingest:c", "pretrain", "caption", "align", "evaluate"]
    assert [e for e in recorder.events if e[0] == "skipped"] == [
        ("skipped", "ingest:c", "run-1"), ("skipped", "pretrain", "run-2"), ("skipped", "caption", "run-3"),
        ("skipped", "align", "run-4"), ("skipped", "evaluate", "run-5")]
    assert recorder.events[-1] == ("finished",)
    assert [(o.outcome, o.run_id, o.reused_run_id) for o in again["outcomes"]] == [
        ("skipped", f"skip-of-run-{i}", f"run-{i}") for i in range(1, 6)]


def test_a_changed_setting_reruns_its_stage_and_those_that_read_its_output(tmp_path):
    run = Stages()
    run_pipeline("p", settings(tmp_path), STAGES, run, Recorder())
    stage1 = layout(tmp_path / "work", "p")["pretrain"]
    (stage1 / "notes.txt").write_text("left by the old run")
    changed = settings(tmp_path, overrides={"pretrain": {"steps": 7}})
    result = run_pipeline("p", changed, STAGES, run, Recorder())
    # caption reads only the shards: skipped; align and evaluate read the new Stage 1 model: run again
    assert run.labels()[5:] == ["pretrain", "align", "evaluate"] and result["skipped"] == ["ingest:c", "caption"]
    assert not (stage1 / "notes.txt").exists(), "a new key clears the trained stage's folder"
    assert ("pretrain", False) in run.calls[5:], "a new key never resumes old checkpoints"
    assert read_marker(stage1)["key"] != read_marker(layout(tmp_path / "work", "p")["align"])["key"]


def test_a_failed_step_keeps_earlier_markers_and_the_rerun_resumes_from_its_checkpoints(tmp_path):
    cfg, run, recorder = settings(tmp_path), Stages(), Recorder()
    run.fail["pretrain"] = StepFailed("out of memory")
    with pytest.raises(PipelineFailed, match="stage pretrain failed: out of memory; earlier stages' outputs are kept"
                       ) as failure:
        run_pipeline("p", cfg, STAGES, run, recorder)
    assert [(o.label, o.outcome, o.run_id) for o in failure.value.outcomes] == [
        ("ingest:c", "ran", "run-1"), ("pretrain", "failed", "failed-pretrain")]
    dirs = layout(cfg.work_dir, "p")
    assert read_marker(dirs["corpora"] / "c")["state"] == "done" and read_marker(dirs["pretrain"])["state"] == "running"
    assert ("failed", "pretrain", "out of memory") in recorder.events and ("finished",) not in recorder.events
    assert not (dirs["caption"]).exists(), "no later stage ran"

    result = run_pipeline("p", cfg, STAGES, run, Recorder())
    assert run.calls[1:] == [("pretrain", False), ("pretrain", True), ("caption", False), ("align", False),
                             ("evaluate", False)]
    assert result["skipped"] == ["ingest:c"]


def test_a_step_without_its_input_is_refused_by_name(tmp_path):
    recorder = Recorder()
    with pytest.raises(
        PipelineFailed, match=r"stage pretrain failed: no ingested shards in .*corpora/c: run the pipeline"
    ):
        run_pipeline("p", settings(tmp_path, stages=["pretrain"]), STAGES, Stages(), recorder)
    assert recorder.events == [("failed", "pretrain", recorder.events[0][2])]
    with pytest.raises(
        PipelineFailed, match=r"stage evaluate failed: no model in .*stage1: run the pipeline with the pretrain"
    ):
        run_pipeline("p", settings(tmp_path, stages=["ingest", "evaluate"]), STAGES, Stages(), Recorder())


def test_ingest_runs_again_when_its_shards_changed_on_disk(tmp_path):
    cfg, run = settings(tmp_path, stages=["ingest"]), Stages()
    run_pipeline("p", cfg, STAGES, run, Recorder())
    assert run_pipeline("p", cfg, STAGES, run, Recorder())["skipped"] == ["ingest:c"]
    (
        layout(cfg.work_dir, "p")["corpora"] / "c" / "batches" / "b.json"
    ).unlink()  # the shard set is no longer what was made
    assert run_pipeline("p", cfg, STAGES, run, Recorder())["skipped"] == []
    (tmp_path / "source" / "b.mp4").write_bytes(b"another video")  # a grown corpus: a new key
    assert run_pipeline("p", cfg, STAGES, run, Recorder())["skipped"] == [] and run.labels() == ["ingest:c"] * 3


def test_a_bug_in_a_step_is_recorded_and_keeps_its_exception(tmp_path):
    run, recorder = Stages(), Recorder()
    run.fail["caption"] = ZeroDivisionError("division by zero")
    with pytest.raises(ZeroDivisionError):
        run_pipeline("p", settings(tmp_path), STAGES, run, recorder)
    assert ("failed", "caption", "ZeroDivisionError: division by zero") in recorder.events


def test_the_table_has_a_planner_for_every_stage_in_pipeline_order():
    from vaemo.config import STAGE_ORDER

    assert tuple(STAGES) == STAGE_ORDER


def test_mlflow_gets_a_parent_run_and_a_child_per_step_skipped_or_failed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg, run = settings(tmp_path, stages=["ingest", "pretrain"]), Stages()

    def recorder() -> tracking.PipelineRuns:
        return tracking.PipelineRuns(
            "p", uri, "vaemo", tmp_path / "work", {"prefect.flow_run_id": "f1"}, {"pipeline": "p"}
        )

    def with_children(runs: tracking.PipelineRuns) -> tuple[mlflow.entities.Run, dict]:
        experiment = runs.client.get_experiment_by_name("vaemo").experiment_id
        children = runs.client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{runs.parent_id}'")
        return runs.client.get_run(runs.parent_id), {c.data.tags["vaemo.stage"]: c for c in children}

    failing = recorder()
    run.fail["pretrain"] = StepFailed("no GPU")
    with pytest.raises(PipelineFailed) as failure:
        run_pipeline("p", cfg, STAGES, run, failing)
    parent, children = with_children(failing)
    assert failure.value.outcomes[-1].run_id == children["pretrain"].info.run_id
    assert parent.info.status == "FAILED" and parent.data.tags["vaemo.failed_stage"] == "pretrain"
    assert parent.data.params == {"pipeline": "p"} and parent.data.tags["prefect.flow_run_id"] == "f1"
    assert set(children) == {"pretrain"}, "the stage flow opens its own child run; only the failure needs one here"
    assert children["pretrain"].info.status == "FAILED" and children["pretrain"].data.tags["vaemo.error"] == "no GPU"

    skipping = recorder()
    run_pipeline("p", cfg, STAGES, run, skipping)
    parent, children = with_children(skipping)
    assert parent.info.status == "FINISHED" and parent.data.tags["vaemo.skipped.ingest:c"] == "true"
    skipped = children["ingest"]
    assert skipped.info.run_name == "ingest:c" and skipped.info.status == "FINISHED"
    assert skipped.data.tags["vaemo.skipped"] == "true" and skipped.data.tags["vaemo.skipped.reused_run_id"] == "run-1"
    assert parent.data.tags["vaemo.child.ingest:c"] == skipped.info.run_id
