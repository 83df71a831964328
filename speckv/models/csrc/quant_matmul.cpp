// Weight-only matmul over GGUF-quantized weights: y = x @ W^T, activations in float32.
//
// ggml stores a weight [N, K] as N rows of K / 32 blocks, each block an fp16 scale (and
// for Q4_1 an fp16 minimum) followed by its 32 codes. `speckv.models.quant` splits the
// blocks once at load into the layout read here, the numbers and the bytes unchanged:
//
//     codes  uint8 [N, K / 32 * Q]     the blocks' codes, Q = 16 (two nibbles a byte) or 32
//     scales fp16 [N, S * K / 32]      per row, the blocks' scales d, then (Q4_1) their m
//
//     Q4_0  S = 1  w = (q - 8) d = q d + (-8 d)   q = nibble: the low nibbles are
//     Q4_1  S = 2  w = q d + m                    elements 0..15, the high ones 16..31
//     Q8_0  S = 1  w = q d                        q = int8
//
// and two of ggml's K-quants, whose super-blocks of 256 hold 8 blocks of 32: the codes
// are rewritten at load into the layouts above (the same integers), the scales kept as
// the file has them, in planes of fp16 (the small integers exactly):
//
//     Q4_K  d, dmin [K/256]; sc, m [K/32] (6-bit)   w = q (d sc) - (dmin m), q a nibble
//     Q6_K  d [K/256]; sc [K/16] (int8)             w = (q - 32) (d sc), q - 32 stored
//                                                   as int8, a scale per 16 elements
//
// Every product here is exact in float32 (a 4- or 8-bit integer times an fp16 scale's
// 11-bit mantissa, and -8 d; for the K-quants d sc has at most 11 + 7 bits and times a
// code at most 23), so each weight is the value gguf-py dequantizes, bit for bit (one
// rounding where it adds, as there), whichever way the sum is rounded. A row's scales
// are planar so that the kernel widens 16 blocks' scales with one F16C instruction into
// a small buffer and broadcasts each from there (a load, no shuffle), instead of
// converting and broadcasting two fp16 values per block: as fast as float32 scales were
// (measured), at the file's own size.
//
// Small T (decode): each thread takes groups of 4 rows, expands a block of each into
// registers once and multiplies it into up to 4 tokens at a time (5 to 8 tokens: 2 rows
// at a time, all tokens in registers); more than 8 tokens run in groups of 8, each
// decoding the rows again (their codes stay in L1: 2x faster at 16-32 tokens than
// expanding them once into a float scratch for 4-token tiles). A 4-bit block is
// expanded by a lookup: its 16 possible weights q d + c computed once (one FMA), each
// code then an index (vpermps), which takes 2 instructions a block off the port that
// converts integers to floats.
// The same tiles are built for AVX2 + FMA + F16C CPUs (256-bit registers: 8 codes
// widened and converted at a time, no lookup; see that section) and, without either,
// a portable loop that expands each row to floats. Row groups are software-prefetched
// two ahead on both SIMD paths (`prefetch_rows`).
// Large T (prefill): chunks of 512 rows are expanded into a scratch that stays in cache
// and multiplied by torch's GEMM, which is blocked for caches far better than a hand loop.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define SPECKV_QUANT_AVX512 1  // masked 16-bit loads need BW + VL besides F
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define SPECKV_QUANT_AVX2 1
#include <immintrin.h>
#endif

