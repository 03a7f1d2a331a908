"""MLflow models of vaemo: pyfunc models a user loads from the registry by alias, run inputs and outputs."""

from pathlib import Path

import mlflow
import numpy as np

from vaemo import lineage, tracking
from vaemo.artifacts import ModelFolder
from vaemo.embed import encode
from vaemo.model import av


def test_a_registered_model_loads_by_its_pipelines_alias_and_embeds_clips(shards, corpus, tmp_path):
    uri, work = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "work"
    folders = []
    for seed in (0, 1):
        folder = tmp_path / f"stage1-{seed}"
        av.save(av.AVMAE(av.config_for("tiny")), folder)
        folders.append(ModelFolder(folder))
    experiment = tracking.configure(uri, "vaemo", work)
    parent = mlflow.MlflowClient(uri).create_run(experiment, tags={tracking.Tag.PIPELINE: "demo"}).info.run_id
    ids, runs = [], []
    for folder in folders:  # two runs of the pipeline: the alias follows the newer version
        with tracking.stage_run("pretrain", tracking_uri=uri, experiment="vaemo", work_dir=work,
                                tags=tracking.child_tags(parent)) as run:
            ids.append(tracking.log_model("stage1", folder, tracking.registered_name("vaemo", "stage1"),
                                          tracking.pipeline_alias(parent)))
            runs.append(run.info.run_id)
    with tracking.stage_run("align", tracking_uri=uri, experiment="vaemo", work_dir=work) as run:
        tracking.log_used_model(ids[1])
        align = run.info.run_id

    client = mlflow.MlflowClient(uri)
    version = client.get_model_version_by_alias("vaemo-stage1", "demo")
    assert int(version.version) == 2 and ids[1] in version.source and version.run_id == runs[1]
    assert [o.model_id for o in client.get_run(runs[1]).outputs.model_outputs] == [ids[1]]
    assert [i.model_id for i in client.get_run(align).inputs.model_inputs] == [ids[1]]

    links = lineage.node(client, align).inputs
    assert [(link.name, link.producer) for link in links] == [("stage1_model", runs[1])]
    assert links[0].detail["registered"] == "vaemo-stage1 v2 @demo"

    model = mlflow.pyfunc.load_model("models:/vaemo-stage1@demo")
    video = sorted(Path(corpus).glob("*.mp4"))[0]
    rows = model.predict([str(shards), str(video)])
    expected = {str(source): encode(source, folders[1].path) for source in (shards, video)}
    assert len(expected[str(shards)]) == 3 and expected[str(video)]
    assert len(rows) == sum(map(len, expected.values()))
    for source, clip_id, vector in zip(rows["source"], rows["clip_id"], rows["embedding"], strict=True):
        np.testing.assert_allclose(vector, expected[source][clip_id], atol=1e-5, err_msg=source)
    video_only = model.predict([str(video)], params={"modality": "video"})
    reference = encode(video, folders[1].path, "video")
    np.testing.assert_allclose(video_only["embedding"][0], reference[video_only["clip_id"][0]], atol=1e-5)


def test_a_pipelines_alias_is_a_name_the_registry_takes(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = tracking.configure(uri, "vaemo", tmp_path / "work")
    client = mlflow.MlflowClient(uri)
    made = {name: client.create_run(experiment, tags={tracking.Tag.PIPELINE: name}).info.run_id
            for name in ("demo", "tiny@more", "latest", "v2")}
    assert {name: tracking.pipeline_alias(run) for name, run in made.items()} == {
        "demo": "demo", "tiny@more": "tiny-more", "latest": "pipeline-latest", "v2": "pipeline-v2"}
    assert tracking.pipeline_alias(None) is None


def test_the_experiment_opens_in_the_model_training_view(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    made = tracking.configure(uri, "vaemo", tmp_path / "work")
    assert client.get_experiment(made).tags[tracking.EXPERIMENT_KIND] == "custom_model_development"
    # an experiment made before the tag, or one whose kind the UI guessed, is told; one chosen by hand is kept
    chosen = client.create_experiment("chosen")
    client.set_experiment_tag(chosen, tracking.EXPERIMENT_KIND, "genai_development")
    for name, kind in (("older", "custom_model_development"), ("chosen", "genai_development")):
        found = tracking.configure(uri, name, tmp_path / "work")
        assert client.get_experiment(found).tags[tracking.EXPERIMENT_KIND] == kind, name
