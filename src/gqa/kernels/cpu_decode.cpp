// Fused split-KV GQA decode attention for CPU (fp32 and bf16 caches, fp32 sums; a bf16 query on a bf16 cache
// takes the CPU's bf16 dot products for its scores where it has them).
//
// One work item = (sequence b, KV head j, KV split s). Its rows are the g query heads of KV head j
// times the Tq query tokens (row r = i * Tq + t is query head h = j * g + i, the h // g mapping), so
// each K and V row is loaded once per KV head and used by all g * Tq rows while it sits in L1.
// Keys are streamed BLOCK_N at a time with an online softmax (base-2 exponentials, running max and
// sum per row); the splits of one (b, j) are merged afterwards by their log-sum-exp. Every mask the
// kernel takes (key lengths, bottom-right causal, sliding window, chunk) leaves each query token a
// contiguous key range [lo_t, hi_t), so nothing outside a work item's range is ever read.
//
// Keys are addressed through a block table: a contiguous cache [B, Hkv, T, D] is the special case of
// one page of T slots per sequence (no table), a paged cache is [num_pages, Hkv, page_size, D].
//
// Built at first use by gqa.kernels.cpu_fused (torch.utils.cpp_extension, -O3 -march=native): the
// inner loops are written as fixed-width lanes so the compiler vectorises them without -ffast-math
// (which would break the -inf / NaN semantics the masks rely on).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t BLOCK_N = 32;  // keys per online-softmax step (scores of a block stay in L1; a multiple of 16)
constexpr int64_t PREFETCH_BLOCKS = 2;  // how many blocks ahead K/V rows are requested (into L2)
constexpr int64_t LANES = 16;    // independent partial sums per dot product (one or two vectors)
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

