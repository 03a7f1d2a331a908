"""`vaemo ui` and `vaemo serve` as users run them: the full pipeline's deployment run triggered through the
Prefect API, its lineage read back through MLflow's REST API, its Prefect artifacts, a second run that skips every
stage, screenshots of both UIs (headless Chromium), Ctrl-C stopping both servers; and two pipeline runs started at
once on one work directory."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from PIL import Image

from tests.conftest import cli_env, fast_stages, vaemo_command
from vaemo.config import mlflow_ui_page

TIMEOUT = 600
SCHEDULE = "0 3 * * *"
FULL = ["ingest", "pretrain", "caption", "align", "evaluate"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http_json(url: str, body: dict | None = None) -> dict | list:
    """GET or POST JSON; a busy server's 429/502/503 is retried, as Prefect's own client does."""
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"},
                                     method="GET" if body is None else "POST")
    for attempt in range(6):
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            if error.code not in (429, 502, 503) or attempt == 5:
                raise
            time.sleep(2 ** attempt)


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def wait_for(check, what: str, timeout: float = TIMEOUT, every: float = 2.0, alive: subprocess.Popen | None = None,
             log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if alive is not None and alive.poll() is not None:
            raise AssertionError(
                f"{what}: the process ended with {alive.returncode}\n{log.read_text()[-4000:] if log else ''}"
            )
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout} s\n{log.read_text()[-4000:] if log else ''}")


def write_config(path: Path, work: Path, source: Path, mlflow_port: int | None = None, steps: int = 2,
                 on_new_shards: str = "restart") -> Path:
    config = {
        "work_dir": str(work),
        "dask": {"workers": 1},
        "tracking": {"ui_url": f"http://127.0.0.1:{mlflow_port}"} if mlflow_port else {},
        "corpora": {"clips": {"path": str(source), "dataset": "generic"}},
        "stages": {"ingest": {"videos_per_batch": 8},
                   "pretrain": {"steps": steps, "batch_size": 3, "num_workers": 0, "warmup_steps": 1, "eval_clips": 3,
                                "checkpoint_every": 100, "on_new_shards": on_new_shards}},
        "pipelines": {"tiny": {"corpora": ["clips"], "stages": ["ingest", "pretrain"], "schedule": SCHEDULE}},
    }
    path.write_text(json.dumps(config))
    return path


def chromium(*args: str, height: int = 900) -> str:
    done = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size=1400,{height}",
         "--virtual-time-budget=20000", *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    )
    return done.stdout


def screenshot(url: str, out: Path, shows: list[str], height: int = 900) -> str:
    """A headless Chromium picture of a page after its scripts ran, ``height`` pixels tall; returns what of ``shows``
    the page's DOM lacks (the DOM is kept beside the picture then), empty when it has all."""
    chromium(f"--screenshot={out}", url, height=height)
    picture = np.asarray(Image.open(out).convert("RGB"))
    assert picture.shape == (height, 1400, 3) and len(np.unique(picture.reshape(-1, 3), axis=0)) > 50, (
        f"{out.name} looks blank"
    )
    page = chromium("--dump-dom", url, height=height)
    missing = [text for text in shows if text not in page]
    if missing:
        out.with_suffix(".html").write_text(page)
        return f"{url} does not show {missing} (its DOM: {out.with_suffix('.html')})"
    return ""


def stop(process: subprocess.Popen) -> int:
    os.killpg(process.pid, signal.SIGINT)
    return process.wait(90)


def write_served_config(path: Path, work: Path, labelled: tuple[Path, Path], clips: Path, mlflow_port: int,
                        tiny_mllm: Path, short_prompt: Path) -> Path:
    """Two pipelines: ``full`` (all five stages on a labelled corpus, tiny settings) and ``tiny`` (ingest and
    pretrain), the one the new-corpus deployment runs."""
    source, labels = labelled
    config = {
        "work_dir": str(work),
        "dask": {"workers": 1},
        "tracking": {"ui_url": f"http://127.0.0.1:{mlflow_port}"},
        "corpora": {"labelled": {"path": str(source), "dataset": "generic", "labels": str(labels)},
                    "clips": {"path": str(clips), "dataset": "generic"}},
        "stages": fast_stages(tiny_mllm, short_prompt),
        "pipelines": {
            "full": {"corpora": ["labelled"], "stages": FULL, "schedule": SCHEDULE,
                     "stage_overrides": {"evaluate": {"folds": 3}}},
            "tiny": {"corpora": ["clips"], "stages": ["ingest", "pretrain"]},
        },
    }
    path.write_text(json.dumps(config))
    return path


