from pathlib import Path

import pytest

from vaemo.config import IngestConfig, load_settings
from vaemo.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


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


def test_the_processing_digest_of_existing_ingest_folders_survives_a_renamed_setting():
    # Ingest folders store this digest; a rename (window_seconds -> max_cut_seconds) must not change it, or every
    # existing folder would be refused as made with other settings. The value is the digest of the defaults.
    view = IngestConfig().digest_view()
    assert view["window_seconds"] == 8.0 and "max_cut_seconds" not in view
    assert IngestConfig().processing_digest() == "18e68a16f02acbf0"
    assert IngestConfig(max_cut_seconds=6).processing_digest() != IngestConfig().processing_digest()


def test_a_misspelt_stage_override_fails_when_the_file_loads(tmp_path):
    path = tmp_path / "pipelines.yaml"
    overrides = "{evaluate: {foldz: 3}}"
    path.write_text(f"corpora: {{c: {{path: .}}}}\npipelines: {{p: {{corpora: [c], stage_overrides: {overrides}}}}}\n")
    with pytest.raises(ConfigError, match=r"pipelines.yaml: pipelines.p.stage_overrides.evaluate: invalid configuration"
                                          r"\n  foldz: unknown key"):
        load_settings(path)
