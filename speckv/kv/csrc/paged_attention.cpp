// Decode attention reading every page where it lies (CPU, float32).
//
// The PyTorch path gathers each sequence's pages into a contiguous tensor and then
// runs SDPA: K and V cross memory three times (read, write, read). Decode is
// memory-bound, so this kernel reads every listed page once, where it lies -- a
// DEVICE slot, or a row of the pool's arena in its codec's format, decoded into a
// per-thread scratch as it streams (the CPU analogue of CXL-SpecKV's decompression
// engine beside memory) -- with an online softmax per page (flash-decoding style). A task is a whole sequence (its
// pages stream front to back once) or, when there are too few sequences to keep
// every thread busy, one KV head of one; the G query heads of a KV head share each
// K/V row while it is in L1.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "pool_rows.h"

#include <algorithm>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

// Whether `attend` prefetches the next listed page while it reads the current one
// (`set_software_prefetch`; on by default; off only to measure what it buys).
std::atomic<bool> g_software_prefetch{true};

// A finite "minus infinity": the kernel is built with -ffast-math (vectorized expf),
// under which true infinities are not allowed.
constexpr float kNegBig = -1e30f;

// What one thread's `attend` calls work in: the online-softmax state of `rows` query
// rows, a page of scores for each, and, when pool rows are read, a K and a V page to
// decode a coded row into.
struct TaskBuffers {
  TaskBuffers(int64_t rows, int64_t D, const speckv::PageGeometry& geo, bool decodes)
      : acc(rows * D), running_max(rows), running_sum(rows), scores(rows * geo.T),
        scratch(decodes ? 2 * geo.elems() : 0), elems(geo.elems()) {}
  float* scratch_k() { return scratch.data(); }
  float* scratch_v() { return scratch.data() + elems; }

  std::vector<float> acc, running_max, running_sum, scores, scratch;
  int64_t elems;
};


// The score and value loops of one page for `attend`:
//
//     page_scores   scores[r * T + t] = (q_r . k_t) * scale, t < ntok
//     page_values   acc[r] += sum_t scores[r * T + t] * v_t
//
// Both places a page can lie (a DEVICE slot, a pool row decoded into the scratch) go
// through the same code, so both give the same numbers bit for bit. With AVX-512 and
// a head dim that is a multiple of 16, the scores of 16 tokens come out of one
// transposing sum (`sum_lanes_16`) instead of one horizontal sum per token, and each
// query row's accumulator stays in registers across a page's tokens. Measured against
// the previous loops, with this file's next-page prefetch (`benchmarks/kernels_f7.py
// --kv-bound`, BENCHMARKS.md F7): a step's attention at 8 x 4,096 tokens 1.41x faster on
// float32 pages, 1.38x on int8 rows; fused quest at 1/8 of 8 x 8,192 tokens 2.5x.

template <int64_t kDim>
inline void page_scores_generic(const float* qb, const float* kpage, int64_t ntok, int64_t h0,
                                int64_t h1, const speckv::PageGeometry& geo, int64_t G,
                                float scale, float* scores) {
  const int64_t D = kDim > 0 ? kDim : geo.D, T = geo.T, token_stride = geo.H * geo.D;
  for (int64_t t = 0; t < ntok; ++t) {
    for (int64_t h = h0; h < h1; ++h) {
      const float* kr = kpage + t * token_stride + h * D;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t r = (h - h0) * G + g;
        const float* qr = qb + r * D;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) dot += qr[d] * kr[d];
        scores[r * T + t] = dot * scale;
      }
    }
  }
}

template <int64_t kDim>
inline void page_values_generic(const float* vpage, const float* scores, int64_t ntok,
                                int64_t h0, int64_t h1, const speckv::PageGeometry& geo,
                                int64_t G, float* acc) {
  const int64_t D = kDim > 0 ? kDim : geo.D, T = geo.T, token_stride = geo.H * geo.D;
  for (int64_t t = 0; t < ntok; ++t) {
    for (int64_t h = h0; h < h1; ++h) {
      const float* vr = vpage + t * token_stride + h * D;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t r = (h - h0) * G + g;
        const float w = scores[r * T + t];
        float* ar = acc + r * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) ar[d] += w * vr[d];
      }
    }
  }
}

