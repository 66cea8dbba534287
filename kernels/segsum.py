"""Segment sums of log-gates: the cumulative products every chunked recurrence needs
(the inner optimiser's momentum decay, the delta rule's retention), kept in log space
so nothing is divided by a tiny cumulative product."""

from __future__ import annotations

import torch
from torch import Tensor


def segsum(x: Tensor) -> Tensor:
    """out[..., i, j] = sum_{m=j+1..i} x[..., m] for j <= i, -inf above the diagonal.

    Built from masked cumulative sums, not differences of one long cumulative
    sum, so it keeps full precision for long chunks and tiny gates.
    """
    n = x.shape[-1]
    lower_strict = torch.ones(n, n, dtype=torch.bool, device=x.device).tril(-1)
    y = x.unsqueeze(-1).expand(*x.shape, n).masked_fill(~lower_strict, 0.0)
    y = y.cumsum(dim=-2)
    lower = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
    return y.masked_fill(~lower, float("-inf"))


def suffix_exclusive_sum(x: Tensor) -> Tensor:
    """out[..., i] = sum_{m > i} x[..., m]."""
    inclusive = x.flip(-1).cumsum(-1).flip(-1)
    return torch.cat([inclusive[..., 1:], torch.zeros_like(x[..., :1])], dim=-1)
