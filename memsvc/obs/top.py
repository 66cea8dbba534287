"""`memsvc top`: the hottest sessions of one node, live, from its admin API.

Polls `AdminService.ListResident` every `--interval` seconds and shows the
resident sessions that streamed the most tokens since the previous poll
(tokens/s from the change of each session's position), with their tier and
memory health (writes per 1k tokens, norm, surprise; "-" where the server
does not report it) and the guards' mitigation in force (step scale below 1,
forget boost above 0; blank when none). The admin key comes from --admin-key-file,
--admin-key or $MEMSVC_ADMIN_KEY.

Fetching, converting and rendering are separate so that the table is a pure
function of the rows (`render_top`).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from rich.console import Console
from rich.live import Live
from rich.table import Table

from memsvc.client.admin import AdminClient
from memsvc.client.errors import MemsvcError
from memsvc.proto.v1 import memsvc_pb2 as pb
from memsvc.settings import resolve_admin_key

_MISSING = "-"


@dataclass(frozen=True)
class TopRow:
    """One resident session as `memsvc top` shows it; None: not known (yet)."""

    session_id: str
    tenant_id: str
    tier: str
    position: int
    pinned: bool
    tokens_per_s: float | None  # since the previous poll; None on a session's first
    updates_per_1k_tokens: float | None = None
    memory_norm: float | None = None
    surprise: float | None = None
    step_scale: float | None = None  # the memory's knobs; off neutral once a guard acted
    forget_boost: float | None = None


def rows_from_resident(
    sessions: Sequence[pb.ResidentSession], previous: Mapping[str, int], seconds: float
) -> list[TopRow]:
    """Rows of one poll; `previous` holds the positions of the poll `seconds` earlier."""
    rows = []
    for s in sessions:
        before = previous.get(s.session_id)
        rate = (s.position - before) / seconds if before is not None and seconds > 0 else None
        rows.append(
            TopRow(
                session_id=s.session_id,
                tenant_id=s.tenant_id,
                tier=pb.Tier.Name(s.tier).removeprefix("TIER_").lower(),
                position=s.position,
                pinned=s.pinned,
                tokens_per_s=rate,
                updates_per_1k_tokens=_present(s, "updates_per_1k_tokens"),
                memory_norm=_present(s, "memory_norm"),
                surprise=_present(s, "surprise"),
                step_scale=s.step_scale,
                forget_boost=s.forget_boost,
            )
        )
    return rows


def _present(message: pb.ResidentSession, name: str) -> float | None:
    return getattr(message, name) if message.HasField(name) else None


def render_top(rows: Sequence[TopRow], *, limit: int = 20, title: str = "memsvc top") -> Table:
    """The `limit` hottest rows (most tokens/s, then furthest position) as a table."""
    hottest = sorted(rows, key=lambda r: (r.tokens_per_s or 0.0, r.position), reverse=True)
    shown = hottest[:limit]
    table = Table(title=title, caption=f"{len(shown)} of {len(rows)} resident sessions")
    table.add_column("session", no_wrap=True)
    table.add_column("tenant", no_wrap=True)
    table.add_column("tier")
    for numeric in ("position", "tokens/s", "writes/1k tok", "norm", "surprise"):
        table.add_column(numeric, justify="right")
    table.add_column("mitigation")
    table.add_column("pinned")
    for r in shown:
        table.add_row(
            r.session_id,
            r.tenant_id,
            r.tier,
            f"{r.position:,}",
            _number(r.tokens_per_s, ",.0f"),
            _number(r.updates_per_1k_tokens, ".1f"),
            _number(r.memory_norm, ".4g"),
            _number(r.surprise, ".3g"),
            _mitigation(r),
            "yes" if r.pinned else "",
        )
    return table


def _mitigation(row: TopRow) -> str:
    if row.step_scale is None or row.forget_boost is None:
        return _MISSING
    knobs = []
    if row.step_scale < 1.0:
        knobs.append(f"step x{row.step_scale:.3g}")
    if row.forget_boost > 0.0:
        knobs.append(f"forget +{row.forget_boost:.2g}")
    return ", ".join(knobs)


def _number(value: float | None, spec: str) -> str:
    return _MISSING if value is None else format(value, spec)


def watch(
    fetch: Callable[[], Sequence[pb.ResidentSession]],
    *,
    interval: float,
    limit: int,
    console: Console,
    title: str = "memsvc top",
    rounds: int | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Poll `fetch` every `interval` seconds and redraw the table in place, `rounds` times
    (None: until interrupted)."""
    previous: dict[str, int] = {}
    last: float | None = None
    done = 0
    with Live(console=console, auto_refresh=False) as live:
        while True:
            sessions = fetch()
            now = clock()
            seconds = 0.0 if last is None else now - last
            rows = rows_from_resident(sessions, previous, seconds)
            live.update(render_top(rows, limit=limit, title=title), refresh=True)
            previous = {s.session_id: s.position for s in sessions}
            last = now
            done += 1
            if rounds is not None and done >= rounds:
                return
            time.sleep(interval)


def run_top(
    address: str,
    admin_key: str,
    interval: float = 2.0,
    *,
    limit: int = 20,
    tls: bool = False,
    root_certificates: bytes | None = None,
) -> int:
    """`memsvc top` against the server at `address`, until Ctrl-C."""
    admin = AdminClient(address, admin_key, tls=tls, root_certificates=root_certificates)
    with admin, contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how top ends
        watch(
            admin.resident,
            interval=interval,
            limit=limit,
            console=Console(),
            title=f"memsvc top  {address}",
        )
    return 0


def run_top_command(args: argparse.Namespace) -> int:
    """`memsvc top` (flags in memsvc/obs/top_cli.py): the admin key, then :func:`run_top`."""
    try:
        key = resolve_admin_key(args).value
    except ValueError as error:
        print(f"memsvc top: {error}", file=sys.stderr)
        return 1
    if key is None:
        print(
            "memsvc top: give the admin key: --admin-key-file, --admin-key or MEMSVC_ADMIN_KEY",
            file=sys.stderr,
        )
        return 1
    roots = args.ca_cert.read_bytes() if args.ca_cert else None
    try:
        return run_top(
            args.address,
            key,
            args.interval,
            limit=args.limit,
            tls=args.tls,
            root_certificates=roots,
        )
    except MemsvcError as error:
        print(f"memsvc top: {error}", file=sys.stderr)
        return 1
