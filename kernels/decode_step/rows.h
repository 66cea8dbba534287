// Row helpers shared by step.cpp and chunk.cpp (header-only, inlined per file).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace memsvc_rows {
// Internal linkage: a helper with external linkage in a shared library may be
// interposed, so the compiler calls it through the PLT instead of inlining it
// (perf showed `dot` called that way, once per attention score).
namespace {

template <typename T>
T inv_rms(const T* x, int64_t n, T eps) {
  // 1 / sqrt(||x||^2 / n + eps), norm first as torch.linalg.vector_norm gives it.
  double sq = 0.0;
  for (int64_t i = 0; i < n; ++i) sq += static_cast<double>(x[i]) * x[i];
  const T norm = static_cast<T>(std::sqrt(sq));
  return T(1) / std::sqrt(norm * norm / static_cast<T>(n) + eps);
}

template <typename T>
T sigmoid(T x) { return T(1) / (T(1) + std::exp(-x)); }
template <typename T>
T silu(T x) { return x / (T(1) + std::exp(-x)); }

// A dot product in 8 independent partial sums (vectorized; a single running sum is one
// add's latency per element, which made the attention scores most of the step).
template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t e = 0;
  for (; e + 8 <= n; e += 8)
    for (int k = 0; k < 8; ++k) acc[k] += a[e + k] * b[e + k];
  T s = 0;
  for (; e < n; ++e) s += a[e] * b[e];
  for (int k = 0; k < 8; ++k) s += acc[k];
  return s;
}

template <typename T>
void normalize(T* x, int64_t n) {  // x / max(||x||, 1e-12)
  double sq = 0.0;
  for (int64_t i = 0; i < n; ++i) sq += static_cast<double>(x[i]) * x[i];
  const T norm = std::max(static_cast<T>(std::sqrt(sq)), static_cast<T>(1e-12));
  for (int64_t i = 0; i < n; ++i) x[i] /= norm;
}

}  // namespace
}  // namespace memsvc_rows
