// Fused pool -> DEVICE page fetches for the CPU: read each encoded row once, in place in
// the pool's arena, and write the decoded page straight into its DEVICE slot. The torch
// path (gather rows into a buffer, decode into another, scatter into the slots) moves
// every byte three times; on a memory-bound CPU that is the difference.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cstring>

namespace {

void check(const torch::Tensor& rows, const torch::Tensor& keys, const torch::Tensor& k_pages,
           const torch::Tensor& v_pages, const torch::Tensor& slots) {
  TORCH_CHECK(rows.dtype() == torch::kUInt8 && rows.dim() == 2 && rows.is_contiguous(),
              "fetch: rows must be a contiguous uint8 [N, W] arena");
  TORCH_CHECK(keys.dtype() == torch::kInt64 && slots.dtype() == torch::kInt64 &&
                  keys.numel() == slots.numel() && keys.is_contiguous() && slots.is_contiguous(),
              "fetch: keys and slots must be contiguous int64 of one length");
  TORCH_CHECK(k_pages.is_contiguous() && v_pages.is_contiguous() &&
                  k_pages.sizes() == v_pages.sizes(),
              "fetch: page pools must be contiguous and alike");
}

}  // namespace

// Codec `none`: row = K page bytes, then V page bytes (the device dtype).
void fetch_raw(torch::Tensor rows, torch::Tensor keys, torch::Tensor k_pages,
               torch::Tensor v_pages, torch::Tensor slots) {
  check(rows, keys, k_pages, v_pages, slots);
  const int64_t page = k_pages[0].numel() * k_pages.element_size();
  const int64_t width = rows.size(1), n = keys.numel();
  TORCH_CHECK(width >= 2 * page, "fetch_raw: rows narrower than a page");
  const uint8_t* src = rows.data_ptr<uint8_t>();
  auto* k = static_cast<uint8_t*>(k_pages.data_ptr());
  auto* v = static_cast<uint8_t*>(v_pages.data_ptr());
  const int64_t* key = keys.data_ptr<int64_t>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint8_t* row = src + key[i] * width;
      std::memcpy(k + slot[i] * page, row, page);
      std::memcpy(v + slot[i] * page, row + page, page);
    }
  });
}

// Codec `int8` into float32 pages: row = K codes [T, H, D], V codes [T, H, D] (int8),
// K scales [H, D] (one per channel), V scales [T, H] (one per token and head), fp16.
void fetch_int8(torch::Tensor rows, torch::Tensor keys, torch::Tensor k_pages,
                torch::Tensor v_pages, torch::Tensor slots) {
  check(rows, keys, k_pages, v_pages, slots);
  TORCH_CHECK(k_pages.dtype() == torch::kFloat32, "fetch_int8: float32 pages only");
  const int64_t T = k_pages.size(1), H = k_pages.size(2), D = k_pages.size(3);
  const int64_t elems = T * H * D, width = rows.size(1), n = keys.numel();
  TORCH_CHECK(width >= 2 * elems + 2 * (H * D + T * H), "fetch_int8: rows too narrow");
  const uint8_t* src = rows.data_ptr<uint8_t>();
  float* k = k_pages.data_ptr<float>();
  float* v = v_pages.data_ptr<float>();
  const int64_t* key = keys.data_ptr<int64_t>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  at::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {
    float ks[4096];
    for (int64_t i = begin; i < end; ++i) {
      const uint8_t* row = src + key[i] * width;
      const auto* kq = reinterpret_cast<const int8_t*>(row);
      const auto* vq = kq + elems;
      const auto* k_scale = reinterpret_cast<const at::Half*>(row + 2 * elems);
      const auto* v_scale = k_scale + H * D;
      float* ko = k + slot[i] * elems;
      float* vo = v + slot[i] * elems;
      const int64_t hd = H * D;
      const bool small = hd <= 4096;
      if (small) {
        for (int64_t c = 0; c < hd; ++c) ks[c] = static_cast<float>(k_scale[c]);
      }
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t c = 0; c < hd; ++c) {
          const float s = small ? ks[c] : static_cast<float>(k_scale[c]);
          ko[t * hd + c] = static_cast<float>(kq[t * hd + c]) * s;
        }
        for (int64_t h = 0; h < H; ++h) {
          const float s = static_cast<float>(v_scale[t * H + h]);
          const int64_t base = t * hd + h * D;
          for (int64_t d = 0; d < D; ++d) vo[base + d] = static_cast<float>(vq[base + d]) * s;
        }
      }
    }
  });
}
