"""The ``vaemo`` command. Each subcommand runs the matching Prefect flow.

Prefect and MLflow keep their state in the work directory (``./vaemo-work`` by default), so a
fresh checkout runs without any server: Prefect starts a temporary one unless PREFECT_API_URL is
set.
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from pathlib import Path

DEFAULT_CONFIG = "pipelines.yaml"


def _environment(work_dir: Path) -> None:
    """Set before Prefect is imported: its settings are read once."""
    os.environ.setdefault("PREFECT_HOME", str((work_dir / "prefect").resolve()))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The temporary server migrates its database on first start; a busy machine needs more than 20 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_LOG_PRINTS", "true")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


@contextmanager
def prefect_api():
    """Use PREFECT_API_URL when set; else one temporary local server for this command.

    Prefect would start its temporary server lazily in every process, so each Dask worker would
    boot its own; exporting one URL before the cluster starts lets all of them share it.
    """
    if os.environ.get("PREFECT_API_URL"):
        yield os.environ["PREFECT_API_URL"]
        return
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = SubprocessASGIServer()
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        # Send buffered logs and events while the server is still up; afterwards they would be
        # retried against a closed port at interpreter exit.
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)
        EventsWorker.drain_all(timeout=10)
        del os.environ["PREFECT_API_URL"]
        server.stop()


def _settings(args):
    from vaemo.config import Settings, load_settings

    path = Path(args.config)
    if path.exists():
        settings = load_settings(path)
    elif args.config != DEFAULT_CONFIG:
        from vaemo.config import ConfigError

        raise ConfigError(f"{path}: configuration file not found")
    else:
        settings = Settings()
    if args.work_dir:
        settings.work_dir = Path(args.work_dir)
    if getattr(args, "workers", None):
        settings.dask.workers = args.workers
    if getattr(args, "dask_address", None):
        settings.dask.address = args.dask_address
    return settings


def run_ingest(settings, source: Path, out: Path, dataset: str, labels: Path | None) -> int:
    """Run the ingest flow; return a process exit code (0 ok, 1 some batches failed, 2 refused)."""
    _environment(settings.work_dir)
    from vaemo.ingest.adapters import scan_corpus
    from vaemo.ingest.media import require_ffmpeg

    require_ffmpeg()
    records = scan_corpus(source, dataset, labels)  # a clear error before any flow starts
    print(f"vaemo: {len(records)} videos under {source} ({dataset})")

    from flows.ingest import ingest_flow, parallelism, task_runner

    with prefect_api():
        state = ingest_flow.with_options(task_runner=task_runner(settings.dask))(
            source=str(source),
            out=str(out),
            dataset=dataset,
            labels=str(labels) if labels else None,
            work_dir=str(settings.work_dir),
            ingest=settings.stages.ingest,
            tracking_cfg=settings.tracking,
            workers=parallelism(settings.dask),
            return_state=True,
        )
    if state.is_completed():
        stats = state.result()
        counts = ", ".join(f"{k} {v}" for k, v in stats["status_counts"].items())
        print(f"vaemo: ingest done: {stats['clips']} clips in {stats['shards']} shards under {out} ({counts})")
        return 0
    print(f"vaemo: ingest did not complete: {state.message}", file=sys.stderr)
    return 1 if "batches failed" in (state.message or "") else 2


def cmd_ingest(args) -> int:
    settings = _settings(args)
    return run_ingest(settings, Path(args.source), Path(args.out), args.dataset, Path(args.labels) if args.labels else None)


DEMO_PRETRAIN_STEPS = 20  # enough to see the loss move on a laptop, not a trained model


def cmd_demo(args) -> int:
    """Generate a small talking-face corpus and run the main job on it: ingest, then Stage 1."""
    settings = _settings(args)
    from vaemo import synth

    corpus = settings.corpora.get("demo")
    folder = corpus.path if corpus else settings.work_dir / "demo-media"
    if not any(folder.glob("*.mp4")):
        print(f"vaemo: generating demo media in {folder}")
        synth.demo_corpus(folder)
    shards = settings.work_dir / "corpora" / "demo"
    code = run_ingest(settings, folder, shards, corpus.dataset if corpus else "generic", None)
    if code != 0:
        return code
    model = settings.work_dir / "models" / "demo-stage1"
    cfg = settings.stages.pretrain.model_copy(update={"steps": DEMO_PRETRAIN_STEPS, "batch_size": 4, "checkpoint_every": 10})
    code = run_pretrain(settings, shards, model, cfg, resume=False)
    if code == 0:
        print(f"vaemo: look at {shards / 'manifest.parquet'}, {shards / 'stats.json'}, the model in {model}, "
              f"and the MLflow store {settings.mlflow_uri()}")
    return code


def run_pretrain(settings, shards: Path, out: Path, cfg, resume: bool) -> int:
    """Run the pretrain flow; return a process exit code."""
    _environment(settings.work_dir)
    from vaemo.data.loader import shard_urls

    shard_urls(shards)  # a clear error before any flow starts
    from flows.pretrain import pretrain_flow

    with prefect_api():
        state = pretrain_flow(shards=str(shards), out=str(out), settings=cfg, resume=resume,
                              work_dir=str(settings.work_dir), tracking_cfg=settings.tracking, return_state=True)
    if not state.is_completed():
        print(f"vaemo: pretrain did not complete: {state.message}", file=sys.stderr)
        return 1
    metrics = state.result()
    print(f"vaemo: pretrain done: loss {metrics['loss_first']:.4f} -> {metrics['loss_last']:.4f}, video->audio top-1 "
          f"{metrics['av_retrieval_top1']:.3f} (chance {metrics['av_retrieval_chance']:.3f}); model in {out}, "
          f"MLflow run {metrics['mlflow_run_id']}")
    return 0


def cmd_pretrain(args) -> int:
    settings = _settings(args)
    updates = {"model": args.model_config, "steps": args.steps, "processes": args.processes}
    cfg = settings.stages.pretrain.model_validate({**settings.stages.pretrain.model_dump(), **{k: v for k, v in updates.items() if v}})
    return run_pretrain(settings, Path(args.shards), Path(args.out), cfg, args.resume)


def cmd_model_info(args) -> int:
    from vaemo.model import av

    info = av.model_info(av.config_for(args.model_config))
    print(f"model {info['name']}")
    for part, count in info["params"].items():
        print(f"  params.{part:<18} {count:>12,}")
    for key, value in info.items():
        if key.endswith("gflops"):
            print(f"  {key:<25} {value:>10.2f}")
    print(f"  tokens: {info['tokens']}")
    return 0


def cmd_embed(args) -> int:
    import numpy as np

    from vaemo.embed import encode

    vectors = encode(Path(args.source), Path(args.model), args.modality, batch_size=args.batch_size)
    if not vectors:
        print(f"vaemo: error: no clip of {args.source} could be embedded", file=sys.stderr)
        return 2
    ids = sorted(vectors)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, clip_id=np.array(ids), embedding=np.stack([vectors[i] for i in ids]))
    print(f"vaemo: {len(ids)} {args.modality} embeddings of size {len(vectors[ids[0]])} written to {out}")
    return 0


def cmd_config(args) -> int:
    settings = _settings(args)
    settings.check_corpus_paths(source=args.config)
    print(f"{args.config}: valid ({len(settings.corpora)} corpora, {len(settings.pipelines)} pipelines)")
    return 0


def parser() -> argparse.ArgumentParser:
    from vaemo.config import DatasetName

    datasets = list(DatasetName.__args__)
    top = argparse.ArgumentParser(prog="vaemo", description="Audio-visual emotion representation learning pipeline.")
    top.add_argument("--config", default=DEFAULT_CONFIG, help="pipelines.yaml with stage settings (default: %(default)s if present)")
    top.add_argument("--work-dir", help="where MLflow, Prefect and outputs live (default: from the config, else ./vaemo-work)")
    sub = top.add_subparsers(dest="command", required=True)

    ingest = sub.add_parser("ingest", help="cut a video corpus into face + voice WebDataset shards")
    ingest.add_argument("source", help="corpus folder")
    ingest.add_argument("--dataset", choices=datasets, default="auto")
    ingest.add_argument("--out", required=True, help="output folder (shards/, manifest.parquet, stats.json)")
    ingest.add_argument("--labels", help="labels CSV (generic) or split folder (MAFW, DFEW)")
    ingest.add_argument("--workers", type=int, help="local Dask worker processes")
    ingest.add_argument("--dask-address", help="use an existing Dask scheduler instead of a local cluster")
    ingest.set_defaults(func=cmd_ingest)

    demo = sub.add_parser("demo", help="generate media and run the pipeline on it")
    demo.set_defaults(func=cmd_demo)

    pretrain = sub.add_parser("pretrain", help="Stage 1: pre-train the unified AV encoder on ingest shards")
    pretrain.add_argument("--shards", required=True, help="an ingest output folder")
    pretrain.add_argument("--config", dest="model_config", choices=["tiny", "small", "base"], help="model size (default: from pipelines.yaml)")
    pretrain.add_argument("--out", required=True, help="output folder: model.safetensors, config.json, checkpoints/, metrics.json")
    pretrain.add_argument("--steps", type=int)
    pretrain.add_argument("--processes", type=int, help="processes on this node (torchrun/DDP when more than 1)")
    pretrain.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    pretrain.set_defaults(func=cmd_pretrain)

    info = sub.add_parser("model-info", help="parameters per part and GFLOPs per clip")
    info.add_argument("--config", dest="model_config", choices=["tiny", "small", "base"], default="tiny")
    info.set_defaults(func=cmd_model_info)

    embed = sub.add_parser("embed", help="clip embeddings of a video, a folder of videos, or an ingest folder")
    embed.add_argument("source")
    embed.add_argument("--model", required=True, help="a model folder (model.safetensors + config.json)")
    embed.add_argument("--out", required=True, help="an .npz file with clip_id and embedding arrays")
    embed.add_argument("--modality", choices=["av", "video", "audio"], default="av")
    embed.add_argument("--batch-size", type=int, default=8)
    embed.set_defaults(func=cmd_embed)

    config = sub.add_parser("config", help="validate a pipelines.yaml")
    config.set_defaults(func=cmd_config)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from vaemo.config import ConfigError
    from vaemo.ingest.adapters import CorpusError

    try:
        return args.func(args)
    except (ConfigError, CorpusError, RuntimeError, OSError, ValueError) as exc:
        print(f"vaemo: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vaemo: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
