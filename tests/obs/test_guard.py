"""SessionGuard on synthetic append stats: when it fires, what it decides, and when it relaxes."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace

import pytest

from memsvc.obs.guard import (
    GuardCheck,
    GuardConfig,
    GuardSample,
    InputCheck,
    Mitigation,
    SessionGuard,
    byte_histogram,
    entropy_bits,
)

CONFIG = GuardConfig(norm_bound=1000.0, window_tokens=1000, recovery_tokens=4000)
PIECE = 100  # tokens per append


class Session:
    """Drives a guard as a session manager would: running totals after each append."""

    def __init__(self, guard: SessionGuard) -> None:
        self.guard = guard
        self.position = 0
        self.writes = 0

    def append(self, norm: float, tokens: int = PIECE, writes: int = 2) -> GuardCheck:
        self.position += tokens
        self.writes += writes
        return self.guard.observe(GuardSample(self.position, self.writes, 0, norm))

    def run(self, appends: int, norm: Callable[[int], float], writes: int = 2) -> list[Mitigation]:
        """`appends` appends with the norm a function of the position; the mitigations."""
        mitigations = []
        for _ in range(appends):
            check = self.append(norm(self.position + PIECE), writes=writes)
            if check.mitigation is not None:
                mitigations.append(check.mitigation)
        return mitigations


def flat(_position: int) -> float:
    return 100.0


def doubling(position: int) -> float:
    """Doubles every 500 tokens: x4 per window."""
    return 2 ** (position / 500)


def test_rates_are_measured_over_a_full_window():
    session = Session(SessionGuard(CONFIG))
    early = [session.append(norm=100.0 + session.position) for _ in range(10)]
    assert all(c.updates_per_1k_tokens is None and c.norm_growth is None for c in early)
    check = session.append(norm=500.0)  # position 1100; the window starts at the first sample
    assert check.updates_per_1k_tokens == pytest.approx(1000 * 20 / 1000)
    assert check.norm_growth == pytest.approx(500.0 / 100.0)
    check = session.append(norm=500.0, tokens=300, writes=9)  # 1400: starts at 400 (norm 400)
    assert check.updates_per_1k_tokens == pytest.approx(1000 * (20 + 9 - 6) / 1000)
    assert check.norm_growth == pytest.approx(500.0 / 400.0)


def test_a_healthy_stream_is_left_alone():
    session = Session(SessionGuard(CONFIG))
    assert session.run(200, lambda p: 100.0 + 0.001 * p) == []
    assert session.guard.step_scale == 1.0 and session.guard.forget_boost == 0.0


def test_update_explosion_lowers_the_step_stepwise_down_to_its_floor():
    session = Session(SessionGuard(CONFIG))
    mitigations = session.run(52, doubling)
    assert all(m.kind == "update_explosion" for m in mitigations)
    # One decision per full window after each change: 1100, 2100, ...
    assert [(m.position, m.step_scale) for m in mitigations] == [
        (1100, 0.5),
        (2100, 0.25),
        (3100, 0.125),
        (4100, 0.0625),
        (5100, 0.0625),  # at the floor: the same values again, still worth an event
    ]
    assert all(m.forget_boost == 0.0 for m in mitigations)
    first = mitigations[0].evidence
    assert first["norm_growth"] == pytest.approx(4.0)
    assert first["updates_per_1k_tokens"] == pytest.approx(20.0)
    assert first["memory_norm"] == pytest.approx(doubling(1100))


def test_a_growing_norm_without_writes_is_not_an_update_explosion():
    session = Session(SessionGuard(CONFIG))
    assert session.run(30, doubling, writes=0) == []


def test_saturation_raises_forgetting_stepwise_up_to_its_bound():
    session = Session(SessionGuard(CONFIG))
    mitigations = session.run(62, lambda _p: 950.0)  # above 0.9 * norm_bound
    assert all(m.kind == "saturation" and m.step_scale == 1.0 for m in mitigations)
    assert [(m.position, m.forget_boost) for m in mitigations] == [
        (1100, 1e-4),
        (2100, 2e-4),
        (3100, 4e-4),
        (4100, 8e-4),
        (5100, 1e-3),
        (6100, 1e-3),
    ]


def test_explosion_is_decided_before_saturation():
    session = Session(SessionGuard(CONFIG))
    mitigations = session.run(11, lambda p: 900.0 * 2 ** (p / 500))
    assert [(m.kind, m.step_scale, m.forget_boost) for m in mitigations] == [
        ("update_explosion", 0.5, 0.0)
    ]


def test_recovery_relaxes_one_step_per_calm_period():
    session = Session(SessionGuard(CONFIG))
    exploded = session.run(22, doubling)
    assert [m.step_scale for m in exploded] == [0.5, 0.25]
    top = doubling(session.position)
    calm = session.run(100, lambda _p: top)  # positions 2300 .. 12200
    assert [(m.kind, m.position, m.step_scale) for m in calm] == [
        ("recovery", 6100, 0.5),  # 4000 calm tokens after the last change at 2100
        ("recovery", 10100, 1.0),
    ]
    assert not session.guard.mitigated


def test_forgetting_relaxes_by_halves_to_zero():
    guard = SessionGuard(CONFIG, forget_boost=3e-4)  # a restored session's knob
    session = Session(guard)
    calm = session.run(170, flat)
    assert [m.kind for m in calm] == ["recovery"] * 2
    assert [m.forget_boost for m in calm] == pytest.approx([1.5e-4, 0.0])  # 0.75e-4 < base: 0
    assert [m.position for m in calm] == [4100, 8100]  # counted from the first sample (100)


def test_a_restored_step_scale_recovers_toward_one():
    session = Session(SessionGuard(CONFIG, step_scale=0.25))
    calm = session.run(82, flat)
    assert [(m.kind, m.step_scale) for m in calm] == [("recovery", 0.5), ("recovery", 1.0)]


def test_falling_canary_recall_is_saturation():
    guard = SessionGuard(CONFIG)
    assert guard.observe_recall(5000, 1.0) is None
    assert guard.observe_recall(9000, 0.8) is None  # within recall_drop of the best
    m = guard.observe_recall(13000, 0.625)
    assert m is not None
    assert (m.kind, m.step_scale, m.forget_boost, m.position) == ("saturation", 1.0, 1e-4, 13000)
    assert m.evidence == {"recall": 0.625, "best_recall": 1.0}
    again = guard.observe_recall(17000, 0.5)
    assert again is not None and again.forget_boost == 2e-4
    assert guard.observe_recall(21000, 0.875) is None


def test_a_rollback_restarts_the_window():
    session = Session(SessionGuard(CONFIG))
    session.run(15, flat)
    session.position = 300  # the session went back to an earlier good state
    check = session.append(norm=doubling(0))
    assert check.updates_per_1k_tokens is None and check.mitigation is None
    # ... and the explosion that follows is measured from there on.
    mitigations = session.run(11, lambda p: doubling(p - 400))
    assert [(m.position, m.kind) for m in mitigations] == [(1400, "update_explosion")]


@pytest.mark.parametrize(
    "bad",
    [
        {"norm_bound": 0.0},
        {"window_tokens": 0},
        {"max_norm_growth": 1.0},
        {"saturation_fraction": 1.5},
        {"recall_drop": 0.0},
        {"step_decay": 1.0},
        {"min_step_scale": 0.0},
        {"forget_boost_base": 2e-3},  # above max_forget_boost
        {"max_forget_boost": 1.0},
        {"recovery_tokens": 100},  # shorter than the window
    ],
)
def test_config_is_validated(bad):
    with pytest.raises(ValueError, match="guard"):
        GuardConfig(**{"norm_bound": 1000.0, **bad})


@pytest.mark.parametrize("knobs", [{"step_scale": 0.0}, {"step_scale": 1.5}, {"forget_boost": 1.0}])
def test_knobs_outside_what_the_memory_takes_are_refused(knobs):
    with pytest.raises(ValueError, match="must be in"):
        SessionGuard(CONFIG, **knobs)


def test_triggers_never_loosen_knobs_restored_from_wider_bounds():
    guard = SessionGuard(CONFIG, step_scale=0.01, forget_boost=5e-3)  # beyond CONFIG's bounds
    explosion = Session(guard).run(11, doubling)
    assert [(m.kind, m.step_scale, m.forget_boost) for m in explosion] == [
        ("update_explosion", 0.01, 5e-3)
    ]
    assert guard.observe_recall(0, 1.0) is None
    saturation = guard.observe_recall(1, 0.0)
    assert saturation is not None and saturation.forget_boost == 5e-3


# ---- the input-entropy band ---------------------------------------------------------------


def feed(guard: SessionGuard, pieces: list[bytes], start: int = 0) -> list[InputCheck]:
    """Appends `pieces` (each its own append); the guard's input checks."""
    checks, position = [], start
    for piece in pieces:
        position += len(piece)
        checks.append(guard.observe_input(position, byte_histogram(piece)))
    return checks


