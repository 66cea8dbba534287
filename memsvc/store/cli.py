"""`memsvc db upgrade`: migrates the metadata database to the newest schema (Alembic).

memsvc db upgrade                                  # the embedded SQLite file in the data directory
memsvc db upgrade --data-dir /var/lib/memsvc       # ... in another data directory
memsvc db upgrade --database-url postgresql+psycopg://memsvc@db.internal/memsvc
"""

from __future__ import annotations

import argparse
import sys

import structlog

from memsvc.settings import add_data_dir_flag, announce, data_dir_line

log = structlog.get_logger(__name__)


def add_db_parser(commands: argparse._SubParsersAction) -> None:
    """Registers ``memsvc db ...`` on the top-level subcommands."""
    db = commands.add_parser("db", help="the metadata database (see `memsvc db --help`)")
    actions = db.add_subparsers(dest="db", required=True)
    parser = actions.add_parser(
        "upgrade",
        help="migrate the database to the newest schema",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--database-url", help="SQLAlchemy URL (default: the SQLite file in --data-dir)"
    )
    add_data_dir_flag(parser)
    parser.set_defaults(func=run_upgrade)


def run_upgrade(args: argparse.Namespace) -> int:
    """Migrates to head and prints the revisions before and after; 2 if unreachable."""
    # SQLAlchemy and Alembic take seconds to import: not for `memsvc ... --help`.
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import OperationalError

    from memsvc.store.database import sqlite_url
    from memsvc.store.migrate import current_revision, head_revision, upgrade

    if args.database_url:
        url = args.database_url
    else:
        announce(data_dir_line("db upgrade", args.data_dir))
        args.data_dir.mkdir(parents=True, exist_ok=True)
        url = sqlite_url(args.data_dir)
    shown = make_url(url).render_as_string(hide_password=True)
    try:
        before = current_revision(url)
        upgrade(url)
    except OperationalError as error:
        print(f"memsvc db upgrade: cannot reach {shown}: {error.orig}", file=sys.stderr)
        return 2
    after = head_revision()
    log.info("database_upgraded", url=shown, before=before, after=after)
    print(f"{shown}: {before or 'empty'} -> {after}")
    return 0
