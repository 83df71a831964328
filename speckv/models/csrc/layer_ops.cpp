// The small per-layer ops of the decoder, fused for the CPU (float32): at batch 1 each
// costs more in dispatch than in arithmetic when torch runs it as 5-10 separate ops
// (torch 2.13's CPU rms_norm is pow, mean, add, rsqrt, mul, mul; rotate-half RoPE a
// neg, a cat, two muls and an add).
//
//   rms_norm(x, w, eps)            out = x * rsqrt(mean(x^2) + eps) * w
//   add_rms_norm_(x, d, w, eps)    x += d (the residual, in place), then rms_norm(x)
//   rope_(qkv, cos, sin, pos, n)   rotate-half RoPE in place on heads [0, n) of qkv
//   silu_mul(gate_up)              silu(gate) * up, the MLP's two halves side by side
//
// Rows are independent; they are split across threads only when there are enough
// of them to pay for waking the threads.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>

namespace {

constexpr int64_t kGrainElems = 1 << 15;  // elements per thread before splitting rows

void check_rows(const torch::Tensor& x, const torch::Tensor& w, const char* who) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.stride(1) == 1, who,
              ": x must be float32 [T, hidden] with contiguous rows");
  TORCH_CHECK(w.dtype() == torch::kFloat32 && w.dim() == 1 && w.is_contiguous() &&
                  w.size(0) == x.size(1),
              who, ": weight must be float32 [hidden]");
}

inline void norm_row(const float* x, const float* w, int64_t n, float eps, float* out) {
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) sum += x[i] * x[i];
  const float inv = 1.f / std::sqrt(sum / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * inv * w[i];
}

int64_t grain_rows(int64_t hidden) { return std::max<int64_t>(1, kGrainElems / hidden); }

}  // namespace

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  check_rows(x, weight, "rms_norm");
  const int64_t T = x.size(0), n = x.size(1), ld = x.stride(0);
  auto out = torch::empty({T, n}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, grain_rows(n), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      norm_row(xp + t * ld, wp, n, static_cast<float>(eps), op + t * n);
  });
  return out;
}

torch::Tensor add_rms_norm_(torch::Tensor x, torch::Tensor delta, torch::Tensor weight,
                            double eps) {
  check_rows(x, weight, "add_rms_norm_");
  TORCH_CHECK(x.is_contiguous() && delta.dtype() == torch::kFloat32 && delta.dim() == 2 &&
                  delta.sizes() == x.sizes() && delta.stride(1) == 1,
              "add_rms_norm_: x must be contiguous and delta float32 of its shape");
  const int64_t T = x.size(0), n = x.size(1), ld = delta.stride(0);
  auto out = torch::empty({T, n}, x.options());
  float* xp = x.data_ptr<float>();
  const float* dp = delta.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, grain_rows(n), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float* row = xp + t * n;
      const float* d = dp + t * ld;
      for (int64_t i = 0; i < n; ++i) row[i] += d[i];
      norm_row(row, wp, n, static_cast<float>(eps), op + t * n);
    }
  });
  return out;
}

// qkv: float32 [T, heads, D] (rows contiguous per head); cos, sin: [max_len, D] (each
// frequency twice, the rotate-half layout); positions: int64 [T]. Heads [0, n) are
// rotated in place: x[i] <- x[i] c - x[i + D/2] s, x[i + D/2] <- x[i + D/2] c + x[i] s.
void rope_(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor positions,
           int64_t n) {
  TORCH_CHECK(qkv.dtype() == torch::kFloat32 && qkv.dim() == 3 && qkv.stride(2) == 1,
              "rope_: qkv must be float32 [T, heads, D] with contiguous heads");
  const int64_t T = qkv.size(0), D = qkv.size(2), half = D / 2;
  TORCH_CHECK(n >= 0 && n <= qkv.size(1) && D % 2 == 0, "rope_: bad head count or head dim");
  TORCH_CHECK(cos.dtype() == torch::kFloat32 && cos.is_contiguous() && cos.dim() == 2 &&
                  cos.size(1) == D && sin.sizes() == cos.sizes() && sin.is_contiguous(),
              "rope_: cos and sin must be contiguous float32 [max_len, D]");
  TORCH_CHECK(positions.dtype() == torch::kInt64 && positions.numel() == T,
              "rope_: positions must be int64 [T]");
  positions = positions.contiguous();
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(pos[t] >= 0 && pos[t] < cos.size(0), "rope_: position ", pos[t],
                " outside the tables");
  float* base = qkv.data_ptr<float>();
  const int64_t st = qkv.stride(0), sh = qkv.stride(1);
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  at::parallel_for(0, T, grain_rows(n * D), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cp + pos[t] * D;
      const float* s = sp + pos[t] * D;
      for (int64_t h = 0; h < n; ++h) {
        float* x = base + t * st + h * sh;
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = x[i], x2 = x[i + half];
          x[i] = x1 * c[i] - x2 * s[i];
          x[i + half] = x2 * c[i + half] + x1 * s[i + half];
        }
      }
    }
  });
}

// gate_up: float32 [T, 2 I] (gate, then up, as the fused projection writes them)
// -> [T, I] = silu(gate) * up, one pass (torch: a chunk, a silu and a mul).
torch::Tensor silu_mul(torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.dtype() == torch::kFloat32 && gate_up.dim() == 2 &&
                  gate_up.stride(1) == 1 && gate_up.size(1) % 2 == 0,
              "silu_mul: gate_up must be float32 [T, 2 * intermediate] with contiguous rows");
  const int64_t T = gate_up.size(0), n = gate_up.size(1) / 2, ld = gate_up.stride(0);
  auto out = torch::empty({T, n}, gate_up.options());
  const float* gp = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, grain_rows(2 * n), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* g = gp + t * ld;
      const float* u = g + n;
      float* o = op + t * n;
      for (int64_t i = 0; i < n; ++i) o[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
    }
  });
  return out;
}
