// device.h: what a .cu file of csrc/kernels sees in place of the CUDA compiler when it is built for
// the CPU emulator (the build force-includes this header: g++ -x c++ -include csrc/emu/device.h).
//
// The toolkit's own cuda_runtime.h / cuda_fp16.h / cuda_bf16.h provide the host types (dim3,
// float4, __half and __nv_bfloat16 with their conversions and operators); this header adds the
// CUDA built-ins that only nvcc knows (threadIdx and friends, barriers, shuffles, atomics, the
// fast-math intrinsics) as calls into the harness (runtime.h). The three source-level hooks the
// kernels use (TX_LAUNCH, TX_SHARED, TX_DYNAMIC_SHARED; see csrc/kernels/target.cuh) and the
// emulated bodies of the inline-PTX wrappers key on TX_KERNELS_EMU.
#pragma once

#define TX_KERNELS_EMU 1

// Empty before the toolkit headers see them: host_defines.h keeps a definition it finds.
#define __host__
#define __device__
#define __global__
#define __launch_bounds__(...)

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "runtime.h"

#define threadIdx (::txemu::thread_idx())
#define blockIdx (::txemu::block_idx())
#define blockDim (::txemu::block_dim())
#define gridDim (::txemu::grid_dim())
#define warpSize 32

inline void __syncthreads() { ::txemu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::txemu::syncwarp(mask); }

namespace txemu {
template <typename T>
inline T shfl_as(unsigned mask, T value, ShflMode mode, int arg, int width) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a 1..8-byte value");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = shfl(mask, bits, static_cast<int>(sizeof(T)), mode, arg, width);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}
}  // namespace txemu

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  return ::txemu::shfl_as(mask, v, ::txemu::ShflMode::kIdx, src_lane, width);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return ::txemu::shfl_as(mask, v, ::txemu::ShflMode::kXor, lane_mask, width);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::txemu::shfl_as(mask, v, ::txemu::ShflMode::kDown, static_cast<int>(delta), width);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::txemu::shfl_as(mask, v, ::txemu::ShflMode::kUp, static_cast<int>(delta), width);
}

inline float atomicAdd(float* p, float v) { return ::txemu::atomic_add(p, v); }
inline double atomicAdd(double* p, double v) { return ::txemu::atomic_add(p, v); }
inline int atomicAdd(int* p, int v) { return ::txemu::atomic_add(p, v); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return ::txemu::atomic_add(p, v); }

template <typename T>
inline T __ldg(const T* p) { return *p; }

// Fast-math intrinsics: the accurate libm function (the GPU's approximations differ in the last
// bits; the tests' tolerances are those of the reference comparison, not bit equality).
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline float __tanhf(float x) { return std::tanh(x); }

// cuda_runtime.h declares this overload for nvcc only.
template <typename... P>
inline cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}

inline size_t __cvta_generic_to_shared(const void* p) { return reinterpret_cast<size_t>(p); }

namespace txemu {
// TX_LAUNCH(kernel, grid, block, smem, stream)(args...): packs the arguments as the kernel's
// parameter types (as a <<<>>> launch converts them) and runs the grid before returning.
template <typename... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;

  Launch(void (*k)(P...), dim3 g, dim3 b, size_t s, cudaStream_t st)
      : kernel(k), grid(g), block(b), smem(s), stream(st) {}

  struct Packed {
    void (*kernel)(P...);
    std::tuple<std::decay_t<P>...> args;
  };

  // Copies the parameters into the fiber's own frame, as a GPU gives each thread its own view.
  __attribute__((no_sanitize("thread"))) static void trampoline(const void* packed) {
    const Packed& p = *static_cast<const Packed*>(packed);
    std::apply(p.kernel, p.args);
  }

  template <typename... A>
  void operator()(A&&... args) const {
    const Packed packed{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
    ::txemu::launch(reinterpret_cast<const void*>(kernel), grid, block, smem, stream, &trampoline,
                    &packed, sizeof(packed));
  }
};
template <typename... P>
Launch(void (*)(P...), dim3, dim3, size_t, cudaStream_t) -> Launch<P...>;
}  // namespace txemu
