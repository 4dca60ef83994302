// Singular values of many LoRA updates s * B @ A (B: m x r, A: r x n) in one call, without forming m x n.
//
// Per adapter: R factors of B and of A^T from Cholesky-QR on Gram matrices accumulated in float64 (one pass over
// each factor), then the singular values of the r x r core R_B R_A^T by one-sided Jacobi. An ill-conditioned or
// rank-deficient factor (Gram matrix not safely positive definite) is re-factored with Householder QR, which is
// backward stable. Adapters are processed in parallel. Shapes with r >= min(m, n) are refused: the Python caller
// sends them to the dense route (lora_fast/ops/lowrank_svd.py holds the one cost model).
#include "lowrank_svd.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(LF_NO_MULTIVERSION)
// One binary for any x86-64 machine, with an AVX2+FMA clone picked at load time (about 2x on the Gram loops).
#define LF_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define LF_MULTIVERSION
#endif

// torch's CPU library exports LAPACK's dgesdd (MKL or OpenBLAS). Declared weak so that a torch build without it
// still loads, and the Jacobi SVD below is used instead.
extern "C" void dgesdd_(const char* jobz, const int* m, const int* n, double* a, const int* lda, double* s, double* u,
                        const int* ldu, double* vt, const int* ldvt, double* work, const int* lwork, int* iwork,
                        int* info) __attribute__((weak));

namespace lora_fast {
namespace {

// Copies `rows` rows of length `len` (source row stride `src_stride`) into a float64 buffer with row stride
// `dst_stride` >= len (the padding is left as it is). Returns the largest magnitude, or NaN when any element is
// NaN or infinite.
template <typename T>
LF_MULTIVERSION double gather_rows(const T* src, int64_t rows, int64_t len, int64_t src_stride, int64_t dst_stride,
                                   double* dst) {
  double maxabs = 0.0;
  double poison = 0.0;  // x * 0 is NaN exactly when x is NaN or +-inf
  for (int64_t v = 0; v < rows; ++v) {
    const T* in = src + v * src_stride;
    double* out = dst + v * dst_stride;
#pragma omp simd reduction(max : maxabs) reduction(+ : poison)
    for (int64_t i = 0; i < len; ++i) {
      const double x = static_cast<double>(in[i]);
      out[i] = x;
      maxabs = std::max(maxabs, std::abs(x));
      poison += x * 0.0;
    }
  }
  return std::isnan(poison) ? std::numeric_limits<double>::quiet_NaN() : maxabs;
}

// G = X X^T for X (rows x len) row-major, lower and upper triangle filled. 2x2 register tiles halve the loads.
LF_MULTIVERSION void gram(const double* x, int64_t rows, int64_t len, double* g) {
  int64_t i = 0;
  for (; i + 1 < rows; i += 2) {
    const double* x0 = x + i * len;
    const double* x1 = x0 + len;
    int64_t j = i;
    for (; j + 1 < rows; j += 2) {
      const double* y0 = x + j * len;
      const double* y1 = y0 + len;
      double s00 = 0, s01 = 0, s10 = 0, s11 = 0;
#pragma omp simd reduction(+ : s00, s01, s10, s11)
      for (int64_t t = 0; t < len; ++t) {
        s00 += x0[t] * y0[t];
        s01 += x0[t] * y1[t];
        s10 += x1[t] * y0[t];
        s11 += x1[t] * y1[t];
      }
      g[i * rows + j] = g[j * rows + i] = s00;
      g[i * rows + j + 1] = g[(j + 1) * rows + i] = s01;
      g[(i + 1) * rows + j] = g[j * rows + i + 1] = s10;
      g[(i + 1) * rows + j + 1] = g[(j + 1) * rows + i + 1] = s11;
    }
    if (j < rows) {
      const double* y0 = x + j * len;
      double s00 = 0, s10 = 0;
#pragma omp simd reduction(+ : s00, s10)
      for (int64_t t = 0; t < len; ++t) {
        s00 += x0[t] * y0[t];
        s10 += x1[t] * y0[t];
      }
      g[i * rows + j] = g[j * rows + i] = s00;
      g[(i + 1) * rows + j] = g[j * rows + i + 1] = s10;
    }
  }
  if (i < rows) {
    const double* x0 = x + i * len;
    double s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t t = 0; t < len; ++t) s += x0[t] * x0[t];
    g[i * rows + i] = s;
  }
}

// G = X^T X for X (len x cols) row-major with cols a multiple of 8 (zero padded): the Gram matrix of the columns,
// read row by row, so a row-major B needs no transpose. 4x8 register tiles: 8 FMAs per loaded row segment.
LF_MULTIVERSION void gram_of_columns(const double* x, int64_t len, int64_t cols, double* g) {
  for (int64_t j0 = 0; j0 < cols; j0 += 4) {
    for (int64_t k0 = j0 / 8 * 8; k0 < cols; k0 += 8) {
      double acc[4][8] = {};
      for (int64_t t = 0; t < len; ++t) {
        const double* row = x + t * cols;
        for (int jj = 0; jj < 4; ++jj) {
          const double xj = row[j0 + jj];
#pragma omp simd
          for (int kk = 0; kk < 8; ++kk) acc[jj][kk] += xj * row[k0 + kk];
        }
      }
      for (int jj = 0; jj < 4; ++jj)
        for (int kk = 0; kk < 8; ++kk) g[(j0 + jj) * cols + k0 + kk] = g[(k0 + kk) * cols + j0 + jj] = acc[jj][kk];
    }
  }
}

// In-place Cholesky G = L L^T; writes R = L^T (upper) into r_out. Returns false when a pivot is not safely
// positive or diag(R) spans more than `max_ratio` (Cholesky-QR then loses accuracy quadratically).
bool cholesky_r(double* g, int64_t n, double max_ratio, double* r_out) {
  double dmax = 0.0, dmin = std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    double d = g[j * n + j];
    for (int64_t k = 0; k < j; ++k) d -= g[j * n + k] * g[j * n + k];
    if (!(d > 0.0)) return false;
    const double ljj = std::sqrt(d);
    g[j * n + j] = ljj;
    dmax = std::max(dmax, ljj);
    dmin = std::min(dmin, ljj);
    for (int64_t i = j + 1; i < n; ++i) {
      double s = g[i * n + j];
      for (int64_t k = 0; k < j; ++k) s -= g[i * n + k] * g[j * n + k];
      g[i * n + j] = s / ljj;
    }
  }
  if (dmax > max_ratio * dmin) return false;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) r_out[i * n + j] = j >= i ? g[j * n + i] : 0.0;
  return true;
}

