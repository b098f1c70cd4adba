// common.cuh: small device helpers shared by every CUDA kernel (torch-free).
//
// Defines, in namespace tx_kernels::cuda:
//   ceil_div, round_up                      integer helpers usable on host and device
//   is_aligned(ptr, bytes)                  run-time alignment test for the vector paths
//   aligned16_or_null(ptr)                  the same for an optional pointer
//   Vec<T, N>                               N elements of T aligned to N * sizeof(T) bytes
//   load_vec / store_vec                    one N * sizeof(T)-byte access (16 bytes for the
//                                           vector paths), with float conversion of every lane
//   convert<To>(x), to_float, from_float<T> conversions between float, double, __half, __nv_bfloat16
//   pack2<T>(lo, hi)                        two fp32 values as one register of 16-bit pairs
//   round_to<T>(x)                          x rounded to T and back (as a T tensor holds it)
//   kVecElems<T>                            elements per 16-byte access
//   warp_reduce_sum / warp_reduce_max,      butterfly / fixed-order reductions over a warp or a
//   group_reduce_sum(2)                     row group of warps: every thread gets the bit-identical
//                                           total, so results are deterministic and uniform
// Everything is header-only and inline; only cuda_runtime / cuda_fp16 / cuda_bf16 are included.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "target.cuh"

namespace tx_kernels {
namespace cuda {

// ---------------------------------------------------------------------------------------------
// Integer helpers
// ---------------------------------------------------------------------------------------------
template <typename A, typename B>
__host__ __device__ __forceinline__ constexpr A ceil_div(A a, B b) {
  return (a + static_cast<A>(b) - 1) / static_cast<A>(b);
}

template <typename A, typename B>
__host__ __device__ __forceinline__ constexpr A round_up(A a, B b) {
  return ceil_div(a, b) * static_cast<A>(b);
}

__host__ __device__ __forceinline__ bool is_aligned(const void* p, uintptr_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) % bytes) == 0;
}
// An optional pointer (nullptr: absent) that does not stop a 16-byte vector path.
__host__ __device__ __forceinline__ bool aligned16_or_null(const void* p) { return p == nullptr || is_aligned(p, 16); }

// ---------------------------------------------------------------------------------------------
// Conversions: convert<To>(x) between float, double, __half and __nv_bfloat16. The 16-bit types
// go through fp32, their arithmetic type; everything else is a cast, so fp64 stays fp64.
// to_float / from_float<T> are its fp32 spellings (the memory-bound kernels compute in fp32), and
// pack2<T> puts two converted values in the 32-bit register of an MMA fragment pair.
// ---------------------------------------------------------------------------------------------
template <typename To, typename From>
__device__ __forceinline__ To convert(From x) {
  if constexpr (std::is_same_v<To, From>) {
    return x;
  } else if constexpr (std::is_same_v<From, __half>) {
    return static_cast<To>(__half2float(x));
  } else if constexpr (std::is_same_v<From, __nv_bfloat16>) {
    return static_cast<To>(__bfloat162float(x));
  } else if constexpr (std::is_same_v<To, __half>) {
    return __float2half_rn(static_cast<float>(x));
  } else if constexpr (std::is_same_v<To, __nv_bfloat16>) {
    return __float2bfloat16_rn(static_cast<float>(x));
  } else {
    return static_cast<To>(x);
  }
}

template <typename From>
__device__ __forceinline__ float to_float(From x) {
  return convert<float>(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x) {
  return convert<T>(x);
}

// Two fp32 values as one 32-bit register of T pairs (T = __half or __nv_bfloat16), `lo` in the
// low 16 bits: the element with the smaller column index of a fragment pair lives there (PTX).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "16-bit pairs only");
  if constexpr (std::is_same_v<T, __half>) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  } else {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
}

// x as a T tensor would hold it (identity for float).
template <typename T>
__device__ __forceinline__ float round_to(float x) {
  return to_float(from_float<T>(x));
}

