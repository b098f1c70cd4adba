// layernorm.cu: (residual-add +) LayerNorm forward and backward on CUDA (torch-free).
//
// Semantics: csrc/kernels/params.h (LayerNormParams, LayerNormBwdParams); entry points:
// csrc/kernels/launchers.h. Types: fp32, fp16, bf16 data; fp32 weight, bias, statistics and
// arithmetic. fp64 data returns cudaErrorNotSupported (the CUDA binding rejects it first).
//
// Forward, one row of `cols` values per "row group" of threads (one warp, or up to 1024 threads):
//   1. every thread loads its chunks of input (+ residual) into registers: s = x + r in fp32,
//      rounded to T (the residual_out it returns, and what x + r in T would give).
//      Chunks are VEC elements, 16 bytes when pointers/strides allow, else single elements;
//      chunk c of the row goes to thread c % tpr (coalesced), so a thread holds ITEMS chunks.
//   2. the moments of s - s0 (s0 the row's first value, read by every thread): m = sum(s - s0) /
//      cols, then var = sum((s - s0 - m)^2) / cols from the registers (two-pass, no E[x^2] - E[x]^2
//      cancellation), both as fixed-order group reductions. The shift keeps a mean far from 0
//      (|mean| >> std) from costing precision: an fp32 mean of ~1000 alone is off by half an ulp,
//      1e-4 of a std of 0.5. The saved mean is s0 + m.
//   3. residual_out = s (when wanted; written before centring), out = (s - s0 - m) * rstd * w + b,
//      mean/rstd.
//   Normalizing the rounded sum, not the fp32 one, keeps the forward consistent with the backward,
//   which reads that sum back (residual_out): with few columns rstd is large enough to turn the
//   difference between the two into wrong gradients (the CPU kernel does the same).
//   Memory traffic is the minimum: input and residual read once, out and residual_out written
//   once. A row that does not fit in registers (more than 32 values per thread at 512 threads:
//   > 16384 columns on the 16-byte path, > 8192 on the scalar one) takes a block-per-row
//   fallback that re-reads the row from global memory (L2) three times.
//
// Backward (g = dy * w, xhat = (x - mean) * rstd, with mean/rstd saved by the forward):
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) (+ grad_residual_out)
//   dw = sum over rows of dy * xhat,   db = sum over rows of dy
//   x is the sum the forward wrote, or input + residual summed again while reading when the
//   forward did not write it. Same row groups and register caching as the forward; the grid is
//   persistent (a few CTAs per SM, DeviceInfo::num_sms) and every thread accumulates dw/db for
//   its columns over the rows its group visits. Each CTA then writes one partial row of dw and of db to the workspace
//   (row groups of one CTA are summed first, in group order, through shared memory), and a
//   second kernel sums the partials of every column in a fixed order. No atomics anywhere, so
//   the gradients are bit-identical from run to run (for a given GPU: the grid follows num_sms).
//   Rows too long for the register path (> 8192 columns on the 16-byte path, > 4096 on the
//   scalar one) use a block-per-row dx kernel plus a column-sum kernel for the partials, which
//   reads input and grad_out a second time.
#include <cstddef>
#include <cstdint>

#include "common.cuh"
#include "dispatch.cuh"
#include "launchers.h"

