// One MAG block's step for B streams of one token each, over the buffers that
// memsvc/model/decode.py lays out (see its docstring for the layout). The four GEMMs
// go to ATen (one call each, MKL's small-GEMM path); everything between them is
// plain loops over the rows, so a token costs a handful of dispatches instead of
// about 75 per layer. Its reference is the eager `_LayerDecoder.step` in Python;
// every test of tests/model/test_decode.py runs on both and holds them equal.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "rows.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

using torch::Tensor;

using namespace memsvc_rows;

// Everything one layer's step reads and writes, bound once per batch layout.
struct LayerStep {
  // Weights (contiguous, float32 or float64): fused projection (D, out) and its bias, convolution
  // taps (span, cc), block out-projection (D, D), SwiGLU (D, 2F) and (F, D).
  Tensor proj_t, proj_bias, taps, out_t, gate_up_t, down_t, mem_norm_w;
  // Buffers: history (B, 2 span, cc); attention ring keys (B, H, P+R, 2dh), values
  // (B, H, P+R, dh), raw keys (B, H, R, dh), mask (B, H, 1, P+R).
  Tensor history, keys, values, raw_keys, mask;
  // Memory (undefined when the block runs without it): running delta weights (B Hm,
  // dm, dm), ring keys/values (B, Hm, C, dm) and gates (B, Hm, C, 3), last query and
  // the query before this step (B, Hm, dm), gate scale (3 Hm), mitigation mul/add
  // (B, 3 Hm) or undefined, memory out-projection (dim, dim) or undefined.
  Tensor running, mkeys, mvalues, mgates, last_query, query_before, gate_scale;
  Tensor mit_mul, mit_add, mem_out_t;
  // Delta rule, optional: the chunk-start weights w0 (B Hm, dm, dm) and the running sum
  // of the chunk's gradients at them, sum_i k_i (k_i^T W0 - v_i)^T (B Hm, dm, dm): the
  // chunk's surprise at its end is ||sum||^2 / C^2 (kernels/delta_rule/chunk.py).
  Tensor w0, grad_sum;
  // A chunk-rule memory (no per-token write; reads at the chunk-start weights): its MLP
  // layers (B Hm, in, out), activation between them (0 GELU, 1 SiLU), and whether the
  // input is added to the output (depth >= 2). Empty for the delta rule.
  std::vector<Tensor> mlp;
  int64_t mlp_activation = 0;
  bool mlp_residual = false;
  int64_t heads, head_dim, mem_heads, mem_head_dim, mem_parts;
  bool lookahead, residual;
  double eps;

  // Scratch tensors, (re)allocated when the batch or dtype changes; o, y_mem and the
  // block output are returned, so each is valid until this layer's next step.
  Tensor s_xn, s_proj, s_o, s_y_mem, s_gated, s_x1, s_gu, s_hidden, s_out;

  static Tensor scratch(Tensor& buf, int64_t rows, int64_t cols, const Tensor& like) {
    if (!buf.defined() || buf.size(0) != rows || buf.size(1) != cols ||
        buf.scalar_type() != like.scalar_type())
      buf = torch::empty({rows, cols}, like.options());
    return buf;
  }

  bool has_memory() const { return running.defined() || !mlp.empty(); }

