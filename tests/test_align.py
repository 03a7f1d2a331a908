"""Stage 2: captions (tiny vLLM model, or rows written here) -> dual-path alignment -> retrieval,
zero-shot and text search; the modality path, pinned caption versions, resume and MLflow lineage.

The tiny captioning model writes meaningless but distinct texts, so "retrieval above chance" here
means the AV space learned to tell the captioned clips' texts apart, nothing about emotions.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from tests.conftest import cli_env, ingest_folder, vaemo_command
from vaemo import store
from vaemo.align.data import AlignDataError, load_captions
from vaemo.align.model import AlignedAV, set_trainable
from vaemo.align.train import align
from vaemo.artifacts import ModelFolder
from vaemo.config import AlignConfig, StoreConfig
from vaemo.errors import ArtifactError, ConfigError
from vaemo.model import av

TIMEOUT = 600
CLIPS = 12
FAST = {"num_workers": 0, "warmup_steps": 1, "checkpoint_every": 100, "embeddings_table": None,
        "retrieval_before": False}


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> Path:
    """Twelve talking-face clips (different sentences, voices and tints) in three shards."""
    from vaemo import synth
    from vaemo.config import IngestConfig

    source = tmp_path_factory.mktemp("align-src")
    synth.demo_corpus(source, n_videos=CLIPS, seed=5)
    out = tmp_path_factory.mktemp("align-ingest")
    stats, _ = ingest_folder(source, out, IngestConfig(videos_per_batch=4))
    assert stats["status_counts"] == {"ok": CLIPS}
    return out


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> Path:
    """An untrained tiny Stage 1 model (alignment trains the encoder too)."""
    return av.save(av.AVMAE(av.config_for("tiny")), tmp_path_factory.mktemp("stage1"))


def clip_ids(ingested: Path) -> list[str]:
    return sorted(pd.read_parquet(ingested / "clips.parquet")["clip_id"])


def write_captions(db: Path, rows: list[dict]) -> str:
    """Caption rows written as the caption stage would (text vectors cached in the row); returns the run tag."""
    from vaemo.text import text_encoder

    encoder = text_encoder()
    full = []
    for row in rows:
        row = {"prompt_version": "hand-v1", "model": "hand", "status": "ok", "text_encoder": encoder.name,
               "emotion": "calm", **row}
        if row["status"] == "ok":
            for field, column in (("description", "description_vec"), ("facial_cues", "facial_vec"),
                                  ("vocal_cues", "vocal_vec")):
                row[column] = encoder.encode([row[field]])[0].tolist()
        full.append(row)
    with store.writer_lock(db, store.CAPTIONS):
        table = store.open_captions(store.connect(db), encoder.dim)
        store.upsert(table, pa.Table.from_pylist(full, schema=table.schema), store.CAPTION_KEYS)
        tag = store.new_run_tag("caption")
        store.tag_and_optimize(table, tag, store.CAPTION_INDEXES, StoreConfig())
    return tag


WORDS = ["furious", "joyful", "tearful", "calm", "anxious", "bored", "surprised", "disgusted", "proud", "shy", "tense",
         "sleepy"]


def hand_rows(ids: list[str], cue_words: list[str] | None = None) -> list[dict]:
    cue_words = cue_words or WORDS
    return [{"clip_id": c, "description": f"The speaker is {WORDS[i]} while telling story number {i}.",
             "facial_cues": f"a {cue_words[i]} face, feature {i}", "vocal_cues": f"a {cue_words[i]} voice, tone {i}"}
            for i, c in enumerate(ids)]


def step_log(out: Path) -> dict[int, dict]:
    return {row["step"]: row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


# ---- unit level -----------------------------------------------------------------------------

def test_trainable_parts_are_a_config_value():
    model = AlignedAV(av.AVMAE(av.config_for("tiny")), 384)
    heads = set_trainable(model, "heads")
    assert heads["encoder"] == 0 and heads["decoder"] == 0 and heads["total"] == heads["heads"] > 0
    last = set_trainable(model, "last_k", last_k=1)
    assert 0 < last["encoder"] < set_trainable(model, "all")["encoder"]
    assert set_trainable(model, "all", reconstruction=True)["decoder"] > 0
    assert not any(
        p.requires_grad for n, p in model.av.named_parameters() if n.startswith(("video_proj", "audio_proj"))
    )
    with pytest.raises(ConfigError, match="last_k=9 exceeds the 4 shared encoder blocks"):
        set_trainable(model, "last_k", last_k=9)


# ---- the real path: tiny vLLM captions -> `vaemo align` -> metrics, lineage, search, zero-shot -----

def log_stage1(work: Path, folder: Path) -> str:
    """Log the Stage 1 folder to the work dir's MLflow store the way the pretrain flow does."""
    from vaemo import tracking

    uri = f"sqlite:///{work / 'mlflow.db'}"
    with tracking.stage_run("pretrain", tracking_uri=uri, experiment="vaemo", work_dir=work) as run:
        model_id = tracking.log_model("stage1", ModelFolder(folder), tracking.registered_name("vaemo", "stage1"), None)
        ModelFolder(folder).write_record(model_id, run.info.run_id, uri)
    return model_id