namespace tx_kernels {
namespace {

using cuda::aligned16_or_null;
using cuda::ceil_div;
using cuda::group_reduce_sum;
using cuda::group_reduce_sum2;
using cuda::is_aligned;
using cuda::load_f32;
using cuda::load_vec;
using cuda::round_up;
using cuda::store_f32;
using cuda::store_vec;
using cuda::to_float;
using cuda::from_float;
using cuda::round_to;

// Register budget: fp32 values per thread for one row. The backward keeps four per element
// (xhat, g, and the dw/db accumulators), the forward one.
constexpr int kFwdMaxElems = 32;
constexpr int kBwdMaxElems = 16;
// Threads per CTA allowed by __launch_bounds__ (512 threads leave 128 registers per thread,
// 1024 leave 64): more values per thread need more registers, and the scalar path (VEC = 1) needs
// more per value (an address and a predicate per element). Chosen from -Xptxas -v: these limits
// give no spills (scripts/check_cuda_compile.sh prints the table).
__host__ __device__ constexpr int fwd_max_threads(int vec, int items) {
  return (vec * items > 16 || (vec == 1 && items >= 16)) ? 512 : 1024;
}
__host__ __device__ constexpr int bwd_max_threads(int vec, int items) {
  return (vec * items > 8 || (vec == 1 && items >= 8)) ? 512 : 1024;
}
// Scalar backward: at most 8 values per thread (16 spilled even at 128 registers).
__host__ __device__ constexpr int bwd_max_elems(int vec) { return vec == 1 ? 8 : kBwdMaxElems; }
constexpr int kFallbackThreads = 512;
constexpr int64_t kMaxGrid = int64_t{1} << 30;  // rows beyond grid * rows-per-CTA are looped over

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

// Forward, register path. blockDim = (tpr, rows per CTA); row group = threads sharing threadIdx.y.
// cols % VEC == 0 (the launcher picks VEC = 1 otherwise).
// rstd from the variance summed as sum((d / sqrt(cols))^2): scaling each term first keeps the sum
// finite whenever the variance itself fits fp32. A variance that does not gives NaN (params.h),
// where rsqrt(inf) would be 0 and the row a finite, wrong (x - mean) * 0.
__device__ __forceinline__ float rstd_of(float var, float eps) {
  return var == __builtin_huge_valf() ? __builtin_nanf("") : rsqrtf(var + eps);
}

// s at column 0 of `row`: input (+ residual, rounded to T as the sum the forward returns).
template <typename T>
__device__ __forceinline__ float normalized_first(const LayerNormParams& p, int64_t row) {
  const float x = to_float(static_cast<const T*>(p.input)[row * p.input_row_stride]);
  if (p.residual == nullptr) return x;
  return round_to<T>(x + to_float(static_cast<const T*>(p.residual)[row * p.residual_row_stride]));
}

template <typename T, int VEC, int ITEMS>
__global__ void __launch_bounds__(fwd_max_threads(VEC, ITEMS))
layer_norm_fwd_kernel(const LayerNormParams p) {
  TX_SHARED(float[32 * cuda::kMaxGroups], red);
  const T* __restrict__ input = static_cast<const T*>(p.input);
  const T* __restrict__ residual = static_cast<const T*>(p.residual);
  const float* __restrict__ weight = static_cast<const float*>(p.weight);
  const float* __restrict__ bias = static_cast<const float*>(p.bias);
  T* __restrict__ out = static_cast<T*>(p.out);
  T* __restrict__ residual_out = static_cast<T*>(p.residual_out);

  const int64_t n = p.cols / VEC;  // chunks per row
  const int tpr = static_cast<int>(blockDim.x);
  const float inv_cols = 1.0f / static_cast<float>(p.cols);
  const float inv_sqrt_cols = rsqrtf(static_cast<float>(p.cols));
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;

  // The loop bound is uniform over the CTA (base, not row), so groups past the last row still
  // join the barriers inside group_reduce_sum.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < p.rows; base += step) {
    const int64_t row = base + threadIdx.y;
    const bool row_ok = row < p.rows;

    float s[ITEMS][VEC];
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) s[k][v] = 0.0f;
    }
    if (row_ok) {
      const T* x_row = input + row * p.input_row_stride;
#pragma unroll
      for (int k = 0; k < ITEMS; ++k) {
        const int64_t c = threadIdx.x + static_cast<int64_t>(k) * tpr;
        if (c < n) load_vec<T, VEC>(x_row + c * VEC, s[k]);
      }
      if (residual != nullptr) {
        const T* r_row = residual + row * p.residual_row_stride;
        float r[ITEMS][VEC];
#pragma unroll
        for (int k = 0; k < ITEMS; ++k) {
          const int64_t c = threadIdx.x + static_cast<int64_t>(k) * tpr;
          if (c < n) {
            load_vec<T, VEC>(r_row + c * VEC, r[k]);
          } else {
#pragma unroll
            for (int v = 0; v < VEC; ++v) r[k][v] = 0.0f;
          }
        }
#pragma unroll
        for (int k = 0; k < ITEMS; ++k) {
#pragma unroll
          for (int v = 0; v < VEC; ++v) s[k][v] = round_to<T>(s[k][v] + r[k][v]);
        }
      }
    }

    // residual_out is the sum itself: written before the row is centred in place on its first
    // value, so that no register holds the shift through the reductions (at 16 values per thread
    // that register made the scalar path spill).
    if (row_ok && residual_out != nullptr) {
      T* ro_row = residual_out + row * p.cols;
#pragma unroll
      for (int k = 0; k < ITEMS; ++k) {
        const int64_t c = threadIdx.x + static_cast<int64_t>(k) * tpr;
        if (c < n) store_vec<T, VEC>(ro_row + c * VEC, s[k]);
      }
    }
    if (row_ok) {
      const float shift = normalized_first<T>(p, row);
#pragma unroll
      for (int k = 0; k < ITEMS; ++k) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) s[k][v] -= shift;
      }
    }
    float sum = 0.0f;
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
      const int64_t c = threadIdx.x + static_cast<int64_t>(k) * tpr;
      if (c < n) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) sum += s[k][v];
      }
    }
    const float mean_shifted = group_reduce_sum(sum, red) * inv_cols;

    float sq = 0.0f;
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
      const int64_t c = threadIdx.x + static_cast<int64_t>(k) * tpr;
      if (c < n) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          const float d = (s[k][v] - mean_shifted) * inv_sqrt_cols;
          sq += d * d;
        }
      }
    }
    const float rstd = rstd_of(group_reduce_sum(sq, red), static_cast<float>(p.eps));

    if (row_ok) {
      if (threadIdx.x == 0) {
        static_cast<float*>(p.mean)[row] = normalized_first<T>(p, row) + mean_shifted;
        static_cast<float*>(p.rstd)[row] = rstd;
      }
      T* o_row = out + row * p.cols;
#pragma unroll
      for (int k = 0; k < ITEMS; ++k) {
        const int64_t c = threadIdx.x + static_cast<int64_t>(k) * tpr;
        if (c < n) {
          float w[VEC], b[VEC];
          if (weight != nullptr) {
            load_f32<VEC>(weight + c * VEC, w);
          } else {
#pragma unroll
            for (int v = 0; v < VEC; ++v) w[v] = 1.0f;
          }
          if (bias != nullptr) {
            load_f32<VEC>(bias + c * VEC, b);
          } else {
#pragma unroll
            for (int v = 0; v < VEC; ++v) b[v] = 0.0f;
          }
          float y[VEC];
#pragma unroll
          for (int v = 0; v < VEC; ++v) y[v] = (s[k][v] - mean_shifted) * rstd * w[v] + b[v];
          store_vec<T, VEC>(o_row + c * VEC, y);
        }
      }
    }
  }
}

