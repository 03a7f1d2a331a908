"""The ``vaemo`` command: parse the arguments, run the matching flow (or library call), print its summary.

Prefect and MLflow keep their state in the work directory (``./vaemo-work`` by default), so a
fresh checkout runs without any server to set up: unless PREFECT_API_URL is set, the commands on a
work directory share a local Prefect server, which the first one starts (vaemo/prefect_server.py).
Exit codes: 0 done; 1 did not complete (some work failed, or the storage refused a write: one line;
or a bug, whose traceback is printed and logged); 2 refused, with one line that says what to fix.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import signal
import sys
import time
import traceback
import types
import typing
from importlib import import_module
from pathlib import Path

from flows.environment import log_to, prepare, run_flow
from vaemo.config import DatasetName, Settings, load_settings, with_overrides
from vaemo.errors import ConfigError, VaemoError
from vaemo.registry import MODALITIES, MODEL_PRESETS
from vaemo.servers import stop_on_signals

DEFAULT_CONFIG, DEFAULT_WORK_DIR = "pipelines.yaml", "vaemo-work"


def settings_of(args, required: bool = False, prefect: bool = False):
    """The pipelines file's settings (``--config``; the defaults when it is absent and not ``required``) with the
    command line's work dir and Dask options; this command's log file; Prefect's environment when it will run."""
    path = Path(args.config or DEFAULT_CONFIG)
    if not path.exists() and (args.config or required):
        raise ConfigError(f"{path}: configuration file not found")
    settings = load_settings(path) if path.exists() else Settings()
    if args.work_dir:
        settings.work_dir = Path(args.work_dir)
    for option, field in (("workers", "workers"), ("dask_address", "address")):
        if getattr(args, option, None):
            setattr(settings.dask, field, getattr(args, option))
    args.log = log_to(Path(settings.work_dir) / "logs" / f"vaemo-{args.command}.log")
    if prefect:
        prepare(settings)
    return settings


SETTING = "setting:"  # the destination prefix of options that replace a stage's settings for one run


def stage_params(args, stage: str) -> tuple:
    """The settings, and what every stage flow takes: the stage's settings (the command line's options replace the
    file's values for this run), the work dir and tracking; then Prefect's environment is set."""
    settings = settings_of(args)
    given = {k.removeprefix(SETTING): v for k, v in vars(args).items() if k.startswith(SETTING) and v is not None}
    if given.get("fraction") is not None:
        given["count"] = None  # the command line's size wins over the file's
    cfg = with_overrides(getattr(settings.stages, stage), given, "command line")
    prepare(settings)
    return settings, {"settings": cfg, "work_dir": str(settings.work_dir), "tracking_cfg": settings.tracking}


def imported(name: str):
    """``module:attribute`` of flows/, imported once Prefect's environment is set (``settings_of(prefect=True)``)."""
    module, _, attribute = name.partition(":")
    return getattr(import_module(f"flows.{module}"), attribute)


def flow_of(name: str, *factory_args):
    """What imports a flow (``run_flow`` does it while the Prefect server starts); with ``factory_args``, ``name``
    is a function that makes the flow from them."""
    return lambda: imported(name)(*factory_args) if factory_args else imported(name)


def cmd_ingest(args) -> int:
    settings, params = stage_params(args, "ingest")
    return run_flow(flow_of("ingest:on_cluster", settings.dask), source=args.source, out=args.out,
                    dataset=args.dataset, labels=args.labels, workers=settings.dask.parallelism(), **params)


def cmd_pretrain(args) -> int:
    _, params = stage_params(args, "pretrain")
    return run_flow(flow_of("pretrain:pretrain_flow"), shards=args.shards, out=args.out, resume=args.resume,
                    **params)


def cmd_caption(args) -> int:
    _, params = stage_params(args, "caption")
    return run_flow(flow_of("caption:caption_flow"), shards=args.shards, db=args.db, force=args.force, **params)


def cmd_align(args) -> int:
    _, params = stage_params(args, "align")
    return run_flow(flow_of("align:align_flow"), shards=args.shards, db=args.db, init=args.init, out=args.out,
                    resume=args.resume, **params)


def cmd_evaluate(args) -> int:
    _, params = stage_params(args, "evaluate")
    return run_flow(flow_of("evaluate:evaluate_flow"), model=args.model_dir, data=args.data, out=args.out, **params)


