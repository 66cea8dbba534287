"""Every Prometheus metric memsvc exports, and `ServiceMetrics`, the one recorder that sets them.

The dashboard (ops/grafana/memsvc.json) and the alert rules
(ops/prometheus/alerts.yml) read these names; tests hold them to this module.

No metric carries a session label: a node serves thousands of sessions and a
label per session would make as many series. Per-session values (memory
norm, surprise, update rate) are observed into histograms instead, and the
per-session guards (`memsvc.obs.guard`) act on individual sessions. Those
histograms are observed once per append, so a session weighs in them by its
number of appends.

Counters get `_total` on the wire, histograms `_bucket`, `_sum` and `_count`;
a latency histogram's `_count` is also the number of events (evictions,
restores, checkpoints).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Seconds: from a fraction of a millisecond (an fsync on NVMe, a host -> device copy)
# to tens of seconds (a checkpoint of a large state on a slow volume).
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
# Writes per 1000 tokens: every chunk of every layer written is 1000 * layers / chunk_size
# (31 for 2 layers of 64-token chunks); the write gate brings it down.
BATCH_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
RATE_BUCKETS = (0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)
# L2 norms of theta_mem span decades between a small model and an exploding session.
NORM_BUCKETS = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1e3, 3e3, 1e4, 3e4, 1e5, 1e6)
SURPRISE_BUCKETS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)

TIERS = ("device", "host", "disk")


class ServiceMetrics:
    """The metrics of one server process, registered in `registry` (a fresh one by default,
    so tests and several servers in one process never share series)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.tokens = Counter("memsvc_tokens_appended", "Tokens acknowledged.", registry=r)
        self.chunks = Counter(
            "memsvc_memory_chunks", "Memory chunks completed (per stream).", registry=r
        )
        self.writes = Counter(
            "memsvc_memory_writes",
            "Layer chunk writes, applied or skipped by the write gate.",
            ["outcome"],
            registry=r,
        )
        self.updates_per_1k = Histogram(
            "memsvc_updates_per_1k_tokens",
            "Per append: a session's memory writes per 1000 tokens over its guard window.",
            buckets=RATE_BUCKETS,
            registry=r,
        )
        self.memory_norm = Histogram(
            "memsvc_memory_norm",
            "Per append: L2 norm of a session's memory weights (all layers and heads).",
            buckets=NORM_BUCKETS,
            registry=r,
        )
        self.norm_bound = Gauge(
            "memsvc_memory_norm_bound",
            "The guards' saturation bound on a session's memory norm.",
            registry=r,
        )
        self.surprise = Histogram(
            "memsvc_surprise_ema",
            "Per append: a session's write-gate surprise EMA (mean over layers).",
            buckets=SURPRISE_BUCKETS,
            registry=r,
        )
        self.stream_chunk = Histogram(
            "memsvc_stream_chunk_seconds",
            "One append, received to acknowledged (durable in the write-ahead log).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.sessions = Gauge(
            "memsvc_sessions", "Sessions resident per tier.", ["tier"], registry=r
        )
        self.eviction = Histogram(
            "memsvc_eviction_seconds",
            "Moving a session's state out to a lower tier (the tier it went to).",
            ["tier"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.restore = Histogram(
            "memsvc_restore_seconds",
            "Bringing a session's state back to the device (the tier it came from).",
            ["tier"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.checkpoint = Histogram(
            "memsvc_checkpoint_seconds",
            "Writing one checkpoint: file, fsyncs, rename and its SQL row.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.checkpoint_failures = Counter(
            "memsvc_checkpoint_failures", "Checkpoints that failed.", registry=r
        )
        self.wal_fsync = Histogram(
            "memsvc_wal_fsync_seconds",
            "One group-commit fsync of a session's write-ahead log.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.decode_batch = Histogram(
            "memsvc_decode_batch_generations",
            "Per scheduler step that samples: the generations and queries sampled together in "
            "one decoder batch.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.rollbacks = Counter(
            "memsvc_state_rollbacks",
            "Sessions rolled back to their last good state after a non-finite update.",
            registry=r,
        )
        self.rpc_requests = Counter(
            "memsvc_grpc_requests",
            "RPCs finished, by method and status code.",
            ["method", "code"],
            registry=r,
        )
        self.rpc_seconds = Histogram(
            "memsvc_grpc_request_seconds",
            "RPC duration (a streaming RPC: the whole call).",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.mitigations = Counter(
            "memsvc_mitigations",
            "Guard decisions applied to a session's memory knobs, by kind.",
            ["kind"],
            registry=r,
        )
        self.canary_recall = Gauge(
            "memsvc_canary_recall", "The recall canary's last recall@k, in [0, 1].", registry=r
        )
        self.canary_last_success = Gauge(
            "memsvc_canary_last_success_timestamp_seconds",
            "Unix time the recall canary last finished a round.",
            registry=r,
        )
        self.canary_failures = Counter(
            "memsvc_canary_failures", "Recall canary rounds that raised.", registry=r
        )

    # ---- the stream --------------------------------------------------------------------

    def observe_append(
        self,
        *,
        tokens: int,
        chunks: int,
        writes_applied: int,
        writes_skipped: int,
        memory_norm: float,
        surprise: float,
        seconds: float,
        updates_per_1k_tokens: float | None,
    ) -> None:
        """One acknowledged append. Counts are this append's own (deltas, not the session's
        totals); memory_norm and surprise are the session's values after it;
        updates_per_1k_tokens is the session guard's windowed rate (None until its window
        has filled: a short-window rate is noise)."""
        self.tokens.inc(tokens)
        self.chunks.inc(chunks)
        self.writes.labels("applied").inc(writes_applied)
        self.writes.labels("skipped").inc(writes_skipped)
        self.memory_norm.observe(memory_norm)
        self.surprise.observe(surprise)
        self.stream_chunk.observe(seconds)
        if updates_per_1k_tokens is not None:
            self.updates_per_1k.observe(updates_per_1k_tokens)

    def set_norm_bound(self, bound: float) -> None:
        """The guards' saturation bound (`GuardConfig.norm_bound`), for the alert's threshold."""
        self.norm_bound.set(bound)

    def count_mitigation(self, kind: str) -> None:
        """A guard's `Mitigation` was applied to a session."""
        self.mitigations.labels(kind).inc()

    def count_rollback(self) -> None:
        """A session's non-finite state was rolled back to its last good state."""
        self.rollbacks.inc()

    # ---- residency and durability ------------------------------------------------------

    def set_sessions(self, tier_counts: Mapping[str, int]) -> None:
        """Sessions resident per tier; a tier missing from tier_counts has none."""
        unknown = set(tier_counts) - set(TIERS)
        if unknown:
            raise ValueError(f"unknown tiers {sorted(unknown)}; tiers are {TIERS}")
        for tier in TIERS:
            self.sessions.labels(tier).set(tier_counts.get(tier, 0))

    def observe_eviction(self, seconds: float, tier: str) -> None:
        """A session moved out to `tier` ("host" or "disk")."""
        self.eviction.labels(tier).observe(seconds)

    def observe_restore(self, seconds: float, tier: str) -> None:
        """A session brought back to the device from `tier` ("host" or "disk")."""
        self.restore.labels(tier).observe(seconds)

    def observe_checkpoint(self, seconds: float) -> None:
        self.checkpoint.observe(seconds)

    def count_checkpoint_failure(self) -> None:
        self.checkpoint_failures.inc()

    def observe_wal_sync(self, seconds: float) -> None:
        self.wal_fsync.observe(seconds)

    # ---- the service -------------------------------------------------------------------

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        """One finished RPC: method as gRPC names it ("/memsvc.v1.MemoryService/Append"),
        code as the status name ("OK", "NOT_FOUND")."""
        self.rpc_requests.labels(method, code).inc()
        self.rpc_seconds.labels(method).observe(seconds)

    def set_canary_recall(self, recall: float) -> None:
        """A canary round finished with this recall@k."""
        self.canary_recall.set(recall)
        self.canary_last_success.set(time.time())

    def count_canary_failure(self) -> None:
        self.canary_failures.inc()


def start_metrics_server(
    port: int, registry: CollectorRegistry, addr: str = "0.0.0.0"
) -> WSGIServer:
    """Serve `registry` at http://addr:port/metrics from a daemon thread (the `--metrics-port`
    of `memsvc serve`); port 0 picks a free port (`.server_port`). `.shutdown()` stops it."""
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server
