// Template of the native CPU kernels of gauge::rotated_query_attention and gauge::materialize_kv.
//
// codegen/native_template.py renders it for a KernelSpec by putting a prelude of #defines in front of this file
// (GAUGE_HEAD_DIM, GAUGE_NAMESPACE: its substitution points); the text below is used as it is.  Without the
// prelude it compiles on its own with the defaults below, so editors and tools can read it as plain C++.
//
// One translation unit per head dim.  Of a KernelSpec, the C++ bakes in what shapes its hot loops: the head dim
// (the width of every dot product, rescale and value accumulation, unrolled over vector registers of the machine
// it is compiled on).  The rotary dim and pairing only shape the query rotation, which runs once per block and
// query row (O(d), off the per-key path), and the block size, GQA group and query length only change loop trip
// counts, so on the CPU they are run-time arguments; the pool formats are template instances of the same code
// (gaugecompile/kv_format.py: float16/bfloat16 rows are widened to float32, int8/float8/int4 codes dequantized with
// their scales, per row in registers; float64 stays float64), and the queries are read and the output written in
// the accumulation type whatever the model's dtype.  That keeps the number of compilations at the number of head
// dims a process meets.
//
// Design of `attention` (one call per layer):
// - Entry j of a row holds slots [0, lens[j]) of its block (the op's mapping).  Rows of equal view length whose
//   leading entries are the same physical blocks with the same deltas and counts (beams, samples, a shared
//   prompt) form a *shared segment*, read once with all their query rows stacked (cascade attention); each row
//   then goes on over its own blocks.  The GQA group is folded into the query rows, so a K/V row is loaded once
//   per KV head and meets every query head of its group.
// - Each segment is cut into KV splits by block ranges; (segment, split) items are taken by the threads of
//   `at::parallel_for` from an atomic counter (the items differ in cost), each keeping an online softmax (running
//   max, sum, weighted values) per query row, and a final pass merges the partial results of each row by
//   log-sum-exp.  An item walks its view in chunks of up to 64 consecutive tokens (about 256 KB of K and V rows),
//   cut across table entries (so the softmax update and the rescale are paid per chunk, not per block), scoring
//   each chunk token by token over all KV heads: it reads each pool block front to back (the pool is [blocks,
//   tokens, heads, dim]), and a fragmented table costs a jump per block, not one per row of every head.
// - Where the accumulation is float32 (float32, float16 and bfloat16 pools) and the head dim is whole registers
//   (16 lanes on AVX-512, 8 on AVX2: the source is compiled for the machine it runs on), a tile scores W / 4 keys
//   against up to 4 query rows (one transposing reduction for W dot products) and the weighted values of a head's
//   rows are added together (a value row is loaded once per head, not once per query row); the tile shapes keep
//   every accumulator in a register on either width.  float64 and other head dims take a row at a time.
// - The next chunk's K and V rows are prefetched while the current one is scored (the hardware prefetchers do not
//   follow the values' head-major walk, nor the keys across a fragmented table's jumps).
// - The extension is built with -fopenmp: `at::parallel_for` is an inline `#pragma omp parallel` in ATen's header.
// - Blocks are read in place through the block table (no gather copy).  The query rows are rotated by R(-delta)
//   when the delta changes from one entry to the next (once per run of equal deltas, not at all at delta 0, one
//   vectorised loop per pairing), with the cos/sin of the exact float64 angle reduction computed once per forward
//   on the host (gaugecompile.rope.block_angles), as the Triton kernels read theirs.

// Substitution points: the rendered source defines them first.
#ifndef GAUGE_HEAD_DIM
#define GAUGE_HEAD_DIM 64  // the spec's head dim
#endif
#ifndef GAUGE_NAMESPACE
#define GAUGE_NAMESPACE gauge_cpu_template  // the torch.ops namespace of this head dim's library
#endif
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>
#if defined(__F16C__) || defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t D = GAUGE_HEAD_DIM;
// value rows of a chunk held as pointers at once (heads beyond it take another pass over the chunk)
constexpr int64_t MAX_KV_HEADS_PER_PASS = 16;
constexpr int64_t CHUNK = 64;  // keys per softmax update (a whole number of registers of any width below)
constexpr int64_t CHUNK_BYTES = 256 << 10;  // K and V bytes a chunk aims at (fewer tokens where rows are wide)

template <typename S> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// The pool formats of gaugecompile/kv_format.py, each a row of D channels as stored (`Elem`s, `packing` channels an
// element) and, for the compressed ones, `scaled`: one bfloat16 scale per group of GROUP channels in a scale tensor
// beside the pool.  `load` widens a row to the accumulation type in registers; every format's values are exact
// float32 products of a code and a scale, so this equals kv_format.dequantize bit for bit.
constexpr int64_t GROUP = D % 32 == 0 ? 32 : D;  // channels per scale (kv_format.group_size)
constexpr int64_t GROUPS = D / GROUP;
template <typename E> struct FloatPool {
  using Elem = E;
  static constexpr bool scaled = false;
  static constexpr int64_t width = D;  // elements of a row
};
struct Int8Pool {
  using Elem = int8_t;
  static constexpr bool scaled = true;
  static constexpr int64_t width = D;
};
struct Fp8Pool {  // float8_e4m3fn, read as its bits
  using Elem = uint8_t;
  static constexpr bool scaled = true;
  static constexpr int64_t width = D;
};
struct Int4Pool {  // codes + 8 in nibbles: byte i of a group holds channels i (low) and i + GROUP / 2 (high)
  using Elem = uint8_t;
  static constexpr bool scaled = true;
  static constexpr int64_t width = D / 2;
};
using Scale = uint16_t;  // bfloat16 bits
template <typename P> constexpr int64_t row_bytes() {
  return P::width * static_cast<int64_t>(sizeof(typename P::Elem)) + (P::scaled ? GROUPS * 2 : 0);
}

inline float bf16_bits(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(float));
  return f;
}

// float8 e4m3fn bits to float: normal numbers by moving the exponent and mantissa into place (bias 7 -> 127),
// subnormals (exponent 0) as mantissa * 2^-9; branch-free, so the loop over a row vectorises.  (0x7f/0xff are NaN
// in e4m3fn; kv_format never writes them.)
inline float fp8_bits(uint8_t b) {
  const uint32_t em = b & 0x7fu;
  uint32_t u = (em << 20) + (120u << 23);
  float f;
  std::memcpy(&f, &u, sizeof(float));
  const float sub = static_cast<float>(em) * 0.001953125f;
  f = em < 8 ? sub : f;
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(float));
  bits |= static_cast<uint32_t>(b & 0x80u) << 24;
  std::memcpy(&f, &bits, sizeof(float));
  return f;
}

// Widen one row to the accumulation type A (sc: the row's scales, unused by float formats).
template <typename P, typename A> inline void load_row(const typename P::Elem* src, const Scale* sc, A* dst) {
  if constexpr (std::is_same_v<P, Int8Pool>) {
    for (int64_t g = 0; g < GROUPS; ++g) {
      const float s = bf16_bits(sc[g]);
#pragma omp simd
      for (int64_t i = 0; i < GROUP; ++i) dst[g * GROUP + i] = static_cast<float>(src[g * GROUP + i]) * s;
    }
  } else if constexpr (std::is_same_v<P, Fp8Pool>) {
    for (int64_t g = 0; g < GROUPS; ++g) {
      const float s = bf16_bits(sc[g]);
#pragma omp simd
      for (int64_t i = 0; i < GROUP; ++i) dst[g * GROUP + i] = fp8_bits(src[g * GROUP + i]) * s;
    }
  } else if constexpr (std::is_same_v<P, Int4Pool>) {
    constexpr int64_t H2 = GROUP / 2;
    for (int64_t g = 0; g < GROUPS; ++g) {
      const float s = bf16_bits(sc[g]);
      const uint8_t* b = src + g * H2;
      float* o = dst + g * GROUP;
#pragma omp simd
      for (int64_t i = 0; i < H2; ++i) {
        o[i] = (static_cast<float>(b[i] & 15) - 8.0f) * s;
        o[H2 + i] = (static_cast<float>(b[i] >> 4) - 8.0f) * s;
      }
    }
  } else if constexpr (std::is_same_v<typename P::Elem, c10::BFloat16>) {
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
    for (int64_t d = 0; d < D; ++d) dst[d] = bf16_bits(bits[d]);
#if defined(__F16C__)
  } else if constexpr (std::is_same_v<typename P::Elem, c10::Half>) {
    int64_t d = 0;
    for (; d + 8 <= D; d += 8)
      _mm256_storeu_ps(dst + d, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + d))));
    for (; d < D; ++d) dst[d] = static_cast<float>(src[d]);
