"""One comparison for every state object with a `to_dict()` (memory, model, engine)."""

from __future__ import annotations

import torch


def assert_states_equal(a, b, **tol) -> None:
    """Same tensor names; floats equal within `tol` (assert_close), integers exactly."""
    da, db = a.to_dict(), b.to_dict()
    assert da.keys() == db.keys()
    for key in da:
        if da[key].is_floating_point():
            torch.testing.assert_close(da[key], db[key], **tol, msg=key)
        else:
            assert torch.equal(da[key], db[key]), key
