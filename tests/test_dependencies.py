"""Every third-party package that vaemo/ and flows/ import is declared in pyproject.toml, and `make install`
sets up what it should: the system tools each make goal needs, and the vLLM build for the host."""

import ast
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from tests.conftest import ROOT

# Installed apart from pyproject's dependencies, on purpose (see the Makefile and scripts/install-llm.sh).
INSTALLED_APART = {"facenet_pytorch": "pip install --no-deps (stale pins)", "vllm": "scripts/install-llm.sh"}


def imported_roots() -> set[str]:
    roots = set()
    for package in ("vaemo", "flows"):
        for source in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(source.read_text())):
                if isinstance(node, ast.Import):
                    roots |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    roots.add(node.module.split(".")[0])
    return roots - set(sys.stdlib_module_names) - {"vaemo", "flows", "__future__"}


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_imported_package_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {normalized(re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0]) for spec in project["dependencies"]}
    distributions = packages_distributions()
    missing = {root: distributions.get(root, ["not installed"]) for root in imported_roots() - set(INSTALLED_APART)
               if not any(normalized(d) in declared for d in distributions.get(root, []))}
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


# --- make install: system tools (scripts/system-deps.sh) and the vLLM build's stamp ---------------

SYSTEM_DEPS = ROOT / "scripts/system-deps.sh"
SKIPPED_BOTH = "make test needs espeak-ng chromium, make demo needs espeak-ng"


def fake_tool(folder: Path, name: str, body: str = "exit 0") -> None:
    (folder / name).write_text(f"#!/bin/sh\n{body}\n")
    (folder / name).chmod(0o755)


@pytest.fixture
def tools(tmp_path) -> Path:
    """The only PATH the script gets: what it runs, a fake FFmpeg, and no espeak-ng, Chromium, apt-get or sudo."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for tool in ("bash", "sed", "sort", "tr", "env"):
        (folder / tool).symlink_to(shutil.which(tool))
    for tool in ("ffmpeg", "ffprobe"):
        fake_tool(folder, tool)
    return folder


def fake_apt_get(folder: Path, installs: tuple[str, ...]) -> Path:
    """An apt-get that logs its calls and "installs" ``installs`` (as fake tools), failing for any other package."""
    log = folder.parent / "apt.log"
    chmod = shutil.which("chmod")
    fake_tool(folder, "apt-get", f"""echo "$*" >> {log}
