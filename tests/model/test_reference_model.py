"""The shipped reference model: small enough to ship, loads, and recalls a passkey beyond
its attention window at 4k tokens (streamed through the engine as a user would)."""

from __future__ import annotations

import pytest

from memsvc.engine import StreamingEngine
from memsvc.eval.niah import evaluate_length
from memsvc.eval.probe import ProbeSpec
from memsvc.model.io import CONFIG_FILE, WEIGHTS_FILE, load_model, model_hash
from memsvc.settings import REFERENCE_MODEL_DIR, SHIPPED_MODELS, model_dir


@pytest.mark.parametrize("name", sorted(SHIPPED_MODELS))
def test_every_shipped_model_is_under_25_mb_with_its_card_and_loads(name: str) -> None:
    directory = model_dir(name)
    size = sum((directory / f).stat().st_size for f in (CONFIG_FILE, WEIGHTS_FILE))
    assert size <= 25 * 1024 * 1024
    assert (directory / "MODEL_CARD.md").is_file()
    card = (directory / "MODEL_CARD.md").read_text()
    assert model_hash(directory) in card  # the card names the hash sessions pin
    load_model(directory)


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
