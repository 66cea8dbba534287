"""The reliability suite's runs: load, faults, bad input. Each returns a JSON-able report.

Every run builds its own loopback cluster over private services
(``services.py``), so it may kill, restart or fill them, and leaves nothing
behind. Bounded in time and count by its arguments.
"""

from __future__ import annotations

import itertools
import statistics
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from memsvc.client import MemoryClient
from memsvc.reliability.cluster import ADMIN_KEY, Backends, LocalCluster
from memsvc.reliability.services import PrivatePostgres, PrivateRedis, SmallDisk
from memsvc.reliability.writers import WRITER_RETRY, WriterRecord, Writers, verify

Report = dict[str, Any]


@contextmanager
def private_cluster(
    workdir: Path,
    model_dir: Path,
    *,
    replicas: int,
    data_dir: Path | None = None,
    extra_args: tuple[str, ...] = (),
) -> Iterator[tuple[LocalCluster, PrivateRedis, PrivatePostgres]]:
    """A started cluster over a private Redis and PostgreSQL of its own."""
    with ExitStack() as stack:
        redis = stack.enter_context(PrivateRedis(workdir / "redis"))
        postgres = stack.enter_context(PrivatePostgres())
        backends = Backends(postgres.url, redis.url, data_dir or workdir / "data")
        cluster = stack.enter_context(
            LocalCluster(workdir, model_dir, backends, replicas=replicas, extra_args=extra_args)
        )
        cluster.start()
        yield cluster, redis, postgres


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _errors(records: list[WriterRecord]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for record in records:
        total.update(record.errors)
    return dict(total)


def _longest_stall(records: list[WriterRecord], since: float) -> float:
    """The longest a writer waited between acknowledgements after ``since`` (seconds)."""
    stall = 0.0
    for record in records:
        times = [since, *(t for t in record.ack_times if t >= since)]
        stall = max(stall, *(b - a for a, b in itertools.pairwise(times)), 0.0)
    return stall


# ---- load ---------------------------------------------------------------------------------


def run_load(
    workdir: Path,
    model_dir: Path,
    *,
    clients: int = 64,
    duration_s: float = 60.0,
    piece_tokens: int = 128,
    replicas: int = 1,
    sample_s: float = 1.0,
    streaming: bool = True,
) -> Report:
    """``clients`` writers for ``duration_s``, each streaming to its session (``streaming``;
    else unary appends one at a time): throughput, ack latency, errors, server memory."""
    with private_cluster(workdir, model_dir, replicas=replicas) as (cluster, _, _):
        api_key = cluster.create_tenant("load")
        writers = Writers(
            cluster.addresses, api_key, clients, piece_tokens=piece_tokens, streaming=streaming
        )
        samples: list[tuple[float, list[int | None]]] = []
        writers.start()
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < duration_s:
            samples.append((round(elapsed, 1), [cluster.rss_bytes(i) for i in range(replicas)]))
            time.sleep(sample_s)
        records = writers.stop()
        elapsed = time.monotonic() - started
        verdict = verify(cluster.addresses, api_key, records)
        cluster.stop_all()
        mitigations = cluster.mitigations()
    latencies = [lat for record in records for lat in record.latencies_s]
    tokens = sum(record.acked_position for record in records)
    rss = [sum(v or 0 for v in values) / 2**20 for _, values in samples]
    quarter = max(len(rss) // 4, 1)
    early, late = (
        statistics.median(rss[quarter : 2 * quarter] or rss),
        statistics.median(rss[-quarter:]),
    )
    return {
        "clients": clients,
        "replicas": replicas,
        "streaming": streaming,
        "duration_s": round(elapsed, 1),
        "piece_tokens": piece_tokens,
        "appends": sum(record.appends for record in records),
        "tokens": tokens,
        "tokens_per_s": round(tokens / elapsed),
        "ack_ms": {
            "p50": round(1000 * _percentile(latencies, 0.5), 1),
            "p99": round(1000 * _percentile(latencies, 0.99), 1),
            "max": round(1000 * max(latencies, default=float("nan")), 1),
        },
        "errors": _errors(records),
        "rss_mb": [[t, round(mb, 1)] for (t, _), mb in zip(samples, rss, strict=True)],
        "rss_growth_pct": round(100 * (late - early) / early, 1) if early else None,
        "mitigations": mitigations,
        "verdict": asdict(verdict),
    }


# ---- faults -------------------------------------------------------------------------------


def _fault(
    name: str,
    cluster: LocalCluster,
    *,
    writers: int,
    before_s: float,
    after_s: float,
    act: Callable[[Writers], str | None],
    piece_tokens: int = 64,
    pace_s: float = 0.02,
) -> Report:
    """Writers run ``before_s``, ``act`` breaks something (returns a note; it sees the
    running writers), writers run on ``after_s``; then every session is checked against
    what its writer was told."""
    api_key = cluster.create_tenant(name)
    running = Writers(
        cluster.addresses, api_key, writers, piece_tokens=piece_tokens, pace_s=pace_s
    ).start()
    time.sleep(before_s)
    at = time.monotonic()
    note = act(running)
    recovered = time.monotonic()
    time.sleep(after_s)
    records = running.stop()
    verdict = verify(cluster.live_addresses(), api_key, records)
    return {
        "fault": name,
        "writers": writers,
        "note": note,
        "mitigations": cluster.mitigations(),
        "errors_seen": _errors(records),
        "longest_stall_s": round(_longest_stall(records, at), 2),
        # Appends acknowledged once the fault was over: the writers carried on.
        "acks_after_fault": sum(t > recovered for r in records for t in r.ack_times),
        **asdict(verdict),
    }


def fault_kill_replica(workdir: Path, model_dir: Path, *, seconds: float = 6.0) -> Report:
    with private_cluster(workdir, model_dir, replicas=3) as (cluster, _, _):

        def act(_: Writers) -> str:
            cluster.kill(0)
            return "kill -9 of replica r0 (of 3); leases expire after 2 s"

        return _fault("kill -9 replica", cluster, writers=6, before_s=2, after_s=seconds, act=act)


def fault_redis_restart(workdir: Path, model_dir: Path, *, seconds: float = 6.0) -> Report:
    with private_cluster(workdir, model_dir, replicas=2) as (cluster, redis, _):

        def act(_: Writers) -> str:
            redis.restart(down_s=1.0)
            return "Redis down 1 s, back empty (leases, fences and hot state lost)"

        return _fault("Redis restart", cluster, writers=4, before_s=2, after_s=seconds, act=act)


def fault_postgres_restart(workdir: Path, model_dir: Path, *, seconds: float = 6.0) -> Report:
    extra = ("--checkpoint-every-tokens", "1024")  # checkpoints (SQL rows) all the time
    with private_cluster(workdir, model_dir, replicas=2, extra_args=extra) as (cluster, _, pg):

        def act(_: Writers) -> str:
            pg.restart(down_s=1.0)
            return "PostgreSQL down 1 s (fast shutdown: connections cut); checkpoints every 1k"

        return _fault(
            "PostgreSQL restart", cluster, writers=4, before_s=2, after_s=seconds, act=act
        )


def fault_full_disk(workdir: Path, model_dir: Path, *, seconds: float = 4.0) -> Report:
    disk = SmallDisk(workdir / "small-disk", size_mb=256)
    with (
        disk,
        private_cluster(workdir, model_dir, replicas=1, data_dir=disk.path / "data") as (
            cluster,
            _,
            _,
        ),
    ):

        def act(writers: Writers) -> str:
            ballast = disk.fill()
            started = time.monotonic()
            time.sleep(seconds)
            # Full until a writer was refused (a loaded machine appends slowly, and the
            # logs' last pages take some records before a write needs a new one).
            while (
                not any(r.error_times for r in writers.records) and time.monotonic() - started < 60
            ):
                time.sleep(0.1)
            full = time.monotonic() - started
            ballast.unlink()
            return f"the data directory's filesystem full for {full:.0f} s, then freed"

        return _fault(
            "full disk", cluster, writers=2, before_s=2, after_s=seconds, act=act, pace_s=0.005
        )


_VANISHING_CLIENT = textwrap.dedent(
    """
    import sys
    from memsvc.client import MemoryClient
    address, api_key = sys.argv[1], sys.argv[2]
    with MemoryClient(address, api_key) as client:
        session = client.create_session("vanishing")
        print(session.id, flush=True)
        pieces = iter(lambda: [65] * 256, None)
        for ack in session.append_stream(pieces, window=8):
            pass
    """
)


def fault_client_vanishes(workdir: Path, model_dir: Path, *, seconds: float = 3.0) -> Report:
    with private_cluster(workdir, model_dir, replicas=1) as (cluster, _, _):
        api_key = cluster.create_tenant("vanishing")
        outcome: dict[str, Any] = {}

        def act(_: Writers) -> str:
            child = subprocess.Popen(
                [sys.executable, "-c", _VANISHING_CLIENT, cluster.addresses[0], api_key],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert child.stdout is not None
            outcome["session"] = child.stdout.readline().strip()
            time.sleep(1.0)  # streaming, with appends in flight
            child.kill()
            child.wait(10)
            return "a streaming client process killed (-9) mid-stream"

        report = _fault("client vanishes", cluster, writers=4, before_s=1, after_s=seconds, act=act)
        with MemoryClient(cluster.addresses, api_key, retry=WRITER_RETRY) as client:
            session = client.open_session(outcome["session"])
            before = session.info.position
            ack = session.append([66] * 16)  # the abandoned session still takes appends
        report["vanished_session"] = {
            "position": before,
            "whole_appends": before % 256 == 0,
            "appends_after": ack.position == before + 16,
        }
        return report


FAULTS: dict[str, Callable[..., Report]] = {
    "kill": fault_kill_replica,
    "redis": fault_redis_restart,
    "postgres": fault_postgres_restart,
    "disk": fault_full_disk,
    "client": fault_client_vanishes,
}


# ---- bad input ----------------------------------------------------------------------------


def run_bad_input(workdir: Path, model_dir: Path, *, examples: int, seed: int) -> Report:
    """The fuzzing campaign (``fuzz/campaign.py``) against one replica of a private cluster."""
    from memsvc.reliability.fuzz.campaign import run_bad_input_campaign

    with private_cluster(workdir, model_dir, replicas=1) as (cluster, _, _):
        api_key = cluster.create_tenant("fuzz")
        cluster.create_tenant("fuzz-other")
        report = run_bad_input_campaign(
            cluster.addresses[0], api_key, ADMIN_KEY, examples=examples, seed=seed
        )
        report["server_exit_code"] = cluster.stop(0)
        return report


def timed(run: Callable[[], Report]) -> Report:
    started = time.monotonic()
    report = run()
    report["wall_s"] = round(time.monotonic() - started, 1)
    return report
