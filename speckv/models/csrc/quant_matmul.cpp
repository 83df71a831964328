// Weight-only matmul over GGUF blocks: y = x @ W^T with W kept as the checkpoint stores it.
//
// A weight is uint8 [N, K / 32 * B]: each of its N rows (output features) is K / 32
// blocks of B bytes in one of ggml's formats, element j of a block being
//
//     Q4_0  (B = 18)  fp16 d, 16 bytes of nibbles     w = (q - 8) * d
//     Q4_1  (B = 20)  fp16 d, fp16 m, 16 nibble bytes w = q * d + m
//     Q8_0  (B = 34)  fp16 d, 32 int8                 w = q * d
//
// where the low nibbles of the 16 bytes are elements 0..15 and the high ones 16..31.
// Activations stay float32, so the numbers multiplied are the checkpoint's weights
// (the dequantized value, as gguf-py computes it, up to the last bit of an FMA).
//
// Small T (decode): each thread takes groups of 4 rows, expands a block of each into
// registers once and multiplies it into up to 4 tokens at a time; for more than 4
// tokens the group's rows are expanded once into a per-thread float scratch first
// (L1/L2), so a weight is decoded once per step whatever the batch. Large T (prefill):
// the weight is expanded to float32 and multiplied by torch's GEMM, which is blocked
// for caches far better than a hand loop; the expansion costs a few percent there.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

// The numbers are part of the Python API (`speckv.models.quant.FORMATS`).
enum WeightFormat : int64_t { kQ4_0 = 0, kQ4_1 = 1, kQ8_0 = 2 };
constexpr int64_t kBlock = 32;        // elements per block, all formats
constexpr int64_t kRows = 4;          // rows per register tile
constexpr int64_t kTokens = 4;        // tokens per register tile
constexpr int64_t kGemmTokens = 48;   // from this many tokens on: expand + torch GEMM
constexpr int64_t kGemmRows = 64;     // rows expanded per GEMM call

int64_t block_bytes(int64_t format) {
  switch (format) {
    case kQ4_0: return 18;
    case kQ4_1: return 20;
    case kQ8_0: return 34;
  }
  TORCH_CHECK(false, "quant_matmul: unknown weight format ", format);
}

inline float half_bits_to_float(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
#if defined(__F16C__)
  return _cvtsh_ss(bits);
#else
  return c10::detail::fp16_ieee_to_fp32_value(bits);
#endif
}

// One block -> 32 floats, element by element (the portable path and the reference).
template <int64_t F>
inline void expand_block(const uint8_t* b, float* out) {
  const float d = half_bits_to_float(b);
  if constexpr (F == kQ8_0) {
    const auto* q = reinterpret_cast<const int8_t*>(b + 2);
    for (int j = 0; j < 32; ++j) out[j] = static_cast<float>(q[j]) * d;
  } else if constexpr (F == kQ4_1) {
    const float m = half_bits_to_float(b + 2);
    const uint8_t* q = b + 4;
    for (int j = 0; j < 16; ++j) {
      out[j] = static_cast<float>(q[j] & 0xF) * d + m;
      out[j + 16] = static_cast<float>(q[j] >> 4) * d + m;
    }
  } else {
    const uint8_t* q = b + 2;
    for (int j = 0; j < 16; ++j) {
      out[j] = static_cast<float>((q[j] & 0xF) - 8) * d;
      out[j + 16] = static_cast<float>((q[j] >> 4) - 8) * d;
    }
  }
}

#if defined(__AVX512F__)

// One block -> two registers (elements 0..15, 16..31).
template <int64_t F>
inline void expand_block16(const uint8_t* b, __m512& lo, __m512& hi) {
  const __m512 d = _mm512_set1_ps(half_bits_to_float(b));
  if constexpr (F == kQ8_0) {
    const __m128i q0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2));
    const __m128i q1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 18));
    lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)), d);
    hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)), d);
  } else {
    const uint8_t* qs = b + (F == kQ4_1 ? 4 : 2);
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
    const __m128i mask = _mm_set1_epi8(0x0F);
    __m128i q_lo = _mm_and_si128(q, mask);
    __m128i q_hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
    if constexpr (F == kQ4_1) {
      const __m512 m = _mm512_set1_ps(half_bits_to_float(b + 2));
      lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q_lo)), d, m);
      hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q_hi)), d, m);
    } else {
      const __m128i eight = _mm_set1_epi8(8);
      q_lo = _mm_sub_epi8(q_lo, eight);
      q_hi = _mm_sub_epi8(q_hi, eight);
      lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q_lo)), d);
      hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q_hi)), d);
    }
  }
}

template <int64_t F>
void expand_row(const uint8_t* row, int64_t K, float* out) {
  constexpr int64_t B = F == kQ4_0 ? 18 : F == kQ4_1 ? 20 : 34;
  for (int64_t b = 0; b < K / kBlock; ++b) {
    __m512 lo, hi;
    expand_block16<F>(row + b * B, lo, hi);
    _mm512_storeu_ps(out + b * kBlock, lo);
    _mm512_storeu_ps(out + b * kBlock + 16, hi);
  }
}