  // Attention and the memory's read and delta write: returns (o, y_mem), o the
  // RMS-scaled attention output (B, D), y_mem (B, dim) (None without memory).
  // cos, sin: RoPE tables (rows, dh); this step's row is `rope_row`.
  std::vector<Tensor> attend(const Tensor& x, int64_t step, const Tensor& cos,
                             const Tensor& sin, int64_t rope_row, int64_t slot) {
    TORCH_CHECK(0 <= rope_row && rope_row < cos.size(0) && cos.is_contiguous() &&
                    sin.is_contiguous() && cos.sizes() == sin.sizes() &&
                    cos.size(1) == head_dim,
                "cos and sin must be contiguous (rows, head_dim) tables holding rope_row");
    TORCH_CHECK(x.is_contiguous() && x.dim() == 2, "x must be a contiguous (B, D) tensor");
    TORCH_CHECK(x.scalar_type() == proj_t.scalar_type(), "x and the weights differ in dtype");
    std::vector<Tensor> out;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "attend", [&] {
      out = attend_impl<scalar_t>(x, step, cos, sin, rope_row, slot);
    });
    return out;
  }

  Tensor mix(const Tensor& x, const Tensor& o, const Tensor& y_mem) {
    TORCH_CHECK(x.is_contiguous() && o.is_contiguous(), "x and o must be contiguous");
    Tensor out;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mix", [&] {
      out = mix_impl<scalar_t>(x, o, y_mem);
    });
    return out;
  }

  template <typename T>
  std::vector<Tensor> attend_impl(const Tensor& x, int64_t step, const Tensor& cos,
                                  const Tensor& sin, int64_t rope_row, int64_t slot) {
    using V = std::vector<T>;
    const T eps_t = static_cast<T>(eps);
    const int64_t b_n = x.size(0), d = x.size(1);
    const int64_t cc = taps.size(1), span = taps.size(0);
    const int64_t h_n = heads, dh = head_dim;
    const int64_t n_keys = keys.size(2), ring = raw_keys.size(2), p = n_keys - ring;
    const int64_t out_n = proj_t.size(1);

    Tensor xn = scratch(s_xn, b_n, d, x);
    {
      const T* xp = x.data_ptr<T>();
      T* np = xn.data_ptr<T>();
      for (int64_t b = 0; b < b_n; ++b) {
        const T r = inv_rms(xp + b * d, d, eps_t);
        for (int64_t i = 0; i < d; ++i) np[b * d + i] = xp[b * d + i] * r;
      }
    }
    Tensor proj = scratch(s_proj, b_n, out_n, x);  // (B, out)
    torch::addmm_out(proj, proj_bias, xn, proj_t);
    Tensor o = scratch(s_o, b_n, d, x);
    Tensor y_mem;
    const bool memory = has_memory();
    const int64_t hm = mem_heads, dm = mem_head_dim, dim = hm * dm;
    if (memory) y_mem = scratch(s_y_mem, b_n, dim, x);

    const T* pp = proj.data_ptr<T>();
    const T* tp = taps.data_ptr<T>();
    const T* cp = cos.data_ptr<T>() + rope_row * head_dim;
    const T* sp = sin.data_ptr<T>() + rope_row * head_dim;
    T* hist = history.data_ptr<T>();
    T* kp = keys.data_ptr<T>();
    T* vp = values.data_ptr<T>();
    T* rp = raw_keys.data_ptr<T>();
    T* mp = mask.data_ptr<T>();
    T* op = o.data_ptr<T>();
    const int64_t i_slot = step % span, j_slot = step % ring;

    // Streams are independent (disjoint rows of every buffer): split across torch's
    // intra-op threads, a few streams per task.
    at::parallel_for(0, b_n, 4, [&](int64_t first, int64_t last) {
      V conv(cc), query(2 * dh), scores(n_keys), y_attn(d);
      V mem(memory ? mem_parts * dim : 0), qv(dim), kv(dim), vv(dim), rv(dm);
      for (int64_t b = first; b < last; ++b) {
        const T* row = pp + b * out_n;
        // Pre-convolution projections into the doubled ring, then the depthwise conv.
        T* hb = hist + b * 2 * span * cc;
        std::copy(row, row + cc, hb + i_slot * cc);
        std::copy(row, row + cc, hb + (i_slot + span) * cc);
        std::fill(conv.begin(), conv.end(), T(0));
        for (int64_t l = 0; l < span; ++l) {
          const T* hrow = hb + (i_slot + 1 + l) * cc;
          const T* trow = tp + l * cc;
          for (int64_t c = 0; c < cc; ++c) conv[c] += hrow[c] * trow[c];
        }
        const T* q = conv.data();
        const T* k = q + d;
        const T* q_partner = q + 2 * d;
        const T* k_partner = q + 3 * d;
        const T* v = row + cc;
        for (int64_t h = 0; h < h_n; ++h) {
          const int64_t bh = b * h_n + h;
          T* key_slot = kp + (bh * n_keys + p + j_slot) * 2 * dh;
          T* raw_slot = rp + (bh * ring + j_slot) * dh;
          for (int64_t e = 0; e < dh; ++e) {
            const int64_t c = h * dh + e;
            key_slot[e] = k[c] * cp[e] + k_partner[c] * sp[e];
            raw_slot[e] = k[c];
            query[e] = q[c] * cp[e] + q_partner[c] * sp[e];
            query[dh + e] = q[c];
          }
          std::copy(v + h * dh, v + (h + 1) * dh, vp + (bh * n_keys + p + j_slot) * dh);
          T* mask_row = mp + bh * n_keys;
          mask_row[p + j_slot] = T(0);
          // Scores over persistent + ring slots, softmax, weighted values.
          T top = -std::numeric_limits<T>::infinity();
          const T* key_rows = kp + bh * n_keys * 2 * dh;
          // A persistent key is [0, p_k] and a ring key [k_rot, 0]: each dot product
          // skips its zero half (exact).
          for (int64_t n = 0; n < n_keys; ++n) {
            const int64_t half = n < p ? dh : 0;
            const T* kr = key_rows + n * 2 * dh + half;
            const T* qr = query.data() + half;
            const T s = dot(qr, kr, dh) + mask_row[n];
            scores[n] = s;
            top = std::max(top, s);
          }
          T total = 0;
          for (int64_t n = 0; n < n_keys; ++n) {
            scores[n] = std::exp(scores[n] - top);
            total += scores[n];
          }
          T* ya = y_attn.data() + h * dh;
          std::fill(ya, ya + dh, T(0));
          const T* value_rows = vp + bh * n_keys * dh;
          for (int64_t n = 0; n < n_keys; ++n) {
            const T w = scores[n] / total;
            if (w == T(0)) continue;
            const T* vr = value_rows + n * dh;
            for (int64_t e = 0; e < dh; ++e) ya[e] += w * vr[e];
          }
        }
        const T r = inv_rms(y_attn.data(), d, eps_t);
        for (int64_t i = 0; i < d; ++i) op[b * d + i] = y_attn[i] * r;

        if (!memory) continue;
        // The memory: SiLU'd convolved projections, per-head unit q (and k), gates.
        const T* mem_in = conv.data() + 4 * d;
        for (int64_t c = 0; c < mem_parts * dim; ++c) mem[c] = silu(mem_in[c]);
        std::copy(mem.data(), mem.data() + dim, qv.data());
        std::copy(mem.data() + (mem_parts - 1) * dim, mem.data() + mem_parts * dim, vv.data());
        T* lq = last_query.data_ptr<T>() + b * dim;
        T* qb = query_before.data_ptr<T>() + b * dim;
        std::copy(lq, lq + dim, qb);
        for (int64_t h = 0; h < hm; ++h) normalize(qv.data() + h * dm, dm);
        if (lookahead) {
          std::copy(lq, lq + dim, kv.data());
          std::copy(qv.begin(), qv.end(), lq);
        } else {
          std::copy(mem.data() + dim, mem.data() + 2 * dim, kv.data());
          for (int64_t h = 0; h < hm; ++h) normalize(kv.data() + h * dm, dm);
        }
        const T* logits = row + cc + d;
        const T* scale = gate_scale.data_ptr<T>();
        T g[3];
        const int64_t c_n = mkeys.size(2);
        for (int64_t h = 0; h < hm; ++h) {
          for (int64_t t = 0; t < 3; ++t) {
            const int64_t gi = t * hm + h;
            g[t] = sigmoid(logits[gi]) * scale[gi];
            if (mit_mul.defined()) {
              g[t] = mit_add.data_ptr<T>()[b * 3 * hm + gi] +
                     g[t] * mit_mul.data_ptr<T>()[b * 3 * hm + gi];
            }
          }
          const int64_t bh = b * hm + h;
          std::copy(kv.data() + h * dm, kv.data() + (h + 1) * dm,
                    mkeys.data_ptr<T>() + (bh * c_n + slot) * dm);
          std::copy(vv.data() + h * dm, vv.data() + (h + 1) * dm,
                    mvalues.data_ptr<T>() + (bh * c_n + slot) * dm);
          std::copy(g, g + 3, mgates.data_ptr<T>() + (bh * c_n + slot) * 3);
          T* yh = y_mem.data_ptr<T>() + b * dim + h * dm;
          if (!mlp.empty()) {
            mlp_read(qv.data() + h * dm, bh, yh);
            continue;
          }
          // Delta rule: r = theta (a k^T W - v), W = a W - k r^T, y = q^T W.
          const T theta = g[0], a = T(1) - g[2];
          T* w = running.data_ptr<T>() + bh * dm * dm;
          const T* kh = kv.data() + h * dm;
          const T* vh = vv.data() + h * dm;
          const T* qh = qv.data() + h * dm;
          if (grad_sum.defined()) {
            const T* w0h = w0.data_ptr<T>() + bh * dm * dm;
            T* gs = grad_sum.data_ptr<T>() + bh * dm * dm;
            std::fill(rv.begin(), rv.end(), T(0));
            for (int64_t i = 0; i < dm; ++i)
              for (int64_t j = 0; j < dm; ++j) rv[j] += kh[i] * w0h[i * dm + j];
            for (int64_t j = 0; j < dm; ++j) rv[j] -= vh[j];
            for (int64_t i = 0; i < dm; ++i)
              for (int64_t j = 0; j < dm; ++j) gs[i * dm + j] += kh[i] * rv[j];
          }
          std::fill(rv.begin(), rv.end(), T(0));
          for (int64_t i = 0; i < dm; ++i)
            for (int64_t j = 0; j < dm; ++j) rv[j] += kh[i] * w[i * dm + j];
          for (int64_t j = 0; j < dm; ++j) rv[j] = (rv[j] * a - vh[j]) * theta;
          std::fill(yh, yh + dm, T(0));
          for (int64_t i = 0; i < dm; ++i) {
            T* wr = w + i * dm;
            for (int64_t j = 0; j < dm; ++j) {
              wr[j] = wr[j] * a - kh[i] * rv[j];
              yh[j] += qh[i] * wr[j];
            }
          }
        }
      }
    });
    if (memory && mem_out_t.defined()) y_mem = torch::mm(y_mem, mem_out_t);
    return {o, y_mem};
  }

  // y = M(q) for memory row bh: the MLP at its chunk-start weights.
  template <typename T>
  void mlp_read(const T* q, int64_t bh, T* y) {
    std::vector<T> h(q, q + mem_head_dim), z;
    for (size_t l = 0; l < mlp.size(); ++l) {
      const int64_t in = mlp[l].size(1), out = mlp[l].size(2);
      const T* w = mlp[l].data_ptr<T>() + bh * in * out;
      z.assign(out, T(0));
      for (int64_t i = 0; i < in; ++i)
        for (int64_t j = 0; j < out; ++j) z[j] += h[i] * w[i * out + j];
      if (l + 1 < mlp.size()) {
        for (auto& v : z)
          v = mlp_activation == 0 ? T(0.5) * v * (T(1) + std::erf(v * T(M_SQRT1_2))) : silu(v);
      }
      h.swap(z);
    }
    for (int64_t j = 0; j < mem_head_dim; ++j) y[j] = h[j] + (mlp_residual ? q[j] : T(0));
  }

  // The block's tail: memory gate, out-projection, residuals and SwiGLU. x (B, D).
  template <typename T>
  Tensor mix_impl(const Tensor& x, const Tensor& o, const Tensor& y_mem) {
    const T eps_t = static_cast<T>(eps);
    const int64_t b_n = x.size(0), d = x.size(1);
    Tensor gated = scratch(s_gated, b_n, d, x);
    const T* op = o.data_ptr<T>();
    T* gp = gated.data_ptr<T>();
    Tensor x1;
    if (has_memory()) {
      const T* yp = y_mem.data_ptr<T>();
      const T* nw = mem_norm_w.data_ptr<T>();
      for (int64_t b = 0; b < b_n; ++b) {
        const T r = inv_rms(yp + b * d, d, eps_t);
        for (int64_t i = 0; i < d; ++i)
          gp[b * d + i] = op[b * d + i] * sigmoid(yp[b * d + i] * r * nw[i]);
      }
      x1 = scratch(s_x1, b_n, d, x);
      torch::addmm_out(x1, x, gated, out_t);
      if (residual) x1.add_(y_mem);
    } else {
      x1 = scratch(s_x1, b_n, d, x);
      torch::addmm_out(x1, x, o, out_t, 1.0, 0.5);
    }
    const T* xp = x1.data_ptr<T>();
    Tensor xn = scratch(s_xn, b_n, d, x);
    T* np = xn.data_ptr<T>();
    for (int64_t b = 0; b < b_n; ++b) {
      const T r = inv_rms(xp + b * d, d, eps_t);
      for (int64_t i = 0; i < d; ++i) np[b * d + i] = xp[b * d + i] * r;
    }
    const int64_t f = gate_up_t.size(1) / 2;
    Tensor gu = scratch(s_gu, b_n, 2 * f, x);  // (B, 2F)
    torch::mm_out(gu, xn, gate_up_t);
    Tensor hidden = scratch(s_hidden, b_n, f, x);
    const T* up = gu.data_ptr<T>();
    T* hp = hidden.data_ptr<T>();
    for (int64_t b = 0; b < b_n; ++b)
      for (int64_t i = 0; i < f; ++i)
        hp[b * f + i] = silu(up[b * 2 * f + i]) * up[b * 2 * f + f + i];
    // The block's output is the next block's input: a buffer of this layer's, valid
    // until its next step.
    Tensor out = scratch(s_out, b_n, d, x);
    torch::addmm_out(out, x1, hidden, down_t);
    return out;
  }
};