// Householder QR of the len x rows matrix whose columns are the rows of x (destroyed); writes the rows x rows R.
LF_MULTIVERSION void householder_r(double* x, int64_t rows, int64_t len, double* r_out) {
  std::fill(r_out, r_out + rows * rows, 0.0);
  for (int64_t j = 0; j < rows; ++j) {
    double* v = x + j * len;  // column j; entries j..len-1 are active
    double norm2 = 0;
#pragma omp simd reduction(+ : norm2)
    for (int64_t t = j; t < len; ++t) norm2 += v[t] * v[t];
    const double norm = std::sqrt(norm2);
    if (norm == 0.0) continue;  // zero column: R(j, j) = 0, nothing to reflect
    const double alpha = v[j] >= 0 ? -norm : norm;  // the sign that avoids cancellation in v_j - alpha
    const double vj_old = v[j];
    v[j] -= alpha;  // v is now the Householder vector
    const double vnorm2 = norm2 - vj_old * vj_old + v[j] * v[j];
    r_out[j * rows + j] = alpha;
    for (int64_t k = j + 1; k < rows; ++k) {
      double* c = x + k * len;
      double dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t t = j; t < len; ++t) dot += v[t] * c[t];
      const double f = 2.0 * dot / vnorm2;
#pragma omp simd
      for (int64_t t = j; t < len; ++t) c[t] -= f * v[t];
      r_out[j * rows + k] = c[j];
    }
  }
}

// Singular values of the n x n matrix whose columns are the rows of c (destroyed), by one-sided Jacobi
// (Hestenes). High relative accuracy; converges in ~6-10 sweeps at n <= 64. Writes n values, descending.
LF_MULTIVERSION void jacobi_svdvals(double* c, int64_t n, double* sigma) {
  auto column_norm2 = [c, n](int64_t p) {
    double s = 0;
    for (int64_t t = 0; t < n; ++t) s += c[p * n + t] * c[p * n + t];
    return s;
  };
  std::vector<double> norm2(n);
  for (int64_t p = 0; p < n; ++p) norm2[p] = column_norm2(p);
  constexpr double tol = 4 * std::numeric_limits<double>::epsilon();
  for (int sweep = 0; sweep < 60; ++sweep) {
    bool rotated = false;
    for (int64_t p = 0; p + 1 < n; ++p) {
      for (int64_t q = p + 1; q < n; ++q) {
        double* cp = c + p * n;
        double* cq = c + q * n;
        double gamma = 0;
#pragma omp simd reduction(+ : gamma)
        for (int64_t t = 0; t < n; ++t) gamma += cp[t] * cq[t];
        const double alpha = norm2[p], beta = norm2[q];
        if (std::abs(gamma) <= tol * std::sqrt(alpha * beta) || gamma == 0.0) continue;
        rotated = true;
        const double zeta = (beta - alpha) / (2.0 * gamma);
        const double t = std::copysign(1.0, zeta) / (std::abs(zeta) + std::sqrt(1.0 + zeta * zeta));
        const double cs = 1.0 / std::sqrt(1.0 + t * t), sn = cs * t;
#pragma omp simd
        for (int64_t k = 0; k < n; ++k) {
          const double a = cp[k], b = cq[k];
          cp[k] = cs * a - sn * b;
          cq[k] = sn * a + cs * b;
        }
        norm2[p] = alpha - t * gamma;
        norm2[q] = beta + t * gamma;
      }
    }
    if (!rotated) break;
    // Refresh the running norms once per sweep so rounding in the updates cannot accumulate.
    for (int64_t p = 0; p < n; ++p) norm2[p] = column_norm2(p);
  }
  for (int64_t p = 0; p < n; ++p) sigma[p] = std::sqrt(column_norm2(p));
  std::sort(sigma, sigma + n, std::greater<double>());
}