#endif
  } else {
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<A>(src[d]);
  }
}

// A row of the pool in the accumulation type: the row itself when it is stored so, else widened into buf.
template <typename P, typename A> inline const A* row(const typename P::Elem* src, const Scale* sc, A* buf) {
  if constexpr (std::is_same_v<P, FloatPool<A>>) {
    return src;
  } else {
    load_row<P, A>(src, sc, buf);
    return buf;
  }
}

// out[n] = q_n . k for N query rows (rows D apart), N independent accumulator chains.
template <int N, typename A> inline void dot_n(const A* q, const A* k, A* out) {
  A s[N][8] = {};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    for (int n = 0; n < N; ++n) {
      const A* qn = q + n * D + d;
#pragma omp simd
      for (int w = 0; w < 8; ++w) s[n][w] += qn[w] * k[d + w];
    }
  }
  for (int n = 0; n < N; ++n) {
    A total = 0;
    for (int w = 0; w < 8; ++w) total += s[n][w];
    for (int64_t e = d; e < D; ++e) total += q[n * D + e] * k[e];
    out[n] = total;
  }
}

// Ask for one row of D elements (every cache line of it) to be brought into L2.  An asm statement, not
// __builtin_prefetch: GCC 12's dead code elimination drops the builtin from this kernel's loops (the object then
// held no prefetch instruction at all), and a volatile asm is never dropped.
template <typename P> inline void prefetch_row(const typename P::Elem* row) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t d = 0; d < P::width * static_cast<int64_t>(sizeof(typename P::Elem)); d += 64) {
#if defined(__x86_64__) || defined(__i386__)
    asm volatile("prefetcht1 %0" : : "m"(p[d]));
#elif defined(__aarch64__)
    asm volatile("prfm pldl2keep, %0" : : "Q"(p[d]));
#else
    __builtin_prefetch(p + d, 0, 2);
#endif
  }
}

// One register of the machine the source is compiled for (-march=native): AVX-512 has 32 registers of 64 bytes,
// AVX2 16 of 32 bytes.  The tiles below are sized from these two numbers, so neither spills to the stack.
#if defined(__AVX512F__)
constexpr int VBYTES = 64;
#else
constexpr int VBYTES = 32;
#endif
template <typename A> struct Vec { typedef A type __attribute__((vector_size(VBYTES))); };

// a <- alpha * a + sum_t p[t] * v_t for one query row: the row's D accumulators stay in registers while the
// chunk's value rows stream past (one store per row and chunk, not one per token).
template <typename A>
inline void add_values(A* a, A alpha, const A* p, const A* const* vrows, int64_t nc, int64_t stride, int64_t h) {
  using V = typename Vec<A>::type;
  constexpr int64_t W = sizeof(V) / sizeof(A);
  if constexpr (D % W == 0) {
    V acc[D / W];
    for (int64_t i = 0; i < D / W; ++i) {
      std::memcpy(&acc[i], a + i * W, sizeof(V));
      acc[i] *= alpha;
    }
    for (int64_t t = 0; t < nc; ++t) {
      const A pt = p[t];
      if (pt == A(0)) continue;
      const A* vr = vrows[t * stride + h];
      for (int64_t i = 0; i < D / W; ++i) {
        V v;
        std::memcpy(&v, vr + i * W, sizeof(V));
        acc[i] += pt * v;
      }
    }
    for (int64_t i = 0; i < D / W; ++i) std::memcpy(a + i * W, &acc[i], sizeof(V));
  } else {
    for (int64_t d = 0; d < D; ++d) a[d] *= alpha;
    for (int64_t t = 0; t < nc; ++t) {
      const A pt = p[t];
      const A* vr = vrows[t * stride + h];
      for (int64_t d = 0; d < D; ++d) a[d] += pt * vr[d];
    }
  }
}

// Calls tile(N, r) over rows [0, rows) in tiles of 4 rows and one last tile of 1-3 (N a compile-time count).
template <typename F> inline void in_fours(int64_t rows, F&& tile) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) tile(std::integral_constant<int, 4>{}, r);
  switch (rows - r) {
    case 3: tile(std::integral_constant<int, 3>{}, r); break;
    case 2: tile(std::integral_constant<int, 2>{}, r); break;
    case 1: tile(std::integral_constant<int, 1>{}, r); break;
    default: break;
  }
}

// float32 tiles, for head dims that are whole registers of W lanes: `score_tile` computes R query rows against
// K = W / 4 keys (4K = W accumulators over the head dim, then one transposing reduction of all of them into one
// register of W dot products), and `value_tile` adds R rows' weighted values in slices of SLICE registers, so a
// value row is loaded once for the R rows of its head instead of once per row.  Registers in use: 4K + K + 1
// for the scores, 4 * SLICE + SLICE for the values (AVX-512: 21 and 20 of 32; AVX2: 11 and 15 of 16).
using VF = Vec<float>::type;
constexpr int W = VBYTES / 4;
constexpr int TILE_KEYS = W / 4;
typedef int32_t VI __attribute__((vector_size(VBYTES)));
constexpr bool FLOAT_TILES = D % W == 0;
// The widest slice (at most 4 registers on AVX-512, 3 on AVX2) that divides the head dim's registers evenly, so
// every loop over a slice has a compile-time trip count and its accumulators stay in registers.
constexpr int slice_registers() {
  for (int s = W == 16 ? 4 : 3; s > 1; --s) {
    if ((D / W) % s == 0) return s;
  }
  return 1;
}
constexpr int SLICE = slice_registers();

inline VF loadf(const float* p) {
  VF v;
  std::memcpy(&v, p, sizeof(VF));
  return v;
}

// W channels [d, d + W) of a stored row as float32 lanes, straight from the pool (no widened copy of the row): the
// tiles below read every format this way where `direct<P>` (codes times their group's scale, exact as load_row).
// W bytes widened to W 32-bit lanes, sign- or zero-extended: one instruction (vpmovsxbd / vpmovzxbd) where the
// machine has it (GCC's __builtin_convertvector from 8-bit lanes measured scalarised).
template <bool SIGNED> inline VI widen_bytes(const void* p) {
  VI v;
#if defined(__AVX512F__)
  const __m128i b = _mm_loadu_si128(static_cast<const __m128i*>(p));
  const __m512i w = SIGNED ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b);
  std::memcpy(&v, &w, sizeof(VI));
#elif defined(__AVX2__)
  const __m128i b = _mm_loadl_epi64(static_cast<const __m128i*>(p));
  const __m256i w = SIGNED ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b);
  std::memcpy(&v, &w, sizeof(VI));
#else
  for (int i = 0; i < W; ++i) {
    v[i] = SIGNED ? static_cast<int32_t>(static_cast<const int8_t*>(p)[i]) : static_cast<const uint8_t*>(p)[i];
  }
#endif
  return v;
}