#if defined(__AVX512F__)
// Lane t of the result is the sum of the 16 lanes of v[t]: a transposing tree of
// permutes and adds (15 of each), instead of one horizontal sum per token.
inline __m512 sum_lanes_16(__m512* v) {
  // level w (8, 4, 2, 1): lane i takes lane (i / w) * 2w + i % w of the pair (lo) and
  // the one w further (hi), so each sum halves the lanes per source vector
  alignas(64) static const int32_t kIndex[4][2][16] = {
      {{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
       {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31}},
      {{0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27},
       {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31}},
      {{0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29},
       {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31}},
      {{0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30},
       {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31}}};
  int level = 0;
  for (int w = 8; w >= 1; w /= 2, ++level) {
    const __m512i lo = _mm512_load_si512(kIndex[level][0]);
    const __m512i hi = _mm512_load_si512(kIndex[level][1]);
    for (int i = 0; i < w; ++i)
      v[i] = _mm512_add_ps(_mm512_permutex2var_ps(v[2 * i], lo, v[2 * i + 1]),
                           _mm512_permutex2var_ps(v[2 * i], hi, v[2 * i + 1]));
  }
  return v[0];
}

template <int64_t kDim>
inline void page_scores_avx512(const float* qb, const float* kpage, int64_t ntok, int64_t h0,
                               int64_t h1, const speckv::PageGeometry& geo, int64_t G,
                               float scale, float* scores) {
  constexpr int64_t NV = kDim / 16;
  const int64_t T = geo.T, token_stride = geo.H * kDim;
  const __m512 vscale = _mm512_set1_ps(scale);
  __m512 part[16];
  for (int64_t t0 = 0; t0 < ntok; t0 += 16) {
    const int64_t n = std::min<int64_t>(16, ntok - t0);
    for (int64_t h = h0; h < h1; ++h) {
      for (int64_t g = 0; g < G; ++g) {
        const int64_t r = (h - h0) * G + g;
        const float* qr = qb + r * kDim;
        __m512 q[NV];
        for (int64_t c = 0; c < NV; ++c) q[c] = _mm512_loadu_ps(qr + 16 * c);
        for (int64_t t = 0; t < 16; ++t) {
          if (t >= n) {
            part[t] = _mm512_setzero_ps();
            continue;
          }
          const float* kr = kpage + (t0 + t) * token_stride + h * kDim;
          __m512 s = _mm512_mul_ps(q[0], _mm512_loadu_ps(kr));
          for (int64_t c = 1; c < NV; ++c) s = _mm512_fmadd_ps(q[c], _mm512_loadu_ps(kr + 16 * c), s);
          part[t] = s;
        }
        const __m512 sums = _mm512_mul_ps(sum_lanes_16(part), vscale);
        _mm512_mask_storeu_ps(scores + r * T + t0, (__mmask16)((1u << n) - 1), sums);
      }
    }
  }
}

template <int64_t kDim>
inline void page_values_avx512(const float* vpage, const float* scores, int64_t ntok,
                               int64_t h0, int64_t h1, const speckv::PageGeometry& geo,
                               int64_t G, float* acc) {
  constexpr int64_t NV = kDim / 16;
  const int64_t T = geo.T, token_stride = geo.H * kDim;
  for (int64_t h = h0; h < h1; ++h) {
    for (int64_t g = 0; g < G; ++g) {
      const int64_t r = (h - h0) * G + g;
      float* ar = acc + r * kDim;
      __m512 a[NV];
      for (int64_t c = 0; c < NV; ++c) a[c] = _mm512_loadu_ps(ar + 16 * c);
      for (int64_t t = 0; t < ntok; ++t) {
        const __m512 w = _mm512_set1_ps(scores[r * T + t]);
        const float* vr = vpage + t * token_stride + h * kDim;
        for (int64_t c = 0; c < NV; ++c) a[c] = _mm512_fmadd_ps(w, _mm512_loadu_ps(vr + 16 * c), a[c]);
      }
      for (int64_t c = 0; c < NV; ++c) _mm512_storeu_ps(ar + 16 * c, a[c]);
    }
  }
}
#elif defined(__AVX2__) && defined(__FMA__)
// The same loops in 256-bit registers (CPUs without AVX-512): 8 tokens' scores from one
// transposing sum, a query row's accumulator in registers across a page's tokens.

// Lane t of the result is the sum of the 8 lanes of v[t].
inline __m256 sum_lanes_8(const __m256* v) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  // a: tokens 0-3's sums of lanes 0-3, then of lanes 4-7; b: tokens 4-7's
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

template <int64_t kDim>
inline void page_scores_avx2(const float* qb, const float* kpage, int64_t ntok, int64_t h0,
                             int64_t h1, const speckv::PageGeometry& geo, int64_t G,
                             float scale, float* scores) {
  constexpr int64_t NV = kDim / 8;
  const int64_t T = geo.T, token_stride = geo.H * kDim;
  const __m256 vscale = _mm256_set1_ps(scale);
  __m256 part[8];
  for (int64_t t0 = 0; t0 < ntok; t0 += 8) {
    const int64_t n = std::min<int64_t>(8, ntok - t0);
    for (int64_t h = h0; h < h1; ++h) {
      for (int64_t g = 0; g < G; ++g) {
        const int64_t r = (h - h0) * G + g;
        const float* qr = qb + r * kDim;
        __m256 q[NV];
        for (int64_t c = 0; c < NV; ++c) q[c] = _mm256_loadu_ps(qr + 8 * c);
        for (int64_t t = 0; t < 8; ++t) {
          if (t >= n) {
            part[t] = _mm256_setzero_ps();
            continue;
          }
          const float* kr = kpage + (t0 + t) * token_stride + h * kDim;
          __m256 s = _mm256_mul_ps(q[0], _mm256_loadu_ps(kr));
          for (int64_t c = 1; c < NV; ++c) s = _mm256_fmadd_ps(q[c], _mm256_loadu_ps(kr + 8 * c), s);
          part[t] = s;
        }
        const __m256 sums = _mm256_mul_ps(sum_lanes_8(part), vscale);
        if (n == 8) {
          _mm256_storeu_ps(scores + r * T + t0, sums);
        } else {
          alignas(32) float out[8];
          _mm256_store_ps(out, sums);
          std::memcpy(scores + r * T + t0, out, n * sizeof(float));
        }
      }
    }
  }
}

template <int64_t kDim>
inline void page_values_avx2(const float* vpage, const float* scores, int64_t ntok,
                             int64_t h0, int64_t h1, const speckv::PageGeometry& geo,
                             int64_t G, float* acc) {
  constexpr int64_t NV = kDim / 8;
  const int64_t T = geo.T, token_stride = geo.H * kDim;
  for (int64_t h = h0; h < h1; ++h) {
    for (int64_t g = 0; g < G; ++g) {
      const int64_t r = (h - h0) * G + g;
      float* ar = acc + r * kDim;
      __m256 a[NV];
      for (int64_t c = 0; c < NV; ++c) a[c] = _mm256_loadu_ps(ar + 8 * c);
      for (int64_t t = 0; t < ntok; ++t) {
        const __m256 w = _mm256_set1_ps(scores[r * T + t]);
        const float* vr = vpage + t * token_stride + h * kDim;
        for (int64_t c = 0; c < NV; ++c) a[c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(vr + 8 * c), a[c]);
      }
      for (int64_t c = 0; c < NV; ++c) _mm256_storeu_ps(ar + 8 * c, a[c]);
    }
  }
}
#endif

template <int64_t kDim>
inline void page_scores(const float* qb, const float* kpage, int64_t ntok, int64_t h0,
                        int64_t h1, const speckv::PageGeometry& geo, int64_t G, float scale,
                        float* scores) {
#if defined(__AVX512F__)
  if constexpr (kDim > 0 && kDim % 16 == 0) {
    page_scores_avx512<kDim>(qb, kpage, ntok, h0, h1, geo, G, scale, scores);
    return;
  }
#elif defined(__AVX2__) && defined(__FMA__)
  if constexpr (kDim > 0 && kDim % 8 == 0) {
    page_scores_avx2<kDim>(qb, kpage, ntok, h0, h1, geo, G, scale, scores);
    return;
  }
#endif
  page_scores_generic<kDim>(qb, kpage, ntok, h0, h1, geo, G, scale, scores);
}

template <int64_t kDim>
inline void page_values(const float* vpage, const float* scores, int64_t ntok, int64_t h0,
                        int64_t h1, const speckv::PageGeometry& geo, int64_t G, float* acc) {
#if defined(__AVX512F__)
  if constexpr (kDim > 0 && kDim % 16 == 0) {
    page_values_avx512<kDim>(vpage, scores, ntok, h0, h1, geo, G, acc);
    return;
  }
#elif defined(__AVX2__) && defined(__FMA__)
  if constexpr (kDim > 0 && kDim % 8 == 0) {
    page_values_avx2<kDim>(vpage, scores, ntok, h0, h1, geo, G, acc);
    return;
  }
#endif
  page_values_generic<kDim>(vpage, scores, ntok, h0, h1, geo, G, acc);
}

// One task: the query rows of KV heads [h0, h1) of one sequence (G rows per KV head)
// against tokens [first, ctx) of its listed pages (`first` > 0: a sliding window; the
// pages before it are never read). Pages are read front to back,
// all the task's heads together, so each page streams from memory once, wherever it
// lies (`read_page`: a DEVICE slot, or a pool row decoded into the task's scratch
// as it is read). kDim > 0 fixes the head dim at compile time (full unrolling).
template <int64_t kDim>
void attend(const float* qb, const float* kp, const float* vp, const speckv::PoolRows& pool,
            const int64_t* pages, int64_t first, int64_t ctx, int64_t h0, int64_t h1,
            const speckv::PageGeometry& geo, int64_t G, float scale, float* ob,
            TaskBuffers& buf) {
  float* acc = buf.acc.data();
  float* scores = buf.scores.data();
  float* running_max = buf.running_max.data();
  float* running_sum = buf.running_sum.data();
  const int64_t D = kDim > 0 ? kDim : geo.D;
  const int64_t page_size = geo.T, token_stride = geo.H * D;
  const int64_t rows = (h1 - h0) * G;  // query rows, row r = (h - h0) * G + g
  std::fill(acc, acc + rows * D, 0.f);
  std::fill(running_max, running_max + rows, kNegBig);
  std::fill(running_sum, running_sum + rows, 0.f);
  const bool prefetch = g_software_prefetch.load(std::memory_order_relaxed);
  for (int64_t p = first / page_size; p * page_size < ctx; ++p) {
    const int64_t ntok = std::min(page_size, ctx - p * page_size);
    const int64_t skip = std::max<int64_t>(0, first - p * page_size);  // tokens before `first`
    const float* knext;
    const float* vnext;
    if (prefetch && (p + 1) * page_size < ctx) {
      // pages lie anywhere: the next one's rows of these heads, while this one is read
      if (speckv::float_page(pages[p + 1], kp, vp, pool, geo, &knext, &vnext)) {
        // written out here, head dim known at compile time: measured 15-25% faster
        // decode at 32 x 576 tokens than the same prefetches behind a call
        for (int64_t t = 0; t < page_size; ++t)
          for (int64_t off = 0; off < (h1 - h0) * D; off += 16) {
            __builtin_prefetch(knext + t * token_stride + h0 * D + off);
            __builtin_prefetch(vnext + t * token_stride + h0 * D + off);
          }
      } else if (h0 == 0 && h1 == geo.H) {
        // a coded row read whole: one run of bytes. Measured on an AMD EPYC (Zen 5):
        // int8 rows at 8 x 4,096 tokens 1.2-1.35x faster (the same loop behind a call
        // in pool_rows.h: no gain); on the Xeon of F7's first passes it gained nothing
        const uint8_t* row = pool.row(pages[p + 1]);
        for (int64_t off = 0; off < pool.width; off += 64) __builtin_prefetch(row + off);
      } else {
        speckv::prefetch_coded_heads(pool, pages[p + 1], geo, h0, h1);
      }
    }
    const float* kpage;
    const float* vpage;
    speckv::read_page(pages[p], kp, vp, pool, geo, h0, h1, buf.scratch_k(), buf.scratch_v(),
                      &kpage, &vpage);
    // scores[r * page_size + t] = q_r . k_t * scale
    page_scores<kDim>(qb, kpage, ntok, h0, h1, geo, G, scale, scores);
    for (int64_t r = 0; r < rows; ++r) {
      float* sr = scores + r * page_size;
      float page_max = kNegBig;
      for (int64_t t = skip; t < ntok; ++t) page_max = std::max(page_max, sr[t]);
      const float new_max = std::max(running_max[r], page_max);
      const float correction = std::exp(running_max[r] - new_max);
      float sum = 0.f;
      std::fill(sr, sr + skip, 0.f);  // weight 0 in page_values
#pragma omp simd reduction(+ : sum)
      for (int64_t t = skip; t < ntok; ++t) {
        sr[t] = std::exp(sr[t] - new_max);
        sum += sr[t];
      }
      running_sum[r] = running_sum[r] * correction + sum;
      running_max[r] = new_max;
      float* ar = acc + r * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) ar[d] *= correction;
    }
    page_values<kDim>(vpage, scores, ntok, h0, h1, geo, G, acc);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = running_sum[r] > 0.f ? 1.f / running_sum[r] : 0.f;
    for (int64_t d = 0; d < D; ++d) ob[r * D + d] = acc[r * D + d] * inv;
  }
}

