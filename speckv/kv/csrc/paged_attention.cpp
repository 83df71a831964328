// Decode attention read in place from the page pool (CPU, float32).
//
// The PyTorch path gathers each sequence's pages into a contiguous tensor and then
// runs SDPA: K and V cross memory three times (read, write, read). Decode is
// memory-bound, so this kernel reads every listed page once, where it lies, with an
// online softmax per page (flash-decoding style). One task per (sequence, KV head);
// the G query heads of the group share each K/V row while it is in L1.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// A finite "minus infinity": the kernel is built with -ffast-math (vectorized expf),
// under which true infinities are not allowed.
constexpr float kNegBig = -1e30f;

// One (sequence, KV head) task: G query rows against the first `ctx` tokens of the
// listed pages. kDim > 0 fixes the head dim at compile time (full unrolling).
template <int64_t kDim>
void attend_one(const float* qb, const float* kp, const float* vp, const int64_t* pages,
                int64_t ctx, int64_t page_size, int64_t page_stride, int64_t token_stride,
                int64_t G, int64_t dim, float scale, float* ob, float* acc, float* scores,
                float* running_max, float* running_sum) {
  const int64_t D = kDim > 0 ? kDim : dim;
  std::fill(acc, acc + G * D, 0.f);
  std::fill(running_max, running_max + G, kNegBig);
  std::fill(running_sum, running_sum + G, 0.f);
  for (int64_t p = 0; p * page_size < ctx; ++p) {
    const int64_t ntok = std::min(page_size, ctx - p * page_size);
    const float* kpage = kp + pages[p] * page_stride;
    const float* vpage = vp + pages[p] * page_stride;
    // scores[g * page_size + t] = q_g . k_t * scale
    for (int64_t t = 0; t < ntok; ++t) {
      const float* kr = kpage + t * token_stride;
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = qb + g * D;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) dot += qg[d] * kr[d];
        scores[g * page_size + t] = dot * scale;
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      float* sg = scores + g * page_size;
      float page_max = kNegBig;
      for (int64_t t = 0; t < ntok; ++t) page_max = std::max(page_max, sg[t]);
      const float new_max = std::max(running_max[g], page_max);
      const float correction = std::exp(running_max[g] - new_max);
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t t = 0; t < ntok; ++t) {
        sg[t] = std::exp(sg[t] - new_max);
        sum += sg[t];
      }
      running_sum[g] = running_sum[g] * correction + sum;
      running_max[g] = new_max;
      float* ag = acc + g * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) ag[d] *= correction;
    }
    for (int64_t t = 0; t < ntok; ++t) {
      const float* vr = vpage + t * token_stride;
      for (int64_t g = 0; g < G; ++g) {
        const float w = scores[g * page_size + t];
        float* ag = acc + g * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) ag[d] += w * vr[d];
      }
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    const float inv = running_sum[g] > 0.f ? 1.f / running_sum[g] : 0.f;
    for (int64_t d = 0; d < D; ++d) ob[g * D + d] = acc[g * D + d] * inv;
  }
}

// q: [B, H, D]; k_pages, v_pages: [N, page_size, Hkv, D]; block_table: [B, P] (int64);
// context_lens: [B] (int64): row b attends the first context_lens[b] tokens of the
// concatenation of its listed pages. Returns [B, H, D].
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_pages,
                                     torch::Tensor v_pages, torch::Tensor block_table,
                                     torch::Tensor context_lens, double scale) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && k_pages.dtype() == torch::kFloat32 &&
                  v_pages.dtype() == torch::kFloat32,
              "paged_decode_attention: float32 only");
  TORCH_CHECK(block_table.dtype() == torch::kInt64 && context_lens.dtype() == torch::kInt64,
              "paged_decode_attention: int64 block_table and context_lens");
  q = q.contiguous();
  TORCH_CHECK(k_pages.is_contiguous() && v_pages.is_contiguous(),
              "paged_decode_attention: page pools must be contiguous");
  block_table = block_table.contiguous();
  context_lens = context_lens.contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t page_size = k_pages.size(1), Hkv = k_pages.size(2);
  const int64_t G = H / Hkv, P = block_table.size(1);
  TORCH_CHECK(H % Hkv == 0 && k_pages.size(3) == D, "paged_decode_attention: bad shapes");

  auto out = torch::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_pages.data_ptr<float>();
  const float* vp = v_pages.data_ptr<float>();
  const int64_t* bt = block_table.data_ptr<int64_t>();
  const int64_t* cl = context_lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const int64_t page_stride = page_size * Hkv * D, token_stride = Hkv * D;
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(G * D), running_max(G), running_sum(G), scores(G * page_size);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, h = task % Hkv;
      const int64_t ctx = std::min(cl[b], P * page_size);
      const float* qb = qp + (b * H + h * G) * D;
      float* ob = op + (b * H + h * G) * D;
      const auto run = D == 64 ? attend_one<64> : D == 128 ? attend_one<128> : attend_one<0>;
      run(qb, kp + h * D, vp + h * D, bt + b * P, ctx, page_size, page_stride, token_stride, G,
          D, fscale, ob, acc.data(), scores.data(), running_max.data(), running_sum.data());
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention,
        "decode attention read in place from KV pages (CPU, float32)");
}