// W 16-bit values: bfloat16 bits widened to float32 lanes (a shift), or float16 bits converted (F16C).
template <bool HALF> inline VF widen_halves(const void* p) {
#if defined(__AVX512F__)
  const __m256i h = _mm256_loadu_si256(static_cast<const __m256i*>(p));
  const __m512 f = HALF ? _mm512_cvtph_ps(h) : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
#elif defined(__AVX2__) && defined(__F16C__)
  const __m128i h = _mm_loadu_si128(static_cast<const __m128i*>(p));
  const __m256 f = HALF ? _mm256_cvtph_ps(h) : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
#else
  VF f;
  for (int i = 0; i < W; ++i) {
    const uint16_t bits = static_cast<const uint16_t*>(p)[i];
    f[i] = HALF ? static_cast<float>(c10::Half(bits, c10::Half::from_bits())) : bf16_bits(bits);
  }
#endif
  VF v;
  std::memcpy(&v, &f, sizeof(VF));
  return v;
}

// W float8 e4m3fn values as float16 bits in 16-bit lanes: exponent and mantissa moved up 7 bits (0x7f << 7), the
// sign to bit 15.  That float16 is the e4m3fn value times 2^-8 for normal and subnormal values alike (the exponent
// biases differ by 8), so the caller scales by 2^8.
inline VF fp8_lanes(const uint8_t* p) {
#if defined(__AVX512F__)
  const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x7f)), 7),
                                    _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x80)), 8));
  const __m512 f = _mm512_cvtph_ps(h);
#elif defined(__AVX2__) && defined(__F16C__)
  const __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m128i h = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x7f)), 7),
                                 _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x80)), 8));
  const __m256 f = _mm256_cvtph_ps(h);
#else
  VF f;
  for (int i = 0; i < W; ++i) f[i] = fp8_bits(p[i]) * 0.00390625f;
#endif
  VF v;
  std::memcpy(&v, &f, sizeof(VF));
  return v;
}

template <typename P> constexpr bool direct() {
  if constexpr (std::is_same_v<P, Int4Pool>) {
    return FLOAT_TILES && (GROUP / 2) % W == 0;  // a vector's channels lie in one half of a group (one nibble)
  } else {
    return FLOAT_TILES && !std::is_same_v<typename P::Elem, double>;
  }
}
template <typename P> inline VF load_vec(const typename P::Elem* row, const Scale* sc, int64_t d) {
  if constexpr (std::is_same_v<P, FloatPool<float>>) {
    return loadf(row + d);
  } else if constexpr (std::is_same_v<P, FloatPool<c10::BFloat16>>) {
    return widen_halves<false>(row + d);
  } else if constexpr (std::is_same_v<P, FloatPool<c10::Half>>) {
    return widen_halves<true>(row + d);
  } else if constexpr (std::is_same_v<P, Int8Pool>) {
    return __builtin_convertvector(widen_bytes<true>(row + d), VF) * bf16_bits(sc[d / GROUP]);
  } else if constexpr (std::is_same_v<P, Fp8Pool>) {
    return fp8_lanes(row + d) * (bf16_bits(sc[d / GROUP]) * 256.0f);
  } else {  // Int4Pool
    constexpr int64_t H2 = GROUP / 2;
    const int64_t g = d / GROUP, o = d % GROUP;
    const VI b = widen_bytes<false>(row + g * H2 + o % H2);
    const VI nib = o < H2 ? (b & 15) : (b >> 4);
    return __builtin_convertvector(nib - 8, VF) * bf16_bits(sc[g]);
  }
}

