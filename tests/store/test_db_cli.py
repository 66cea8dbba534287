"""`memsvc db upgrade` on SQLite and PostgreSQL, and where the Alembic environment is found."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from memsvc.cli import main
from memsvc.store import migrate
from memsvc.store.database import sqlite_url
from memsvc.store.migrate import current_revision, head_revision


def test_upgrade_the_embedded_database(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data_dir = tmp_path / "data"
    assert main(["db", "upgrade", "--data-dir", str(data_dir)]) == 0
    assert current_revision(sqlite_url(data_dir)) == head_revision()
    assert capsys.readouterr().out.endswith(f": empty -> {head_revision()}\n")
    assert main(["db", "upgrade", "--data-dir", str(data_dir)]) == 0  # at head: nothing to do
    assert f"{head_revision()} -> {head_revision()}" in capsys.readouterr().out


def test_upgrade_a_database_url(postgres_url: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["db", "upgrade", "--database-url", postgres_url]) == 0
    assert current_revision(postgres_url) == head_revision()


def test_an_unreachable_database_is_an_error(capsys: pytest.CaptureFixture) -> None:
    url = "postgresql+psycopg://memsvc:secret@127.0.0.1:1/memsvc"
    assert main(["db", "upgrade", "--database-url", url]) == 2
    err = capsys.readouterr().err
    assert "cannot reach" in err and "secret" not in err


def test_an_installed_copy_is_used_without_a_checkout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    installed = tmp_path / "share" / "memsvc" / "migrations"
    shutil.copytree(migrate.SOURCE_MIGRATIONS_DIR, installed)
    monkeypatch.setattr(migrate, "SOURCE_MIGRATIONS_DIR", tmp_path / "no-checkout")
    monkeypatch.setattr(migrate, "INSTALLED_MIGRATIONS_DIR", installed)
    assert migrate.migrations_dir() == installed
    url = sqlite_url(tmp_path)
    migrate.upgrade(url)
    assert current_revision(url) == head_revision()
    monkeypatch.setattr(migrate, "INSTALLED_MIGRATIONS_DIR", tmp_path / "nothing")
    with pytest.raises(FileNotFoundError):
        migrate.migrations_dir()
