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
#include <atomic>
#include <cmath>
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

// One task: the query rows of KV heads [h0, h1) of one sequence (G rows per KV head)
// against the first `ctx` tokens of its listed pages. Pages are read front to back,
// all the task's heads together, so each page streams from memory once, wherever it
// lies (`read_page`: a DEVICE slot, or a pool row decoded into the task's scratch
// as it is read). kDim > 0 fixes the head dim at compile time (full unrolling).
template <int64_t kDim>
void attend(const float* qb, const float* kp, const float* vp, const speckv::PoolRows& pool,
            const int64_t* pages, int64_t ctx, int64_t h0, int64_t h1,
            const speckv::PageGeometry& geo, int64_t G, float scale, float* ob,
            TaskBuffers& buf) {
  float* acc = buf.acc.data();
  float* scores = buf.scores.data();
  float* running_max = buf.running_max.data();
  float* running_sum = buf.running_sum.data();
  const int64_t D = kDim > 0 ? kDim : geo.D;
  const int64_t page_size = geo.T, token_stride = geo.H * geo.D;
  const int64_t rows = (h1 - h0) * G;  // query rows, row r = (h - h0) * G + g
  std::fill(acc, acc + rows * D, 0.f);
  std::fill(running_max, running_max + rows, kNegBig);
  std::fill(running_sum, running_sum + rows, 0.f);
  for (int64_t p = 0; p * page_size < ctx; ++p) {
    const int64_t ntok = std::min(page_size, ctx - p * page_size);
    if ((p + 1) * page_size < ctx && g_software_prefetch.load(std::memory_order_relaxed))
      // pages lie anywhere: prefetch the next one's rows
      speckv::prefetch_page(pages[p + 1], kp, vp, pool, geo, h0, h1);
    const float* kpage;
    const float* vpage;
    speckv::read_page(pages[p], kp, vp, pool, geo, h0, h1, buf.scratch_k(), buf.scratch_v(),
                      &kpage, &vpage);
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
// concatenation of its listed pages. Returns [B, H, D].
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_pages,
                                     torch::Tensor v_pages, torch::Tensor block_table,
                                     torch::Tensor context_lens, double scale,
                                     torch::Tensor arena, int64_t format) {
  check_pages(q, k_pages, v_pages, block_table, context_lens, "paged_decode_attention");
  const auto pool = speckv::pool_rows(arena, format, "paged_decode_attention");
  q = q.contiguous();
  block_table = block_table.contiguous();
  context_lens = context_lens.contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const speckv::PageGeometry geo{k_pages.size(1), k_pages.size(2), D};
  const int64_t Hkv = geo.H, G = H / Hkv, P = block_table.size(1);
  TORCH_CHECK(H % Hkv == 0 && k_pages.size(3) == D, "paged_decode_attention: bad shapes");

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
      run(qp + (b * H + h0 * G) * D, kp, vp, pool, bt + b * P, ctx, h0, h1, geo, G, fscale,
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
      run(qp + (b * H + h * G) * D, kp, vp, pool, ht + task * K, ctx, h, h + 1, geo, G, fscale,
          op + (b * H + h * G) * D, buf);
    }
  });
  return out;
}

