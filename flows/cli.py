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
    # Concurrency leases (the "gpu" slot) on disk in PREFECT_HOME, not in one server's memory: the
    # temporary server of a later command can then expire the slot of a command that was killed.
    os.environ.setdefault("PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE", "prefect.server.concurrency.lease_storage.filesystem")


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


def _run_stage_flow(name: str, stage_flow, project, **params) -> dict | None:
    """Run a stage flow against the Prefect API: its result, or None after saying why it did not complete."""
    with prefect_api():
        state = stage_flow(**params, work_dir=str(project.work_dir), tracking_cfg=project.tracking, return_state=True)
    if not state.is_completed():
        print(f"vaemo: {name} did not complete: {state.message}", file=sys.stderr)
        return None
    return state.result()


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


def run_pretrain(settings, shards: Path, out: Path, cfg, resume: bool) -> int:
    """Run the pretrain flow; return a process exit code."""
    _environment(settings.work_dir)
    from vaemo.data.loader import shard_urls

    shard_urls(shards)  # a clear error before any flow starts
    from flows.pretrain import pretrain_flow

    metrics = _run_stage_flow("pretrain", pretrain_flow, settings, shards=str(shards), out=str(out), settings=cfg, resume=resume)
    if metrics is None:
        return 1
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


def run_evaluate(settings, model: Path, data: Path, out: Path, cfg) -> int:
    """Run the evaluate flow; return a process exit code."""
    _environment(settings.work_dir)
    from vaemo.eval import prepare

    plan = prepare(model, data, cfg).plan  # a clear error before any flow starts
    print(f"vaemo: {cfg.protocol} {cfg.mode} ({cfg.modality} input) on {len(plan.clips)} labelled clips: {plan.rule}")
    from flows.evaluate import evaluate_flow

    result = _run_stage_flow("evaluate", evaluate_flow, settings, model=str(model), data=str(data), out=str(out),
                             settings=cfg)
    if result is None:
        return 1
    best, last = result["mean"]["best_val"], result["mean"]["last"]
    print(f"vaemo: evaluate done over {result['folds']} folds: UAR {100 * best['uar']:.2f} ± {100 * best['uar_std']:.2f} % "
          f"(best on validation), {100 * last['uar']:.2f} ± {100 * last['uar_std']:.2f} % (last epoch); WAR "
          f"{100 * best['war']:.2f} / {100 * last['war']:.2f} %; chance UAR {100 * result['chance_uar']:.2f} %; "
          f"{out / 'results.json'}, {out / 'report.md'}; MLflow run {result['mlflow_run_id']}")
    return 0


def cmd_evaluate(args) -> int:
    if args.folds is not None and args.folds < 2:
        raise ValueError(f"--folds must be at least 2 (one fold to test, the others to train on), got {args.folds}")
    settings = _settings(args)
    base = settings.stages.evaluate
    updates = {"protocol": args.protocol, "mode": args.mode, "folds": args.folds, "modality": args.modality}
    cfg = base.model_validate({**base.model_dump(), **{k: v for k, v in updates.items() if v is not None}})
    return run_evaluate(settings, Path(args.model), Path(args.data), Path(args.out), cfg)


def run_caption(settings, shards: Path, db: Path, cfg, force: bool) -> int:
    """Run the caption flow; return a process exit code."""
    _environment(settings.work_dir)
    from vaemo.caption.engines import resolve_model
    from vaemo.caption.prompt import load_prompt
    from vaemo.data.loader import shard_urls

    shard_urls(shards)  # clear errors before any flow starts
    resolve_model(cfg.model)
    load_prompt(cfg.prompt)
    from flows.caption import caption_flow

    summary = _run_stage_flow("caption", caption_flow, settings, shards=str(shards), db=str(db), settings=cfg, force=force)
    if summary is None:
        return 1
    counts = ", ".join(f"{k} {v}" for k, v in sorted(summary["status_counts"].items()))
    print(f"vaemo: caption done: {summary['selected']} clips selected ({counts}), {summary['captioned_now']} described now; "
          f"LanceDB {db} table {summary['table']} tag {summary['tag']}; MLflow run {summary['mlflow_run_id']}")
    return 0