inline float bf16_to_float(uint16_t x) {
  uint32_t u = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// 2^x for x <= 0 (x = score - running max): exact 2^floor(x) times a degree-6 polynomial of the
// fraction. Below -126 it returns 2^-126 instead of a denormal; that is far
// below fp32's resolution of a sum holding the max element's 1.0. Masked entries are zeroed by the
// caller, never passed as -inf.
inline float exp2_neg(float x) {
  x = x < -126.0f ? -126.0f : x;
  const float xi = std::floor(x);
  const float f = x - xi;
  // Weighted least-squares fit of 2^f on [0, 1) (relative error 2e-9 in exact arithmetic; fp32
  // evaluation adds about one ulp).
  float p = 2.1690609004042206e-4f;
  p = p * f + 1.2443081555382725e-3f;
  p = p * f + 9.678472549593772e-3f;
  p = p * f + 5.548352472616894e-2f;
  p = p * f + 2.402297958138493e-1f;
  p = p * f + 6.931469870574901e-1f;
  p = p * f + 1.0000000018154942f;
  const int32_t bits = (static_cast<int32_t>(xi) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// 16 floats; GCC and Clang lower it to one AVX-512, two AVX2 or four SSE registers per -march.
typedef float vf16 __attribute__((vector_size(64), aligned(4)));

// Unaligned 16-float loads and stores as one instruction each. A 64-byte memcpy is lowered by the
// compiler's tuning: for CPUs it tunes to 256-bit moves (Intel server cores), it became two 32-byte
// stores to the stack and a 64-byte reload, a failed store-to-load forward on every K and V chunk.
typedef float vf16u __attribute__((vector_size(64), aligned(4), may_alias));

inline vf16 loadv(const float* p) { return *reinterpret_cast<const vf16u*>(p); }

inline void storev(float* p, vf16 x) { *reinterpret_cast<vf16u*>(p) = x; }

typedef float vf8 __attribute__((vector_size(32), aligned(4)));
typedef float vf4 __attribute__((vector_size(16), aligned(4)));

inline float hsum(vf16 x) {  // halves added in registers (extracts), not through memory lane by lane
  vf8 lo, hi;
  std::memcpy(&lo, &x, sizeof(lo));
  std::memcpy(&hi, reinterpret_cast<const char*>(&x) + sizeof(lo), sizeof(hi));
  const vf8 s8 = lo + hi;
  vf4 a, b;
  std::memcpy(&a, &s8, sizeof(a));
  std::memcpy(&b, reinterpret_cast<const char*>(&s8) + sizeof(a), sizeof(b));
  const vf4 s4 = a + b;
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

typedef int32_t vi16 __attribute__((vector_size(64), aligned(4)));

// exp2_neg on 16 lanes with vector operations only (the scalar version's floor and bit cast keep the
// compiler from vectorising a loop over it).
inline vf16 exp2_neg_v(vf16 x) {
  const vf16 lowest = vf16{} - 126.0f;
  x = x < lowest ? lowest : x;
  vi16 xi = __builtin_convertvector(x, vi16);    // truncates toward zero
  xi += (__builtin_convertvector(xi, vf16) > x);  // floor: -1 where truncation rounded up (x < 0)
  const vf16 f = x - __builtin_convertvector(xi, vf16);
  vf16 p = vf16{} + 2.1690609004042206e-4f;
  p = p * f + 1.2443081555382725e-3f;
  p = p * f + 9.678472549593772e-3f;
  p = p * f + 5.548352472616894e-2f;
  p = p * f + 2.402297958138493e-1f;
  p = p * f + 6.931469870574901e-1f;
  p = p * f + 1.0000000018154942f;
  const vi16 bits = (xi + 127) << 23;
  return p * reinterpret_cast<const vf16&>(bits);  // same-size vector bit cast, in registers
}

// 16 elements of a K or V row as fp32: fp32 loads as is, bf16 is widened in registers (a bf16 is the
// top half of an fp32), so a bf16 cache is never copied to an fp32 buffer.
inline vf16 load16(const float* p) { return loadv(p); }

inline vf16 load16(const at::BFloat16* p) {
  typedef uint16_t vu16 __attribute__((vector_size(32), aligned(2), may_alias));
  const vi16 w = __builtin_convertvector(*reinterpret_cast<const vu16*>(p), vi16) << 16;
  return reinterpret_cast<const vf16&>(w);  // same-size vector bit cast, in registers
}

inline float load1(const float* p) { return *p; }
inline float load1(const at::BFloat16* p) { return static_cast<float>(*p); }

#if defined(__AVX512F__)
constexpr int KEY_TILE = 4;  // keys per score tile: ROW_TILE x KEY_TILE accumulators in registers
constexpr int DIM_TILE = 4;  // 16-float chunks of the output per P @ V tile
#else
constexpr int KEY_TILE = 2;  // 16 vector registers (AVX2): smaller tiles avoid spills
constexpr int DIM_TILE = 2;
#endif
constexpr int ROW_TILE = 4;

// s[r * s_stride + c] = q_r . k_c for NR rows and NK rows of k: each k chunk and each q chunk is loaded once
// per tile, NR * NK independent accumulators keep the FMA units busy. The attention scores (k = keys,
// s_stride = BLOCK_N) and the decode GEMV (k = weight rows, s_stride = the output's row length) share it.
template <int NR, int NK, typename T>
inline void dot_tile(const float* __restrict q, const T* const* k, int64_t d, float* s, int64_t s_stride) {
  vf16 a[NR][NK] = {};
  int64_t i = 0;
  for (; i + LANES <= d; i += LANES) {
    vf16 kk[NK];
    for (int c = 0; c < NK; ++c) kk[c] = load16(k[c] + i);
    for (int r = 0; r < NR; ++r) {
      const vf16 x = loadv(q + r * d + i);
      for (int c = 0; c < NK; ++c) a[r][c] += x * kk[c];
    }
  }
  for (int r = 0; r < NR; ++r) {
    for (int c = 0; c < NK; ++c) {
      float t = hsum(a[r][c]);
      for (int64_t e = i; e < d; ++e) t += q[r * d + e] * load1(k[c] + e);
      s[r * s_stride + c] = t;
    }
  }
}

#if defined(__AVX512BF16__)
// dot_tile for bf16 x bf16 on the CPU's dot-product instruction: 32 exact products per instruction, summed in
// fp32 (the widening path, dot_tile, spends two instructions per 16 elements before its FMA and is
// compute-bound from 4 rows). Attention scores of a bf16 query and cache, and the bf16 decode GEMV.
template <int NM, int NR>
inline void dot_tile_dpbf16(const at::BFloat16* __restrict x, const at::BFloat16* const* w, int64_t k, float* out,
                            int64_t n_out) {
  __m512 a[NM][NR];
  for (int m = 0; m < NM; ++m)
    for (int r = 0; r < NR; ++r) a[m][r] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= k; i += 32) {
    __m512bh ww[NR];
    for (int r = 0; r < NR; ++r) ww[r] = (__m512bh)_mm512_loadu_si512(w[r] + i);
    for (int m = 0; m < NM; ++m) {
      const __m512bh xx = (__m512bh)_mm512_loadu_si512(x + m * k + i);
      for (int r = 0; r < NR; ++r) a[m][r] = _mm512_dpbf16_ps(a[m][r], xx, ww[r]);
    }
  }
  for (int m = 0; m < NM; ++m) {
    for (int r = 0; r < NR; ++r) {
      float t = _mm512_reduce_add_ps(a[m][r]);
      for (int64_t e = i; e < k; ++e) t += static_cast<float>(x[m * k + e]) * static_cast<float>(w[r][e]);
      out[m * n_out + r] = t;
    }
  }
}
#endif

// Scores of NR query rows against a block's bn keys, times q_scale (1 for a pre-scaled fp32 query).
template <int NR, typename T>
inline void score_rows(const float* q, const T* const* k, int64_t d, int64_t bn, float q_scale, float* s) {
  int64_t c = 0;
  for (; c + KEY_TILE <= bn; c += KEY_TILE) dot_tile<NR, KEY_TILE>(q, k + c, d, s + c, BLOCK_N);
  for (; c < bn; ++c) dot_tile<NR, 1>(q, k + c, d, s + c, BLOCK_N);
  if (q_scale != 1.0f)
    for (int r = 0; r < NR; ++r)
      for (c = 0; c < bn; ++c) s[r * BLOCK_N + c] *= q_scale;
}

#if defined(__AVX512BF16__)
// A bf16 query on a bf16 cache: exact products on the dot-product instruction, the scale applied to the
// fp32 sums (the query is passed unscaled, so no rounding is added to it).
template <int NR>
inline void score_rows(const at::BFloat16* q, const at::BFloat16* const* k, int64_t d, int64_t bn, float q_scale,
                       float* s) {
  int64_t c = 0;
  for (; c + KEY_TILE <= bn; c += KEY_TILE) dot_tile_dpbf16<NR, KEY_TILE>(q, k + c, d, s + c, BLOCK_N);
  for (; c < bn; ++c) dot_tile_dpbf16<NR, 1>(q, k + c, d, s + c, BLOCK_N);
  for (int r = 0; r < NR; ++r)
    for (c = 0; c < bn; ++c) s[r * BLOCK_N + c] *= q_scale;
}
#endif

// acc_r[i .. i + U*16) += sum_c p[r, c] * v_c[i .. i + U*16) for NR rows: U chunks of each accumulator row stay in
// registers over the block's keys and each V chunk is loaded once for all NR rows. A key some row masks out
// (p == 0 exactly then) takes the careful path, so 0 * NaN in unused slots never reaches the output.
template <int NR, int U, typename T>
inline void pv_chunks(float* acc, const float* p, const T* const* v, int64_t d, int64_t i, int64_t bn, bool full) {
  vf16 x[NR][U];
  for (int r = 0; r < NR; ++r)
    for (int u = 0; u < U; ++u) x[r][u] = loadv(acc + r * d + i + u * LANES);
  for (int64_t c = 0; c < bn; ++c) {
    vf16 vv[U];
    for (int u = 0; u < U; ++u) vv[u] = load16(v[c] + i + u * LANES);
    bool all = full;
    if (!all) {
      all = true;
      for (int r = 0; r < NR; ++r) all = all && p[r * BLOCK_N + c] != 0.0f;
    }
    if (all) {
      for (int r = 0; r < NR; ++r) {
        const float w = p[r * BLOCK_N + c];
        for (int u = 0; u < U; ++u) x[r][u] += w * vv[u];
      }
    } else {
      for (int r = 0; r < NR; ++r) {
        const float w = p[r * BLOCK_N + c];
        if (w == 0.0f) continue;
        for (int u = 0; u < U; ++u) x[r][u] += w * vv[u];
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int u = 0; u < U; ++u) storev(acc + r * d + i + u * LANES, x[r][u]);
}

// acc_r += sum_c p[r, c] * v_c over a value width d: DIM_TILE chunks at a time, then single 16-float chunks
// (a width such as 80 or 96 is not a multiple of DIM_TILE x 16), then the last d % 16 elements one by one.
template <int NR, typename T>
inline void pv_rows(float* acc, const float* p, const T* const* v, int64_t d, int64_t bn, bool full) {
  int64_t i = 0;
  for (; i + DIM_TILE * LANES <= d; i += DIM_TILE * LANES) pv_chunks<NR, DIM_TILE>(acc, p, v, d, i, bn, full);
  for (; i + LANES <= d; i += LANES) pv_chunks<NR, 1>(acc, p, v, d, i, bn, full);
  for (; i < d; ++i) {
    for (int r = 0; r < NR; ++r) {
      float x = acc[r * d + i];
      for (int64_t c = 0; c < bn; ++c) {
        const float w = p[r * BLOCK_N + c];
        if (w != 0.0f) x += w * load1(v[c] + i);
      }
      acc[r * d + i] = x;
    }
  }
}

template <typename T>
struct Rows {
  // Where key n of sequence b, KV head j lives. Contiguous: page = b, slot = n (no table).
  const T* base;
  int64_t stride_page, stride_head, stride_slot;
  int64_t page_size, num_pages;
  const int32_t* table;  // [B, table_stride] or nullptr
  int64_t table_stride;

  inline const T* row(int64_t b, int64_t j, int64_t n) const {
    int64_t page = b, slot = n;
    if (table != nullptr) {
      page = table[b * table_stride + n / page_size];
      slot = n % page_size;
      TORCH_CHECK(page >= 0 && page < num_pages, "gqa cpu decode: page id ", page, " outside 0..", num_pages - 1,
                  " for pages in use");
    }
    return base + page * stride_page + j * stride_head + slot * stride_slot;
  }
};

template <typename T, typename TQ>
void decode_kernel(
    const TQ* q,  // [B, Hq, Tq, D] contiguous; scores are q . k * q_scale (scale * log2(e) in all)
    float q_scale,
    const Rows<T>& K, const Rows<T>& V,
    const int32_t* kv_lens, const int32_t* q_pos0,
    const int32_t* kv_start,  // [B] first real key of each sequence (left padding), or nullptr: 0
    int64_t B, int64_t Hq, int64_t Hkv, int64_t Tq, int64_t D,
    int64_t DV,  // value width (D for standard attention; less where the values are a prefix of the keys)
    bool causal, int64_t window, int64_t chunk, int64_t n_splits,
    float* part_out,  // [B, Hkv, S, R, DV]
    float* part_lse   // [B, Hkv, S, R], log2 domain
) {
  const int64_t g = Hq / Hkv;
  const int64_t R = g * Tq;
  // Work items are handed out one at a time from a shared counter rather than in fixed shares: on a
  // machine shared with other work one thread may be descheduled, and the others then take its items.
  const int64_t n_items = B * Hkv * n_splits;
  std::atomic<int64_t> next_item{0};
  const int64_t n_workers = std::min<int64_t>(at::get_num_threads(), n_items);
  at::parallel_for(0, n_workers, 1, [&](int64_t, int64_t) {
    std::vector<float> acc(R * DV), m(R), l(R), sc(R * BLOCK_N);
    std::vector<int64_t> lo_t(Tq), hi_t(Tq);
    std::vector<const T*> krow(BLOCK_N), vrow(BLOCK_N);
    for (int64_t item = next_item.fetch_add(1); item < n_items; item = next_item.fetch_add(1)) {
      const int64_t b = item / (Hkv * n_splits);
      const int64_t j = (item / n_splits) % Hkv;
      const int64_t s = item % n_splits;
      float* o = part_out + item * R * DV;
      float* lse = part_lse + item * R;

      // Each query token's visible keys [lo_t, hi_t); the item covers its split of their union.
      int64_t lo = std::numeric_limits<int64_t>::max(), hi = 0;
      for (int64_t t = 0; t < Tq; ++t) {
        const int64_t pos = static_cast<int64_t>(q_pos0[b]) + t;
        int64_t a = kv_start ? kv_start[b] : 0, z = kv_lens[b];
        if (causal) z = std::min(z, pos + 1);
        if (window > 0) a = std::max(a, pos - window + 1);
        if (chunk > 0) {
          a = std::max(a, (pos / chunk) * chunk);
          z = std::min(z, (pos / chunk + 1) * chunk);
        }
        lo_t[t] = a;
        hi_t[t] = std::max(a, z);
        if (hi_t[t] > lo_t[t]) {
          lo = std::min(lo, lo_t[t]);
          hi = std::max(hi, hi_t[t]);
        }
      }
      int64_t start = hi, stop = hi;
      if (hi > lo) {
        int64_t per = (hi - lo + n_splits - 1) / n_splits;
        per = (per + BLOCK_N - 1) / BLOCK_N * BLOCK_N;
        start = std::min(hi, lo + s * per);
        stop = std::min(hi, start + per);
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(m.begin(), m.end(), NEG_INF);
      std::fill(l.begin(), l.end(), 0.0f);
      const TQ* qrows = q + (b * Hq + j * g) * Tq * D;  // rows r = i * Tq + t, contiguous

      for (int64_t n0 = start; n0 < stop; n0 += BLOCK_N) {
        const int64_t bn = std::min(BLOCK_N, stop - n0);
        // Request the next block's K and V rows now so their loads overlap this block's arithmetic
        // (the hardware prefetchers alone left the core waiting on memory half of the time).
        for (int64_t c = n0 + PREFETCH_BLOCKS * BLOCK_N; c < std::min(n0 + (PREFETCH_BLOCKS + 1) * BLOCK_N, stop); ++c) {
          const char* kp = reinterpret_cast<const char*>(K.row(b, j, c));
          const char* vp = reinterpret_cast<const char*>(V.row(b, j, c));
          for (int64_t off = 0; off < D * static_cast<int64_t>(sizeof(T)); off += 64) __builtin_prefetch(kp + off, 0, 1);
          for (int64_t off = 0; off < DV * static_cast<int64_t>(sizeof(T)); off += 64) __builtin_prefetch(vp + off, 0, 1);
        }
        for (int64_t c = 0; c < bn; ++c) krow[c] = K.row(b, j, n0 + c);
        int64_t r0 = 0;
        for (; r0 + ROW_TILE <= R; r0 += ROW_TILE)
          score_rows<ROW_TILE>(qrows + r0 * D, krow.data(), D, bn, q_scale, sc.data() + r0 * BLOCK_N);
        for (; r0 < R; ++r0) score_rows<1>(qrows + r0 * D, krow.data(), D, bn, q_scale, sc.data() + r0 * BLOCK_N);
        bool full = true;  // every row sees every key of this block: P @ V needs no per-key check
        for (int64_t r = 0; r < R; ++r) {
          const int64_t t = r % Tq;
          const int64_t a = std::max(lo_t[t] - n0, int64_t(0)), z = std::min(hi_t[t] - n0, bn);
          float* sr = sc.data() + r * BLOCK_N;
          full = full && a == 0 && z == bn;
          if (a >= z) {  // no visible key of this block for this row
            for (int64_t c = 0; c < bn; ++c) sr[c] = 0.0f;
            continue;
          }
          float bmax = NEG_INF;
          for (int64_t c = a; c < z; ++c) bmax = sr[c] > bmax ? sr[c] : bmax;
          const float m_new = std::max(m[r], bmax);
          if (m_new > m[r]) {  // rescale what this row has accumulated so far
            const float alpha = m[r] == NEG_INF ? 0.0f : exp2_neg(m[r] - m_new);
            l[r] *= alpha;
            float* ar = acc.data() + r * DV;
            for (int64_t d = 0; d < DV; ++d) ar[d] *= alpha;
            m[r] = m_new;
          }
          float ex[BLOCK_N];
          for (int64_t c = 0; c < BLOCK_N; c += LANES) storev(ex + c, exp2_neg_v(loadv(sr + c) - m_new));
          for (int64_t c = 0; c < BLOCK_N; ++c) sr[c] = (c >= a && c < z) ? ex[c] : 0.0f;  // masked, past bn: 0
          vf16 part = {};
          for (int64_t c = 0; c + LANES <= BLOCK_N; c += LANES) part += loadv(sr + c);
          l[r] += hsum(part);
        }
        for (int64_t c = 0; c < bn; ++c) vrow[c] = V.row(b, j, n0 + c);
        for (r0 = 0; r0 + ROW_TILE <= R; r0 += ROW_TILE)
          pv_rows<ROW_TILE>(acc.data() + r0 * DV, sc.data() + r0 * BLOCK_N, vrow.data(), DV, bn, full);
        for (; r0 < R; ++r0) pv_rows<1>(acc.data() + r0 * DV, sc.data() + r0 * BLOCK_N, vrow.data(), DV, bn, full);
      }
      for (int64_t r = 0; r < R; ++r) {
        const bool empty = l[r] == 0.0f;
        const float inv = empty ? 0.0f : 1.0f / l[r];
        for (int64_t d = 0; d < DV; ++d) o[r * DV + d] = acc[r * DV + d] * inv;
        lse[r] = empty ? NEG_INF : m[r] + std::log2(l[r]);
      }
    }
  });
}

// Merge the splits of each (b, j) by log-sum-exp and write out [B, Hq, Tq, D] (fp32; D = the value width).
void merge_splits(const float* part_out, const float* part_lse, float* out, int64_t B, int64_t Hkv, int64_t R,
                  int64_t D, int64_t n_splits) {
  at::parallel_for(0, B * Hkv * R, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t bj = row / R, r = row % R;
      float* dst = out + row * D;  // rows of (b, j) are contiguous in [B, Hq, Tq, D]
      float mx = NEG_INF;
      for (int64_t s = 0; s < n_splits; ++s) mx = std::max(mx, part_lse[(bj * n_splits + s) * R + r]);
      for (int64_t d = 0; d < D; ++d) dst[d] = 0.0f;
      if (mx == NEG_INF) continue;  // no visible key: zeros
      float total = 0.0f;
      for (int64_t s = 0; s < n_splits; ++s) {
        const float ls = part_lse[(bj * n_splits + s) * R + r];
        if (ls == NEG_INF) continue;
        const float w = std::exp2(ls - mx);
        total += w;
        const float* src = part_out + ((bj * n_splits + s) * R + r) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] += w * src[d];
      }
      const float inv = 1.0f / total;
      for (int64_t d = 0; d < D; ++d) dst[d] *= inv;
    }
  });
}

template <typename T>
Rows<T> rows_of(const at::Tensor& x, const at::Tensor& table) {
  Rows<T> r;
  r.base = reinterpret_cast<const T*>(x.data_ptr());
  r.stride_page = x.stride(0);
  r.stride_head = x.stride(1);
  r.stride_slot = x.stride(2);
  r.num_pages = x.size(0);
  r.page_size = x.size(2);
  r.table = table.numel() ? table.data_ptr<int32_t>() : nullptr;
  r.table_stride = table.numel() ? table.stride(0) : 0;
  return r;
}

// q [B, Hq, Tq, D] contiguous: fp32, or bf16 with a bf16 cache (bf16 dot products where the CPU has them);
// scores are q . k * q_scale, with scale * log2(e) folded into q or q_scale; k [B | num_pages, Hkv, T | page_size, D],
// v the same but [.., DV] (any value width, e.g. a view of k's first DV columns), fp32 or bf16 with unit stride in
// the last dim; block_table [B, max_pages] int32 contiguous (or empty: contiguous cache); kv_lens, q_pos0 [B]
// int32; kv_start [B] int32 (keys before it are padding) or empty; window / chunk 0 = none. Returns [B, Hq, Tq, DV] fp32.
at::Tensor decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& block_table,
                  const at::Tensor& kv_lens, const at::Tensor& q_pos0, const at::Tensor& kv_start, bool causal, int64_t window, int64_t chunk,
                  int64_t n_splits, double q_scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "gqa cpu decode: q, k, v must be 4-D");
  TORCH_CHECK(q.is_contiguous() && (q.scalar_type() == at::kFloat ||
                                    (q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16)),
              "gqa cpu decode: q must be contiguous fp32, or bf16 with a bf16 cache");
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "gqa cpu decode: k and v dtypes differ");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "gqa cpu decode: k and v need unit stride in head_dim");
  TORCH_CHECK(kv_lens.scalar_type() == at::kInt && q_pos0.scalar_type() == at::kInt, "gqa cpu decode: int32 lengths");
  TORCH_CHECK(kv_lens.is_contiguous() && q_pos0.is_contiguous(), "gqa cpu decode: contiguous lengths");
  TORCH_CHECK(kv_start.numel() == 0 || (kv_start.scalar_type() == at::kInt && kv_start.is_contiguous() &&
                                        kv_start.numel() == q.size(0)),
              "gqa cpu decode: kv_start must be empty or [B] contiguous int32");
  TORCH_CHECK(block_table.numel() == 0 || (block_table.scalar_type() == at::kInt && block_table.stride(1) == 1),
              "gqa cpu decode: block_table must be int32 with unit stride");
  TORCH_CHECK(n_splits >= 1, "gqa cpu decode: n_splits >= 1");
  const int64_t B = q.size(0), Hq = q.size(1), Tq = q.size(2), D = q.size(3), Hkv = k.size(1);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0 && k.size(3) == D && v.size(3) >= 1 && v.size(0) == k.size(0) &&
                  v.size(1) == Hkv && v.size(2) == k.size(2),
              "gqa cpu decode: shapes");
  const int64_t R = (Hq / Hkv) * Tq, DV = v.size(3);
  auto opts = q.options().dtype(at::kFloat);
  at::Tensor part_out = at::empty({B * Hkv * n_splits * R * DV}, opts);
  at::Tensor part_lse = at::empty({B * Hkv * n_splits * R}, opts);
  at::Tensor out = at::empty({B, Hq, Tq, DV}, opts);
  if (out.numel() == 0) return out;
  const int32_t* start = kv_start.numel() ? kv_start.data_ptr<int32_t>() : nullptr;
  auto run = [&](auto* qp, float qs, auto* cache_type) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(cache_type)>>;
    decode_kernel<T>(qp, qs, rows_of<T>(k, block_table), rows_of<T>(v, block_table), kv_lens.data_ptr<int32_t>(),
                     q_pos0.data_ptr<int32_t>(), start, B, Hq, Hkv, Tq, D, DV, causal, window, chunk, n_splits,
                     part_out.data_ptr<float>(), part_lse.data_ptr<float>());
  };
  if (q.scalar_type() == at::kBFloat16) {
#if defined(__AVX512BF16__)
    run(q.data_ptr<at::BFloat16>(), static_cast<float>(q_scale), static_cast<at::BFloat16*>(nullptr));
#else  // no bf16 dot products on this CPU: widen the query once and take the fp32-query path
    const at::Tensor qf = q.to(at::kFloat).mul_(q_scale);
    run(qf.data_ptr<float>(), 1.0f, static_cast<at::BFloat16*>(nullptr));
#endif
  } else if (k.scalar_type() == at::kFloat) {
    run(q.data_ptr<float>(), static_cast<float>(q_scale), static_cast<float*>(nullptr));
  } else {
    TORCH_CHECK(k.scalar_type() == at::kBFloat16, "gqa cpu decode: k and v must be fp32 or bf16");
    run(q.data_ptr<float>(), static_cast<float>(q_scale), static_cast<at::BFloat16*>(nullptr));
  }
  merge_splits(part_out.data_ptr<float>(), part_lse.data_ptr<float>(), out.data_ptr<float>(), B, Hkv, R, DV, n_splits);
  return out;
}