// Forward fallback for rows that do not fit in registers: one CTA (blockDim = (kFallbackThreads,
// 1)) per row, three sweeps over the row (sum, squared deviations, output), recomputing x + r
// in fp32 each time so results match the register path.
template <typename T>
__global__ void __launch_bounds__(kFallbackThreads)
layer_norm_fwd_fallback_kernel(const LayerNormParams p) {
  TX_SHARED(float[32], red);
  const T* __restrict__ input = static_cast<const T*>(p.input);
  const T* __restrict__ residual = static_cast<const T*>(p.residual);
  T* __restrict__ out = static_cast<T*>(p.out);
  T* __restrict__ residual_out = static_cast<T*>(p.residual_out);
  const float inv_cols = 1.0f / static_cast<float>(p.cols);
  const float inv_sqrt_cols = rsqrtf(static_cast<float>(p.cols));

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* x_row = input + row * p.input_row_stride;
    const T* r_row = residual != nullptr ? residual + row * p.residual_row_stride : nullptr;
    auto load = [&](int64_t c) {
      const float x = to_float(x_row[c]);
      return r_row != nullptr ? round_to<T>(x + to_float(r_row[c])) : x;
    };
    const float shift = normalized_first<T>(p, row);  // as in the register path
    float sum = 0.0f;
    for (int64_t c = threadIdx.x; c < p.cols; c += blockDim.x) sum += load(c) - shift;
    const float mean_shifted = group_reduce_sum(sum, red) * inv_cols;
    float sq = 0.0f;
    for (int64_t c = threadIdx.x; c < p.cols; c += blockDim.x) {
      const float d = (load(c) - shift - mean_shifted) * inv_sqrt_cols;
      sq += d * d;
    }
    const float rstd = rstd_of(group_reduce_sum(sq, red), static_cast<float>(p.eps));
    if (threadIdx.x == 0) {
      static_cast<float*>(p.mean)[row] = shift + mean_shifted;
      static_cast<float*>(p.rstd)[row] = rstd;
    }
    for (int64_t c = threadIdx.x; c < p.cols; c += blockDim.x) {
      const float s = load(c);
      if (residual_out != nullptr) residual_out[row * p.cols + c] = from_float<T>(s);
      const float w = p.weight != nullptr ? static_cast<const float*>(p.weight)[c] : 1.0f;
      const float b = p.bias != nullptr ? static_cast<const float*>(p.bias)[c] : 0.0f;
      out[row * p.cols + c] = from_float<T>((s - shift - mean_shifted) * rstd * w + b);
    }
  }
}