// exp of W lanes, each x <= 0 (scores minus their running max): Cephes' polynomial, 2 ulp.  x is clamped to -88,
// where the exponent bits below come out as those of +0, so exp(-inf) = 0 exactly.
inline VF exp_lanes(VF x) {
  const VF lowest = VF{} - 88.0f;
  x = x < lowest ? lowest : x;
  const VF y = x * 1.44269504088896341f + 0.5f;
  VF n = __builtin_convertvector(__builtin_convertvector(y, VI), VF);  // truncated toward zero, then floored
  n = n > y ? n - 1.0f : n;
  const VF r = x - n * 0.693359375f + n * 2.12194440e-4f;
  VF p = VF{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const VI bits = (__builtin_convertvector(n, VI) + 127) << 23;
  VF scale;
  std::memcpy(&scale, &bits, sizeof(VF));
  return p * scale;
}
inline float exp_acc(float x) { return exp_lanes(VF{} + x)[0]; }
inline double exp_acc(double x) { return std::exp(x); }

// One query row's probabilities over a chunk, in place of its scores: exp(s - m_new) for the visible keys
// [lo, hi), 0 for the others (and, in float32, for the padding up to whole registers: the score rows are CHUNK
// long).  Returns m_new, the larger of m_old and the visible scores, and adds the probabilities to `total`.
template <typename A> inline A chunk_probs(A* s, int64_t lo, int64_t hi, int64_t nc, A m_old, A& total) {
  constexpr A neg_inf = -std::numeric_limits<A>::infinity();
  if constexpr (std::is_same_v<A, float>) {
    const int64_t padded = (nc + W - 1) / W * W;
    std::fill(s, s + lo, neg_inf);
    std::fill(s + hi, s + padded, neg_inf);
    VF mv = VF{} + m_old;
    for (int64_t t = 0; t < padded; t += W) {
      const VF x = loadf(s + t);
      mv = x > mv ? x : mv;
    }
    float m_new = mv[0];
    for (int i = 1; i < W; ++i) m_new = std::max(m_new, mv[i]);
    VF sum = {};
    for (int64_t t = 0; t < padded; t += W) {
      const VF e = exp_lanes(loadf(s + t) - m_new);
      std::memcpy(s + t, &e, sizeof(VF));
      sum += e;
    }
    for (int i = 0; i < W; ++i) total += sum[i];
    return m_new;
  } else {
    A m_new = m_old;
    for (int64_t t = lo; t < hi; ++t) m_new = std::max(m_new, s[t]);
    for (int64_t t = lo; t < hi; ++t) {
      s[t] = exp_acc(s[t] - m_new);
      total += s[t];
    }
    std::fill(s, s + lo, A(0));
    std::fill(s + hi, s + nc, A(0));
    return m_new;
  }
}

// Two-source lane shuffles with literal lane lists (GCC and Clang spell them differently).
#if defined(__clang__)
#define SHUFFLE2(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE2(a, b, ...) __builtin_shuffle(a, b, VI{__VA_ARGS__})
#endif
// One halving step over N vectors: vector i of the result holds, lane by lane, partial sums of the lanes of
// v[2i] (its first half of lanes) and of v[2i + 1] (its second half).  After log2(W) steps, lane i of the one
// vector left is the sum of the lanes of input i.
#define FOLD(N, LO, HI) \
  for (int i = 0; i < (N) / 2; ++i) v[i] = SHUFFLE2(v[2 * i], v[2 * i + 1], LO) + SHUFFLE2(v[2 * i], v[2 * i + 1], HI)
#define L(...) __VA_ARGS__

// Lane i of the result: the sum of the W lanes of v[i] (v: W registers, overwritten).
inline VF reduce_lanes(VF* v) {
#if defined(__AVX512F__)
  FOLD(16, L(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23),
       L(8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31));
  FOLD(8, L(0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27),
       L(4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31));
  FOLD(4, L(0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29),
       L(2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31));
  FOLD(2, L(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30),
       L(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31));
#else
  FOLD(8, L(0, 1, 2, 3, 8, 9, 10, 11), L(4, 5, 6, 7, 12, 13, 14, 15));
  FOLD(4, L(0, 1, 4, 5, 8, 9, 12, 13), L(2, 3, 6, 7, 10, 11, 14, 15));
  FOLD(2, L(0, 2, 4, 6, 8, 10, 12, 14), L(1, 3, 5, 7, 9, 11, 13, 15));
#endif
  return v[0];
}
#undef L
#undef FOLD
#undef SHUFFLE2

// out[r * out_stride + t] = q_r . k_t for R rows (D apart) and the first `tn` of TILE_KEYS keys (rows of format P,
// with their scales ks).
template <int R, typename P>
inline void score_tile(const float* q, const typename P::Elem* const* k, const Scale* const* ks, int64_t tn,
                       float* out, int64_t out_stride) {
  VF acc[W] = {};
  for (int64_t d = 0; d < D; d += W) {
    VF qv[R];
    for (int r = 0; r < R; ++r) qv[r] = loadf(q + r * D + d);
    for (int t = 0; t < TILE_KEYS; ++t) {
      const VF kv = load_vec<P>(k[t], ks[t], d);
      for (int r = 0; r < R; ++r) acc[TILE_KEYS * r + t] += qv[r] * kv;
    }
  }
  const VF sums = reduce_lanes(acc);
  for (int r = 0; r < R; ++r) {
    for (int64_t t = 0; t < tn; ++t) out[r * out_stride + t] = sums[TILE_KEYS * r + t];
  }
}

template <typename P>
inline void score_rows(const float* q, int64_t rows, const typename P::Elem* const* k, const Scale* const* ks,
                       int64_t tn, float* out, int64_t out_stride) {
  in_fours(rows, [&](auto tile_rows, int64_t r) {
    constexpr int n = decltype(tile_rows)::value;
    score_tile<n, P>(q + r * D, k, ks, tn, out + r * out_stride, out_stride);
  });
}

// a_r <- alpha_r * a_r + sum_t p_r[t] * v_t for R rows of one head (accumulators D apart, probabilities
// p_stride apart), the value rows of the chunk read once per slice of SLICE registers.
template <int R, typename P>
inline void value_tile(float* a, const float* alpha, const float* p, int64_t p_stride,
                       const typename P::Elem* const* vrows, const Scale* const* vscales, int64_t nc, int64_t stride,
                       int64_t h) {
  for (int64_t s0 = 0; s0 < D; s0 += SLICE * W) {
    VF acc[R][SLICE];
    for (int r = 0; r < R; ++r) {
      for (int i = 0; i < SLICE; ++i) acc[r][i] = loadf(a + r * D + s0 + W * i) * alpha[r];
    }
    for (int64_t t = 0; t < nc; ++t) {
      const typename P::Elem* vr = vrows[t * stride + h];
      const Scale* vs = vscales[t * stride + h];
      VF v[SLICE];
      for (int i = 0; i < SLICE; ++i) v[i] = load_vec<P>(vr, vs, s0 + W * i);
      for (int r = 0; r < R; ++r) {
        const float pt = p[r * p_stride + t];
        for (int i = 0; i < SLICE; ++i) acc[r][i] += pt * v[i];
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int i = 0; i < SLICE; ++i) std::memcpy(a + r * D + s0 + W * i, &acc[r][i], sizeof(VF));
    }
  }
}

template <typename P>
inline void value_rows(float* a, const float* alpha, const float* p, int64_t p_stride, int64_t rows,
                       const typename P::Elem* const* vrows, const Scale* const* vscales, int64_t nc, int64_t stride,
                       int64_t h) {
  in_fours(rows, [&](auto tile_rows, int64_t r) {
    constexpr int n = decltype(tile_rows)::value;
    value_tile<n, P>(a + r * D, alpha + r, p + r * p_stride, p_stride, vrows, vscales, nc, stride, h);
  });
}

template <typename A> inline void dots(const A* q, int64_t rows, const A* k, A* out, int64_t out_stride) {
  in_fours(rows, [&](auto tile_rows, int64_t r) {
    constexpr int n = decltype(tile_rows)::value;
    A tmp[4];
    dot_n<n>(q + r * D, k, tmp);
    for (int i = 0; i < n; ++i) out[(r + i) * out_stride] = tmp[i];
  });
}

// y <- R(sign * angle) x on the rotary pairs: rotate-half (f, f + F) or interleaved (2f, 2f + 1), both within the
// first 2F dims; the rest is copied.  The query is rotated back (sign -1), a materialised key forward to its logical
// position (sign +1).  One loop per pairing, so each vectorises (a fragmented table rotates every block's rows).
template <typename A>
inline void rotate(const A* x, A* y, const A* cs, const A* sn, int64_t half, bool interleaved, A sign) {
  std::memcpy(y + 2 * half, x + 2 * half, sizeof(A) * (D - 2 * half));
  if (interleaved) {
#pragma omp simd
    for (int64_t f = 0; f < half; ++f) {
      const A a = x[2 * f], b = x[2 * f + 1], s = sign * sn[f];
      y[2 * f] = a * cs[f] - b * s;
      y[2 * f + 1] = b * cs[f] + a * s;
    }
  } else {
    const A* x2 = x + half;
    A* y2 = y + half;
#pragma omp simd
    for (int64_t f = 0; f < half; ++f) {
      const A s = sign * sn[f];
      y[f] = x[f] * cs[f] - x2[f] * s;
      y2[f] = x2[f] * cs[f] + x[f] * s;
    }
  }
}

struct Item {
  int64_t seg;     // segment index
  int64_t j0, j1;  // logical block range
  int64_t part;    // offset of its partial results (rows * (D + 2) accumulators)
};

// Up to CHUNK consecutive view tokens of an item, from one or more table entries: each token's K and V rows (of head
// 0) with their scales (compressed formats), and the runs of equal deltas (each run's tokens are scored with one
// rotation of the query).
template <typename P> struct ChunkRows {
  using E = typename P::Elem;
  int64_t n = 0;              // tokens
  int64_t pos = 0;            // view position of the first
  int64_t runs = 0;           // runs of equal deltas
  int64_t run_entry[CHUNK];   // a table entry of each run (its delta and angles)
  int64_t run_end[CHUNK];     // the token after each run
  const E* k[CHUNK];
  const E* v[CHUNK];
  const Scale* ks[CHUNK] = {};  // null for float formats (their rows have no scales)
  const Scale* vs[CHUNK] = {};
};

struct Segment {
  int64_t first, count;  // rows of the batch, as positions in `order`
  int64_t rep;           // the batch row whose table, deltas and counts the segment reads
  int64_t j0, j1;        // table entries
  int64_t length;        // view length of its rows
};

// Query rows of a segment are ordered (KV head h, segment row i, head g of the group, token t), so the rows
// that meet one K/V row are contiguous.
inline int64_t row_index(int64_t h, int64_t i, int64_t g, int64_t t, int64_t count, int64_t G, int64_t Q) {
  return ((h * count + i) * G + g) * Q + t;
}

// The view of every row, read from the mapping and checked where it is read: a compiled graph or an exported
// program calls this kernel without the Python wrapper.  Counts inside [0, block_size], view lengths at least
// `min_length` (and equal to `length` where the op has one), ids inside the pool and deltas inside the range
// where angles are exact ([-2^31, 2^31), gaugecompile.rope.MAX_ABS_DELTA) for every entry holding tokens.
// O(blocks), next to O(blocks * d).
struct Views {
  std::vector<int64_t> start;   // [B * width]: view position of each entry's first token
  std::vector<int64_t> length;  // [B]: tokens of each view
  std::vector<int64_t> used;    // [B]: entries up to the last one holding tokens
};

Views read_views(const at::Tensor& table, const at::Tensor& block_delta, const at::Tensor& lens, int64_t min_length,
                 int64_t length, int64_t num_blocks, int64_t bs) {
  const int64_t B = table.size(0), width = table.size(1);
  const int64_t* tp = table.const_data_ptr<int64_t>();
  const int64_t* dp = block_delta.const_data_ptr<int64_t>();
  const int64_t* lp = lens.const_data_ptr<int64_t>();
  const int64_t bound = int64_t(1) << 31;
  Views v{std::vector<int64_t>(B * width), std::vector<int64_t>(B), std::vector<int64_t>(B)};
  for (int64_t b = 0; b < B; ++b) {
    int64_t total = 0, used = 0;
    for (int64_t j = 0; j < width; ++j) {
      const int64_t n = lp[b * width + j], id = tp[b * width + j], delta = dp[b * width + j];
      TORCH_CHECK_VALUE(n >= 0 && n <= bs, "block_lens: row ", b, ", entry ", j, " holds ", n,
                        " tokens; expected a count in [0, block_size=", bs, "]");
      v.start[b * width + j] = total;
      if (n == 0) continue;
      TORCH_CHECK_VALUE(id >= 0 && id < num_blocks, "block_table: row ", b, ", entry ", j, " is ", id,
                        "; expected a block id in [0, num_blocks=", num_blocks, ")");
      TORCH_CHECK_VALUE(delta >= -bound && delta < bound, "block_delta: row ", b, ", entry ", j, " is ", delta,
                        "; expected -2^31 <= delta < 2^31 (where angles are exact)");
      total += n;
      used = j + 1;
    }
    TORCH_CHECK_VALUE(total >= min_length, "block_lens: row ", b, " holds ", total,
                      " tokens; expected at least the ", min_length, " query tokens");
    TORCH_CHECK_VALUE(length < 0 || total == length, "block_lens: row ", b, " holds ", total,
                      " tokens; expected length=", length);
    v.length[b] = total;
    v.used[b] = used;
  }
  return v;
}

// A pool's elements and its scales (nullptr for float formats) as the kernels read them.
template <typename P> struct PoolRows {
  const typename P::Elem* data;
  int64_t s0, s1, s2;  // strides of blocks, tokens and heads, in elements
  const Scale* scales;
  int64_t c0, c1, c2;
  PoolRows(const at::Tensor& pool, const at::Tensor& scale)
      : data(static_cast<const typename P::Elem*>(pool.const_data_ptr())),
        s0(pool.stride(0)), s1(pool.stride(1)), s2(pool.stride(2)),
        scales(P::scaled ? static_cast<const Scale*>(scale.const_data_ptr()) : nullptr),
        c0(P::scaled ? scale.stride(0) : 0), c1(P::scaled ? scale.stride(1) : 0), c2(P::scaled ? scale.stride(2) : 0) {}
  const typename P::Elem* at(int64_t block, int64_t token) const { return data + block * s0 + token * s1; }
  const Scale* scales_at(int64_t block, int64_t token) const {
    return P::scaled ? scales + block * c0 + token * c1 : nullptr;
  }
  const Scale* head_scales(const Scale* token_scales, int64_t h) const {
    return P::scaled ? token_scales + h * c2 : nullptr;
  }
};

// q, out: the accumulation type A (float, or double over float64 pools); the pools: format P.
template <typename P>
void attention_impl(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                    const at::Tensor& k_scale, const at::Tensor& v_scale,
                    const at::Tensor& table, const at::Tensor& block_delta, const at::Tensor& lens,
                    const at::Tensor& cos, const at::Tensor& sin, double scale, bool causal, int64_t window,
                    double softcap, bool interleaved, const at::Tensor& out, const at::Tensor& lse) {
  using E = typename P::Elem;
  using A = typename Acc<E>::type;
  const int64_t B = q.size(0), H = q.size(1), Q = q.size(2);
  const int64_t bs = k_pool.size(1), Hkv = k_pool.size(2), G = H / Hkv;
  const int64_t width = table.size(1);
  const bool rotated = cos.numel() > 0;
  const int64_t half = rotated ? cos.size(2) : 0;
  const A* qp = q.const_data_ptr<A>();
  const PoolRows<P> kr(k_pool, k_scale), vr(v_pool, v_scale);
  const int64_t ks2 = kr.s2, vs2 = vr.s2;
  const int64_t* tp = table.const_data_ptr<int64_t>();
  const int64_t* dp = block_delta.const_data_ptr<int64_t>();
  const int64_t* lp = lens.const_data_ptr<int64_t>();
  const A* cp = rotated ? cos.const_data_ptr<A>() : nullptr;
  const A* sp = rotated ? sin.const_data_ptr<A>() : nullptr;
  A* op = out.data_ptr<A>();
  A* lsep = lse.data_ptr<A>();
  const Views views = read_views(table, block_delta, lens, Q, -1, k_pool.size(0), bs);
  const int64_t* vlen = views.length.data();

  // Rows grouped by view length; within a group, the leading entries all rows share form one segment.
  std::vector<int64_t> order(B);
  for (int64_t b = 0; b < B; ++b) order[b] = b;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return vlen[a] < vlen[b]; });
  std::vector<Segment> segs;
  for (int64_t g0 = 0; g0 < B;) {
    int64_t g1 = g0 + 1;
    while (g1 < B && vlen[order[g1]] == vlen[order[g0]]) ++g1;
    const int64_t length = vlen[order[g0]];
    const int64_t r0 = order[g0];
    int64_t common = views.used[r0];
    for (int64_t i = g0 + 1; i < g1; ++i) common = std::min(common, views.used[order[i]]);
    int64_t shared = 0;
    while (g1 - g0 > 1 && shared < common) {
      bool same = true;
      const int64_t e0 = r0 * width + shared;
      for (int64_t i = g0 + 1; i < g1 && same; ++i) {
        const int64_t e = order[i] * width + shared;
        same = tp[e] == tp[e0] && dp[e] == dp[e0] && lp[e] == lp[e0];
      }
      if (!same) break;
      ++shared;
    }
    if (shared > 0) segs.push_back({g0, g1 - g0, r0, 0, shared, length});
    for (int64_t i = g0; i < g1; ++i) {
      if (shared < views.used[order[i]]) segs.push_back({i, 1, order[i], shared, views.used[order[i]], length});
    }
    g0 = g1;
  }
  if (window > 0) {  // a sliding window: leading entries that no query of a segment sees are never read
    for (auto& s : segs) {
      const int64_t last_hidden = s.length - Q - window;  // the last view position hidden from every query
      while (s.j0 < s.j1 && views.start[s.rep * width + s.j0] + lp[s.rep * width + s.j0] - 1 <= last_hidden) ++s.j0;
    }
  }

  // Tokens per chunk: about CHUNK_BYTES of K and V rows, at most CHUNK (the next chunk is prefetched into L2 while one
  // is read; a longer lookahead measured slower).
  const int64_t token_bytes = 2 * Hkv * row_bytes<P>();
  int64_t chunk_len = CHUNK;
  while (chunk_len > 8 && chunk_len * token_bytes > CHUNK_BYTES) chunk_len /= 2;

  // KV splits: enough items for every thread to take several, none shorter than MIN_SPLIT_TOKENS keys.
  constexpr int64_t MIN_SPLIT_TOKENS = 256;
  int64_t total_work = 0;
  for (const auto& s : segs) total_work += (s.j1 - s.j0) * s.count;
  const int64_t threads = at::get_num_threads();
  const int64_t target = 8 * threads;
  const int64_t min_blocks = std::max<int64_t>(1, MIN_SPLIT_TOKENS / bs);
  std::vector<Item> items;
  int64_t part_size = 0;
  for (int64_t si = 0; si < static_cast<int64_t>(segs.size()); ++si) {
    const auto& s = segs[si];
    const int64_t n = s.j1 - s.j0;
    const int64_t want = (target * n * s.count + total_work - 1) / std::max<int64_t>(total_work, 1);
    const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(want, n / min_blocks));
    const int64_t per = (n + splits - 1) / splits;
    for (int64_t j = s.j0; j < s.j1; j += per) {
      items.push_back({si, j, std::min(s.j1, j + per), part_size});
      part_size += s.count * H * Q * (D + 2);
    }
  }
  std::vector<A> parts(part_size);
  const A neg_inf = -std::numeric_limits<A>::infinity();

  std::atomic<int64_t> next{0};
  const int64_t n_items = static_cast<int64_t>(items.size());
  at::parallel_for(0, std::min(threads, n_items), 1, [&](int64_t, int64_t) {
    std::vector<A> qs, qr, sc, scale_by, kb(TILE_KEYS * D), vb;  // kb/vb: rows widened from other formats
    if constexpr (!std::is_same_v<P, FloatPool<A>> && !direct<P>()) {
      vb.resize(CHUNK * std::min<int64_t>(Hkv, MAX_KV_HEADS_PER_PASS) * D);
    }
    std::vector<char> live;
    ChunkRows<P> chunk_rows[2];  // the chunk being read and the next one (prefetched meanwhile)
    for (int64_t it; (it = next.fetch_add(1)) < n_items;) {
      const Item& item = items[it];
      const Segment& s = segs[item.seg];
      const int64_t per_head = s.count * G * Q;  // rows that meet one K/V head
      const int64_t rows = Hkv * per_head;
      qs.resize(rows * D);
      qr.resize(rows * D);
      sc.resize(rows * CHUNK);
      scale_by.resize(rows);
      live.resize(rows);
      for (int64_t h = 0; h < Hkv; ++h) {  // pre-scaled query rows
        for (int64_t i = 0; i < s.count; ++i) {
          const int64_t b = order[s.first + i];
          for (int64_t g = 0; g < G; ++g) {
            for (int64_t t = 0; t < Q; ++t) {
              const A* src = qp + ((b * H + h * G + g) * Q + t) * D;
              A* dst = qs.data() + row_index(h, i, g, t, s.count, G, Q) * D;
              for (int64_t d = 0; d < D; ++d) dst[d] = src[d] * static_cast<A>(scale);
            }
          }
        }
      }
      A* m = parts.data() + item.part;
      A* l = m + rows;
      A* acc = l + rows;
      std::fill(m, m + rows, neg_inf);
      std::fill(l, l + rows, A(0));
      std::fill(acc, acc + rows * D, A(0));
      const A* qcur = nullptr;
      int64_t cur_delta = 0;
      const int64_t q0 = s.length - Q;
      // Chunks of up to chunk_len consecutive view tokens, cut across table entries (the softmax update, the rescale
      // and the accumulators' loads and stores are paid once per chunk, not once per block): `fill` takes the
      // next one from the cursor (entry cj, token cc of it); n = 0 at the item's end.
      const int64_t* row_lens = lp + s.rep * width;
      const int64_t* row_table = tp + s.rep * width;
      const int64_t* row_delta = dp + s.rep * width;
      int64_t cj = item.j0, cc = 0;
      const auto fill = [&](ChunkRows<P>& ch) {
        ch.n = ch.runs = 0;
        while (cj < item.j1 && ch.n < chunk_len) {
          if (cc >= row_lens[cj]) {
            ++cj;
            cc = 0;
            continue;
          }
          if (ch.n == 0) ch.pos = views.start[s.rep * width + cj] + cc;
          const int64_t take = std::min(chunk_len - ch.n, row_lens[cj] - cc);
          const E* k0 = kr.at(row_table[cj], cc);
          const E* v0 = vr.at(row_table[cj], cc);
          const Scale* kc0 = kr.scales_at(row_table[cj], cc);
          const Scale* vc0 = vr.scales_at(row_table[cj], cc);
          if (ch.runs == 0 || row_delta[cj] != row_delta[ch.run_entry[ch.runs - 1]]) ch.run_entry[ch.runs++] = cj;
          for (int64_t t = 0; t < take; ++t) {
            ch.k[ch.n + t] = k0 + t * kr.s1;
            ch.v[ch.n + t] = v0 + t * vr.s1;
            if constexpr (P::scaled) {
              ch.ks[ch.n + t] = kc0 + t * kr.c1;
              ch.vs[ch.n + t] = vc0 + t * vr.c1;
            }
          }
          ch.n += take;
          ch.run_end[ch.runs - 1] = ch.n;
          cc += take;
        }
      };
      // A token's rows of a head in the next chunk, asked for while this one is scored: the values are read head by
      // head (a stride of a token's heads, which the hardware prefetchers do not follow), and asking for the keys too
      // measured faster on an AVX-512 VM (SmolLM2's shapes -8 to -10%, 32/8 heads x 128 unchanged), also where the
      // blocks are adjacent and the prefetchers could follow them.
      const auto prefetch = [&](const ChunkRows<P>& ch, int64_t t, int64_t h) {
        prefetch_row<P>(ch.v[t] + h * vs2);
        prefetch_row<P>(ch.k[t] + h * ks2);
      };
      ChunkRows<P>* cur = &chunk_rows[0];
      ChunkRows<P>* ahead = &chunk_rows[1];
      fill(*cur);
      for (int64_t t = 0; t < cur->n; ++t) {  // the item's first chunk is asked for before its first use
        for (int64_t h = 0; h < Hkv; ++h) prefetch(*cur, t, h);
      }
      for (; cur->n > 0; std::swap(cur, ahead)) {
        fill(*ahead);  // asked for while this chunk is scored
        const int64_t nc = cur->n;
        // scores, token-major (each K row, all heads of a token adjacent in the pool, is read once), one run of
        // equal deltas at a time: R(-delta) once per run, not at all at delta 0
        for (int64_t run = 0, t_begin = 0; run < cur->runs; t_begin = cur->run_end[run++]) {
          const int64_t e = s.rep * width + cur->run_entry[run], t_end = cur->run_end[run];
          if (qcur == nullptr || dp[e] != cur_delta) {
            if (dp[e] == 0 || !rotated) {
              qcur = qs.data();
            } else {
              for (int64_t r = 0; r < rows; ++r) {
                rotate(qs.data() + r * D, qr.data() + r * D, cp + e * half, sp + e * half, half, interleaved, A(-1));
              }
              qcur = qr.data();
            }
            cur_delta = dp[e];
          }
          if constexpr (std::is_same_v<A, float> && FLOAT_TILES) {
            for (int64_t t0 = t_begin; t0 < t_end; t0 += TILE_KEYS) {  // TILE_KEYS tokens at a time, every head
              const int64_t tn = std::min<int64_t>(TILE_KEYS, t_end - t0);
              for (int64_t h = 0; h < Hkv; ++h) {
                const E* kc[TILE_KEYS];  // rows read in place (direct<P>), or widened into kb first
                const float* kt[TILE_KEYS];
                const Scale* kcs[TILE_KEYS];
                for (int64_t t = 0; t < TILE_KEYS; ++t) {  // a short tile repeats its last key (scores not stored)
                  const int64_t tk = t0 + std::min(t, tn - 1);
                  kcs[t] = kr.head_scales(cur->ks[tk], h);
                  if constexpr (direct<P>()) {
                    kc[t] = cur->k[tk] + h * ks2;
                  } else {
                    kt[t] = row<P, A>(cur->k[tk] + h * ks2, kcs[t], kb.data() + t * D);
                  }
                  if (t0 + t < ahead->n) prefetch(*ahead, t0 + t, h);
                }
                float* out = sc.data() + h * per_head * CHUNK + t0;
                if constexpr (direct<P>()) {
                  score_rows<P>(qcur + h * per_head * D, per_head, kc, kcs, tn, out, CHUNK);
                } else {
                  score_rows<FloatPool<float>>(qcur + h * per_head * D, per_head, kt, kcs, tn, out, CHUNK);
                }
              }
            }
          } else {
            for (int64_t t = t_begin; t < t_end; ++t) {
              for (int64_t h = 0; h < Hkv; ++h) {
                if (t < ahead->n) prefetch(*ahead, t, h);
                const A* krow = row<P, A>(cur->k[t] + h * ks2, kr.head_scales(cur->ks[t], h), kb.data());
                dots(qcur + h * per_head * D, per_head, krow, sc.data() + h * per_head * CHUNK + t, CHUNK);
              }
            }
          }
        }
        // online softmax per row: the probabilities overwrite the scores (0 where a mask hides a key); the
        // visible keys of the chunk are [lo, hi): token t of the queries sits at view position q0 + t, causal
        // hides the keys after it (bottom-right), a window W those at q0 + t - W and before
        for (int64_t r = 0; r < rows; ++r) {
          A* srow = sc.data() + r * CHUNK;
          const int64_t pos = q0 + r % Q - cur->pos;  // the query's position relative to the chunk
          const int64_t hi = causal ? std::max<int64_t>(0, std::min<int64_t>(nc, pos + 1)) : nc;
          const int64_t lo = window > 0 ? std::min<int64_t>(hi, std::max<int64_t>(0, pos - window + 1)) : 0;
          live[r] = hi > lo;
          if (hi == lo) {  // nothing to add: weights 0, accumulators kept
            std::fill(srow, srow + nc, A(0));
            scale_by[r] = 1;
            continue;
          }
          if (softcap > 0) {  // logit soft-capping: c * tanh(s / c) of the scaled scores
            const A c = static_cast<A>(softcap), inv_c = A(1) / c;
            for (int64_t t = lo; t < hi; ++t) srow[t] = c * std::tanh(srow[t] * inv_c);
          }
          A total = 0;
          const A m_new = chunk_probs(srow, lo, hi, nc, m[r], total);
          const A alpha = exp_acc(m[r] - m_new);
          l[r] = l[r] * alpha + total;
          m[r] = m_new;
          scale_by[r] = alpha;
        }
        // rescale and add the weighted values, each row's accumulators held in registers over the chunk
        const A* vrows[CHUNK * MAX_KV_HEADS_PER_PASS];  // widened rows (formats not read in place)
        const E* vcodes[CHUNK * MAX_KV_HEADS_PER_PASS];  // rows read in place (direct<P>)
        const Scale* vscales[CHUNK * MAX_KV_HEADS_PER_PASS];
        for (int64_t h0 = 0; h0 < Hkv; h0 += MAX_KV_HEADS_PER_PASS) {
          const int64_t hn = std::min<int64_t>(MAX_KV_HEADS_PER_PASS, Hkv - h0);
          for (int64_t t = 0; t < nc; ++t) {
            for (int64_t h = 0; h < hn; ++h) {
              vscales[t * hn + h] = vr.head_scales(cur->vs[t], h0 + h);
              if constexpr (direct<P>()) {
                vcodes[t * hn + h] = cur->v[t] + (h0 + h) * vs2;
              } else {
                vrows[t * hn + h] = row<P, A>(cur->v[t] + (h0 + h) * vs2, vscales[t * hn + h],
                                              vb.data() + (t * hn + h) * D);
              }
            }
          }
          for (int64_t h = 0; h < hn; ++h) {
            const int64_t r0 = (h0 + h) * per_head;
            if constexpr (direct<P>()) {
              value_rows<P>(acc + r0 * D, scale_by.data() + r0, sc.data() + r0 * CHUNK, CHUNK, per_head, vcodes,
                            vscales, nc, hn, h);
            } else if constexpr (std::is_same_v<A, float> && FLOAT_TILES) {
              value_rows<FloatPool<float>>(acc + r0 * D, scale_by.data() + r0, sc.data() + r0 * CHUNK, CHUNK,
                                           per_head, vrows, vscales, nc, hn, h);
            } else {
              for (int64_t r = r0; r < r0 + per_head; ++r) {
                if (!live[r]) continue;
                add_values(acc + r * D, scale_by[r], sc.data() + r * CHUNK, vrows, nc, hn, h);
              }
            }
          }
        }
      }
    }
  });

  // Merge: every query row combines the partial results of the items that cover its batch row.
  std::vector<std::vector<std::pair<int64_t, int64_t>>> cover(B);  // (item, row of the batch in its segment)
  for (int64_t it = 0; it < n_items; ++it) {
    const Segment& s = segs[items[it].seg];
    for (int64_t i = 0; i < s.count; ++i) cover[order[s.first + i]].push_back({it, i});
  }
  // Threads only where the merge has work to share: waking the pool costs more than merging a few rows.
  size_t widest = 1;
  for (const auto& c : cover) widest = std::max(widest, c.size());
  const int64_t merge_grain = std::max<int64_t>(1, (int64_t(1) << 14) / (Q * D * static_cast<int64_t>(widest)));
  at::parallel_for(0, B * H, merge_grain, [&](int64_t begin, int64_t end) {
    std::vector<A> o(D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, head = bh % H, h = head / G, g = head % G;
      for (int64_t t = 0; t < Q; ++t) {
        A big = neg_inf;
        for (const auto& [it, i] : cover[b]) {
          const int64_t count = segs[items[it].seg].count;
          big = std::max(big, parts[items[it].part + row_index(h, i, g, t, count, G, Q)]);
        }
        A total = 0;
        std::fill(o.begin(), o.end(), A(0));
        for (const auto& [it, i] : cover[b]) {
          const int64_t count = segs[items[it].seg].count;
          const int64_t rows = count * H * Q, r = row_index(h, i, g, t, count, G, Q);
          const A* m = parts.data() + items[it].part;
          if (m[r] == neg_inf) continue;
          const A w = std::exp(m[r] - big);
          total += m[rows + r] * w;
          const A* a = m + 2 * rows + r * D;
          for (int64_t d = 0; d < D; ++d) o[d] += a[d] * w;
        }
        A* dst = op + (bh * Q + t) * D;
        const A nan = std::numeric_limits<A>::quiet_NaN();
        for (int64_t d = 0; d < D; ++d) dst[d] = total > 0 ? o[d] / total : nan;
        lsep[bh * Q + t] = total > 0 ? big + std::log(total) : neg_inf;
      }
    }
  });
}