namespace {

// The numbers are part of the Python API (`speckv.models.quant.FORMATS`).
enum WeightFormat : int64_t { kQ4_0 = 0, kQ4_1 = 1, kQ8_0 = 2, kQ4_K = 3, kQ6_K = 4 };
constexpr int64_t kBlock = 32;        // elements per block, all formats
constexpr int64_t kRows = 4;          // rows per register tile
constexpr int64_t kTokens = 4;        // tokens per register tile
constexpr int64_t kWideTokens = 8;    // up to this many: 2 rows x T tokens
constexpr int64_t kGemmTokens = 48;   // from this many tokens on: expand + torch GEMM
                                      // (measured: 1.4x slower than the tiles at 32)
constexpr int64_t kGemmRows = 512;    // rows expanded per GEMM call
constexpr int64_t kAheadGroups = 2;   // row groups prefetched ahead (`prefetch_rows`)

constexpr int64_t kChunk = 16;        // blocks whose scales are widened at once

constexpr int64_t kSuper = 8;         // blocks per K-quant super-block

template <int64_t F>
struct Layout {
  static constexpr bool kKQuant = F == kQ4_K || F == kQ6_K;
  static constexpr bool k8bit = F == kQ8_0 || F == kQ6_K;
  static constexpr int64_t Q = k8bit ? 32 : 16;  // code bytes per block
  // fp16 scale entries of a row of `blocks` blocks (the planes, in order)
  static constexpr int64_t scales(int64_t blocks) {
    switch (F) {
      case kQ4_1: return 2 * blocks;                       // d, m
      case kQ4_K: return 2 * (blocks / kSuper) + 2 * blocks;  // d, dmin, sc, m
      case kQ6_K: return blocks / kSuper + 2 * blocks;        // d, sc (two a block)
      default: return blocks;                              // d
    }
  }
};

void check_format(int64_t format) {
  TORCH_CHECK(format >= kQ4_0 && format <= kQ6_K, "unknown weight format ", format);
}

// One weight's rows: row r's codes at codes + r * code_stride, its scales (fp16 bits) at
// scales + r * scale_stride; `blocks` per row.
struct Rows {
  const uint8_t* codes;
  const uint16_t* scales;
  int64_t code_stride, scale_stride, blocks;
  Rows offset(int64_t r) const {
    return {codes + r * code_stride, scales + r * scale_stride, code_stride, scale_stride,
            blocks};
  }
};

inline float half_to_float(uint16_t bits) { return c10::detail::fp16_ieee_to_fp32_value(bits); }

// Block b's scales: w = q d + c (Q4_0: c = -8 d; Q8_0: c unused), or for Q6_K, whose
// scale changes every 16 elements, d for the first 16 and c for the second.
template <int64_t F>
inline void block_scales(const Rows& row, int64_t b, float& d, float& c) {
  const uint16_t* s = row.scales;
  const int64_t supers = row.blocks / kSuper;
  if constexpr (F == kQ4_K) {
    d = half_to_float(s[b / kSuper]) * half_to_float(s[2 * supers + b]);
    c = -(half_to_float(s[supers + b / kSuper]) * half_to_float(s[2 * supers + row.blocks + b]));
  } else if constexpr (F == kQ6_K) {
    const float sd = half_to_float(s[b / kSuper]);
    d = sd * half_to_float(s[supers + 2 * b]);
    c = sd * half_to_float(s[supers + 2 * b + 1]);
  } else {
    d = half_to_float(s[b]);
    c = F == kQ4_1 ? half_to_float(s[row.blocks + b]) : F == kQ4_0 ? -8.f * d : 0.f;
  }
}

// Block b of a row -> 32 floats, element by element (the portable path).
template <int64_t F>
inline void expand_block(const Rows& row, int64_t b, float* out) {
  float d, c;
  block_scales<F>(row, b, d, c);
  const uint8_t* q = row.codes + b * Layout<F>::Q;
  if constexpr (Layout<F>::k8bit) {
    const auto* v = reinterpret_cast<const int8_t*>(q);
    const float d_hi = F == kQ6_K ? c : d;
    for (int j = 0; j < 16; ++j) {
      out[j] = static_cast<float>(v[j]) * d;
      out[j + 16] = static_cast<float>(v[j + 16]) * d_hi;
    }
  } else {
    for (int j = 0; j < 16; ++j) {
      out[j] = static_cast<float>(q[j] & 0xF) * d + c;
      out[j + 16] = static_cast<float>(q[j] >> 4) * d + c;
    }
  }
}

#if defined(SPECKV_QUANT_AVX512)

// Row scales of blocks [b0, b0 + n), n <= kChunk, widened: d[i], and c[i] (Q4_*: the
// constant term, m or -8 d).
template <int64_t F>
inline void widen_scales(const Rows& row, int64_t b0, int64_t n, float* d, float* c) {
  const __mmask16 mask = n >= kChunk ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1);
  if constexpr (Layout<F>::kKQuant) {  // b0 is a multiple of kChunk = 2 super-blocks
    static_assert(kChunk == 2 * kSuper);
    const int64_t supers = row.blocks / kSuper, s0 = b0 / kSuper;
    const __mmask16 two = n > kSuper ? 0x3 : 0x1;
    const __m512i which = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    // the chunk's (up to) two super-block scales, each broadcast to its 8 blocks
    const __m512 sd = _mm512_permutexvar_ps(
        which, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(two, row.scales + s0)));
    if constexpr (F == kQ4_K) {
      const __m512 smin = _mm512_permutexvar_ps(
          which, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(two, row.scales + supers + s0)));
      const uint16_t* sc = row.scales + 2 * supers;
      const __m512 scv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, sc + b0));
      const __m512 mv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, sc + row.blocks + b0));
      _mm512_store_ps(d, _mm512_mul_ps(sd, scv));
      _mm512_store_ps(c, _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(smin, mv)));
    } else {  // Q6_K: a scale per 16 elements, two a block, for lo (d) and hi (c)
      const uint16_t* sc = row.scales + supers + 2 * b0;
      // n is 8 or 16 (whole super-blocks): 16 or 32 scales, blocks 0-7's then 8-15's
      const __m512 a =
          _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc)));
      const __m512 b =
          _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(n > kSuper ? 0xFFFF : 0, sc + kChunk));
      const __m512i even =
          _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
      const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
      _mm512_store_ps(d, _mm512_mul_ps(sd, _mm512_permutex2var_ps(a, even, b)));
      _mm512_store_ps(c, _mm512_mul_ps(sd, _mm512_permutex2var_ps(a, odd, b)));
    }
    return;
  }
  const __m512 dv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, row.scales + b0));
  _mm512_store_ps(d, dv);
  if constexpr (F == kQ4_1)
    _mm512_store_ps(c, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, row.scales + row.blocks + b0)));
  else if constexpr (F == kQ4_0)
    _mm512_store_ps(c, _mm512_mul_ps(dv, _mm512_set1_ps(-8.f)));
}

