// Pool rows as the CPU kernels read them: one encoded page per row of a uint8 arena.
//
// A page entry of a block table names where a page lives:
//
//     entry >= 0        a DEVICE slot: float32 [T, H, D] K and V pages
//     entry <  0        pool row -entry - 1 of the arena, in the codec's format
//
// The decoders below are the codecs' `decode` written out element by element (same
// operations in the same order, so the same float32 results, bit for bit: int8 is
// one product, kivi one product then one sum, never contracted into an FMA). The
// attention kernels decode a pool page into a small per-thread scratch (L1/L2) and
// read it from there; the fetch kernel decodes straight into a DEVICE slot.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <cstring>
#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace speckv {

// Row formats; the numbers are part of the Python API (`speckv.kv.cpu_kernels.FORMATS`).
enum RowFormat : int64_t { kRaw = 0, kInt8 = 1, kKivi4 = 2 };

struct PageGeometry {
  int64_t T, H, D;  // tokens, KV heads, head dim
  int64_t elems() const { return T * H * D; }
};

struct PoolRows {
  const uint8_t* base = nullptr;  // arena [N, width]; null when there is no pool
  int64_t width = 0;
  int64_t format = kRaw;
  const uint8_t* row(int64_t entry) const { return base + (-entry - 1) * width; }
};

// The pool arena a kernel reads coded rows from: uint8 [N, W], or an empty tensor (no
// pool: `base` stays null).
inline PoolRows pool_rows(const torch::Tensor& arena, int64_t format, const char* who) {
  PoolRows pool;
  if (arena.numel() == 0) return pool;
  TORCH_CHECK(arena.dtype() == torch::kUInt8 && arena.dim() == 2 && arena.is_contiguous(),
              who, ": the pool arena must be a contiguous uint8 [N, W] tensor");
  TORCH_CHECK(format >= kRaw && format <= kKivi4, who, ": unknown row format");
  pool.base = arena.data_ptr<uint8_t>();
  pool.width = arena.size(1);
  pool.format = format;
  return pool;
}

inline float half_to_float(const at::Half& h) { return static_cast<float>(h); }

// dst[i] = float(src[i]) for i < n (exact). With F16C, eight at a time in hardware:
// at::Half's portable conversion costs more than the rest of a page's decode.
inline void halves_to_floats(const at::Half* src, int64_t n, float* dst) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(
                                  reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < n; ++i) dst[i] = half_to_float(src[i]);
}

// int8 row: K codes [T, H, D], V codes [T, H, D], K scales fp16 [H, D], V scales fp16 [T, H].
inline void decode_int8(const uint8_t* row, const PageGeometry& g, int64_t h0, int64_t h1,
                        float* k, float* v) {
  const int64_t hd = g.H * g.D, elems = g.elems();
  const auto* kq = reinterpret_cast<const int8_t*>(row);
  const auto* vq = kq + elems;
  const auto* k_scale = reinterpret_cast<const at::Half*>(row + 2 * elems);
  const auto* v_scale = k_scale + hd;
  // the page's scales, converted once: K [heads, D], V [T, H]
  float ks[1024], vs[1024];
  const int64_t n = (h1 - h0) * g.D;
  const bool small = n <= 1024 && g.T * g.H <= 1024;
  if (small) {
    halves_to_floats(k_scale + h0 * g.D, n, ks);
    halves_to_floats(v_scale, g.T * g.H, vs);
  }
  for (int64_t t = 0; t < g.T; ++t) {
    const int64_t base = t * hd + h0 * g.D;
    if (small) {
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) k[base + c] = static_cast<float>(kq[base + c]) * ks[c];
    } else {
      for (int64_t c = 0; c < n; ++c)
        k[base + c] = static_cast<float>(kq[base + c]) * half_to_float(k_scale[h0 * g.D + c]);
    }
    for (int64_t h = h0; h < h1; ++h) {
      const float s = small ? vs[t * g.H + h] : half_to_float(v_scale[t * g.H + h]);
      const int64_t b = t * hd + h * g.D;
#pragma omp simd
      for (int64_t d = 0; d < g.D; ++d) v[b + d] = static_cast<float>(vq[b + d]) * s;
    }
  }
}