def test_align_command_on_vllm_captions_retrieves_far_above_chance(ingested, stage1, tiny_mllm, short_prompt, tmp_path):
    from vaemo.caption.run import caption
    from vaemo.config import CaptionConfig

    db, work, out = tmp_path / "db", tmp_path / "work", tmp_path / "aligned"
    summary = caption(
        ingested,
        db,
        CaptionConfig(
            engine="vllm", model=str(tiny_mllm), prompt=str(short_prompt), count=CLIPS, sampling={"max_tokens": 256}
        ),
    )
    ok = summary["status_counts"].get("ok", 0)
    assert ok >= 10, summary["status_counts"]  # the short prompt lets the random model finish its JSON
    init = tmp_path / "stage1"
    av.save(av.load(stage1), init)
    stage1_id = log_stage1(work, init)

    env = cli_env(work)
    refused = subprocess.run(
        vaemo_command("--work-dir", str(work), "align", "--shards", str(ingested), "--db", str(db), "--init",
                      str(tmp_path), "--out", str(out)),
        capture_output=True,
        text=True,
        env=env,
        timeout=TIMEOUT,
    )
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines() == [
        f"vaemo: error: --init {tmp_path} is not a model folder: it needs config.json and "
        "model.safetensors (the --out folder of `vaemo pretrain`)"
    ]

    config = tmp_path / "pipelines.yaml"
    config.write_text(
        "stages:\n  align:\n    batch_size: 12\n    lr: 0.003\n    warmup_steps: 2\n    num_workers: 0\n    "
        "checkpoint_every: 6\n"
    )
    done = subprocess.run(
        vaemo_command("--config", str(config), "--work-dir", str(work), "align", "--shards", str(ingested), "--db",
                      str(db), "--init", str(init), "--out", str(out), "--steps", "12"),
        capture_output=True,
        text=True,
        env=env,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"loss_first", "loss_last", "text_retrieval_top1", "text_retrieval_chance"} <= set(metrics)
    assert metrics["text_retrieval_chance"] == pytest.approx(1 / ok) and metrics["captions_ok"] == ok
    assert metrics["captions_skipped"] == CLIPS - ok and metrics["captions"]["tag"] == summary["tag"]
    assert metrics["text_retrieval_top1"] >= 5 * metrics["text_retrieval_chance"], metrics
    assert metrics["text_retrieval_top1"] > metrics["init_text_retrieval_top1"]
    assert metrics["loss_last"] < metrics["loss_first"] and metrics["captions"]["text_vectors_embedded_now"] == 0
    alignment = json.loads((out / "text_alignment.json").read_text())
    assert (
        alignment["text_encoder"] == "all-MiniLM-L6-v2"
        and alignment["text_dim"] == 384
        and alignment["captions"]["tag"] == summary["tag"]
    )
    assert av.load(out).cfg.name == "tiny"  # still a Stage 1 folder for probing and fine-tuning
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == ["step-00000006.pt", "step-00000012.pt"]

    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    run = mlflow.search_runs(
        experiment_names=["vaemo"], filter_string="tags.`vaemo.stage` = 'align'", output_format="list"
    )[0]
    assert run.info.status == "FINISHED" and run.data.params["caption_tag"] == summary["tag"]
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"shards", "captions"}  # what it read; the Stage 1 model is a model input
    client = mlflow.MlflowClient()
    # search_runs leaves the model inputs out: read the run itself
    assert [m.model_id for m in client.get_run(run.info.run_id).inputs.model_inputs] == [stage1_id]
    assert run.data.tags["vaemo.training.captions.digest"] == f"{summary['tag']}@v{summary['version']}"
    assert {t.key: t.value for t in inputs["captions"].tags}["vaemo.lancedb.tag"] == summary["tag"]
    assert run.data.tags["vaemo.input.stage1.model_id"] == stage1_id
    for key in ("global", "modality", "modality_video", "modality_audio"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == list(range(1, 13)), key
    model = mlflow.get_logged_model(run.data.tags["vaemo.output.model.stage2"])
    assert model.tags["vaemo.stage1.model_id"] == stage1_id and model.tags["vaemo.captions.tag"] == summary["tag"]
    assert [m.model_id for m in client.get_run(run.info.run_id).outputs.model_outputs] == [model.model_id]
    assert {a.path for a in client.list_logged_model_artifacts(model.model_id, "artifacts/model")} == {
        f"artifacts/model/{name}" for name in
        ("model.safetensors", "config.json", "text_heads.safetensors", "text_alignment.json")}
    assert run.data.tags["vaemo.output.clip_embeddings.table"] == "clip_embeddings"  # written, not read
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}  # checkpoints stay in the model folder
    assert {"training_curves.png", "metrics.json"} <= logged and "checkpoints" not in logged, logged

    found = subprocess.run(
                           vaemo_command("search", "--db", str(db), "--text", "a trembling voice and a tense face",
                                         "--k", "3"),
                           capture_output=True, text=True, env=env, timeout=TIMEOUT)
    assert found.returncode == 0, found.stderr[-3000:]
    lines = [line for line in found.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert len(lines) == 3 and len({line.split()[2] for line in lines}) == 3
    assert {line.split()[2] for line in lines} <= set(clip_ids(ingested))

    scores = tmp_path / "zeroshot.csv"
    zs = subprocess.run(
        vaemo_command(
            "zeroshot", str(ingested), "--model", str(out), "--labels", "angry,happy,sad", "--out", str(scores)
        ),
        capture_output=True,
        text=True,
        env=env,
        timeout=TIMEOUT,
    )
    assert zs.returncode == 0, zs.stderr[-3000:]
    table = pd.read_csv(scores)
    assert list(table.columns) == ["clip_id", "predicted", "p_angry", "p_happy", "p_sad"] and len(table) == CLIPS
    probs = table[["p_angry", "p_happy", "p_sad"]].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5) and (probs > 0).all()
    assert (table["predicted"] == np.array(["angry", "happy", "sad"])[probs.argmax(axis=1)]).all()
    refused = subprocess.run(vaemo_command("zeroshot", str(ingested), "--model", str(init), "--labels", "angry,happy"),
                             capture_output=True, text=True, env=env, timeout=TIMEOUT)
    assert refused.returncode == 2 and refused.stderr.startswith(
        f"vaemo: error: {init} is not a Stage 2 (text-aligned) model"
    )


