"""The work directory's Prefect server (vaemo/prefect_server.py): commands on one work directory share it, a stale
record is replaced, it stops with its last user (idle 0) or after its idle period, and a Ctrl-C of one command does
not stop it under another."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.conftest import cli_env, vaemo_command
from vaemo.prefect_server import Record, live_users

TIMEOUT = 300

# A command that uses the server until a line comes on its stdin; it prints the record it found.
HOLD = """
import sys
from pathlib import Path
from flows.environment import prefect_api, prepare
from vaemo.config import Settings
prepare(Settings(work_dir=Path(sys.argv[1])))
with prefect_api():
    from prefect.client.orchestration import get_client
    with get_client(sync_client=True) as client:
        assert client.api_healthcheck() is None
    print(Path(sys.argv[1], "prefect", "server.json").read_text(), flush=True)
    sys.stdin.readline()
"""


class Holder:
    def __init__(self, work: Path, **env: str):
        self.process = subprocess.Popen([sys.executable, "-c", HOLD, str(work)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env={**cli_env(work), **env})
        line = self.process.stdout.readline()
        assert line, self.process.communicate(timeout=TIMEOUT)
        self.record = Record(**json.loads(line))

    def end(self) -> None:
        out, err = self.process.communicate("\n", timeout=TIMEOUT)
        assert self.process.returncode == 0 and "Traceback" not in err, err[-3000:]


def answers(record: Record) -> bool:
    try:
        socket.create_connection(("127.0.0.1", record.port), timeout=5).close()
    except OSError:
        return False
    return record.alive()


def wait_gone(record: Record, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while answers(record):
        assert time.monotonic() < deadline, f"the server {record} still runs"
        time.sleep(0.2)


def test_commands_on_a_work_dir_share_its_server_which_stops_with_the_last(tmp_path):
    work = tmp_path / "work"
    first = Holder(work)
    second = Holder(work)
    assert second.record == first.record and answers(first.record)  # found in server.json, not started again
    assert live_users(work / "prefect") == 2
    first.end()
    assert answers(first.record), "stopped under the second command"
    second.end()
    assert not answers(first.record) and not (work / "prefect" / "server.json").exists()  # idle 0: at once
    assert live_users(work / "prefect") == 0


def test_a_server_without_users_stops_after_its_idle_period(tmp_path):
    work = tmp_path / "work"
    holder = Holder(work, VAEMO_PREFECT_SERVER_IDLE_SECONDS="3")
    holder.end()
    assert answers(holder.record)  # waits for the next command
    again = Holder(work, VAEMO_PREFECT_SERVER_IDLE_SECONDS="3")
    assert again.record == holder.record
    again.end()
    wait_gone(holder.record, 30)
    assert not (work / "prefect" / "server.json").exists()


def test_a_stale_record_is_replaced_and_its_pid_left_alone(tmp_path):
    work = tmp_path / "work"
    (work / "prefect").mkdir(parents=True)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there once the probe closes
    # Its pid is alive but another process (this one): a reused pid, never to be stopped.
    stale = Record(f"http://127.0.0.1:{port}", os.getpid(), port, 0.0)
    stale.write(work / "prefect")
    holder = Holder(work)
    assert holder.record.pid != os.getpid() and answers(holder.record)
    holder.end()
    wait_gone(holder.record, 0)

    (work / "prefect" / "server.json").write_text("{\"url\": ")  # cut short
    holder = Holder(work)
    assert answers(holder.record)
    holder.end()


def test_a_bad_idle_period_is_refused_with_its_name(tmp_path):
    work = tmp_path / "work"
    done = subprocess.run(vaemo_command("--work-dir", str(work), "ingest", str(tmp_path), "--out", str(work / "out")),
                          capture_output=True, text=True, timeout=TIMEOUT,
                          env={**cli_env(work), "VAEMO_PREFECT_SERVER_IDLE_SECONDS": "ten"})
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("vaemo: error: VAEMO_PREFECT_SERVER_IDLE_SECONDS='ten': "), done.stderr


def test_ctrl_c_of_a_command_leaves_the_server_of_another_running(corpus, tmp_path):
    work = tmp_path / "work"
    holder = Holder(work)
    log = open(tmp_path / "ingest.log", "w+")
    ingest = subprocess.Popen(vaemo_command("--work-dir", str(work), "ingest", str(corpus), "--dataset", "generic",
                                            "--out", str(work / "out"), "--workers", "1"), env=cli_env(work),
                              stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + TIMEOUT
    # in its stage: its one batch decodes a video in the command's own process (no Dask cluster for one batch)
    while not any(child.name() == "ffmpeg" for child in psutil.Process(ingest.pid).children()):
        assert ingest.poll() is None and time.monotonic() < deadline, log.read()
        time.sleep(0.1)
    assert not any("spawn_main" in " ".join(child.cmdline()) for child in psutil.Process(ingest.pid).children(True))
    assert live_users(work / "prefect") == 2
    ingest.send_signal(signal.SIGINT)
    assert ingest.wait(90) == 130
    log.seek(0)
    assert log.read().endswith("vaemo: interrupted (SIGINT); re-run the same command to resume\n")
    assert answers(holder.record) and live_users(work / "prefect") == 1
    holder.end()
    assert not answers(holder.record)
