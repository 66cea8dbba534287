"""Guard thresholds from measured traffic: the rule that turns `memsvc eval traffic`'s
distributions into a model's `guards.json` (read by `memsvc serve`, docs/GUARDS.md).

Calibrate on the training split's streams (`--split train`) and verify on the held-out
ones, so the check that no mitigation fires on ordinary text is not circular:

    norm_bound_factor = MARGIN * max(norm / fresh norm) / saturation_fraction
    max_norm_growth   = max(MIN_GROWTH, MARGIN * max(norm growth per window))

each maximum (p100) over every text stream (real kinds and synthetic sentences), after
the first window. MARGIN (1.25) leaves room for text longer and stranger than what was
measured; the explosion test stays well inside it (an induced explosion grows the norm
tens of times per window). The input-entropy band is not model-dependent: it is the
GuardConfig default (0.5 to 7.5 bits per byte), reported beside the measured spread.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from memsvc.obs.guard import GuardConfig

MARGIN = 1.25
MIN_GROWTH = 1.5  # a window that multiplies the norm by 1.5 is never quiet


def is_text(stream: str) -> bool:
    return not stream.startswith("adversarial:")


def calibrate(summaries: Iterable[Mapping], saturation_fraction: float | None = None) -> dict:
    """The guard thresholds from `summarize_run` summaries (adversarial streams ignored)."""
    text = [s for s in summaries if is_text(s["stream"])]
    if not text:
        raise ValueError("calibration needs at least one text stream")
    defaults = GuardConfig(norm_bound=1.0)
    fraction = saturation_fraction or defaults.saturation_fraction
    max_ratio = max(s["norm_ratio"]["p100"] for s in text)
    max_growth = max(s["norm_growth_per_window"].get("p100", 1.0) for s in text)
    entropies = [s["input_entropy"] for s in text if s.get("input_entropy")]
    return {
        "norm_bound_factor": round(MARGIN * max_ratio / fraction, 3),
        "max_norm_growth": round(max(MIN_GROWTH, MARGIN * max_growth), 3),
        "min_input_entropy": defaults.min_input_entropy,
        "max_input_entropy": defaults.max_input_entropy,
        "measured": {
            "streams": [s["stream"] for s in text],
            "tokens_per_stream": min(s["tokens"] for s in text),
            "max_norm_ratio": max_ratio,
            "max_norm_growth_per_window": max_growth,
            "input_entropy_min": min((e["p0"] for e in entropies), default=None),
            "input_entropy_max": max((e["p100"] for e in entropies), default=None),
            "rule": f"bound = {MARGIN} x max norm ratio / {fraction}; "
            f"growth = max({MIN_GROWTH}, {MARGIN} x max growth per window)",
        },
    }