// Quest scores of the candidate pages [first, own) of one sequence and KV head: the
// upper bound of q.k over a page from its key bounds, sum_d max(q_d min_d, q_d max_d) =
// q- . min + q+ . max, maxed over the G query heads of the group.
void quest_scores(const float* qh, const float* summaries, const int64_t* summary_ids,
                  int64_t first, int64_t own, int64_t h, int64_t Hkv, int64_t G, int64_t D,
                  float* scores) {
  for (int64_t p = first; p < own; ++p) {
    const float* lo = summaries + (summary_ids[p] * Hkv + h) * 2 * D;
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

// The pages one sequence and KV head reads under quest: the open page, the sink page
// (keep_sink) and the `budget - forced` best-scored candidates (ties: the older page),
// in token order, written as page entries into `listed`; returns how many. `chosen`
// [P] is set where a page is selected.
int64_t quest_choose(const float* qh, const float* summaries, const int64_t* summary_ids,
                     const int64_t* entries, int64_t ctx, int64_t budget, bool keep_sink,
                     int64_t page_size, int64_t h, int64_t Hkv, int64_t G, int64_t D,
                     float* scores, int64_t* order, int64_t* listed, bool* chosen) {
  const int64_t own = (ctx - 1) / page_size;
  const bool sink = keep_sink && own > 0;
  const int64_t first = sink ? 1 : 0;  // candidates [first, own)
  const int64_t extra = std::max<int64_t>(0, budget - (sink ? 2 : 1));
  std::fill(chosen, chosen + own + 1, false);
  chosen[own] = true;
  if (sink) chosen[0] = true;
  if (extra >= own - first) {
    std::fill(chosen + first, chosen + own, true);
  } else if (extra > 0) {
    quest_scores(qh, summaries, summary_ids, first, own, h, Hkv, G, D, scores);
    int64_t n = 0;
    for (int64_t p = first; p < own; ++p) order[n++] = p;
    std::partial_sort(order, order + extra, order + n, [scores](int64_t a, int64_t b) {
      return scores[a] > scores[b] || (scores[a] == scores[b] && a < b);
    });
    for (int64_t i = 0; i < extra; ++i) chosen[order[i]] = true;
  }
  int64_t count = 0;
  for (int64_t p = 0; p <= own; ++p)
    if (chosen[p]) listed[count++] = entries[p];
  return count;
}

// Fused quest decode attention (TinyServe's fused kernel): per sequence and KV head,
// page scoring from the key bounds, top-k under the page budget and attention over
// the chosen pages (each read where it lies) in one pass, with no per-layer tensors
// in between. q: [B, H, D]; summaries: [S, Hkv, 2, D] key min | max; summary_table,
// block_table: [B, P] (int64) summary slots and page entries; context_lens,
// page_budget: [B] (int64). Returns [out [B, H, D], selected [B, Hkv, P] bool].
std::vector<torch::Tensor> quest_decode_attention(
    torch::Tensor q, torch::Tensor k_pages, torch::Tensor v_pages, torch::Tensor summaries,
    torch::Tensor summary_table, torch::Tensor block_table, torch::Tensor context_lens,
    torch::Tensor page_budget, bool keep_sink, double scale, torch::Tensor arena,
    int64_t format) {
  check_pages(q, k_pages, v_pages, block_table, context_lens, "quest_decode_attention");
  TORCH_CHECK(summaries.dtype() == torch::kFloat32 && summaries.is_contiguous() &&
                  summary_table.dtype() == torch::kInt64 && page_budget.dtype() == torch::kInt64,
              "quest_decode_attention: float32 summaries, int64 tables and budgets");
  const auto pool = speckv::pool_rows(arena, format, "quest_decode_attention");
  q = q.contiguous();
  block_table = block_table.contiguous();
  summary_table = summary_table.contiguous();
  context_lens = context_lens.contiguous();
  page_budget = page_budget.contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const speckv::PageGeometry geo{k_pages.size(1), k_pages.size(2), D};
  const int64_t Hkv = geo.H, G = H / Hkv, P = block_table.size(1);
  TORCH_CHECK(H % Hkv == 0 && k_pages.size(3) == D && summaries.size(1) == Hkv &&
                  summaries.size(3) == D && summary_table.sizes() == block_table.sizes(),
              "quest_decode_attention: bad shapes");
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
    std::vector<float> page_scores(P);
    std::vector<int64_t> order(P), listed(P);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, h = task % Hkv;
      const int64_t ctx = std::min(cl[b], P * geo.T);
      const float* qh = qp + (b * H + h * G) * D;
      const int64_t count = quest_choose(qh, sp, st + b * P, bt + b * P, ctx, pb[b], keep_sink,
                                         geo.T, h, Hkv, G, D, page_scores.data(), order.data(),
                                         listed.data(), chosen_all + task * P);
      const int64_t own = (ctx - 1) / geo.T;
      const int64_t selected_len = (count - 1) * geo.T + (ctx - own * geo.T);
      run(qh, kp, vp, pool, listed.data(), selected_len, h, h + 1, geo, G, fscale,
          op + (b * H + h * G) * D, buf);
    }
  });
  return {out, selected};
}

}  // namespace

// page_fetch.cpp
void fetch_pages(torch::Tensor arena, int64_t format, torch::Tensor keys, torch::Tensor k_pages,
                 torch::Tensor v_pages, torch::Tensor slots);
std::vector<torch::Tensor> gather_pages(torch::Tensor k_pages, torch::Tensor v_pages,
                                        torch::Tensor arena, int64_t format,
                                        torch::Tensor entries);

// The GIL is released inside every kernel: the prefetch worker's fetches and the
// server's HTTP thread run while the model's thread computes.
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
  m.def("fetch_pages", &fetch_pages, "pool rows -> decoded float32 DEVICE page slots, one pass",
        release());
  m.def("gather_pages", &gather_pages,
        "page entries (DEVICE slots or pool rows) -> contiguous decoded K and V pages",
        release());
}
