"""The recorder, scraped over HTTP as Prometheus would: values move as the service reports."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from memsvc.obs.metrics import ServiceMetrics, start_metrics_server

ALLOWED_LABELS = {"outcome", "tier", "method", "code", "kind"}


@pytest.fixture
def served() -> Iterator[tuple[ServiceMetrics, str]]:
    metrics = ServiceMetrics()
    server = start_metrics_server(0, metrics.registry, addr="127.0.0.1")
    yield metrics, f"http://127.0.0.1:{server.server_port}/metrics"
    server.shutdown()
    server.server_close()


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value} of one scrape."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def test_appends_move_the_stream_and_memory_metrics(served):
    metrics, url = served
    before = scrape(url)
    assert value(before, "memsvc_tokens_appended_total") == 0
    metrics.observe_append(
        tokens=4096, chunks=64, writes_applied=120, writes_skipped=8, memory_norm=250.0,
        surprise=0.02, seconds=0.004, updates_per_1k_tokens=None,
    )  # fmt: skip
    metrics.observe_append(
        tokens=100, chunks=1, writes_applied=2, writes_skipped=0, memory_norm=5000.0,
        surprise=2.0, seconds=0.2, updates_per_1k_tokens=29.3,
    )  # fmt: skip
    after = scrape(url)
    assert value(after, "memsvc_tokens_appended_total") == 4196
    assert value(after, "memsvc_memory_chunks_total") == 65
    assert value(after, "memsvc_memory_writes_total", outcome="applied") == 122
    assert value(after, "memsvc_memory_writes_total", outcome="skipped") == 8
    # Histograms: the rate only once the guard's window is full.
    assert value(after, "memsvc_updates_per_1k_tokens_count") == 1
    assert value(after, "memsvc_updates_per_1k_tokens_sum") == pytest.approx(29.3)
    assert value(after, "memsvc_updates_per_1k_tokens_bucket", le="20.0") == 0
    assert value(after, "memsvc_updates_per_1k_tokens_bucket", le="50.0") == 1
    assert value(after, "memsvc_memory_norm_count") == 2
    assert value(after, "memsvc_memory_norm_sum") == pytest.approx(5250.0)
    assert value(after, "memsvc_memory_norm_bucket", le="300.0") == 1
    assert value(after, "memsvc_memory_norm_bucket", le="10000.0") == 2
    assert value(after, "memsvc_surprise_ema_bucket", le="0.03") == 1
    assert value(after, "memsvc_stream_chunk_seconds_count") == 2
    assert value(after, "memsvc_stream_chunk_seconds_bucket", le="0.005") == 1


def test_residency_durability_and_rpc_metrics(served):
    metrics, url = served
    metrics.set_sessions({"device": 12, "disk": 300})
    metrics.observe_eviction(0.003, tier="disk")
    metrics.observe_eviction(0.001, tier="host")
    metrics.observe_restore(0.008, tier="disk")
    metrics.observe_checkpoint(0.05)
    metrics.count_checkpoint_failure()
    metrics.observe_wal_sync(0.0007)
    metrics.observe_wal_sync(0.0009)
    metrics.observe_rpc("/memsvc.v1.MemoryService/Append", "OK", 0.01)
    metrics.observe_rpc("/memsvc.v1.MemoryService/Append", "OK", 0.02)
    metrics.observe_rpc("/memsvc.v1.MemoryService/Append", "NOT_FOUND", 0.001)
    metrics.count_rollback()
    samples = scrape(url)
    assert value(samples, "memsvc_sessions", tier="device") == 12
    assert value(samples, "memsvc_sessions", tier="host") == 0  # a tier not reported has none
    assert value(samples, "memsvc_sessions", tier="disk") == 300
    assert value(samples, "memsvc_eviction_seconds_count", tier="disk") == 1
    assert value(samples, "memsvc_eviction_seconds_count", tier="host") == 1
    assert value(samples, "memsvc_restore_seconds_bucket", tier="disk", le="0.005") == 0
    assert value(samples, "memsvc_restore_seconds_bucket", tier="disk", le="0.01") == 1
    assert value(samples, "memsvc_checkpoint_seconds_count") == 1
    assert value(samples, "memsvc_checkpoint_failures_total") == 1
    assert value(samples, "memsvc_wal_fsync_seconds_count") == 2
    assert value(samples, "memsvc_wal_fsync_seconds_bucket", le="0.001") == 2
    method = "/memsvc.v1.MemoryService/Append"
    assert value(samples, "memsvc_grpc_requests_total", method=method, code="OK") == 2
    assert value(samples, "memsvc_grpc_requests_total", method=method, code="NOT_FOUND") == 1
    assert value(samples, "memsvc_grpc_request_seconds_count", method=method) == 3
    assert value(samples, "memsvc_state_rollbacks_total") == 1

    metrics.set_sessions({"device": 11, "host": 1})
    samples = scrape(url)
    assert value(samples, "memsvc_sessions", tier="device") == 11
    assert value(samples, "memsvc_sessions", tier="host") == 1
    assert value(samples, "memsvc_sessions", tier="disk") == 0


def test_guard_and_canary_metrics(served):
    metrics, url = served
    metrics.set_norm_bound(1500.0)
    metrics.count_mitigation("update_explosion")
    metrics.count_mitigation("update_explosion")
    metrics.count_mitigation("saturation")
    metrics.set_canary_recall(0.75)
    metrics.count_canary_failure()
    samples = scrape(url)
    assert value(samples, "memsvc_memory_norm_bound") == 1500.0
    assert value(samples, "memsvc_mitigations_total", kind="update_explosion") == 2
    assert value(samples, "memsvc_mitigations_total", kind="saturation") == 1
    assert value(samples, "memsvc_canary_recall") == 0.75
    assert value(samples, "memsvc_canary_last_success_timestamp_seconds") > 1.7e9
    assert value(samples, "memsvc_canary_failures_total") == 1


def test_unknown_tier_is_refused():
    with pytest.raises(ValueError, match="unknown tiers"):
        ServiceMetrics().set_sessions({"gpu": 3})


def test_no_metric_has_a_per_session_label():
    """A label per session would make a series per session: thousands per node."""
    metrics = ServiceMetrics()
    metrics.set_sessions({"device": 1})
    metrics.observe_eviction(0.1, tier="disk")
    metrics.observe_restore(0.1, tier="disk")
    metrics.observe_rpc("m", "OK", 0.1)
    metrics.count_mitigation("saturation")
    metrics.observe_append(
        tokens=1, chunks=0, writes_applied=0, writes_skipped=0, memory_norm=1.0, surprise=0.0,
        seconds=0.001, updates_per_1k_tokens=1.0,
    )  # fmt: skip
    labels = {
        label
        for family in metrics.registry.collect()
        for sample in family.samples
        for label in sample.labels
    }
    assert labels - {"le"} <= ALLOWED_LABELS
    names = {family.name for family in metrics.registry.collect()}
    assert all(name.startswith("memsvc_") for name in names)


def test_each_recorder_has_its_own_registry():
    a, b = ServiceMetrics(), ServiceMetrics()
    a.count_rollback()
    assert a.registry.get_sample_value("memsvc_state_rollbacks_total") == 1
    assert b.registry.get_sample_value("memsvc_state_rollbacks_total") == 0