// ---- Small-batch linear layers (decode GEMV) ----
//
// out[m, n] = x[m] . w[n] (+ bias[n]) for the few rows a decode step has. Each thread takes blocks of
// GEMV_ROWS weight rows and streams them once for all M input rows: GEMV_M x GEMV_ROWS accumulators stay
// in registers, so the weight matrix (the bytes that bound a decode step) is read from memory exactly once.
// x is widened to fp32 once; arithmetic is fp32 for fp32 and bf16 weights, as torch's CPU matmul does.

constexpr int GEMV_ROWS = 4;  // weight rows per tile
constexpr int GEMV_M = 4;     // input rows per tile (GEMV_M * GEMV_ROWS accumulators + GEMV_ROWS weight chunks)

template <int NR, typename T>
inline void gemv_rows(const float* x, const T* const* w, int64_t M, int64_t k, int64_t n_out, float* out) {
  int64_t m = 0;
  for (; m + GEMV_M <= M; m += GEMV_M) dot_tile<GEMV_M, NR>(x + m * k, w, k, out + m * n_out, n_out);
  for (; m < M; ++m) dot_tile<1, NR>(x + m * k, w, k, out + m * n_out, n_out);
}

#if defined(__AVX512BF16__)
template <int NR>
inline void gemv_rows_dpbf16(const at::BFloat16* x, const at::BFloat16* const* w, int64_t M, int64_t k, int64_t n_out,
                             float* out) {
  int64_t m = 0;
  for (; m + GEMV_M <= M; m += GEMV_M) dot_tile_dpbf16<GEMV_M, NR>(x + m * k, w, k, out + m * n_out, n_out);
  for (; m < M; ++m) dot_tile_dpbf16<1, NR>(x + m * k, w, k, out + m * n_out, n_out);
}