void check_pages(const torch::Tensor& q, const torch::Tensor& k_pages,
                 const torch::Tensor& v_pages, const torch::Tensor& table,
                 const torch::Tensor& lens, const char* who) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && k_pages.dtype() == torch::kFloat32 &&
                  v_pages.dtype() == torch::kFloat32,
              who, ": float32 only");
  TORCH_CHECK(table.dtype() == torch::kInt64 && lens.dtype() == torch::kInt64, who,
              ": int64 page tables and lengths");
  TORCH_CHECK(k_pages.is_contiguous() && v_pages.is_contiguous(), who,
              ": page pools must be contiguous");
}

using Attend = decltype(&attend<0>);

Attend attend_for(int64_t D) { return D == 64 ? attend<64> : D == 128 ? attend<128> : attend<0>; }

// q: [B, H, D]; k_pages, v_pages: [N, page_size, Hkv, D]; block_table: [B, P] (int64)
// page entries (a DEVICE slot, or -1 - row of `arena` in `format`; see pool_rows.h);
// context_lens: [B] (int64): row b attends the first context_lens[b] tokens of the
// concatenation of its listed pages, or with window > 0 only the last `window` of them
// (a sliding window: pages wholly before it are never read). Returns [B, H, D].
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_pages,
                                     torch::Tensor v_pages, torch::Tensor block_table,
                                     torch::Tensor context_lens, double scale,
                                     torch::Tensor arena, int64_t format, int64_t window) {
  check_pages(q, k_pages, v_pages, block_table, context_lens, "paged_decode_attention");
  const auto pool = speckv::pool_rows(arena, format, "paged_decode_attention");
  q = q.contiguous();
  block_table = block_table.contiguous();
  context_lens = context_lens.contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const speckv::PageGeometry geo{k_pages.size(1), k_pages.size(2), D};
  const int64_t Hkv = geo.H, G = H / Hkv, P = block_table.size(1);
  TORCH_CHECK(H % Hkv == 0 && k_pages.size(3) == D, "paged_decode_attention: bad shapes");
  TORCH_CHECK(window >= 0, "paged_decode_attention: window must be >= 0 (0: none)");

  auto out = torch::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_pages.data_ptr<float>();
  const float* vp = v_pages.data_ptr<float>();
  const int64_t* bt = block_table.data_ptr<int64_t>();
  const int64_t* cl = context_lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  const Attend run = attend_for(D);

  // Whole sequences per task when there are enough of them to share out (each page
  // then streams once); one KV head per task otherwise, so that one long sequence
  // still uses every thread.
  const int64_t heads_per_task = B >= 2 * at::get_num_threads() ? Hkv : 1;
  const int64_t tasks_per_seq = Hkv / heads_per_task;
  at::parallel_for(0, B * tasks_per_seq, 1, [&](int64_t begin, int64_t end) {
    TaskBuffers buf(heads_per_task * G, D, geo, pool.base != nullptr);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tasks_per_seq;
      const int64_t h0 = (task % tasks_per_seq) * heads_per_task, h1 = h0 + heads_per_task;
      const int64_t ctx = std::min(cl[b], P * geo.T);
      const int64_t first = window > 0 ? std::max<int64_t>(0, cl[b] - window) : 0;
      run(qp + (b * H + h0 * G) * D, kp, vp, pool, bt + b * P, first, ctx, h0, h1, geo, G,
          fscale,
          op + (b * H + h0 * G) * D, buf);
    }
  });
  return out;
}

