// Decode attention read in place from the page pool (CPU, float32).
//
// The PyTorch path gathers each sequence's pages into a contiguous tensor and then
// runs SDPA: K and V cross memory three times (read, write, read). Decode is
// memory-bound, so this kernel reads every listed page once, where it lies, with an
// online softmax per page (flash-decoding style). A task is a whole sequence (its
// pages stream front to back once) or, when there are too few sequences to keep
// every thread busy, one KV head of one; the G query heads of a KV head share each
// K/V row while it is in L1.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// A finite "minus infinity": the kernel is built with -ffast-math (vectorized expf),
// under which true infinities are not allowed.
constexpr float kNegBig = -1e30f;

// One task: the query rows of KV heads [h0, h1) of one sequence (G rows per KV head)
// against the first `ctx` tokens of its listed pages. Pages are read front to back,
// all the task's heads together, so each page streams from memory once. kDim > 0
// fixes the head dim at compile time (full unrolling).
template <int64_t kDim>
void attend(const float* qb, const float* kp, const float* vp, const int64_t* pages,
            int64_t ctx, int64_t h0, int64_t h1, int64_t page_size, int64_t page_stride,
            int64_t token_stride, int64_t G, int64_t dim, float scale, float* ob, float* acc,
            float* scores, float* running_max, float* running_sum) {
  const int64_t D = kDim > 0 ? kDim : dim;
  const int64_t rows = (h1 - h0) * G;  // query rows, row r = (h - h0) * G + g
  std::fill(acc, acc + rows * D, 0.f);
  std::fill(running_max, running_max + rows, kNegBig);
  std::fill(running_sum, running_sum + rows, 0.f);
  for (int64_t p = 0; p * page_size < ctx; ++p) {
    const int64_t ntok = std::min(page_size, ctx - p * page_size);
    const float* kpage = kp + pages[p] * page_stride;
    const float* vpage = vp + pages[p] * page_stride;
    if ((p + 1) * page_size < ctx) {  // pages lie anywhere: prefetch the next one's rows
      const float* knext = kp + pages[p + 1] * page_stride + h0 * D;
      const float* vnext = vp + pages[p + 1] * page_stride + h0 * D;
      for (int64_t t = 0; t < page_size; ++t) {
        for (int64_t off = 0; off < (h1 - h0) * D; off += 16) {
          __builtin_prefetch(knext + t * token_stride + off);
          __builtin_prefetch(vnext + t * token_stride + off);
        }
      }
    }
    // scores[r * page_size + t] = q_r . k_t * scale
    for (int64_t t = 0; t < ntok; ++t) {
      for (int64_t h = h0; h < h1; ++h) {
        const float* kr = kpage + t * token_stride + h * D;
        for (int64_t g = 0; g < G; ++g) {
          const int64_t r = (h - h0) * G + g;
          const float* qr = qb + r * D;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < D; ++d) dot += qr[d] * kr[d];
          scores[r * page_size + t] = dot * scale;
        }
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      float* sr = scores + r * page_size;
      float page_max = kNegBig;
      for (int64_t t = 0; t < ntok; ++t) page_max = std::max(page_max, sr[t]);
      const float new_max = std::max(running_max[r], page_max);
      const float correction = std::exp(running_max[r] - new_max);
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t t = 0; t < ntok; ++t) {
        sr[t] = std::exp(sr[t] - new_max);
        sum += sr[t];
      }
      running_sum[r] = running_sum[r] * correction + sum;
      running_max[r] = new_max;
      float* ar = acc + r * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) ar[d] *= correction;
    }
    for (int64_t t = 0; t < ntok; ++t) {
      for (int64_t h = h0; h < h1; ++h) {
        const float* vr = vpage + t * token_stride + h * D;
        for (int64_t g = 0; g < G; ++g) {
          const int64_t r = (h - h0) * G + g;
          const float w = scores[r * page_size + t];
          float* ar = acc + r * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) ar[d] += w * vr[d];
        }
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = running_sum[r] > 0.f ? 1.f / running_sum[r] : 0.f;
    for (int64_t d = 0; d < D; ++d) ob[r * D + d] = acc[r * D + d] * inv;
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

  // Whole sequences per task when there are enough of them to share out (each page
  // then streams once); one KV head per task otherwise, so that one long sequence
  // still uses every thread.
  const int64_t heads_per_task = B >= 2 * at::get_num_threads() ? Hkv : 1;
  const int64_t tasks_per_seq = Hkv / heads_per_task;
  at::parallel_for(0, B * tasks_per_seq, 1, [&](int64_t begin, int64_t end) {
    const int64_t rows = heads_per_task * G;
    std::vector<float> acc(rows * D), running_max(rows), running_sum(rows), scores(rows * page_size);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tasks_per_seq;
      const int64_t h0 = (task % tasks_per_seq) * heads_per_task, h1 = h0 + heads_per_task;
      const int64_t ctx = std::min(cl[b], P * page_size);
      const auto run = D == 64 ? attend<64> : D == 128 ? attend<128> : attend<0>;
      run(qp + (b * H + h0 * G) * D, kp, vp, bt + b * P, ctx, h0, h1, page_size, page_stride,
          token_stride, G, D, fscale, op + (b * H + h0 * G) * D, acc.data(), scores.data(),
          running_max.data(), running_sum.data());
    }
  });
  return out;
}