// K/V views in O: the pool's own type for float formats (rows copied as they are where not rotated), or the
// accumulation type (widened or dequantized rows).
template <typename P, typename O>
void materialize_impl(const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& k_scale,
                      const at::Tensor& v_scale, const at::Tensor& table, const at::Tensor& block_delta,
                      const at::Tensor& lens, const at::Tensor& cos, const at::Tensor& sin, bool interleaved,
                      const at::Tensor& k_out, const at::Tensor& v_out) {
  using A = typename Acc<O>::type;
  constexpr bool as_stored = std::is_same_v<P, FloatPool<O>>;
  const int64_t B = table.size(0), width = table.size(1);
  const int64_t bs = k_pool.size(1), Hkv = k_pool.size(2), L = k_out.size(2);
  const bool rotated = cos.numel() > 0;
  const int64_t half = rotated ? cos.size(2) : 0;
  const PoolRows<P> kr(k_pool, k_scale), vr(v_pool, v_scale);
  const int64_t* tp = table.const_data_ptr<int64_t>();
  const int64_t* lp = lens.const_data_ptr<int64_t>();
  const A* cp = rotated ? cos.const_data_ptr<A>() : nullptr;
  const A* sp = rotated ? sin.const_data_ptr<A>() : nullptr;
  O* ko = k_out.data_ptr<O>();
  O* vo = v_out.data_ptr<O>();
  const Views views = read_views(table, block_delta, lens, 0, L, k_pool.size(0), bs);
  at::parallel_for(0, B * width, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> x(D), y(D);
    const auto store = [](const A* src, O* dst) {
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<O>(src[d]);
    };
    for (int64_t bj = begin; bj < end; ++bj) {
      const int64_t b = bj / width, j = bj % width;
      const int64_t phys = tp[bj];
      const int64_t n_tok = lp[bj], tok0 = views.start[bj];
      const A* cs = rotated ? cp + (b * width + j) * half : nullptr;
      const A* sn = rotated ? sp + (b * width + j) * half : nullptr;
      for (int64_t t = 0; t < n_tok; ++t) {
        const Scale* kc = kr.scales_at(phys, t);
        const Scale* vc = vr.scales_at(phys, t);
        for (int64_t h = 0; h < Hkv; ++h) {
          const typename P::Elem* ksrc = kr.at(phys, t) + h * kr.s2;
          const typename P::Elem* vsrc = vr.at(phys, t) + h * vr.s2;
          const int64_t dst = ((b * Hkv + h) * L + tok0 + t) * D;
          if constexpr (as_stored) {
            std::memcpy(vo + dst, vsrc, sizeof(O) * D);
            if (!rotated) {
              std::memcpy(ko + dst, ksrc, sizeof(O) * D);
              continue;
            }
          } else {
            load_row<P, A>(vsrc, vr.head_scales(vc, h), x.data());
            store(x.data(), vo + dst);
          }
          load_row<P, A>(ksrc, kr.head_scales(kc, h), x.data());
          if (rotated) {
            rotate(x.data(), y.data(), cs, sn, half, interleaved, A(1));
            store(y.data(), ko + dst);
          } else {
            store(x.data(), ko + dst);
          }
        }
      }
    }
  });
}

