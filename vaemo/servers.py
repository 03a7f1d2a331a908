"""The processes a command starts and how they stop: ``vaemo ui``'s local Prefect server and MLflow server over the
work directory's own stores, child processes, SIGTERM and SIGINT (a stage command's Prefect server, shared by the
commands on one work directory, is in vaemo/prefect_server.py).

Servers run as child processes in their own sessions (a Ctrl-C in the terminal reaches the command, which stops
them after it has reported to them), log to a file, and answer on one host (127.0.0.1 by default); stopping stops the
whole process group of each, so no worker of either outlives the command. On Linux a server also ends when the
command dies without stopping it (SIGKILL): the kernel sends it SIGTERM.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from vaemo import locks
from vaemo.errors import ConfigError, ToolError

START_TIMEOUT_SECONDS = 240  # the Prefect server migrates its database on first start; slow on a busy laptop

# Runs the command given after it with the kernel's "parent death signal" set (Linux prctl PR_SET_PDEATHSIG, 1):
# SIGTERM when the process that started it ends. A launcher rather than Popen's preexec_fn, which is unsafe once
# the command has threads; exec keeps the setting.
_DIE_WITH_PARENT = ("import ctypes, os, signal, sys; ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM); "
                    "os.getppid() == int(sys.argv[1]) or sys.exit(1); os.execv(sys.argv[2], sys.argv[2:])")


class ServerError(ToolError):
    pass


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGINT, raised in the main thread, so that every ``finally`` on the way out stops the servers,
    clusters and child processes the command started (Python's default for SIGTERM ends it on the spot)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stop_on_signals() -> None:
    """Turn the first SIGTERM or SIGINT into :class:`Stopped`; later ones are ignored, so they cannot cut short the
    stopping of what the command started (each stop is bounded in time)."""

    def stop(signum, _frame):
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        raise Stopped(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)


def run_child(command: list[str], stop_timeout: float = 60) -> None:
    """``subprocess.run(command, check=True)``, except that when this process is interrupted the child is asked to
    stop (SIGTERM, which torchrun passes on to its workers in their own sessions) and waited for; it is killed only
    after ``stop_timeout`` seconds. (``subprocess.run`` would SIGKILL it at once and leave its workers running.)"""
    process = subprocess.Popen(command)
    try:
        code = process.wait()
    except BaseException:
        process.terminate()
        try:
            process.wait(stop_timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        raise
    if code:
        raise subprocess.CalledProcessError(code, command)


@dataclass
class Server:
    name: str
    host: str
    port: int
    health_path: str  # answers 200 once the server serves
    command: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)  # on top of this process's environment
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        command = self.command
        if sys.platform == "linux":
            command = [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *command]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env={**os.environ, **self.env}, start_new_session=True)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + self.health_path, timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 30) -> None:
        if not self.running():
            return
        for sig, wait in ((signal.SIGINT, timeout), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) reaches this machine only: every address it resolves to is loopback."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        found = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(found) and all(ipaddress.ip_address(address.split("%")[0]).is_loopback for address in found)


def check_host(host: str, allow_unauthenticated: bool) -> None:
    """Neither server asks for credentials: the Prefect API accepts writes (runs, deployments, their commands) from
    anyone who reaches it. Beyond loopback that takes an explicit acknowledgement."""
    if not is_loopback(host) and not allow_unauthenticated:
        raise ConfigError(f"--host {host} is reachable from other machines, and neither the Prefect nor the MLflow "
                          "server asks for credentials: bind 127.0.0.1 and put an authenticating reverse proxy in "
                          "front (README, \"Serving beyond this machine\"), or add --allow-unauthenticated to serve "
                          "anyway")


def local_servers(work_dir: Path, mlflow_uri: str, host: str, prefect_port: int, mlflow_port: int) -> list[Server]:
    """The Prefect server (its SQLite database in PREFECT_HOME) and an MLflow server over ``mlflow_uri``."""
    logs = Path(work_dir) / "logs"
    artifacts = (Path(work_dir) / "mlartifacts").resolve().as_uri()
    return [
        Server(
            "Prefect",
            host,
            prefect_port,
            "/api/health",
            [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(prefect_port),
             "--analytics-off"],
            logs / "prefect-server.log",
            # the browser UI asks this address for its data; by default it assumes port 4200
            {"PREFECT_UI_API_URL": f"http://{host}:{prefect_port}/api"},
        ),
        Server(
            "MLflow",
            host,
            mlflow_port,
            "/health",
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", mlflow_uri, "--default-artifact-root",
             artifacts, "--host", host, "--port", str(mlflow_port), "--workers", "1"],
            logs / "mlflow-server.log",
        ),
    ]


def prefect_start_lock(prefect_home: Path):
    """Held while a Prefect server whose database is in ``prefect_home`` starts. Its start migrates a new database
    and registers Prefect's block types; two at once fail on each other's rows. So one command at a time starts its
    servers (a blocking lock in ``prefect_home``); the next finds the database ready."""
    return locks.held(Path(prefect_home) / ".server-start.lock", wait=True)


def start_with_prefect(servers: list[Server], prefect_home: Path) -> None:
    """:func:`start_all` for servers that include a Prefect server whose database is in ``prefect_home``."""
    with prefect_start_lock(prefect_home):
        start_all(servers)


def start_all(servers: list[Server], timeout: float = START_TIMEOUT_SECONDS) -> None:
    """Start every server and wait until each answers; on any failure stop them all and say why."""
    launch(servers)
    wait_ready(servers, timeout)


def launch(servers: list[Server]) -> None:
    """Start the servers' processes without waiting for them (:func:`wait_ready` does)."""
    busy = [f"{s.host}:{s.port} ({s.name})" for s in servers if not _port_free(s.host, s.port)]
    if busy:
        raise ServerError(f"port in use: {', '.join(busy)}; choose other ports (--prefect-port, --mlflow-port)")
    for server in servers:
        server.start()