def cmd_caption(args) -> int:
    settings = _settings(args)
    updates = {k: v for k, v in {"engine": args.engine, "model": args.model, "prompt": args.prompt, "count": args.count}.items() if v}
    if args.fraction:
        updates.update(count=None, fraction=args.fraction)  # the command line's size wins over the file's
    cfg = settings.stages.caption.model_validate({**settings.stages.caption.model_dump(), **updates})
    return run_caption(settings, Path(args.shards), Path(args.db), cfg, args.force)


def run_align(settings, shards: Path, db: Path, init: Path, out: Path, cfg, resume: bool) -> int:
    """Run the align flow; return a process exit code."""
    _environment(settings.work_dir)
    from vaemo.align.data import load_captions
    from vaemo.align.train import load_stage1
    from vaemo.data.loader import shard_urls

    shard_urls(shards)  # clear errors before any flow starts
    load_stage1(init)
    captions = load_captions(db, shards, cfg)
    print(f"vaemo: {captions.counts['captions_ok']} captioned clips from {db} tag {captions.tag} (version {captions.version}), "
          f"{captions.counts['captions_skipped']} skipped: status not ok")
    from flows.align import align_flow

    m = _run_stage_flow("align", align_flow, settings, shards=str(shards), db=str(db), init=str(init), out=str(out),
                        settings=cfg, resume=resume)
    if m is None:
        return 1
    print(f"vaemo: align done: loss {m['loss_first']:.4f} -> {m['loss_last']:.4f} (global {m['global_first']:.4f} -> "
          f"{m['global_last']:.4f}, modality {m['modality_first']:.4f} -> {m['modality_last']:.4f}); AV->description top-1 "
          f"{m['text_retrieval_top1']:.3f} (before {m.get('init_text_retrieval_top1', float('nan')):.3f}, chance {m['text_retrieval_chance']:.3f}) "
          f"on {m['text_retrieval_clips']} captioned clips; model in {out}, MLflow run {m['mlflow_run_id']}")
    return 0


def cmd_align(args) -> int:
    settings = _settings(args)
    base = settings.stages.align
    updates = {"steps": args.steps, "processes": args.processes, "caption_tag": args.caption_tag, "trainable": args.trainable}
    cfg = base.model_validate({**base.model_dump(), **{k: v for k, v in updates.items() if v is not None}})
    return run_align(settings, Path(args.shards), Path(args.db), Path(args.init), Path(args.out), cfg, args.resume)


def cmd_zeroshot(args) -> int:
    from vaemo.eval.zeroshot import score_clips

    frame = score_clips(Path(args.source), Path(args.model), args.labels.split(","), templates=args.template,
                        modality=args.modality, batch_size=args.batch_size)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".json":
        out.write_text(frame.to_json(orient="records", indent=1))
    else:
        frame.to_csv(out, index=False)
    counts = ", ".join(f"{k} {v}" for k, v in frame["predicted"].value_counts().items())
    print(f"vaemo: {len(frame)} clips scored against {args.labels} ({counts}); probabilities in {out}")
    return 0


def cmd_search(args) -> int:
    from vaemo.align.search import search

    found, tag = search(Path(args.db), args.text, args.k, tag=args.tag, table_name=args.table, modality=args.modality)
    print(f"vaemo: {len(found)} nearest clips to {args.text!r} ({args.modality}, run {tag}):")
    for rank, row in enumerate(found.itertuples(), 1):
        about = " ".join(f"{k}={getattr(row, k)}" for k in ("dataset", "speaker", "label", "emotion") if isinstance(getattr(row, k), str))
        print(f"{rank:>3}  {row.score:+.4f}  {row.clip_id}  {row.source if isinstance(row.source, str) else ''}  {about}")
    return 0


def cmd_dev_tiny_mllm(args) -> int:
    from vaemo.caption.tiny import WARNING, build_tiny_mllm

    out = build_tiny_mllm(Path(args.out))
    print(f"vaemo: tiny Qwen2.5-Omni thinker written to {out} ({WARNING})")
    return 0


