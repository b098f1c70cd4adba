// gemm.h: row-major tile GEMMs for the CPU kernels.
//
//   C[m x n] = alpha * op(A) * op(B) + beta * C,   op(X) = X or X^T,   all matrices row-major.
//
// The heavy lifting goes to the BLAS that libtorch_cpu already carries (MKL's sgemm_/dgemm_ in
// the x86-64 wheels), reached through weak symbols: a wheel without them falls back to the
// vectorized loops below instead of failing to load. Called from inside at::parallel_for, where
// MKL runs single-threaded, so each thread multiplies its own tiles.
#pragma once

#include <cstdint>
#include <limits>

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "isa.h"

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace tx_kernels::cpu::TXK_CPU_ISA {

// Whether a leading dimension can be handed to a 32-bit BLAS interface.
inline bool fits_blas_int(int64_t v) { return v <= std::numeric_limits<int>::max(); }

namespace detail {

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  Vec acc0(T(0)), acc1(T(0));
  int64_t i = 0;
  for (; i + 2 * Vec::size() <= n; i += 2 * Vec::size()) {
    acc0 = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc0);
    acc1 = at::vec::fmadd(Vec::loadu(a + i + Vec::size()), Vec::loadu(b + i + Vec::size()), acc1);
  }
  T out = at::vec::vec_reduce_all<T>([](Vec x, Vec y) { return x + y; }, acc0 + acc1);
  for (; i < n; ++i) out += a[i] * b[i];
  return out;
}

// y[0:n] += alpha * x[0:n]
template <typename T>
inline void axpy(T alpha, const T* x, T* y, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  const Vec va(alpha);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    at::vec::fmadd(va, Vec::loadu(x + i), Vec::loadu(y + i)).store(y + i);
  }
  for (; i < n; ++i) y[i] += alpha * x[i];
}

// Portable fallback: correct for every transpose combination, vectorized along rows of B/C.
template <typename T>
void gemm_fallback(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha,
                   const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  auto a_at = [&](int64_t i, int64_t p) { return trans_a ? a[p * lda + i] : a[i * lda + p]; };
  for (int64_t i = 0; i < m; ++i) {
    T* ci = c + i * ldc;
    if (beta == T(0)) {
      for (int64_t j = 0; j < n; ++j) ci[j] = T(0);
    } else if (beta != T(1)) {
      for (int64_t j = 0; j < n; ++j) ci[j] *= beta;
    }
    if (trans_b) {  // C[i][j] += alpha * <A row i, B row j>
      if (!trans_a) {
        for (int64_t j = 0; j < n; ++j) ci[j] += alpha * dot(a + i * lda, b + j * ldb, k);
      } else {
        for (int64_t j = 0; j < n; ++j) {
          T s = 0;
          for (int64_t p = 0; p < k; ++p) s += a_at(i, p) * b[j * ldb + p];
          ci[j] += alpha * s;
        }
      }
    } else {  // C[i][:] += alpha * A[i][p] * B[p][:]
      for (int64_t p = 0; p < k; ++p) {
        const T aip = a_at(i, p);
        if (aip != T(0)) axpy(alpha * aip, b + p * ldb, ci, n);
      }
    }
  }
}

}  // namespace detail

// Row-major GEMM. A is (m x k), or (k x m) when trans_a; B is (k x n), or (n x k) when trans_b.
// Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: the BLAS call swaps operands.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
          int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  const bool ld_ok = fits_blas_int(lda) && fits_blas_int(ldb) && fits_blas_int(ldc) &&
                     fits_blas_int(m) && fits_blas_int(n) && fits_blas_int(k) && k > 0;
  const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
  const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
  const int LDA = static_cast<int>(ldb), LDB = static_cast<int>(lda), LDC = static_cast<int>(ldc);
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_ != nullptr && ld_ok) {
      sgemm_(&ta, &tb, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
      return;
    }
  } else if constexpr (std::is_same_v<T, double>) {
    if (dgemm_ != nullptr && ld_ok) {
      dgemm_(&ta, &tb, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
      return;
    }
  }
  detail::gemm_fallback(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

}  // namespace tx_kernels::cpu::TXK_CPU_ISA
