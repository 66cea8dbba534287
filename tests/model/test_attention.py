"""Sliding-window attention: streaming == whole sequence == the dense reference, for any
split; window, convolution and RoPE semantics; positions stay bounded."""

from __future__ import annotations

import pytest
import torch

from memsvc.model import AttentionCache, ModelConfig, SlidingWindowAttention

CONFIGS = [
    {"window": 8, "attn_conv_size": 4, "n_persistent": 4},
    {"window": 5, "attn_conv_size": 0, "n_persistent": 0},
    {"window": 16, "attn_conv_size": 1, "n_persistent": 2},
    {"window": 1, "attn_conv_size": 3, "n_persistent": 1},
]


def make_attention(seed: int = 0, **overrides) -> SlidingWindowAttention:
    torch.manual_seed(seed)
    cfg = ModelConfig(**{"d_model": 32, "n_heads": 4, "use_memory": False, **overrides})
    attn = SlidingWindowAttention(cfg).double()
    with torch.no_grad():  # non-trivial taps and persistent tokens
        attn.to_qkv.weight.normal_(std=0.3)
        for p in (attn.query_conv, attn.key_conv):
            if p is not None:
                p.normal_()
        attn.persistent_keys.normal_()
        attn.persistent_values.normal_()
    return attn


def stream(attn, x, cuts, cache=None, position=None):
    b = x.shape[0]
    cache = attn.init_cache(b, dtype=x.dtype) if cache is None else cache
    position = torch.zeros(b, dtype=torch.int64) if position is None else position
    ys = []
    for a, e in zip([0, *cuts], [*cuts, x.shape[1]], strict=True):
        y, cache = attn(x[:, a:e], cache, position)
        position = position + (e - a)
        ys.append(y)
    return torch.cat(ys, dim=1), cache


def random_cuts(g: torch.Generator, t: int) -> list[int]:
    n = int(torch.randint(1, 10, (1,), generator=g))
    return sorted(set(torch.randint(1, t, (n,), generator=g).tolist()))


TOL = {"rtol": 1e-10, "atol": 1e-10}


