"""The evaluation loop: batched streaming scores exactly as single streams, lengths parse."""

from __future__ import annotations

import pytest

from memsvc.engine import StreamingEngine
from memsvc.eval.niah import evaluate_length
from memsvc.eval.options import parse_length
from memsvc.eval.probe import ProbeSpec, make_probe
from tests.engine.conftest import tiny_model


def test_batched_probes_score_exactly_as_single_streams() -> None:
    engine = StreamingEngine(tiny_model(), max_segment=64)
    spec = ProbeSpec("number", 500, window=engine.model.config.window, distractor_rate=0.3)
    streamed: list[int] = []
    single = evaluate_length(engine, spec, range(2), batch=1, on_tokens=streamed.append)
    batched = evaluate_length(engine, spec, range(2), batch=2)
    assert [r.output for r in single.results] == [r.output for r in batched.results]
    assert sum(streamed) == sum(make_probe(spec, seed).context_length for seed in range(2))
    for row in (single, batched):
        assert row.samples == 2 and row.tokens_per_s > 0 and row.peak_rss_mb > 0
        for r in row.results:
            assert r.correct == (r.output == r.answer)
            assert len(r.output) <= len(r.answer)
        assert row.accuracy == sum(r.correct for r in row.results) / 2


def test_no_memory_engine_leaves_memory_untouched() -> None:
    model = tiny_model()
    engine = StreamingEngine(model, max_segment=64, use_memory=False)
    state, _ = engine.append(engine.init_state(), list(range(100)))
    fresh = engine.init_state()
    for block, start in zip(state.blocks, fresh.blocks, strict=True):
        for w, w0 in zip(block.memory.weights, start.memory.weights, strict=True):
            assert (w == w0).all()


@pytest.mark.parametrize(("text", "value"), [("4096", 4096), ("4k", 4096), ("2m", 2 << 20)])
def test_parse_length(text: str, value: int) -> None:
    assert parse_length(text) == value


@pytest.mark.parametrize("text", ["", "k", "0", "-4k", "4g", "1.5k"])
def test_parse_length_refuses_nonsense(text: str) -> None:
    with pytest.raises(ValueError, match="bad length"):
        parse_length(text)