// One block's codes -> two registers (elements 0..15, 16..31), w = q d + c.
template <int64_t F>
inline void expand_block16(const uint8_t* q, const float* d_, const float* c_, __m512& lo,
                           __m512& hi) {
  const __m512 d = _mm512_set1_ps(*d_);  // broadcast loads: no shuffle
  if constexpr (Layout<F>::k8bit) {  // Q6_K: c_ is the second half's scale
    const __m128i q0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
    const __m128i q1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16));
    lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)), d);
    hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)),
                       F == kQ6_K ? _mm512_set1_ps(*c_) : d);
  } else {
    // the block's 16 possible weights, q d + c for q = 0..15, then one lookup per
    // element (vpermps reads an index's low 4 bits: the low nibble as it is)
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 table = _mm512_fmadd_ps(iota, d, _mm512_set1_ps(*c_));
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
    lo = _mm512_permutexvar_ps(v, table);
    hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
  }
}

// One block's codes -> its 32 floats at out (`expand_row`).
template <int64_t F>
inline void store_block(const uint8_t* q, const float* d, const float* c, float* out) {
  __m512 lo, hi;
  expand_block16<F>(q, d, c, lo, hi);
  _mm512_storeu_ps(out, lo);
  _mm512_storeu_ps(out + 16, hi);
}

// Where a tile's weights come from: codes expanded on the fly (their scales widened a
// chunk at a time by `prepare`), or rows already expanded to floats.
template <int64_t F, int64_t R>
struct CodedRows {
  Rows rows;
  alignas(64) float d[R][kChunk];
  alignas(64) float c[R][kChunk];
  inline void prepare(int64_t b0, int64_t n) {
    for (int64_t r = 0; r < R; ++r) widen_scales<F>(rows.offset(r), b0, n, d[r], c[r]);
  }
  inline void load(int64_t r, int64_t b, int64_t i, __m512& lo, __m512& hi) const {
    expand_block16<F>(rows.codes + r * rows.code_stride + b * Layout<F>::Q, &d[r][i], &c[r][i],
                      lo, hi);
  }
};

