"""A command's processes and runs end with it: SIGTERM or SIGINT to a stage command stops its Dask workers and its
torchrun ranks, and the work directory's Prefect server when no other command uses it, and leaves no process behind;
the MLflow run of a command that was killed is marked KILLED by the next command on the work directory, and a live
one is left alone."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import psutil

from tests.conftest import cli_env, vaemo_command

TIMEOUT = 300
TOKEN = "VAEMO_TEST_TREE"  # in the environment of every process a command starts, whatever its parent or session


def start(work: Path, *args: str) -> subprocess.Popen:
    token = uuid.uuid4().hex
    log = open(work.parent / f"{work.name}-{token}.log", "w+")
    process = subprocess.Popen(vaemo_command("--work-dir", str(work), *args), env={**cli_env(work), TOKEN: token},
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    process.token, process.log = token, log
    return process


def tree(process: subprocess.Popen) -> list[psutil.Process]:
    """The processes that carry the command's token: found even once re-parented or in sessions of their own."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get(TOKEN) == process.token:
                found.append(proc)
        except psutil.Error:  # ended meanwhile, or a process we may not read
            continue
    return found


def output(process: subprocess.Popen) -> str:
    process.log.seek(0)
    return process.log.read()


def wait_until(process: subprocess.Popen, ready, what: str):
    deadline = time.monotonic() + TIMEOUT
    while not (found := ready()):
        assert process.poll() is None, f"the command ended before {what}:\n{output(process)[-3000:]}"
        assert time.monotonic() < deadline, f"not {what} within {TIMEOUT} s:\n{output(process)[-3000:]}"
        time.sleep(0.3)
    return found


def commands(process: subprocess.Popen) -> list[str]:
    lines = []
    for proc in tree(process):
        try:
            lines.append(" ".join(proc.cmdline()))
        except psutil.Error:
            continue
    return lines


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return False
    return True


def stop_and_check(process: subprocess.Popen, sig: signal.Signals) -> None:
    """Send ``sig`` to the command alone (as `kill` and schedulers do); it ends at once, with one line and nothing
    left running."""
    started = time.monotonic()
    os.kill(process.pid, sig)
    try:
        code = process.wait(90)
        took = time.monotonic() - started
        # Python's resource tracker ends when the pipe of the process it watched closes, a moment later.
        deadline = time.monotonic() + 10
        while (left := commands(process)) and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        for proc in tree(process):
            proc.kill()
    text = output(process)
    assert code == 128 + sig and took < 60, (took, text[-3000:])
    assert not left, f"left running: {left}\n{text[-3000:]}"
    assert text.endswith(f"vaemo: interrupted ({sig.name}); re-run the same command to resume\n"), text[-3000:]
    assert "Traceback" not in text, text[-5000:]


def test_sigterm_stops_an_ingest_with_its_prefect_server_and_dask_workers(corpus, tmp_path):
    work = tmp_path / "work"
    # two workers: the three videos in two batches, on a Dask cluster (one batch would run in the command's process)
    process = start(work, "ingest", str(corpus), "--dataset", "generic", "--out", str(work / "out"), "--workers", "2")
    # in its stage: the work directory's server answers and a Dask worker decodes a video
    server = wait_until(process, lambda: [c for c in commands(process) if "prefect.server.api.server" in c],
                        "with the work directory's Prefect server")[0]
    port = int(server.split("--port ")[1].split()[0])
    wait_until(process, lambda: any(c.startswith("ffmpeg") for c in commands(process)), "decoding in a Dask worker")
    assert listening(port)
    stop_and_check(process, signal.SIGTERM)
    assert not listening(port)


