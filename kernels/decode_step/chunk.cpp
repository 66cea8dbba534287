// One MAG block over T <= W new tokens of one stream, in one call: the small append's
// path. `MAGBlock.forward` (memsvc/model/mag.py) is its reference, with the state as
// `ModelState` keeps it (attention cache in time order, the memory's chunk-start
// weights and pending partial chunk); memsvc/model/chunk_fast.py binds it and
// tests/model/test_chunk_fast.py holds the two equal.
//
// The GEMMs (the fused projection, the window scores and values, out-projection and
// SwiGLU) are ATen calls; convolutions, RoPE, masks, softmax and the memory are plain
// loops. The memory is the gated delta rule token by token (each read at the weights
// after its token, as the chunk form computes it), from the chunk-start weights through
// the pending tokens and the new ones; each chunk that completes passes the write gate
// (memsvc/memory/gate.py) before its weights become the next chunk's start.
#include <torch/extension.h>

#include "rows.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

using torch::Tensor;

using namespace memsvc_rows;

// out[t] = sum_j taps[j] * ext[t + j] per channel: ext (T + K - 1 rows, stride `stride`,
// `ch` channels from column `col`), taps (K, ch).
template <typename T>
void causal_conv(const T* ext, int64_t stride, int64_t col, int64_t rows, const T* taps,
                 int64_t k, int64_t ch, T* out) {
  for (int64_t t = 0; t < rows; ++t) {
    T* o = out + t * ch;
    const T* e0 = ext + t * stride + col;
    for (int64_t c = 0; c < ch; ++c) o[c] = e0[c] * taps[c];
    for (int64_t j = 1; j < k; ++j) {
      const T* e = ext + (t + j) * stride + col;
      const T* w = taps + j * ch;
      for (int64_t c = 0; c < ch; ++c) o[c] += e[c] * w[c];
    }
  }
}

struct ChunkBlock {
  // Weights. proj_t (D, out) with the block norm's weight folded in, columns
  // [attention q | attention k | memory channels | attention v | memory gate logits],
  // proj_bias (out); q_taps (K, D), k_taps (K, D) the attention convolutions (undefined
  // when K = 0); rope_cos, rope_sin (2W, dh/2); persistent keys and values (H, P, dh);
  // out_t (D, D) with attn_norm's weight folded in, gate_up_t (D, 2F) with ffn_norm's,
  // down_t (F, D).
  Tensor proj_t, proj_bias, q_taps, k_taps, rope_cos, rope_sin, pkeys, pvalues;
  Tensor out_t, gate_up_t, down_t;
  // Memory (undefined without one): conv taps (cs, ch), mem_norm's weight (D), the
  // output projection (dim, dim) or undefined, and the gate scales (3): max_step,
  // max_momentum and max_forget (0 without retention).
  Tensor mem_taps, mem_norm_w, mem_out_t, gate_scale;
  int64_t heads = 0, head_dim = 0, window = 0, mem_heads = 0, mem_head_dim = 0, chunk = 1;
  bool lookahead = true, residual = true;
  double eps = 1e-6;
  // The write gate (memsvc/memory/gate.py).
  double tau = 0, surprise_beta = 0, lambda_0 = 0, lambda_max = 0, min_write_rate = 0;
  double write_rate_beta = 0;
  bool relative = false, adaptive = false;

  bool has_memory() const { return mem_taps.defined(); }