[ "$1" = update ] && exit 0
for p in "$@"; do case "$p" in -*|install) ;; {'|'.join(installs) or '""'}) printf '#!/bin/sh\\n' > {folder}/$p
  {chmod} +x {folder}/$p ;; *) exit 100 ;; esac; done""")
    return log


def system_deps(tools: Path, *goal: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(tools / "bash"), str(SYSTEM_DEPS), *goal], env={"PATH": str(tools)},
                          capture_output=True, text=True, timeout=30)


def test_install_skips_the_optional_tools_without_apt_get(tools):
    done = system_deps(tools, "install")
    assert done.returncode == 0, done.stderr
    assert done.stderr == f"vaemo: skipped espeak-ng chromium (cannot install: no apt-get): {SKIPPED_BOTH}\n"


def test_install_skips_the_optional_tools_when_not_root_and_no_sudo(tools):
    log = fake_apt_get(tools, ("espeak-ng", "chromium"))
    fake_tool(tools, "id", "echo 1000")
    done = system_deps(tools)  # install is the default goal
    assert done.returncode == 0, done.stderr
    assert done.stderr == f"vaemo: skipped espeak-ng chromium (cannot install: not root and no sudo): {SKIPPED_BOTH}\n"
    assert not log.exists(), "apt-get is not run without root"


@pytest.mark.parametrize("with_sudo", [False, True])
def test_install_installs_what_apt_get_can_and_skips_the_rest(tools, with_sudo):
    log = fake_apt_get(tools, ("espeak-ng",))
    if with_sudo:
        fake_tool(tools, "id", "echo 1000")
        fake_tool(tools, "sudo", f'echo sudo >> {tools.parent / "apt.log"}; exec "$@"')
    else:
        fake_tool(tools, "id", "echo 0")
    done = system_deps(tools, "install")
    assert done.returncode == 0, done.stderr
    assert done.stderr == "vaemo: skipped chromium (cannot install: apt-get failed): make test needs chromium\n"
    assert (tools / "espeak-ng").exists()
    # apt-get update, then one package at a time, so that Chromium failing keeps espeak-ng in (by sudo if needed).
    calls = [line.split()[-1] for line in log.read_text().splitlines()]
    expected = ["-qq", "chromium", "espeak-ng"]
    assert calls == ([c for call in expected for c in ("sudo", call)] if with_sudo else expected)


def test_install_is_silent_when_everything_is_there(tools):
    fake_tool(tools, "espeak-ng")
    fake_tool(tools, "chromium")
    done = system_deps(tools, "install")
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_install_fails_without_ffmpeg(tools):
    (tools / "ffmpeg").unlink()
    done = system_deps(tools, "install")
    assert done.returncode == 1
    assert "vaemo: missing system tools: ffmpeg (needed by make install; cannot install: no apt-get)" in done.stderr
    assert "apt-get install ffmpeg;" in done.stderr


@pytest.mark.parametrize(("goal", "missing"), [("test", "espeak-ng chromium"), ("demo", "espeak-ng")])
def test_test_and_demo_require_their_tools(tools, goal, missing):
    done = system_deps(tools, goal)
    assert done.returncode == 1
    assert done.stderr.splitlines()[0] == (
        f"vaemo: missing system tools: {missing} (needed by make {goal}; cannot install: no apt-get)"
    )
    assert f"apt-get install {' '.join(sorted(missing.split()))};" in done.stderr
    for tool in missing.split():
        fake_tool(tools, tool)
    done = system_deps(tools, goal)
    assert (done.returncode, done.stderr) == (0, "")


MAKE = shutil.which("make")


def make_dry_run(tmp_path: Path, *args: str, gpu: str | None) -> str:
    """``make -n ARGS VENV=tmp/venv`` with nothing on PATH but grep and, unless None, an nvidia-smi printing ``gpu``."""
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    if not (folder / "grep").exists():
        (folder / "grep").symlink_to(shutil.which("grep"))
    if gpu is not None:
        fake_tool(folder, "nvidia-smi", f"echo '{gpu}'")
    done = subprocess.run([MAKE, "-n", "--no-print-directory", *args, f"VENV={tmp_path / 'venv'}"], cwd=ROOT,
                          env={"PATH": str(folder)}, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.skipif(MAKE is None, reason="no make")
@pytest.mark.parametrize(("gpu", "args", "llm"), [
    ("GPU 0: NVIDIA H200 (UUID: GPU-0f3c)", (), "gpu"),
    (None, (), "cpu"),
    ("No devices were found", (), "cpu"),
    ("GPU 0: NVIDIA H200 (UUID: GPU-0f3c)", ("LLM=cpu",), "cpu"),
    (None, ("LLM=gpu",), "gpu"),
])
def test_make_install_chooses_the_llm_build_and_its_stamp(tmp_path, gpu, args, llm):
    lines = make_dry_run(tmp_path, "install", *args, gpu=gpu).splitlines()
    venv = tmp_path / "venv"
    assert f"PIP=\"{venv}/bin/python -m pip\" bash scripts/install-llm.sh {llm}" in lines
    assert lines[-1] == f"touch {venv}/.installed-{llm}"
    other = {"cpu": "gpu", "gpu": "cpu"}[llm]
    removed = next(line.split() for line in lines if line.startswith("rm -f "))
    assert f"{venv}/.installed-{other}" in removed, "the other build's stamp goes"
    assert "bash scripts/system-deps.sh install" in lines


@pytest.mark.skipif(MAKE is None, reason="no make")
def test_make_install_redoes_on_a_build_switch_or_a_newer_source(tmp_path):
    venv = tmp_path / "venv"
    venv.mkdir()
    stamp = venv / ".installed-cpu"
    stamp.touch()
    os.utime(stamp, (time.time() + 3600,) * 2)  # newer than pyproject.toml and the scripts
    assert "install-llm.sh" not in make_dry_run(tmp_path, "install", "LLM=cpu", gpu=None)
    assert "install-llm.sh gpu" in make_dry_run(tmp_path, "install", "LLM=gpu", gpu=None)
    assert "install-llm.sh gpu" in make_dry_run(tmp_path, "install", gpu="GPU 0: NVIDIA H200 (UUID: GPU-0f3c)")
    os.utime(stamp, (0, 0))  # older than them
    assert "install-llm.sh cpu" in make_dry_run(tmp_path, "install", "LLM=cpu", gpu=None)


@pytest.mark.skipif(MAKE is None, reason="no make")
@pytest.mark.parametrize(("target", "first"), [("test", "ruff check ."), ("demo", "vaemo dev demo-inputs")])
def test_make_test_and_demo_check_their_system_tools_first(tmp_path, target, first):
    (tmp_path / "venv").mkdir()
    (tmp_path / "venv" / ".installed-cpu").touch()
    os.utime(tmp_path / "venv" / ".installed-cpu", (time.time() + 3600,) * 2)
    lines = make_dry_run(tmp_path, target, "LLM=cpu", gpu=None).splitlines()
    assert lines[0] == f"bash scripts/system-deps.sh {target}"
    assert lines[1].endswith(first)