# ---- the modality path, pinned versions, skipped captions ------------------------------------

def test_modality_path_reads_the_cue_texts_of_the_pinned_version(ingested, stage1, tmp_path):
    ids = clip_ids(ingested)[:6]
    db = tmp_path / "db"
    rows = hand_rows(ids)
    rows[-1] = {**rows[-1], "status": "failed", "reason": "no usable reply"}
    first = write_captions(db, rows)
    changed = hand_rows(ids, cue_words=list(reversed(WORDS)))  # same descriptions, other facial and vocal cues
    changed[-1] = rows[-1]
    second = write_captions(db, changed)

    cfg = AlignConfig(steps=1, batch_size=4, **FAST)
    runs = {}
    for tag in (first, second):
        metrics = align(ingested, db, stage1, tmp_path / tag, cfg.model_copy(update={"caption_tag": tag}))
        assert metrics["captions"]["tag"] == tag and metrics["captions_ok"] == 5 and metrics["captions_skipped"] == 1
        assert (
            metrics["captions"]["captions_skipped_by_status"] == {"failed": 1} and metrics["text_retrieval_clips"] == 5
        )
        runs[tag] = step_log(tmp_path / tag)[1]
    assert runs[first]["global"] == pytest.approx(runs[second]["global"], rel=1e-6, abs=1e-7)
    assert abs(runs[first]["modality"] - runs[second]["modality"]) > 1e-3
    assert abs(runs[first]["modality_video"] - runs[second]["modality_video"]) > 1e-4
    assert abs(runs[first]["modality_audio"] - runs[second]["modality_audio"]) > 1e-4
    # The newest caption tag is the default pin; an unknown tag or no ok caption is a clear refusal.
    assert load_captions(db, ingested, AlignConfig()).tag == second
    with pytest.raises(ArtifactError, match="has no tag 'nope'"):
        load_captions(db, ingested, AlignConfig(caption_tag="nope"))
    failed = write_captions(tmp_path / "bad", [{**r, "status": "failed"} for r in rows])
    with pytest.raises(AlignDataError, match=f"no ok caption in .* at tag '{failed}'.*failed 6"):
        load_captions(tmp_path / "bad", ingested, AlignConfig())