// y[t * ldy + r] = sum_k x[t * K + k] * w[r, k] for r < R, t < NT.
template <int64_t R, int64_t NT, class Src>
inline void tile(Src& src, const float* x, int64_t K, float* y, int64_t ldy) {
  __m512 acc[R][NT];
  for (int64_t r = 0; r < R; ++r)
    for (int64_t t = 0; t < NT; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t b0 = 0; b0 < K / kBlock; b0 += kChunk) {
    const int64_t n = std::min(kChunk, K / kBlock - b0);
    src.prepare(b0, n);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t b = b0 + i;
      __m512 lo[R], hi[R];
      for (int64_t r = 0; r < R; ++r) src.load(r, b, i, lo[r], hi[r]);
      for (int64_t t = 0; t < NT; ++t) {
        const __m512 x_lo = _mm512_loadu_ps(x + t * K + b * kBlock);
        const __m512 x_hi = _mm512_loadu_ps(x + t * K + b * kBlock + 16);
        for (int64_t r = 0; r < R; ++r) {
          acc[r][t] = _mm512_fmadd_ps(x_lo, lo[r], acc[r][t]);
          acc[r][t] = _mm512_fmadd_ps(x_hi, hi[r], acc[r][t]);
        }
      }
    }
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t t = 0; t < NT; ++t) y[t * ldy + r] = _mm512_reduce_add_ps(acc[r][t]);
}

// All T tokens against the rows of one tile (R rows, or fewer at the matrix's end).
template <int64_t R, class Src>
void tokens(Src&& src, const float* x, int64_t T, int64_t K, float* y, int64_t ldy) {
  int64_t t = 0;
  for (; t + kTokens <= T; t += kTokens) tile<R, kTokens>(src, x + t * K, K, y + t * ldy, ldy);
  switch (T - t) {
    case 3: tile<R, 3>(src, x + t * K, K, y + t * ldy, ldy); break;
    case 2: tile<R, 2>(src, x + t * K, K, y + t * ldy, ldy); break;
    case 1: tile<R, 1>(src, x + t * K, K, y + t * ldy, ldy); break;
  }
}

template <int64_t F, int64_t R>
void wide(const Rows& rows, const float* x, int64_t T, int64_t K, float* y, int64_t ldy) {
  CodedRows<F, R> src{rows};
  switch (T) {
    case 5: tile<R, 5>(src, x, K, y, ldy); break;
    case 6: tile<R, 6>(src, x, K, y, ldy); break;
    case 7: tile<R, 7>(src, x, K, y, ldy); break;
    case 8: tile<R, 8>(src, x, K, y, ldy); break;
  }
}

// One group of rows against up to 8 tokens, every product in registers.
template <int64_t F>
void rows_by_tokens(const Rows& w, int64_t n0, int64_t rows, const float* x, int64_t T,
                    int64_t K, float* y, int64_t N) {
  if (T > kTokens) {  // 2 rows x T tokens in registers, twice
    int64_t r = 0;
    for (; r + 2 <= rows; r += 2) wide<F, 2>(w.offset(n0 + r), x, T, K, y + n0 + r, N);
    for (; r < rows; ++r) wide<F, 1>(w.offset(n0 + r), x, T, K, y + n0 + r, N);
  } else if (rows == kRows) {
    tokens<kRows>(CodedRows<F, kRows>{w.offset(n0)}, x, T, K, y + n0, N);
  } else {
    for (int64_t r = 0; r < rows; ++r)
      tokens<1>(CodedRows<F, 1>{w.offset(n0 + r)}, x, T, K, y + n0 + r, N);
  }
}

#elif defined(SPECKV_QUANT_AVX2)