  // x (T, D) the block's input; n_cached the window's real slots (min(position, W));
  // keys, values (H, W, dh) and query_tail (K-1, D), key_tail (K, D): the attention
  // cache; mem: the memory state without its batch dimension (empty: memory off),
  // [weights (Hm, dm, dm), pending_k, pending_v (Hm, P, dm), pending_gates (Hm, P, 3),
  // conv_tail (cs-1, ch), last_query (Hm, dm), chunks, writes_applied, writes_skipped
  // (1,) int64, surprise_ema, write_rate, step_scale, forget_boost (1,)].
  // Returns [out (T or 1, D), keys, values, query_tail, key_tail] and, with memory,
  // [weights, pending_k, pending_v, pending_gates, conv_tail, last_query, chunks,
  // writes_applied, writes_skipped, surprise_ema, write_rate, finite (1,) bool].
  std::vector<Tensor> forward(const Tensor& x, int64_t n_cached, const Tensor& keys,
                              const Tensor& values, const Tensor& query_tail,
                              const Tensor& key_tail, const std::vector<Tensor>& mem,
                              bool last_only) {
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous (T, D) tensor");
    TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= window, "the chunk path takes 1..W tokens");
    TORCH_CHECK(x.scalar_type() == proj_t.scalar_type(), "x and the weights differ in dtype");
    TORCH_CHECK(mem.empty() || (has_memory() && mem.size() == 13),
                "mem must be empty or the 13 memory state tensors");
    std::vector<Tensor> out;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "chunk_block", [&] {
      out = forward_impl<scalar_t>(x, n_cached, keys, values, query_tail, key_tail, mem,
                                   last_only);
    });
    return out;
  }

  template <typename T>
  std::vector<Tensor> forward_impl(const Tensor& x, int64_t n_cached, const Tensor& keys_in,
                                   const Tensor& values_in, const Tensor& query_tail_in,
                                   const Tensor& key_tail_in, const std::vector<Tensor>& mem,
                                   bool last_only) {
    const T eps_t = static_cast<T>(eps);
    const int64_t t_n = x.size(0), d = x.size(1), w = window;
    const int64_t h_n = heads, dh = head_dim, half = dh / 2;
    const int64_t k_conv = q_taps.defined() ? q_taps.size(0) : 0;
    const bool memory = !mem.empty();
    const int64_t mem_ch = has_memory() ? mem_taps.size(1) : 0;
    const int64_t out_n = proj_t.size(1);
    const auto opts = x.options();
    const Tensor keys = keys_in.contiguous(), values = values_in.contiguous();

    // Block norm (its weight is in proj_t), then the fused projection.
    Tensor xn = torch::empty({t_n, d}, opts);
    {
      const T* xp = x.data_ptr<T>();
      T* np = xn.data_ptr<T>();
      for (int64_t t = 0; t < t_n; ++t) {
        const T r = inv_rms(xp + t * d, d, eps_t);
        for (int64_t i = 0; i < d; ++i) np[t * d + i] = xp[t * d + i] * r;
      }
    }
    Tensor proj = torch::addmm(proj_bias, xn, proj_t);  // (T, out)
    const T* pp = proj.data_ptr<T>();
    const int64_t col_v = 2 * d + mem_ch;

    // Attention convolutions over [tail ; new]: the query of t over projections
    // t-K+1 .. t, its key over t-K .. t-1.
    Tensor ext_q = torch::empty({std::max<int64_t>(k_conv - 1, 0) + t_n, d}, opts);
    Tensor ext_k = torch::empty({k_conv + t_n, d}, opts);
    {
      T* eq = ext_q.data_ptr<T>();
      T* ek = ext_k.data_ptr<T>();
      const int64_t tq = std::max<int64_t>(k_conv - 1, 0);
      if (tq) std::copy_n(query_tail_in.contiguous().data_ptr<T>(), tq * d, eq);
      if (k_conv) std::copy_n(key_tail_in.contiguous().data_ptr<T>(), k_conv * d, ek);
      for (int64_t t = 0; t < t_n; ++t) {
        std::copy_n(pp + t * out_n, d, eq + (tq + t) * d);
        std::copy_n(pp + t * out_n + d, d, ek + (k_conv + t) * d);
      }
    }
    std::vector<T> q(t_n * d), k(t_n * d);
    if (k_conv) {
      causal_conv(ext_q.data_ptr<T>(), d, 0, t_n, q_taps.data_ptr<T>(), k_conv, d, q.data());
      causal_conv(ext_k.data_ptr<T>(), d, 0, t_n, k_taps.data_ptr<T>(), k_conv, d, k.data());
    } else {
      for (int64_t t = 0; t < t_n; ++t) {
        std::copy_n(pp + t * out_n, d, q.data() + t * d);
        std::copy_n(pp + t * out_n + d, d, k.data() + t * d);
      }
    }

    // Window keys (before RoPE) and values: the W cached then the T new, per head.
    const int64_t span = w + t_n;
    Tensor all_keys = torch::empty({h_n, span, dh}, opts);
    Tensor all_values = torch::empty({h_n, span, dh}, opts);
    {
      T* ak = all_keys.data_ptr<T>();
      T* av = all_values.data_ptr<T>();
      const T* ck = keys.data_ptr<T>();
      const T* cv = values.data_ptr<T>();
      for (int64_t h = 0; h < h_n; ++h) {
        std::copy_n(ck + h * w * dh, w * dh, ak + h * span * dh);
        std::copy_n(cv + h * w * dh, w * dh, av + h * span * dh);
        for (int64_t t = 0; t < t_n; ++t) {
          std::copy_n(k.data() + t * d + h * dh, dh, ak + (h * span + w + t) * dh);
          std::copy_n(pp + t * out_n + col_v + h * dh, dh, av + (h * span + w + t) * dh);
        }
      }
    }

    // Queries: the last T_q of the new tokens; query a sits at key index W + a and
    // the key j at index j (window-relative RoPE, attention.py), scale on the query.
    const int64_t first_q = last_only ? t_n - 1 : 0, tq_n = t_n - first_q;
    const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(dh)));
    const T* cs = rope_cos.data_ptr<T>();
    const T* sn = rope_sin.data_ptr<T>();
    Tensor q_rot = torch::empty({h_n, tq_n, dh}, opts);
    Tensor q_plain = torch::empty({h_n, tq_n, dh}, opts);
    Tensor k_rot = torch::empty({h_n, span, dh}, opts);
    {
      T* qr = q_rot.data_ptr<T>();
      T* qp = q_plain.data_ptr<T>();
      T* kr = k_rot.data_ptr<T>();
      const T* ak = all_keys.data_ptr<T>();
      for (int64_t h = 0; h < h_n; ++h) {
        for (int64_t a = 0; a < tq_n; ++a) {
          const T* src = q.data() + (first_q + a) * d + h * dh;
          T* dst = qr + (h * tq_n + a) * dh;
          T* plain = qp + (h * tq_n + a) * dh;
          const int64_t row = w + first_q + a;
          for (int64_t e = 0; e < dh; ++e) plain[e] = src[e] * scale;
          for (int64_t e = 0; e < half; ++e) {
            const T c = cs[row * half + e], s = sn[row * half + e];
            dst[e] = plain[e] * c - plain[e + half] * s;
            dst[e + half] = plain[e] * s + plain[e + half] * c;
          }
        }
        for (int64_t j = 0; j < span; ++j) {
          const T* src = ak + (h * span + j) * dh;
          T* dst = kr + (h * span + j) * dh;
          for (int64_t e = 0; e < half; ++e) {
            const T c = cs[j * half + e], s = sn[j * half + e];
            dst[e] = src[e] * c - src[e + half] * s;
            dst[e + half] = src[e] * s + src[e + half] * c;
          }
        }
      }
    }
    Tensor scores = torch::bmm(q_rot, k_rot.transpose(1, 2));  // (H, T_q, W + T)
    const int64_t n_p = pkeys.size(1);
    Tensor y_attn = torch::empty({tq_n, d}, opts);
    {
      // Query a sees window keys a .. a + W that hold a real token (j >= W - n_cached)
      // and every persistent key; one softmax over both.
      T* sp = scores.data_ptr<T>();
      const T* qp = q_plain.data_ptr<T>();
      const T* pk = pkeys.data_ptr<T>();
      std::vector<T> p_probs(h_n * tq_n * n_p);
      const int64_t first_real = w - std::min(n_cached, w);
      for (int64_t h = 0; h < h_n; ++h) {
        for (int64_t a = 0; a < tq_n; ++a) {
          T* row = sp + (h * tq_n + a) * span;
          T* prow = p_probs.data() + (h * tq_n + a) * n_p;
          const T* qa = qp + (h * tq_n + a) * dh;
          const int64_t lo = std::max(first_q + a, first_real), hi = first_q + a + w;
          T top = -std::numeric_limits<T>::infinity();
          for (int64_t n = 0; n < n_p; ++n) {
            T s = 0;
            const T* kn = pk + (h * n_p + n) * dh;
            for (int64_t e = 0; e < dh; ++e) s += qa[e] * kn[e];
            prow[n] = s;
            top = std::max(top, s);
          }
          for (int64_t j = lo; j <= hi; ++j) top = std::max(top, row[j]);
          T total = 0;
          for (int64_t n = 0; n < n_p; ++n) total += (prow[n] = std::exp(prow[n] - top));
          for (int64_t j = 0; j < lo; ++j) row[j] = 0;
          for (int64_t j = lo; j <= hi; ++j) total += (row[j] = std::exp(row[j] - top));
          for (int64_t j = hi + 1; j < span; ++j) row[j] = 0;
          const T inv = T(1) / total;
          for (int64_t n = 0; n < n_p; ++n) prow[n] *= inv;
          for (int64_t j = lo; j <= hi; ++j) row[j] *= inv;
        }
      }
      Tensor window_out = torch::bmm(scores, all_values);  // (H, T_q, dh)
      const T* wo = window_out.data_ptr<T>();
      const T* pv = pvalues.data_ptr<T>();
      T* ya = y_attn.data_ptr<T>();
      for (int64_t h = 0; h < h_n; ++h) {
        for (int64_t a = 0; a < tq_n; ++a) {
          T* dst = ya + a * d + h * dh;
          std::copy_n(wo + (h * tq_n + a) * dh, dh, dst);
          const T* prow = p_probs.data() + (h * tq_n + a) * n_p;
          for (int64_t n = 0; n < n_p; ++n)
            for (int64_t e = 0; e < dh; ++e) dst[e] += prow[n] * pv[(h * n_p + n) * dh + e];
        }
      }
    }

    std::vector<Tensor> result;
    Tensor y_mem;
    std::vector<Tensor> mem_out;
    if (memory) mem_out = memory_impl<T>(proj, t_n, first_q, mem, y_mem);

    // The block's tail for the T_q rows: gate, out-projection, residuals, SwiGLU.
    Tensor xq = x.narrow(0, first_q, tq_n);
    Tensor gated = torch::empty({tq_n, d}, opts);
    {
      const T* ya = y_attn.data_ptr<T>();
      T* gp = gated.data_ptr<T>();
      for (int64_t a = 0; a < tq_n; ++a) {
        const T r = inv_rms(ya + a * d, d, eps_t);
        if (memory) {
          const T* ym = y_mem.data_ptr<T>() + a * d;
          const T rm = inv_rms(ym, d, eps_t);
          const T* nw = mem_norm_w.data_ptr<T>();
          for (int64_t i = 0; i < d; ++i) gp[a * d + i] = ya[a * d + i] * r * sigmoid(ym[i] * rm * nw[i]);
        } else {  // no memory: the gate is sigmoid(0) = 1/2
          for (int64_t i = 0; i < d; ++i) gp[a * d + i] = ya[a * d + i] * r * T(0.5);
        }
      }
    }
    Tensor x1 = torch::addmm(xq, gated, out_t);
    if (memory && residual) x1.add_(y_mem);
    Tensor x1n = torch::empty_like(x1);
    {
      const T* xp = x1.data_ptr<T>();
      T* np = x1n.data_ptr<T>();
      for (int64_t a = 0; a < tq_n; ++a) {
        const T r = inv_rms(xp + a * d, d, eps_t);
        for (int64_t i = 0; i < d; ++i) np[a * d + i] = xp[a * d + i] * r;
      }
    }
    Tensor gu = torch::mm(x1n, gate_up_t);  // (T_q, 2F)
    const int64_t f = gate_up_t.size(1) / 2;
    Tensor hidden = torch::empty({tq_n, f}, opts);
    {
      const T* up = gu.data_ptr<T>();
      T* hp = hidden.data_ptr<T>();
      for (int64_t a = 0; a < tq_n; ++a)
        for (int64_t i = 0; i < f; ++i) {
          hp[a * f + i] = silu(up[a * 2 * f + i]) * up[a * 2 * f + f + i];
        }
    }
    result.push_back(torch::addmm(x1, hidden, down_t));

    // The new attention cache: the last W keys and values, the convolutions' tails.
    result.push_back(all_keys.narrow(1, t_n, w).contiguous());
    result.push_back(all_values.narrow(1, t_n, w).contiguous());
    result.push_back(ext_q.narrow(0, t_n, ext_q.size(0) - t_n).clone());
    result.push_back(ext_k.narrow(0, t_n, ext_k.size(0) - t_n).clone());
    for (auto& m : mem_out) result.push_back(m);
    return result;
  }

  // The memory branch: projections, the delta rule token by token and the write gate per
  // completed chunk. Sets y_mem (T_q, dim) and returns the memory's new state.
  template <typename T>
  std::vector<Tensor> memory_impl(const Tensor& proj, int64_t t_n, int64_t first_q,
                                  const std::vector<Tensor>& mem, Tensor& y_mem) {
    const auto opts = proj.options();
    const int64_t hm = mem_heads, dm = mem_head_dim, dim = hm * dm, c_n = chunk;
    const int64_t d = proj_t.size(0), out_n = proj.size(1);
    const int64_t ch = mem_taps.size(1), cs = mem_taps.size(0);
    const Tensor w_in = mem[0].contiguous(), pk_in = mem[1].contiguous();
    const Tensor pv_in = mem[2].contiguous(), pg_in = mem[3].contiguous();
    const Tensor tail_in = mem[4].contiguous(), lq_in = mem[5].contiguous();
    const int64_t p_n = pk_in.size(1), total = p_n + t_n;
    const T* pp = proj.data_ptr<T>();
    const int64_t col_m = 2 * d, col_g = 3 * d + ch;

    // Convolution over [conv tail ; new projections], SiLU.
    Tensor ext = torch::empty({cs - 1 + t_n, ch}, opts);
    T* ep = ext.data_ptr<T>();
    if (cs > 1) std::copy_n(tail_in.data_ptr<T>(), (cs - 1) * ch, ep);
    for (int64_t t = 0; t < t_n; ++t) std::copy_n(pp + t * out_n + col_m, ch, ep + (cs - 1 + t) * ch);
    std::vector<T> act(t_n * ch);
    causal_conv(ep, ch, 0, t_n, mem_taps.data_ptr<T>(), cs, ch, act.data());
    for (auto& v : act) v = silu(v);

    // Every token of the chunk so far (pending, then new): keys, values, gates by head.
    std::vector<T> kk(hm * total * dm), vv(hm * total * dm), gg(hm * total * 3);
    std::vector<T> qq(hm * t_n * dm);
    {
      const T* pk = pk_in.data_ptr<T>();
      const T* pv = pv_in.data_ptr<T>();
      const T* pg = pg_in.data_ptr<T>();
      for (int64_t h = 0; h < hm; ++h) {
        std::copy_n(pk + h * p_n * dm, p_n * dm, kk.data() + h * total * dm);
        std::copy_n(pv + h * p_n * dm, p_n * dm, vv.data() + h * total * dm);
        std::copy_n(pg + h * p_n * 3, p_n * 3, gg.data() + h * total * 3);
      }
      const int64_t parts = ch / dim;
      const T* lq = lq_in.data_ptr<T>();
      const T* scale = gate_scale.data_ptr<T>();
      const T s_scale = static_cast<T>(mem[11].item<double>());
      const T f_boost = static_cast<T>(mem[12].item<double>());
      const bool mitigated = s_scale != T(1) || f_boost != T(0);
      for (int64_t t = 0; t < t_n; ++t) {
        const T* a = act.data() + t * ch;
        const T* logits = pp + t * out_n + col_g;
        for (int64_t h = 0; h < hm; ++h) {
          T* qh = qq.data() + (h * t_n + t) * dm;
          std::copy_n(a + h * dm, dm, qh);
          normalize(qh, dm);
          T* kh = kk.data() + (h * total + p_n + t) * dm;
          if (lookahead) {
            const T* prev = t ? qq.data() + (h * t_n + t - 1) * dm : lq + h * dm;
            std::copy_n(prev, dm, kh);
          } else {
            std::copy_n(a + dim + h * dm, dm, kh);
            normalize(kh, dm);
          }
          std::copy_n(a + (parts - 1) * dim + h * dm, dm, vv.data() + (h * total + p_n + t) * dm);
          T* g = gg.data() + (h * total + p_n + t) * 3;
          T theta = scale[0] * sigmoid(logits[h]);
          const T eta = scale[1] * sigmoid(logits[hm + h]);
          T alpha = scale[2] * sigmoid(logits[2 * hm + h]);
          if (mitigated) {
            theta = theta * s_scale;
            alpha = T(1) - (T(1) - alpha) * (T(1) - f_boost);
          }
          g[0] = theta;
          g[1] = eta;
          g[2] = alpha;
        }
      }
    }

    // The delta rule, chunk by chunk: W runs from the chunk-start weights W0 through
    // every token; grad accumulates sum_i k_i (k_i^T W0 - v_i)^T for the surprise.
    Tensor w0 = w_in.clone();  // (Hm, dm, dm), the next chunk's start
    T* w0p = w0.data_ptr<T>();
    std::vector<T> run(hm * dm * dm), grad(hm * dm * dm), r(dm), r0(dm);
    const int64_t tq_n = t_n - first_q;
    y_mem = torch::zeros({tq_n, dim}, opts);
    T* yp = y_mem.data_ptr<T>();
    int64_t chunks = 0, applied = 0, skipped = 0;
    double ema = mem[9].item<double>(), rate = mem[10].item<double>();
    bool wrote = false;
    for (int64_t start = 0; start < total; start += c_n) {
      const int64_t end = std::min(start + c_n, total);
      std::copy(w0p, w0p + hm * dm * dm, run.begin());
      std::fill(grad.begin(), grad.end(), T(0));
      const bool complete = end - start == c_n;
      for (int64_t h = 0; h < hm; ++h) {
        T* w = run.data() + h * dm * dm;
        const T* w0h = w0p + h * dm * dm;
        T* gs = grad.data() + h * dm * dm;
        for (int64_t i = start; i < end; ++i) {
          const T* kh = kk.data() + (h * total + i) * dm;
          const T* vh = vv.data() + (h * total + i) * dm;
          const T theta = gg[(h * total + i) * 3], a = T(1) - gg[(h * total + i) * 3 + 2];
          std::fill(r.begin(), r.end(), T(0));
          if (complete) std::fill(r0.begin(), r0.end(), T(0));
          for (int64_t e = 0; e < dm; ++e) {
            const T ke = kh[e];
            const T* wr = w + e * dm;
            for (int64_t j = 0; j < dm; ++j) r[j] += ke * wr[j];
            if (complete) {
              const T* w0r = w0h + e * dm;
              for (int64_t j = 0; j < dm; ++j) r0[j] += ke * w0r[j];
            }
          }
          for (int64_t j = 0; j < dm; ++j) r[j] = (r[j] * a - vh[j]) * theta;
          if (complete) {
            for (int64_t j = 0; j < dm; ++j) r0[j] -= vh[j];
            for (int64_t e = 0; e < dm; ++e) {
              T* gr = gs + e * dm;
              for (int64_t j = 0; j < dm; ++j) gr[j] += kh[e] * r0[j];
            }
          }
          const int64_t out_row = i - p_n - first_q;  // this token's row in y_mem
          T* yh = out_row >= 0 ? yp + out_row * dim + h * dm : nullptr;
          const T* qh = out_row >= 0 ? qq.data() + (h * t_n + i - p_n) * dm : nullptr;
          for (int64_t e = 0; e < dm; ++e) {
            T* wr = w + e * dm;
            const T ke = kh[e];
            for (int64_t j = 0; j < dm; ++j) wr[j] = wr[j] * a - ke * r[j];
            if (yh) {
              const T qe = qh[e];
              for (int64_t j = 0; j < dm; ++j) yh[j] += qe * wr[j];
            }
          }
        }
      }
      if (!complete) break;  // the last partial chunk stays pending
      // The write gate over this chunk (every head of this layer, this stream).
      double sq = 0.0;
      for (const T g : grad) sq += static_cast<double>(g) * g;
      const T surprise = static_cast<T>(std::sqrt(sq / static_cast<double>(c_n * c_n)));
      const T before = static_cast<T>(ema), b = static_cast<T>(surprise_beta);
      const T new_ema = b * before + (T(1) - b) * surprise;
      bool write = true;
      if (tau != 0) write = relative ? surprise > static_cast<T>(tau) * before
                                     : new_ema > static_cast<T>(tau);
      const T rb = static_cast<T>(write_rate_beta);
      const T new_rate = rb * static_cast<T>(rate) + (T(1) - rb) * (write ? T(1) : T(0));
      T forget = 0;
      if (adaptive)
        forget = std::min(static_cast<T>(lambda_0) / std::max(new_rate, static_cast<T>(min_write_rate)),
                          static_cast<T>(lambda_max));
      ema = new_ema;
      rate = new_rate;
      ++chunks;
      if (write) {
        ++applied;
        const bool open = tau == 0 && !adaptive;
        const T keep = T(1) - forget;
        for (int64_t e = 0; e < hm * dm * dm; ++e) w0p[e] = open ? run[e] : keep * run[e];
        wrote = true;
      } else {
        ++skipped;
      }
    }
    if (mem_out_t.defined()) y_mem = torch::mm(y_mem, mem_out_t);

    const int64_t keep_from = total - total % c_n, p_new = total - keep_from;
    auto pending = [&](const std::vector<T>& src, int64_t width) {
      Tensor outp = torch::empty({hm, p_new, width}, opts);
      T* op = outp.data_ptr<T>();
      for (int64_t h = 0; h < hm; ++h)
        std::copy_n(src.data() + (h * total + keep_from) * width, p_new * width,
                    op + h * p_new * width);
      return outp;
    };
    Tensor last_query = lookahead ? torch::empty({hm, dm}, opts) : lq_in.clone();
    if (lookahead)
      for (int64_t h = 0; h < hm; ++h)
        std::copy_n(qq.data() + (h * t_n + t_n - 1) * dm, dm, last_query.data_ptr<T>() + h * dm);
    bool finite = true;
    if (wrote)
      for (int64_t e = 0; e < hm * dm * dm && finite; ++e) finite = std::isfinite(w0p[e]);
    return {
        w0,
        pending(kk, dm),
        pending(vv, dm),
        pending(gg, 3),
        ext.narrow(0, t_n, cs - 1).clone(),
        last_query,
        mem[6] + chunks,
        mem[7] + applied,
        mem[8] + skipped,
        torch::full({1}, ema, mem[9].options()),
        torch::full({1}, rate, mem[10].options()),
        torch::full({1}, finite, torch::TensorOptions().dtype(torch::kBool)),
    };
  }
};

}  // namespace