// Backward, register path. Same layout as the forward. Writes grad_input and, when
// `want_partials`, CTA blockIdx.x's partial sums of dw and db to
// workspace[blockIdx.x][cols] and workspace[gridDim.x + blockIdx.x][cols].
// Dynamic shared memory: 2 * cols floats when blockDim.y > 1 and want_partials, else none.
template <typename T, int VEC, int ITEMS>
__global__ void __launch_bounds__(bwd_max_threads(VEC, ITEMS))
layer_norm_bwd_kernel(const LayerNormBwdParams p, float* workspace, bool want_partials,
                      bool workspace_vec) {
  TX_SHARED(float[64 * cuda::kMaxGroups], red);
  TX_DYNAMIC_SHARED(float, col_smem);
  const T* __restrict__ grad_out = static_cast<const T*>(p.grad_out);
  const T* __restrict__ grad_res = static_cast<const T*>(p.grad_residual_out);
  const T* __restrict__ input = static_cast<const T*>(p.input);
  const T* __restrict__ residual = static_cast<const T*>(p.residual);
  const float* __restrict__ weight = static_cast<const float*>(p.weight);
  T* __restrict__ grad_input = static_cast<T*>(p.grad_input);

  const int64_t n = p.cols / VEC;
  const int tpr = static_cast<int>(blockDim.x);
  const float inv_cols = 1.0f / static_cast<float>(p.cols);
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;

  float acc_w[ITEMS][VEC], acc_b[ITEMS][VEC];
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc_w[k][v] = acc_b[k][v] = 0.0f;
  }

  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < p.rows; base += step) {
    const int64_t row = base + threadIdx.y;
    const bool row_ok = row < p.rows;
    float xh[ITEMS][VEC], g[ITEMS][VEC];  // xhat, and dy then dy * w
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) xh[k][v] = g[k][v] = 0.0f;
    }
    float mean = 0.0f, rstd = 0.0f;
    if (row_ok) {
      mean = static_cast<const float*>(p.mean)[row];
      rstd = static_cast<const float*>(p.rstd)[row];
      const T* x_row = input + row * p.cols;
      const T* dy_row = grad_out + row * p.cols;
#pragma unroll
      for (int k = 0; k < ITEMS; ++k) {
        const int64_t c = threadIdx.x + static_cast<int64_t>(k) * tpr;
        if (c < n) load_vec<T, VEC>(x_row + c * VEC, xh[k]);
      }
      if (residual != nullptr) {
        const T* r_row = residual + row * p.cols;
#pragma unroll
        for (int k = 0; k < ITEMS; ++k) {
          const int64_t c = threadIdx.x + static_cast<int64_t>(k) * tpr;
          float r[VEC];
          if (c < n) {
            load_vec<T, VEC>(r_row + c * VEC, r);
#pragma unroll
            for (int v = 0; v < VEC; ++v) xh[k][v] = round_to<T>(xh[k][v] + r[v]);
          }
        }
      }
#pragma unroll
      for (int k = 0; k < ITEMS; ++k) {
        const int64_t c = threadIdx.x + static_cast<int64_t>(k) * tpr;
        if (c < n) load_vec<T, VEC>(dy_row + c * VEC, g[k]);
      }
    }

    float sum_g = 0.0f, sum_gx = 0.0f;
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
      const int64_t c = threadIdx.x + static_cast<int64_t>(k) * tpr;
      if (row_ok && c < n) {
        float w[VEC];
        if (weight != nullptr) {
          load_f32<VEC>(weight + c * VEC, w);
        } else {
#pragma unroll
          for (int v = 0; v < VEC; ++v) w[v] = 1.0f;
        }
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          const float xhat = (xh[k][v] - mean) * rstd;
          const float dy = g[k][v];
          xh[k][v] = xhat;
          acc_b[k][v] += dy;
          acc_w[k][v] += dy * xhat;
          g[k][v] = dy * w[v];
          sum_g += g[k][v];
          sum_gx += g[k][v] * xhat;
        }
      }
    }
    group_reduce_sum2(sum_g, sum_gx, red);
    const float a = sum_g * inv_cols, b = sum_gx * inv_cols;

    if (row_ok) {
      const T* dr_row = grad_res + row * p.cols;  // only dereferenced when given
      T* dx_row = grad_input + row * p.cols;
#pragma unroll
      for (int k = 0; k < ITEMS; ++k) {
        const int64_t c = threadIdx.x + static_cast<int64_t>(k) * tpr;
        if (c < n) {
          float dx[VEC];
#pragma unroll
          for (int v = 0; v < VEC; ++v) dx[v] = rstd * (g[k][v] - a - xh[k][v] * b);
          if (grad_res != nullptr) {
            float dr[VEC];
            load_vec<T, VEC>(dr_row + c * VEC, dr);
#pragma unroll
            for (int v = 0; v < VEC; ++v) dx[v] += dr[v];
          }
          store_vec<T, VEC>(dx_row + c * VEC, dx);
        }
      }
    }
  }

  if (!want_partials) return;
  const int64_t num_partials = gridDim.x;
  float* ws_w = workspace + static_cast<int64_t>(blockIdx.x) * p.cols;
  float* ws_b = workspace + (num_partials + blockIdx.x) * p.cols;
  if (blockDim.y == 1) {
    // Every chunk of the row has exactly one owner thread in this CTA.
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
      const int64_t c = threadIdx.x + static_cast<int64_t>(k) * tpr;
      if (c < n) {
        if (workspace_vec) {
          store_f32<VEC>(ws_w + c * VEC, acc_w[k]);
          store_f32<VEC>(ws_b + c * VEC, acc_b[k]);
        } else {
#pragma unroll
          for (int v = 0; v < VEC; ++v) {
            ws_w[c * VEC + v] = acc_w[k][v];
            ws_b[c * VEC + v] = acc_b[k][v];
          }
        }
      }
    }
  } else {
    // Row groups of this CTA share columns: add them up in group order, one group at a time.
    float* sw = col_smem;
    float* sb = col_smem + p.cols;
    for (int grp = 0; grp < static_cast<int>(blockDim.y); ++grp) {
      if (static_cast<int>(threadIdx.y) == grp) {
#pragma unroll
        for (int k = 0; k < ITEMS; ++k) {
          const int64_t c = threadIdx.x + static_cast<int64_t>(k) * tpr;
          if (c < n) {
#pragma unroll
            for (int v = 0; v < VEC; ++v) {
              const int64_t i = c * VEC + v;
              sw[i] = (grp == 0 ? 0.0f : sw[i]) + acc_w[k][v];
              sb[i] = (grp == 0 ? 0.0f : sb[i]) + acc_b[k][v];
            }
          }
        }
      }
      __syncthreads();
    }
    const int64_t tid = static_cast<int64_t>(threadIdx.y) * blockDim.x + threadIdx.x;
    for (int64_t i = tid; i < p.cols; i += static_cast<int64_t>(blockDim.x) * blockDim.y) {
      ws_w[i] = sw[i];
      ws_b[i] = sb[i];
    }
  }
}