// Sparse decode attention: every KV head reads its own pages (a selection).
// q: [B, H, D]; head_tables: [B, Hkv, K] (int64) page entries per sequence and KV head,
// in token order; selected_lens: [B] (int64): row b, head h attends the first
// selected_lens[b] tokens of the concatenation of head_tables[b, h] (only the last
// listed page may be partial). One task per (sequence, KV head), through the same
// `attend` as the dense kernel, so a selection of every page gives identical numbers.
torch::Tensor sparse_decode_attention(torch::Tensor q, torch::Tensor k_pages,
                                      torch::Tensor v_pages, torch::Tensor head_tables,
                                      torch::Tensor selected_lens, double scale,
                                      torch::Tensor arena, int64_t format) {
  check_pages(q, k_pages, v_pages, head_tables, selected_lens, "sparse_decode_attention");
  const auto pool = speckv::pool_rows(arena, format, "sparse_decode_attention");
  q = q.contiguous();
  head_tables = head_tables.contiguous();
  selected_lens = selected_lens.contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const speckv::PageGeometry geo{k_pages.size(1), k_pages.size(2), D};
  const int64_t Hkv = geo.H, G = H / Hkv, K = head_tables.size(2);
  TORCH_CHECK(H % Hkv == 0 && k_pages.size(3) == D && head_tables.size(1) == Hkv,
              "sparse_decode_attention: bad shapes");
  auto out = torch::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_pages.data_ptr<float>();
  const float* vp = v_pages.data_ptr<float>();
  const int64_t* ht = head_tables.data_ptr<int64_t>();
  const int64_t* sl = selected_lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  const Attend run = attend_for(D);
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    TaskBuffers buf(G, D, geo, pool.base != nullptr);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, h = task % Hkv;
      const int64_t ctx = std::min(sl[b], K * geo.T);
      run(qp + (b * H + h * G) * D, kp, vp, pool, ht + task * K, 0, ctx, h, h + 1, geo, G,
          fscale,
          op + (b * H + h * G) * D, buf);
    }
  });
  return out;
}

// Quest scores of the candidate pages [first, own) of one sequence and KV head: the
// upper bound of q.k over a page from its key bounds, sum_d max(q_d min_d, q_d max_d) =
// q- . min + q+ . max, maxed over the G query heads of the group. Summaries lie by
// summary slot, anywhere: each page's are prefetched a few pages ahead (measured: the
// scoring pass at 8k x 8 took half the time with it).
constexpr int64_t kSummaryPrefetch = 4;

