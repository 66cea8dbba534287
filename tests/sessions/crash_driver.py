"""A process to kill -9: streams stdin batches into one session and acknowledges each append.

    python -m tests.sessions.crash_driver DATA_DIR TENANT_ID SESSION_ID

Each stdin line is a batch of token ids; once ``SessionManager.append`` returns
(the batch is durable) it prints ``ack <position>``. It checkpoints every
CHECKPOINT_EVERY tokens, so a kill lands between checkpoints with a log tail.
The model is the tests' tiny one, which the test rebuilds for its reference.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from memsvc.engine import StreamingEngine
from memsvc.obs.logging import configure_logging
from memsvc.sessions.manager import ManagerConfig, SessionManager
from memsvc.store.database import Database
from memsvc.store.hot_state import InProcessHotStateTracker
from tests.engine.conftest import tiny_model

CHECKPOINT_EVERY = 48


def main(data_dir: str, tenant_id: str, session_id: str) -> None:
    torch.set_num_threads(1)
    configure_logging("warning", json=True)  # to stderr: stdout carries the acknowledgements
    manager = SessionManager(
        ManagerConfig(data_dir=Path(data_dir), checkpoint_every_tokens=CHECKPOINT_EVERY),
        engine=StreamingEngine(tiny_model(seed=0), max_segment=64),
        database=Database.embedded(Path(data_dir)),
        tracker=InProcessHotStateTracker(),
    )
    print("ready", flush=True)
    for line in sys.stdin:
        result = manager.append(tenant_id, session_id, [int(t) for t in line.split()])
        print(f"ack {result.position}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
