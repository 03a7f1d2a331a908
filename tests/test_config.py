import re
import time
from pathlib import Path

import pytest

from vaemo.config import MAX_CONFIG_BYTES, MAX_CONFIG_DEPTH, MAX_CONFIG_VALUES, IngestConfig, load_settings
from vaemo.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
# The ingest defaults before the speed-ups (detection and media settings changed since, as config values).
BEFORE_SPEED_UPS = {"detect_every": 10, "detect_pyramid_factor": 0.709, "media_io": "ffmpeg"}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipelines.yaml"
    path.write_text(text)
    return path


def test_repository_pipelines_yaml_is_valid():
    settings = load_settings(ROOT / "pipelines.yaml")
    demo = settings.pipelines["demo"]
    assert demo.stages == ["ingest", "pretrain", "caption", "align", "evaluate"]
    # `make demo` builds the tiny captioning model where the demo pipeline looks for it
    assert demo.stage_overrides["caption"]["model"] == str(settings.work_dir / "tiny-mllm")
    assert settings.corpora["demo"].labels == settings.corpora["demo"].path / "labels.csv"
    assert settings.work_dir.is_absolute() and settings.work_dir.parent == ROOT
    assert settings.mlflow_uri().startswith("sqlite:///") and settings.mlflow_uri().endswith("mlflow.db")


def test_stage1_learning_check_settings_load_as_the_readme_uses_them():
    """`vaemo --config benchmarks/stage1_learning.yaml pretrain` must keep parsing: tiny, augmentation off."""
    settings = load_settings(ROOT / "benchmarks" / "stage1_learning.yaml")
    pretrain = settings.stages.pretrain
    assert pretrain.model == "tiny" and pretrain.model_overrides == {"contrastive_weight": 4.0}
    assert pretrain.data.crop_scale is None and pretrain.data.flip_p == 0
    assert pretrain.data.freq_mask == pretrain.data.time_mask == 0
    assert settings.work_dir.resolve() == ROOT / "vaemo-work"  # outside benchmarks/, like pipelines.yaml's


def test_unknown_key_names_file_and_key(tmp_path):
    path = write(tmp_path, "stages:\n  ingest:\n    fsp: 25\n")
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert str(path) in str(err.value) and "stages.ingest.fsp: unknown key" in str(err.value)


def test_wrong_type_says_what_was_expected(tmp_path):
    path = write(tmp_path, "stages:\n  ingest:\n    crop_size: big\n")
    with pytest.raises(ConfigError, match=r"stages\.ingest\.crop_size: .*integer.*'big'"):
        load_settings(path)


def test_missing_corpus_path_is_reported(tmp_path):
    path = write(tmp_path, "corpora:\n  mine:\n    path: nowhere\n")
    settings = load_settings(path)
    assert settings.corpora["mine"].path == tmp_path / "nowhere"  # relative to the file
    with pytest.raises(ConfigError, match=r"corpora\.mine\.path: path does not exist"):
        settings.check_corpus_paths(source=str(path))
    with pytest.raises(ConfigError, match=rf"^{path}: corpora\.mine\.path"):  # as `vaemo run` checks it
        settings.check_corpus_paths(["mine"])


def test_pipeline_must_name_known_corpora(tmp_path):
    path = write(tmp_path, "pipelines:\n  p:\n    corpora: [ghost]\n")
    with pytest.raises(ConfigError, match="ghost"):
        load_settings(path)