// Singular values (descending) of the n x n row-major matrix c, destroyed. LAPACK's divide and conquer without
// vectors when available: 4.5 us for n=16 where our Jacobi takes ~25 us.
void core_svdvals(double* c, int64_t n, double* sigma) {
  if (dgesdd_ != nullptr) {
    const int nn = static_cast<int>(n);
    int info = 0, lwork = -1, one = 1;
    double query = 0, dummy = 0;
    std::vector<int> iwork(8 * n);
    dgesdd_("N", &nn, &nn, c, &nn, sigma, &dummy, &one, &dummy, &one, &query, &lwork, iwork.data(), &info);
    lwork = static_cast<int>(query);
    std::vector<double> work(std::max(lwork, 1)), a(c, c + n * n);  // LAPACK destroys its input: keep c
    dgesdd_("N", &nn, &nn, a.data(), &nn, sigma, &dummy, &one, &dummy, &one, work.data(), &lwork, iwork.data(),
            &info);
    if (info == 0) return;  // info > 0: no convergence (never seen); Jacobi below is slower but always converges
  }
  jacobi_svdvals(c, n, sigma);
}

// Power of two that brings `maxabs` near 1, so Gram entries neither overflow nor underflow.
double rescale_factor(double maxabs) {
  if (maxabs == 0.0 || (maxabs > 0x1p-200 && maxabs < 0x1p200)) return 1.0;
  int e;
  std::frexp(maxabs, &e);
  return std::ldexp(1.0, -e);
}

// Largest diag(R) ratio for which Cholesky-QR is kept: its sigma error grows like eps * ratio^2, so 1e3 keeps
// float64 within ~1e-10 of sigma_max; float32 inputs only need 1e-5 and are exact in float64, so 1e5 is safe.
double max_cholesky_ratio(at::ScalarType dtype) { return dtype == at::kDouble ? 1e3 : 1e5; }

struct Item {
  int64_t entry;
  int64_t index;  // position in the entry's batch
};

template <typename T>
void lowrank_core_svdvals(const T* a, const T* b, int64_t r, int64_t m, int64_t n, double scaling,
                          double max_ratio, double* sigma, bool* bad_input) {
  // A is read as r rows of length n (A A^T by row dot products); B as m rows padded to a multiple of 8 columns
  // (B^T B by 4x8 tiles of column products): both contiguous, so neither needs a transpose.
  const int64_t rp = (r + 7) / 8 * 8;
  std::vector<double> xa(r * n), xb(m * rp, 0.0), ga(r * r), gb(rp * rp), ra(r * r), rb(r * r), core(r * r);
  const double max_a = gather_rows(a, r, n, n, n, xa.data());
  const double max_b = gather_rows(b, m, r, r, rp, xb.data());
  if (std::isnan(max_a) || std::isnan(max_b)) {
    *bad_input = true;
    return;
  }
  if (max_a == 0.0 || max_b == 0.0) {
    std::fill(sigma, sigma + r, 0.0);
    return;
  }
  const double fa = rescale_factor(max_a), fb = rescale_factor(max_b);
  if (fa != 1.0) std::for_each(xa.begin(), xa.end(), [fa](double& v) { v *= fa; });
  if (fb != 1.0) std::for_each(xb.begin(), xb.end(), [fb](double& v) { v *= fb; });

  gram(xa.data(), r, n, ga.data());
  if (!cholesky_r(ga.data(), r, max_ratio, ra.data())) householder_r(xa.data(), r, n, ra.data());
  gram_of_columns(xb.data(), m, rp, gb.data());
  for (int64_t i = 0; i < r; ++i) std::copy(gb.data() + i * rp, gb.data() + i * rp + r, gb.data() + i * r);
  if (!cholesky_r(gb.data(), r, max_ratio, rb.data())) {
    std::vector<double> columns(r * m);  // Householder wants B's columns contiguous
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < r; ++j) columns[j * m + i] = xb[i * rp + j];
    householder_r(columns.data(), r, m, rb.data());
  }
  // core^T = R_A R_B^T (same singular values as the core R_B R_A^T); both factors are upper triangular.
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = 0; j < r; ++j) {
      double s = 0;
      for (int64_t k = std::max(i, j); k < r; ++k) s += ra[i * r + k] * rb[j * r + k];
      core[i * r + j] = s;
    }
  core_svdvals(core.data(), r, sigma);
  const double unscale = std::abs(scaling) / (fa * fb);
  for (int64_t i = 0; i < r; ++i) sigma[i] *= unscale;
}

}  // namespace