// kivi4 row: K codes packed two per byte (element 2j in the low nibble) [T*H*D/2], V codes
// likewise, then fp16 K scale [H, D], K zero [H, D], V scale [T, H], V zero [T, H].
// x = code * scale, then + zero: two roundings, as the torch decode (mul_, then add_).
// The sum is a second pass over what the first stored, so it cannot become an FMA.
inline void decode_kivi4(const uint8_t* row, const PageGeometry& g, int64_t h0, int64_t h1,
                         float* k, float* v) {
  const int64_t hd = g.H * g.D, elems = g.elems(), packed = elems / 2;
  const uint8_t* kp = row;
  const uint8_t* vp = row + packed;
  const auto* k_scale = reinterpret_cast<const at::Half*>(row + 2 * packed);
  const auto* k_zero = k_scale + hd;
  const auto* v_scale = k_zero + hd;
  const auto* v_zero = v_scale + g.T * g.H;
  float ks[1024], kz[1024], vs[1024], vz[1024];
  const int64_t n = (h1 - h0) * g.D;  // D is even: a head's codes start on a byte
  const bool small = n <= 1024 && g.T * g.H <= 1024;
  if (small) {
    halves_to_floats(k_scale + h0 * g.D, n, ks);
    halves_to_floats(k_zero + h0 * g.D, n, kz);
    halves_to_floats(v_scale, g.T * g.H, vs);
    halves_to_floats(v_zero, g.T * g.H, vz);
  }
  for (int64_t t = 0; t < g.T; ++t) {
    const int64_t base = t * hd + h0 * g.D;
    for (int64_t c = 0; c < n; c += 2) {
      const uint8_t kb = kp[(base + c) >> 1], vb = vp[(base + c) >> 1];
      k[base + c] = static_cast<float>(kb & 15);
      k[base + c + 1] = static_cast<float>(kb >> 4);
      v[base + c] = static_cast<float>(vb & 15);
      v[base + c + 1] = static_cast<float>(vb >> 4);
    }
    if (small) {
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) k[base + c] *= ks[c];
    } else {
      for (int64_t c = 0; c < n; ++c) k[base + c] *= half_to_float(k_scale[h0 * g.D + c]);
    }
    for (int64_t h = h0; h < h1; ++h) {
      const float s = small ? vs[t * g.H + h] : half_to_float(v_scale[t * g.H + h]);
      const int64_t b = t * hd + h * g.D;
#pragma omp simd
      for (int64_t d = 0; d < g.D; ++d) v[b + d] *= s;
    }
  }
  // the zero points, in a pass of their own (see above)
  for (int64_t t = 0; t < g.T; ++t) {
    const int64_t base = t * hd + h0 * g.D;
    if (small) {
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) k[base + c] += kz[c];
    } else {
      for (int64_t c = 0; c < n; ++c) k[base + c] += half_to_float(k_zero[h0 * g.D + c]);
    }
    for (int64_t h = h0; h < h1; ++h) {
      const float z = small ? vz[t * g.H + h] : half_to_float(v_zero[t * g.H + h]);
      const int64_t b = t * hd + h * g.D;
#pragma omp simd
      for (int64_t d = 0; d < g.D; ++d) v[b + d] += z;
    }
  }
}

// The float32 K and V pages of `entry` (a DEVICE slot, or a raw pool row), read as
// they lie; false for a coded row, which must be decoded first (`read_page`).
inline bool float_page(int64_t entry, const float* k_pages, const float* v_pages,
                       const PoolRows& pool, const PageGeometry& g, const float** k,
                       const float** v) {
  if (entry >= 0) {
    *k = k_pages + entry * g.elems();
    *v = v_pages + entry * g.elems();
    return true;
  }
  if (pool.format != kRaw) return false;
  *k = reinterpret_cast<const float*>(pool.row(entry));
  *v = *k + g.elems();
  return true;
}

// Software prefetch of what `read_page` will read of coded row `entry` for some of its
// KV heads [h0, h1): their codes of each token (K and V) and the row's scales. (A task
// that reads every head prefetches the whole row, written out in `attend`.)
inline void prefetch_coded_heads(const PoolRows& pool, int64_t entry, const PageGeometry& g,
                                 int64_t h0, int64_t h1) {
  const uint8_t* row = pool.row(entry);
  const int64_t bits = pool.format == kInt8 ? 8 : 4;  // per code (kivi4: two a byte)
  const int64_t codes = g.elems() * bits / 8;          // bytes of K codes, = of V codes
  const int64_t span = (h1 - h0) * g.D * bits / 8;     // one token's codes of these heads
  for (int64_t t = 0; t < g.T; ++t) {
    const uint8_t* k = row + (t * g.H + h0) * g.D * bits / 8;
    for (int64_t off = 0; off < span; off += 64) {
      __builtin_prefetch(k + off);
      __builtin_prefetch(k + codes + off);
    }
    __builtin_prefetch(k + span - 1);
    __builtin_prefetch(k + codes + span - 1);
  }
  for (int64_t off = 2 * codes; off < pool.width; off += 64) __builtin_prefetch(row + off);
}

// The K and V pages of `entry` for KV heads [h0, h1): pointers into DEVICE or into a
// raw pool row (no copy), or into `scratch_k` / `scratch_v` ([T, H, D] floats each),
// where a coded row is decoded.
inline void read_page(int64_t entry, const float* k_pages, const float* v_pages,
                      const PoolRows& pool, const PageGeometry& g, int64_t h0, int64_t h1,
                      float* scratch_k, float* scratch_v, const float** k, const float** v) {
  if (float_page(entry, k_pages, v_pages, pool, g, k, v)) return;  // read as it lies
  const uint8_t* row = pool.row(entry);
  switch (pool.format) {
    case kInt8:
      decode_int8(row, g, h0, h1, scratch_k, scratch_v);
      break;
    default:
      decode_kivi4(row, g, h0, h1, scratch_k, scratch_v);
      break;
  }
  *k = scratch_k;
  *v = scratch_v;
}

}  // namespace speckv