// The value the forward normalized at element `off` of the contiguous (rows, cols) inputs.
template <typename T>
__device__ __forceinline__ float normalized_at(const LayerNormBwdParams& p, int64_t off) {
  const float x = to_float(static_cast<const T*>(p.input)[off]);
  return p.residual != nullptr ? round_to<T>(x + to_float(static_cast<const T*>(p.residual)[off])) : x;
}

// Backward fallback, grad_input only: one CTA (kFallbackThreads x 1) per row, two sweeps.
template <typename T>
__global__ void __launch_bounds__(kFallbackThreads)
layer_norm_bwd_dx_fallback_kernel(const LayerNormBwdParams p) {
  TX_SHARED(float[64], red);
  const T* __restrict__ grad_out = static_cast<const T*>(p.grad_out);
  const T* __restrict__ grad_res = static_cast<const T*>(p.grad_residual_out);
  T* __restrict__ grad_input = static_cast<T*>(p.grad_input);
  const float inv_cols = 1.0f / static_cast<float>(p.cols);

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const float mean = static_cast<const float*>(p.mean)[row], rstd = static_cast<const float*>(p.rstd)[row];
    const int64_t off = row * p.cols;
    float sum_g = 0.0f, sum_gx = 0.0f;
    for (int64_t c = threadIdx.x; c < p.cols; c += blockDim.x) {
      const float xhat = (normalized_at<T>(p, off + c) - mean) * rstd;
      const float g = to_float(grad_out[off + c]) * (p.weight != nullptr ? static_cast<const float*>(p.weight)[c] : 1.0f);
      sum_g += g;
      sum_gx += g * xhat;
    }
    group_reduce_sum2(sum_g, sum_gx, red);
    const float a = sum_g * inv_cols, b = sum_gx * inv_cols;
    for (int64_t c = threadIdx.x; c < p.cols; c += blockDim.x) {
      const float xhat = (normalized_at<T>(p, off + c) - mean) * rstd;
      const float g = to_float(grad_out[off + c]) * (p.weight != nullptr ? static_cast<const float*>(p.weight)[c] : 1.0f);
      float dx = rstd * (g - a - xhat * b);
      if (grad_res != nullptr) dx += to_float(grad_res[off + c]);
      grad_input[off + c] = from_float<T>(dx);
    }
  }
}

// Backward fallback, dw/db partials: blockDim = (32, 16), grid = (ceil(cols / 32), partials).
// Thread (x, y) of CTA (bx, by) sums column bx * 32 + x over rows by * 16 + y + k * 16 * partials;
// the 16 row slices are then added in order and written to workspace[by][col] (dw) and
// workspace[partials + by][col] (db).
constexpr int kColTileX = 32, kColTileY = 16;

template <typename T>
__global__ void __launch_bounds__(kColTileX * kColTileY)
layer_norm_bwd_colsum_kernel(const LayerNormBwdParams p, float* workspace) {
  TX_SHARED(float[kColTileY][kColTileX + 1], sw);
  TX_SHARED(float[kColTileY][kColTileX + 1], sb);
  const T* __restrict__ grad_out = static_cast<const T*>(p.grad_out);
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColTileX + threadIdx.x;
  const int64_t num_partials = gridDim.y;
  float aw = 0.0f, ab = 0.0f;
  if (col < p.cols) {
#pragma unroll 4
    for (int64_t r = static_cast<int64_t>(blockIdx.y) * kColTileY + threadIdx.y; r < p.rows;
         r += num_partials * kColTileY) {
      const float dy = to_float(grad_out[r * p.cols + col]);
      const float xhat = (normalized_at<T>(p, r * p.cols + col) - static_cast<const float*>(p.mean)[r]) *
                         static_cast<const float*>(p.rstd)[r];
      aw += dy * xhat;
      ab += dy;
    }
  }
  sw[threadIdx.y][threadIdx.x] = aw;
  sb[threadIdx.y][threadIdx.x] = ab;
  __syncthreads();
  if (threadIdx.y == 0 && col < p.cols) {
    float tw = 0.0f, tb = 0.0f;
    for (int y = 0; y < kColTileY; ++y) {
      tw += sw[y][threadIdx.x];
      tb += sb[y][threadIdx.x];
    }
    workspace[static_cast<int64_t>(blockIdx.y) * p.cols + col] = tw;
    workspace[(num_partials + blockIdx.y) * p.cols + col] = tb;
  }
}