#endif

// One weight matrix of a fused call: its rows fill output columns col .. col + n - 1.
struct GemvSegment {
  const void* w;
  int64_t n, col;
};

// Every weight row tile of every segment in one parallel loop (one fork/join for a step's Q, K and V, or
// its gate and up projections). tile(x, rows, nr, out) computes nr <= GEMV_ROWS output columns of all M rows.
template <typename T, typename Tile>
void gemv_segments(const std::vector<GemvSegment>& segs, int64_t K, Tile tile) {
  std::vector<int64_t> first_tile(segs.size() + 1, 0);
  for (size_t i = 0; i < segs.size(); ++i) first_tile[i + 1] = first_tile[i] + (segs[i].n + GEMV_ROWS - 1) / GEMV_ROWS;
  // About 64 KiB of weights per task: small enough to balance two threads on a 576 x 576 matrix.
  const int64_t grain = std::max<int64_t>(1, (64 * 1024) / (GEMV_ROWS * K * static_cast<int64_t>(sizeof(T))));
  at::parallel_for(0, first_tile.back(), grain, [&](int64_t begin, int64_t end) {
    size_t s = std::upper_bound(first_tile.begin(), first_tile.end(), begin) - first_tile.begin() - 1;
    for (int64_t t = begin; t < end; ++t) {
      while (t >= first_tile[s + 1]) ++s;
      const GemvSegment& seg = segs[s];
      const T* w = static_cast<const T*>(seg.w);
      const int64_t n0 = (t - first_tile[s]) * GEMV_ROWS, nr = std::min<int64_t>(GEMV_ROWS, seg.n - n0);
      const T* rows[GEMV_ROWS];
      for (int r = 0; r < GEMV_ROWS; ++r) rows[r] = w + (n0 + std::min<int64_t>(r, nr - 1)) * K;
      tile(rows, nr, seg.col + n0);
    }
  });
}