@pytest.mark.parametrize("overrides", CONFIGS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_any_split_matches_the_dense_reference(overrides: dict, seed: int) -> None:
    attn = make_attention(seed, **overrides)
    g = torch.Generator().manual_seed(seed)
    t = 4 * attn.config.window + 7  # T > W: the window slides
    x = torch.randn(2, t, 32, generator=g, dtype=torch.float64)
    ref = attn.reference(x)
    w = attn.config.window
    splits = [
        [],  # one call (the training path)
        random_cuts(g, t),
        list(range(1, t)),  # one token at a time
        [w, 2 * w],  # cuts on window boundaries
        [w - 1, w + 1, 3 * w],
    ]
    for cuts in splits:
        y, _ = stream(attn, x, [c for c in cuts if 0 < c < t])
        torch.testing.assert_close(y, ref, **TOL, msg=f"cuts {cuts}")


@pytest.mark.parametrize("t", [1, 7, 8, 9, 16, 17])
def test_sequences_up_to_and_across_the_window_boundary(t: int) -> None:
    attn = make_attention(3, window=8)
    x = torch.randn(1, t, 32, dtype=torch.float64)
    y, cache = stream(attn, x, [])
    torch.testing.assert_close(y, attn.reference(x), **TOL)
    assert cache.keys.shape == (1, 4, 8, 8)  # (B, H, W, dh) whatever T is


def test_streams_at_different_positions_batch_together() -> None:
    attn = make_attention(4)
    g = torch.Generator().manual_seed(4)
    a, b = (torch.randn(1, n, 32, generator=g, dtype=torch.float64) for n in (3, 30))
    _, cache_a = stream(attn, a, [])
    _, cache_b = stream(attn, b, [2, 17])
    nxt = torch.randn(2, 5, 32, generator=g, dtype=torch.float64)
    stacked = AttentionCache.from_dict(
        {k: torch.cat([cache_a.to_dict()[k], cache_b.to_dict()[k]]) for k in cache_a.to_dict()}
    )
    y, _ = attn(nxt, stacked, torch.tensor([3, 30]))
    y_a, _ = attn(nxt[:1], cache_a, torch.tensor([3]))
    y_b, _ = attn(nxt[1:], cache_b, torch.tensor([30]))
    torch.testing.assert_close(y, torch.cat([y_a, y_b]), rtol=1e-12, atol=1e-12)


def test_output_sees_exactly_the_window_and_keys_exclude_their_own_token() -> None:
    w, k = 8, 4
    attn = make_attention(5, window=w, attn_conv_size=k)
    x = torch.randn(1, 40, 32, dtype=torch.float64)
    t = 39
    y = attn.reference(x)[0, t]
    # Key s holds tokens s-K .. s-1, value s token s: the oldest token that reaches
    # the output at t is t - W - K (through key t - W).
    for s, reaches in [(t - w - k - 1, False), (t - w - k, True), (t - w, True)]:
        x2 = x.clone()
        x2[0, s] += 1.0
        changed = not torch.allclose(attn.reference(x2)[0, t], y, rtol=0, atol=1e-12)
        assert changed == reaches, (s, reaches)
    # The key of the newest token does not depend on that token (the convolution is shifted).
    x2 = x.clone()
    x2[0, -1] += 1.0
    _, c1 = stream(attn, x, [])
    _, c2 = stream(attn, x2, [])
    torch.testing.assert_close(c1.keys[:, :, -1], c2.keys[:, :, -1], rtol=0, atol=0)
    assert not torch.allclose(c1.values[:, :, -1], c2.values[:, :, -1])


def test_key_convolution_starts_equal_to_the_query_convolution() -> None:
    torch.manual_seed(0)
    attn = SlidingWindowAttention(ModelConfig(d_model=32, n_heads=4))
    assert torch.equal(attn.query_conv, attn.key_conv)
    assert attn.query_conv.shape == (32, 1, 4)


def test_rope_positions_are_bounded_by_twice_the_window() -> None:
    """Only distances within a window reach RoPE: a stream far into its life gives the
    same outputs as one just past its first window, given the same cached tokens."""
    attn = make_attention(6, window=8)
    g = torch.Generator().manual_seed(6)
    history = torch.randn(1, 8, 32, generator=g, dtype=torch.float64)
    _, cache = stream(attn, history, [])
    new = torch.randn(1, 20, 32, generator=g, dtype=torch.float64)
    y_early, _ = attn(new, cache, torch.tensor([8]))
    y_late, _ = attn(new, cache, torch.tensor([2_000_000_000]))
    torch.testing.assert_close(y_late, y_early, rtol=0, atol=0)
    # The rotation table is all the module has: 2W positions, not stored with the weights.
    assert attn.rope_cos.shape == (16, 4)
    assert "rope_cos" not in attn.state_dict()
    # A long single call (T >> W) only ever uses those 2W rows and still matches the
    # reference, whose absolute positions run to T - 1.
    x = torch.randn(1, 50 * 8, 32, generator=g, dtype=torch.float64)
    y, _ = stream(attn, x, [])
    torch.testing.assert_close(y, attn.reference(x), **TOL)


def test_gradients_match_the_reference() -> None:
    attn = make_attention(7, window=8)
    x = torch.randn(2, 37, 32, dtype=torch.float64, requires_grad=True)
    y, _ = stream(attn, x, [])
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    (gx_ref,) = torch.autograd.grad(attn.reference(x).square().sum(), x)
    torch.testing.assert_close(gx, gx_ref, **TOL)


def test_empty_input_leaves_the_cache_alone() -> None:
    attn = make_attention(8)
    cache = attn.init_cache(2, dtype=torch.float64)
    y, after = attn(torch.zeros(2, 0, 32, dtype=torch.float64), cache, torch.zeros(2).long())
    assert y.shape == (2, 0, 32) and after is cache
