"""`memsvc serve --guard-input-entropy`: the input guard's band, or off, from the command line."""

from __future__ import annotations

import argparse
import math

import pytest

from memsvc.server.cli import _band_fields, _entropy_band


def test_the_band_parses_and_turns_into_guard_fields() -> None:
    assert _entropy_band("0.5,7.5") == (0.5, 7.5)
    assert _entropy_band("0,inf") == (0.0, math.inf)  # off: no entropy leaves it
    assert _band_fields((0.0, math.inf)) == {
        "min_input_entropy": 0.0,
        "max_input_entropy": math.inf,
    }
    assert _band_fields(None) == {"min_input_entropy": None, "max_input_entropy": None}


@pytest.mark.parametrize("bad", ["7.5", "8,1", "-1,2", "a,b", ""])
def test_a_bad_band_is_refused_with_its_rule(bad: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="LOW,HIGH"):
        _entropy_band(bad)