def run_pipeline(settings, name: str) -> int:
    """Run the ``vaemo_pipeline`` flow for one named pipeline; return a process exit code."""
    _environment(settings.work_dir)
    from flows.pipeline import layout, preflight, vaemo_pipeline

    preflight(settings, name)  # clear errors before a Prefect server starts
    with prefect_api():
        state = vaemo_pipeline(pipeline=name, settings=settings, return_state=True)
    if not state.is_completed():
        print(f"vaemo: pipeline {name} did not complete: {state.message}", file=sys.stderr)
        return 1
    result = state.result()
    children = ", ".join(f"{stage} {run_id}" + (" (skipped)" if stage in result["skipped"] else "") for stage, run_id in result["children"].items())
    print(f"vaemo: pipeline {name} done: MLflow run {result['mlflow_run_id']} (Prefect flow run {result['flow_run_id']}); "
          f"stages: {children}")
    outputs = layout(settings.work_dir, name)
    print(f"vaemo: look at the MLflow run {result['mlflow_run_id']} in {settings.mlflow_uri()} (`vaemo ui` serves it), "
          f"`vaemo lineage {result['mlflow_run_id']}`, and the outputs in {outputs['root']}:")
    for what, path in (("shards", outputs["corpora"]), ("Stage 1 model", outputs["pretrain"]), ("LanceDB captions", outputs["caption"]),
                       ("Stage 2 model", outputs["align"]), ("evaluation report", outputs["evaluate"] / "report.md")):
        if path.exists():
            print(f"  {what}: {path}")
    return 0


def _pipelines_file_settings(args):
    from vaemo.config import load_settings

    settings = load_settings(Path(args.pipelines_file))
    if args.work_dir:
        settings.work_dir = Path(args.work_dir)
    if getattr(args, "workers", None):
        settings.dask.workers = args.workers
    return settings


def cmd_run(args) -> int:
    return run_pipeline(_pipelines_file_settings(args), args.pipeline)


def cmd_serve(args) -> int:
    """Serve the deployments of a pipelines.yaml until Ctrl-C: flow runs triggered in the UI or by schedules run here."""
    from vaemo.config import ConfigError

    settings = _pipelines_file_settings(args)
    if not settings.pipelines:
        raise ConfigError(f"{args.pipelines_file}: no pipelines to serve")
    _environment(settings.work_dir)
    if not os.environ.get("PREFECT_API_URL"):
        raise ConfigError("vaemo serve needs a running Prefect server: start `vaemo ui` and export the PREFECT_API_URL it "
                          "prints, or set PREFECT_API_URL to your server's API (http://HOST:4200/api)")
    from prefect import serve

    from flows.serve import deployments

    served = deployments(settings)
    schedules = {name: spec.schedule for name, spec in settings.pipelines.items() if spec.schedule}
    print(f"vaemo: serving {', '.join(f'{d.flow_name}/{d.name}' for d in served)} on {os.environ['PREFECT_API_URL']}"
          + (f"; schedules (UTC): {schedules}" if schedules else "") + "; Ctrl-C stops", flush=True)
    try:
        serve(*served, print_starting_message=False)
    except KeyboardInterrupt:
        print("vaemo: stopped serving (scheduled runs are paused until the next `vaemo serve`)")
    return 0


def cmd_ui(args) -> int:
    """A Prefect server and an MLflow server over the work directory, until Ctrl-C."""
    import signal
    import time
    from urllib.parse import urlparse

    from vaemo.config import DEFAULT_MLFLOW_UI
    from vaemo.servers import local_servers, start_all, stop_all

    settings = _settings(args)
    _environment(settings.work_dir)
    mlflow_port = args.mlflow_port or urlparse(settings.tracking.ui_url or DEFAULT_MLFLOW_UI).port
    servers = local_servers(settings.work_dir, settings.mlflow_uri(), args.host, args.prefect_port, mlflow_port)

    def stop_on_sigterm(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop_on_sigterm)
    print(f"vaemo: starting the Prefect and MLflow servers (logs in {settings.work_dir / 'logs'})", flush=True)
    try:
        start_all(servers)
        prefect, mlflow = servers
        print(f"vaemo: Prefect UI {prefect.url}\nvaemo: MLflow UI  {mlflow.url}", flush=True)
        print(f"vaemo: export PREFECT_API_URL={prefect.url}/api for `vaemo run` and `vaemo serve` to use this server; "
              "Ctrl-C stops both", flush=True)
        while all(server.running() for server in servers):
            time.sleep(1)
        stopped = next(server for server in servers if not server.running())
        print(f"vaemo: error: the {stopped.name} server stopped (log {stopped.log}):\n{stopped.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vaemo: stopping the servers", flush=True)
        return 0
    finally:
        stop_all(servers)


