/* Singular values of many LoRA updates s * B @ A (B: m x r, A: r x n) without forming the m x n product.
 *
 * A plain C ABI on raw pointers: no torch header, no torch library, no Python. lora_fast/ops/_native.py loads the
 * library with ctypes and passes tensors' data pointers, so one build serves every torch and every Python.
 */
#ifndef LORA_FAST_LOWRANK_SVD_H
#define LORA_FAST_LOWRANK_SVD_H

#include <stdint.h>

#if defined(_WIN32)
#define LF_API __declspec(dllexport)
#else
#define LF_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Bumped whenever a signature or the entry layout changes; Python refuses a library with another version. */
#define LF_ABI_VERSION 3

/* Element types of A and B. Half precision is widened exactly; every product is formed and summed in float64. */
enum lf_dtype { LF_FLOAT32 = 0, LF_FLOAT64 = 1, LF_BFLOAT16 = 2, LF_FLOAT16 = 3 };

/* One entry is LF_FIELDS int64 values: `batch` adapters of one shape and dtype. Strides are in elements; the last
 * dimension of A and of B must be contiguous. sigma of adapter i is written at sigma[out_offset + i * r], r values,
 * descending.
 * Adapter i's factors: with LF_INDIRECT = 0, A_PTR + i * A_BATCH_STRIDE and B_PTR + i * B_BATCH_STRIDE (one
 * batched tensor); with LF_INDIRECT = 1, A_PTR and B_PTR are the addresses of two arrays of `batch` int64
 * addresses, one per adapter (separate tensors of one shape: a pointer each instead of an entry each), and the
 * batch strides are unused. LF_SCALE_PTR: 0, or the address of `batch` doubles, adapter i's scaling (then
 * LF_SCALING is unused). */
enum lf_field {
  LF_A_PTR = 0,
  LF_B_PTR,
  LF_DTYPE,
  LF_BATCH,
  LF_R,
  LF_M,
  LF_N,
  LF_A_BATCH_STRIDE,
  LF_A_ROW_STRIDE,
  LF_B_BATCH_STRIDE,
  LF_B_ROW_STRIDE,
  LF_OUT_OFFSET,
  LF_INDIRECT,
  LF_SCALE_PTR,
  LF_FIELDS
};

/* Per entry, LF_PARAMS doubles. */
enum lf_param {
  LF_SCALING = 0,    /* s; sigma is scaled by |s| */
  LF_MAX_RATIO,      /* largest max/min of diag(R) for which Cholesky-QR is kept (Householder QR beyond) */
  LF_SIGMA_TOL,      /* accuracy the caller needs, relative to sigma_max; picks the core's solver */
  LF_PARAMS
};

/* Return codes of lf_lowrank_svdvals. */
enum lf_status { LF_OK = 0, LF_NON_FINITE = 1, LF_BAD_ARGUMENT = 2, LF_OUT_OF_MEMORY = 3 };

LF_API int32_t lf_abi_version(void);

/* The instruction set the kernels run with on this machine: "x86-64-v4", "x86-64-v3" or "baseline". */
LF_API const char* lf_isa(void);

/* Runs the kernels with the best instruction set up to `cap` ("x86-64-v4", "x86-64-v3", "baseline"; NULL: the
 * best this CPU has) from now on, so that tests can check every variant on one machine. Returns the one chosen. */
LF_API const char* lf_select_isa(const char* cap);

/* sigma of |s| * B @ A for every adapter of every entry, computed in float64 with 1 <= r <= min(m, n).
 * num_threads: threads to use at most, the caller's included (the caller passes torch.get_num_threads()); fewer
 * when the work is small. No OpenMP: plain threads, started at the first call that wants them and parked between
 * calls. Calls from several threads at once are allowed.
 * bad: two int64 written on LF_NON_FINITE (entry, batch index of the first adapter holding NaN or Inf) and on
 * LF_BAD_ARGUMENT (entry, field). */
LF_API int32_t lf_lowrank_svdvals(int64_t count, const int64_t* entries, const double* params, double* sigma,
                                  int32_t num_threads, int64_t* bad);

#ifdef __cplusplus
}
#endif

#endif /* LORA_FAST_LOWRANK_SVD_H */