// x [M, K] and each w[i] [N_i, K] contiguous, all one dtype (fp32 or bf16); b[i] [N_i] of that dtype or empty.
// Returns [M, sum N_i] in that dtype: x @ w[0]^T | x @ w[1]^T | ... (fp32 sums, rounded once at the end).
at::Tensor linears(const at::Tensor& x, std::vector<at::Tensor> w, std::vector<at::Tensor> b) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "gqa cpu linear: x must be a contiguous [M, K]");
  TORCH_CHECK(!w.empty() && w.size() == b.size(), "gqa cpu linear: one bias (or an empty tensor) per weight");
  const int64_t M = x.size(0), K = x.size(1);
  std::vector<GemvSegment> segs;
  int64_t n_total = 0;
  for (size_t i = 0; i < w.size(); ++i) {
    TORCH_CHECK(w[i].dim() == 2 && w[i].size(1) == K && w[i].is_contiguous(), "gqa cpu linear: w [N, K] contiguous");
    TORCH_CHECK(w[i].scalar_type() == x.scalar_type(), "gqa cpu linear: x and w dtypes differ");
    TORCH_CHECK(b[i].numel() == 0 || (b[i].numel() == w[i].size(0) && b[i].scalar_type() == x.scalar_type()),
                "gqa cpu linear: bias must be empty or [N] of w's dtype");
    segs.push_back({w[i].data_ptr(), w[i].size(0), n_total});
    n_total += w[i].size(0);
  }
  at::Tensor out = at::empty({M, n_total}, x.options().dtype(at::kFloat));
  if (out.numel() == 0) return out.to(x.scalar_type());
  float* o = out.data_ptr<float>();
  if (x.scalar_type() == at::kFloat) {
    const float* xf = x.data_ptr<float>();
    gemv_segments<float>(segs, K, [&](const float* const* rows, int64_t nr, int64_t col) {
      if (nr == GEMV_ROWS) return gemv_rows<GEMV_ROWS>(xf, rows, M, K, n_total, o + col);
      for (int64_t r = 0; r < nr; ++r) gemv_rows<1>(xf, rows + r, M, K, n_total, o + col + r);
    });
  } else {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "gqa cpu linear: fp32 or bf16 weights");
