"""`memsvc sessions ...`: a tenant's sessions on a running server, through the SDK.

memsvc sessions list
memsvc sessions show SESSION
memsvc sessions checkpoint SESSION
memsvc sessions evict SESSION [--tier disk]      # needs the admin key
memsvc sessions delete SESSION

The server is --address ($MEMSVC_ADDRESS); the tenant's key comes from
$MEMSVC_API_KEY (never a flag, so it stays out of `ps` and shell history) and the
admin key from --admin-key-file, --admin-key or $MEMSVC_ADMIN_KEY.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from memsvc.settings import add_admin_key_flags, resolve_admin_key

# The SDK, gRPC and rich are imported by the commands themselves: parsing (and --help)
# stays fast.
if TYPE_CHECKING:
    from google.protobuf.message import Message

    from memsvc.client.sync import MemoryClient


def add_sessions_parser(commands: argparse._SubParsersAction) -> None:
    sessions = commands.add_parser(
        "sessions",
        help="list, show, checkpoint, evict or delete sessions on a server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = sessions.add_subparsers(dest="sessions", required=True)
    for name, run, help_text in (
        ("list", _list, "the tenant's sessions"),
        ("show", _show, "one session"),
        ("checkpoint", _checkpoint, "make a session's state durable now"),
        ("evict", _evict, "move a resident session out of memory (admin key)"),
        ("delete", _delete, "delete a session"),
    ):
        action = actions.add_parser(name, help=help_text)
        if name != "list":
            action.add_argument("session_id")
        if name == "evict":
            action.add_argument("--tier", choices=("disk", "host"), default="disk")
            add_admin_key_flags(action)
        action.add_argument(
            "--address", default=os.environ.get("MEMSVC_ADDRESS", "localhost:50051")
        )
        action.add_argument("--tls", action="store_true", help="connect with TLS")
        action.add_argument("--ca-cert", type=Path, help="PEM roots for a private CA (implies TLS)")
        action.add_argument("--json", action="store_true", help="print JSON")
        action.set_defaults(func=_guarded(run))


class _MissingKeyError(Exception):
    """The environment variable holding a key is not set."""


def _guarded(run: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        from memsvc.client.errors import MemsvcError

        try:
            run(args)
        except (MemsvcError, _MissingKeyError) as error:
            print(f"memsvc sessions {args.sessions}: {error}", file=sys.stderr)
            return 1
        return 0

    return command


def _key(name: str) -> str:
    key = os.environ.get(name)
    if not key:
        raise _MissingKeyError(f"set {name} to the key")
    return key


def _admin_key(args: argparse.Namespace) -> str:
    try:
        key = resolve_admin_key(args).value
    except ValueError as error:
        raise _MissingKeyError(str(error)) from error
    if key is None:
        raise _MissingKeyError(
            "give the admin key: --admin-key-file, --admin-key or MEMSVC_ADMIN_KEY"
        )
    return key


def _client(args: argparse.Namespace) -> MemoryClient:
    from memsvc.client.sync import MemoryClient

    roots = args.ca_cert.read_bytes() if args.ca_cert else None
    return MemoryClient(args.address, _key("MEMSVC_API_KEY"), tls=args.tls, root_certificates=roots)


def _print(message: Message) -> None:
    from google.protobuf.json_format import MessageToDict

    print(json.dumps(MessageToDict(message, preserving_proto_field_name=True), indent=2))


def _list(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from memsvc.proto.v1 import memsvc_pb2 as pb

    with _client(args) as client:
        sessions = client.list_sessions()
    if args.json:
        _print(pb.ListSessionsResponse(sessions=sessions))
        return
    table = Table(title=f"{len(sessions)} sessions")
    for column in ("session", "name", "position", "durable", "tier", "created"):
        table.add_column(column, no_wrap=True)
    for s in sessions:
        table.add_row(
            s.session_id,
            s.name,
            f"{s.position:,}",
            f"{s.durable_position:,}",
            pb.Tier.Name(s.tier).removeprefix("TIER_").lower(),
            s.created_at.ToDatetime().isoformat(timespec="seconds"),
        )
    Console(width=max(Console().width, 140)).print(table)  # ids are 36 characters


def _show(args: argparse.Namespace) -> None:
    with _client(args) as client:
        _print(client.open_session(args.session_id).info)


def _checkpoint(args: argparse.Namespace) -> None:
    with _client(args) as client:
        _print(client.open_session(args.session_id).checkpoint())


def _evict(args: argparse.Namespace) -> None:
    from memsvc.client.admin import AdminClient

    roots = args.ca_cert.read_bytes() if args.ca_cert else None
    with AdminClient(
        args.address, _admin_key(args), tls=args.tls, root_certificates=roots
    ) as admin:
        admin.evict(args.session_id, args.tier)
    print(f"evicted {args.session_id} to {args.tier}")


def _delete(args: argparse.Namespace) -> None:
    with _client(args) as client:
        client.open_session(args.session_id).delete()
    print(f"deleted {args.session_id}")