// Next-token logits: RMS-scaled x (its weight folded into head_t) times head_t (D, V).
Tensor logits(const Tensor& x, const Tensor& head_t, double eps) {
  TORCH_CHECK(x.is_contiguous() && x.dim() == 2, "x must be a contiguous (B, D) tensor");
  Tensor xn = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "logits", [&] {
    const int64_t b_n = x.size(0), d = x.size(1);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* np = xn.data_ptr<scalar_t>();
    for (int64_t b = 0; b < b_n; ++b) {
      const scalar_t r = inv_rms(xp + b * d, d, static_cast<scalar_t>(eps));
      for (int64_t i = 0; i < d; ++i) np[b * d + i] = xp[b * d + i] * r;
    }
  });
  return torch::mm(xn, head_t);
}

}  // namespace

void bind_chunk(pybind11::module& m);  // chunk.cpp: one block over a small chunk

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Each call releases the GIL while it computes (its arguments and results are
  // converted with it held): a server's event loop then runs beside the model thread's
  // steps, as it does beside ATen's own ops, instead of waiting for a switch interval.
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("logits", &logits, release());
  pybind11::class_<LayerStep>(m, "LayerStep")
      .def(pybind11::init<>())
      .def_readwrite("proj_t", &LayerStep::proj_t)
      .def_readwrite("proj_bias", &LayerStep::proj_bias)
      .def_readwrite("taps", &LayerStep::taps)
      .def_readwrite("out_t", &LayerStep::out_t)
      .def_readwrite("gate_up_t", &LayerStep::gate_up_t)
      .def_readwrite("down_t", &LayerStep::down_t)
      .def_readwrite("mem_norm_w", &LayerStep::mem_norm_w)
      .def_readwrite("history", &LayerStep::history)
      .def_readwrite("keys", &LayerStep::keys)
      .def_readwrite("values", &LayerStep::values)
      .def_readwrite("raw_keys", &LayerStep::raw_keys)
      .def_readwrite("mask", &LayerStep::mask)
      .def_readwrite("running", &LayerStep::running)
      .def_readwrite("mkeys", &LayerStep::mkeys)
      .def_readwrite("mvalues", &LayerStep::mvalues)
      .def_readwrite("mgates", &LayerStep::mgates)
      .def_readwrite("last_query", &LayerStep::last_query)
      .def_readwrite("query_before", &LayerStep::query_before)
      .def_readwrite("gate_scale", &LayerStep::gate_scale)
      .def_readwrite("mit_mul", &LayerStep::mit_mul)
      .def_readwrite("mit_add", &LayerStep::mit_add)
      .def_readwrite("mem_out_t", &LayerStep::mem_out_t)
      .def_readwrite("w0", &LayerStep::w0)
      .def_readwrite("grad_sum", &LayerStep::grad_sum)
      .def_readwrite("mlp", &LayerStep::mlp)
      .def_readwrite("mlp_activation", &LayerStep::mlp_activation)
      .def_readwrite("mlp_residual", &LayerStep::mlp_residual)
      .def_readwrite("heads", &LayerStep::heads)
      .def_readwrite("head_dim", &LayerStep::head_dim)
      .def_readwrite("mem_heads", &LayerStep::mem_heads)
      .def_readwrite("mem_head_dim", &LayerStep::mem_head_dim)
      .def_readwrite("mem_parts", &LayerStep::mem_parts)
      .def_readwrite("lookahead", &LayerStep::lookahead)
      .def_readwrite("residual", &LayerStep::residual)
      .def_readwrite("eps", &LayerStep::eps)
      .def("attend", &LayerStep::attend, release())
      .def("mix", &LayerStep::mix, release());
  bind_chunk(m);
}