def cmd_dev_demo_inputs(args) -> int:
    """The demo pipeline's inputs, made once: a labelled talking-face corpus and the tiny captioning model."""
    from flows.pipeline import stage_settings
    from vaemo import synth
    from vaemo.caption.tiny import WARNING, build_tiny_mllm
    from vaemo.config import ConfigError

    settings = _settings(args)
    if "demo" not in settings.pipelines or not settings.pipelines["demo"].corpora:
        raise ConfigError(f"{args.config}: no `demo` pipeline")
    spec = settings.pipelines["demo"]
    corpus = settings.corpora[spec.corpora[0]]
    if corpus.labels != corpus.path / "labels.csv":
        raise ConfigError(f"{args.config}: the demo corpus needs `labels: {corpus.path / 'labels.csv'}` (the generated labels)")
    if not corpus.labels.is_file():
        print(f"vaemo: generating a labelled demo corpus in {corpus.path} (3 speakers x 3 emotions x 2 clips)", flush=True)
        synth.labelled_corpus(corpus.path, classes=3, speakers=3, clips_per_class=2, seed=0)
    model = Path(stage_settings(settings, spec, "caption").model)
    if not (model / "config.json").is_file():
        build_tiny_mllm(model)
        print(f"vaemo: tiny captioning model written to {model} ({WARNING})")
    print(f"vaemo: demo inputs ready; next: vaemo run {args.config} --pipeline demo")
    return 0


def cmd_lineage(args) -> int:
    from vaemo.lineage import chain, format_chain

    settings = _settings(args)
    print(format_chain(chain(args.run_id, settings.mlflow_uri())))
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

    evaluate = sub.add_parser("evaluate", help="benchmark evaluation: folds, probe / fine-tune / zero-shot, UAR/WAR, report")
    evaluate.add_argument("--model", required=True, help="a model folder (model.safetensors + config.json)")
    evaluate.add_argument("--data", required=True, help="an ingest output folder of a labelled corpus")
    evaluate.add_argument("--protocol", required=True, choices=["crema-d", "mafw", "ravdess", "dfew", "generic"])
    evaluate.add_argument("--mode", required=True, choices=["probe", "finetune", "zeroshot"],
                          help="linear probe on frozen features, full fine-tuning, or zero-shot (Stage 2 models)")
    evaluate.add_argument("--out", required=True, help="output folder: results.json, report.md, PNG figures, folds/")
    evaluate.add_argument("--folds", type=int, help="K folds (default: the protocol's official folds; see README)")
    evaluate.add_argument("--modality", choices=["av", "video", "audio"], help="input (default: from pipelines.yaml, else av)")
    evaluate.set_defaults(func=cmd_evaluate)

    caption = sub.add_parser("caption", help="chain-of-thought affective descriptions of a subset of clips, into LanceDB")
    caption.add_argument("--shards", required=True, help="an ingest output folder")
    caption.add_argument("--db", required=True, help="LanceDB folder (table: captions)")
    caption.add_argument("--engine", choices=["vllm", "transformers"], help="default: from pipelines.yaml (vllm)")
    caption.add_argument("--model", help="a local model folder or a hub id in the local Hugging Face cache")
    caption.add_argument("--prompt", help="a bundled prompt name or a prompt YAML file (default: cot-v1)")
    size = caption.add_mutually_exclusive_group()
    size.add_argument("--count", type=int, help="clips to describe")
    size.add_argument("--fraction", type=float, help="share of the eligible clips to describe")
    caption.add_argument("--force", action="store_true", help="describe the selected clips again, replacing stored rows")
    caption.set_defaults(func=cmd_caption)

    align = sub.add_parser("align", help="Stage 2: align the Stage 1 AV space with the captions (dual-path contrastive)")
    align.add_argument("--shards", required=True, help="an ingest output folder")
    align.add_argument("--db", required=True, help="LanceDB folder with the captions table; clip_embeddings is written there")
    align.add_argument("--init", required=True, help="the Stage 1 model folder (the --out of `vaemo pretrain`)")
    align.add_argument("--out", required=True, help="output folder: model.safetensors, config.json, text heads, text_alignment.json, metrics.json")
    align.add_argument("--steps", type=int)
    align.add_argument("--caption-tag", help="captions table version tag to read (default: the newest caption run's)")
    align.add_argument("--trainable", choices=["all", "heads", "last_k"], help="what trains besides the text heads (default: from pipelines.yaml)")
    align.add_argument("--processes", type=int, help="processes on this node (torchrun/DDP when more than 1)")
    align.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    align.set_defaults(func=cmd_align)

    zeroshot = sub.add_parser("zeroshot", help="per-clip emotion probabilities from text prompts, with a Stage 2 model")
    zeroshot.add_argument("source", help="a video file, a folder of videos, or an ingest folder")
    zeroshot.add_argument("--model", required=True, help="a Stage 2 (aligned) model folder")
    zeroshot.add_argument("--labels", required=True, help="comma-separated labels, e.g. angry,happy,sad")
    zeroshot.add_argument("--template", action="append", help="prompt template with {label}; repeatable (default: the model's)")
    zeroshot.add_argument("--modality", choices=["av", "video", "audio"], default="av")
    zeroshot.add_argument("--out", default="zeroshot.csv", help="CSV (or .json) of clip_id, predicted, p_<label>... (default: %(default)s)")
    zeroshot.add_argument("--batch-size", type=int, default=8)
    zeroshot.set_defaults(func=cmd_zeroshot)

    search = sub.add_parser("search", help="the clips nearest to a text, from the clip embeddings written by `vaemo align`")
    search.add_argument("--db", required=True, help="the LanceDB folder given to `vaemo align`")
    search.add_argument("--text", required=True, help='e.g. "a trembling voice and a tense face"')
    search.add_argument("--k", type=int, default=5)
    search.add_argument("--modality", choices=["av", "video", "audio"], default="av", help="fused embedding, or one stream's")
    search.add_argument("--tag", help="an align run's tag (default: the newest)")
    search.add_argument("--table", default="clip_embeddings")
    search.set_defaults(func=cmd_search)

    dev = sub.add_parser("dev", help="tools for tests, demos and install checks")
    dev_sub = dev.add_subparsers(dest="dev_command", required=True)
    tiny = dev_sub.add_parser("tiny-mllm", help="build a tiny random-weight Qwen2.5-Omni thinker (meaningless output)")
    tiny.add_argument("out", help="folder to write the model to")
    tiny.set_defaults(func=cmd_dev_tiny_mllm)
    demo_inputs = dev_sub.add_parser("demo-inputs", help="generate the demo pipeline's corpus and tiny captioning model (once)")
    demo_inputs.set_defaults(func=cmd_dev_demo_inputs)

    run = sub.add_parser("run", help="run a named pipeline of a pipelines.yaml (ingest -> pretrain -> caption -> align -> evaluate)")
    run.add_argument("pipelines_file", help="a pipelines.yaml")
    run.add_argument("--pipeline", required=True, help="a name under `pipelines:`")
    run.add_argument("--workers", type=int, help="local Dask worker processes for ingest")
    run.set_defaults(func=cmd_run)

    serve = sub.add_parser("serve", help="serve a pipelines.yaml as Prefect deployments (UI triggers, schedules, new corpora)")
    serve.add_argument("pipelines_file", help="a pipelines.yaml")
    serve.set_defaults(func=cmd_serve)

    ui = sub.add_parser("ui", help="start a local Prefect server and an MLflow server; Ctrl-C stops both")
    ui.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    ui.add_argument("--prefect-port", type=int, default=4200, help="default: %(default)s")
    ui.add_argument("--mlflow-port", type=int, help="default: the port of tracking.ui_url, else 5000")
    ui.set_defaults(func=cmd_ui)

    lineage = sub.add_parser("lineage", help="walk an MLflow run back to its shards, captions and models")
    lineage.add_argument("run_id", help="an MLflow run id (an evaluation run, or any stage's)")
    lineage.set_defaults(func=cmd_lineage)

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
