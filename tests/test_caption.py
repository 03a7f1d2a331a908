"""Captioning: prompt and answer validation, subset selection, the LanceDB store, and real generation
with vLLM (CPU build) and transformers on a tiny random-weight Qwen2.5-Omni thinker built locally.

The tiny model's text is meaningless: these tests check structure, counts and idempotence only.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import caption_engines
import lancedb
import mlflow
import pandas as pd
import pytest
from conftest import cli_env, vaemo_command

from vaemo import store
from vaemo.caption.engines import EngineError, Generation, resolve_model
from vaemo.caption.prompt import FIELDS, PromptError, json_schema, load_prompt, parse_reply
from vaemo.caption.replicas import replica_count
from vaemo.caption.run import caption
from vaemo.caption.select import SelectionError, select_clips
from vaemo.config import CaptionConfig
from vaemo.devices import placements

GOOD = {"facial_cues": "raised brows, wide eyes", "vocal_cues": "high pitch, fast tempo",
        "reasoning": "both signal arousal", "emotion": "fear", "intensity": "high",
        "description": "The speaker looks and sounds frightened."}
LIMITS = load_prompt("cot-v1").limits


# --- prompt and answer -------------------------------------------------------------------------

def test_bundled_prompt_is_versioned_data_and_schema_is_closed():
    prompt = load_prompt("cot-v1")
    assert prompt.version == "cot-v1" and len(prompt.digest) == 16
    assert "facial" in prompt.user.lower() and "vocal" in prompt.user.lower()
    schema = json_schema(prompt.limits)
    assert set(schema["required"]) == set(FIELDS) and schema["additionalProperties"] is False
    assert schema["properties"]["intensity"]["enum"] == ["low", "medium", "high"]
    assert all(schema["properties"][f]["maxLength"] == prompt.limits[f] for f in prompt.limits)
    turns = prompt.messages()
    assert [t["role"] for t in turns] == ["system", "user"] and {"type": "video"} in turns[1]["content"]


def test_prompt_errors_are_clear(tmp_path):
    with pytest.raises(PromptError, match="not found.*cot-v1"):
        load_prompt("no-such-prompt")
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: x\nsystem: s\n")
    with pytest.raises(PromptError, match="missing user, repair"):
        load_prompt(str(bad))
    bad.write_text("version: x\nsystem: s\nuser: u\nrepair: r\nlimits: {facial_cues: 100000}\n")
    with pytest.raises(PromptError, match="limits"):
        load_prompt(str(bad))
    bad.write_text("extends: bad.yaml\nversion: x\n")
    with pytest.raises(PromptError, match="loops back"):
        load_prompt(str(bad))


def test_a_prompt_extends_another_and_its_digest_covers_both(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("version: b1\nsystem: look\nuser: describe\nrepair: fix {reason}\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\nversion: c1\nlimits: {reasoning: 30}\n")
    first = load_prompt(str(child))
    assert (first.version, first.system, first.limits["reasoning"],
            first.limits["description"]) == ("c1", "look", 30, 1000)
    base.write_text("version: b1\nsystem: look closely\nuser: describe\nrepair: fix {reason}\n")
    second = load_prompt(str(child))
    assert second.system == "look closely" and second.digest != first.digest
    bundled = load_prompt("cot-v1-short")
    assert bundled.user == load_prompt("cot-v1").user and set(bundled.limits.values()) == {24}


@pytest.mark.parametrize("raw, reason", [
    ("", "empty reply"),
    ("I think the person is happy.", "not JSON"),
    ("[1, 2]", "not an object"),
    (json.dumps({**GOOD, "emotion": "Very Happy"}), "invalid emotion"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "vocal_cues"}), "invalid vocal_cues"),
    (json.dumps({**GOOD, "extra": 1}), "invalid extra"),
    (json.dumps({**GOOD, "intensity": "extreme"}), "invalid intensity"),
    (json.dumps({**GOOD, "description": "sad " * 40}), "repetitive description"),
    (json.dumps({**GOOD, "reasoning": "   "}), "invalid reasoning"),
    (json.dumps({**GOOD, "facial_cues": "x" * 601}), "invalid facial_cues"),
])
def test_unusable_replies_get_a_reason(raw, reason):
    parsed = parse_reply(raw, LIMITS)
    assert parsed.description is None and reason in parsed.reason


def test_usable_replies_parse_and_are_normalised():
    assert parse_reply(json.dumps(GOOD), LIMITS).description.emotion == "fear"
    fenced = parse_reply("Here it is:\n```json\n" + json.dumps(GOOD) + "\n```", LIMITS)
    assert fenced.reason is None
    raw = json.dumps({**GOOD, "description": "line one\nline two"}).replace("\\n", "\n")  # a raw newline in a string
    assert parse_reply(raw, LIMITS).description.description == "line one line two"
    short = {**LIMITS, "description": 10}
    assert "longer than 10" in parse_reply(json.dumps(GOOD), short).reason


# --- selection ---------------------------------------------------------------------------------

def _clips(n: int = 60) -> pd.DataFrame:
    return pd.DataFrame({
        "clip_id": [f"clip{i:03d}" for i in range(n)], "shard": [f"s{i % 4}.tar" for i in range(n)],
        "dataset": "crema-d", "speaker": [f"spk{i % 6}" for i in range(n)],
        "label": [["angry", "happy", "sad"][i % 3] for i in range(n)], "fold": [i % 5 for i in range(n)],
    })


def test_selection_is_stratified_reproducible_and_stable():
    clips = _clips()
    picked = select_clips(clips, CaptionConfig(count=18, seed=3))
    assert len(picked) == 18 and picked["clip_id"].is_unique
    assert picked["label"].value_counts().to_dict() == {"angry": 6, "happy": 6, "sad": 6}
    assert picked["speaker"].value_counts().max() - picked["speaker"].value_counts().min() <= 1
    assert picked.equals(select_clips(clips, CaptionConfig(count=18, seed=3)))
    assert not picked["clip_id"].equals(select_clips(clips, CaptionConfig(count=18, seed=4))["clip_id"])
    assert len(select_clips(clips, CaptionConfig(fraction=0.1))) == 6
    grown = pd.concat([clips, _clips(90).iloc[60:]])  # new clips arrive: most earlier picks stay picked
    again = set(select_clips(grown, CaptionConfig(fraction=0.1, seed=3))["clip_id"])
    before = set(select_clips(clips, CaptionConfig(fraction=0.1, seed=3))["clip_id"])
    assert len(before & again) >= len(before) - 2


def test_selection_never_touches_excluded_test_folds_or_clips(tmp_path):
    clips = _clips()
    listed = tmp_path / "test-clips.txt"
    listed.write_text("clip001\nclip002\n")
    picked = select_clips(clips, CaptionConfig(fraction=1.0, exclude_folds=[0, 4], exclude_clips=listed))
    assert not picked["fold"].isin([0, 4]).any() and not picked["clip_id"].isin(["clip001", "clip002"]).any()
    assert len(picked) == 60 - 24 - 2 + 0  # clip001 (fold 1) and clip002 (fold 2) are outside folds 0 and 4
    with pytest.raises(SelectionError, match="no clip may be captioned"):
        select_clips(clips, CaptionConfig(count=3, exclude_folds=[0, 1, 2, 3, 4]))


# --- store -------------------------------------------------------------------------------------

def test_one_writer_per_table(tmp_path):
    with store.writer_lock(tmp_path, "captions"):
        probe = subprocess.run(
            [sys.executable, "-c",
             f"from vaemo import store\nwith store.writer_lock({str(tmp_path)!r}, 'captions'): pass"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parents[1],
        )
        assert probe.returncode != 0 and "is being written by pid" in probe.stderr


def test_tiny_mllm_command_says_its_output_is_meaningless(tmp_path):
    made = subprocess.run(vaemo_command("dev", "tiny-mllm", str(tmp_path / "tiny")), capture_output=True, text=True,
                          env=cli_env(tmp_path), timeout=300)
    assert made.returncode == 0 and "meaningless" in made.stdout
    config = json.loads((tmp_path / "tiny" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2_5OmniModel"] and config["thinker_config"]["text_config"]["head_dim"] >= 32
    assert (tmp_path / "tiny" / "model.safetensors").stat().st_size < 8_000_000


def test_model_is_never_downloaded(tmp_path):
    with pytest.raises(EngineError, match="never downloads"):
        resolve_model("Qwen/Qwen2.5-Omni-7B-not-cached")
    with pytest.raises(EngineError, match="no such folder"):
        resolve_model(str(tmp_path / "missing"))


# --- generation --------------------------------------------------------------------------------

class ScriptedEngine:
    """Replies from a script, for the repair logic only (the real engines are exercised below)."""

    name = "scripted"

    def __init__(self, replies: list[str]):
        self.replies, self.requests = list(replies), []

    def generate(self, requests, schema):
        self.requests.extend(requests)
        return [Generation(self.replies.pop(0), 10, 5, 0.01) for _ in requests]


def _rows(db: Path) -> pd.DataFrame:
    return lancedb.connect(str(db)).open_table("captions").to_pandas()


def test_repair_turns_then_failed_status_never_stop_the_batch(shards, tmp_path):
    one = select_clips(pd.read_parquet(shards / "clips.parquet"), CaptionConfig(count=1)).iloc[0]
    db = tmp_path / "db"
    cfg = CaptionConfig(count=1, retries=2, model="scripted")
    engine = ScriptedEngine(["not json", json.dumps({**GOOD, "emotion": "UPPER"}), json.dumps(GOOD)])
    summary = caption(shards, db, cfg, engine=engine)
    assert summary["status_counts"] == {"ok": 1} and [r.attempt for r in engine.requests] == [0, 1, 2]
    repair = engine.requests[2].messages
    assert repair[-2]["role"] == "assistant" and "invalid emotion" in repair[-1]["content"]
    row = _rows(db).iloc[0]
    assert row.clip_id == one.clip_id and row.attempts == 3 and row.raw_output == json.dumps(GOOD)
    assert len(json.loads(row.failures)) == 2 and len(row.description_vec) == 384

    engine = ScriptedEngine(["{}"] * 3)
    summary = caption(shards, db, cfg, engine=engine, force=True)
    row = _rows(db).iloc[0]
    assert summary["status_counts"] == {"failed": 1} and len(_rows(db)) == 1
    assert row.status == "failed" and "after 3 attempt(s)" in row.reason and row.description_vec is None


def test_labels_stay_out_of_the_prompt_unless_label_aware(shards, tmp_path):
    labelled = tmp_path / "labelled"
    labelled.mkdir()
    clips = pd.read_parquet(shards / "clips.parquet").assign(label="angry")
    clips.to_parquet(labelled / "clips.parquet")
    (labelled / "shards").symlink_to(shards / "shards")
    with pytest.raises(ValueError, match="only describe training folds"):
        CaptionConfig(label_aware=True)
    for aware in (False, True):
        engine = ScriptedEngine([json.dumps(GOOD)] * 3)
        cfg = CaptionConfig(count=3, label_aware=aware, exclude_folds=[5], model="scripted")
        caption(labelled, tmp_path / "db", cfg, engine=engine)
        prompts = [json.dumps(r.messages) for r in engine.requests]
        assert all(("angry" in p) == aware for p in prompts)
    rows = _rows(tmp_path / "db")
    assert sorted(rows["prompt_version"].unique()) == ["cot-v1", "cot-v1+label"]
    assert rows.groupby("prompt_version")["label_aware"].all().to_dict() == {"cot-v1": False, "cot-v1+label": True}


def test_unreadable_clip_is_recorded_and_the_shard_goes_on(shards, tmp_path):
    broken = tmp_path / "broken"
    (broken / "shards").mkdir(parents=True)
    clips = pd.read_parquet(shards / "clips.parquet")
    clips.to_parquet(broken / "clips.parquet")
    victim = clips["clip_id"].iloc[0]
    for shard in (shards / "shards").glob("*.tar"):
        with tarfile.open(shard) as src, tarfile.open(broken / "shards" / shard.name, "w") as dst:
            for member in src:
                data = src.extractfile(member).read()
                if member.name == f"{victim}.mp4":
                    data = data[:200]  # truncated video
                member.size = len(data)
                dst.addfile(member, __import__("io").BytesIO(data))
    engine = ScriptedEngine([json.dumps(GOOD)] * 2)
    summary = caption(broken, tmp_path / "db", CaptionConfig(count=3, model="scripted"), engine=engine)
    rows = _rows(tmp_path / "db").set_index("clip_id")
    assert summary["status_counts"] == {"ok": 2, "failed": 1}
    assert rows.at[victim, "status"] == "failed" and rows.at[victim, "reason"].startswith("unreadable media: mp4")


def test_replicas_are_pinned_to_their_own_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert [p.gpus for p in placements(2, 2)] == [("4", "5"), ("6", "7")]
    assert placements(1, 2)[0].environment() == {"CUDA_VISIBLE_DEVICES": "4,5"}
    assert replica_count(CaptionConfig(replicas="auto", tensor_parallel_size=2)) == 2
    with pytest.raises(ValueError, match="need 6 GPUs; this node has 4 visible"):
        placements(3, 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # a CPU host: the cores this process may use are split
    cores = sorted(os.sched_getaffinity(0))
    assert replica_count(CaptionConfig(replicas="auto")) == 1
    assert [p.cores for p in placements(len(cores), 1)] == [(c,) for c in cores]
    assert placements(1, 1)[0].environment()["VLLM_CPU_OMP_THREADS_BIND"] == ",".join(map(str, cores))


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="a placement of one core needs two to differ")
def test_a_replica_process_starts_on_its_cores_before_torch_sizes_its_threads(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    cores = sorted(os.sched_getaffinity(0))
    placement = placements(len(cores), 1)[-1]
    with placement.starting():
        pool = multiprocessing.get_context("spawn").Pool(1)
    with pool:
        threads, child_cores = pool.apply(caption_engines.threads_and_cores)
    assert (threads, child_cores) == (1, list(placement.cores))
    assert sorted(os.sched_getaffinity(0)) == cores and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two replicas need two CPU cores")
def test_a_dead_replica_s_chunk_is_redone_once_and_a_failed_load_names_its_device(shards, tmp_path, monkeypatch):
    """Replica processes with a scripted engine: one dies in its first chunk, the other redoes it."""
    db = tmp_path / "db"
    cfg = CaptionConfig(count=3, model="scripted", replicas=2, batch_clips=1)
    monkeypatch.setenv(caption_engines.CRASH_MARKER, str(tmp_path / "crashed"))
    summary = caption(shards, db, cfg, load=caption_engines.replies)
    rows = _rows(db)
    assert (tmp_path / "crashed").exists() and len(rows) == 3 and rows["clip_id"].is_unique
    assert summary["status_counts"] == {"ok": 3} and summary["engines"]["replicas"] == 2
    assert summary["engines"]["requests_per_generate_call"] == 1.0
    with pytest.raises(EngineError, match=r"caption replica 1 \(CPU core \d+\) could not load its engine: "
                                          "EngineError: no memory left"):
        caption(shards, db, cfg, force=True, load=caption_engines.fails_on_core_1)


def test_vllm_generation_is_stored_once_and_reruns_skip(shards, tiny_mllm, short_prompt, tmp_path):
    """Real vLLM (CPU build) multimodal generation: face frames + voice, structured JSON output; the chunks
    of two clips span shards (one clip per shard)."""
    db = tmp_path / "db"
    cfg = CaptionConfig(
        engine="vllm", model=str(tiny_mllm), prompt=str(short_prompt), count=3, sampling={"max_tokens": 256},
        batch_clips=2,
    )
    first = caption(shards, db, cfg)
    rows = _rows(db)
    assert len(rows) == 3 and rows["clip_id"].is_unique and first["captioned_now"] == 3
    assert rows["shard"].nunique() == 3 and first["engines"]["generate_calls"] >= 2
    assert set(rows["status"]) <= {"ok", "failed"} and (rows["status"] == "ok").any()
    assert rows.loc[rows.status == "failed", "reason"].str.len().gt(0).all()
    ok = rows[rows.status == "ok"].iloc[0]
    assert ok.intensity in {"low", "medium", "high"} and ok.raw_output.startswith("{") and ok.generated_tokens > 0
    assert len(ok.facial_vec) == len(ok.vocal_vec) == 384 and ok.model == tiny_mllm.name and not ok.label_aware
    assert first["tokens_per_second"] > 0 and first["clips_per_second"] > 0

    again = caption(shards, db, cfg)
    assert again["captioned_now"] == 0 and again["already_stored"] == 3 and len(_rows(db)) == 3
    forced = caption(shards, db, cfg, force=True)
    assert forced["captioned_now"] == 3 and len(_rows(db)) == 3
    tags = store.run_tags(lancedb.connect(str(db)).open_table("captions"))
    assert {first["tag"], again["tag"], forced["tag"]} <= set(tags)
    assert store.read_tagged(db, "captions", first["tag"]).count_rows() == 3


def test_transformers_engine_runs_the_same_path(shards, tiny_mllm, tmp_path):
    """The fallback engine has no structured decoding: the random model's replies fail after the repair turns."""
    cfg = CaptionConfig(engine="transformers", model=str(tiny_mllm), count=1, retries=1, sampling={"max_tokens": 16})
    summary = caption(shards, tmp_path / "db", cfg)
    row = _rows(tmp_path / "db").iloc[0]
    assert summary["selected"] == 1 and row.engine == "transformers" and row.attempts in (1, 2)
    assert row.status == "ok" or (
        row.attempts == 2 and "no usable reply" in row.reason and len(json.loads(row.failures)) == 2
    )


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two replicas need two CPU cores")
def test_caption_command_survives_a_kill_and_tracks_lineage(shards, tiny_mllm, short_prompt, tmp_path):
    """`vaemo caption` through Prefect and MLflow with two engine replicas and chunks of two clips across
    shards; killed after its first stored chunk, the re-run finishes the rest, each clip stored once."""
    work, db = tmp_path / "work", tmp_path / "db"
    config = tmp_path / "pipelines.yaml"
    config.write_text("stages:\n  caption:\n    batch_clips: 2\n    replicas: 2\n")
    args = vaemo_command("--config", str(config), "--work-dir", str(work), "caption", "--shards", str(shards),
                         "--db", str(db), "--model", str(tiny_mllm), "--prompt", str(short_prompt), "--count", "3")
    env = cli_env(work)
    log = (tmp_path / "first.log").open("w")  # a file, not a pipe: a full pipe would stall the child
    first = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 600  # two engines start on one core each: minutes when the machine is busy
    stored = 0
    while time.time() < deadline and first.poll() is None:
        try:
            stored = lancedb.connect(str(db)).open_table("captions").count_rows()
        except (ValueError, OSError, RuntimeError):  # the table does not exist yet
            stored = 0
        if stored:
            break
        time.sleep(0.2)
    assert stored and first.poll() is None, (
        "the first run ended before it could be killed: " + (tmp_path / "first.log").read_text()[-3000:]
    )
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    stored = _rows(db)["clip_id"].nunique()  # a second chunk may have landed since the poll

    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = _rows(db)
    assert len(rows) == 3 and rows["clip_id"].is_unique
    assert f"{3 - stored} described now" in done.stdout

    refused = subprocess.run(
        vaemo_command("--work-dir", str(work), "caption", "--shards", str(shards), "--db", str(db), "--model",
                      str(tmp_path / "nowhere")),
        env=env,
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2 and "vaemo: error: model" in refused.stderr and "Traceback" not in refused.stderr

    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    runs = mlflow.search_runs(
        experiment_names=["vaemo"], output_format="list", filter_string="attributes.status = 'FINISHED'"
    )
    run = runs[0]
    assert run.data.tags["vaemo.stage"] == "caption" and run.data.params["prompt_version"] == "cot-v1-short"
    assert (
        run.data.metrics["selected"] == 3
        and sum(v for k, v in run.data.metrics.items() if k.startswith("status.")) == 3
    )
    metrics = run.data.metrics
    if stored == 3:  # on a busy machine the last chunk can land before the kill: the re-run starts no engine
        assert not any(key.startswith("engine.") for key in metrics), sorted(metrics)
    else:
        assert metrics["engine.replicas"] == 2 and metrics["engine.requests_per_generate_call"] >= 1
        assert {"engine.replica.0.clips_per_second", "engine.replica.1.tokens_per_second",
                "engine.wait_share"} <= set(metrics) and 0 <= metrics["engine.wait_share"] <= 1
    # The shards read are a run input; the captions written are an output (run tags: MLflow's outputs are models).
    contexts = {
        d.dataset.name: {t.key: t.value for t in d.tags}.get("mlflow.data.context") for d in run.inputs.dataset_inputs
    }
    assert contexts == {"shards": "input"} and run.data.tags["vaemo.output.captions.table"] == "captions"
    tag, version = run.data.tags["vaemo.output.captions.digest"].split("@v")
    assert store.run_tags(lancedb.connect(str(db)).open_table("captions"))[tag] == int(version)
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    described = {"caption_samples.json"} if stored < 3 else set()  # samples of what this run described
    assert {"prompt", "caption_summary.json"} | described <= artifacts, artifacts