std::vector<at::Tensor> lowrank_svdvals_cpu(at::TensorList a_list, at::TensorList b_list,
                                            at::ArrayRef<double> scaling) {
  const int64_t entries = static_cast<int64_t>(a_list.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(b_list.size()) == entries && static_cast<int64_t>(scaling.size()) == entries,
                    "lowrank_svdvals: A, B and scaling must have the same length");
  std::vector<at::Tensor> a_c(entries), b_c(entries), out(entries);
  std::vector<Item> items;
  for (int64_t e = 0; e < entries; ++e) {
    // a 2-D entry is a batch of one (saves the caller two reshapes per adapter: ~4 us each)
    const bool single = a_list[e].dim() == 2;
    const at::Tensor a = single ? a_list[e].unsqueeze(0) : a_list[e];
    const at::Tensor b = single ? b_list[e].unsqueeze(0) : b_list[e];
    TORCH_CHECK_VALUE(a.dim() == 3 && b.dim() == 3, "lowrank_svdvals: entry ", e,
                      " must be A (batch, r, n) and B (batch, m, r), or both 2-D");
    TORCH_CHECK_VALUE(a.device().is_cpu() && b.device().is_cpu(), "lowrank_svdvals_cpu: entry ", e, " is not on CPU");
    TORCH_CHECK_VALUE(a.scalar_type() == b.scalar_type() &&
                          (a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble),
                      "lowrank_svdvals: entry ", e, " must be float32 or float64 with A and B of one dtype");
    const int64_t batch = a.size(0), r = a.size(1), n = a.size(2), m = b.size(1);
    TORCH_CHECK_VALUE(b.size(0) == batch && b.size(2) == r, "lowrank_svdvals: entry ", e, " has A ", a.sizes(),
                      " and B ", b.sizes(), ": inner ranks or batch sizes differ");
    TORCH_CHECK_VALUE(r > 0 && m > 0 && n > 0, "lowrank_svdvals: entry ", e, " is empty");
    TORCH_CHECK_VALUE(r < std::min(m, n), "lowrank_svdvals: entry ", e, " has r=", r, " >= min(m, n)=",
                      std::min(m, n), "; such shapes take the dense route");
    a_c[e] = a.contiguous();
    b_c[e] = b.contiguous();
    out[e] = single ? at::empty({r}, a.options()) : at::empty({batch, r}, a.options());
    for (int64_t i = 0; i < batch; ++i) items.push_back({e, i});
  }

  std::vector<char> bad(items.size(), 0);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const Item& it = items[w];
      const at::Tensor& a = a_c[it.entry];
      const at::Tensor& b = b_c[it.entry];
      const int64_t r = a.size(1), n = a.size(2), m = b.size(1);
      std::vector<double> sigma(r);
      bool is_bad = false;
      AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "lowrank_svdvals_cpu", [&] {
        lowrank_core_svdvals<scalar_t>(a.const_data_ptr<scalar_t>() + it.index * r * n,
                                       b.const_data_ptr<scalar_t>() + it.index * m * r, r, m, n, scaling[it.entry],
                                       max_cholesky_ratio(a.scalar_type()), sigma.data(), &is_bad);
        // written in the output dtype here: a per-entry .to() afterwards costs ~4 us each
        std::copy(sigma.begin(), sigma.end(), out[it.entry].data_ptr<scalar_t>() + it.index * r);
      });
      bad[w] = is_bad;
    }
  });
  for (size_t w = 0; w < items.size(); ++w)
    TORCH_CHECK_VALUE(!bad[w], "lowrank_svdvals: adapter ", items[w].entry, " (batch index ", items[w].index,
                      ") contains NaN or Inf");
  return out;
}

}  // namespace lora_fast

TORCH_LIBRARY(lora_fast_C, m) {
  m.def("lowrank_svdvals(Tensor[] A, Tensor[] B, float[] scaling) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(lora_fast_C, CPU, m) { m.impl("lowrank_svdvals", &lora_fast::lowrank_svdvals_cpu); }
