"""Shared fixtures: generated media (real ffmpeg, espeak-ng, the astronaut face) and quiet services."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Nothing is fetched at test time, Prefect keeps its state out of the user's home, and a work directory's Prefect
# server stops with the last command that uses it, so no test leaves one running.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("VAEMO_PREFECT_SERVER_IDLE_SECONDS", "0")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """Three speaking faces with different sentences and voices."""
    from vaemo import synth

    folder = tmp_path_factory.mktemp("corpus")
    synth.demo_corpus(folder, n_videos=3, seed=1)
    return folder


@pytest.fixture(scope="session")
def bad_cases(tmp_path_factory) -> dict[str, Path]:
    from vaemo import synth

    return synth.bad_inputs(tmp_path_factory.mktemp("bad"))


def vaemo_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", *args]


def cli_env(work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_"))}
    env.update(PREFECT_HOME=str(work / "prefect"), PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1",
               VAEMO_PREFECT_SERVER_IDLE_SECONDS="0")
    return env


@contextmanager
def own_prefect_server(work: Path, monkeypatch):
    """A Prefect server of the test's own, its home under ``work``; yields the server and the environment
    of commands that report to it."""
    from prefect.server.api.server import SubprocessASGIServer

    env = cli_env(work)
    Path(env["PREFECT_HOME"]).mkdir(parents=True)
    monkeypatch.setenv("PREFECT_HOME", env["PREFECT_HOME"])
    server = SubprocessASGIServer()
    server.start(timeout=120)  # its first start migrates a new database: slow on a busy machine
    env["PREFECT_API_URL"] = server.api_url
    try:
        yield server, env
    finally:
        server.stop()


def ingest_folder(source: Path, out: Path, cfg=None, labels: Path | None = None):
    """The library path of an ingest run, in this process: (stats, batches)."""
    from vaemo.config import IngestConfig
    from vaemo.ingest import shards as shard_io
    from vaemo.ingest.run import IngestRun

    cfg = cfg or IngestConfig()
    with IngestRun(source, out, "generic", cfg, labels=labels) as run:
        plan = run.plan()
        for batch in plan.batches:
            shard_io.run_batch(batch, out, cfg)
        return run.finalize(plan), plan.batches


@pytest.fixture(scope="session")
def shards(corpus, tmp_path_factory) -> Path:
    """An ingest folder of the corpus with one video per batch: three shards of one clip each."""
    from vaemo.config import IngestConfig

    out = tmp_path_factory.mktemp("ingested")
    ingest_folder(corpus, out, IngestConfig(videos_per_batch=1))
    return out


@pytest.fixture(scope="session")
def tiny_mllm(tmp_path_factory) -> Path:
    """The tiny random-weight Qwen2.5-Omni thinker, built locally once per session."""
    from vaemo.caption.tiny import build_tiny_mllm

    return build_tiny_mllm(tmp_path_factory.mktemp("tiny-mllm"))


@pytest.fixture(scope="session")
def short_prompt() -> Path:
    """The bundled prompt with short answer limits, so a random-weight model finishes its JSON quickly."""
    from vaemo.caption.prompt import PROMPTS_DIR

    return PROMPTS_DIR / "cot-v1-short.yaml"


@pytest.fixture(scope="session")
def labelled_source(tmp_path_factory) -> tuple[Path, Path]:
    """A labelled corpus for the whole pipeline (2 classes, 3 speakers, 2 clips each) and its label file."""
    from vaemo import synth

    source = tmp_path_factory.mktemp("labelled-src")
    return source, synth.labelled_corpus(source, classes=2, speakers=3, clips_per_class=2, seed=4)


def fast_stages(tiny_mllm: Path, short_prompt: Path) -> dict:
    """Stage settings under which all five stages run in seconds on the generated corpora."""
    return {
        "ingest": {"videos_per_batch": 12},
        "pretrain": {"steps": 2, "batch_size": 3, "num_workers": 0, "warmup_steps": 1, "eval_clips": 3,
                     "checkpoint_every": 100},
        "caption": {"engine": "vllm", "model": str(tiny_mllm), "prompt": str(short_prompt), "count": 4,
                    "sampling": {"max_tokens": 256}},
        "align": {"steps": 2, "batch_size": 2, "num_workers": 0, "warmup_steps": 1, "checkpoint_every": 100,
                  "embeddings_table": None, "retrieval_before": False},
        "evaluate": {"tsne_clips": 0, "probe": {"epochs": 5}},
    }