def cmd_run(args) -> int:
    settings = settings_of(args, required=True, prefect=True)  # before any flow is imported
    return run_flow(flow_of("pipeline:vaemo_pipeline"), f"pipeline {args.pipeline}", pipeline=args.pipeline,
                    settings=settings)


def cmd_serve(args) -> int:
    settings = settings_of(args, required=True, prefect=True)
    return imported("serve:serve_pipelines")(settings, args.config or DEFAULT_CONFIG)


def cmd_ui(args) -> int:
    settings = settings_of(args, prefect=True)
    return import_module("vaemo.servers").run_local_servers(settings, args.host, args.prefect_port, args.mlflow_port,
                                                            args.allow_unauthenticated)


# The commands below are library calls without a flow: each returns the text to print (exit 0).


def cmd_model_info(args) -> str:
    from vaemo.model import av

    return av.describe(av.model_info(av.config_for(args.preset)))


def cmd_embed(args) -> str:
    from vaemo.embed import write_embeddings

    return "vaemo: " + write_embeddings(Path(args.source), Path(args.model_dir), Path(args.out), args.modality,
                                        args.batch_size)


def cmd_zeroshot(args) -> str:
    from vaemo.eval.zeroshot import write_scores

    return "vaemo: " + write_scores(Path(args.source), Path(args.model_dir), args.labels.split(","), Path(args.out),
                                    args.template, args.modality, args.batch_size)


def cmd_search(args) -> str:
    from vaemo.align.search import describe, search

    found, tag = search(Path(args.db), args.text, args.k, tag=args.tag, table_name=args.table, modality=args.modality,
                        match=args.match)
    return describe(found, tag, args.text, args.modality, args.match)


def cmd_lineage(args) -> str:
    from vaemo.lineage import chain, format_chain

    return format_chain(chain(args.run_id, settings_of(args).mlflow_uri()))


def cmd_config(args) -> str:
    settings, source = settings_of(args, required=True), args.config or DEFAULT_CONFIG
    settings.check_corpus_paths(source=source)
    return f"{source}: valid ({len(settings.corpora)} corpora, {len(settings.pipelines)} pipelines)"


def cmd_dev_tiny_mllm(args) -> str:
    from vaemo.caption.tiny import WARNING, build_tiny_mllm

    return f"vaemo: tiny Qwen2.5-Omni thinker written to {build_tiny_mllm(Path(args.out))} ({WARNING})"


def cmd_dev_demo_inputs(args) -> int:
    from vaemo.synth import demo_inputs

    for line in demo_inputs(settings_of(args, required=True), args.config or DEFAULT_CONFIG):
        print(f"vaemo: {line}", flush=True)
    return 0