def test_sigint_stops_a_pretraining_with_its_torchrun_ranks(shards, tmp_path):
    work = tmp_path / "work"
    config = tmp_path / "pipelines.yaml"
    config.write_text("stages:\n  pretrain: {batch_size: 1, num_workers: 0, warmup_steps: 1, eval_clips: 2}\n")
    process = start(work, "--config", str(config), "pretrain", "--shards", str(shards), "--out", str(work / "model"),
                    "--processes", "2", "--steps", "1000")
    wait_until(process, lambda: sum("python -u -m vaemo.train.pretrain" in c for c in commands(process)) == 2,
               "training in both ranks")
    stop_and_check(process, signal.SIGINT)
    run, = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}").search_runs(["1"])  # stopped, so not FAILED
    assert run.info.status == "KILLED" and run.data.tags["vaemo.error"] == "Stopped: SIGINT", run.data.tags


OPEN_A_RUN = """
import sys, time
from pathlib import Path
from vaemo import tracking
with tracking.stage_run("ingest", tracking_uri=sys.argv[1], experiment="vaemo", work_dir=Path(sys.argv[2])) as run:
    print(run.info.run_id, flush=True)
    time.sleep(600)
"""


def test_the_next_command_marks_the_runs_of_killed_processes_killed_and_leaves_live_ones_running(tmp_path):
    work = tmp_path / "work"
    uri = f"sqlite:///{work / 'mlflow.db'}"
    owners = [subprocess.Popen([sys.executable, "-c", OPEN_A_RUN, uri, str(work)], stdout=subprocess.PIPE, text=True,
                               env=cli_env(work)) for _ in range(2)]
    try:
        killed_id, live_id = (owner.stdout.readline().strip() for owner in owners)
        client = mlflow.MlflowClient(uri)
        experiment = client.get_experiment_by_name("vaemo").experiment_id
        unowned = client.create_run(experiment, tags={"vaemo.stage": "ingest"}).info.run_id  # made by an older vaemo
        os.kill(owners[0].pid, signal.SIGKILL)
        owners[0].wait(30)
        # any command on the work directory; this one is refused (no such corpus) right after it starts
        done = subprocess.run(vaemo_command("--work-dir", str(work), "ingest", str(tmp_path / "nowhere"), "--out",
                                            str(work / "out")), capture_output=True, text=True, env=cli_env(work),
                              timeout=TIMEOUT)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert done.stdout == f"vaemo: marked 1 MLflow run(s) KILLED, left RUNNING by processes that were killed: " \
                              f"{killed_id}\n"
        killed = client.get_run(killed_id)
        assert killed.info.status == "KILLED" and killed.info.end_time
        assert killed.data.tags["vaemo.error"] == f"its process (pid {owners[0].pid} on {socket.gethostname()}) " \
                                                  "ended without closing it"
        assert client.get_run(live_id).info.status == "RUNNING"  # its process is alive: never marked
        assert client.get_run(unowned).info.status == "RUNNING"  # no owner recorded: cannot tell, left alone
    finally:
        for owner in owners:
            owner.kill()
            owner.wait(30)


USE_PREFECT = """
import sys
from pathlib import Path
from flows.environment import prefect_api, prepare
from vaemo.config import Settings
prepare(Settings(work_dir=Path(sys.argv[1])))
with prefect_api():
    from prefect.client.orchestration import get_client
    with get_client(sync_client=True) as client:
        print("healthy" if client.api_healthcheck() is None else "unhealthy", flush=True)
"""


def test_first_commands_at_once_on_a_new_work_dir_start_their_prefect_servers_cleanly(tmp_path):
    # As stage commands started at once do: one starts the work directory's server on the new Prefect database, the
    # others use it; unserialised, servers started at once would collide in their migrations and block registrations
    # (alembic and UNIQUE constraint tracebacks, a server that does not start).
    work = tmp_path / "work"
    commands = [subprocess.Popen([sys.executable, "-c", USE_PREFECT, str(work)], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, env=cli_env(work)) for _ in range(3)]
    outputs = [command.communicate(timeout=TIMEOUT)[0] for command in commands]
    assert [command.returncode for command in commands] == [0, 0, 0], outputs
    assert all("healthy\n" in text and "Traceback" not in text for text in outputs), outputs
    log = (work / "prefect" / "server.log").read_text()
    assert "Traceback" not in log and "Error" not in log, log[-3000:]
