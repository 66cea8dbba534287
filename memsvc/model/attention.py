"""Sliding-window causal attention over (learned persistent tokens ++ the last W tokens).

The token at stream position t attends to the `n_persistent` learned tokens
and to the tokens s with 0 <= t - s <= W (itself and the W before it).

Positions: RoPE relative to the window. The T new tokens of a call are cut
into blocks of Qb <= W queries; a block sees exactly the W keys before it and
its own Qb keys. Inside each block's computation the keys are rotated by
their index 0 .. W+Qb-1 and the queries by W .. W+Qb-1, so every distance
t - s is exact while no angle exceeds the one for position 2W - 1, whatever
the stream length: a 2M-token stream never meets a large position number.
Persistent tokens have no position: they are scored with the unrotated
query, so their scores do not depend on where a block happens to start.

Short causal convolutions (docs/TRAINING.md, item 2): the query of t is
a depthwise convolution of the query projections of t-K+1 .. t; the key of t
the same over the key projections of t-K .. t-1, with its taps initialised
equal to the query's. So key s describes the context before s while value s
is token s itself: a query that matches an earlier context copies the token
that followed it, an induction step inside one layer.

Streaming state (`AttentionCache`, fixed size): keys (after the convolution,
before RoPE) and values of the last W tokens, oldest first, plus the
projections the convolutions still need. It is kept in time order rather than
as a ring with a head index: RoPE is applied relative to each block at read
time, so a ring would be unrolled on every call anyway; in time order the
cache does not depend on the position and streams at different positions
stack into one batch. Each call concatenates the cache with the new tokens
and keeps the last W.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memsvc.memory.neural_memory import causal_depthwise_conv
from memsvc.model.config import ModelConfig


@dataclass
class AttentionCache:
    """Streaming state of one attention layer for B streams (K = attn_conv_size)."""

    keys: Tensor  # (B, H, W, dh) keys of the last W tokens, oldest first; before RoPE
    values: Tensor  # (B, H, W, dh)
    query_tail: Tensor  # (B, max(K-1, 0), D) query projections of the last K-1 tokens
    key_tail: Tensor  # (B, K, D) key projections of the last K tokens

    def to_dict(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Tensor]) -> AttentionCache:
        return cls(**{f.name: data[f.name] for f in fields(cls)})

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes + self.query_tail.nbytes + self.key_tail.nbytes


def rope_angles(positions: Tensor, dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos and sin, each (L, dim / 2) in float64, of the RoPE angles for positions (L,)."""
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (dim/2,)
    angles = positions.to(torch.float64)[:, None] * inv_freq  # (L, dim/2)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (..., L, dh) pairwise (dim i with dim i + dh/2) by angles (L, dh/2)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def windowed_attention(
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    persistent_keys: Tensor,
    persistent_values: Tensor,
    n_cached: Tensor,
    cos: Tensor,
    sin: Tensor,
) -> Tensor:
    """Blocked sliding-window attention of T new queries; cost O(T * W).

    q: (B, H, T, dh) new queries, before RoPE. keys, values: (B, H, W + T, dh),
    the W cached tokens first (of which only the last n_cached (B,) are real)
    then the T new ones. persistent_*: (H, P, dh). cos, sin: (>= 2W, dh/2).
    Returns (B, H, T, dh).
    """
    b, h, t, dh = q.shape
    w = keys.shape[2] - t
    if t <= w:
        return _one_block(q, keys, values, persistent_keys, persistent_values, n_cached, cos, sin)
    qb = w  # queries per block
    nb = -(-t // qb)  # blocks
    pad = nb * qb - t
    if pad:  # padded queries come after every real key: they never touch a real output
        q, keys, values = (F.pad(z, (0, 0, 0, pad)) for z in (q, keys, values))
    span = w + qb  # keys one block sees

    # Block n holds queries n*Qb .. n*Qb+Qb-1 and sees keys n*Qb .. n*Qb+W+Qb-1.
    q = q.view(b, h, nb, qb, dh)
    k = keys.unfold(2, span, qb).transpose(-1, -2)  # (B, H, nb, W+Qb, dh)
    v = values.unfold(2, span, qb).transpose(-1, -2)  # (B, H, nb, W+Qb, dh)
    q_rot = apply_rope(q, cos[w:span], sin[w:span])  # query a sits at key index W + a
    k_rot = apply_rope(k, cos[:span], sin[:span])
    scale = dh**-0.5
    scores = (q_rot @ k_rot.transpose(-1, -2)) * scale  # (B, H, nb, Qb, W+Qb)

    # Query a of a block sees key indices a .. W + a (itself and the W before it) ...
    a = torch.arange(qb, device=q.device)[:, None]
    j = torch.arange(span, device=q.device)[None, :]
    band = (j >= a) & (j <= a + w)  # (Qb, W+Qb)
    # ... of which cache slots before the stream's start are not real tokens.
    index = torch.arange(nb, device=q.device)[:, None] * qb + j  # (nb, W+Qb) into keys
    real = index >= (w - n_cached)[:, None, None]  # (B, nb, W+Qb)
    mask = band & real[:, None, :, None, :]  # (B, 1, nb, Qb, W+Qb)
    scores = scores.masked_fill(~mask, float("-inf"))

    n_p = persistent_keys.shape[1]
    p_scores = (q @ persistent_keys[None, :, None].transpose(-1, -2)) * scale  # no position
    probs = torch.softmax(torch.cat([p_scores, scores], dim=-1), dim=-1)  # (B, H, nb, Qb, P+W+Qb)
    pv = persistent_values[None, :, None].expand(b, h, nb, n_p, dh)
    out = probs @ torch.cat([pv, v], dim=-2)  # (B, H, nb, Qb, dh)
    return out.reshape(b, h, nb * qb, dh)[:, :, :t]


def _one_block(
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    persistent_keys: Tensor,
    persistent_values: Tensor,
    n_cached: Tensor,
    cos: Tensor,
    sin: Tensor,
) -> Tensor:
    """`windowed_attention` when the T new queries fit one block (T <= W): the blocked
    path's block 0 with nothing to unfold or pad, the scale on the queries (RoPE is
    linear), persistent and window scores in one softmax, one value product. This is
    the path of every small append and of each append's last token."""
    b, h, t, dh = q.shape
    w = keys.shape[2] - t
    span = w + t
    q = q * dh**-0.5
    q_rot = apply_rope(q, cos[w:span], sin[w:span])  # query a sits at key index W + a
    k_rot = apply_rope(keys, cos[:span], sin[:span])
    scores = torch.cat([q @ persistent_keys.transpose(-1, -2), q_rot @ k_rot.transpose(-1, -2)], -1)
    scores += _one_block_mask(t, w, persistent_keys.shape[1], n_cached, scores.dtype)
    values = torch.cat([persistent_values.expand(b, h, -1, dh), values], dim=2)
    return torch.softmax(scores, dim=-1) @ values  # (B, H, T, dh)


def _one_block_mask(t: int, w: int, n_p: int, n_cached: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive mask (B or 1, 1, T, P + W + T): 0 where query a sees key j (every
    persistent key; window keys a <= j <= a + W that hold a real token), else -inf."""
    if bool((n_cached == w).all()):  # every cache slot real: the band alone, kept
        return _band_mask(t, w, n_p, dtype, n_cached.device)
    return _mask(t, w, n_p, w - n_cached, dtype)


@functools.lru_cache(maxsize=64)
def _band_mask(t: int, w: int, n_p: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    return _mask(t, w, n_p, torch.zeros(1, dtype=torch.int64, device=device), dtype)


def _mask(t: int, w: int, n_p: int, first_real: Tensor, dtype: torch.dtype) -> Tensor:
    """The mask of `_one_block_mask`; window key j is real when j >= first_real (B,)."""
    device = first_real.device
    a = torch.arange(t, device=device)[:, None]
    j = torch.arange(w + t, device=device)[None, :]
    seen = (j >= a) & (j <= a + w) & (j >= first_real.view(-1, 1, 1))  # (B, T, W+T)
    seen = torch.cat([seen.new_ones(seen.shape[0], t, n_p), seen], dim=-1)
    mask = torch.zeros(seen.shape, dtype=dtype, device=device)
    return mask.masked_fill_(~seen, float("-inf")).unsqueeze(1)


class SlidingWindowAttention(nn.Module):
    """Multi-head sliding-window attention with persistent tokens (no output projection:
    the MAG block's out-proj follows the gate)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d, h, dh, k = config.d_model, config.n_heads, config.head_dim, config.attn_conv_size
        self.to_qkv = nn.Linear(d, 3 * d, bias=False)
        nn.init.normal_(self.to_qkv.weight, std=0.02)
        if k:
            taps = torch.zeros(d, 1, k)
            taps[:, 0, -1] = 1.0  # query: the current token; key: the previous one
            self.query_conv = nn.Parameter(taps.clone())
            self.key_conv = nn.Parameter(taps.clone())
        else:
            self.register_parameter("query_conv", None)
            self.register_parameter("key_conv", None)
        self.persistent_keys = nn.Parameter(0.02 * torch.randn(h, config.n_persistent, dh))
        self.persistent_values = nn.Parameter(0.02 * torch.randn(h, config.n_persistent, dh))
        # Window-relative RoPE never needs a position past 2W - 1 (module docstring). Kept
        # in float64 and cast per call, so float64 runs rotate exactly too.
        cos, sin = rope_angles(torch.arange(2 * config.window), dh, config.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)  # (2W, dh/2)
        self.register_buffer("rope_sin", sin, persistent=False)

    def init_cache(
        self,
        batch: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> AttentionCache:
        cfg = self.config
        h, dh, w, k, d = cfg.n_heads, cfg.head_dim, cfg.window, cfg.attn_conv_size, cfg.d_model
        dev = self.to_qkv.weight.device if device is None else torch.device(device)
        return AttentionCache(
            keys=torch.zeros(batch, h, w, dh, device=dev, dtype=dtype),
            values=torch.zeros(batch, h, w, dh, device=dev, dtype=dtype),
            query_tail=torch.zeros(batch, max(k - 1, 0), d, device=dev, dtype=dtype),
            key_tail=torch.zeros(batch, k, d, device=dev, dtype=dtype),
        )

    def forward(
        self, x: Tensor, cache: AttentionCache, position: Tensor, last_only: bool = False
    ) -> tuple[Tensor, AttentionCache]:
        """x: (B, T, D) new tokens; position: (B,) tokens each stream has seen before them.
        Returns y: (B, T, D) (heads concatenated) and the cache after the new tokens;
        last_only: y (B, 1, D) of the last token alone (its query against the W keys
        before it and its own), the same cache."""
        cfg = self.config
        b, t, d = x.shape
        h, dh = cfg.n_heads, cfg.head_dim
        if t == 0:
            return x.new_zeros(b, 0, d), cache
        q, k, v = self.to_qkv(x).split(d, dim=-1)  # (B, T, D) each
        q, k, query_tail, key_tail = self._convolve(q, k, cache)

        def heads(z: Tensor) -> Tensor:  # (B, T, D) -> (B, H, T, dh)
            return z.view(b, t, h, dh).transpose(1, 2)

        keys = torch.cat([cache.keys, heads(k)], dim=2)  # (B, H, W + T, dh)
        values = torch.cat([cache.values, heads(v)], dim=2)
        queries, seen, w = heads(q), position, cfg.window
        if last_only:  # the last query, the W keys before it and its own
            queries, seen = queries[:, :, -1:], position + (t - 1)
            keys_in, values_in = keys[:, :, -(w + 1) :], values[:, :, -(w + 1) :]
        else:
            keys_in, values_in = keys, values
        y = windowed_attention(
            queries,
            keys_in,
            values_in,
            self.persistent_keys,
            self.persistent_values,
            seen.clamp(max=w),
            self.rope_cos,
            self.rope_sin,
        )  # (B, H, T, dh), T = 1 if last_only
        new_cache = AttentionCache(
            keys=keys[:, :, t:].contiguous(),
            values=values[:, :, t:].contiguous(),
            query_tail=query_tail,
            key_tail=key_tail,
        )
        return y.transpose(1, 2).reshape(b, y.shape[2], d), new_cache

    def _convolve(
        self, q: Tensor, k: Tensor, cache: AttentionCache
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Causal depthwise convolutions of q, k (B, T, D); returns them and the new tails."""
        if self.query_conv is None:
            return q, k, cache.query_tail, cache.key_tail
        t = q.shape[1]
        ext_q = torch.cat([cache.query_tail, q], dim=1)  # (B, K-1+T, D)
        ext_k = torch.cat([cache.key_tail, k], dim=1)  # (B, K+T, D)
        q = causal_depthwise_conv(ext_q, self.query_conv)  # t-K+1 .. t
        k = causal_depthwise_conv(ext_k[:, :-1], self.key_conv)  # t-K .. t-1
        return q, k, ext_q[:, t:], ext_k[:, t:]

    def reference(self, x: Tensor) -> Tensor:
        """The slow, obviously-right twin of `forward` on a whole stream from its start:
        dense (T, T) scores, RoPE at absolute positions 0 .. T-1, F.conv1d for the
        convolutions. x: (B, T, D) -> (B, T, D)."""
        cfg = self.config
        b, t, d = x.shape
        h, dh, kc = cfg.n_heads, cfg.head_dim, cfg.attn_conv_size
        q, k, v = self.to_qkv(x).split(d, dim=-1)
        if kc:
            q = F.conv1d(F.pad(q.transpose(1, 2), (kc - 1, 0)), self.query_conv, groups=d)
            k = F.conv1d(F.pad(k.transpose(1, 2), (kc, 0)), self.key_conv, groups=d)[..., :t]
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        q, k, v = (z.view(b, t, h, dh).transpose(1, 2) for z in (q, k, v))  # (B, H, T, dh)
        cos, sin = rope_angles(torch.arange(t), dh, cfg.rope_base)
        scores = apply_rope(q, cos, sin) @ apply_rope(k, cos, sin).transpose(-1, -2)
        dist = torch.arange(t)[:, None] - torch.arange(t)[None, :]  # t - s
        scores = scores.masked_fill(~((dist >= 0) & (dist <= cfg.window)), float("-inf"))
        p_scores = q @ self.persistent_keys.transpose(-1, -2)  # (B, H, T, P)
        probs = torch.softmax(torch.cat([p_scores, scores], dim=-1) * dh**-0.5, dim=-1)
        n_p = cfg.n_persistent
        y = probs[..., :n_p] @ self.persistent_values + probs[..., n_p:] @ v
        return y.transpose(1, 2).reshape(b, t, d)