def wait_ready(servers: list[Server], timeout: float = START_TIMEOUT_SECONDS) -> None:
    """Wait until every launched server answers; on any failure stop them all and say why."""
    deadline = time.monotonic() + timeout
    try:
        waiting = list(servers)
        while waiting:
            for server in list(waiting):
                if not server.running():
                    raise ServerError(
                        f"the {server.name} server stopped while starting (log {server.log}):\n{server.log_tail()}"
                    )
                if server.healthy():
                    waiting.remove(server)
            if waiting and time.monotonic() > deadline:
                names = ", ".join(s.name for s in waiting)
                raise ServerError(f"{names} did not answer within {timeout:.0f} s (logs in {waiting[0].log.parent})")
            time.sleep(0.2)
    except BaseException:
        stop_all(servers)
        raise


def stop_all(servers: list[Server]) -> None:
    for server in servers:
        server.stop()


def run_local_servers(settings, host: str, prefect_port: int, mlflow_port: int | None,
                      allow_unauthenticated: bool = False) -> int:
    """``vaemo ui``: both servers until Ctrl-C or SIGTERM (exit 0; see :func:`stop_on_signals`), or until one of them
    stops (exit 1)."""
    from urllib.parse import urlparse

    from vaemo.config import DEFAULT_MLFLOW_UI, mlflow_ui_page

    check_host(host, allow_unauthenticated)
    if not is_loopback(host):
        print(f"vaemo: warning: serving on {host} without authentication (--allow-unauthenticated): anyone who "
              "reaches it can read the runs and start flow runs", file=sys.stderr, flush=True)

    mlflow_port = mlflow_port or urlparse(settings.tracking.ui_url or DEFAULT_MLFLOW_UI).port
    servers = local_servers(settings.work_dir, settings.mlflow_uri(), host, prefect_port, mlflow_port)
    print(f"vaemo: starting the Prefect and MLflow servers (logs in {Path(settings.work_dir) / 'logs'})", flush=True)
    try:
        start_with_prefect(servers, Path(os.environ["PREFECT_HOME"]))
        prefect, mlflow = servers
        print(f"vaemo: Prefect UI {prefect.url}\nvaemo: MLflow UI  {mlflow_ui_page(mlflow.url, 'experiments')}",
              flush=True)
        print(f"vaemo: export PREFECT_API_URL={prefect.url}/api for `vaemo run` and `vaemo serve` to use this server; "
              "Ctrl-C stops both", flush=True)
        while all(server.running() for server in servers):
            time.sleep(1)
        stopped = next(server for server in servers if not server.running())
        print(f"vaemo: error: the {stopped.name} server stopped (log {stopped.log}):\n{stopped.log_tail()}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vaemo: stopping the servers", flush=True)
        return 0
    finally:
        stop_all(servers)
