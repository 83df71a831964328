// Pool rows -> decoded pages for the CPU, read in place in the pool's arena.
//
// `fetch_pages` decodes rows straight into DEVICE slots (the copy path: a page that
// comes back into fast memory). `gather_pages` decodes a list of page entries (DEVICE
// slots or pool rows, as the attention kernels take them) into fresh contiguous
// pages: what prefill chunks and key-reading selectors attend when pages stay in the
// pool. Both use pool_rows.h's decoders, so every path reads the same values.
// `prefetch_rows` only brings rows into the CPU's caches: the prefetcher's hints when
// attention reads them in place.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

#include "pool_rows.h"

namespace {

void check_page_pools(const torch::Tensor& k_pages, const torch::Tensor& v_pages,
                      const char* who) {
  TORCH_CHECK(k_pages.dtype() == torch::kFloat32 && k_pages.is_contiguous() &&
                  v_pages.is_contiguous() && k_pages.sizes() == v_pages.sizes(),
              who, ": page pools must be contiguous float32 and alike");
}

// Decodes the page of `entry` (all heads) into k, v ([T, H, D] floats each).
void decode_into(int64_t entry, const float* k_pages, const float* v_pages,
                 const speckv::PoolRows& pool, const speckv::PageGeometry& g, float* k, float* v) {
  const int64_t bytes = g.elems() * sizeof(float);
  const float* ks;
  const float* vs;
  speckv::read_page(entry, k_pages, v_pages, pool, g, 0, g.H, k, v, &ks, &vs);
  if (ks != k) std::memcpy(k, ks, bytes);  // a DEVICE page or a raw row: copied as it is
  if (vs != v) std::memcpy(v, vs, bytes);
}

}  // namespace

// arena: uint8 [N, W] rows in `format`; keys, slots: int64 [n]: row keys[i] is decoded into
// DEVICE slot slots[i] of k_pages / v_pages ([S, T, H, D] float32).
void fetch_pages(torch::Tensor arena, int64_t format, torch::Tensor keys, torch::Tensor k_pages,
                 torch::Tensor v_pages, torch::Tensor slots) {
  const auto pool = speckv::pool_rows(arena, format, "fetch_pages");
  TORCH_CHECK(pool.base != nullptr, "fetch_pages: no pool rows to fetch from");
  check_page_pools(k_pages, v_pages, "fetch_pages");
  TORCH_CHECK(keys.dtype() == torch::kInt64 && slots.dtype() == torch::kInt64 &&
                  keys.numel() == slots.numel() && keys.is_contiguous() && slots.is_contiguous(),
              "fetch_pages: keys and slots must be contiguous int64 of one length");
  const speckv::PageGeometry g{k_pages.size(1), k_pages.size(2), k_pages.size(3)};
  if (keys.numel() > 0) {  // every key names a row, every slot a page, that exists
    TORCH_CHECK(keys.min().item<int64_t>() >= 0 && keys.max().item<int64_t>() < arena.size(0),
                "fetch_pages: key out of range");
    TORCH_CHECK(slots.min().item<int64_t>() >= 0 && slots.max().item<int64_t>() < k_pages.size(0),
                "fetch_pages: slot out of range");
  }
  float* k = k_pages.data_ptr<float>();
  float* v = v_pages.data_ptr<float>();
  const int64_t* key = keys.data_ptr<int64_t>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  at::parallel_for(0, keys.numel(), 8, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      decode_into(-key[i] - 1, k, v, pool, g, k + slot[i] * g.elems(), v + slot[i] * g.elems());
  });
}

// entries: int64 [n] page entries (see pool_rows.h) -> [k, v], each float32 [n, T, H, D].
std::vector<torch::Tensor> gather_pages(torch::Tensor k_pages, torch::Tensor v_pages,
                                        torch::Tensor arena, int64_t format,
                                        torch::Tensor entries) {
  TORCH_CHECK(entries.dtype() == torch::kInt64 && entries.dim() == 1,
              "gather_pages: entries must be int64 [n]");
  entries = entries.contiguous();
  const auto pool = speckv::pool_rows(arena, format, "gather_pages");
  const bool has_pool = pool.base != nullptr;
  check_page_pools(k_pages, v_pages, "gather_pages");
  const speckv::PageGeometry g{k_pages.size(1), k_pages.size(2), k_pages.size(3)};
  const int64_t n = entries.numel();
  if (n > 0) {  // every entry names a slot or a row that exists
    TORCH_CHECK(entries.max().item<int64_t>() < k_pages.size(0), "gather_pages: slot out of range");
    TORCH_CHECK(entries.min().item<int64_t>() >= (has_pool ? -arena.size(0) : 0),
                "gather_pages: pool row out of range");
  }
  auto k_out = torch::empty({n, g.T, g.H, g.D}, k_pages.options());
  auto v_out = torch::empty({n, g.T, g.H, g.D}, k_pages.options());
  const float* kp = k_pages.data_ptr<float>();
  const float* vp = v_pages.data_ptr<float>();
  const int64_t* e = entries.data_ptr<int64_t>();
  float* ko = k_out.data_ptr<float>();
  float* vo = v_out.data_ptr<float>();
  at::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      decode_into(e[i], kp, vp, pool, g, ko + i * g.elems(), vo + i * g.elems());
  });
  return {k_out, v_out};
}

// arena: uint8 [N, W]; rows: int64 [n]: software prefetch of every line of those rows
// (the prefetcher's hints when attention reads rows in place: nothing is copied, the
// rows come into the CPU's caches ahead of the kernel that reads them).
void prefetch_rows(torch::Tensor arena, torch::Tensor rows) {
  TORCH_CHECK(arena.dtype() == torch::kUInt8 && arena.dim() == 2 && arena.is_contiguous(),
              "prefetch_rows: the pool arena must be a contiguous uint8 [N, W] tensor");
  TORCH_CHECK(rows.dtype() == torch::kInt64 && rows.dim() == 1,
              "prefetch_rows: rows must be int64 [n]");
  rows = rows.contiguous();
  const int64_t n = rows.numel(), width = arena.size(1);
  if (n == 0) return;
  TORCH_CHECK(rows.min().item<int64_t>() >= 0 && rows.max().item<int64_t>() < arena.size(0),
              "prefetch_rows: row out of range");
  const uint8_t* base = arena.data_ptr<uint8_t>();
  const int64_t* r = rows.data_ptr<int64_t>();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint8_t* row = base + r[i] * width;
      for (int64_t off = 0; off < width; off += 64) __builtin_prefetch(row + off);
      __builtin_prefetch(row + width - 1);
    }
  });
}