# ---- resume, reconstruction on uncaptioned clips, last_k -------------------------------------

class Stop(Exception):
    pass


def test_interrupted_alignment_resumes_on_the_same_curve_with_reconstruction(ingested, stage1, tmp_path):
    db = tmp_path / "db"
    write_captions(db, hand_rows(clip_ids(ingested)[:6]))  # the other 6 clips feed the reconstruction term
    cfg = AlignConfig(
        steps=3, batch_size=3, trainable="last_k", last_k=1, rec_weight=0.1, **{**FAST, "checkpoint_every": 2}
    )
    whole = align(ingested, db, stage1, tmp_path / "whole", cfg)
    assert whole["reconstruction"].startswith("on 6 uncaptioned clips") and "rec_first" in whole
    assert whole["trainable_params"]["decoder"] > 0

    def stop_at_three(step, values):
        if step == 3:
            raise Stop

    out = tmp_path / "interrupted"
    with pytest.raises(Stop):
        align(ingested, db, stage1, out, cfg, log_step=stop_at_three)
    assert not (out / "metrics.json").exists() and (out / "checkpoints" / "step-00000002.pt").exists()
    resumed = align(ingested, db, stage1, out, cfg, resume=True)
    assert resumed["resumed_from_step"] == 2
    reference, again = step_log(tmp_path / "whole"), step_log(out)
    assert sorted(again) == [1, 2, 3]
    for step in (3,):
        for key in ("loss", "global", "modality", "rec"):
            assert again[step][key] == pytest.approx(reference[step][key], rel=1e-4, abs=1e-5), (step, key)
    digests = [
        json.loads((d / "ranks" / "rank-0.json").read_text())["weights_sha256"] for d in (tmp_path / "whole", out)
    ]
    assert digests[0] == digests[1]
