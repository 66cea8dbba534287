"""The input-entropy guard through a real server: random bytes and one repeated byte are
damped (a MITIGATION event with reason anomalous_input, counted in /metrics), text of the
same length is left alone, whatever the model."""

from __future__ import annotations

import random
from pathlib import Path

from memsvc.engine import StreamingEngine
from memsvc.obs.guard import GuardConfig
from memsvc.obs.metrics import ServiceMetrics
from memsvc.proto.v1 import memsvc_pb2 as pb
from tests.obs.test_metrics import scrape, value
from tests.server.harness import start_service, stop_service
from tests.server.test_operations import ADMIN, metrics_url, server_config, settle

# No saturation bound and no explosion threshold a calm model reaches: only the input band.
GUARD = GuardConfig(norm_bound=float("inf"), window_tokens=512, max_norm_growth=1e9)


def test_noise_and_a_repeated_byte_are_damped_and_text_is_not(
    tmp_path: Path, engine: StreamingEngine
) -> None:
    from memsvc.server.process import free_port

    metrics = ServiceMetrics()
    config = server_config(metrics_port=free_port(), metrics_address="127.0.0.1")
    service = start_service(tmp_path / "data", engine, config, metrics=metrics, guard_config=GUARD)
    try:
        alice = service.alice.metadata
        streams = {
            "text": ("Notes from the meeting: ship the parser on Friday. " * 40).encode(),
            "noise": random.Random(0).randbytes(2048),
            "repeat": b"A" * 2048,
        }
        sessions = {}
        for name, data in streams.items():
            created = service.stub.CreateSession(pb.CreateSessionRequest(), metadata=alice)
            sessions[name] = created.session_id
            for i in range(0, 2048, 128):
                piece = pb.Input(token_ids=list(data[i : i + 128]))
                request = pb.AppendRequest(session_id=created.session_id, input=piece)
                service.stub.Append(request, metadata=alice)
        settle(service)
        request = pb.ListEventsRequest(tenant_id=service.alice.tenant_id, kind="mitigation")
        events = service.admin.ListEvents(request, metadata=ADMIN).events
        fired = {e.session_id: e for e in reversed(events)}  # newest first: keep the first
        assert sessions["text"] not in fired
        for name in ("noise", "repeat"):
            event = fired[sessions[name]]
            assert event.payload["reason"] == "anomalous_input"
            assert event.payload["step_scale"] < 1.0
        assert fired[sessions["noise"]].payload["evidence"]["input_entropy"] > 7.5
        assert fired[sessions["repeat"]].payload["evidence"]["input_entropy"] == 0.0
        samples = scrape(metrics_url(service))
        assert value(samples, "memsvc_mitigations_total", kind="anomalous_input") == len(events)
    finally:
        stop_service(service)
