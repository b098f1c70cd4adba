// attention_bwd_utils.cuh: small torch-free helpers of the attention backward (attention_bwd.cu)
// that attention_kernel_utils.cuh (shared with the forward, owned there) does not provide:
// a cp.async tile loader, exponentials per accumulator type, and dropout keep decisions.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "attention_kernel_utils.cuh"
#include "philox.h"

namespace tx_kernels {
namespace attn_bwd {

// Issues cp.async copies of rows [row0, row0 + kRows) x columns [0, D) of a row-major global
// matrix (row stride `row_stride` elements; `nrows` rows and `ncols` columns exist, ncols % 8 == 0)
// into a shared tile whose rows are kStride elements apart. Chunks outside the matrix are
// zero-filled (src-size 0), so tail rows and padded head-dim columns read as exact zeros: they
// add nothing to any dot product and, multiplied by zero probabilities, never create NaN.
template <int kRows, int D, int kStride, int kNThreads, typename T>
__device__ __forceinline__ void load_rows_async(T* s, const T* g, int64_t row_stride, int64_t row0,
                                                int64_t nrows, int64_t ncols, int tid) {
  constexpr int kChunksPerRow = D / 8;  // 16-byte chunks of 8 two-byte elements
  constexpr int kChunks = kRows * kChunksPerRow;
  constexpr int kIters = (kChunks + kNThreads - 1) / kNThreads;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int c = tid + it * kNThreads;
    if (kChunks % kNThreads == 0 || c < kChunks) {
      const int r = c / kChunksPerRow;
      const int col = (c % kChunksPerRow) * 8;
      const int64_t gr = row0 + r;
      const bool valid = gr < nrows && col < ncols;
      // An invalid chunk still needs a valid source address: the tensor's base.
      const T* src = valid ? g + gr * row_stride + col : g;
      attn::cp_async_16(s + r * kStride + col, src, valid);
    }
  }
}

// Natural exponential in the accumulation type (the general kernels: fp32 for fp32/fp16/bf16
// inputs, fp64 for fp64 inputs so fp64 gradients keep full precision).
__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }

// dS = P (dP - D). An exactly zero probability (a masked key, every key of a fully masked row)
// contributes no gradient, also where dP - D is NaN or Inf (0 * NaN would leak it into dq and
// dk of rows that params.h promises zero gradients).
template <typename Acc>
__device__ __forceinline__ Acc softmax_grad(Acc p, Acc dp_minus_d) {
  return p == Acc(0) ? Acc(0) : p * dp_minus_d;
}

__device__ __forceinline__ uint32_t philox_word(const Philox4& r, uint32_t which) {
  return which == 0 ? r.x : which == 1 ? r.y : which == 2 ? r.z : r.w;
}

// Keep decisions of the two consecutive dropout elements idx and idx + 1 (same query row,
// adjacent keys): one Philox evaluation unless the pair straddles a group of four words.
__device__ __forceinline__ void keep_pair(const DropoutRng& rng, uint32_t threshold, uint64_t idx,
                                          bool& keep0, bool& keep1) {
  const Philox4 r = rng.words(idx >> 2);
  const uint32_t w0 = philox_word(r, static_cast<uint32_t>(idx & 3));
  const uint32_t w1 = (idx & 3) == 3 ? rng.words((idx >> 2) + 1).x
                                     : philox_word(r, static_cast<uint32_t>((idx + 1) & 3));
  keep0 = w0 >= threshold;
  keep1 = w1 >= threshold;
}

}  // namespace attn_bwd
}  // namespace tx_kernels