def test_ui_serves_deployments_triggered_through_the_prefect_api(labelled_source, corpus, tiny_mllm, short_prompt,
                                                                 tmp_path):
    """The full pipeline through its deployment; its lineage, evaluation back to shards, through MLflow's REST API;
    the Stage 1 model by its alias; the Prefect artifacts of the run and of a second run that skips every stage;
    the new-corpus deployment; screenshots of both UIs; Ctrl-C stopping both servers."""
    work = tmp_path / "work"
    prefect_port, mlflow_port = free_port(), free_port()
    config = write_served_config(tmp_path / "pipelines.yaml", work, labelled_source, corpus, mlflow_port, tiny_mllm,
                                 short_prompt)
    env = cli_env(work)
    prefect, mlflow = f"http://127.0.0.1:{prefect_port}", f"http://127.0.0.1:{mlflow_port}"
    ui_log, serve_log = tmp_path / "ui.log", tmp_path / "serve.log"
    with open(ui_log, "w") as log:
        ui = subprocess.Popen(
            vaemo_command(
                "--config", str(config), "ui", "--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port)
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    serve = None
    try:
        wait_for(lambda: "MLflow UI" in ui_log.read_text(), "vaemo ui", alive=ui, log=ui_log)
        assert answers(f"{prefect}/api/health") and answers(f"{mlflow}/health")
        with open(serve_log, "w") as log:
            serve = subprocess.Popen(vaemo_command("serve", "--config", str(config)), stdout=log,
                                     stderr=subprocess.STDOUT, env={**env, "PREFECT_API_URL": f"{prefect}/api"},
                                     start_new_session=True)
        found = wait_for(
            lambda: (
                (d := {d["name"]: d for d in http_json(f"{prefect}/api/deployments/filter", {})}) and len(d) == 3 and d
            ),
            "the three deployments",
            alive=serve,
            log=serve_log,
        )
        assert sorted(found) == ["full", "new-corpus", "tiny"], sorted(found)
        full = found["full"]
        assert [s["schedule"]["cron"] for s in full["schedules"]] == [SCHEDULE] and found["tiny"]["schedules"] == []
        assert full["global_concurrency_limit"]["limit"] == 1
        assert "Settings" in json.dumps(full["parameter_openapi_schema"]) and full["parameters"]["pipeline"] == "full"
        assert "CorpusConfig" in json.dumps(found["new-corpus"]["parameter_openapi_schema"])

        def run_to_the_end(deployment: dict, parameters: dict) -> dict:
            flow_run = http_json(
                f"{prefect}/api/deployments/{deployment['id']}/create_flow_run", {"parameters": parameters}
            )
            final = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
            state = wait_for(
                lambda: (s := http_json(f"{prefect}/api/flow_runs/{flow_run['id']}")["state"])["type"] in final and s,
                f"the flow run of {deployment['name']}",
                alive=serve,
                log=serve_log,
            )
            assert state["type"] == "COMPLETED", state["message"] + serve_log.read_text()[-4000:]
            return flow_run

        def mlflow_run(run_id: str) -> dict:
            return http_json(f"{mlflow}/api/2.0/mlflow/runs/get?run_id={run_id}")["run"]

        def tags_of(run: dict) -> dict[str, str]:
            return {t["key"]: t["value"] for t in run["data"].get("tags", [])}

        def source_run(model_id: str) -> str:
            return http_json(f"{mlflow}/api/2.0/mlflow/logged-models/{model_id}")["model"]["info"]["source_run_id"]

        def datasets(run: dict) -> dict[str, dict]:
            """A run's dataset inputs by name: the dataset and its input tags."""
            return {d["dataset"]["name"]: {**d["dataset"], "tags": {t["key"]: t["value"] for t in d.get("tags", [])}}
                    for d in run["inputs"].get("dataset_inputs", [])}

        def model_inputs(run: dict) -> list[str]:
            return [m["model_id"] for m in run["inputs"].get("model_inputs", [])]

        def model_outputs(run: dict) -> list[str]:
            return [m["model_id"] for m in run.get("outputs", {}).get("model_outputs", [])]

        def pipeline_artifacts(flow_run_id: str) -> dict[str, dict]:
            found = http_json(f"{prefect}/api/artifacts/filter",
                              {"flow_runs": {"id": {"any_": [flow_run_id]}},
                               "artifacts": {"key": {"any_": ["pipeline-steps", "pipeline-mlflow-run"]}}})
            return {a["key"]: a for a in found}

        def steps_table(artifact: dict) -> list[dict]:
            data = artifact["data"]
            return json.loads(data) if isinstance(data, str) else data

        flow_run = run_to_the_end(full, {})

        # MLflow's REST API: the parent run names the flow run and the deployment, a child per stage
        experiment = http_json(f"{mlflow}/api/2.0/mlflow/experiments/get-by-name?experiment_name=vaemo")["experiment"][
            "experiment_id"
        ]
        runs = http_json(f"{mlflow}/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment], "max_results": 100})[
            "runs"
        ]
        tags = {run["info"]["run_id"]: tags_of(run) for run in runs}
        status = {run["info"]["run_id"]: run["info"]["status"] for run in runs}
        parents = [rid for rid, t in tags.items() if t.get("vaemo.stage") == "pipeline"]
        assert len(parents) == 1 and status[parents[0]] == "FINISHED", [(p, status[p]) for p in parents]
        parent = parents[0]
        assert (
            tags[parent]["prefect.flow_run_id"] == flow_run["id"] and tags[parent]["prefect.deployment"] == full["id"]
        )
        children = {t["vaemo.stage"]: rid for rid, t in tags.items() if t.get("mlflow.parentRunId") == parent}
        assert sorted(children) == sorted(FULL), sorted(children)
        assert all(status[rid] == "FINISHED" and tags[rid].get("vaemo.skipped") != "true"
                   for rid in children.values()), {s: status[rid] for s, rid in children.items()}

        # MLflow's own lineage, walked back from the evaluation run through its inputs and the logged models'
        # source runs: evaluation <- Stage 2 model <- (captions version, Stage 1 model <- shards)
        evaluation = mlflow_run(children["evaluate"])
        stage2_ids = model_inputs(evaluation)
        assert len(stage2_ids) == 1, evaluation["inputs"]
        stage2_id = stage2_ids[0]
        assert stage2_id == tags[children["align"]]["vaemo.output.model.stage2"], (stage2_id, tags[children["align"]])
        evaluated = datasets(evaluation).get("shards")
        assert evaluated is not None, evaluation["inputs"]
        align_id = source_run(stage2_id)
        assert align_id == children["align"], (align_id, children)
        align = mlflow_run(align_id)
        assert model_outputs(align) == [stage2_id], align.get("outputs")
        used = datasets(align)
        assert {"shards", "captions"} <= set(used), sorted(used)
        captions = used["captions"]["tags"]
        caption_run = tags[children["caption"]]
        assert (f"{captions['vaemo.lancedb.tag']}@v{captions['vaemo.lancedb.version']}" == captions["vaemo.digest"]
                == caption_run["vaemo.output.captions.digest"]), (captions, caption_run)
        stage1_ids = model_inputs(align)
        assert len(stage1_ids) == 1, align["inputs"]
        stage1_id = stage1_ids[0]
        assert stage1_id == tags[children["pretrain"]]["vaemo.output.model.stage1"]
        pretrain_id = source_run(stage1_id)
        assert pretrain_id == children["pretrain"], (pretrain_id, children)
        pretrain = mlflow_run(pretrain_id)
        assert model_outputs(pretrain) == [stage1_id], pretrain.get("outputs")
        shards = datasets(pretrain).get("shards")
        assert shards is not None, pretrain["inputs"]
        made = tags[children["ingest"]]["vaemo.output.shards.digest"]
        assert shards["tags"]["vaemo.digest"] == made == evaluated["tags"]["vaemo.digest"] == used["shards"]["tags"][
            "vaemo.digest"], (shards, evaluated, used["shards"], made)

        # the Stage 1 model registered under the pipeline's alias loads as an MLflow model and embeds a clip
        version = http_json(f"{mlflow}/api/2.0/mlflow/registered-models/alias?name=vaemo-stage1&alias=full")[
            "model_version"]
        assert version["run_id"] == children["pretrain"] and stage1_id in version["source"], version
        stage2_version = http_json(f"{mlflow}/api/2.0/mlflow/registered-models/alias?name=vaemo-stage2&alias=full")[
            "model_version"]
        assert stage2_version["run_id"] == children["align"], stage2_version
        from mlflow import pyfunc, set_tracking_uri  # here `mlflow` is the server's address

        set_tracking_uri(mlflow)
        video = sorted(labelled_source[0].rglob("*.mp4"))[0]
        rows = pyfunc.load_model("models:/vaemo-stage1@full").predict([str(video)])
        assert len(rows) >= 1 and len(rows["embedding"][0]) > 0 and set(rows["source"]) == {str(video)}

        # Prefect: the pipeline run links its MLflow run and tables its steps, each stage links its own run
        def url(run_id: str) -> str:  # the address vaemo gives: the UI's model-training view
            return mlflow_ui_page(mlflow, f"experiments/{experiment}/runs/{run_id}")

        published = pipeline_artifacts(flow_run["id"])
        assert sorted(published) == ["pipeline-mlflow-run", "pipeline-steps"], sorted(published)
        assert url(parent) in published["pipeline-mlflow-run"]["data"], published["pipeline-mlflow-run"]
        table = steps_table(published["pipeline-steps"])
        assert [(row["stage"], row["outcome"], row["mlflow_run"]) for row in table] == [
            (stage, "ran", url(children[stage])) for stage in FULL], table
        artifacts = http_json(f"{prefect}/api/artifacts/filter", {"artifacts": {"key": {"like_": "-mlflow-run"}}})
        links = " ".join(a["data"] for a in artifacts)
        for stage, run_id in children.items():
            assert url(run_id) in links, (stage, links)

        # a second run of the deployment: nothing changed, so every stage is skipped, reusing the first run's
        again = run_to_the_end(full, {})
        published_again = pipeline_artifacts(again["id"])
        assert sorted(published_again) == ["pipeline-mlflow-run", "pipeline-steps"], sorted(published_again)
        second_parent = http_json(f"{mlflow}/api/2.0/mlflow/runs/search",
                                  {"experiment_ids": [experiment],
                                   "filter": f"tags.`prefect.flow_run_id` = '{again['id']}' and "
                                             "tags.`vaemo.stage` = 'pipeline'"})["runs"]
        assert len(second_parent) == 1 and second_parent[0]["info"]["status"] == "FINISHED", second_parent
        assert url(second_parent[0]["info"]["run_id"]) in published_again["pipeline-mlflow-run"]["data"]
        table_again = steps_table(published_again["pipeline-steps"])
        assert [(row["stage"], row["outcome"]) for row in table_again] == [
            (stage, f"skipped (reusing run {children[stage]})") for stage in FULL], table_again

        # the new-corpus deployment: the tiny pipeline on a folder that pipelines.yaml does not name
        run_to_the_end(found["new-corpus"],
                       {"pipeline": "tiny", "corpus_name": "more",
                        "corpus": {"path": str(corpus), "dataset": "generic"}})
        more = wait_for(
            lambda: [
                r
                for r in http_json(f"{mlflow}/api/2.0/mlflow/runs/search",
                                   {"experiment_ids": [experiment],
                                    "filter": "tags.`vaemo.pipeline` = 'tiny@more'"}).get("runs", [])
            ],
            "the new corpus's MLflow run",
            timeout=30,
        )
        assert len(more) == 1 and more[0]["info"]["status"] == "FINISHED"
        assert any((work / "pipelines" / "tiny@more" / "corpora" / "more" / "shards").glob("*.tar"))
        assert (work / "pipelines" / "tiny@more" / "stage1" / "model.safetensors").is_file()

        evidence = Path(os.environ.get("VAEMO_EVIDENCE_DIR", tmp_path))
        evidence.mkdir(parents=True, exist_ok=True)
        # the run takes its readable name (pipeline and start time) when it starts, after the deployment created it
        run_name = http_json(f"{prefect}/api/flow_runs/{flow_run['id']}")["name"]
        assert run_name.startswith("full-"), run_name
        second_name = http_json(f"{prefect}/api/flow_runs/{again['id']}")["name"]
        steps_page = f"{prefect}/artifacts/artifact/"
        # MLflow's run pages list a run's datasets (the first by name and digest, "+1" for the next) and its logged
        # models, each an input or an output, with their registered versions; tall pages, so the models show too
        shards_shown = f"shards ({shards['digest']})"
        # the evaluation report as the evaluate flow run published it: its figures inside it
        report = http_json(f"{prefect}/api/artifacts/filter", {"artifacts": {"key": {"any_": ["evaluate-report"]}}})
        assert len(report) == 1, [a["key"] for a in report]
        missing = [
            screenshot(f"{prefect}/runs/flow-run/{flow_run['id']}", evidence / "prefect-flow-run.png",
                       [run_name, "full"]),  # its graph, artifacts included, is a canvas
            screenshot(steps_page + published["pipeline-steps"]["id"], evidence / "prefect-pipeline-steps.png",
                       [run_name, "pipeline-steps", *(url(children[stage]) for stage in FULL)]),
            screenshot(steps_page + report[0]["id"], evidence / "prefect-evaluation-report.png",
                       ["Evaluation: generic, probe", "data:image/png;base64,", "Figures"], height=2400),
            screenshot(steps_page + published_again["pipeline-steps"]["id"],
                       evidence / "prefect-pipeline-steps-skipped.png",
                       [second_name, *(f"skipped (reusing run {children[stage]})" for stage in FULL)]),
            # the model-training view's sidebar names the Model registry (the GenAI one lists judges and traces)
            screenshot(url(parent), evidence / "mlflow-pipeline-run.png", ["pipeline full", parent, "Model registry"]),
            screenshot(url(align_id), evidence / "mlflow-align-run.png",
                       [shards_shown, captions["vaemo.digest"], "Logged models (2)", ">Input<", ">Output<",
                        "vaemo-stage1", "vaemo-stage2"], height=2400),
            screenshot(url(children["evaluate"]), evidence / "mlflow-evaluate-run.png",
                       [shards_shown, "Logged models (1)", ">Input<", "vaemo-stage2"], height=2400),
            screenshot(mlflow_ui_page(mlflow, f"models/vaemo-stage1/versions/{version['version']}"),
                       evidence / "mlflow-model-version.png", ["vaemo-stage1", "full", "pretrain"]),
            screenshot(mlflow_ui_page(mlflow, f"experiments/{experiment}"), evidence / "mlflow-experiment.png",
                       ["Runs", "Models", "Model registry", "pipeline"]),
        ]
        assert not any(missing), [m for m in missing if m]
    finally:
        if serve is not None:
            stop(serve)
        code = stop(ui)
    assert code == 0, ui_log.read_text()[-3000:]
    assert "stopping the servers" in ui_log.read_text()
    assert not answers(f"{prefect}/api/health") and not answers(f"{mlflow}/health")


def test_two_runs_at_once_do_not_mix_and_a_grown_corpus_only_adds_work(corpus, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(corpus, source)
    work = tmp_path / "work"
    config = write_config(tmp_path / "pipelines.yaml", work, source, steps=30, on_new_shards="continue")
    env = cli_env(work)
    command = vaemo_command("run", "--config", str(config), "--pipeline", "tiny")
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lock = work / "pipelines" / "tiny" / ".pipeline.lock"
    wait_for(lambda: lock.is_file() and "pid" in lock.read_text(), "the first run's lock", every=0.5)
    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=TIMEOUT)
    out, err = first.communicate(timeout=TIMEOUT)
    assert first.returncode == 0, out[-3000:] + err[-3000:]
    assert second.returncode == 1, second.stdout[-3000:] + second.stderr[-3000:]
    assert "pipeline tiny is already running" in second.stderr and "Traceback" not in second.stderr
    root = work / "pipelines" / "tiny"
    manifest = pd.read_parquet(root / "corpora" / "clips" / "manifest.parquet")
    clips = pd.read_parquet(root / "corpora" / "clips" / "clips.parquet")
    assert len(manifest) > 0 and manifest["video_id"].is_unique and len(clips) > 0 and clips["clip_id"].is_unique
    assert all(
        json.loads((root / part / "stage.json").read_text())["state"] == "done" for part in ("corpora/clips", "stage1")
    )

    # a new video in the corpus: only it is ingested, and pre-training continues from the last model
    from vaemo import synth

    videos_before = manifest["video_id"].nunique()
    synth.demo_corpus(tmp_path / "more", n_videos=1, seed=9)
    for video in (tmp_path / "more").glob("*.mp4"):
        shutil.move(video, source / f"new-{video.name}")
    grown = subprocess.run(command, capture_output=True, text=True, env=env, timeout=TIMEOUT)
    assert grown.returncode == 0, grown.stdout[-3000:] + grown.stderr[-3000:]
    client = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    runs = client.search_runs(
        [client.get_experiment_by_name("vaemo").experiment_id], order_by=["attributes.start_time DESC"]
    )
    ingest = next(
        r for r in runs if r.data.tags.get("vaemo.stage") == "ingest" and r.data.tags.get("vaemo.skipped") != "true"
    )
    assert (
        ingest.data.metrics["last_run.processed_videos"] == 1
        and ingest.data.metrics["last_run.skipped_videos"] == videos_before
    )
    pretrain = runs[[r.data.tags.get("vaemo.stage") for r in runs].index("pretrain")]
    assert pretrain.data.params["pretrain.init"] == str(root / "stage1-previous")
    assert (root / "stage1-previous" / "model.safetensors").is_file() and (
        root / "stage1" / "model.safetensors"
    ).is_file()
    assert pd.read_parquet(root / "corpora" / "clips" / "manifest.parquet")["video_id"].nunique() == videos_before + 1


def test_ui_beyond_loopback_is_refused_unless_told_the_servers_have_no_authentication(tmp_path):
    from vaemo.servers import is_loopback

    assert all(map(is_loopback, ("127.0.0.1", "127.0.0.2", "::1", "localhost")))
    assert not any(map(is_loopback, ("0.0.0.0", "::", "192.168.1.10", "no-such-host.invalid")))
    work = tmp_path / "work"
    for host in ("0.0.0.0", "::"):
        done = subprocess.run(vaemo_command("--work-dir", str(work), "ui", "--host", host), capture_output=True,
                              text=True, env=cli_env(work), timeout=60)
        assert done.returncode == 2 and done.stdout == "", (host, done.stdout, done.stderr)
        assert done.stderr.startswith(f"vaemo: error: --host {host} is reachable from other machines") and \
            done.stderr.count("\n") == 1 and "--allow-unauthenticated" in done.stderr, done.stderr
    assert not (work / "logs" / "prefect-server.log").exists()  # refused before any server started
    # Acknowledged: it warns and goes on to start the servers, here up to the refusal of a port already taken.
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(vaemo_command("--work-dir", str(work), "ui", "--host", "0.0.0.0", "--prefect-port",
                                            str(port), "--allow-unauthenticated"),
                              capture_output=True, text=True, env=cli_env(work), timeout=60)
    assert done.returncode == 2 and "vaemo: warning: serving on 0.0.0.0 without authentication" in done.stderr
    assert f"vaemo: error: port in use: 0.0.0.0:{port} (Prefect)" in done.stderr and "Traceback" not in done.stderr
