"""`memsvc top`: rows from the admin API's resident sessions, the hottest first."""

from __future__ import annotations

import io
from collections.abc import Iterator

from rich.console import Console

from memsvc.client.admin import AdminClient
from memsvc.obs.top import TopRow, render_top, rows_from_resident, watch
from memsvc.proto.v1 import memsvc_pb2 as pb
from tests.server.harness import ADMIN_KEY, Service


def resident(session_id: str, position: int, tier: int = pb.TIER_DEVICE) -> pb.ResidentSession:
    return pb.ResidentSession(
        session_id=session_id, tenant_id="acme", tier=tier, position=position, state_bytes=1 << 20
    )


def text(table, width: int = 160) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(table)
    return console.file.getvalue()


def row(session_id: str, tokens_per_s: float | None, position: int = 0, **more) -> TopRow:
    return TopRow(session_id, "acme", "device", position, False, tokens_per_s, **more)


def test_tokens_per_second_come_from_the_change_of_position():
    sessions = [resident("a", 5000), resident("b", 900, pb.TIER_HOST), resident("new", 10)]
    rows = rows_from_resident(sessions, {"a": 1000, "b": 900}, seconds=2.0)
    assert [(r.session_id, r.tier, r.tokens_per_s) for r in rows] == [
        ("a", "device", 2000.0),
        ("b", "host", 0.0),
        ("new", "device", None),  # not in the previous poll
    ]
    first_poll = rows_from_resident(sessions, {}, seconds=0.0)
    assert all(r.tokens_per_s is None for r in first_poll)


def test_the_hottest_sessions_come_first_up_to_the_limit():
    rows = [
        row("idle", 0.0, position=10**6),
        row("hot", 9000.0, position=10),
        row("warm", 300.0),
        row("unknown", None, position=5),
    ]
    table = render_top(rows, limit=3, title="node-1")
    assert [c.header for c in table.columns][:4] == ["session", "tenant", "tier", "position"]
    assert list(table.columns[0].cells) == ["hot", "warm", "idle"]
    assert table.caption == "3 of 4 resident sessions"
    assert "node-1" in text(table)


def test_values_are_formatted_and_unknown_ones_marked():
    rows = [
        row("s", 12345.6, position=1234567, updates_per_1k_tokens=31.25, memory_norm=1234.5678,
            surprise=0.0123456, step_scale=0.25, forget_boost=2e-4),
        row("t", None),
        row("u", None, step_scale=1.0, forget_boost=0.0),
    ]  # fmt: skip
    table = render_top(rows)
    cells = {c.header: list(c.cells) for c in table.columns}
    assert cells["position"] == ["1,234,567", "0", "0"]
    assert cells["tokens/s"] == ["12,346", "-", "-"]
    assert cells["writes/1k tok"] == ["31.2", "-", "-"]
    assert cells["norm"] == ["1235", "-", "-"]
    assert cells["surprise"] == ["0.0123", "-", "-"]
    assert cells["mitigation"] == ["step x0.25, forget +0.0002", "-", ""]


def test_rows_carry_what_the_server_reports():
    measured = resident("m", 5000)
    measured.memory_norm, measured.surprise, measured.step_scale = 21.5, 0.5, 0.5
    (row_,) = rows_from_resident([measured], {}, seconds=0.0)
    assert (row_.memory_norm, row_.surprise, row_.step_scale) == (21.5, 0.5, 0.5)
    assert row_.updates_per_1k_tokens is None  # absent on the wire: not known yet


def test_watch_redraws_with_rates_between_polls():
    polls: Iterator[list[pb.ResidentSession]] = iter(
        [
            [resident("a", 100), resident("b", 100)],
            [resident("a", 4100), resident("b", 600)],
        ]
    )
    times = iter([10.0, 12.0])
    out = io.StringIO()
    console = Console(file=out, width=160, color_system=None, force_terminal=False)
    watch(
        lambda: next(polls),
        interval=0,
        limit=10,
        console=console,
        rounds=2,
        clock=lambda: next(times),
    )
    last = out.getvalue().split("memsvc top")[-1]
    assert "2,000" in last and "250" in last  # (4100 - 100) / 2 and (600 - 100) / 2
    assert last.index(" a ") < last.index(" b ")


def test_top_reads_a_running_server(service: Service):
    """Against the real admin API: the session streaming between polls comes first."""
    tenant = service.alice.metadata

    def create_and_append(size: int) -> str:
        session = service.stub.CreateSession(pb.CreateSessionRequest(), metadata=tenant)
        append(session.session_id, size)
        return session.session_id

    def append(session_id: str, size: int) -> None:
        request = pb.AppendRequest(session_id=session_id, input=pb.Input(text=b"x" * size))
        service.stub.Append(request, metadata=tenant)

    quiet, busy = create_and_append(500), create_and_append(100)
    polls = 0
    out = io.StringIO()
    with AdminClient(service.address, ADMIN_KEY) as admin:

        def fetch() -> list[pb.ResidentSession]:
            nonlocal polls
            polls += 1
            if polls == 2:
                append(busy, 3000)
            return admin.resident()

        console = Console(file=out, width=200, color_system=None)
        times = iter([0.0, 2.0])
        watch(fetch, interval=0, limit=5, console=console, rounds=2, clock=lambda: next(times))
    last = out.getvalue().split("memsvc top")[-1]
    assert last.index(busy) < last.index(quiet)
    assert "1,500" in last  # 3000 tokens in 2 s
    assert "3,100" in last  # the busy session's position