// A page's summary row of `row` floats for KV head h (summaries: [slots, Hkv, row]),
// and its software prefetch (pages past `own` are not candidates: nothing fetched).
inline const float* summary_row(const float* summaries, const int64_t* summary_ids, int64_t p,
                                int64_t h, int64_t Hkv, int64_t row) {
  return summaries + (summary_ids[p] * Hkv + h) * row;
}

inline void prefetch_summary(const float* summaries, const int64_t* summary_ids, int64_t p,
                             int64_t own, int64_t h, int64_t Hkv, int64_t row) {
  if (p >= own) return;
  const float* next = summary_row(summaries, summary_ids, p, h, Hkv, row);
  for (int64_t off = 0; off < row; off += 16) __builtin_prefetch(next + off);
}

template <int64_t kDim>
void quest_scores(const float* qh, const float* summaries, const int64_t* summary_ids,
                  int64_t first, int64_t own, int64_t h, int64_t Hkv, int64_t G, int64_t D_,
                  float* scores) {
  const int64_t D = kDim > 0 ? kDim : D_;
  for (int64_t p = first; p < std::min(own, first + kSummaryPrefetch); ++p)
    prefetch_summary(summaries, summary_ids, p, own, h, Hkv, 2 * D);
#if defined(__AVX512F__)
  if constexpr (kDim > 0 && kDim % 16 == 0) {
    // sixteen pages at a time: one partial vector per page, summed by `sum_lanes_16`
    constexpr int64_t NV = kDim / 16;
    __m512 part[16];
    for (int64_t p0 = first; p0 < own; p0 += 16) {
      const int64_t n = std::min<int64_t>(16, own - p0);
      __m512 best = _mm512_set1_ps(kNegBig);
      for (int64_t g = 0; g < G; ++g) {
        __m512 qneg[NV], qpos[NV];
        for (int64_t c = 0; c < NV; ++c) {
          const __m512 x = _mm512_loadu_ps(qh + g * kDim + 16 * c);
          qneg[c] = _mm512_min_ps(x, _mm512_setzero_ps());
          qpos[c] = _mm512_max_ps(x, _mm512_setzero_ps());
        }
        for (int64_t i = 0; i < 16; ++i) {
          if (i >= n) {
            part[i] = _mm512_setzero_ps();
            continue;
          }
          if (g == 0)
            prefetch_summary(summaries, summary_ids, p0 + i + kSummaryPrefetch, own, h, Hkv,
                             2 * D);
          const float* lo = summary_row(summaries, summary_ids, p0 + i, h, Hkv, 2 * D);
          __m512 s = _mm512_setzero_ps();
          for (int64_t c = 0; c < NV; ++c) {
            s = _mm512_fmadd_ps(qneg[c], _mm512_loadu_ps(lo + 16 * c), s);
            s = _mm512_fmadd_ps(qpos[c], _mm512_loadu_ps(lo + kDim + 16 * c), s);
          }
          part[i] = s;
        }
        best = _mm512_max_ps(best, sum_lanes_16(part));
      }
      _mm512_mask_storeu_ps(scores + p0, (__mmask16)((1u << n) - 1), best);
    }
    return;
  }
#endif
  for (int64_t p = first; p < own; ++p) {
    prefetch_summary(summaries, summary_ids, p + kSummaryPrefetch, own, h, Hkv, 2 * D);
    const float* lo = summary_row(summaries, summary_ids, p, h, Hkv, 2 * D);
    const float* hi = lo + D;
    float best = kNegBig;
    for (int64_t g = 0; g < G; ++g) {
      const float* qr = qh + g * D;
      float bound = 0.f;
#pragma omp simd reduction(+ : bound)
      for (int64_t d = 0; d < D; ++d)
        bound += std::min(qr[d], 0.f) * lo[d] + std::max(qr[d], 0.f) * hi[d];
      best = std::max(best, bound);
    }
    scores[p] = best;
  }
}

// The pages one sequence and KV head reads: the open page, the sink page (keep_sink)
// and `budget - forced` candidates of [first, own) that `pick(first, own, extra)` marks
// in `chosen` [P], in token order, written as page entries into `listed`; returns how
// many. Every candidate when the budget covers them.
template <typename Pick>
int64_t choose_and_list(const int64_t* entries, int64_t ctx, int64_t budget, bool keep_sink,
                        int64_t page_size, int64_t* listed, bool* chosen, Pick pick) {
  const int64_t own = (ctx - 1) / page_size;
  const bool sink = keep_sink && own > 0;
  const int64_t first = sink ? 1 : 0;  // candidates [first, own)
  const int64_t extra = std::max<int64_t>(0, budget - (sink ? 2 : 1));
  std::fill(chosen, chosen + own + 1, false);
  chosen[own] = true;
  if (sink) chosen[0] = true;
  if (extra >= own - first)
    std::fill(chosen + first, chosen + own, true);
  else if (extra > 0)
    pick(first, own, extra);
  int64_t count = 0;
  for (int64_t p = 0; p <= own; ++p)
    if (chosen[p]) listed[count++] = entries[p];
  return count;
}

// Marks in `chosen` the `extra` candidates of order[0, n) first under `before` (a strict
// order): a unique set, found in linear time (only the set matters: pages are listed
// in token order).
template <typename Before>
void mark_best(int64_t* order, int64_t n, int64_t extra, bool* chosen, Before before) {
  std::nth_element(order, order + extra - 1, order + n, before);
  for (int64_t i = 0; i < extra; ++i) chosen[order[i]] = true;
}

