"""Migrated empty databases of Prefect and MLflow, made once per installed version and copied into new work
directories.

Migrating a new database costs a first command seconds (Prefect's 16 s and MLflow's 1.5 s on a 2-core machine).
``make install`` (and the images) make both (``python -m vaemo.store_templates``); a work directory whose
database is missing starts from a copy. Without a template, each store migrates its new database itself.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Callable
from contextlib import closing
from importlib.metadata import version
from pathlib import Path

PREFECT, MLFLOW = "prefect", "mlflow"


def template(package: str) -> Path:
    """Where the empty database of the installed ``package`` is kept: beside the environment's packages."""
    return Path(sys.prefix) / "share" / "vaemo" / f"{package}-{version(package)}.db"


def seed(database: Path, package: str) -> None:
    """``database`` as a copy of ``package``'s template, when it does not exist and there is a template; call
    under the lock that guards making the database."""
    source = template(package)
    if Path(database).exists() or not source.is_file():
        return
    part = Path(database).with_name(f".{Path(database).name}.{os.getpid()}")
    shutil.copyfile(source, part)
    part.replace(database)


def _migrate_prefect(database: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not (k.startswith("PREFECT_") and "_DATABASE_" in k)}
    env["PREFECT_API_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{database}"
    subprocess.run([sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"], env=env, check=True,
                   stdout=subprocess.DEVNULL)


def _migrate_mlflow(database: Path) -> None:
    import mlflow

    mlflow.MlflowClient(f"sqlite:///{database}").search_experiments()  # the store makes its tables
    # and its Default experiment, with this process's folder as its artifact location: removed, so that the store
    # makes it again at its first open in the work directory, where it would have without a template.
    with closing(sqlite3.connect(database)) as connection, connection:
        connection.execute("DELETE FROM experiments")


MIGRATIONS: dict[str, Callable[[Path], None]] = {PREFECT: _migrate_prefect, MLFLOW: _migrate_mlflow}


def make(package: str) -> Path:
    """Migrate a new database with ``package``'s own code and keep it as its template."""
    target = template(package)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        database = Path(scratch) / "new.db"
        MIGRATIONS[package](database)
        database.replace(target)
    return target


if __name__ == "__main__":
    for name in MIGRATIONS:
        print(f"vaemo: the empty {name} database: {make(name)}")