#if defined(__AVX512BF16__)
    const at::BFloat16* xb = x.data_ptr<at::BFloat16>();
    gemv_segments<at::BFloat16>(segs, K, [&](const at::BFloat16* const* rows, int64_t nr, int64_t col) {
      if (nr == GEMV_ROWS) return gemv_rows_dpbf16<GEMV_ROWS>(xb, rows, M, K, n_total, o + col);
      for (int64_t r = 0; r < nr; ++r) gemv_rows_dpbf16<1>(xb, rows + r, M, K, n_total, o + col + r);
    });
#else
    at::Tensor x32 = x.to(at::kFloat);
    const float* xf = x32.data_ptr<float>();
    gemv_segments<at::BFloat16>(segs, K, [&](const at::BFloat16* const* rows, int64_t nr, int64_t col) {
      if (nr == GEMV_ROWS) return gemv_rows<GEMV_ROWS>(xf, rows, M, K, n_total, o + col);
      for (int64_t r = 0; r < nr; ++r) gemv_rows<1>(xf, rows + r, M, K, n_total, o + col + r);
    });
#endif
  }
  for (size_t i = 0; i < b.size(); ++i) {
    if (b[i].numel()) out.narrow(1, segs[i].col, segs[i].n).add_(b[i].to(at::kFloat));
  }
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

