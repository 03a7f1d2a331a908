"""The command line's contract: a problem of the input is one line and exit 2; a bug keeps its traceback, says where
it is logged, and exits 1; every command takes the pipelines file the same way; choices come from the registries."""

from __future__ import annotations

import argparse

import pytest
import torch

from flows.cli import main, parse, parser
from vaemo.model import av
from vaemo.registry import DATASETS, ENGINES, MODALITIES, MODEL_PRESETS, PROTOCOLS


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return av.save(av.AVMAE(av.config_for("tiny")), tmp_path_factory.mktemp("model"))


def test_a_bug_inside_embed_shows_its_traceback_and_exits_1(shards, model_dir, tmp_path, monkeypatch, capsys):
    def broken_encode(self, video=None, audio=None, unimodal=True, **_):
        return {"joint": torch.zeros(2, 3) @ torch.zeros(4, 5)}  # a shape error, as a bug in the model would raise

    monkeypatch.setattr(av.AVMAE, "encode", broken_encode)
    work = tmp_path / "work"
    code = main(
        ["--work-dir", str(work), "embed", str(shards), "--model", str(model_dir), "--out", str(tmp_path / "e.npz")]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback (most recent call last)" in err and "mat1 and mat2 shapes cannot be multiplied" in err
    log = work / "logs" / "vaemo-embed.log"
    assert f"the traceback is also in {log}" in err and "a bug, not a problem of the input" in err
    assert "mat1 and mat2 shapes cannot be multiplied" in log.read_text()
    assert not (tmp_path / "e.npz").exists()


def test_a_bad_argument_is_one_line_and_exit_2(shards, model_dir, tmp_path, capsys):
    """Refusals before any flow starts; those of a flow's inputs are tested through the command (tests/test_flow.py)."""
    nowhere = tmp_path / "nowhere"
    cases = [
        (["embed", str(shards), "--model", str(nowhere), "--out", str(tmp_path / "e.npz")],
         f"{nowhere} is not a model folder"),
        (["pretrain", "--shards", str(shards), "--out", str(tmp_path / "m"), "--steps", "0"],
         "command line: invalid configuration\n  steps: Input should be greater than or equal to 1 (got 0)"),
        (["--config", str(nowhere / "p.yaml"), "run", "--pipeline", "demo"], "p.yaml: configuration file not found"),
    ]
    for args, message in cases:
        code = main(["--work-dir", str(tmp_path / "work"), *args])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("vaemo: error: ") and message in err, (args, err)
        assert "Traceback" not in err
    with pytest.raises(SystemExit) as exit_:  # argparse's own refusals: usage and one line, exit 2
        main(["embed", str(shards), "--model", str(model_dir), "--out", "x.npz", "--modality", "smell"])
    assert exit_.value.code == 2 and "invalid choice: 'smell'" in capsys.readouterr().err


def test_every_command_takes_the_pipelines_file_before_or_after_its_name(tmp_path):
    config = str(tmp_path / "p.yaml")
    for args in (["--config", config, "run", "--pipeline", "x"], ["run", "--config", config, "--pipeline", "x"],
                 ["serve", "--config", config], ["--config", config, "ui"], ["config", "--config", config],
                 ["dev", "demo-inputs", "--config", config], ["lineage", "abc", "--config", config]):
        assert parse(args).config == config, args
    assert parse(["--config", "a.yaml", "config", "--config", "b.yaml"]).config == "b.yaml"
    assert parse(["--work-dir", "w", "config"]).work_dir == "w"
    assert parse(["config"]).config is None  # ./pipelines.yaml when present


def test_choices_come_from_the_registries():
    choices = {action.dest.removeprefix("setting:"): action.choices for sub in parser()._subparsers._group_actions
               for command in sub.choices.values() for action in command._actions if action.choices}
    assert choices["dataset"] == ["auto", *DATASETS.names]
    assert choices["protocol"] == list(PROTOCOLS.names) and choices["engine"] == list(ENGINES.names)
    assert choices["model"] == list(MODEL_PRESETS.names) and choices["modality"] == list(MODALITIES)
    assert parse(["pretrain", "--shards", "s", "--out", "o", "--preset", "small"]).__dict__["setting:model"] == "small"


def commands(command=None, path=("vaemo",)):
    """Every command of the parser, ``dev``'s too, with its words (e.g. ("vaemo", "dev", "tiny-mllm"))."""
    command = command or parser()
    yield path, command
    for action in command._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, (*path, name))


def test_every_option_says_what_it_does_and_its_default():
    for path, command in commands():
        command.format_help()  # renders: no stray % in a help text
        for action in command._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            assert action.help, f"{' '.join(path)}: {action.dest} has no help"
            switch = isinstance(action, argparse._StoreTrueAction | argparse._StoreConstAction)
            if action.option_strings and not action.required and not switch:
                assert "default" in action.help, f"{' '.join(path)}: {action.option_strings[0]} hides its default"


def test_help_and_argument_errors_load_no_heavy_library():
    """What keeps `vaemo --help` and a bad argument under a second: parsing imports none of the big libraries."""
    import subprocess
    import sys

    heavy = ("torch", "prefect", "mlflow", "lancedb", "vllm", "av", "dask", "pandas", "transformers")
    script = (
        "import sys\nfrom flows.cli import parse\n"
        "for argv in (['--help'], ['ingest', '--help'], ['run', '--bogus'], ['ingest']):\n"
        "    try:\n        parse(argv)\n    except SystemExit:\n        pass\n"
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout
