// Internal to the native library: the per-adapter algorithm as templates over an instruction set's tile shapes.
//
// Per adapter: the Gram matrices A A^T and B^T B in float64 (one pass over each factor; float32 and half inputs
// are widened first, so every product is exact and only the sums round), their Cholesky factors as the R factors
// of the QR of A^T and B, and the singular values of the r x r core R_A R_B^T. A factor whose diag(R) spreads more
// than the caller's ratio (Cholesky-QR loses accuracy like eps * ratio^2) is re-factored by Householder QR, which is
// backward stable. Inputs beyond 2^+-300 are rescaled by powers of two (exact), and NaN or Inf is reported, not
// propagated.
//
// The Gram products bound the run time (about 0.6 GFLOP of FMAs for a 7B model's 224 adapters at r=16), so they
// are register-tiled kernels on GCC/Clang vector types. Each kernels_*.cpp instantiates everything here for one
// instruction set (its entry function carries the target attribute, and all of this is inlined into it), in its
// own translation unit so that the three compile in parallel. Templates live in an anonymous namespace: each
// translation unit keeps its own copies, and none can be merged with another's at link time.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "lowrank_svd.h"

#if defined(LF_FUSED_V4)
#include <immintrin.h>
#endif

#define LF_INLINE inline __attribute__((always_inline))
// The instruction set of the translation unit that includes this file (kernels_*.cpp define it before).
#ifndef LF_TARGET
#define LF_TARGET
#endif

namespace lora_fast {

constexpr int64_t round_up(int64_t x, int64_t k) { return (x + k - 1) / k * k; }

// Chunk lengths: a chunk of the widened factor stays in L2 (1-2 MB per core on current CPUs) while every tile
// passes over it. Measured on Zen 4, 7B shapes: 32-64 KB chunks within 3% of each other.
constexpr int64_t kChunkDoubles = 8192;  // 64 KB

struct Job {
  const void* a;
  const void* b;
  int dtype;
  int64_t r, m, n, lda, ldb;
  double scaling, max_ratio, sigma_tol;
  double* sigma;
  int64_t entry, index;
  double cost;
};

// Per-thread buffers, sized for the largest adapter of the call; the fallbacks' buffers grow on demand.
struct Scratch {
  std::vector<double> buf, acc, ga, gb, la, lb, core, work, copy;
  std::vector<int64_t> iwork;

