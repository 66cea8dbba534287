"""Schema migrations from code (``memsvc db upgrade``): Alembic over ``migrations/``."""

from __future__ import annotations

import sysconfig
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import URL

from memsvc.store.database import create_engine_for

# The Alembic environment lives at the repository root (migrations/). A
# checkout or an editable install finds it there; a wheel installs it as data files
# under <prefix>/share/memsvc/migrations (pyproject.toml, [tool.setuptools.data-files]).
SOURCE_MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
INSTALLED_MIGRATIONS_DIR = Path(sysconfig.get_path("data")) / "share" / "memsvc" / "migrations"


def migrations_dir() -> Path:
    """The Alembic environment: the checkout's ``migrations/``, else the installed copy."""
    for candidate in (SOURCE_MIGRATIONS_DIR, INSTALLED_MIGRATIONS_DIR):
        if (candidate / "env.py").is_file():
            return candidate
    raise FileNotFoundError(
        f"no Alembic environment at {SOURCE_MIGRATIONS_DIR} or {INSTALLED_MIGRATIONS_DIR}"
    )


def alembic_config() -> Config:
    """An Alembic configuration for ``migrations/`` that reads no ini file."""
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    return config


def upgrade(url: str | URL, revision: str = "head") -> None:
    """Migrates the database at ``url`` to ``revision``, in one transaction where possible."""
    engine = create_engine_for(url)
    try:
        with engine.begin() as connection:
            config = alembic_config()
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    finally:
        engine.dispose()


def current_revision(url: str | URL) -> str | None:
    """The revision the database at ``url`` is at; None if it was never migrated."""
    engine = create_engine_for(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str | None:
    """The newest revision in ``migrations/``."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()