// Calls fn(P{}) for the format of a pool of `dtype` (kv_format.FORMATS: float8_e4m3fn read as bits, uint8 = int4).
template <typename F> void dispatch_pool(at::ScalarType dtype, F&& fn) {
  switch (dtype) {
    case at::kFloat: fn(FloatPool<float>{}); break;
    case at::kDouble: fn(FloatPool<double>{}); break;
    case at::kHalf: fn(FloatPool<c10::Half>{}); break;
    case at::kBFloat16: fn(FloatPool<c10::BFloat16>{}); break;
    case at::kChar: fn(Int8Pool{}); break;
    case at::kFloat8_e4m3fn: fn(Fp8Pool{}); break;
    case at::kByte: fn(Int4Pool{}); break;
    default:
      TORCH_CHECK_TYPE(false, "k_pool: expected a KV format (float64, float32, bfloat16, float16, int8, float8_e4m3fn "
                       "or uint8 for int4), got ", dtype);
  }
}

// The format's scales, or an empty tensor for float formats; checked against the pool (a compiled graph or an
// exported program calls the kernel without the Python wrapper).
template <typename P>
at::Tensor scales_of(const std::optional<at::Tensor>& scale, const at::Tensor& pool, const char* name) {
  if constexpr (!P::scaled) {
    TORCH_CHECK_VALUE(!scale.has_value(), name, ": a ", pool.scalar_type(), " pool has no scales, got a tensor");
    return at::empty({0}, pool.options());
  } else {
    TORCH_CHECK_VALUE(scale.has_value(), name, ": a ", pool.scalar_type(), " pool needs its scales, got None");
    const at::Tensor& s = *scale;
    TORCH_CHECK_VALUE(s.scalar_type() == at::kBFloat16 && s.dim() == 4 && s.size(0) == pool.size(0) &&
                          s.size(1) == pool.size(1) && s.size(2) == pool.size(2) && s.size(3) == GROUPS &&
                          s.stride(3) == 1,
                      name, ": expected bfloat16 scales [", pool.size(0), ", ", pool.size(1), ", ", pool.size(2),
                      ", ", GROUPS, "] beside the pool, got ", s.scalar_type(), " ", s.sizes());
    return s;
  }
}