// ---- The rest of a decode step's per-token work: RMSNorm and RoPE, one call each instead of 6-10 ops ----
//
// Both compute in fp32 and round as the eager torch code does (gqa.layer.RMSNorm, gqa.rope.apply_rope), for
// the few rows of a decode step (no threads: a row is 1-2 KiB).

inline float to_float(float x) { return x; }
inline float to_float(at::BFloat16 x) { return static_cast<float>(x); }
template <typename T>
inline T from_float(float x) { return static_cast<T>(x); }  // bf16: round to nearest even

template <typename T>
void rms_norm_rows(const T* x, const T* w, T* out, int64_t M, int64_t D, float eps, bool scale_fp32) {
  for (int64_t m = 0; m < M; ++m) {
    const T* xr = x + m * D;
    T* o = out + m * D;
    float lanes[LANES] = {};
    int64_t i = 0;
    for (; i + LANES <= D; i += LANES)
      for (int l = 0; l < LANES; ++l) lanes[l] += to_float(xr[i + l]) * to_float(xr[i + l]);
    float ss = 0.0f;
    for (int l = 0; l < LANES; ++l) ss += lanes[l];
    for (; i < D; ++i) ss += to_float(xr[i]) * to_float(xr[i]);
    const float r = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
    for (int64_t d = 0; d < D; ++d) {
      const float y = to_float(xr[d]) * r;
      // scale_fp32 (Gemma): the scale applied in fp32, one rounding; else (Llama): rounded, then scaled.
      o[d] = scale_fp32 ? from_float<T>(y * to_float(w[d])) : from_float<T>(to_float(w[d]) * to_float(from_float<T>(y)));
    }
  }
}