def test_input_entropy_equals_the_entropy_of_the_latest_bytes_on_random_appends():
    rng = random.Random(7)
    config = replace(CONFIG, min_input_entropy=0.0, max_input_entropy=8.0)
    pieces = [
        bytes(rng.choice(b"abcdefgh" if rng.random() < 0.5 else range(256)) for _ in range(n))
        for n in (rng.randrange(1, 300) for _ in range(60))
    ]
    checks = feed(SessionGuard(config), pieces)
    for i, check in enumerate(checks):
        # The reference: the fewest latest appends holding input_window_tokens bytes.
        held = [j for j in range(i + 1) if sum(map(len, pieces[j : i + 1])) >= 512]
        if not held:
            assert check.input_entropy is None
            continue
        window = b"".join(pieces[held[-1] : i + 1])
        assert check.input_entropy == pytest.approx(entropy_bits(byte_histogram(window)))


def test_text_is_left_alone_and_noise_or_one_repeated_byte_goes_to_the_step_floor():
    text = ("The pass key is 71432. Remember it. 日本語のテキストも。\n" * 40).encode()
    calm = feed(SessionGuard(CONFIG), [text[i : i + 100] for i in range(0, 3000, 100)])
    assert all(c.mitigation is None for c in calm)
    assert 3.0 < calm[-1].input_entropy < 6.0

    noise = random.Random(1).randbytes(3000)
    checks = feed(SessionGuard(CONFIG), [noise[i : i + 100] for i in range(0, 3000, 100)])
    fired = [c.mitigation for c in checks if c.mitigation is not None]
    assert [(m.kind, m.position, m.step_scale) for m in fired] == [
        ("anomalous_input", 600, CONFIG.min_step_scale),  # the first full input window
        ("anomalous_input", 1600, CONFIG.min_step_scale),  # at the floor: once per window
        ("anomalous_input", 2600, CONFIG.min_step_scale),
    ]
    assert fired[0].evidence["input_entropy"] > CONFIG.max_input_entropy

    repeated = feed(SessionGuard(CONFIG), [b"z" * 100] * 7)
    (m,) = [c.mitigation for c in repeated if c.mitigation is not None]
    assert m.kind == "anomalous_input" and m.evidence["input_entropy"] == 0.0


def test_noise_keeps_the_floor_against_recovery_and_text_afterwards_recovers():
    guard = SessionGuard(CONFIG)
    noise = random.Random(2).randbytes(10_000)
    feed(guard, [noise[i : i + 100] for i in range(0, 10_000, 100)])
    assert guard.step_scale == CONFIG.min_step_scale
    text = ("Shipping notes: the parser moved to Friday, the review to Monday. " * 200).encode()
    session = Session(guard)
    session.position = 10_000
    relaxed = []
    for i in range(0, 12_000, 100):
        guard.observe_input(session.position + 100, byte_histogram(text[i : i + 100]))
        check = session.append(norm=100.0)
        if check.mitigation is not None:
            relaxed.append(check.mitigation.kind)
    assert relaxed and set(relaxed) == {"recovery"}
