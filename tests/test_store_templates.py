"""The migrated empty databases new work directories start from (vaemo/store_templates.py)."""

from __future__ import annotations

import logging
import sqlite3
import sys
from contextlib import closing

from vaemo import store_templates, tracking
from vaemo.store_templates import MLFLOW, PREFECT


def rows(database, query: str) -> list[tuple]:
    with closing(sqlite3.connect(database)) as connection:
        return connection.execute(query).fetchall()


def test_the_install_made_the_empty_databases_of_the_installed_versions():
    for package in (PREFECT, MLFLOW):
        template = store_templates.template(package)
        assert template.is_file(), f"`make install` makes {template} (python -m vaemo.store_templates)"
        assert len(rows(template, "SELECT version_num FROM alembic_version")) == 1  # migrated to one head
    assert rows(store_templates.template(MLFLOW), "SELECT * FROM experiments") == []


def test_a_new_mlflow_store_is_a_copy_that_makes_its_default_experiment_where_it_opens(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "prefix"))
    store_templates.make(MLFLOW)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "work").mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    caplog.clear()  # what making the template logged
    with caplog.at_level(logging.INFO, logger="mlflow.store.db.utils"):
        experiments = tracking.client("sqlite:///work/mlflow.db").search_experiments()
    assert "Creating initial MLflow database tables" not in caplog.text  # not migrated: copied
    assert [e.name for e in experiments] == ["Default"]
    assert experiments[0].artifact_location.startswith(str(elsewhere))


def test_an_existing_database_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "prefix"))
    store_templates.make(MLFLOW)
    database = tmp_path / "mlflow.db"
    database.write_bytes(b"kept")
    store_templates.seed(database, MLFLOW)
    assert database.read_bytes() == b"kept"
    store_templates.seed(tmp_path / "prefect.db", PREFECT)  # no template of it under this prefix: nothing made
    assert not (tmp_path / "prefect.db").exists()
