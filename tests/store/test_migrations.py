"""Alembic: ``upgrade head`` on an empty database yields exactly the schema the models describe."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import CheckConstraint, Column, Integer, MetaData, inspect

from memsvc.store.database import create_engine_for, sqlite_url
from memsvc.store.migrate import alembic_config, current_revision, head_revision, upgrade
from memsvc.store.models import Base

ROOT = Path(__file__).resolve().parents[2]


def _schema_diff(url: str, metadata: MetaData = Base.metadata) -> list:
    engine = create_engine_for(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection, opts={"compare_type": True, "compare_server_default": True}
            )
            return compare_metadata(context, metadata)
    finally:
        engine.dispose()


def _check_constraints(url: str) -> dict[str, set[str]]:
    engine = create_engine_for(url)
    try:
        inspector = inspect(engine)
        return {
            table: {ck["name"] for ck in inspector.get_check_constraints(table)}
            for table in Base.metadata.tables
        }
    finally:
        engine.dispose()


def test_upgrade_head_matches_the_models(database_url: str) -> None:
    assert current_revision(database_url) is None
    upgrade(database_url)
    assert current_revision(database_url) == head_revision()
    assert _schema_diff(database_url) == []
    # Autogenerate does not compare CHECK constraints; compare their names here.
    expected = {
        name: {c.name for c in table.constraints if isinstance(c, CheckConstraint)}
        for name, table in Base.metadata.tables.items()
    }
    assert _check_constraints(database_url) == expected
    upgrade(database_url)  # already at head: nothing to do
    assert _schema_diff(database_url) == []


def test_the_comparison_sees_differences(database_url: str) -> None:
    upgrade(database_url)
    changed = MetaData(naming_convention=Base.metadata.naming_convention)
    for table in Base.metadata.tables.values():
        table.to_metadata(changed)
    changed.tables["sessions"].append_column(Column("extra", Integer, nullable=True))
    diff = _schema_diff(database_url, changed)
    assert [(entry[0], entry[3].name) for entry in diff] == [("add_column", "extra")]


def test_downgrade_to_base_and_back(database_url: str) -> None:
    upgrade(database_url)
    engine = create_engine_for(database_url)
    try:
        with engine.begin() as connection:
            config = alembic_config()
            config.attributes["connection"] = connection
            command.downgrade(config, "base")
        assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    finally:
        engine.dispose()
    upgrade(database_url)
    assert _schema_diff(database_url) == []


def test_alembic_command_line(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    alembic = Path(sys.executable).with_name("alembic")
    subprocess.run(
        [str(alembic), "-x", f"url={url}", "upgrade", "head"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert current_revision(url) == head_revision()
    assert _schema_diff(url) == []
