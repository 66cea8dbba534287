"""The chunk update of a batch of memories as one Triton launch (program per memory).

Each program owns one memory n (a session's head) and does its whole chunk:

    phase 0  X = [K; Q]                               copy into scratch A_0 (M = C + R rows)
    phase 1  Z_l = H_l W_l, H_{l+1} = act(Z_l)         forward of keys and queries, layer by layer
    phase 2  out = Z_{L-1} (+ X)                       reads go out; G_{L-1} = objective'(out - v)
    phase 3  for l = L-1 .. 0: gram += (G_l G_l^T) * (H_l H_l^T), curvature terms;
             G_{l-1} = (G_l W_l^T) * act'(Z_{l-1}), ||W_l||_F^2
    phase 4  coefficients of the inner optimiser (cumulative products of the gates in
             log space), NLMS step, update-norm cap, surprise^2 = sum(gram) / n^2
    phase 5  W'_l = beta W_l + c S_l - H_l^T (G_l * w),  S'_l = e S_l - H_l^T (G_l * ws)

Each weight and momentum block is written once; the weights are read by the
forward, again by the backward (layers >= 1) and by the update. Per-token
activations and gradients (C x width) do not fit on chip at serving sizes, so
they go through a float32 scratch buffer in global memory (L2-resident in
practice); phases are separated by block-wide barriers, which also make a
program's scratch writes visible to its own later reads. Matmuls accumulate in
float32; with bfloat16 weights their operands are bfloat16 (tensor cores), with
float32 weights they are float32 (`precision`: "ieee" as torch's float32 bmm,
or "tf32").

Ragged batches: memory n writes its first n_valid[n] tokens (rows past them
are masked out of every sum); 0 leaves its weights and momentum as they are.

Depth 2 has its own kernel with the weights as plain arguments (Triton then
knows their alignment); any other depth runs a loop over layers that finds each
layer's tensors in a small table of addresses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.lmm.mlp import MLPMemory
from kernels.lmm.rule import ChunkRule, ChunkWrite

_OBJECTIVE = {"mse": 0, "huber": 1, "lp": 2}
_OPTIMIZER = {"sgd": 0, "momentum": 1, "chunk_momentum": 2}
_ACTIVATION = {"gelu": 0, "silu": 1}


@dataclass(frozen=True)
class Blocks:
    """Tile sizes and warps of the launch (powers of two, >= 16; the tuning knobs)."""

    n: int = 64  # output columns per forward / backward tile
    k: int = 32  # reduction width per forward / backward step
    rows: int = 64  # weight rows (inputs) per update tile
    cols: int = 32  # weight columns (outputs) per update tile
    num_warps: int = 8


# ---- elementwise pieces -------------------------------------------------------------------


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 0:  # exact (erf) GELU, as torch's F.gelu
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    else:
        return z * tl.sigmoid(z)


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    if ACT == 0:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        return cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    else:
        s = tl.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))


@triton.jit
def _objective_grad(r, huber_delta, lp_p, OBJ: tl.constexpr):
    if OBJ == 0:  # MSE: 0.5 ||r||^2
        return r
    elif OBJ == 1:  # Huber
        return tl.minimum(tl.maximum(r, -huber_delta), huber_delta)
    else:  # Lp: sign(r) |r|^(p - 1)
        a = tl.abs(r)
        mag = tl.where(a > 0.0, tl.exp((lp_p - 1.0) * tl.log(tl.maximum(a, 1e-38))), 0.0)
        sign = tl.where(r > 0.0, 1.0, tl.where(r < 0.0, -1.0, 0.0))
        return sign * tl.where(lp_p == 1.0, 1.0, mag)


@triton.jit
def _log1p(x):
    """log(1 + x) to full float32 precision for tiny x (Goldberg's trick)."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _dot(a, b, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, EMULATE: tl.constexpr):
    """a @ b with operands rounded to DOT_DTYPE and a float32 result. EMULATE (the CPU
    interpreter, whose bfloat16 dot is wrong) multiplies the rounded operands in float32:
    the same products, exactly, as a tensor core's."""
    a = a.to(DOT_DTYPE)
    b = b.to(DOT_DTYPE)
    if EMULATE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif DOT_DTYPE == tl.float32:  # noqa: SIM300 (a constexpr, not a constant)
        return tl.dot(a, b, input_precision=PRECISION)
    else:
        return tl.dot(a, b, out_dtype=tl.float32)


@triton.jit
def _load_h(a_ptr, ld, rows, cols, n_rows, n_cols, hidden, ACT: tl.constexpr):
    """A layer's input tile (rows x cols), float32: act(Z) for hidden layers, X for the first."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    z = tl.load(a_ptr + rows[:, None] * ld + cols[None, :], mask=mask, other=0.0)
    if hidden:
        z = tl.where(mask, _act(z, ACT), 0.0)
    return z


# ---- phases -------------------------------------------------------------------------------


@triton.jit
def _copy_input(
    a0,
    k_ptr,
    q_ptr,
    k_sn,
    k_st,
    q_sn,
    q_st,
    pid,
    d,
    n_tok,
    n_read,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """A_0 = [K; Q]: (n_tok + n_read, d) float32."""
    rows = tl.arange(0, BLOCK_M)
    is_key = rows < n_tok
    is_query = (rows >= n_tok) & (rows < n_tok + n_read)
    krow = tl.minimum(rows, n_tok - 1).to(tl.int64)
    qrow = tl.maximum(rows - n_tok, 0).to(tl.int64)
    for c0 in range(0, d, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cm = cols[None, :] < d
        kv = tl.load(
            k_ptr + pid * k_sn + krow[:, None] * k_st + cols[None, :],
            mask=is_key[:, None] & cm,
            other=0.0,
        )
        qv = tl.load(
            q_ptr + pid * q_sn + qrow[:, None] * q_st + cols[None, :],
            mask=is_query[:, None] & cm,
            other=0.0,
        )
        x = tl.where(is_key[:, None], kv.to(tl.float32), qv.to(tl.float32))
        tl.store(
            a0 + rows[:, None] * d + cols[None, :], x, mask=(rows[:, None] < n_tok + n_read) & cm
        )


@triton.jit
def _forward_layer(
    a_in,
    a_out,
    w_ptr,
    n_in,
    n_out,
    n_rows,
    hidden,
    ACT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    EMULATE: tl.constexpr,
):
    """Z = H W for all n_rows rows (keys and queries); H = act(A_in) when hidden."""
    rows = tl.arange(0, BLOCK_M)
    for n0 in range(0, n_out, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, n_in, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            h = _load_h(a_in, n_in, rows, ks, n_rows, n_in, hidden, ACT)
            w = tl.load(
                w_ptr + ks[:, None] * n_out + cols[None, :],
                mask=(ks[:, None] < n_in) & (cols[None, :] < n_out),
                other=0.0,
            )
            acc += _dot(h, w, DOT_DTYPE, PRECISION, EMULATE)
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_out)
        tl.store(a_out + rows[:, None] * n_out + cols[None, :], acc, mask=mask)


@triton.jit
def _output(
    a0,
    a_last,
    g_ptr,
    v_ptr,
    reads_ptr,
    v_sn,
    v_st,
    pid,
    d,
    n_tok,
    n_read,
    n,
    huber_delta,
    lp_p,
    RESIDUAL: tl.constexpr,
    OBJ: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """out = Z_{L-1} (+ X): query rows are the reads; key rows give G_{L-1} = obj'(out - v)."""
    rows = tl.arange(0, BLOCK_M)
    valid = rows < n
    is_query = (rows >= n_tok) & (rows < n_tok + n_read)
    qrow = tl.maximum(rows - n_tok, 0).to(tl.int64)
    for c0 in range(0, d, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cm = cols[None, :] < d
        mask = (rows[:, None] < n_tok + n_read) & cm
        out = tl.load(a_last + rows[:, None] * d + cols[None, :], mask=mask, other=0.0)
        if RESIDUAL:
            out += tl.load(a0 + rows[:, None] * d + cols[None, :], mask=mask, other=0.0)
        v = tl.load(
            v_ptr + pid * v_sn + rows[:, None] * v_st + cols[None, :],
            mask=valid[:, None] & cm,
            other=0.0,
        )
        g = _objective_grad(out - v.to(tl.float32), huber_delta, lp_p, OBJ)
        tl.store(g_ptr + rows[:, None] * d + cols[None, :], g, mask=valid[:, None] & cm)
        tl.store(
            reads_ptr + (pid * n_read + qrow[:, None]) * d + cols[None, :],
            out,
            mask=is_query[:, None] & cm,
        )


@triton.jit
def _gram_layer(
    a_in,
    g_ptr,
    n_in,
    n_out,
    n,
    hidden,
    ACT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """(G G^T) * (H H^T) of one layer over the n valid tokens, and |H_i|^2 per token."""
    rows = tl.arange(0, BLOCK_C)
    gg = tl.zeros((BLOCK_C, BLOCK_C), tl.float32)
    for k0 in range(0, n_out, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        g = tl.load(
            g_ptr + rows[:, None] * n_out + ks[None, :],
            mask=(rows[:, None] < n) & (ks[None, :] < n_out),
            other=0.0,
        )
        gg += tl.dot(g, tl.trans(g), input_precision="ieee")
    hh = tl.zeros((BLOCK_C, BLOCK_C), tl.float32)
    hsq = tl.zeros((BLOCK_C,), tl.float32)
    for k0 in range(0, n_in, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        h = _load_h(a_in, n_in, rows, ks, n, n_in, hidden, ACT)
        hh += tl.dot(h, tl.trans(h), input_precision="ieee")
        hsq += tl.sum(h * h, axis=1)
    return gg * hh, hsq


@triton.jit
def _backward_layer(
    g_next,
    w_next,
    z_ptr,
    g_ptr,
    n_hid,
    n_next,
    n,
    ACT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    EMULATE: tl.constexpr,
):
    """G = (G_next W_next^T) * act'(Z) with W_next (n_hid, n_next); returns ||W_next||_F^2."""
    rows = tl.arange(0, BLOCK_C)
    valid = rows < n
    wsq = 0.0
    for n0 in range(0, n_hid, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_C, BLOCK_N), tl.float32)
        for k0 in range(0, n_next, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            g = tl.load(
                g_next + rows[:, None] * n_next + ks[None, :],
                mask=valid[:, None] & (ks[None, :] < n_next),
                other=0.0,
            )
            w = tl.load(
                w_next + cols[:, None] * n_next + ks[None, :],
                mask=(cols[:, None] < n_hid) & (ks[None, :] < n_next),
                other=0.0,
            )
            wf = w.to(tl.float32)
            wsq += tl.sum(tl.sum(wf * wf, axis=1), axis=0)
            acc += _dot(g, tl.trans(w), DOT_DTYPE, PRECISION, EMULATE)
        mask = valid[:, None] & (cols[None, :] < n_hid)
        z = tl.load(z_ptr + rows[:, None] * n_hid + cols[None, :], mask=mask, other=0.0)
        tl.store(g_ptr + rows[:, None] * n_hid + cols[None, :], acc * _act_grad(z, ACT), mask=mask)
    return wsq


@triton.jit
def _coefficients(
    gates_ptr,
    gates_sn,
    gates_st,
    pid,
    n,
    curvature,
    gram,
    max_norm,
    OPT: tl.constexpr,
    NORMALIZE: tl.constexpr,
    CAP: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """The optimiser's chunk scalars (kernels.lmm.optimizer), in log space as there:

        M_C = beta M_0 + c S_0 - sum_i w_i u_i,    S_C = e S_0 - sum_i ws_i u_i

    Returns beta, c, e, w, ws, surprise^2. Tokens past n are out of every sum."""
    i = tl.arange(0, BLOCK_C)
    valid = i < n
    base = gates_ptr + pid * gates_sn + i * gates_st
    theta = tl.load(base + 0, mask=valid, other=0.0).to(tl.float32)
    eta = tl.load(base + 1, mask=valid, other=1.0).to(tl.float32)
    alpha = tl.load(base + 2, mask=valid, other=0.0).to(tl.float32)
    if NORMALIZE:
        theta = theta / tl.maximum(curvature, 1.0)
    n_f = tl.maximum(n, 1).to(tl.float32)
    ii = i[:, None]
    jj = i[None, :]
    log_a = tl.where(valid, _log1p(-alpha), 0.0)
    beta = tl.exp(tl.sum(log_a, axis=0))
    c = 0.0
    e = 0.0
    ws = theta
    if OPT == 0:  # SGD: w_i = theta_i prod_{m>i} a_m
        tail = tl.exp(tl.sum(tl.where(jj > ii, log_a[None, :], 0.0), axis=1))
        w = theta * tail
    elif OPT == 1:  # momentum per token
        log_eta = tl.where(valid, tl.log(eta), 0.0)
        tail = tl.where(valid, tl.exp(tl.sum(tl.where(jj > ii, log_a[None, :], 0.0), axis=1)), 0.0)
        # decay[i, j] = prod_{j < m <= i} eta_m for i >= j: masked cumulative sums (as segsum)
        seg = tl.cumsum(tl.where(ii > jj, log_eta[:, None], 0.0), axis=0)
        decay = tl.where(ii >= jj, tl.exp(seg), 0.0)
        w = theta * tl.sum(tail[:, None] * decay, axis=0)
        carried = tl.exp(tl.cumsum(log_eta, axis=0))
        c = tl.sum(tail * carried, axis=0)
        e = tl.exp(tl.sum(log_eta, axis=0))
        ws = theta * tl.exp(tl.sum(tl.where(ii > jj, log_eta[:, None], 0.0), axis=0))
    else:  # momentum and forgetting per chunk, mean gates; ws == w, c == e
        eta_c = tl.sum(tl.where(valid, eta, 0.0), axis=0) / n_f
        beta = 1.0 - tl.sum(alpha, axis=0) / n_f
        w = theta
        c = eta_c
        e = eta_c
    surprise_sq = tl.sum(tl.sum(gram, axis=1), axis=0) / (n_f * n_f)
    if CAP:  # ||sum_i w_i u_i||_F = sqrt(w^T gram w) <= max_norm
        quad = tl.sum(tl.sum(w[:, None] * gram * w[None, :], axis=1), axis=0)
        norm = tl.sqrt(tl.maximum(quad, 0.0))
        scale = tl.minimum(max_norm / tl.maximum(norm, 1e-30), 1.0)
        w = w * scale
        ws = ws * scale
    if OPT == 2:
        ws = w
    return beta, c, e, w, ws, surprise_sq


@triton.jit
def _update_layer(
    a_in,
    g_ptr,
    w_ptr,
    s_ptr,
    w_new,
    s_new,
    n_in,
    n_out,
    n,
    hidden,
    beta,
    c,
    e,
    coef_w,
    coef_ws,
    ACT: tl.constexpr,
    OPT: tl.constexpr,
    W_DTYPE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_O: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    EMULATE: tl.constexpr,
):
    """W' = beta W + c S - H^T (G * w), S' = e S - H^T (G * ws); each block read, written once."""
    rows = tl.arange(0, BLOCK_C)
    valid = rows < n
    keep = n == 0  # no token: weights and momentum stay as they are
    for i0 in range(0, n_in, BLOCK_I):
        ci = i0 + tl.arange(0, BLOCK_I)
        h_t = tl.trans(_load_h(a_in, n_in, rows, ci, n, n_in, hidden, ACT))  # (BLOCK_I, BLOCK_C)
        for o0 in range(0, n_out, BLOCK_O):
            co = o0 + tl.arange(0, BLOCK_O)
            g = tl.load(
                g_ptr + rows[:, None] * n_out + co[None, :],
                mask=valid[:, None] & (co[None, :] < n_out),
                other=0.0,
            )
            mask = (ci[:, None] < n_in) & (co[None, :] < n_out)
            offs = ci[:, None] * n_out + co[None, :]
            w0 = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            u = _dot(h_t, g * coef_w[:, None], DOT_DTYPE, PRECISION, EMULATE)
            if OPT == 0:
                w1 = beta * w0 - u
            else:
                s0 = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                if OPT == 1:
                    us = _dot(h_t, g * coef_ws[:, None], DOT_DTYPE, PRECISION, EMULATE)
                    s1 = e * s0 - us
                    w1 = beta * w0 + c * s0 - u
                else:
                    s1 = e * s0 - u
                    w1 = beta * w0 + s1
                tl.store(s_new + offs, tl.where(keep, s0, s1).to(W_DTYPE), mask=mask)
            tl.store(w_new + offs, tl.where(keep, w0, w1).to(W_DTYPE), mask=mask)


# ---- kernels ------------------------------------------------------------------------------


@triton.jit
def _chunk_depth2_kernel(
    w0_ptr,
    w1_ptr,
    s0_ptr,
    s1_ptr,
    w0_new,
    w1_new,
    s0_new,
    s1_new,
    k_ptr,
    v_ptr,
    q_ptr,
    gates_ptr,
    n_valid_ptr,
    reads_ptr,
    surprise_ptr,
    scratch_ptr,
    k_sn,
    k_st,
    v_sn,
    v_st,
    q_sn,
    q_st,
    gates_sn,
    gates_st,
    d,
    hid,
    n_tok,
    n_read,
    scratch_stride,
    off_a1,
    off_a2,
    off_g0,
    off_g1,
    huber_delta,
    lp_p,
    act_bound,
    max_norm,
    OBJ: tl.constexpr,
    OPT: tl.constexpr,
    ACT: tl.constexpr,
    NORMALIZE: tl.constexpr,
    CAP: tl.constexpr,
    W_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    EMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_O: tl.constexpr,
):
    """Depth 2: M(x) = x + act(x W_0) W_1. One program per memory."""
    pid = tl.program_id(0).to(tl.int64)
    n = tl.load(n_valid_ptr + pid)
    rows = n_tok + n_read
    scratch = scratch_ptr + pid * scratch_stride
    a0, a1, a2 = scratch, scratch + off_a1, scratch + off_a2
    g0, g1 = scratch + off_g0, scratch + off_g1
    w0, w1 = w0_ptr + pid * d * hid, w1_ptr + pid * hid * d
    s0, s1 = s0_ptr + pid * d * hid, s1_ptr + pid * hid * d

    _copy_input(a0, k_ptr, q_ptr, k_sn, k_st, q_sn, q_st, pid, d, n_tok, n_read, BLOCK_M, BLOCK_N)
    tl.debug_barrier()
    _forward_layer(
        a0, a1, w0, d, hid, rows, 0, ACT, BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, PRECISION, EMULATE
    )
    tl.debug_barrier()
    _forward_layer(
        a1, a2, w1, hid, d, rows, 1, ACT, BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, PRECISION, EMULATE
    )
    tl.debug_barrier()
    _output(
        a0,
        a2,
        g1,
        v_ptr,
        reads_ptr,
        v_sn,
        v_st,
        pid,
        d,
        n_tok,
        n_read,
        n,
        huber_delta,
        lp_p,
        True,
        OBJ,
        BLOCK_M,
        BLOCK_N,
    )
    tl.debug_barrier()
    gram, hsq1 = _gram_layer(a1, g1, hid, d, n, 1, ACT, BLOCK_C, BLOCK_K)
    wsq1 = _backward_layer(
        g1, w1, a1, g0, hid, d, n, ACT, BLOCK_C, BLOCK_N, BLOCK_K, DOT_DTYPE, PRECISION, EMULATE
    )
    tl.debug_barrier()
    gram0, hsq0 = _gram_layer(a0, g0, d, hid, n, 0, ACT, BLOCK_C, BLOCK_K)
    gram += gram0
    curvature = hsq1 + hsq0 * (act_bound * act_bound * wsq1)

    beta, c, e, cw, cws, surprise_sq = _coefficients(
        gates_ptr,
        gates_sn,
        gates_st,
        pid,
        n,
        curvature,
        gram,
        max_norm,
        OPT,
        NORMALIZE,
        CAP,
        BLOCK_C,
    )
    tl.store(surprise_ptr + pid, surprise_sq)
    _update_layer(
        a0,
        g0,
        w0,
        s0,
        w0_new + pid * d * hid,
        s0_new + pid * d * hid,
        d,
        hid,
        n,
        0,
        beta,
        c,
        e,
        cw,
        cws,
        ACT,
        OPT,
        W_DTYPE,
        BLOCK_C,
        BLOCK_I,
        BLOCK_O,
        DOT_DTYPE,
        PRECISION,
        EMULATE,
    )
    _update_layer(
        a1,
        g1,
        w1,
        s1,
        w1_new + pid * hid * d,
        s1_new + pid * hid * d,
        hid,
        d,
        n,
        1,
        beta,
        c,
        e,
        cw,
        cws,
        ACT,
        OPT,
        W_DTYPE,
        BLOCK_C,
        BLOCK_I,
        BLOCK_O,
        DOT_DTYPE,
        PRECISION,
        EMULATE,
    )


@triton.jit
def _layer(table, layer, pid, W_DTYPE: tl.constexpr):
    """Layer `layer`'s tensors for memory pid, from the address table. A row: addresses of
    w, s, w_new, s_new; in, out; scratch offsets of the layer's input, output and G."""
    row = table + layer * 9
    n_in = tl.load(row + 4)
    n_out = tl.load(row + 5)
    size = pid * n_in * n_out
    w = tl.load(row + 0).to(tl.pointer_type(W_DTYPE)) + size
    s = tl.load(row + 1).to(tl.pointer_type(W_DTYPE)) + size
    w_new = tl.load(row + 2).to(tl.pointer_type(W_DTYPE)) + size
    s_new = tl.load(row + 3).to(tl.pointer_type(W_DTYPE)) + size
    return w, s, w_new, s_new, n_in, n_out, tl.load(row + 6), tl.load(row + 7), tl.load(row + 8)


@triton.jit
def _chunk_any_depth_kernel(
    table,
    k_ptr,
    v_ptr,
    q_ptr,
    gates_ptr,
    n_valid_ptr,
    reads_ptr,
    surprise_ptr,
    scratch_ptr,
    k_sn,
    k_st,
    v_sn,
    v_st,
    q_sn,
    q_st,
    gates_sn,
    gates_st,
    d,
    n_tok,
    n_read,
    scratch_stride,
    huber_delta,
    lp_p,
    act_bound,
    max_norm,
    DEPTH: tl.constexpr,
    OBJ: tl.constexpr,
    OPT: tl.constexpr,
    ACT: tl.constexpr,
    NORMALIZE: tl.constexpr,
    CAP: tl.constexpr,
    W_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    EMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_O: tl.constexpr,
):
    """Any depth: the same phases as the depth-2 kernel, with a loop over layers."""
    pid = tl.program_id(0).to(tl.int64)
    n = tl.load(n_valid_ptr + pid)
    rows = n_tok + n_read
    scratch = scratch_ptr + pid * scratch_stride

    _copy_input(
        scratch, k_ptr, q_ptr, k_sn, k_st, q_sn, q_st, pid, d, n_tok, n_read, BLOCK_M, BLOCK_N
    )
    tl.debug_barrier()
    for layer in range(DEPTH):
        w, _s, _wn, _sn, n_in, n_out, a_in, a_out, _g = _layer(table, layer, pid, W_DTYPE)
        _forward_layer(
            scratch + a_in,
            scratch + a_out,
            w,
            n_in,
            n_out,
            rows,
            layer > 0,
            ACT,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            DOT_DTYPE,
            PRECISION,
            EMULATE,
        )
        tl.debug_barrier()
    _w, _s, _wn, _sn, _i, _o, _a, a_last, g_last = _layer(table, DEPTH - 1, pid, W_DTYPE)
    _output(
        scratch,
        scratch + a_last,
        scratch + g_last,
        v_ptr,
        reads_ptr,
        v_sn,
        v_st,
        pid,
        d,
        n_tok,
        n_read,
        n,
        huber_delta,
        lp_p,
        DEPTH >= 2,
        OBJ,
        BLOCK_M,
        BLOCK_N,
    )
    tl.debug_barrier()

    gram = tl.zeros((BLOCK_C, BLOCK_C), tl.float32)
    curvature = tl.zeros((BLOCK_C,), tl.float32)
    chain = 1.0  # prod over the layers after this one of act_bound^2 ||W||_F^2
    for step in range(DEPTH):
        layer = DEPTH - 1 - step
        w, _s, _wn, _sn, n_in, n_out, a_in, _a, g = _layer(table, layer, pid, W_DTYPE)
        part, hsq = _gram_layer(
            scratch + a_in, scratch + g, n_in, n_out, n, layer > 0, ACT, BLOCK_C, BLOCK_K
        )
        gram += part
        curvature += hsq * chain
        if layer > 0:
            _w, _s, _wn, _sn, _i, _o, _a, _a2, g_prev = _layer(table, layer - 1, pid, W_DTYPE)
            wsq = _backward_layer(
                scratch + g,
                w,
                scratch + a_in,
                scratch + g_prev,
                n_in,
                n_out,
                n,
                ACT,
                BLOCK_C,
                BLOCK_N,
                BLOCK_K,
                DOT_DTYPE,
                PRECISION,
                EMULATE,
            )
            chain = chain * (act_bound * act_bound * wsq)
            tl.debug_barrier()

    beta, c, e, cw, cws, surprise_sq = _coefficients(
        gates_ptr,
        gates_sn,
        gates_st,
        pid,
        n,
        curvature,
        gram,
        max_norm,
        OPT,
        NORMALIZE,
        CAP,
        BLOCK_C,
    )
    tl.store(surprise_ptr + pid, surprise_sq)
    for layer in range(DEPTH):
        w, s, w_new, s_new, n_in, n_out, a_in, _a, g = _layer(table, layer, pid, W_DTYPE)
        _update_layer(
            scratch + a_in,
            scratch + g,
            w,
            s,
            w_new,
            s_new,
            n_in,
            n_out,
            n,
            layer > 0,
            beta,
            c,
            e,
            cw,
            cws,
            ACT,
            OPT,
            W_DTYPE,
            BLOCK_C,
            BLOCK_I,
            BLOCK_O,
            DOT_DTYPE,
            PRECISION,
            EMULATE,
        )


# ---- launcher -----------------------------------------------------------------------------

_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16}


def _pow2(x: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(x))


def _rows(x: Tensor) -> Tensor:
    """x with a unit stride in its last dim (the kernels take the other two strides)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def chunk_update_triton(
    rule: ChunkRule,
    weights: Sequence[Tensor],
    momentum: Sequence[Tensor],
    k: Tensor,
    v: Tensor,
    gates: Tensor,
    q: Tensor | None = None,
    n_valid: Tensor | None = None,
    *,
    precision: str = "ieee",
    blocks: Blocks | None = None,
) -> ChunkWrite:
    """`kernels.lmm.chunk.chunk_update_torch`, as one Triton launch.

    Weights and momentum: float32 or bfloat16 (one dtype). Returns new tensors (the
    inputs are not written); reads and surprise^2 in float32.
    """
    dtype = weights[0].dtype
    if dtype not in _TL_DTYPE or any(t.dtype != dtype for t in (*weights, *momentum)):
        raise ValueError(f"weights and momentum must share one of float32 / bfloat16, got {dtype}")
    blocks = blocks or Blocks()
    n_mem, n_tok, d = k.shape
    n_read = 0 if q is None else q.shape[1]
    depth = len(weights)
    shapes = [(w.shape[1], w.shape[2]) for w in weights]
    device = k.device
    weights = [w.contiguous() for w in weights]
    momentum = [s.contiguous() for s in momentum]
    new_w = [torch.empty_like(w) for w in weights]
    new_s = [torch.empty_like(s) for s in momentum]
    k, v, gates = _rows(k), _rows(v), _rows(gates)
    has_reads = q is not None
    q = _rows(q) if has_reads else k.new_zeros(1, 1, d)  # a placeholder, never read
    reads = torch.empty(n_mem, max(n_read, 1), d, device=device, dtype=torch.float32)
    surprise_sq = torch.empty(n_mem, device=device, dtype=torch.float32)
    if n_valid is None:
        n_valid = torch.full((n_mem,), n_tok, device=device, dtype=torch.int32)
    n_valid = n_valid.to(device=device, dtype=torch.int32).clamp(0, n_tok).contiguous()

    # Per-memory float32 scratch: A_0 = [K; Q], A_{l+1} = Z_l (M rows each), G_l (C rows).
    m_rows = n_tok + n_read
    a_off, g_off, total = [0], [], m_rows * d
    for _, out in shapes:
        a_off.append(total)
        total += m_rows * out
    for _, out in shapes:
        g_off.append(total)
        total += n_tok * out
    scratch = torch.empty(n_mem * total, device=device, dtype=torch.float32)

    block_m, block_c = _pow2(m_rows), _pow2(n_tok)
    widest = max(max(shape) for shape in shapes)
    fit = min(_pow2(widest), 128)
    emulate = device.type == "cpu"  # CPU tensors run only under the interpreter
    meta = dict(
        OBJ=_OBJECTIVE[rule.objective],
        OPT=_OPTIMIZER[rule.optimizer],
        ACT=_ACTIVATION[rule.activation],
        NORMALIZE=rule.normalize_step,
        CAP=rule.max_update_norm is not None,
        W_DTYPE=_TL_DTYPE[dtype],
        DOT_DTYPE=_TL_DTYPE[dtype],
        PRECISION=precision,
        EMULATE=emulate,
        BLOCK_M=block_m,
        BLOCK_C=block_c,
        BLOCK_N=min(blocks.n, fit),
        BLOCK_K=min(blocks.k, fit),
        BLOCK_I=min(blocks.rows, fit),
        BLOCK_O=min(blocks.cols, fit),
        num_warps=blocks.num_warps,
    )
    scalars = (
        rule.huber_delta,
        rule.lp_p,
        MLPMemory(depth, rule.activation).act_bound,
        rule.max_update_norm if rule.max_update_norm is not None else 0.0,
    )
    strides = (
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        q.stride(0),
        q.stride(1),
        gates.stride(0),
        gates.stride(1),
    )
    common = (k, v, q, gates, n_valid, reads, surprise_sq, scratch, *strides)
    mom = momentum if rule.has_momentum else weights  # not read without momentum
    mom_new = new_s if rule.has_momentum else new_w
    if depth == 2:
        _chunk_depth2_kernel[(n_mem,)](
            weights[0],
            weights[1],
            mom[0],
            mom[1],
            new_w[0],
            new_w[1],
            mom_new[0],
            mom_new[1],
            *common,
            d,
            shapes[0][1],
            n_tok,
            n_read,
            total,
            a_off[1],
            a_off[2],
            g_off[0],
            g_off[1],
            *scalars,
            **meta,
        )
    else:
        table = torch.tensor(
            [
                [
                    w.data_ptr(),
                    s.data_ptr(),
                    wn.data_ptr(),
                    sn.data_ptr(),
                    i,
                    o,
                    a_off[l],
                    a_off[l + 1],
                    g_off[l],
                ]
                for l, (w, s, wn, sn, (i, o)) in enumerate(
                    zip(weights, mom, new_w, mom_new, shapes, strict=True)
                )
            ],
            dtype=torch.int64,
        ).to(device)
        _chunk_any_depth_kernel[(n_mem,)](
            table, *common, d, n_tok, n_read, total, *scalars, DEPTH=depth, **meta
        )
    return ChunkWrite(
        weights=new_w,
        momentum=new_s,
        surprise_sq=surprise_sq,
        reads=reads[:, :n_read] if has_reads else None,
    )
