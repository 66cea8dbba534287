"""`memsvc top`'s flags; the command itself (rich, gRPC) is imported when it runs."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from memsvc.commands import deferred, module_description
from memsvc.settings import add_admin_key_flags


def add_top_parser(commands: argparse._SubParsersAction) -> None:
    top = commands.add_parser(
        "top",
        help="the hottest sessions of a node, live (admin key)",
        description=module_description("memsvc.obs.top"),
    )
    top.add_argument(
        "--address",
        default=os.environ.get("MEMSVC_ADDRESS", "localhost:50051"),
        help="the node ($MEMSVC_ADDRESS)",
    )
    top.add_argument("--interval", type=float, default=2.0, help="seconds between polls")
    top.add_argument("--limit", type=int, default=20, help="sessions shown")
    top.add_argument("--tls", action="store_true", help="connect with TLS")
    top.add_argument("--ca-cert", type=Path, help="PEM roots for a private CA (implies TLS)")
    add_admin_key_flags(top)
    top.set_defaults(func=deferred("memsvc.obs.top:run_top_command"))
