"""The shipped reference model: small enough to ship, loads, and recalls a passkey beyond
its attention window at 4k tokens (streamed through the engine as a user would)."""

from __future__ import annotations

from memsvc.engine import StreamingEngine
from memsvc.eval.niah import evaluate_length
from memsvc.eval.probe import ProbeSpec
from memsvc.model.io import CONFIG_FILE, WEIGHTS_FILE, load_model
from memsvc.settings import REFERENCE_MODEL_DIR


def test_reference_model_ships_under_25_mb() -> None:
    size = sum((REFERENCE_MODEL_DIR / f).stat().st_size for f in (CONFIG_FILE, WEIGHTS_FILE))
    assert size <= 25 * 1024 * 1024
    assert (REFERENCE_MODEL_DIR / "MODEL_CARD.md").is_file()


def test_reference_model_answers_4k_passkey_probes() -> None:
    model = load_model(REFERENCE_MODEL_DIR)
    engine = StreamingEngine(model)
    spec = ProbeSpec("passkey", 4096, window=model.config.window)  # held-out haystack words
    row = evaluate_length(engine, spec, range(100, 104), batch=4)
    assert all(r.correct for r in row.results), row.results
    ablation = evaluate_length(
        StreamingEngine(model, use_memory=False), spec, range(100, 104), batch=4
    )
    assert not any(r.correct for r in ablation.results), ablation.results