// Where a tile's weights come from: GGUF blocks expanded on the fly, or rows already
// expanded to floats.
template <int64_t F>
struct BlockRows {
  const uint8_t* w;  // the tile's first row
  int64_t row_bytes;
  static constexpr int64_t B = F == kQ4_0 ? 18 : F == kQ4_1 ? 20 : 34;
  inline void load(int64_t r, int64_t b, __m512& lo, __m512& hi) const {
    expand_block16<F>(w + r * row_bytes + b * B, lo, hi);
  }
};

struct FloatRows {
  const float* w;  // [R, K]
  int64_t K;
  inline void load(int64_t r, int64_t b, __m512& lo, __m512& hi) const {
    const float* p = w + r * K + b * kBlock;
    lo = _mm512_loadu_ps(p);
    hi = _mm512_loadu_ps(p + 16);
  }
};

// y[t * ldy + r] = sum_k x[t * K + k] * w[r, k] for r < R, t < NT.
template <int64_t R, int64_t NT, class Rows>
inline void tile(const Rows& rows, const float* x, int64_t K, float* y, int64_t ldy) {
  __m512 acc[R][NT];
  for (int64_t r = 0; r < R; ++r)
    for (int64_t t = 0; t < NT; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < K / kBlock; ++b) {
    __m512 lo[R], hi[R];
    for (int64_t r = 0; r < R; ++r) rows.load(r, b, lo[r], hi[r]);
    for (int64_t t = 0; t < NT; ++t) {
      const __m512 x_lo = _mm512_loadu_ps(x + t * K + b * kBlock);
      const __m512 x_hi = _mm512_loadu_ps(x + t * K + b * kBlock + 16);
      for (int64_t r = 0; r < R; ++r) {
        acc[r][t] = _mm512_fmadd_ps(x_lo, lo[r], acc[r][t]);
        acc[r][t] = _mm512_fmadd_ps(x_hi, hi[r], acc[r][t]);
      }
    }
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t t = 0; t < NT; ++t) y[t * ldy + r] = _mm512_reduce_add_ps(acc[r][t]);
}

// All T tokens against the rows of one tile (R rows, or fewer at the matrix's end).
template <int64_t R, class Rows>
void tokens(const Rows& rows, const float* x, int64_t T, int64_t K, float* y, int64_t ldy) {
  int64_t t = 0;
  for (; t + kTokens <= T; t += kTokens) tile<R, kTokens>(rows, x + t * K, K, y + t * ldy, ldy);
  switch (T - t) {
    case 3: tile<R, 3>(rows, x + t * K, K, y + t * ldy, ldy); break;
    case 2: tile<R, 2>(rows, x + t * K, K, y + t * ldy, ldy); break;
    case 1: tile<R, 1>(rows, x + t * K, K, y + t * ldy, ldy); break;
  }
}

template <int64_t F>
void matmul_rows(const float* x, int64_t T, int64_t K, const uint8_t* w, int64_t N, float* y) {
  const int64_t row_bytes = K / kBlock * BlockRows<F>::B;
  const int64_t groups = (N + kRows - 1) / kRows;
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(T > kTokens ? kRows * K : 0);
    for (int64_t g = begin; g < end; ++g) {
      const int64_t n0 = g * kRows, rows = std::min(kRows, N - n0);
      const BlockRows<F> blocks{w + n0 * row_bytes, row_bytes};
      if (T > kTokens) {  // expand once, reuse for every token tile
        for (int64_t r = 0; r < rows; ++r)
          expand_row<F>(w + (n0 + r) * row_bytes, K, scratch.data() + r * K);
        const FloatRows expanded{scratch.data(), K};
        if (rows == kRows) tokens<kRows>(expanded, x, T, K, y + n0, N);
        else for (int64_t r = 0; r < rows; ++r)
          tokens<1>(FloatRows{scratch.data() + r * K, K}, x, T, K, y + n0 + r, N);
      } else if (rows == kRows) {
        tokens<kRows>(blocks, x, T, K, y + n0, N);
      } else {
        for (int64_t r = 0; r < rows; ++r)
          tokens<1>(BlockRows<F>{w + (n0 + r) * row_bytes, row_bytes}, x, T, K, y + n0 + r, N);
      }
    }
  });
}

#else  // portable: each row expanded to floats, then plain dot products

template <int64_t F>
void expand_row(const uint8_t* row, int64_t K, float* out) {
  constexpr int64_t B = F == kQ4_0 ? 18 : F == kQ4_1 ? 20 : 34;
  for (int64_t b = 0; b < K / kBlock; ++b) expand_block<F>(row + b * B, out + b * kBlock);
}

template <int64_t F>
void matmul_rows(const float* x, int64_t T, int64_t K, const uint8_t* w, int64_t N, float* y) {
  constexpr int64_t B = F == kQ4_0 ? 18 : F == kQ4_1 ? 20 : 34;
  const int64_t row_bytes = K / kBlock * B;
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> row(K);
    for (int64_t n = begin; n < end; ++n) {
      expand_row<F>(w + n * row_bytes, K, row.data());
      for (int64_t t = 0; t < T; ++t) {
        const float* xt = x + t * K;
        float sum = 0.f;
        for (int64_t k = 0; k < K; ++k) sum += xt[k] * row[k];
        y[t * N + n] = sum;
      }
    }
  });
}

