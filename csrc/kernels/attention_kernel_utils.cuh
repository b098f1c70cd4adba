// attention_kernel_utils.cuh: thin, torch-free wrappers around the sm_80+ instructions the
// attention kernels are built from (cp.async, ldmatrix, mma.sync m16n8k16), plus the quad
// reductions over a fragment row and the exponentials; attention_common.cuh builds on them. Each
// wrapper documents the register layout it produces, because the kernels' indexing is derived
// from exactly these layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16").
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "target.cuh"

namespace tx_kernels {
namespace attn {

// ---------------------------------------------------------------------------------------------
// cp.async (sm_80+): 16-byte global -> shared copies that bypass registers.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Copies 16 bytes when `valid`, else writes 16 zero bytes to shared memory (src-size 0 reads
// nothing; `src` must still be a valid address, so callers pass the tensor's base pointer).
// The zero fill is what makes tail tiles safe: padded K rows give finite scores (then masked to
// -inf) and padded V rows give 0 instead of whatever garbage lies past the tensor (0 * NaN = NaN).
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
  const int src_size = valid ? 16 : 0;
#if defined(TX_KERNELS_EMU)
  ::txemu::cp_async(smem_dst, gmem_src, 16, src_size);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem_dst)),
               "l"(gmem_src), "r"(src_size)
               : "memory");
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(TX_KERNELS_EMU)
  ::txemu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(TX_KERNELS_EMU)
  ::txemu::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// ---------------------------------------------------------------------------------------------
// ldmatrix: four 8x8 b16 matrices from shared memory. Lane t supplies the address of row (t % 8)
// of matrix (t / 8). Without .trans, register r[m] of lane t holds matrix m's elements
// (row t/4, cols 2*(t%4), 2*(t%4)+1). With .trans it holds (rows 2*(t%4), 2*(t%4)+1; col t/4),
// i.e. the transpose, which is what the B operand needs when the matrix is stored K-major.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row_ptr) {
#if defined(TX_KERNELS_EMU)
  ::txemu::ldmatrix_x4(r, smem_row_ptr, false);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem_row_ptr)));
#endif
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row_ptr) {
#if defined(TX_KERNELS_EMU)
  ::txemu::ldmatrix_x4(r, smem_row_ptr, true);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem_row_ptr)));
#endif
}

// ---------------------------------------------------------------------------------------------
// mma.sync.aligned.m16n8k16.row.col, fp32 accumulate: D = A (16x16) * B (16x8) + D.
// Fragments of lane t, with g = t / 4 and c = 2 * (t % 4):
//   A: a[0] = (row g,   cols c..c+1)   a[1] = (row g+8, cols c..c+1)
//      a[2] = (row g,   cols c+8..c+9) a[3] = (row g+8, cols c+8..c+9)
//   B: b[0] = (rows c..c+1,   col g)   b[1] = (rows c+8..c+9, col g)
//   D: d[0], d[1] = (row g, cols c, c+1)   d[2], d[3] = (row g+8, cols c, c+1)
// ---------------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                  uint32_t b1) {
#if defined(TX_KERNELS_EMU)
  ::txemu::mma_m16n8k16(d, a, b0, b1, ::txemu::MmaType::kF16);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
#if defined(TX_KERNELS_EMU)
  ::txemu::mma_m16n8k16(d, a, b0, b1, ::txemu::MmaType::kBF16);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// ---------------------------------------------------------------------------------------------
// Reductions
// ---------------------------------------------------------------------------------------------
// Over the 4 lanes of a quad (lanes 4g..4g+3 share fragment rows g and g+8).
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
  return x;
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  return x;
}

// exp2 / log in the accumulation type (fp64 for the fp64 general kernels), and the natural
// exponential of the general backward.
__device__ __forceinline__ float fast_exp2(float x) { return exp2f(x); }
__device__ __forceinline__ double fast_exp2(double x) { return exp2(x); }
__device__ __forceinline__ float fast_log(float x) { return logf(x); }
__device__ __forceinline__ double fast_log(double x) { return log(x); }
__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }

}  // namespace attn
}  // namespace tx_kernels