// Quest's choice: the best-scored candidates (ties: the older page).
template <int64_t kDim>
int64_t quest_choose(const float* qh, const float* summaries, const int64_t* summary_ids,
                     const int64_t* entries, int64_t ctx, int64_t budget, bool keep_sink,
                     int64_t page_size, int64_t h, int64_t Hkv, int64_t G, int64_t D,
                     float* scores, int64_t* order, int64_t* listed, bool* chosen) {
  return choose_and_list(entries, ctx, budget, keep_sink, page_size, listed, chosen,
                         [&](int64_t first, int64_t own, int64_t extra) {
    quest_scores<kDim>(qh, summaries, summary_ids, first, own, h, Hkv, G, D, scores);
    int64_t n = 0;
    for (int64_t p = first; p < own; ++p) order[n++] = p;
    mark_best(order, n, extra, chosen, [scores](int64_t a, int64_t b) {
      return scores[a] > scores[b] || (scores[a] == scores[b] && a < b);
    });
  });
}

// Landmark estimates (the centroid and subpage selectors) of the pages [0, own) of one
// sequence and KV head, per query head g: est[g * P + p] = q_g . c over the S slice
// centroids of page p, their mean (centroid: q . the page's mean key) or their max
// (subpage: the best slice). centroids: [slots, Hkv, S, D].
template <int64_t kDim>
void landmark_estimates(const float* qh, const float* centroids, const int64_t* summary_ids,
                        int64_t own, int64_t h, int64_t Hkv, int64_t S, int64_t G, int64_t D_,
                        bool best_slice, int64_t P, float* est) {
  const int64_t D = kDim > 0 ? kDim : D_;
  const int64_t row = S * D;
  auto prefetch = [&](int64_t p) { prefetch_summary(centroids, summary_ids, p, own, h, Hkv, row); };
  for (int64_t p = 0; p < std::min(own, kSummaryPrefetch); ++p) prefetch(p);
  const float inv = 1.f / static_cast<float>(S);
#if defined(__AVX512F__)
  if constexpr (kDim > 0 && kDim % 16 == 0) {
    // sixteen pages at a time, as `quest_scores`: one partial vector per page and slice,
    // summed by `sum_lanes_16`, reduced over the slices lane-wise
    constexpr int64_t NV = kDim / 16;
    __m512 part[16];
    for (int64_t p0 = 0; p0 < own; p0 += 16) {
      const int64_t n = std::min<int64_t>(16, own - p0);
      for (int64_t i = 0; i < n; ++i) prefetch(p0 + i + kSummaryPrefetch);
      for (int64_t g = 0; g < G; ++g) {
        __m512 qv[NV];
        for (int64_t c = 0; c < NV; ++c) qv[c] = _mm512_loadu_ps(qh + g * kDim + 16 * c);
        __m512 reduced = _mm512_set1_ps(best_slice ? kNegBig : 0.f);
        for (int64_t s = 0; s < S; ++s) {
          for (int64_t i = 0; i < 16; ++i) {
            if (i >= n) {
              part[i] = _mm512_setzero_ps();
              continue;
            }
            const float* cs = summary_row(centroids, summary_ids, p0 + i, h, Hkv, row) + s * kDim;
            __m512 acc = _mm512_mul_ps(qv[0], _mm512_loadu_ps(cs));
            for (int64_t c = 1; c < NV; ++c)
              acc = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(cs + 16 * c), acc);
            part[i] = acc;
          }
          const __m512 dots = sum_lanes_16(part);
          reduced = best_slice ? _mm512_max_ps(reduced, dots) : _mm512_add_ps(reduced, dots);
        }
        if (!best_slice) reduced = _mm512_mul_ps(reduced, _mm512_set1_ps(inv));
        _mm512_mask_storeu_ps(est + g * P + p0, (__mmask16)((1u << n) - 1), reduced);
      }
    }
    return;
  }
#endif
  for (int64_t p = 0; p < own; ++p) {
    prefetch(p + kSummaryPrefetch);
    const float* c = summary_row(centroids, summary_ids, p, h, Hkv, row);
    for (int64_t g = 0; g < G; ++g) {
      const float* qr = qh + g * D;
      float reduced = best_slice ? kNegBig : 0.f;
      for (int64_t s = 0; s < S; ++s) {
        const float* cs = c + s * D;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) dot += qr[d] * cs[d];
        reduced = best_slice ? std::max(reduced, dot) : reduced + dot;
      }
      est[g * P + p] = best_slice ? reduced : reduced * inv;
    }
  }
}

// An estimate and its page as one integer whose ascending order is the estimate's
// descending one, ties to the older page: the float's bits made order-preserving (-0 as
// +0, as the float compare has them equal), complemented, above the page index. Sorting
// these is branch-free and reads no estimate through an index.
inline uint64_t rank_key(float x, int64_t p) {
  if (x == 0.f) x = 0.f;
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);  // ascending with x
  return (static_cast<uint64_t>(~u) << 32) | static_cast<uint64_t>(p);
}