  void reserve(int64_t r, int64_t m, int64_t n) {
    const int64_t rp = round_up(r, 8), rows4 = round_up(r, 4);
    grow(buf, std::max(rows4 * std::max<int64_t>(8, std::min(round_up(n, 8), kChunkDoubles / rows4 / 8 * 8)),
                       std::min(m, kChunkDoubles / rp) * rp + rp));
    grow(acc, std::max(rows4 * rows4 * 8 + 64, 64 * (rp / 8) * (rp / 8 + 1) / 2));
    for (auto* v : {&ga, &gb, &la, &lb, &core}) grow(*v, rp * rp);
    grow(work, 8 * (rp + 2));  // Jacobi: ~3.5 rp; eigenvalues: 5 rp + 2
    if (static_cast<int64_t>(iwork.size()) < 4 * (rp + 2)) iwork.resize(4 * (rp + 2));
  }
  size_t bytes() const {
    size_t total = iwork.capacity() * sizeof(int64_t);
    for (const auto* v : {&buf, &acc, &ga, &gb, &la, &lb, &core, &work, &copy}) total += v->capacity() * sizeof(double);
    return total;
  }
  static void grow(std::vector<double>& v, int64_t size) {
    if (static_cast<int64_t>(v.size()) < size) v.resize(size);
  }
};

// One entry per instruction set (kernels_*.cpp); each returns an lf_status.
int32_t run_baseline(const Job& job, Scratch& s);
int32_t run_x86_64_v3(const Job& job, Scratch& s);
int32_t run_x86_64_v4(const Job& job, Scratch& s);

namespace {

// ---------------------------------------------------------------------------------------------------------------
// Element types and exact widening

struct bf16 {
  uint16_t bits;
};
struct f16 {
  uint16_t bits;
};

LF_INLINE double widen(float x) { return x; }
LF_INLINE double widen(double x) { return x; }
LF_INLINE double widen(bf16 x) {
  const uint32_t u = uint32_t(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
LF_INLINE double widen(f16 x) {
  const uint32_t h = x.bits, sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in float
    const float f = float(mant) * 0x1p-24f;
    std::memcpy(&bits, &f, 4);
    bits |= sign;
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// ---------------------------------------------------------------------------------------------------------------
// Per-ISA tile shapes. W: doubles per vector register. Rows kernel (A A^T, dot products along a row): TI x TJ
// accumulators plus TI + TJ loaded vectors must fit the register file. Columns kernel (B^T B, rank-1 updates of a
// row of B): NI row blocks x 8 columns of accumulators plus NI loaded vectors.

template <int W_, int TI_, int TJ_, int NI_>
struct Isa {
  static constexpr int W = W_, TI = TI_, TJ = TJ_, NI = NI_;
};
using IsaV4 = Isa<8, 4, 4, 3>;    // 32 zmm: 16 + 8 (rows), 24 + 3 (columns)
using IsaV3 = Isa<4, 2, 4, 1>;    // 16 ymm: 8 + 6, 8 + 1
using IsaBase = Isa<2, 2, 4, 1>;  // 16 xmm

template <int W>
struct VecOf;
template <>
struct VecOf<8> {
  typedef double type __attribute__((vector_size(64)));
};
template <>
struct VecOf<4> {
  typedef double type __attribute__((vector_size(32)));
};
template <>
struct VecOf<2> {
  typedef double type __attribute__((vector_size(16)));
};

template <class V>
LF_INLINE V vload(const double* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <class V>
LF_INLINE void vstore(double* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}
template <class V, int W>
LF_INLINE double hsum(V v) {
  double s = 0;
  for (int k = 0; k < W; ++k) s += v[k];
  return s;
}

// ---------------------------------------------------------------------------------------------------------------
// Gram kernels

// Widens rows [0, r) x columns [t0, t0 + len) of a row-major factor into buf (row stride T_), zero padded up to
// a multiple of 8 columns.
template <class T>
LF_INLINE void widen_rows(const T* x, int64_t r, int64_t ld, int64_t t0, int64_t len, int64_t T_, double* buf) {
  const int64_t cols = round_up(len, 8);
  for (int64_t i = 0; i < r; ++i) {
    const T* src = x + i * ld + t0;
    double* dst = buf + i * T_;
    for (int64_t t = 0; t < len; ++t) dst[t] = widen(src[t]);
    for (int64_t t = len; t < cols; ++t) dst[t] = 0.0;
  }
}

// Adds columns [0, cols) of one chunk (rows4 x T_, in buf) to the accumulators of the TI x TJ tiles of X X^T's
// upper triangle. Not inlined: one copy per instruction set serves every input dtype.
template <class I>
LF_TARGET __attribute__((noinline)) void rows_chunk(const double* buf, int64_t rows4, int64_t T_, int64_t cols,
                                                    double* acc) {
  typedef typename VecOf<I::W>::type V;
  constexpr int TI = I::TI, TJ = I::TJ, W = I::W;
  double* tile_acc = acc;
  for (int64_t i0 = 0; i0 < rows4; i0 += TI) {
    for (int64_t j0 = i0 / TJ * TJ; j0 < rows4; j0 += TJ, tile_acc += TI * TJ * W) {
      V s[TI][TJ];
      for (int ii = 0; ii < TI; ++ii)
        for (int jj = 0; jj < TJ; ++jj) s[ii][jj] = vload<V>(tile_acc + (ii * TJ + jj) * W);
      const double* xi = buf + i0 * T_;
      const double* xj = buf + j0 * T_;
      for (int64_t t = 0; t < cols; t += W) {  // cols: a multiple of 8
        V u[TI], v[TJ];
        for (int ii = 0; ii < TI; ++ii) u[ii] = vload<V>(xi + ii * T_ + t);
        for (int jj = 0; jj < TJ; ++jj) v[jj] = vload<V>(xj + jj * T_ + t);
        for (int ii = 0; ii < TI; ++ii)
          for (int jj = 0; jj < TJ; ++jj) s[ii][jj] += u[ii] * v[jj];
      }
      for (int ii = 0; ii < TI; ++ii)
        for (int jj = 0; jj < TJ; ++jj) vstore<V>(tile_acc + (ii * TJ + jj) * W, s[ii][jj]);
    }
  }
}

// G = X X^T for X (r x n, row stride ld): the Gram matrix of A's rows. Upper triangle into g (r x r, stride gs; zeros
// elsewhere in its first r rows).
template <class I, class T>
LF_TARGET void gram_rows(const T* x, int64_t r, int64_t n, int64_t ld, double* buf, double* acc, double* g,
                         int64_t gs) {
  typedef typename VecOf<I::W>::type V;
  constexpr int TI = I::TI, TJ = I::TJ, W = I::W;
  const int64_t rows4 = round_up(r, 4);
  const int64_t T_ = std::max<int64_t>(8, std::min(round_up(n, 8), kChunkDoubles / rows4 / 8 * 8));
  for (int64_t i = r; i < rows4; ++i) std::memset(buf + i * T_, 0, sizeof(double) * T_);
  int64_t tiles = 0;
  for (int64_t i0 = 0; i0 < rows4; i0 += TI)
    for (int64_t j0 = i0 / TJ * TJ; j0 < rows4; j0 += TJ) ++tiles;
  std::memset(acc, 0, sizeof(double) * tiles * TI * TJ * W);
  for (int64_t t0 = 0; t0 < n; t0 += T_) {
    const int64_t len = std::min(T_, n - t0);
    widen_rows(x, r, ld, t0, len, T_, buf);
    rows_chunk<I>(buf, rows4, T_, round_up(len, 8), acc);  // the last chunk may be shorter
  }
  std::memset(g, 0, sizeof(double) * r * gs);  // the lower triangle and the padding: zeros (cholesky reads them)
  const double* tile_acc = acc;
  for (int64_t i0 = 0; i0 < rows4; i0 += TI)
    for (int64_t j0 = i0 / TJ * TJ; j0 < rows4; j0 += TJ, tile_acc += TI * TJ * W)
      for (int ii = 0; ii < TI; ++ii)
        for (int jj = 0; jj < TJ; ++jj) {
          const int64_t i = i0 + ii, j = j0 + jj;
          if (i <= j && j < r) g[i * gs + j] = hsum<V, W>(vload<V>(tile_acc + (ii * TJ + jj) * W));
        }
}

// Accumulators of gram_cols for columns block jb (8 columns), row blocks [i0, i0 + NI) of W rows.
template <class V, int W, int NI>
LF_INLINE void cols_tile(const double* buf, int64_t rows, int64_t rp, int64_t jb, int64_t i0, double* acc) {
  V s[NI][8];
  for (int ii = 0; ii < NI; ++ii)
    for (int jj = 0; jj < 8; ++jj) s[ii][jj] = vload<V>(acc + (ii * 8 + jj) * W);
  for (int64_t t = 0; t < rows; ++t) {
    const double* row = buf + t * rp;
    V u[NI];
    for (int ii = 0; ii < NI; ++ii) u[ii] = vload<V>(row + (i0 + ii) * W);
    for (int jj = 0; jj < 8; ++jj) {
      const double b = row[jb * 8 + jj];
      for (int ii = 0; ii < NI; ++ii) s[ii][jj] += u[ii] * b;
    }
  }
  for (int ii = 0; ii < NI; ++ii)
    for (int jj = 0; jj < 8; ++jj) vstore<V>(acc + (ii * 8 + jj) * W, s[ii][jj]);
}

// Adds one chunk (rows x rp, in buf) to the accumulators of X^T X's upper triangle, column block by column
// block. Not inlined: one copy per instruction set serves every input dtype.
template <class I>
LF_TARGET __attribute__((noinline)) void cols_chunk(const double* buf, int64_t rows, int64_t rp, double* acc) {
  typedef typename VecOf<I::W>::type V;
  constexpr int W = I::W, NI = I::NI;
  double* block_acc = acc;
  for (int64_t jb = 0; jb < rp / 8; ++jb) {
    const int64_t row_blocks = (jb * 8 + 8) / W;
    int64_t i0 = 0;
    for (; i0 + NI <= row_blocks; i0 += NI) cols_tile<V, W, NI>(buf, rows, rp, jb, i0, block_acc + i0 * 8 * W);
    if (NI > 2 && i0 + 2 <= row_blocks) {  // two blocks in one pass: 8 broadcasts feed 16 FMAs, not 8
      cols_tile<V, W, (NI > 2 ? 2 : 1)>(buf, rows, rp, jb, i0, block_acc + i0 * 8 * W);
      i0 += NI > 2 ? 2 : 1;
    }
    for (; i0 < row_blocks; ++i0) cols_tile<V, W, 1>(buf, rows, rp, jb, i0, block_acc + i0 * 8 * W);
    block_acc += (jb * 8 + 8) * 8;
  }
}

// G = X^T X for X (m x r, row stride ld): the Gram matrix of B's columns, by rank-1 updates of each row (B is
// read as stored; no transpose). Upper triangle into g (r x r, stride gs; zeros elsewhere in its first r rows).
template <class I, class T>
LF_TARGET void gram_cols(const T* x, int64_t m, int64_t r, int64_t ld, double* buf, double* acc, double* g,
                         int64_t gs) {
  constexpr int W = I::W;
  const int64_t rp = round_up(r, 8), nb = rp / 8;
  const int64_t T_ = std::max<int64_t>(1, std::min(m, kChunkDoubles / rp));
  const int64_t acc_doubles = 64 * nb * (nb + 1) / 2;  // column block jb holds (8 jb + 8) rows x 8 columns
  std::memset(acc, 0, sizeof(double) * acc_doubles);
  for (int64_t t0 = 0; t0 < m; t0 += T_) {
    const int64_t rows = std::min(T_, m - t0);
    if (ld == rp) {  // rows of 8, 16, ... contiguous: one long loop (a loop per row of 8-16 values costs 2x)
      const T* src = x + t0 * ld;
      for (int64_t t = 0; t < rows * rp; ++t) buf[t] = widen(src[t]);
    } else {
      for (int64_t t = 0; t < rows; ++t) {
        const T* src = x + (t0 + t) * ld;
        double* dst = buf + t * rp;
        for (int64_t j = 0; j < r; ++j) dst[j] = widen(src[j]);
        for (int64_t j = r; j < rp; ++j) dst[j] = 0.0;
      }
    }
    cols_chunk<I>(buf, rows, rp, acc);
  }
  std::memset(g, 0, sizeof(double) * r * gs);  // the lower triangle and the padding: zeros (cholesky reads them)
  const double* block_acc = acc;
  for (int64_t jb = 0; jb < nb; ++jb) {
    for (int64_t i = 0; i < jb * 8 + 8; ++i)
      for (int jj = 0; jj < 8; ++jj) {
        const int64_t j = jb * 8 + jj;
        if (i <= j && j < r) g[i * gs + j] = block_acc[(i / W * 8 + jj) * W + i % W];
      }
    block_acc += (jb * 8 + 8) * 8;
  }
}

#if defined(LF_FUSED_V4)
// ---------------------------------------------------------------------------------------------------------------
// Fused Gram kernels for r = 8 and r = 16 on x86-64-v4 (kernels_x86_64_v4.cpp defines LF_FUSED_V4)
//
// At r <= 16 widening a chunk before the products cost as much as a third of the time: a float -> double
// conversion of 8 values takes 2 cycles on Zen 4 (measured), on a pipe apart from the FMAs, where a Gram entry
// costs only r / 2 FMAs per 8 columns. These kernels convert as they load, so the conversions overlap the FMAs,
// keep every accumulator of a pass in registers, and compute the upper triangle only, diagonal blocks included.
// Measured on Zen 4, one thread, 36 BERT-size float32 adapters (L3-resident): A A^T r = 16 8.1 -> 4.3 us, B^T B
// 7.0 -> 5.2 us, r = 8 2.1 -> 1.1 and 2.1 -> 1.3 us; 224 7B-size adapters at r = 16 72 -> 44 and 79 -> 42 us each.

typedef double V8d __attribute__((vector_size(64)));
typedef double V4d __attribute__((vector_size(32)));

// 8 consecutive values as doubles (exact for every input type)
LF_TARGET LF_INLINE V8d load8d(const double* p) { return vload<V8d>(p); }
LF_TARGET LF_INLINE V8d load8d(const float* p) { return (V8d)_mm512_cvtps_pd(_mm256_loadu_ps(p)); }
LF_TARGET LF_INLINE V8d load8d(const bf16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return (V8d)_mm512_cvtps_pd(_mm256_castsi256_ps(_mm256_slli_epi32(wide, 16)));
}
LF_TARGET LF_INLINE V8d load8d(const f16* p) {
  return (V8d)_mm512_cvtps_pd(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// Column blocks of 8 per chunk: 1024 columns (64 KB of r = 16 float rows) stay in L2 while every pass reads them,
// and the next chunk is prefetched meanwhile (measured best of 256-1024 columns).
constexpr int64_t kFusedChunkBlocks = 128;

// A A^T for 8 rows (stride ld), column blocks [b0, b1): pass 1 pairs (i < 3, j >= i), 21 accumulators and 8 rows
// loaded; pass 2 pairs within rows 3..7, 15 and 5. acc: 36 vectors.
template <class T>
LF_TARGET __attribute__((noinline)) void rows8_fused(const T* x, int64_t ld, int64_t b0, int64_t b1, double* acc) {
  {
    V8d s[21];
    for (int p = 0; p < 21; ++p) s[p] = vload<V8d>(acc + p * 8);
    for (int64_t b = b0; b < b1; ++b) {
      V8d u[8];
      for (int k = 0; k < 8; ++k) u[k] = load8d(x + k * ld + b * 8);
      int p = 0;
      for (int i = 0; i < 3; ++i)
        for (int j = i; j < 8; ++j, ++p) s[p] += u[i] * u[j];
    }
    for (int p = 0; p < 21; ++p) vstore<V8d>(acc + p * 8, s[p]);
  }
  V8d s[15];
  for (int p = 0; p < 15; ++p) s[p] = vload<V8d>(acc + (21 + p) * 8);
  for (int64_t b = b0; b < b1; ++b) {
    V8d u[5];
    for (int k = 0; k < 5; ++k) u[k] = load8d(x + (3 + k) * ld + b * 8);
    int p = 0;
    for (int i = 0; i < 5; ++i)
      for (int j = i; j < 5; ++j, ++p) s[p] += u[i] * u[j];
  }
  for (int p = 0; p < 15; ++p) vstore<V8d>(acc + (21 + p) * 8, s[p]);
}

// The upper triangle of A A^T for 8 rows from the accumulators of rows8_fused.
inline void rows8_extract(const double* acc, double* g, int64_t gs) {
  int p = 0;
  for (int i = 0; i < 3; ++i)
    for (int j = i; j < 8; ++j, ++p) g[i * gs + j] = hsum<V8d, 8>(vload<V8d>(acc + p * 8));
  for (int i = 3; i < 8; ++i)
    for (int j = i; j < 8; ++j, ++p) g[i * gs + j] = hsum<V8d, 8>(vload<V8d>(acc + p * 8));
}

// A A^T for 16 rows, column blocks [b0, b1): rows in blocks of 4, the 6 blocks above the diagonal as 4 x 4 tiles
// (16 accumulators, 8 rows loaded), the 4 diagonal blocks as triangles, two per pass (20, 8). acc: 136 vectors.
template <class T>
LF_TARGET __attribute__((noinline)) void rows16_fused(const T* x, int64_t ld, int64_t b0, int64_t b1, double* acc) {
  double* a = acc;
  for (int bi = 0; bi < 4; ++bi)
    for (int bj = bi + 1; bj < 4; ++bj, a += 16 * 8) {
      V8d s[16];
      for (int p = 0; p < 16; ++p) s[p] = vload<V8d>(a + p * 8);
      const T* xi = x + bi * 4 * ld;
      const T* xj = x + bj * 4 * ld;
      for (int64_t b = b0; b < b1; ++b) {
        V8d u[4], v[4];
        for (int k = 0; k < 4; ++k) u[k] = load8d(xi + k * ld + b * 8);
        for (int k = 0; k < 4; ++k) v[k] = load8d(xj + k * ld + b * 8);
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) s[i * 4 + j] += u[i] * v[j];
      }
      for (int p = 0; p < 16; ++p) vstore<V8d>(a + p * 8, s[p]);
    }
  for (int bd = 0; bd < 4; bd += 2, a += 20 * 8) {
    V8d s[20];
    for (int p = 0; p < 20; ++p) s[p] = vload<V8d>(a + p * 8);
    const T* x0 = x + bd * 4 * ld;
    const T* x1 = x0 + 4 * ld;
    for (int64_t b = b0; b < b1; ++b) {
      V8d u[4], v[4];
      for (int k = 0; k < 4; ++k) u[k] = load8d(x0 + k * ld + b * 8);
      for (int k = 0; k < 4; ++k) v[k] = load8d(x1 + k * ld + b * 8);
      int p = 0;
      for (int i = 0; i < 4; ++i)
        for (int j = i; j < 4; ++j, ++p) {
          s[p] += u[i] * u[j];
          s[10 + p] += v[i] * v[j];
        }
    }
    for (int p = 0; p < 20; ++p) vstore<V8d>(a + p * 8, s[p]);
  }
}

inline void rows16_extract(const double* acc, double* g, int64_t gs) {
  const double* a = acc;
  for (int bi = 0; bi < 4; ++bi)
    for (int bj = bi + 1; bj < 4; ++bj, a += 16 * 8)
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) g[(bi * 4 + i) * gs + bj * 4 + j] = hsum<V8d, 8>(vload<V8d>(a + (i * 4 + j) * 8));
  for (int bd = 0; bd < 4; ++bd, a += 10 * 8) {
    int p = 0;
    for (int i = 0; i < 4; ++i)
      for (int j = i; j < 4; ++j, ++p) g[(bd * 4 + i) * gs + bd * 4 + j] = hsum<V8d, 8>(vload<V8d>(a + p * 8));
  }
}

// G = X X^T for X (r x n, r = 8 or 16, row stride ld) into g as gram_rows writes it.
template <class T>
LF_TARGET void gram_rows_fused(const T* x, int64_t r, int64_t n, int64_t ld, double* acc, double* g, int64_t gs) {
  const int vectors = r == 8 ? 36 : 136;
  std::memset(acc, 0, sizeof(double) * vectors * 8);
  const int64_t nb = n / 8;
  for (int64_t b0 = 0; b0 < nb; b0 += kFusedChunkBlocks) {
    const int64_t b1 = std::min(nb, b0 + kFusedChunkBlocks);
    const int64_t next = (std::min(nb, b1 + kFusedChunkBlocks) - b1) * 8 * static_cast<int64_t>(sizeof(T));
    for (int64_t i = 0; i < r; ++i) {
      const char* p = reinterpret_cast<const char*>(x + i * ld + b1 * 8);
      for (int64_t o = 0; o < next; o += 64) __builtin_prefetch(p + o, 0, 3);
    }
    if (r == 8)
      rows8_fused(x, ld, b0, b1, acc);
    else
      rows16_fused(x, ld, b0, b1, acc);
  }
  if (n % 8 != 0) {  // the last columns, widened and zero padded
    alignas(64) double tail[16 * 8];
    for (int64_t i = 0; i < r; ++i)
      for (int64_t t = 0; t < 8; ++t) tail[i * 8 + t] = nb * 8 + t < n ? widen(x[i * ld + nb * 8 + t]) : 0.0;
    if (r == 8)
      rows8_fused<double>(tail, 8, 0, 1, acc);
    else
      rows16_fused<double>(tail, 8, 0, 1, acc);
  }
  std::memset(g, 0, sizeof(double) * r * gs);
  if (r == 8)
    rows8_extract(acc, g, gs);
  else
    rows16_extract(acc, g, gs);
}

// B^T B for rows of 8 (stride ld): 4-wide accumulators G[0..3][0..7], G[4..7][4..7] (12; 4-wide vectors hold
// 3/4 useful products where 8-wide ones would hold 9/16, and Zen 4 runs two 4-wide FMAs per cycle). Rows are
// widened DIST rows ahead into a ring and read back from L1 when their turn comes (a broadcast straight after the
// store of its row waited on store forwarding: ~2x slower). acc: 48 doubles.
template <class T>
LF_TARGET __attribute__((noinline)) void cols8_fused(const T* x, int64_t ld, int64_t m, double* acc) {
  constexpr int kDist = 8;
  V4d s0[4], s1[4], s2[4];
  for (int j = 0; j < 4; ++j) {
    s0[j] = vload<V4d>(acc + j * 4);
    s1[j] = vload<V4d>(acc + 16 + j * 4);
    s2[j] = vload<V4d>(acc + 32 + j * 4);
  }
  alignas(64) double ring[2 * kDist][8];
  for (int64_t t = 0; t < std::min<int64_t>(kDist, m); ++t) vstore<V8d>(ring[t], load8d(x + t * ld));
  for (int64_t t = 0; t < m; ++t) {
    if (t + kDist < m) vstore<V8d>(ring[(t + kDist) % (2 * kDist)], load8d(x + (t + kDist) * ld));
    const double* row = ring[t % (2 * kDist)];
    const V4d lo = vload<V4d>(row), hi = vload<V4d>(row + 4);
    for (int j = 0; j < 4; ++j) s0[j] += lo * row[j];
    for (int j = 0; j < 4; ++j) {
      const double b = row[4 + j];
      s1[j] += lo * b;
      s2[j] += hi * b;
    }
  }
  for (int j = 0; j < 4; ++j) {
    vstore<V4d>(acc + j * 4, s0[j]);
    vstore<V4d>(acc + 16 + j * 4, s1[j]);
    vstore<V4d>(acc + 32 + j * 4, s2[j]);
  }
}

// B^T B for rows of 16: 8-wide accumulators G[0..7][0..7], G[0..7][8..15], G[8..15][8..15] (24, one pass), with
// the ring of cols8_fused. acc: 192 doubles.
template <class T>
LF_TARGET __attribute__((noinline)) void cols16_fused(const T* x, int64_t ld, int64_t m, double* acc) {
  constexpr int kDist = 8;
  V8d s0[8], s1[8], s2[8];
  for (int j = 0; j < 8; ++j) {
    s0[j] = vload<V8d>(acc + j * 8);
    s1[j] = vload<V8d>(acc + (8 + j) * 8);
    s2[j] = vload<V8d>(acc + (16 + j) * 8);
  }
  alignas(64) double ring[2 * kDist][16];
  for (int64_t t = 0; t < std::min<int64_t>(kDist, m); ++t) {
    vstore<V8d>(ring[t], load8d(x + t * ld));
    vstore<V8d>(ring[t] + 8, load8d(x + t * ld + 8));
  }
  for (int64_t t = 0; t < m; ++t) {
    if (t + kDist < m) {  // (a lambda here would lose the target attribute)
      double* dst = ring[(t + kDist) % (2 * kDist)];
      vstore<V8d>(dst, load8d(x + (t + kDist) * ld));
      vstore<V8d>(dst + 8, load8d(x + (t + kDist) * ld + 8));
    }
    const double* row = ring[t % (2 * kDist)];
    const V8d lo = vload<V8d>(row), hi = vload<V8d>(row + 8);
    for (int j = 0; j < 8; ++j) s0[j] += lo * row[j];
    for (int j = 0; j < 8; ++j) {
      const double b = row[8 + j];
      s1[j] += lo * b;
      s2[j] += hi * b;
    }
  }
  for (int j = 0; j < 8; ++j) {
    vstore<V8d>(acc + j * 8, s0[j]);
    vstore<V8d>(acc + (8 + j) * 8, s1[j]);
    vstore<V8d>(acc + (16 + j) * 8, s2[j]);
  }
}

// G = X^T X for X (m x r, r = 8 or 16, row stride ld) into g as gram_cols writes it.
template <class T>
LF_TARGET void gram_cols_fused(const T* x, int64_t m, int64_t r, int64_t ld, double* acc, double* g, int64_t gs) {
  std::memset(g, 0, sizeof(double) * r * gs);
  if (r == 8) {
    std::memset(acc, 0, sizeof(double) * 48);
    cols8_fused(x, ld, m, acc);
    for (int i = 0; i < 8; ++i)
      for (int j = i; j < 8; ++j)
        g[i * gs + j] = i < 4 ? acc[j * 4 + i] : acc[32 + (j - 4) * 4 + (i - 4)];
  } else {
    std::memset(acc, 0, sizeof(double) * 192);
    cols16_fused(x, ld, m, acc);
    for (int i = 0; i < 16; ++i)
      for (int j = i; j < 16; ++j) g[i * gs + j] = acc[((j < 8 ? 0 : i < 8 ? 8 : 16) + j % 8) * 8 + i % 8];
  }
}
#endif  // LF_FUSED_V4

// ---------------------------------------------------------------------------------------------------------------
// Small dense factorizations (r x r)

template <class I>
LF_INLINE double dot(const double* x, const double* y, int64_t len) {
  typedef typename VecOf<I::W>::type V;
  constexpr int W = I::W;
  V s0 = {}, s1 = {};
  int64_t t = 0;
  for (; t + 2 * W <= len; t += 2 * W) {
    s0 += vload<V>(x + t) * vload<V>(y + t);
    s1 += vload<V>(x + t + W) * vload<V>(y + t + W);
  }
  for (; t + W <= len; t += W) s0 += vload<V>(x + t) * vload<V>(y + t);
  double s = hsum<V, W>(s0 + s1);
  for (; t < len; ++t) s += x[t] * y[t];
  return s;
}

// Cholesky G = R^T R, right-looking on the upper triangle of g (stride gs >= round_up(r, W); destroyed: R's rows
// replace it; the lower triangle and the padding columns must hold finite values), then L = R^T into l (lower,
// row-major, stride ls, zeros above the diagonal and in the padding). Each step updates the trailing rows with whole
// vectors (no horizontal sums: measured 5x faster than dot products at r = 64). False when a pivot is not positive
// or diag(R) spans more than max_ratio.
template <class I>
LF_INLINE bool cholesky(double* g, int64_t r, int64_t gs, double max_ratio, double* l, int64_t ls) {
  typedef typename VecOf<I::W>::type V;
  constexpr int W = I::W;
  const int64_t rw = round_up(r, W);
  double dmax = 0.0, dmin = std::numeric_limits<double>::infinity();
  for (int64_t k = 0; k < r; ++k) {
    double* gk = g + k * gs;
    const double d = gk[k];
    if (!(d > 0.0)) return false;
    const double rkk = std::sqrt(d);
    dmax = std::max(dmax, rkk);
    dmin = std::min(dmin, rkk);
    const double inv = 1.0 / rkk;
    gk[k] = rkk;
    for (int64_t j = k + 1; j < r; ++j) gk[j] *= inv;
    for (int64_t i = k + 1; i < r; ++i) {  // rows i > k, from the vector holding column i on
      const double f = gk[i];
      double* gi = g + i * gs;
      for (int64_t j = i / W * W; j < rw; j += W) vstore<V>(gi + j, vload<V>(gi + j) - f * vload<V>(gk + j));
    }
  }
  for (int64_t i = 0; i < r; ++i) {
    double* li = l + i * ls;
    for (int64_t j = 0; j <= i; ++j) li[j] = g[j * gs + i];
    for (int64_t j = i + 1; j < ls; ++j) li[j] = 0.0;
  }
  return dmax <= max_ratio * dmin;
}

// Householder QR of the len x r matrix whose columns are the rows of x (r x len, destroyed): R^T into l (lower,
// row-major, stride ls), the same layout cholesky() writes.
template <class I>
LF_INLINE void householder(double* x, int64_t r, int64_t len, double* l, int64_t ls) {
  for (int64_t i = 0; i < r; ++i) std::memset(l + i * ls, 0, sizeof(double) * ls);
  for (int64_t j = 0; j < r && j < len; ++j) {
    double* v = x + j * len;  // column j; entries j..len-1 are active
    const double norm2 = dot<I>(v + j, v + j, len - j);
    const double norm = std::sqrt(norm2);
    if (norm == 0.0) {  // nothing to reflect: R(j, j) = 0, and row j of R is what the columns hold at j
      for (int64_t k = j + 1; k < r; ++k) l[k * ls + j] = x[k * len + j];
      continue;
    }
    const double alpha = v[j] >= 0 ? -norm : norm;  // the sign that avoids cancellation in v_j - alpha
    const double vj_old = v[j];
    v[j] -= alpha;
    const double vnorm2 = norm2 - vj_old * vj_old + v[j] * v[j];
    l[j * ls + j] = alpha;
    for (int64_t k = j + 1; k < r; ++k) {
      double* c = x + k * len;
      const double f = 2.0 * dot<I>(v + j, c + j, len - j) / vnorm2;
      for (int64_t t = j; t < len; ++t) c[t] -= f * v[t];
      l[k * ls + j] = c[j];
    }
  }
}

// Singular values (descending) of the r x r matrix whose columns are c[j * ld ...] (ld >= r, multiple of W,
// zero padded), destroyed, by one-sided Jacobi (Hestenes) in round-robin order: the r/2 rotations of a round
// touch disjoint columns, so their angles are computed together in vector registers, and a column's norm is
// updated from the angle instead of recomputed. High relative accuracy; ~6-9 sweeps for r <= 64.
template <class I>
LF_INLINE void jacobi_svdvals(double* c, int64_t r, int64_t ld, double* work, int64_t* iwork, double* sigma) {
  typedef typename VecOf<I::W>::type V;
  constexpr int W = I::W;
  constexpr double tol = 4 * std::numeric_limits<double>::epsilon();
  const int64_t rr = r + (r & 1);  // an odd r gets a dummy column that sits out one pair per round
  const int64_t half = rr / 2;
  double* norm2 = work;
  double* alpha = norm2 + rr;
  double* beta = alpha + half;
  double* gamma = beta + half;
  double* cs = gamma + half;
  double* sn = cs + half;
  int64_t* pos = iwork;
  int64_t* pp = pos + rr;
  int64_t* qq = pp + half;
  for (int64_t p = 0; p < r; ++p) norm2[p] = dot<I>(c + p * ld, c + p * ld, ld);
  for (int sweep = 0; sweep < 60; ++sweep) {
    for (int64_t k = 0; k < rr; ++k) pos[k] = k;
    int64_t rotations = 0;
    for (int64_t round = 0; round + 1 < rr; ++round) {
      int64_t np = 0;
      for (int64_t k = 0; k < half; ++k) {
        const int64_t p = pos[k], q = pos[rr - 1 - k];
        if (p >= r || q >= r) continue;
        pp[np] = p;
        qq[np] = q;
        alpha[np] = norm2[p];
        beta[np] = norm2[q];
        gamma[np] = dot<I>(c + p * ld, c + q * ld, ld);
        ++np;
      }
#pragma omp simd reduction(+ : rotations)
      for (int64_t k = 0; k < np; ++k) {
        const double a = alpha[k], b = beta[k], g = gamma[k];
        const bool rotate = std::fabs(g) > tol * std::sqrt(a) * std::sqrt(b);
        const double gs = rotate ? g : 1.0;
        const double zeta = (b - a) / (2.0 * gs);
        const double az = std::fabs(zeta);
        // t = tan of the angle, the smaller root; 1/(2|zeta|) where zeta^2 would overflow
        const double root = az > 1e150 ? az : std::sqrt(1.0 + zeta * zeta);
        const double t = std::copysign(1.0, zeta) / (az + root);
        const double cos_ = 1.0 / std::sqrt(1.0 + t * t);
        cs[k] = rotate ? cos_ : 1.0;
        sn[k] = rotate ? cos_ * t : 0.0;
        alpha[k] = rotate ? std::max(a - t * g, 0.0) : a;
        beta[k] = rotate ? b + t * g : b;
        rotations += rotate ? 1 : 0;
      }
      for (int64_t k = 0; k < np; ++k) {
        if (sn[k] == 0.0) continue;
        double* cp = c + pp[k] * ld;
        double* cq = c + qq[k] * ld;
        const double co = cs[k], si = sn[k];
        for (int64_t t = 0; t < ld; t += W) {
          const V x = vload<V>(cp + t), y = vload<V>(cq + t);
          vstore<V>(cp + t, co * x - si * y);
          vstore<V>(cq + t, si * x + co * y);
        }
        norm2[pp[k]] = alpha[k];
        norm2[qq[k]] = beta[k];
      }
      // next round: position 0 stays, the others move one place
      const int64_t last = pos[rr - 1];
      for (int64_t k = rr - 1; k > 1; --k) pos[k] = pos[k - 1];
      pos[1] = last;
    }
    if (rotations == 0) break;
    // recompute the norms once per sweep so rounding in the updates cannot accumulate
    for (int64_t p = 0; p < r; ++p) norm2[p] = dot<I>(c + p * ld, c + p * ld, ld);
  }
  for (int64_t p = 0; p < r; ++p) sigma[p] = std::sqrt(dot<I>(c + p * ld, c + p * ld, ld));
  std::sort(sigma, sigma + r, [](double x, double y) { return x > y; });
}

// Bisection steps of bisect_sqrt_eigenvalues for the vectors [b0, b0 + nv) of eigenvalue indices, Points test
// points per lane and step (Points = 2: trisection, two chains of divisions overlap where a single vector would
// leave the divider idle for most of each division's latency).
template <class I, int Points>
LF_INLINE void bisect_sqrt_steps(const double* d, const double* e2, int64_t r, int64_t b0, int nv, double s_hi,
                                 int steps, double* sigma) {
  typedef typename VecOf<I::W>::type V;
  constexpr int W = I::W, kInFlight = 8;
  // vector operands and one comparison per select: a scalar operand, or `&` of two comparisons, makes GCC 12 fall
  // back to one lane at a time (measured 4x slower)
  const V zero = {}, one = zero + 1.0, part = zero + 1.0 / (Points + 1);
  V vlo[kInFlight], vhi[kInFlight], rank[kInFlight];
  for (int u = 0; u < nv; ++u)
    for (int j = 0; j < W; ++j) {
      vlo[u][j] = 0.0;
      vhi[u][j] = s_hi;
      rank[u][j] = static_cast<double>((b0 + u) * W + j);
    }
  for (int step = 0; step < steps; ++step) {
    V s[kInFlight][Points], x[kInFlight][Points], q[kInFlight][Points], count[kInFlight][Points];
    for (int u = 0; u < nv; ++u)
      for (int k = 0; k < Points; ++k) {
        s[u][k] = vlo[u] + (vhi[u] - vlo[u]) * part * (k + 1.0);
        x[u][k] = s[u][k] * s[u][k];
        q[u][k] = d[0] - x[u][k];
        count[u][k] = q[u][k] < zero ? one : zero;
      }
    for (int64_t i = 1; i < r; ++i) {
      const double di = d[i], ei2 = e2[i - 1];
      for (int u = 0; u < nv; ++u)
        for (int k = 0; k < Points; ++k) {
          q[u][k] = (di - x[u][k]) - ei2 / q[u][k];
          count[u][k] += q[u][k] < zero ? one : zero;
        }
    }
    for (int u = 0; u < nv; ++u) {
      // the eigenvalue sought lies below s^2 where count > rank; the new interval is the part that holds it
      const auto below = count[u][0] > rank[u];
      if constexpr (Points == 1) {
        vhi[u] = below ? s[u][0] : vhi[u];
        vlo[u] = below ? vlo[u] : s[u][0];
      } else {
        const auto below2 = count[u][1] > rank[u];
        const V hi2 = below2 ? s[u][1] : vhi[u], lo2 = below2 ? s[u][0] : s[u][1];
        vhi[u] = below ? s[u][0] : hi2;
        vlo[u] = below ? vlo[u] : lo2;
      }
    }
  }
  for (int u = 0; u < nv; ++u)
    for (int j = 0; j < W && (b0 + u) * W + j < r; ++j) sigma[(b0 + u) * W + j] = 0.5 * (vlo[u][j] + vhi[u][j]);
}

// Square roots of the eigenvalues (ascending) of the positive semi-definite tridiagonal matrix T with diagonal d
// and sub-diagonal e (r - 1 values) into sigma, each within tol, by bisection in sqrt(lambda): lane j of vector u
// converges to the (u W + j)-th smallest, with count(s) = #eigenvalues < s^2 = #negative pivots of T - s^2 I
// (Sturm). Halving [0, sqrt(Gershgorin bound)] down to tol needs ~20-24 steps where halving the eigenvalues' own
// interval to the same accuracy in sigma needed 48. work: r values.
template <class I>
LF_INLINE void bisect_sqrt_eigenvalues(const double* d, const double* e, int64_t r, double tol, double* work,
                                       double* sigma) {
  constexpr int W = I::W, kInFlight = 8;  // independent vectors per step: the divisions overlap
  double* e2 = work;
  double hi = 0.0;
  for (int64_t i = 0; i < r; ++i) {  // Gershgorin bound
    const double radius = (i > 0 ? std::fabs(e[i - 1]) : 0.0) + (i + 1 < r ? std::fabs(e[i]) : 0.0);
    hi = std::max(hi, d[i] + radius);
    // e^2 > 0, so that a zero pivot q gives e^2 / q = inf (the next pivot is -inf, then finite again) and never
    // 0 / 0; the eigenvalues move by at most sqrt(DBL_MIN) ~ 1e-154 (T is scaled to ~1)
    if (i + 1 < r) e2[i] = std::max(e[i] * e[i], std::numeric_limits<double>::min());
  }
  const double s_hi = std::sqrt(hi) * (1.0 + 1e-15);
  const int64_t blocks = (r + W - 1) / W;
  for (int64_t b0 = 0; b0 < blocks; b0 += kInFlight) {
    const int nv = static_cast<int>(std::min<int64_t>(kInFlight, blocks - b0));
    const int points = nv == 1 ? 2 : 1;
    int steps = 0;
    for (double width = s_hi; width > tol && steps < 64; width /= points + 1) ++steps;
    if (points == 2)
      bisect_sqrt_steps<I, 2>(d, e2, r, b0, nv, s_hi, steps, sigma);
    else
      bisect_sqrt_steps<I, 1>(d, e2, r, b0, nv, s_hi, steps, sigma);
  }
}

// Square roots of the eigenvalues of the symmetric positive semi-definite r x r matrix p (row-major, both
// triangles, stride ld >= round_up(r, W), destroyed) into sigma, ascending, each within tol + the rounding of the
// reduction (~eps ||p||, i.e. ~sqrt(eps ||p||) for the smallest): Householder tridiagonalization, then bisection
// vectorized across eigenvalues (implicit QL, a chain of a sqrt and a division per step, took 2-3x longer at
// r = 8-64). The reduction runs from the last row up, so the block still to reduce always starts at p[0][0]: its
// rows are whole aligned vectors, and p v is a sum of rows with the accumulators in registers (dot products per
// row took ~4x longer at r = 64). work: 2 r + 2 + 2 ld values.
template <class I>
LF_INLINE void symmetric_sqrt_eigenvalues(double* p, int64_t r, int64_t ld, double tol, double* work,
                                          double* sigma) {
  typedef typename VecOf<I::W>::type V;
  constexpr int W = I::W, kBlock = 8;  // vectors of p v held in registers at once
  double* d = work;        // diagonal
  double* e = d + r;       // e[k - 1] couples k - 1 and k
  double* v = e + r + 2;   // Householder vector, zero beyond the active block
  double* w = v + ld;      // p v, then the rank-2 update vector, zero beyond the active block
  for (int64_t k = r - 1; k >= 2; --k) {
    // reflect p[0..k-1][k] onto its last entry; the leading k x k block becomes H p H
    const int64_t len = k, lw = round_up(len, W);
    double* pk = p + k * ld;  // row k = column k, by symmetry
    double norm2 = 0.0;
    for (int64_t i = 0; i < len; ++i) {
      v[i] = pk[i];
      norm2 += v[i] * v[i];
    }
    for (int64_t i = len; i < lw; ++i) v[i] = w[i] = 0.0;
    d[k] = pk[k];
    if (norm2 == 0.0) {
      e[k - 1] = 0.0;
      continue;
    }
    const double x0 = v[len - 1];
    const double alpha = x0 >= 0 ? -std::sqrt(norm2) : std::sqrt(norm2);  // the sign without cancellation
    e[k - 1] = alpha;
    v[len - 1] = x0 - alpha;
    const double tau = 1.0 / (norm2 - x0 * alpha);  // 2 / |v|^2, as |v|^2 = 2 (norm2 - x0 alpha)
    // w = tau p v
    for (int64_t j0 = 0; j0 < lw; j0 += kBlock * W) {
      const int nb = static_cast<int>(std::min<int64_t>(kBlock, (lw - j0) / W));
      V acc[kBlock];
      for (int b = 0; b < kBlock; ++b) acc[b] = V{};
      for (int64_t i = 0; i < len; ++i) {
        const double* row = p + i * ld + j0;
        const double vi = tau * v[i];
        for (int b = 0; b < nb; ++b) acc[b] += vi * vload<V>(row + b * W);
      }
      for (int b = 0; b < nb; ++b) vstore<V>(w + j0 + b * W, acc[b]);
    }
    for (int64_t i = len; i < lw; ++i) w[i] = 0.0;  // the rows' padding entries are not part of the block
    double wv = 0.0;
    for (int64_t i = 0; i < len; ++i) wv += w[i] * v[i];
    const double half = 0.5 * tau * wv;
    for (int64_t i = 0; i < len; ++i) w[i] -= half * v[i];
    for (int64_t i = 0; i < len; ++i) {
      double* row = p + i * ld;
      const V vi = V{} + v[i], wi = V{} + w[i];
      for (int64_t j = 0; j < lw; j += W)
        vstore<V>(row + j, vload<V>(row + j) - (vi * vload<V>(w + j) + wi * vload<V>(v + j)));
    }
  }
  if (r >= 2) {
    d[1] = p[ld + 1];
    e[0] = p[ld];
  }
  d[0] = p[0];
  e[r - 1] = 0.0;

  bisect_sqrt_eigenvalues<I>(d, e, r, tol, w + ld, sigma);
}

// ---------------------------------------------------------------------------------------------------------------
// One adapter

// Largest magnitude of a row-major factor, or NaN when any element is NaN or infinite.
template <class T>
double max_abs_of(const T* x, int64_t rows, int64_t cols, int64_t ld) {
  double mx = 0.0;
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      const double v = std::fabs(widen(x[i * ld + j]));
      if (!(v <= std::numeric_limits<double>::max())) return std::numeric_limits<double>::quiet_NaN();
      mx = std::max(mx, v);
    }
  return mx;
}

// Power-of-two exponent e with max_abs * 2^e in [0.5, 1) (0 for a zero factor).
int scale_exponent(double maxabs) {
  if (maxabs == 0.0) return 0;
  int e;
  std::frexp(maxabs, &e);
  return -e;
}

// Copies rows x cols of a row-major factor, times 2^e, into dst; transposed (dst[j * rows + i]) if asked.
template <class T>
void scaled_copy(const T* x, int64_t rows, int64_t cols, int64_t ld, int e, bool transpose, double* dst) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      const double v = std::ldexp(widen(x[i * ld + j]), e);
      if (transpose)
        dst[j * rows + i] = v;
      else
        dst[i * cols + j] = v;
    }
}

// A (which = 0, r x n) or B (which = 1, m x r) of a job as scaled float64, for the slow paths (not inlined, so
// the kernels are not instantiated once per dtype for them).
struct Factor {
  const Job& job;
  bool is_b;
  int64_t rows() const { return is_b ? job.m : job.r; }
  int64_t cols() const { return is_b ? job.r : job.n; }
  int64_t ld() const { return is_b ? job.ldb : job.lda; }
  const void* ptr() const { return is_b ? job.b : job.a; }

  double max_abs() const {
    switch (job.dtype) {
      case LF_FLOAT32:
        return max_abs_of(static_cast<const float*>(ptr()), rows(), cols(), ld());
      case LF_FLOAT64:
        return max_abs_of(static_cast<const double*>(ptr()), rows(), cols(), ld());
      case LF_BFLOAT16:
        return max_abs_of(static_cast<const bf16*>(ptr()), rows(), cols(), ld());
      default:
        return max_abs_of(static_cast<const f16*>(ptr()), rows(), cols(), ld());
    }
  }
  void copy(int e, bool transpose, double* dst) const {
    switch (job.dtype) {
      case LF_FLOAT32:
        return scaled_copy(static_cast<const float*>(ptr()), rows(), cols(), ld(), e, transpose, dst);
      case LF_FLOAT64:
        return scaled_copy(static_cast<const double*>(ptr()), rows(), cols(), ld(), e, transpose, dst);
      case LF_BFLOAT16:
        return scaled_copy(static_cast<const bf16*>(ptr()), rows(), cols(), ld(), e, transpose, dst);
      default:
        return scaled_copy(static_cast<const f16*>(ptr()), rows(), cols(), ld(), e, transpose, dst);
    }
  }
};

// Gram matrices of unscaled inputs whose largest diagonal lies in this range are free of overflow and of any
// underflow that could matter at 1e-10 of sigma_max (float32 and half inputs always are).
constexpr double kGramMin = 0x1p-600, kGramMax = 0x1p+600;

struct Exponents {
  int a = 0, b = 0;  // A and B were used times 2^a and 2^b
  bool zero = false;
};

// A A^T into s.ga and B^T B into s.gb (upper triangles, stride rp), from the inputs as they are or, outside the
// fast path, from copies rescaled to max |x| ~ 1. The only part that depends on the input dtype.
template <class I, class T>
LF_TARGET int32_t grams(const Job& job, Scratch& s, Exponents& ex) {
  const int64_t r = job.r, m = job.m, n = job.n, rp = round_up(r, 8);
  double* ga = s.ga.data();
  double* gb = s.gb.data();
#if defined(LF_FUSED_V4)
  if (r == 8 || r == 16) {
    gram_rows_fused(static_cast<const T*>(job.a), r, n, job.lda, s.acc.data(), ga, rp);
    gram_cols_fused(static_cast<const T*>(job.b), m, r, job.ldb, s.acc.data(), gb, rp);
  } else
#endif
  {
    gram_rows<I>(static_cast<const T*>(job.a), r, n, job.lda, s.buf.data(), s.acc.data(), ga, rp);
    gram_cols<I>(static_cast<const T*>(job.b), m, r, job.ldb, s.buf.data(), s.acc.data(), gb, rp);
  }
  // NaN or Inf anywhere in a factor shows on the diagonal of its Gram matrix; so does an overflow
  double da = 0.0, db = 0.0;
  bool finite = true;
  for (int64_t i = 0; i < r; ++i) {
    finite = finite && std::isfinite(ga[i * rp + i]) && std::isfinite(gb[i * rp + i]);
    da = std::max(da, ga[i * rp + i]);
    db = std::max(db, gb[i * rp + i]);
  }
  // a zero diagonal may also be an underflow: rescale outside the range, after a look at the values
  const bool rescale_a = !finite || !(da >= kGramMin && da <= kGramMax);
  const bool rescale_b = !finite || !(db >= kGramMin && db <= kGramMax);
  if (!rescale_a && !rescale_b) return LF_OK;
  const Factor fa{job, false}, fb{job, true};
  const double ma = fa.max_abs(), mb = fb.max_abs();
  if (std::isnan(ma) || std::isnan(mb)) return LF_NON_FINITE;
  if (ma == 0.0 || mb == 0.0) {  // a zero factor (PEFT's initial B): every singular value is 0
    ex.zero = true;
    return LF_OK;
  }
  Scratch::grow(s.copy, std::max(r * n, m * r));
  if (rescale_a) {
    ex.a = scale_exponent(ma);
    fa.copy(ex.a, false, s.copy.data());
    gram_rows<I>(s.copy.data(), r, n, n, s.buf.data(), s.acc.data(), ga, rp);
  }
  if (rescale_b) {
    ex.b = scale_exponent(mb);
    fb.copy(ex.b, false, s.copy.data());
    gram_cols<I>(s.copy.data(), m, r, r, s.buf.data(), s.acc.data(), gb, rp);
  }
  return LF_OK;
}

// From the Gram matrices to sigma: R factors, the core, its singular values, scaled back.
template <class I>
LF_TARGET __attribute__((noinline)) void finish(const Job& job, Scratch& s, Exponents ex) {
  typedef typename VecOf<I::W>::type V;
  constexpr int W = I::W;
  const int64_t r = job.r, m = job.m, n = job.n, rp = round_up(r, 8);
  if (ex.zero) {
    std::fill(job.sigma, job.sigma + r, 0.0);
    return;
  }
  // R factors, as L = R^T (row-major, stride rp); Householder where Cholesky-QR would lose accuracy
  double* la = s.la.data();
  double* lb = s.lb.data();
  if (!cholesky<I>(s.ga.data(), r, rp, job.max_ratio, la, rp)) {  // destroys ga and gb: both are spent
    const Factor fa{job, false};
    ex.a = scale_exponent(fa.max_abs());
    Scratch::grow(s.copy, r * n);
    fa.copy(ex.a, false, s.copy.data());  // A's rows are the columns of A^T
    householder<I>(s.copy.data(), r, n, la, rp);
  }
  if (!cholesky<I>(s.gb.data(), r, rp, job.max_ratio, lb, rp)) {
    const Factor fb{job, true};
    ex.b = scale_exponent(fb.max_abs());
    Scratch::grow(s.copy, r * m);
    fb.copy(ex.b, true, s.copy.data());  // B's columns, contiguous
    householder<I>(s.copy.data(), r, m, lb, rp);
  }

  // core M = R_A R_B^T = L_A^T L_B, stored by columns: column j = sum_{k >= j} L_B[k][j] * L_A[k][0..k]. One row
  // k of both factors at a time, so consecutive updates touch different columns (no store-to-load chains).
  double* core = s.core.data();
  std::memset(core, 0, sizeof(double) * r * rp);
  for (int64_t k = 0; k < r; ++k) {
    const double* row = la + k * rp;
    const int64_t len = round_up(k + 1, W);  // L rows are zero beyond the diagonal and padded to rp
    for (int64_t j = 0; j <= k; ++j) {
      const double f = lb[k * rp + j];
      double* col = core + j * rp;
      for (int64_t t = 0; t < len; t += W) vstore<V>(col + t, vload<V>(col + t) + f * vload<V>(row + t));
    }
  }
  double maxabs = 0.0;
  for (int64_t i = 0; i < r * rp; ++i) maxabs = std::max(maxabs, std::fabs(core[i]));
  if (maxabs == 0.0) {  // B A = 0 although neither factor is zero
    std::fill(job.sigma, job.sigma + r, 0.0);
    return;
  }
  // bring the core to max |entry| ~ 1 so squared norms neither overflow nor underflow; the entries come from
  // factors within 2^+-600, so 2^ec is a normal number and the product exact
  const int ec = scale_exponent(maxabs);
  const double unit = std::ldexp(1.0, ec);
  for (int64_t i = 0; i < r * rp; ++i) core[i] *= unit;
  // The core's singular values. Where the caller's accuracy allows (float32 and half inputs: 1e-5 of sigma_max),
  // as square roots of the eigenvalues of M^T M: their error is at most ~r sqrt(eps) sigma_max (1e-6 at r = 64),
  // and they cost less than Jacobi (measured on Zen 4: ~110 us instead of ~300 us at r = 64, 7 instead of 8-12 us
  // at r = 16). Otherwise Jacobi, whose error is ~r eps sigma_max.
  constexpr double kSqrtEps = 1.4901161193847656e-08;
  if (4.0 * r * kSqrtEps <= job.sigma_tol) {
    // M M^T (same eigenvalues as M^T M), the Gram matrix of the columns of `core` by the rank-1 kernel: over a
    // core's few rows it runs ~2x faster than dot products of its rows (measured at r = 64)
    double* gram = s.ga.data();  // free now
    gram_cols<I>(core, r, r, rp, s.buf.data(), s.acc.data(), gram, rp);
    for (int64_t i = 0; i < r; ++i)
      for (int64_t j = 0; j < i; ++j) gram[i * rp + j] = gram[j * rp + i];
    double diag_max = 0.0;  // sigma_max >= the largest row norm of M
    for (int64_t i = 0; i < r; ++i) diag_max = std::max(diag_max, gram[i * rp + i]);
    // bisection to 1/20 of the accuracy asked for: its error stays far below the reduction's
    symmetric_sqrt_eigenvalues<I>(gram, r, rp, 0.05 * job.sigma_tol * std::sqrt(diag_max), s.work.data(), job.sigma);
    std::reverse(job.sigma, job.sigma + r);  // descending
  } else {
    jacobi_svdvals<I>(core, r, rp, s.work.data(), s.iwork.data(), job.sigma);
  }

  // sigma * |s| * 2^-(a + b + ec), with one rounding: |s| = f * 2^es, f in [0.5, 1)
  int es = 0;
  const double f = std::frexp(std::fabs(job.scaling), &es);
  for (int64_t i = 0; i < r; ++i) job.sigma[i] = std::ldexp(job.sigma[i] * f, es - ex.a - ex.b - ec);
}

template <class I>
LF_TARGET int32_t run_job(const Job& job, Scratch& s) {
  Exponents ex;
  int32_t status;
  switch (job.dtype) {
    case LF_FLOAT32:
      status = grams<I, float>(job, s, ex);
      break;
    case LF_FLOAT64:
      status = grams<I, double>(job, s, ex);
      break;
    case LF_BFLOAT16:
      status = grams<I, bf16>(job, s, ex);
      break;
    default:
      status = grams<I, f16>(job, s, ex);
  }
  if (status == LF_OK) finish<I>(job, s, ex);
  return status;
}

}  // namespace
}  // namespace lora_fast