// x [M, D] contiguous, w [D], both fp32 or both bf16. Returns [M, D] in that dtype.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps, bool scale_fp32) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && w.dim() == 1 && w.size(0) == x.size(1) && w.is_contiguous(),
              "gqa cpu rms_norm: x [M, D] and w [D] contiguous");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "gqa cpu rms_norm: x and w dtypes differ");
  at::Tensor out = at::empty_like(x);
  if (x.scalar_type() == at::kFloat) {
    rms_norm_rows<float>(x.data_ptr<float>(), w.data_ptr<float>(), out.data_ptr<float>(), x.size(0), x.size(1),
                         static_cast<float>(eps), scale_fp32);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "gqa cpu rms_norm: fp32 or bf16");
    rms_norm_rows<at::BFloat16>(x.data_ptr<at::BFloat16>(), w.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(),
                                x.size(0), x.size(1), static_cast<float>(eps), scale_fp32);
  }
  return out;
}

template <typename T>
void rope_rows(const at::Tensor& x, const float* cos, const float* sin, bool per_batch, T* out) {
  const int64_t B = x.size(0), H = x.size(1), T_ = x.size(2), D = x.size(3), half = D / 2;
  const T* base = static_cast<const T*>(x.data_ptr());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < T_; ++t) {
        const T* xr = base + b * x.stride(0) + h * x.stride(1) + t * x.stride(2);
        const int64_t c0 = ((per_batch ? b * T_ : 0) + t) * D;
        const float* c = cos + c0;
        const float* s = sin + c0;
        T* o = out + ((b * H + h) * T_ + t) * D;
        for (int64_t i = 0; i < half; ++i) {  // (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin): "rotate half"
          const float x1 = to_float(xr[i]), x2 = to_float(xr[i + half]);
          o[i] = from_float<T>(x1 * c[i] + (-x2) * s[i]);
          o[i + half] = from_float<T>(x2 * c[i + half] + x1 * s[i + half]);
        }
      }
}

// x [B, H, T, D] fp32 or bf16 with unit stride in D (any other strides); cos, sin [T, D] or [B, T, D] fp32
// contiguous. Returns the rotated x, contiguous [B, H, T, D] in x's dtype.
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1 && x.size(3) % 2 == 0, "gqa cpu rope: x [B, H, T, D], unit stride in D");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.sizes() == sin.sizes(),
              "gqa cpu rope: cos and sin contiguous fp32 of one shape");
  const bool per_batch = cos.dim() == 3;
  TORCH_CHECK((cos.dim() == 2 || (per_batch && cos.size(0) == x.size(0))) && cos.size(-2) == x.size(2) &&
                  cos.size(-1) == x.size(3),
              "gqa cpu rope: cos [T, D] or [B, T, D] matching x");
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (x.scalar_type() == at::kFloat) {
    rope_rows<float>(x, cos.data_ptr<float>(), sin.data_ptr<float>(), per_batch, out.data_ptr<float>());
  } else {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "gqa cpu rope: fp32 or bf16");
    rope_rows<at::BFloat16>(x, cos.data_ptr<float>(), sin.data_ptr<float>(), per_batch, out.data_ptr<at::BFloat16>());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(gqa_cpu_decode, m) {
  m.def("decode", &decode);
  m.def("linears", &linears);
  m.def("rms_norm", &rms_norm);
  m.def("rope", &rope);
}