def test_not_yaml_and_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(write(tmp_path, "a: [1, 2\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(write(tmp_path, "- 1\n- 2\n"))


def test_processing_digest_ignores_batching_only():
    base = IngestConfig()
    assert base.processing_digest() == IngestConfig(videos_per_batch=2, torch_threads=2).processing_digest()
    assert base.processing_digest() != IngestConfig(crop_size=128).processing_digest()


def test_schedule_is_a_five_field_cron_line(tmp_path):
    base = "corpora:\n  c:\n    path: .\npipelines:\n  p:\n    corpora: [c]\n"
    assert load_settings(write(tmp_path, base + "    schedule: '0 3 * * *'\n")).pipelines["p"].schedule == "0 3 * * *"
    with pytest.raises(ConfigError, match=r"pipelines\.p\.schedule: .*five fields"):
        load_settings(write(tmp_path, base + "    schedule: 'daily'\n"))


@pytest.mark.parametrize("cron", ["61 3 * * *", "0 3 32 * *", "0 25 * * *", "0 3 * * funday"])
def test_a_schedule_a_cron_parser_refuses_fails_naming_the_pipeline_and_the_value(tmp_path, cron):
    base = "corpora:\n  c:\n    path: .\npipelines:\n  nightly:\n    corpora: [c]\n"
    expected = rf"pipelines\.nightly\.schedule: .*{re.escape(repr(cron))}.*not a valid cron"
    with pytest.raises(ConfigError, match=expected):
        load_settings(write(tmp_path, base + f"    schedule: '{cron}'\n"))


def test_the_processing_digest_of_existing_ingest_folders_survives_a_renamed_setting():
    # Ingest folders store this digest; a rename (window_seconds -> max_cut_seconds) must not change it, or every
    # existing folder would be refused as made with other settings. The value is the digest of the defaults before
    # the speed-ups (options added since are left out at the value that matches what was done before them).
    view = IngestConfig().digest_view()
    assert view["window_seconds"] == 8.0 and "max_cut_seconds" not in view
    assert IngestConfig(**BEFORE_SPEED_UPS).processing_digest() == "18e68a16f02acbf0"
    assert IngestConfig(max_cut_seconds=6).processing_digest() != IngestConfig().processing_digest()


def test_the_speed_up_defaults_are_a_new_processing_digest():
    """New defaults make other clips, so their folders are new ones; each added option is in the digest when changed."""
    assert IngestConfig().processing_digest() != "18e68a16f02acbf0"
    for key, value in (("detect_pyramid_factor", 0.65), ("media_io", "pyav")):
        changed = IngestConfig(**{**BEFORE_SPEED_UPS, key: value})
        assert changed.digest_view()[key] == value and changed.processing_digest() != "18e68a16f02acbf0"


def test_a_misspelt_stage_override_fails_when_the_file_loads(tmp_path):
    path = tmp_path / "pipelines.yaml"
    overrides = "{evaluate: {foldz: 3}}"
    path.write_text(f"corpora: {{c: {{path: .}}}}\npipelines: {{p: {{corpora: [c], stage_overrides: {overrides}}}}}\n")
    with pytest.raises(ConfigError, match=r"pipelines.yaml: pipelines.p.stage_overrides.evaluate: invalid configuration"
                                          r"\n  foldz: unknown key"):
        load_settings(path)


def laughs(indent: str, levels: int = 9) -> str:
    """A "billion laughs" list: each anchor holds nine aliases of the one before (9**levels strings in all)."""
    lines = [f'{indent}- &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"{indent}- &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("where, text, key", [
    ("typed key", "stages:\n  align:\n    prompt_templates:\n" + laughs("      "), "stages.align.prompt_templates[4]"),
    ("stage_overrides", "corpora: {c: {path: .}}\npipelines:\n  p:\n    corpora: [c]\n    stage_overrides:\n"
                        "      align:\n        prompt_templates:\n" + laughs("          "),
     "pipelines.p.stage_overrides.align.prompt_templates[4]"),
])
def test_an_alias_bomb_is_refused_at_once_naming_the_file_and_key(tmp_path, capsys, where, text, key):
    from flows.cli import main

    path = write(tmp_path, text)
    started = time.monotonic()
    code = main(["--work-dir", str(tmp_path / "work"), "config", "--config", str(path)])
    took = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 2 and took < 1.0, (where, took)
    expanded = f"more than {MAX_CONFIG_VALUES} values once YAML aliases are expanded"
    assert err == f"vaemo: error: {path}: {key}: {expanded}; refused\n"


def test_aliases_within_the_bounds_still_load(tmp_path):
    path = write(tmp_path, "stages:\n  evaluate: {folds: &k 3}\n  ingest: {detect_every: *k}\n"
                           "  align: {prompt_templates: &t ['a {label} face']}\n"
                           "corpora: {c: {path: .}}\npipelines: {p: {corpora: [c], stage_overrides: "
                           "{align: {prompt_templates: *t}}}}\n")
    settings = load_settings(path)
    assert settings.stages.ingest.detect_every == settings.stages.evaluate.folds == 3
    assert settings.pipelines["p"].settings_for(settings.stages, "align").prompt_templates == ["a {label} face"]


@pytest.mark.parametrize("text, message", [
    ("stages: " + "[" * 5000 + "]" * 5000 + "\n", f"line 1, column 58: nested deeper than {MAX_CONFIG_DEPTH} levels"),
    ("stages: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n", f"nested deeper than {MAX_CONFIG_DEPTH} levels"),
    ("a0: &a0 [1]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 200)),
     f"nested deeper than {MAX_CONFIG_DEPTH} levels once aliases are expanded"),
    ("stages: &s {ingest: *s}\n", "stages.ingest: an alias refers to the value that contains it"),
    ("x: [" + ",".join(["1"] * (MAX_CONFIG_VALUES + 1)) + "]\n", f"more than {MAX_CONFIG_VALUES} values"),
    ("x: '" + "a" * MAX_CONFIG_BYTES + "'\n", f"larger than {MAX_CONFIG_BYTES // 1024} KiB"),
])
def test_a_document_beyond_the_bounds_is_one_line_naming_the_file(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value) and "\n" not in str(err.value)


def test_unreadable_bytes_and_broken_yaml_are_one_line_naming_the_file(tmp_path):
    path = tmp_path / "pipelines.yaml"
    path.write_bytes(b"stages: \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"pipelines.yaml: not UTF-8 text \(byte 8\)$"):
        load_settings(path)
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, "a: [1, 2\n"))
    assert str(err.value) == f"{path}: not valid YAML at line 2, column 1: while parsing a flow sequence; expected " \
                             "',' or ']', but got '<stream end>'"


def test_a_prompt_file_is_read_within_the_same_bounds(tmp_path):
    from vaemo.caption.prompt import load_prompt

    prompt = tmp_path / "prompt.yaml"
    prompt.write_text("version: x\nsystem: [1, 2\n")
    with pytest.raises(ConfigError, match=rf"^{prompt}: not valid YAML at line 3, column 1: "):
        load_prompt(str(prompt))
    prompt.write_text("version: x\nsystem:\n" + laughs("  "))
    with pytest.raises(ConfigError, match=rf"^{prompt}: system\[4\]: more than {MAX_CONFIG_VALUES} values"):
        load_prompt(str(prompt))