def parser() -> argparse.ArgumentParser:
    from vaemo.config import AlignConfig, CaptionConfig, EvaluateConfig, IngestConfig, PretrainConfig

    # --config and --work-dir before or after the command's name (after it, they win); absent unless given.
    shared = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    shared.add_argument("--config", help=f"the pipelines file with the stage settings (default: ./{DEFAULT_CONFIG})")
    shared.add_argument("--work-dir", help=f"where outputs, MLflow and Prefect live (default: the file's, else "
                                           f"./{DEFAULT_WORK_DIR})")
    top = argparse.ArgumentParser(prog="vaemo", description="Audio-visual emotion representation learning pipeline.",
                                  parents=[shared])
    commands = top.add_subparsers(dest="command", required=True)

    def command(name: str, func, about: str, *options: tuple, within=commands) -> None:
        one = within.add_parser(name, help=about, description=about, parents=[shared])
        for flags, kwargs in options:
            one.add_argument(*flags, **kwargs)
        one.set_defaults(func=func)

    def opt(*flags: str, **kwargs) -> tuple:
        return flags, kwargs

    def setting(model, name: str, flag: str | None = None, **extra) -> tuple:
        """An option that replaces one setting for this run: its type, choices and help come from the setting."""
        field = model.model_fields[name]
        union = typing.get_origin(field.annotation) in (typing.Union, types.UnionType)
        kind = next(a for a in typing.get_args(field.annotation) if a is not type(None)) if union else field.annotation
        choices = list(typing.get_args(kind)) if typing.get_origin(kind) is typing.Literal else None
        default = "" if extra.get("required") else f" (default: from --config, else {field.default})"
        flag, about = flag or f"--{name.replace('_', '-')}", f"{field.description}{default}".replace("%", "%%")
        if kind is bool:  # a switch: given, it turns the setting on; absent, the file's value stands
            return opt(flag, dest=SETTING + name, action="store_const", const=True, help=about, **extra)
        return opt(flag, dest=SETTING + name, type=str if choices else kind, choices=choices, help=about, **extra)

    modality = opt("--modality", choices=list(MODALITIES), default="av", help="joint (av) or one stream's input "
                   "(default: %(default)s)")
    batch = opt("--batch-size", type=int, default=8, help="clips per batch (default: %(default)s)")
    resume = opt("--resume", action="store_true", help="continue from the last checkpoint in --out")
    shards = opt("--shards", required=True, help="an ingest output folder")
    model = opt("--model", dest="model_dir", required=True, help="a model folder (Stage 1 or Stage 2)")
    video_source = opt("source", help="a video file, a folder of videos or an ingest folder")
    presets = list(MODEL_PRESETS.names)

    command("ingest", cmd_ingest, "cut a video corpus into face + voice WebDataset shards",
            opt("source", help="corpus folder"), opt("--out", required=True, help="the ingest output folder to write"),
            opt("--dataset", choices=list(DatasetName.__args__), default="auto",
                help="naming rule (default: %(default)s, guessed from the folder)"),
            opt("--labels", help="labels CSV (generic) or split folder (MAFW, DFEW) (default: none, clips unlabelled)"),
            opt("--workers", type=int, help="local Dask worker processes (default: from --config, else 2)"),
            opt("--dask-address", help="an existing Dask scheduler instead of a local cluster (default: from --config, "
                                          "else a local cluster)"),
            setting(IngestConfig, "rehash"))
    command("pretrain", cmd_pretrain, "Stage 1: pre-train the unified AV encoder on ingest shards", shards,
            opt("--out", required=True, help="the model folder to write (with checkpoints)"),
            setting(PretrainConfig, "model", "--preset"), setting(PretrainConfig, "steps"),
            setting(PretrainConfig, "processes"), resume)
    command("model-info", cmd_model_info, "parameters per part and GFLOPs per clip of a model preset",
            opt("--preset", choices=presets, default="tiny", help="model size (default: %(default)s)"))
    command("embed", cmd_embed, "clip embeddings of a video, a folder of videos, or an ingest folder", video_source,
            model, opt("--out", required=True, help="an .npz file with clip_id and embedding arrays"), modality, batch)
    command("evaluate", cmd_evaluate, "benchmark evaluation: folds, probe / fine-tune / zero-shot, UAR/WAR, report",
            model, opt("--data", required=True, help="an ingest output folder of a labelled corpus"),
            setting(EvaluateConfig, "protocol", required=True), setting(EvaluateConfig, "mode", required=True),
            opt("--out", required=True, help="output folder: results, report, figures, fold files"),
            setting(EvaluateConfig, "folds"), setting(EvaluateConfig, "modality"))
    command("caption", cmd_caption, "chain-of-thought affective descriptions of a subset of clips into LanceDB", shards,
            opt("--db", required=True, help="LanceDB folder (table: captions)"),
            *(setting(CaptionConfig, name) for name in ("engine", "model", "prompt", "count", "fraction")),
            opt("--force", action="store_true", help="describe the selected clips again, replacing stored rows"))
    command("align", cmd_align, "Stage 2: align the Stage 1 AV space with the captions (dual-path contrastive)", shards,
            opt("--db", required=True, help="LanceDB folder with the captions table; clip embeddings go there too"),
            opt("--init", required=True, help="the Stage 1 model folder (the --out of `vaemo pretrain`)"),
            opt("--out", required=True, help="the Stage 2 model folder to write"),
            *(setting(AlignConfig, name) for name in ("steps", "caption_tag", "trainable", "processes")), resume)
    command("zeroshot", cmd_zeroshot, "per-clip emotion probabilities from text prompts, with a Stage 2 model",
            video_source, opt("--model", dest="model_dir", required=True, help="a Stage 2 (aligned) model folder"),
            opt("--labels", required=True, help="comma-separated labels, e.g. angry,happy,sad"),
            opt("--template", action="append", help="prompt template with {label}; repeatable (default: the model's)"),
            opt("--out", default="zeroshot.csv", help="CSV (or .json): clip_id, predicted, p_<label>... (default: "
                                                       "%(default)s)"), modality, batch)
    command("search", cmd_search, "the clips nearest to a text, from the clip embeddings written by `vaemo align`",
            opt("--db", required=True, help="the LanceDB folder given to `vaemo align`"),
            opt("--text", required=True, help='e.g. "a trembling voice and a tense face"'),
            opt("--k", type=int, default=5, help="clips to show (default: %(default)s)"), modality,
            opt("--match", help='only clips whose caption description contains these words, e.g. "trembling tense" '
                '(default: no word filter)'),
            opt("--tag", help="an align run's tag (default: the newest)"),
            opt("--table", default="clip_embeddings", help="the LanceDB table to search (default: %(default)s)"))
    tools = commands.add_parser("dev", help="tools for tests, demos and install checks").add_subparsers(
        dest="dev_command", required=True)
    command("tiny-mllm", cmd_dev_tiny_mllm, "build a tiny random-weight Qwen2.5-Omni thinker (meaningless output)",
            opt("out", help="folder to write the model to"), within=tools)
    command("demo-inputs", cmd_dev_demo_inputs, "generate the demo pipeline's corpus and tiny captioning model (once)",
            within=tools)
    command("run", cmd_run, "run a named pipeline of the pipelines file: its stages in order, each skipped when done",
            opt("--pipeline", required=True, help="a name under `pipelines:`"),
            opt("--workers", type=int, help="local Dask worker processes for ingest (default: from --config)"))
    command("serve", cmd_serve, "serve the pipelines file as Prefect deployments (UI triggers, schedules, new corpora)")
    command("ui", cmd_ui, "start a local Prefect server and an MLflow server; Ctrl-C stops both",
            opt("--host", default="127.0.0.1", help="address to bind (default: %(default)s); another than loopback "
                "needs --allow-unauthenticated"),
            opt("--allow-unauthenticated", action="store_true", help="serve on a --host reachable from other "
                "machines although neither server asks for credentials (README: \"Serving beyond this machine\")"),
            opt("--prefect-port", type=int, default=4200, help="default: %(default)s"),
            opt("--mlflow-port", type=int, help="default: the port of tracking.ui_url, else 5000"))
    command("lineage", cmd_lineage, "walk an MLflow run back to its shards, captions and models",
            opt("run_id", help="an MLflow run id (an evaluation run, or any stage's)"))
    command("config", cmd_config, "validate the pipelines file")
    return top


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    args = parser().parse_args(argv)
    for name in ("config", "work_dir"):  # absent unless given, before or after the command
        setattr(args, name, getattr(args, name, None))
    args.log = Path(args.work_dir or DEFAULT_WORK_DIR) / "logs" / f"vaemo-{args.command}.log"  # until settings say
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    stop_on_signals()
    try:
        done = args.func(args)
        if isinstance(done, str):
            print(done)
        return 0 if isinstance(done, str) else done
    except VaemoError as exc:
        print(f"vaemo: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: what the command started is stopped by now
        print(f"vaemo: interrupted ({stop}); re-run the same command to resume", file=sys.stderr)
        return 128 + getattr(stop, "signum", signal.SIGINT)
    except Exception:  # noqa: BLE001 - a bug: its traceback, printed and logged, exit 1
        traceback.print_exc()
        args.log.parent.mkdir(parents=True, exist_ok=True)
        with open(args.log, "a") as log:
            log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()} vaemo {' '.join(sys.argv[1:])}\n"
                      f"{traceback.format_exc()}\n")
        print(f"vaemo: internal error in `vaemo {args.command}` (a bug, not a problem of the input); the traceback "
              f"is also in {args.log}", file=sys.stderr)
        return 1


def run() -> None:
    """The process's entry point (``vaemo``, ``python -m flows.cli``): main, then an exit that skips the interpreter's
    teardown of the modules. Tearing down torch, Prefect and MLflow takes seconds after a command's work is done;
    skipping it is safe once every exit handler has run: threads are joined before them, child processes are
    stopped and logs flushed by them."""
    code: list[int] = []

    def exit_now() -> None:
        if code:
            logging.shutdown()
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            os._exit(code[0])

    # Registered before the libraries are imported, so it runs after their exit handlers (they run last-in first).
    # logging registered earlier (it is imported with this module): flushed here instead.
    atexit.register(exit_now)
    code.append(main())
    sys.exit(code[0])


if __name__ == "__main__":
    run()