// The op as Python calls it, once per layer: the conversions and allocations are made here, where they cost
// nanoseconds instead of microseconds of Python each (no copy where the mapping is already int64 and contiguous).
// The queries are read, and the output written, in the accumulation type (O(q) beside the pools' O(L)).
std::tuple<at::Tensor, at::Tensor> attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                                             const at::Tensor& table, const at::Tensor& block_delta,
                                             const at::Tensor& lens, const std::optional<at::Tensor>& cos,
                                             const std::optional<at::Tensor>& sin,
                                             double scale, bool causal, int64_t window, double softcap,
                                             bool interleaved, const std::optional<at::Tensor>& k_scale,
                                             const std::optional<at::Tensor>& v_scale) {
  TORCH_CHECK(q.size(3) == D, "q: this kernel was generated for head_dim ", D, ", got ", q.size(3));
  TORCH_CHECK_VALUE(window >= 0, "window: expected an int >= 0 (0: no sliding window), got ", window);
  TORCH_CHECK_VALUE(softcap >= 0 && std::isfinite(softcap),
                    "softcap: expected a finite number >= 0 (0: no logit soft-capping), got ", softcap);
  TORCH_CHECK_TYPE(v_pool.scalar_type() == k_pool.scalar_type(), "v_pool: expected k_pool's dtype ",
                   k_pool.scalar_type(), ", got ", v_pool.scalar_type());
  const bool wide = k_pool.scalar_type() == at::kDouble;
  TORCH_CHECK_TYPE(wide == (q.scalar_type() == at::kDouble), "q: float64 queries go with float64 pools only, got ",
                   q.scalar_type(), " over ", k_pool.scalar_type());
  const at::ScalarType acc = wide ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(acc));
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(acc));
  if (out.numel() == 0) {
    lse.fill_(-std::numeric_limits<double>::infinity());
    return {out.to(q.scalar_type()), lse};
  }
  const auto as_long = [](const at::Tensor& t) { return t.to(at::kLong).contiguous(); };
  const at::Tensor none = at::empty({0}, q.options().dtype(acc));
  const at::Tensor qc = q.to(acc).contiguous(), tc = as_long(table), dc = as_long(block_delta), lc = as_long(lens);
  const at::Tensor cc = cos.has_value() ? cos->contiguous() : none, sc = sin.has_value() ? sin->contiguous() : none;
  dispatch_pool(k_pool.scalar_type(), [&](auto tag) {
    using P = decltype(tag);
    const at::Tensor ksc = scales_of<P>(k_scale, k_pool, "k_scale"), vsc = scales_of<P>(v_scale, v_pool, "v_scale");
    attention_impl<P>(qc, k_pool, v_pool, ksc, vsc, tc, dc, lc, cc, sc, scale, causal, window, softcap, interleaved,
                      out, lse);
  });
  return {out.scalar_type() == q.scalar_type() ? out : out.to(q.scalar_type()), lse};
}