// ---------------------------------------------------------------------------------------------
// Aligned vectors: a Vec<T, N> is loaded and stored with a single N * sizeof(T)-byte instruction
// (LDG.128 / STG.128 for 16 bytes) because its alignment equals its size.
// ---------------------------------------------------------------------------------------------
template <typename T>
inline constexpr int kVecElems = 16 / static_cast<int>(sizeof(T));

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Loads N consecutive elements at p (which must be aligned to sizeof(T) * N) into fp32.
template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[N]) {
  const Vec<T, N> raw = *reinterpret_cast<const Vec<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(raw.v[i]);
}

// Converts N fp32 values to T and stores them at p (aligned to sizeof(T) * N) in one access.
template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[N]) {
  Vec<T, N> raw;
#pragma unroll
  for (int i = 0; i < N; ++i) raw.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Vec<T, N>*>(p) = raw;
}

// fp32 parameter vectors (weight, bias) and workspaces: N floats in N / 4 16-byte accesses when
// N is a multiple of 4, else one scalar access each. p must be aligned to 16 bytes in the first
// case (the launchers check it).
template <int N>
__device__ __forceinline__ void load_f32(const float* p, float (&out)[N]) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 4) {
      const float4 q = *reinterpret_cast<const float4*>(p + i);
      out[i] = q.x; out[i + 1] = q.y; out[i + 2] = q.z; out[i + 3] = q.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = p[i];
  }
}

template <int N>
__device__ __forceinline__ void store_f32(float* p, const float (&in)[N]) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 4) {
      *reinterpret_cast<float4*>(p + i) = make_float4(in[i], in[i + 1], in[i + 2], in[i + 3]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] = in[i];
  }
}

// ---------------------------------------------------------------------------------------------
// Reductions
// ---------------------------------------------------------------------------------------------
// Butterfly (xor) sum and maximum over the 32 lanes of a full warp. Each step combines a pair of
// values that the partner lane combines in the opposite order; IEEE addition is commutative, so
// all lanes end with the same bits and the result does not depend on scheduling. A is float or
// double.
template <typename A>
__device__ __forceinline__ A warp_reduce_sum(A v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, offset);
  return v;
}

template <typename A>
__device__ __forceinline__ A warp_reduce_max(A v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const A other = __shfl_xor_sync(0xFFFFFFFFu, v, offset);
    v = other > v ? other : v;
  }
  return v;
}

// Sum over a "row group": the blockDim.x threads that share threadIdx.y (blockDim.x a multiple of
// 32, at most 1024; blockDim.y groups of them, at most kMaxGroups). Every thread of the group gets
// the same total, summed over its warps in a fixed order. When blockDim.x > 32 every thread of
// the block must call this together (it contains barriers); with one warp per group it is a pure
// shuffle and warps stay independent. `smem` holds 32 * blockDim.y floats and may be reused as
// soon as this returns (the trailing barrier protects it).
constexpr int kMaxGroups = 16;

__device__ __forceinline__ float group_reduce_sum(float v, float* smem) {
  v = warp_reduce_sum(v);
  const int num_warps = static_cast<int>(blockDim.x) >> 5;
  if (num_warps == 1) return v;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float* mine = smem + 32 * threadIdx.y;
  if (lane == 0) mine[warp] = v;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < num_warps; ++w) total += mine[w];
  __syncthreads();
  return total;
}

// Two sums at once (one pair of barriers instead of two); smem holds 64 * blockDim.y floats.
__device__ __forceinline__ void group_reduce_sum2(float& a, float& b, float* smem) {
  a = warp_reduce_sum(a);
  b = warp_reduce_sum(b);
  const int num_warps = static_cast<int>(blockDim.x) >> 5;
  if (num_warps == 1) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float* mine = smem + 64 * threadIdx.y;
  if (lane == 0) {
    mine[warp] = a;
    mine[32 + warp] = b;
  }
  __syncthreads();
  float ta = 0.0f, tb = 0.0f;
  for (int w = 0; w < num_warps; ++w) {
    ta += mine[w];
    tb += mine[32 + w];
  }
  __syncthreads();
  a = ta;
  b = tb;
}

}  // namespace cuda
}  // namespace tx_kernels