// Stage 2: grad_weight[col] = sum_k workspace[k][col], grad_bias[col] = sum_k
// workspace[partials + k][col], k in a fixed order (slices of 16, then the slices in order).
// blockDim = (32, 16), grid = ceil(cols / 32).
__global__ void __launch_bounds__(kColTileX * kColTileY)
layer_norm_bwd_finalize_kernel(const float* __restrict__ workspace, int64_t num_partials,
                               int64_t cols, float* __restrict__ grad_weight,
                               float* __restrict__ grad_bias) {
  TX_SHARED(float[kColTileY][kColTileX + 1], sw);
  TX_SHARED(float[kColTileY][kColTileX + 1], sb);
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColTileX + threadIdx.x;
  float aw = 0.0f, ab = 0.0f;
  if (col < cols) {
#pragma unroll 4
    for (int64_t k = threadIdx.y; k < num_partials; k += kColTileY) {
      aw += workspace[k * cols + col];
      ab += workspace[(num_partials + k) * cols + col];
    }
  }
  sw[threadIdx.y][threadIdx.x] = aw;
  sb[threadIdx.y][threadIdx.x] = ab;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    float tw = 0.0f, tb = 0.0f;
    for (int y = 0; y < kColTileY; ++y) {
      tw += sw[y][threadIdx.x];
      tb += sb[y][threadIdx.x];
    }
    if (grad_weight != nullptr) grad_weight[col] = tw;
    if (grad_bias != nullptr) grad_bias[col] = tb;
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------

// Register-path shape for rows of n chunks: `items` chunks per thread, `tpr` threads per row.
struct RowConfig {
  bool ok = false;  // false: no register configuration fits, use the fallback
  int items = 1;
  int tpr = 32;
};

// Largest items (fewest threads, most loads in flight per thread) whose thread slots are at most
// 25% idle; failing that, the configuration with the fewest slots (tiny rows: 1, 7 columns).
RowConfig pick_row_config(int64_t n, int vec, bool bwd) {
  RowConfig best;
  int64_t best_slots = INT64_MAX;
  const int max_elems = bwd ? bwd_max_elems(vec) : kFwdMaxElems;
  for (int items = 16; items >= 1; items /= 2) {
    if (items * vec > max_elems) continue;
    const int64_t tpr = round_up(ceil_div(n, int64_t{items}), int64_t{32});
    const int limit = bwd ? bwd_max_threads(vec, items) : fwd_max_threads(vec, items);
    if (tpr > limit) continue;
    const int64_t slots = tpr * items;
    if ((slots - n) * 4 <= slots) return RowConfig{true, items, static_cast<int>(tpr)};
    if (slots < best_slots) {
      best_slots = slots;
      best = RowConfig{true, items, static_cast<int>(tpr)};
    }
  }
  return best;
}

template <typename T, int VEC, int ITEMS>
void launch_fwd(const LayerNormParams& p, dim3 grid, dim3 block, cudaStream_t stream) {
  const auto kernel = layer_norm_fwd_kernel<T, VEC, ITEMS>;
  TX_LAUNCH(kernel, grid, block, 0, stream)(p);
}

template <typename T, int VEC>
cudaError_t dispatch_fwd(const LayerNormParams& p, int items, dim3 grid, dim3 block,
                         cudaStream_t stream) {
  switch (items) {
    case 1: launch_fwd<T, VEC, 1>(p, grid, block, stream); break;
    case 2: launch_fwd<T, VEC, 2>(p, grid, block, stream); break;
    case 4: launch_fwd<T, VEC, 4>(p, grid, block, stream); break;
    case 8:
      if constexpr (VEC * 8 <= kFwdMaxElems) launch_fwd<T, VEC, 8>(p, grid, block, stream);
      else return cudaErrorInvalidConfiguration;
      break;
    case 16:
      if constexpr (VEC * 16 <= kFwdMaxElems) launch_fwd<T, VEC, 16>(p, grid, block, stream);
      else return cudaErrorInvalidConfiguration;
      break;
    default: return cudaErrorInvalidConfiguration;
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t layer_norm_fwd_typed(const LayerNormParams& p, cudaStream_t stream) {
  constexpr int V = cuda::kVecElems<T>;
  const bool has_res = p.residual != nullptr;
  const bool vec_ok = p.cols % V == 0 && is_aligned(p.input, 16) && p.input_row_stride % V == 0 &&
                      (!has_res || (is_aligned(p.residual, 16) && p.residual_row_stride % V == 0 &&
                                    aligned16_or_null(p.residual_out))) &&
                      is_aligned(p.out, 16) && aligned16_or_null(p.weight) && aligned16_or_null(p.bias);
  const int vec = vec_ok ? V : 1;
  const RowConfig cfg = pick_row_config(p.cols / vec, vec, /*bwd=*/false);
  if (!cfg.ok) {
    const int64_t grid = p.rows < kMaxGrid ? p.rows : kMaxGrid;
    TX_LAUNCH(layer_norm_fwd_fallback_kernel<T>, static_cast<unsigned>(grid), kFallbackThreads, 0, stream)(p);
    return cudaGetLastError();
  }
  // One warp per row: 4 rows per CTA (128 threads); wider rows: one row per CTA.
  const int rows_per_cta = cfg.tpr >= 128 ? 1 : 128 / cfg.tpr;
  int64_t grid = ceil_div(p.rows, int64_t{rows_per_cta});
  if (grid > kMaxGrid) grid = kMaxGrid;
  const dim3 block(cfg.tpr, rows_per_cta);
  return vec_ok ? dispatch_fwd<T, V>(p, cfg.items, dim3(static_cast<unsigned>(grid)), block, stream)
                : dispatch_fwd<T, 1>(p, cfg.items, dim3(static_cast<unsigned>(grid)), block, stream);
}

// Everything the backward launch and its workspace query must agree on.
struct BwdPlan {
  bool fallback = false;
  bool vec = false;
  RowConfig cfg;
  int rows_per_cta = 1;
  int64_t grid = 0;          // register path: CTAs (= partials); fallback: dx kernel CTAs
  int64_t col_grid_x = 0;    // fallback column-sum kernel
  int64_t partials = 0;      // rows of dw (and of db) partials in the workspace
  size_t smem = 0;           // dynamic shared memory of the register-path kernel
  bool want_partials = false;
};

BwdPlan plan_bwd(const LayerNormBwdParams& p, int num_sms) {
  BwdPlan plan;
  if (num_sms < 1) num_sms = 1;
  plan.want_partials = p.grad_weight != nullptr || p.grad_bias != nullptr;
  const int esize = cuda::element_bytes(p.dtype);
  const int V = esize > 0 ? 16 / esize : 1;
  plan.vec = esize > 0 && p.cols % V == 0 && is_aligned(p.grad_out, 16) &&
             aligned16_or_null(p.grad_residual_out) && is_aligned(p.input, 16) &&
             aligned16_or_null(p.residual) && is_aligned(p.grad_input, 16) && aligned16_or_null(p.weight);
  const int vec = plan.vec ? V : 1;
  plan.cfg = pick_row_config(p.cols / vec, vec, /*bwd=*/true);
  if (plan.cfg.ok) {
    // CTAs of about 512 threads, enough for ~1024 resident threads per SM; every CTA is one
    // row of partials, so the grid is capped at the resident size (persistent CTAs loop).
    plan.rows_per_cta = plan.cfg.tpr >= 512 ? 1 : 512 / plan.cfg.tpr;
    const int64_t threads = int64_t{plan.cfg.tpr} * plan.rows_per_cta;
    const int64_t per_sm = threads >= 1024 ? 1 : 1024 / threads;
    int64_t grid = ceil_div(p.rows, int64_t{plan.rows_per_cta});
    const int64_t resident = per_sm * num_sms;
    plan.grid = grid < resident ? grid : resident;
    plan.partials = plan.grid;
    plan.smem = (plan.rows_per_cta > 1 && plan.want_partials)
                    ? 2 * static_cast<size_t>(p.cols) * sizeof(float)
                    : 0;
  } else {
    plan.fallback = true;
    plan.grid = p.rows < int64_t{num_sms} * 4 ? p.rows : int64_t{num_sms} * 4;
    plan.col_grid_x = ceil_div(p.cols, int64_t{kColTileX});
    // About 8 CTAs per SM for the column sums, each over >= 16 rows.
    int64_t parts = ceil_div(int64_t{num_sms} * 8, plan.col_grid_x);
    const int64_t max_parts = ceil_div(p.rows, int64_t{kColTileY});
    if (parts > max_parts) parts = max_parts;
    if (parts > 65535) parts = 65535;
    plan.partials = parts < 1 ? 1 : parts;
  }
  return plan;
}

template <typename T, int VEC, int ITEMS>
void launch_bwd(const LayerNormBwdParams& p, const BwdPlan& plan, float* workspace, bool ws_vec,
                cudaStream_t stream) {
  const dim3 block(plan.cfg.tpr, plan.rows_per_cta);
  const auto kernel = layer_norm_bwd_kernel<T, VEC, ITEMS>;
  TX_LAUNCH(kernel, static_cast<unsigned>(plan.grid), block, plan.smem, stream)(
      p, workspace, plan.want_partials, ws_vec);
}

template <typename T, int VEC>
cudaError_t dispatch_bwd(const LayerNormBwdParams& p, const BwdPlan& plan, float* workspace,
                         bool ws_vec, cudaStream_t stream) {
  switch (plan.cfg.items) {
    case 1: launch_bwd<T, VEC, 1>(p, plan, workspace, ws_vec, stream); break;
    case 2: launch_bwd<T, VEC, 2>(p, plan, workspace, ws_vec, stream); break;
    case 4:
      if constexpr (VEC * 4 <= bwd_max_elems(VEC)) launch_bwd<T, VEC, 4>(p, plan, workspace, ws_vec, stream);
      else return cudaErrorInvalidConfiguration;
      break;
    case 8:
      if constexpr (VEC * 8 <= bwd_max_elems(VEC)) launch_bwd<T, VEC, 8>(p, plan, workspace, ws_vec, stream);
      else return cudaErrorInvalidConfiguration;
      break;
    case 16:
      if constexpr (VEC * 16 <= bwd_max_elems(VEC)) launch_bwd<T, VEC, 16>(p, plan, workspace, ws_vec, stream);
      else return cudaErrorInvalidConfiguration;
      break;
    default: return cudaErrorInvalidConfiguration;
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t layer_norm_bwd_typed(const LayerNormBwdParams& p, const BwdPlan& plan, float* workspace,
                                 cudaStream_t stream) {
  constexpr int V = cuda::kVecElems<T>;
  cudaError_t err;
  if (!plan.fallback) {
    // 2 * cols floats of dynamic shared memory stay under the 48 KB default: rows_per_cta > 1
    // means tpr <= 256 and cols <= 256 * kBwdMaxElems = 4096.
    const bool ws_vec = is_aligned(workspace, 16);
    err = plan.vec ? dispatch_bwd<T, V>(p, plan, workspace, ws_vec, stream)
                   : dispatch_bwd<T, 1>(p, plan, workspace, ws_vec, stream);
  } else {
    TX_LAUNCH(layer_norm_bwd_dx_fallback_kernel<T>, static_cast<unsigned>(plan.grid), kFallbackThreads, 0, stream)(p);
    err = cudaGetLastError();
    if (err == cudaSuccess && plan.want_partials) {
      const dim3 grid(static_cast<unsigned>(plan.col_grid_x), static_cast<unsigned>(plan.partials));
      TX_LAUNCH(layer_norm_bwd_colsum_kernel<T>, grid, dim3(kColTileX, kColTileY), 0, stream)(p, workspace);
      err = cudaGetLastError();
    }
  }
  if (err != cudaSuccess || !plan.want_partials) return err;
  const int64_t grid = ceil_div(p.cols, int64_t{kColTileX});
  TX_LAUNCH(layer_norm_bwd_finalize_kernel, static_cast<unsigned>(grid), dim3(kColTileX, kColTileY), 0,
            stream)(workspace, plan.partials, p.cols, static_cast<float*>(p.grad_weight),
                    static_cast<float*>(p.grad_bias));
  return cudaGetLastError();
}

size_t partials_bytes(const LayerNormBwdParams& p, const BwdPlan& plan) {
  if (!plan.want_partials) return 0;
  return 2 * static_cast<size_t>(plan.partials) * static_cast<size_t>(p.cols) * sizeof(float);
}

}  // namespace

size_t layer_norm_fwd_workspace_bytes(const LayerNormParams&, const DeviceInfo&) { return 0; }

cudaError_t layer_norm_fwd_cuda(const LayerNormParams& params, const DeviceInfo&, void*, size_t,
                                cudaStream_t stream) {
  if (params.rows <= 0 || params.cols <= 0) return cudaSuccess;
  return cuda::dispatch_dtype</*kWithFp64=*/false>(params.dtype, [&](auto tag) {
    return layer_norm_fwd_typed<typename decltype(tag)::type>(params, stream);
  });
}

size_t layer_norm_bwd_workspace_bytes(const LayerNormBwdParams& params, const DeviceInfo& device) {
  if (params.rows <= 0 || params.cols <= 0) return 0;
  return partials_bytes(params, plan_bwd(params, device.num_sms));
}

cudaError_t layer_norm_bwd_cuda(const LayerNormBwdParams& params, const DeviceInfo& device,
                                void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (params.rows <= 0 || params.cols <= 0) return cudaSuccess;
  const BwdPlan plan = plan_bwd(params, device.num_sms);
  if (!workspace_ok(workspace, workspace_bytes, partials_bytes(params, plan))) return cudaErrorInvalidValue;
  return cuda::dispatch_dtype</*kWithFp64=*/false>(params.dtype, [&](auto tag) {
    return layer_norm_bwd_typed<typename decltype(tag)::type>(params, plan, static_cast<float*>(workspace),
                                                             stream);
  });
}

}  // namespace tx_kernels
