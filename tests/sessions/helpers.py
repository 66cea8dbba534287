"""What the session-manager tests share: reading a session's state back, and its reference."""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from memsvc.engine import StreamingEngine
from memsvc.model import ModelState
from memsvc.sessions.api import AppendResult
from memsvc.sessions.checkpoint import decode_checkpoint
from memsvc.sessions.manager import SessionManager
from tests.state_asserts import assert_states_equal


def state_of(manager: SessionManager, tenant_id: str, session_id: str) -> ModelState:
    """The session's state, through the public export (so it is restored if it was evicted)."""
    data = b"".join(manager.export(tenant_id, session_id, chunk_bytes=4096))
    return ModelState.from_dict(decode_checkpoint(data, source=Path("export")).tensors)


def reference(engine: StreamingEngine, tokens: Sequence[int]) -> ModelState:
    """An uninterrupted run: one append of the whole stream to a fresh state."""
    state = engine.init_state()
    if tokens:
        state, _ = engine.append(state, list(tokens))
    return state


def assert_matches_reference(
    manager: SessionManager, engine: StreamingEngine, tenant_id: str, session_id: str, tokens
) -> None:
    """The session's state equals the reference over ``tokens`` (float64: to 1e-9)."""
    assert_states_equal(
        state_of(manager, tenant_id, session_id), reference(engine, tokens), rtol=1e-9, atol=1e-9
    )


def flat(batches: Sequence[Sequence[int]]) -> list[int]:
    return [token for batch in batches for token in batch]


def poisoned(state: ModelState) -> ModelState:
    """A copy of ``state`` whose memory weights are infinite: its next memory write goes
    non-finite (an induced explosion)."""
    return ModelState.from_dict(
        {
            name: torch.full_like(tensor, math.inf) if ".memory.weights." in name else tensor
            for name, tensor in state.to_dict().items()
        }
    )


def explosive(state: ModelState) -> ModelState:
    """A copy of ``state``, finite, whose memory step is scaled by 1e300: its next memory
    write goes non-finite."""
    return ModelState.from_dict(
        {
            name: torch.full_like(tensor, 1e300) if name.endswith(".memory.step_scale") else tensor
            for name, tensor in state.to_dict().items()
        }
    )


def poison(
    manager: SessionManager,
    tenant_id: str,
    session_id: str,
    how: Callable[[ModelState], ModelState] = poisoned,
) -> None:
    """Replaces the session's state in memory with ``how(state)`` (as a fault would: nothing
    on disk changes). Reaches into the manager: no public call can break a state."""
    manager.prefetch(tenant_id, session_id)
    live = manager._books.get(session_id)
    assert live is not None and live.state is not None
    with manager._books.holding(live):
        live.move(how(live.state))


class Acks:
    """Collects ``durable`` calls; a cleared ``gate`` holds the acknowledging thread until set."""

    def __init__(self) -> None:
        self.calls: queue.Queue[tuple[int, AppendResult | Exception, str]] = queue.Queue()
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, index: int, outcome: AppendResult | Exception) -> None:
        self.gate.wait(10)
        self.calls.put((index, outcome, threading.current_thread().name))

    def take(self, count: int) -> list[tuple[int, AppendResult | Exception, str]]:
        return [self.calls.get(timeout=10) for _ in range(count)]
