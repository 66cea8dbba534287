"""`StreamGuards`: what the server does with each acknowledged append besides answering it.

Per append it records the stream metrics (`ServiceMetrics.observe_append`, with
this append's own counts: the previous totals of each session are kept here)
and feeds the session's guard (`memsvc.obs.guard.SessionGuard`); a mitigation
the guard decides is applied with `SessionManager.mitigate` (which makes it
durable, records the MITIGATION event and logs it) and counted in
`memsvc_mitigations_total`.

A session's guard starts once its stream is one guard window long: a fresh
memory grows several-fold while it first fills (the reference model's from 7
to about 21 within 1k tokens of text, then it stays there), which is warm-up,
not an explosion. The guard also sees each append's bytes (their histogram), so
input that no text resembles (random or repeated bytes) is noticed whatever the
model. The first append a process sees of a session that streamed
before counts its tokens and chunks but not its writes (the totals before it
are unknown here).

The scheduler feeds `observe` from a thread of its own, one append after
another, so the observations cost the model thread nothing; a mitigation it
decides is handed back (`apply` runs on the model thread, between steps, as
the manager's other state changes do). The per-session books are under a lock,
since `observe_recall` and `forget` come from the model thread; the admin API
only reads a float.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from memsvc.obs.guard import GuardConfig, GuardSample, Mitigation, SessionGuard, byte_histogram
from memsvc.obs.metrics import ServiceMetrics
from memsvc.sessions.api import AppendResult

if TYPE_CHECKING:
    from memsvc.sessions.manager import SessionManager

log = structlog.get_logger(__name__)


@dataclass
class _Watched:
    """One session as the guards know it."""

    guard: SessionGuard
    last: AppendResult | None = None  # the previous append's totals
    updates_per_1k_tokens: float | None = None  # the guard's windowed rate, once full


class StreamGuards:
    """The guards and stream metrics of the sessions this server appends to."""

    def __init__(
        self,
        manager: SessionManager,
        metrics: ServiceMetrics,
        config: GuardConfig,
        chunk_size: int,
    ) -> None:
        self.config = config
        self._manager = manager
        self._metrics = metrics
        self._chunk_size = chunk_size
        self._sessions: dict[str, _Watched] = {}
        self._lock = threading.Lock()  # the books above
        metrics.set_norm_bound(config.norm_bound)

    def observe(
        self,
        tenant_id: str,
        result: AppendResult,
        seconds: float,
        tokens: Sequence[int] | None = None,
    ) -> Mitigation | None:
        """One acknowledged append of `tokens`, `seconds` after it was received: records
        it, and returns the mitigation its guard decided, for `apply` (None: none)."""
        with self._lock:
            return self._observe(result, seconds, tokens)

    def _observe(
        self, result: AppendResult, seconds: float, tokens: Sequence[int] | None
    ) -> Mitigation | None:
        watched = self._watch(result.session_id, result.step_scale, result.forget_boost)
        last = watched.last  # a generation since then adds its writes to this append's
        started = result.position - result.appended
        mitigation = None  # the input is checked first: a change there restarts the window
        if tokens is not None:
            histogram = byte_histogram(tokens)
            mitigation = watched.guard.observe_input(result.position, histogram).mitigation
        if result.position >= self.config.window_tokens:
            sample = GuardSample(
                result.position, result.writes_applied, result.writes_skipped, result.memory_norm
            )
            check = watched.guard.observe(sample)
            watched.updates_per_1k_tokens = check.updates_per_1k_tokens
            mitigation = mitigation or check.mitigation
        fresh = started == 0  # its totals before this append were all zero
        self._metrics.observe_append(
            tokens=result.appended,
            chunks=result.position // self._chunk_size - started // self._chunk_size,
            writes_applied=_delta(result.writes_applied, last, fresh, "writes_applied"),
            writes_skipped=_delta(result.writes_skipped, last, fresh, "writes_skipped"),
            memory_norm=result.memory_norm,
            surprise=result.surprise,
            seconds=seconds,
            updates_per_1k_tokens=watched.updates_per_1k_tokens,
        )
        watched.last = result
        return mitigation

    def observe_recall(self, tenant_id: str, session_id: str, recall: float) -> None:
        """A recall canary round on `session_id` measured `recall` (its guard may react);
        on the model thread."""
        with self._lock:
            watched = self._watch(session_id, 1.0, 0.0)
            position = 0 if watched.last is None else watched.last.position
            mitigation = watched.guard.observe_recall(position, recall)
        if mitigation is not None:
            self.apply(tenant_id, session_id, mitigation)

    def updates_per_1k_tokens(self, session_id: str) -> float | None:
        """The session's writes per 1000 tokens over its guard's window (None until full)."""
        watched = self._sessions.get(session_id)
        return None if watched is None else watched.updates_per_1k_tokens

    def forget(self, session_id: str) -> None:
        """The session was deleted."""
        with self._lock:
            self._sessions.pop(session_id, None)

    def _watch(self, session_id: str, step_scale: float, forget_boost: float) -> _Watched:
        watched = self._sessions.get(session_id)
        if watched is None:
            guard = SessionGuard(self.config, step_scale, forget_boost)
            watched = self._sessions[session_id] = _Watched(guard)
        return watched

    def apply(self, tenant_id: str, session_id: str, mitigation: Mitigation) -> None:
        """Applies a mitigation `observe` decided; on the model thread."""
        try:
            self._manager.mitigate(
                tenant_id,
                session_id,
                mitigation.step_scale,
                mitigation.forget_boost,
                reason=mitigation.kind,
                evidence=mitigation.evidence,
            )
        except Exception as error:
            # The guard's knobs no longer match the state's: start it over from the state.
            self.forget(session_id)
            log.error(
                "mitigation_failed",
                tenant=tenant_id,
                session=session_id,
                kind=mitigation.kind,
                error=repr(error),
            )
            return
        self._metrics.count_mitigation(mitigation.kind)


def _delta(total: int, last: AppendResult | None, fresh: bool, name: str) -> int:
    """This append's part of a running total (0 when the total before it is unknown)."""
    if last is not None:
        return total - getattr(last, name)
    return total if fresh else 0