// The same tiles in 256-bit registers (AVX2, FMA, F16C: most x86 CPUs without
// AVX-512, such as AMD's Zen 2 and 3). Sixteen registers instead of 32, and vpermps
// indexes 8 entries, not 16, so a 4-bit block is not a lookup here: 8 codes at a time
// are widened to int32 (pmovzx), their nibble taken, converted and scaled by one FMA.
// A tile holds R x NT <= 8 accumulators (R rows against NT tokens) and expands each
// 8-element group of its R rows once for all NT tokens.

// Row scales of blocks [b0, b0 + n), n <= kChunk, widened: eight at a time by F16C
// for a whole chunk of the one-scale formats, else block by block.
template <int64_t F>
inline void widen_scales(const Rows& row, int64_t b0, int64_t n, float* d, float* c) {
  if constexpr (!Layout<F>::kKQuant) {
    if (n == kChunk) {
      for (int64_t h = 0; h < kChunk; h += 8) {
        const auto* s = reinterpret_cast<const __m128i*>(row.scales + b0 + h);
        const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128(s));
        _mm256_store_ps(d + h, dv);
        if constexpr (F == kQ4_1) {  // the m plane, `blocks` entries after the d plane
          const auto* m = reinterpret_cast<const __m128i*>(row.scales + row.blocks + b0 + h);
          _mm256_store_ps(c + h, _mm256_cvtph_ps(_mm_loadu_si128(m)));
        } else if constexpr (F == kQ4_0) {
          _mm256_store_ps(c + h, _mm256_mul_ps(dv, _mm256_set1_ps(-8.f)));
        }
      }
      return;
    }
  }
  for (int64_t i = 0; i < n; ++i) block_scales<F>(row, b0 + i, d[i], c[i]);
}

// Elements 8 J .. 8 J + 7 of the block whose codes are at q -> one register.
template <int64_t F, int J>
inline __m256 expand_group(const uint8_t* q, const float* d, const float* c) {
  if constexpr (Layout<F>::k8bit) {
    const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * J));
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)),
                         _mm256_broadcast_ss(F == kQ6_K && J >= 2 ? c : d));
  } else {  // elements 0..15 are the low nibbles of bytes 0..15, 16..31 the high ones
    const __m256i v = _mm256_cvtepu8_epi32(
        _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * (J & 1))));
    const __m256i n = J < 2 ? _mm256_and_si256(v, _mm256_set1_epi32(0xF)) : _mm256_srli_epi32(v, 4);
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(n), _mm256_broadcast_ss(d), _mm256_broadcast_ss(c));
  }
}

// One block's codes -> its 32 floats at out (`expand_row`).
template <int64_t F>
inline void store_block(const uint8_t* q, const float* d, const float* c, float* out) {
  _mm256_storeu_ps(out, expand_group<F, 0>(q, d, c));
  _mm256_storeu_ps(out + 8, expand_group<F, 1>(q, d, c));
  _mm256_storeu_ps(out + 16, expand_group<F, 2>(q, d, c));
  _mm256_storeu_ps(out + 24, expand_group<F, 3>(q, d, c));
}