// A landmark selector's choice: the candidates first in union_by_rank's order
// (speckv/selection/base.py): each query head ranks the pages [0, own) by its estimate
// (ties: the older page); a page's key is (its best rank over the group, then its best
// estimate, higher first, then the older page).
//
// Only ranks up to `extra` can be chosen (one head's top extra + 1 hold at least
// `extra` candidates, the sink page being ranked too), so each head finds its top
// extra + 1 by nth_element and sorts just those; the pages no head ranks there are never
// chosen, and the final choice runs over the ranked candidates only (at most
// G * (extra + 1) pages).
template <int64_t kDim>
int64_t landmark_choose(const float* qh, const float* centroids, const int64_t* summary_ids,
                        const int64_t* entries, int64_t ctx, int64_t budget, bool keep_sink,
                        int64_t page_size, int64_t h, int64_t Hkv, int64_t S, int64_t G,
                        int64_t D, bool best_slice, int64_t P, float* est, float* best,
                        int64_t* rank, int64_t* order, uint64_t* keys, int64_t* listed,
                        bool* chosen) {
  return choose_and_list(entries, ctx, budget, keep_sink, page_size, listed, chosen,
                         [&](int64_t first, int64_t own, int64_t extra) {
    landmark_estimates<kDim>(qh, centroids, summary_ids, own, h, Hkv, S, G, D, best_slice, P, est);
    std::fill(rank, rank + own, own);
    const int64_t top = std::min(extra + 1, own);
    int64_t n = 0;  // ranked candidates, in order[0, n)
    for (int64_t g = 0; g < G; ++g) {
      const float* e = est + g * P;
      for (int64_t p = 0; p < own; ++p) keys[p] = rank_key(e[p], p);
      std::nth_element(keys, keys + top - 1, keys + own);
      std::sort(keys, keys + top);
      for (int64_t i = 0; i < top; ++i) {
        const int64_t p = static_cast<int64_t>(keys[i] & 0xffffffffu);
        if (rank[p] == own && p >= first) order[n++] = p;
        rank[p] = std::min(rank[p], i);
      }
    }
    for (int64_t i = 0; i < n; ++i) {
      const int64_t p = order[i];
      float b = est[p];
      for (int64_t g = 1; g < G; ++g) b = std::max(b, est[g * P + p]);
      best[p] = b;
    }
    mark_best(order, n, extra, chosen, [rank, best](int64_t a, int64_t b) {
      if (rank[a] != rank[b]) return rank[a] < rank[b];
      if (best[a] != best[b]) return best[a] > best[b];
      return a < b;
    });
  });
}

// What a fused selector's choice needs per thread (scores, orders, the listed pages).
struct ChooseBuffers {
  explicit ChooseBuffers(int64_t P, int64_t G)
      : scores(P), est(G * P), best(P), rank(P), order(P), listed(P), keys(P) {}
  std::vector<float> scores, est, best;
  std::vector<int64_t> rank, order, listed;
  std::vector<uint64_t> keys;
};

// Fused decode attention (TinyServe's fused kernel): per sequence and KV head, the
// selector's page choice under the page budget (`choose`: from the sequence's summary
// slots, fills buf.listed, marks `chosen`, returns the count) and attention over the
// chosen pages (each read where it lies) in one pass, with no per-layer tensors in
// between. q: [B, H, D]; summaries: [slots, Hkv, R, D] float32 (a selector's rows per
// page and KV head, handed to `choose` with the sequence's slots); summary_table,
// block_table: [B, P] (int64) summary slots and page entries; context_lens, page_budget:
// [B] (int64). Returns [out [B, H, D], selected [B, Hkv, P] bool].
template <typename Choose>
std::vector<torch::Tensor> fused_decode_attention(
    const char* name, torch::Tensor q, const torch::Tensor& k_pages,
    const torch::Tensor& v_pages, const torch::Tensor& summaries, torch::Tensor summary_table,
    torch::Tensor block_table, torch::Tensor context_lens, torch::Tensor page_budget,
    double scale, const torch::Tensor& arena, int64_t format, Choose choose) {
  check_pages(q, k_pages, v_pages, block_table, context_lens, name);
  TORCH_CHECK(summaries.dtype() == torch::kFloat32 && summaries.is_contiguous() &&
                  summaries.dim() == 4 && summary_table.dtype() == torch::kInt64 &&
                  page_budget.dtype() == torch::kInt64,
              name, ": float32 summaries [slots, Hkv, R, D], int64 tables and budgets");
  TORCH_CHECK(summaries.size(1) == k_pages.size(2) && summaries.size(3) == q.size(2) &&
                  summary_table.sizes() == block_table.sizes(),
              name, ": bad shapes");
  const auto pool = speckv::pool_rows(arena, format, name);
  q = q.contiguous();
  block_table = block_table.contiguous();
  summary_table = summary_table.contiguous();
  context_lens = context_lens.contiguous();
  page_budget = page_budget.contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const speckv::PageGeometry geo{k_pages.size(1), k_pages.size(2), D};
  const int64_t Hkv = geo.H, G = H / Hkv, P = block_table.size(1);
  TORCH_CHECK(H % Hkv == 0 && k_pages.size(3) == D, name, ": bad shapes");
  auto out = torch::empty_like(q);
  auto selected = torch::zeros({B, Hkv, P}, q.options().dtype(torch::kBool));
  const float* qp = q.data_ptr<float>();
  const float* kp = k_pages.data_ptr<float>();
  const float* vp = v_pages.data_ptr<float>();
  const float* sp = summaries.data_ptr<float>();
  const int64_t* st = summary_table.data_ptr<int64_t>();
  const int64_t* bt = block_table.data_ptr<int64_t>();
  const int64_t* cl = context_lens.data_ptr<int64_t>();
  const int64_t* pb = page_budget.data_ptr<int64_t>();
  bool* chosen_all = selected.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  const Attend run = attend_for(D);
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    TaskBuffers buf(G, D, geo, pool.base != nullptr);
    ChooseBuffers cb(P, G);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, h = task % Hkv;
      const int64_t ctx = std::min(cl[b], P * geo.T);
      const float* qh = qp + (b * H + h * G) * D;
      const int64_t count = choose(qh, sp, st + b * P, bt + b * P, ctx, pb[b], geo.T, h, Hkv, G,
                                   D, P, cb, chosen_all + task * P);
      const int64_t own = (ctx - 1) / geo.T;
      const int64_t selected_len = (count - 1) * geo.T + (ctx - own * geo.T);
      run(qh, kp, vp, pool, cb.listed.data(), 0, selected_len, h, h + 1, geo, G, fscale,
          op + (b * H + h * G) * D, buf);
    }
  });
  return {out, selected};
}