// k_out/v_out: the pool's dtype (float formats), or its accumulation dtype (rows widened, compressed ones
// dequantized, before they are rotated; the caller casts from there).
void materialize(const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& table,
                 const at::Tensor& block_delta, const at::Tensor& lens, const at::Tensor& cos, const at::Tensor& sin,
                 bool interleaved, const at::Tensor& k_out, const at::Tensor& v_out,
                 const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale) {
  dispatch_pool(k_pool.scalar_type(), [&](auto tag) {
    using P = decltype(tag);
    TORCH_CHECK(k_pool.size(3) == P::width, "k_pool: this kernel was generated for head_dim ", D, ", got a row of ",
                k_pool.size(3), " elements");
    const at::Tensor ksc = scales_of<P>(k_scale, k_pool, "k_scale"), vsc = scales_of<P>(v_scale, v_pool, "v_scale");
    using E = typename P::Elem;
    using A = typename Acc<E>::type;
    if constexpr (!P::scaled) {
      if (k_out.scalar_type() == k_pool.scalar_type()) {
        materialize_impl<P, E>(k_pool, v_pool, ksc, vsc, table, block_delta, lens, cos, sin, interleaved, k_out,
                               v_out);
        return;
      }
    }
    TORCH_CHECK(k_out.scalar_type() == c10::CppTypeToScalarType<A>::value,
                "k_out: expected views in the pool's dtype or its accumulation dtype, got ", k_out.scalar_type());
    materialize_impl<P, A>(k_pool, v_pool, ksc, vsc, table, block_delta, lens, cos, sin, interleaved, k_out, v_out);
  });
}

}  // namespace

// TORCH_LIBRARY pastes its namespace argument into names, which stops a macro there from expanding: one more
// level of macro expands GAUGE_NAMESPACE first.
#define GAUGE_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)

GAUGE_TORCH_LIBRARY(GAUGE_NAMESPACE, m) {
  m.def("attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor table, Tensor block_delta, Tensor lens, "
        "Tensor? cos, Tensor? sin, float scale, bool causal, int window, float softcap, bool interleaved, "
        "Tensor? k_scale, Tensor? v_scale) -> (Tensor, Tensor)",
        &attention);
  m.def("materialize(Tensor k_pool, Tensor v_pool, Tensor table, Tensor block_delta, Tensor lens, Tensor cos, "
        "Tensor sin, bool interleaved, Tensor(a!) k_out, Tensor(b!) v_out, Tensor? k_scale, Tensor? v_scale) -> ()",
        &materialize);
}