inline float sum_lanes(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

template <int64_t F, int64_t R>
struct CodedRows {
  Rows rows;
  alignas(32) float d[R][kChunk];
  alignas(32) float c[R][kChunk];
  inline void prepare(int64_t b0, int64_t n) {
    for (int64_t r = 0; r < R; ++r) widen_scales<F>(rows.offset(r), b0, n, d[r], c[r]);
  }
};

// Group J of block b: each row's 8 weights expanded once, multiplied into NT tokens.
template <int J, int64_t F, int64_t R, int64_t NT>
inline void group(const CodedRows<F, R>& src, int64_t b, int64_t i, const float* x, int64_t K,
                  __m256 (&acc)[R][NT]) {
  __m256 w[R];
  for (int64_t r = 0; r < R; ++r)
    w[r] = expand_group<F, J>(src.rows.codes + r * src.rows.code_stride + b * Layout<F>::Q,
                              &src.d[r][i], &src.c[r][i]);
  for (int64_t t = 0; t < NT; ++t) {
    const __m256 xv = _mm256_loadu_ps(x + t * K + b * kBlock + 8 * J);
    for (int64_t r = 0; r < R; ++r) acc[r][t] = _mm256_fmadd_ps(xv, w[r], acc[r][t]);
  }
}

// Block b of one row (codes q, scales d, c) against one token, group after group. With
// one token a tile goes row by row instead of group by group across its rows: a row's
// widened codes and scales then live only while it is multiplied, and 4 rows do not
// spill registers (measured 1.24x faster at 1 token; slower from 2 tokens on, where the
// rows share each load of x).
template <int64_t F>
inline __m256 row_block(const uint8_t* q, const float* d, const float* c, const float* x,
                        __m256 acc) {
  acc = _mm256_fmadd_ps(_mm256_loadu_ps(x), expand_group<F, 0>(q, d, c), acc);
  acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + 8), expand_group<F, 1>(q, d, c), acc);
  acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + 16), expand_group<F, 2>(q, d, c), acc);
  return _mm256_fmadd_ps(_mm256_loadu_ps(x + 24), expand_group<F, 3>(q, d, c), acc);
}

// y[t * ldy + r] = sum_k x[t * K + k] * w[r, k] for r < R, t < NT.
template <int64_t NT, int64_t F, int64_t R>
inline void tile(CodedRows<F, R>& src, const float* x, int64_t K, float* y, int64_t ldy) {
  static_assert(R * NT <= 8, "a tile's accumulators and weights fit in 16 registers");
  __m256 acc[R][NT];
  for (int64_t r = 0; r < R; ++r)
    for (int64_t t = 0; t < NT; ++t) acc[r][t] = _mm256_setzero_ps();
  for (int64_t b0 = 0; b0 < K / kBlock; b0 += kChunk) {
    const int64_t n = std::min(kChunk, K / kBlock - b0);
    src.prepare(b0, n);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t b = b0 + i;
      if constexpr (NT == 1) {
        for (int64_t r = 0; r < R; ++r)
          acc[r][0] = row_block<F>(src.rows.codes + r * src.rows.code_stride + b * Layout<F>::Q,
                                   &src.d[r][i], &src.c[r][i], x + b * kBlock, acc[r][0]);
      } else {
        group<0>(src, b, i, x, K, acc);
        group<1>(src, b, i, x, K, acc);
        group<2>(src, b, i, x, K, acc);
        group<3>(src, b, i, x, K, acc);
      }
    }
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t t = 0; t < NT; ++t) y[t * ldy + r] = sum_lanes(acc[r][t]);
}

// R rows against T <= 8 / R tokens.
template <int64_t F, int64_t R, int64_t NT = 8 / R>
inline void rows_tile(const Rows& w, const float* x, int64_t T, int64_t K, float* y, int64_t ldy) {
  if constexpr (NT > 1) {
    if (T < NT) return rows_tile<F, R, NT - 1>(w, x, T, K, y, ldy);
  }
  CodedRows<F, R> src{w};
  tile<NT>(src, x, K, y, ldy);
}

// One group of (up to 4) rows against up to 8 tokens: 4 rows a tile for 1 token, 2 rows
// for 2-4, 1 row for 5-8 (measured on a Zen 3: 4 rows x 2 tokens 1.6x slower than 2 x 2,
// twice; 2 rows x 4 tokens, twice, 1.4x slower than 1 row x 8).
template <int64_t F>
void rows_by_tokens(const Rows& w, int64_t n0, int64_t rows, const float* x, int64_t T,
                    int64_t K, float* y, int64_t N) {
  int64_t r = 0;
  if (T == 1 && rows == kRows) return rows_tile<F, kRows>(w.offset(n0), x, T, K, y + n0, N);
  if (T <= 4)
    for (; r + 2 <= rows; r += 2) rows_tile<F, 2>(w.offset(n0 + r), x, T, K, y + n0 + r, N);
  for (; r < rows; ++r) rows_tile<F, 1>(w.offset(n0 + r), x, T, K, y + n0 + r, N);
}

#else  // portable: each row expanded to floats, then plain dot products