// Sparse decode attention: every KV head reads its own pages (a selection).
// q: [B, H, D]; head_tables: [B, Hkv, K] (int64) page ids per sequence and KV head, in
// token order; selected_lens: [B] (int64): row b, head h attends the first
// selected_lens[b] tokens of the concatenation of head_tables[b, h] (only the last
// listed page may be partial). One task per (sequence, KV head), through the same
// `attend` as the dense kernel, so a selection of every page gives identical numbers.
torch::Tensor sparse_decode_attention(torch::Tensor q, torch::Tensor k_pages,
                                      torch::Tensor v_pages, torch::Tensor head_tables,
                                      torch::Tensor selected_lens, double scale) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && k_pages.dtype() == torch::kFloat32 &&
                  v_pages.dtype() == torch::kFloat32,
              "sparse_decode_attention: float32 only");
  TORCH_CHECK(head_tables.dtype() == torch::kInt64 && selected_lens.dtype() == torch::kInt64,
              "sparse_decode_attention: int64 head_tables and selected_lens");
  TORCH_CHECK(k_pages.is_contiguous() && v_pages.is_contiguous(),
              "sparse_decode_attention: page pools must be contiguous");
  q = q.contiguous();
  head_tables = head_tables.contiguous();
  selected_lens = selected_lens.contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t page_size = k_pages.size(1), Hkv = k_pages.size(2);
  const int64_t G = H / Hkv, K = head_tables.size(2);
  TORCH_CHECK(H % Hkv == 0 && k_pages.size(3) == D && head_tables.size(1) == Hkv,
              "sparse_decode_attention: bad shapes");
  auto out = torch::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_pages.data_ptr<float>();
  const float* vp = v_pages.data_ptr<float>();
  const int64_t* ht = head_tables.data_ptr<int64_t>();
  const int64_t* sl = selected_lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const int64_t page_stride = page_size * Hkv * D, token_stride = Hkv * D;
  const float fscale = static_cast<float>(scale);
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(G * D), running_max(G), running_sum(G), scores(G * page_size);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, h = task % Hkv;
      const int64_t ctx = std::min(sl[b], K * page_size);
      const auto run = D == 64 ? attend<64> : D == 128 ? attend<128> : attend<0>;
      run(qp + (b * H + h * G) * D, kp, vp, ht + task * K, ctx, h, h + 1, page_size,
          page_stride, token_stride, G, D, fscale, op + (b * H + h * G) * D, acc.data(),
          scores.data(), running_max.data(), running_sum.data());
    }
  });
  return out;
}

}  // namespace

// page_fetch.cpp
void fetch_raw(torch::Tensor rows, torch::Tensor keys, torch::Tensor k_pages,
               torch::Tensor v_pages, torch::Tensor slots);
void fetch_int8(torch::Tensor rows, torch::Tensor keys, torch::Tensor k_pages,
                torch::Tensor v_pages, torch::Tensor slots);

// The GIL is released inside every kernel: the prefetch worker's fetches and the
// server's HTTP thread run while the model's thread computes.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("paged_decode_attention", &paged_decode_attention,
        "decode attention read in place from KV pages (CPU, float32)", release());
  m.def("sparse_decode_attention", &sparse_decode_attention,
        "decode attention over per-KV-head page selections, read in place (CPU, float32)",
        release());
  m.def("fetch_raw", &fetch_raw, "pool rows (codec none) -> DEVICE page slots, one copy",
        release());
  m.def("fetch_int8", &fetch_int8, "pool rows (codec int8) -> float32 DEVICE page slots",
        release());
}
