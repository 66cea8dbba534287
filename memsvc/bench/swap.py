"""`memsvc bench swap`: evicting a session to disk and restoring it, beside the disk's own speed.

For each state size a SessionManager (embedded SQLite, in-process tracker)
runs on a scratch directory under --dir, with one session whose state is
real: the reference model's architecture (random weights: they do not change
the size) has streamed a few hundred tokens into it. Each repeat appends one
token (so the state has something to checkpoint), then times

    evict     SessionManager.evict(..., DISK): a checkpoint generation written
              crash-safely (file fsync, rename, directory fsync) and recorded
              in SQL, the log closed, the lease released;
    restore   SessionManager.prefetch: lease, SQL lookup, log opened, the
              checkpoint read and verified (SHA-256), the state on the device.

Beside them, in the same run and directory, the disk on the same bytes:
write + fsync of a new file of the checkpoint's size, and reading it back.
Both reads hit the page cache (the file was just written), as a restore of
a recently evicted session does. Sizes: the reference state, then the same
model with longer attention windows (the KV cache is most of a state).

Goals (docs/ARCHITECTURE.md, "Goals"): restore p99 < 10 ms for a state of a few MB;
eviction at half the disk's write speed or better.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from memsvc.engine import StreamingEngine
from memsvc.model import MAGModel
from memsvc.sessions.api import Tier
from memsvc.sessions.manager import ManagerConfig, SessionManager
from memsvc.store import metadata
from memsvc.store.database import Database, sqlite_url
from memsvc.store.hot_state import InProcessHotStateTracker
from memsvc.store.migrate import upgrade
from memsvc.train.recipe import model_config

WARM_TOKENS = 256  # streamed before timing, so every part of the state holds data


@dataclass
class SizeResult:
    window: int  # the attention window of the model (the state's size follows it)
    state_bytes: int
    file_bytes: int  # the checkpoint file: the bytes both sides write and read
    evict_p50_ms: float
    evict_p99_ms: float
    restore_p50_ms: float
    restore_p99_ms: float
    disk_write_p50_ms: float  # write + fsync of a new file of file_bytes
    disk_write_p99_ms: float
    disk_read_p50_ms: float
    disk_read_p99_ms: float

    @property
    def evict_share_of_disk_speed(self) -> float:
        """Eviction throughput over the disk's write + fsync throughput (medians)."""
        return self.disk_write_p50_ms / self.evict_p50_ms


def run_swap_benchmark(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    args.dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-swap-", dir=args.dir) as scratch:
        results = [
            _measure(Path(scratch) / f"window-{window}", window, args.repeats, args.device)
            for window in args.windows
        ]
    report = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "device": args.device,
            "dir": str(args.dir.absolute()),
        },
        "repeats": args.repeats,
        "sizes": [
            asdict(r) | {"evict_share_of_disk_speed": r.evict_share_of_disk_speed} for r in results
        ],
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_table(report)
    return 0


def _measure(directory: Path, window: int, repeats: int, device: str) -> SizeResult:
    directory.mkdir(parents=True)
    model = MAGModel(replace(model_config("reference"), window=window)).eval().to(device)
    engine = StreamingEngine(model)
    upgrade(sqlite_url(directory))
    database = Database.embedded(directory)
    with database.unit_of_work() as db:
        tenant = metadata.create_tenant(db, "bench")[0].id
    manager = SessionManager(
        ManagerConfig(data_dir=directory, device_budget_bytes=1 << 40),
        engine=engine,
        database=database,
        tracker=InProcessHotStateTracker(),
    )
    try:
        session = manager.create(tenant).session_id
        tokens = torch.randint(0, 256, (WARM_TOKENS,), generator=torch.Generator().manual_seed(0))
        manager.append(tenant, session, tokens.tolist())
        state_bytes = manager.get(tenant, session).state_bytes
        evict, restore = [], []
        for i in range(repeats + 1):  # the first pair warms caches and is not kept
            manager.append(tenant, session, [i % 256])
            evicted = _seconds(lambda: manager.evict(tenant, session, Tier.DISK))
            restored = _seconds(lambda: manager.prefetch(tenant, session))
            if i:
                evict.append(evicted)
                restore.append(restored)
        file_bytes = manager.checkpoint(tenant, session).size_bytes
    finally:
        manager.close()
        database.dispose()
    write, read = _disk(directory, file_bytes, repeats)
    return SizeResult(
        window,
        state_bytes,
        file_bytes,
        *_p50_p99(evict),
        *_p50_p99(restore),
        *_p50_p99(write),
        *_p50_p99(read),
    )


def _disk(directory: Path, nbytes: int, repeats: int) -> tuple[list[float], list[float]]:
    """Write + fsync of new files of ``nbytes``, and reading each back (the peer)."""
    data = os.urandom(nbytes)
    write, read = [], []
    for i in range(repeats + 1):
        path = directory / f"raw-{i}.bin"

        def write_file(path: Path = path) -> None:
            with open(path, "xb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())

        written = _seconds(write_file)
        got = _seconds(path.read_bytes)
        path.unlink()
        if i:
            write.append(written)
            read.append(got)
    return write, read


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _p50_p99(samples: list[float]) -> tuple[float, float]:
    """Milliseconds."""
    p50, p99 = np.percentile(np.asarray(samples) * 1000, [50, 99])
    return float(p50), float(p99)


def _print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    machine = report["machine"]
    table = Table(
        title=f"Session swap, {report['repeats']} repeats per size ({machine['device']}, "
        f"{machine['cpus']} CPUs, {machine['dir']})"
    )
    for column in (
        "window",
        "state MB",
        "file MB",
        "evict p50 / p99 ms",
        "disk write+fsync p50 / p99 ms",
        "evict / disk speed",
        "restore p50 / p99 ms",
        "disk read p50 / p99 ms",
    ):
        table.add_column(column, justify="right")
    for size in report["sizes"]:
        table.add_row(
            str(size["window"]),
            f"{size['state_bytes'] / 1e6:.2f}",
            f"{size['file_bytes'] / 1e6:.2f}",
            f"{size['evict_p50_ms']:.1f} / {size['evict_p99_ms']:.1f}",
            f"{size['disk_write_p50_ms']:.1f} / {size['disk_write_p99_ms']:.1f}",
            f"{size['evict_share_of_disk_speed']:.2f}",
            f"{size['restore_p50_ms']:.1f} / {size['restore_p99_ms']:.1f}",
            f"{size['disk_read_p50_ms']:.1f} / {size['disk_read_p99_ms']:.1f}",
        )
    Console(width=max(Console().width, 160)).print(table)