template <int64_t F>
void expand_row(const Rows& row, int64_t K, float* out) {
  for (int64_t b = 0; b < K / kBlock; ++b) expand_block<F>(row, b, out + b * kBlock);
}

template <int64_t F>
void matmul_rows(const float* x, int64_t T, int64_t K, const Rows& w, int64_t N, float* y) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> row(K);
    for (int64_t n = begin; n < end; ++n) {
      expand_row<F>(w.offset(n), K, row.data());
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

#if defined(SPECKV_QUANT_AVX512) || defined(SPECKV_QUANT_AVX2)
// A row -> K floats: each chunk's scales widened once, then block after block.
template <int64_t F>
void expand_row(const Rows& row, int64_t K, float* out) {
  alignas(64) float d[kChunk], c[kChunk];
  for (int64_t b0 = 0; b0 < K / kBlock; b0 += kChunk) {
    const int64_t n = std::min(kChunk, K / kBlock - b0);
    widen_scales<F>(row, b0, n, d, c);
    for (int64_t i = 0; i < n; ++i)
      store_block<F>(row.codes + (b0 + i) * Layout<F>::Q, d + i, c + i, out + (b0 + i) * kBlock);
  }
}

// The codes and scales of a group of rows, asked into L1 while an earlier group is
// multiplied: rows are a few hundred bytes, so the hardware prefetcher, which follows a
// stream only once it has seen it, leaves each group's first lines to a cache miss.
// Measured on a Zen 3 (a decode step's matrices, out of cache): the 30 layers of the
// bundled model 1.15x faster at 1 token, its Q8_0 output matrix 1.9x.
inline void prefetch_rows(const Rows& w) {
  const char* codes = reinterpret_cast<const char*>(w.codes);
  for (int64_t o = 0; o < kRows * w.code_stride; o += 64) _mm_prefetch(codes + o, _MM_HINT_T0);
  const char* scales = reinterpret_cast<const char*>(w.scales);
  for (int64_t o = 0; o < kRows * w.scale_stride * 2; o += 64)
    _mm_prefetch(scales + o, _MM_HINT_T0);
}

template <int64_t F>
void matmul_rows(const float* x, int64_t T, int64_t K, const Rows& w, int64_t N, float* y) {
  const int64_t groups = (N + kRows - 1) / kRows;
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t n0 = g * kRows, rows = std::min(kRows, N - n0);
      if (g + kAheadGroups < end) prefetch_rows(w.offset((g + kAheadGroups) * kRows));
      // more than 8 tokens: groups of 8 in registers, each decoding the rows again (the
      // rows' codes stay in L1 between groups) — measured 2x faster at 16-32 tokens
      // than expanding them once into a float scratch and running 4-token tiles over it
      for (int64_t t0 = 0; t0 < T; t0 += kWideTokens)
        rows_by_tokens<F>(w, n0, rows, x + t0 * K, std::min(kWideTokens, T - t0), K,
                          y + t0 * N, N);
    }
  });
}
#endif

// The weight's rows and K (input features), checked.
template <int64_t F>
Rows weight_rows(const torch::Tensor& codes, const torch::Tensor& scales, int64_t& K,
                 const char* who) {
  using L = Layout<F>;
  TORCH_CHECK(codes.dtype() == torch::kUInt8 && codes.dim() == 2 && codes.is_contiguous() &&
                  codes.size(1) % L::Q == 0,
              who, ": codes must be contiguous uint8 [N, K / 32 * ", L::Q, "]");
  const int64_t blocks = codes.size(1) / L::Q;
  TORCH_CHECK(!L::kKQuant || blocks % kSuper == 0, who,
              ": K-quant rows must hold whole super-blocks of 256");
  TORCH_CHECK(scales.dtype() == torch::kFloat16 && scales.is_contiguous() &&
                  scales.dim() == 2 && scales.size(0) == codes.size(0) &&
                  scales.size(1) == L::scales(blocks),
              who, ": scales must be contiguous float16 [N, ", L::scales(blocks), "]");
  K = blocks * kBlock;
  return {codes.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()),
          codes.size(1), scales.size(1), blocks};
}