// Fused quest: summaries [slots, Hkv, 2, D] key min | max.
std::vector<torch::Tensor> quest_decode_attention(
    torch::Tensor q, torch::Tensor k_pages, torch::Tensor v_pages, torch::Tensor summaries,
    torch::Tensor summary_table, torch::Tensor block_table, torch::Tensor context_lens,
    torch::Tensor page_budget, bool keep_sink, double scale, torch::Tensor arena,
    int64_t format) {
  const int64_t D = q.size(2);
  const auto pick = D == 64 ? quest_choose<64> : D == 128 ? quest_choose<128> : quest_choose<0>;
  return fused_decode_attention(
      "quest_decode_attention", q, k_pages, v_pages, summaries, summary_table, block_table,
      context_lens, page_budget, scale, arena, format,
      [&](const float* qh, const float* sp, const int64_t* slots, const int64_t* entries,
          int64_t ctx, int64_t budget, int64_t T, int64_t h, int64_t Hkv, int64_t G, int64_t D_,
          int64_t, ChooseBuffers& cb, bool* chosen) {
        return pick(qh, sp, slots, entries, ctx, budget, keep_sink, T, h, Hkv, G, D_,
                    cb.scores.data(), cb.order.data(), cb.listed.data(), chosen);
      });
}

// Fused landmark selectors (centroid: best_slice false; subpage: true): centroids
// [slots, Hkv, S, D] the slices' mean keys.
std::vector<torch::Tensor> landmark_decode_attention(
    torch::Tensor q, torch::Tensor k_pages, torch::Tensor v_pages, torch::Tensor centroids,
    torch::Tensor summary_table, torch::Tensor block_table, torch::Tensor context_lens,
    torch::Tensor page_budget, bool keep_sink, bool best_slice, double scale,
    torch::Tensor arena, int64_t format) {
  const int64_t S = centroids.dim() == 4 ? centroids.size(2) : 0, dim = q.size(2);
  const auto pick = dim == 64    ? landmark_choose<64>
                    : dim == 128 ? landmark_choose<128>
                                 : landmark_choose<0>;
  return fused_decode_attention(
      "landmark_decode_attention", q, k_pages, v_pages, centroids, summary_table,
      block_table, context_lens, page_budget, scale, arena, format,
      [&](const float* qh, const float* cp, const int64_t* slots, const int64_t* entries,
          int64_t ctx, int64_t budget, int64_t T, int64_t h, int64_t Hkv, int64_t G, int64_t D,
          int64_t P, ChooseBuffers& cb, bool* chosen) {
        return pick(qh, cp, slots, entries, ctx, budget, keep_sink, T, h, Hkv, S, G, D,
                    best_slice, P, cb.est.data(), cb.best.data(), cb.rank.data(),
                    cb.order.data(), cb.keys.data(), cb.listed.data(), chosen);
      });
}

}  // namespace

// page_fetch.cpp
void fetch_pages(torch::Tensor arena, int64_t format, torch::Tensor keys, torch::Tensor k_pages,
                 torch::Tensor v_pages, torch::Tensor slots);
std::vector<torch::Tensor> gather_pages(torch::Tensor k_pages, torch::Tensor v_pages,
                                        torch::Tensor arena, int64_t format,
                                        torch::Tensor entries);
void prefetch_rows(torch::Tensor arena, torch::Tensor rows);

// The GIL is released inside every kernel: the prefetch worker's fetches and the
// server's HTTP thread run while the model's thread computes.
// speckv/models/csrc/quant_matmul.cpp
torch::Tensor quant_matmul(torch::Tensor x, torch::Tensor codes, torch::Tensor scales,
                           int64_t format);
const char* quant_matmul_isa();
torch::Tensor dequantize_rows(torch::Tensor codes, torch::Tensor scales, int64_t format,
                              torch::Tensor rows);
// speckv/models/csrc/layer_ops.cpp
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps);
torch::Tensor add_rms_norm_(torch::Tensor x, torch::Tensor delta, torch::Tensor weight,
                            double eps);
void rope_(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor positions,
           int64_t n);
torch::Tensor silu_mul(torch::Tensor gate_up);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("set_software_prefetch", [](bool on) { g_software_prefetch.store(on); },
        "whether the attention kernels prefetch each next page as they read one (default on)");
  m.def("paged_decode_attention", &paged_decode_attention,
        "decode attention reading each page where it lies: DEVICE, or a pool row decoded "
        "as it streams (CPU, float32)",
        release());
  m.def("sparse_decode_attention", &sparse_decode_attention,
        "decode attention over per-KV-head page selections, each page read where it lies "
        "(CPU, float32)",
        release());
  m.def("quest_decode_attention", &quest_decode_attention,
        "fused quest: page scores from key bounds, top-k under a budget and attention over "
        "the chosen pages, read where they lie (CPU, float32)",
        release());
  m.def("landmark_decode_attention", &landmark_decode_attention,
        "fused centroid / subpage: page estimates from slice mean keys, union_by_rank's "
        "choice under a budget and attention over the chosen pages (CPU, float32)",
        release());
  m.def("fetch_pages", &fetch_pages, "pool rows -> decoded float32 DEVICE page slots, one pass",
        release());
  m.def("gather_pages", &gather_pages,
        "page entries (DEVICE slots or pool rows) -> contiguous decoded K and V pages",
        release());
  m.def("prefetch_rows", &prefetch_rows,
        "software prefetch of pool rows into the CPU's caches (hints for in-place reads)",
        release());
  m.def("quant_matmul", &quant_matmul,
        "x @ W^T with W a GGUF-quantized weight (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K: codes and fp16 "
        "scales), float32 activations (CPU)",
        release());
  m.def("quant_matmul_isa", &quant_matmul_isa,
        "the weight-only matmul's build for this CPU: avx512, avx2 or portable");
  m.def("dequantize_rows", &dequantize_rows,
        "rows of a quantized weight expanded to float32 (empty rows: all of them)", release());
  m.def("rms_norm", &rms_norm, "RMSNorm of float32 rows, one pass", release());
  m.def("add_rms_norm_", &add_rms_norm_,
        "x += delta in place (the residual), then RMSNorm of x (float32)", release());
  m.def("rope_", &rope_, "rotate-half RoPE in place on the first n heads (float32)", release());
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a fused [T, 2I] projection (float32)",
        release());
}