#endif

template <int64_t F>
void expand_rows(const uint8_t* w, int64_t K, const int64_t* ids, int64_t n, float* out) {
  constexpr int64_t B = F == kQ4_0 ? 18 : F == kQ4_1 ? 20 : 34;
  const int64_t row_bytes = K / kBlock * B;
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      expand_row<F>(w + (ids ? ids[i] : i) * row_bytes, K, out + i * K);
  });
}

// The weight's K (input features), checked against its row width.
int64_t check_weight(const torch::Tensor& weight, int64_t format, const char* who) {
  TORCH_CHECK(weight.dtype() == torch::kUInt8 && weight.dim() == 2 && weight.is_contiguous(),
              who, ": the weight must be contiguous uint8 [N, K / 32 * block bytes]");
  const int64_t bytes = block_bytes(format);
  TORCH_CHECK(weight.size(1) % bytes == 0, who, ": a row of ", weight.size(1),
              " bytes is not a whole number of ", bytes, "-byte blocks");
  return weight.size(1) / bytes * kBlock;
}

template <class Fn>
void dispatch(int64_t format, Fn&& fn) {
  switch (format) {
    case kQ4_0: fn(std::integral_constant<int64_t, kQ4_0>{}); return;
    case kQ4_1: fn(std::integral_constant<int64_t, kQ4_1>{}); return;
    case kQ8_0: fn(std::integral_constant<int64_t, kQ8_0>{}); return;
  }
  TORCH_CHECK(false, "unknown weight format ", format);
}

}  // namespace

// weight: uint8 [N, K / 32 * B] in `format`; rows: int64 [n] (or empty: all N rows)
// -> float32 [n, K], the rows expanded (an embedding lookup, or the whole matrix).
torch::Tensor dequantize_rows(torch::Tensor weight, int64_t format, torch::Tensor rows) {
  const int64_t K = check_weight(weight, format, "dequantize_rows");
  const bool all = !rows.defined() || rows.numel() == 0;
  if (!all) {
    TORCH_CHECK(rows.dtype() == torch::kInt64 && rows.dim() == 1,
                "dequantize_rows: rows must be int64 [n]");
    rows = rows.contiguous();
    TORCH_CHECK(rows.min().item<int64_t>() >= 0 && rows.max().item<int64_t>() < weight.size(0),
                "dequantize_rows: row out of range");
  }
  const int64_t n = all ? weight.size(0) : rows.numel();
  auto out = torch::empty({n, K}, torch::kFloat32);
  dispatch(format, [&](auto f) {
    expand_rows<decltype(f)::value>(weight.data_ptr<uint8_t>(), K,
                                    all ? nullptr : rows.data_ptr<int64_t>(), n,
                                    out.data_ptr<float>());
  });
  return out;
}

// x: float32 [T, K]; weight: uint8 [N, K / 32 * B] in `format` -> float32 [T, N] = x @ W^T.
torch::Tensor quant_matmul(torch::Tensor x, torch::Tensor weight, int64_t format) {
  const int64_t K = check_weight(weight, format, "quant_matmul");
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.size(1) == K,
              "quant_matmul: x must be float32 [T, ", K, "], got ", x.dtype(), " ", x.sizes());
  const int64_t T = x.size(0), N = weight.size(0);
  x = x.contiguous();
  auto y = torch::empty({T, N}, torch::kFloat32);
  if (T == 0) return y;
  dispatch(format, [&](auto f) {
    constexpr int64_t F = decltype(f)::value;
    if (T < kGemmTokens) {
      matmul_rows<F>(x.data_ptr<float>(), T, K, weight.data_ptr<uint8_t>(), N,
                     y.data_ptr<float>());
      return;
    }
    // chunks of rows expanded into a per-thread scratch (L2), each multiplied by torch's
    // GEMM (single-threaded inside the parallel region) straight into y's columns
    const int64_t row_bytes = weight.size(1);
    const int64_t chunks = (N + kGemmRows - 1) / kGemmRows;
    const uint8_t* w = weight.data_ptr<uint8_t>();
    const bool inference = c10::InferenceMode::is_enabled();  // worker threads: as the caller
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      c10::InferenceMode guard(inference);
      auto scratch = torch::empty({kGemmRows, K}, torch::kFloat32);
      for (int64_t c = begin; c < end; ++c) {
        const int64_t n0 = c * kGemmRows, rows = std::min(kGemmRows, N - n0);
        float* s = scratch.data_ptr<float>();
        for (int64_t r = 0; r < rows; ++r) expand_row<F>(w + (n0 + r) * row_bytes, K, s + r * K);
        auto out = y.narrow(1, n0, rows);
        at::mm_out(out, x, scratch.narrow(0, 0, rows).t());
      }
    });
  });
  return y;
}