template <class Fn>
void dispatch(int64_t format, Fn&& fn) {
  check_format(format);
  switch (format) {
    case kQ4_0: fn(std::integral_constant<int64_t, kQ4_0>{}); return;
    case kQ4_1: fn(std::integral_constant<int64_t, kQ4_1>{}); return;
    case kQ8_0: fn(std::integral_constant<int64_t, kQ8_0>{}); return;
    case kQ4_K: fn(std::integral_constant<int64_t, kQ4_K>{}); return;
    case kQ6_K: fn(std::integral_constant<int64_t, kQ6_K>{}); return;
  }
}

}  // namespace

// Which of this file's builds the compiler made for this CPU (-march=native).
const char* quant_matmul_isa() {
#if defined(SPECKV_QUANT_AVX512)
  return "avx512";
#elif defined(SPECKV_QUANT_AVX2)
  return "avx2";
#else
  return "portable";
#endif
}

// codes, scales: a weight in `format` (above); rows: int64 [n] (or empty: all N rows)
// -> float32 [n, K], the rows expanded (an embedding lookup, or the whole matrix).
torch::Tensor dequantize_rows(torch::Tensor codes, torch::Tensor scales, int64_t format,
                              torch::Tensor rows) {
  const bool all = !rows.defined() || rows.numel() == 0;
  if (!all) {
    TORCH_CHECK(rows.dtype() == torch::kInt64 && rows.dim() == 1,
                "dequantize_rows: rows must be int64 [n]");
    rows = rows.contiguous();
    TORCH_CHECK(rows.min().item<int64_t>() >= 0 && rows.max().item<int64_t>() < codes.size(0),
                "dequantize_rows: row out of range");
  }
  torch::Tensor out;
  dispatch(format, [&](auto f) {
    constexpr int64_t F = decltype(f)::value;
    int64_t K = 0;
    const Rows w = weight_rows<F>(codes, scales, K, "dequantize_rows");
    const int64_t n = all ? codes.size(0) : rows.numel();
    out = torch::empty({n, K}, torch::kFloat32);
    const int64_t* ids = all ? nullptr : rows.data_ptr<int64_t>();
    float* o = out.data_ptr<float>();
    at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) expand_row<F>(w.offset(ids ? ids[i] : i), K, o + i * K);
    });
  });
  return out;
}

// x: float32 [T, K]; codes, scales: a weight [N, K] in `format` -> float32 [T, N] = x @ W^T.
torch::Tensor quant_matmul(torch::Tensor x, torch::Tensor codes, torch::Tensor scales,
                           int64_t format) {
  torch::Tensor y;
  dispatch(format, [&](auto f) {
    constexpr int64_t F = decltype(f)::value;
    int64_t K = 0;
    const Rows w = weight_rows<F>(codes, scales, K, "quant_matmul");
    TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.size(1) == K,
                "quant_matmul: x must be float32 [T, ", K, "], got ", x.dtype(), " ", x.sizes());
    x = x.contiguous();
    const int64_t T = x.size(0), N = codes.size(0);
    y = torch::empty({T, N}, torch::kFloat32);
    if (T == 0) return;
    if (T < kGemmTokens) {
      matmul_rows<F>(x.data_ptr<float>(), T, K, w, N, y.data_ptr<float>());
      return;
    }
    // chunks of rows expanded (all threads) into a scratch that stays in cache, each
    // multiplied by torch's GEMM (all threads) straight into y's columns
    auto scratch = torch::empty({std::min(kGemmRows, N), K}, torch::kFloat32);
    float* s = scratch.data_ptr<float>();
    for (int64_t n0 = 0; n0 < N; n0 += kGemmRows) {
      const int64_t rows = std::min(kGemmRows, N - n0);
      at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) expand_row<F>(w.offset(n0 + r), K, s + r * K);
      });
      auto out = y.narrow(1, n0, rows);
      at::mm_out(out, x, scratch.narrow(0, 0, rows).t());
    }
  });
  return y;
}