void bind_chunk(pybind11::module& m) {
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  pybind11::class_<ChunkBlock>(m, "ChunkBlock")
      .def(pybind11::init<>())
      .def_readwrite("proj_t", &ChunkBlock::proj_t)
      .def_readwrite("proj_bias", &ChunkBlock::proj_bias)
      .def_readwrite("q_taps", &ChunkBlock::q_taps)
      .def_readwrite("k_taps", &ChunkBlock::k_taps)
      .def_readwrite("rope_cos", &ChunkBlock::rope_cos)
      .def_readwrite("rope_sin", &ChunkBlock::rope_sin)
      .def_readwrite("pkeys", &ChunkBlock::pkeys)
      .def_readwrite("pvalues", &ChunkBlock::pvalues)
      .def_readwrite("out_t", &ChunkBlock::out_t)
      .def_readwrite("gate_up_t", &ChunkBlock::gate_up_t)
      .def_readwrite("down_t", &ChunkBlock::down_t)
      .def_readwrite("mem_taps", &ChunkBlock::mem_taps)
      .def_readwrite("mem_norm_w", &ChunkBlock::mem_norm_w)
      .def_readwrite("mem_out_t", &ChunkBlock::mem_out_t)
      .def_readwrite("gate_scale", &ChunkBlock::gate_scale)
      .def_readwrite("heads", &ChunkBlock::heads)
      .def_readwrite("head_dim", &ChunkBlock::head_dim)
      .def_readwrite("window", &ChunkBlock::window)
      .def_readwrite("mem_heads", &ChunkBlock::mem_heads)
      .def_readwrite("mem_head_dim", &ChunkBlock::mem_head_dim)
      .def_readwrite("chunk", &ChunkBlock::chunk)
      .def_readwrite("lookahead", &ChunkBlock::lookahead)
      .def_readwrite("residual", &ChunkBlock::residual)
      .def_readwrite("eps", &ChunkBlock::eps)
      .def_readwrite("tau", &ChunkBlock::tau)
      .def_readwrite("surprise_beta", &ChunkBlock::surprise_beta)
      .def_readwrite("lambda_0", &ChunkBlock::lambda_0)
      .def_readwrite("lambda_max", &ChunkBlock::lambda_max)
      .def_readwrite("min_write_rate", &ChunkBlock::min_write_rate)
      .def_readwrite("write_rate_beta", &ChunkBlock::write_rate_beta)
      .def_readwrite("relative", &ChunkBlock::relative)
      .def_readwrite("adaptive", &ChunkBlock::adaptive)
      .def("forward", &ChunkBlock::forward, release());
}
