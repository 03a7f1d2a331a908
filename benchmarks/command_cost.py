"""The fixed cost of a ``vaemo`` command: a whole ``vaemo ingest`` of one short clip against the same work in-process.

    .venv/bin/python benchmarks/command_cost.py [--out JSON] [--keep DIR]

In one run, on one generated talking-face clip (``vaemo.synth``) and a fresh work directory, with the embedded
defaults (no PREFECT_API_URL, the default idle period of the work directory's Prefect server):

1. ``vaemo --help`` as a subprocess;
2. the ingest work in this process: ``IngestRun`` -> ``plan`` -> ``shards.run_batch`` -> ``finalize``, what the
   ingest flow calls, into a fresh folder, before the commands: its models loaded on first use, as in a command
   (the libraries imported before the clock starts). It is timed again after the commands, models loaded, for
   the spread;
3. ``vaemo ingest`` of the clip as a subprocess: first on the new work directory (its Prefect server must start and
   its databases be made), then again into another ``--out`` of the same work directory (the server is reused).

Fixed cost = command wall time - in-process time. The work directory's server is stopped at the end. Markdown goes
to stdout, the figures as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def command_env() -> dict[str, str]:
    """This environment without anything that points a command elsewhere than the embedded defaults."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_")) and k != "VAEMO_PREFECT_SERVER_IDLE_SECONDS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def timed_command(args: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=command_env(),
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"`vaemo {' '.join(args)}` failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return seconds


def in_process(source: Path, out: Path) -> float:
    from vaemo.config import DaskConfig, IngestConfig
    from vaemo.ingest import shards
    from vaemo.ingest.run import IngestRun

    cfg = IngestConfig()
    started = time.perf_counter()
    with IngestRun(source, out, "generic", cfg) as run:
        plan = run.plan(parallelism=DaskConfig().parallelism())
        for batch in plan.batches:
            shards.run_batch(batch, out, cfg)
        stats = run.finalize(plan)
    seconds = time.perf_counter() - started
    if stats["clips"] < 1:
        sys.exit(f"the in-process ingest made no clip: {stats}")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument("--keep", type=Path, help="work in this (new) folder and keep it (default: a temporary one)")
    args = parser.parse_args()

    from vaemo import synth
    from vaemo.prefect_server import Record

    base = args.keep or Path(tempfile.mkdtemp(prefix="vaemo-command-cost-"))
    base.mkdir(parents=True, exist_ok=True)
    work, source = base / "work", base / "src"
    try:
        synth.demo_corpus(source, n_videos=1, seed=3)
        print("vaemo --help ...", file=sys.stderr)
        help_seconds = timed_command(["--help"], base)
        print("in-process ingest ...", file=sys.stderr)
        inside = [in_process(source, base / "inside-1")]
        print("vaemo ingest on a new work directory ...", file=sys.stderr)
        ingest = ["--work-dir", str(work), "ingest", str(source), "--dataset", "generic", "--out"]
        first = timed_command([*ingest, str(work / "out-1")], base)
        started = Record.read(work / "prefect")
        print("vaemo ingest again (the server reused) ...", file=sys.stderr)
        second = timed_command([*ingest, str(work / "out-2")], base)
        used = Record.read(work / "prefect")
        inside.append(in_process(source, base / "inside-2"))
        work_seconds = inside[0]
        report = {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
            "help_seconds": round(help_seconds, 2),
            "in_process_seconds": [round(s, 2) for s in inside],
            "first_command_seconds": round(first, 2),
            "second_command_seconds": round(second, 2),
            "first_fixed_cost_seconds": round(first - work_seconds, 2),
            "second_fixed_cost_seconds": round(second - work_seconds, 2),
            "server_reused": started is not None and started == used and used.alive(),
        }
    finally:
        if (record := Record.read(work / "prefect")) is not None:
            record.stop()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print("| measure | seconds |\n|---|---|")
    print(f"| `vaemo --help` | {report['help_seconds']} |")
    print(f"| ingest work in-process (first, models loaded) | {', '.join(map(str, report['in_process_seconds']))} |")
    for case in ("first", "second"):
        print(f"| {case} `vaemo ingest`: whole command, fixed cost | {report[f'{case}_command_seconds']}, "
              f"{report[f'{case}_fixed_cost_seconds']} |")
    print(f"\n{report['machine']}; the second command found the first one's server: {report['server_reused']}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
