// target.cuh: the three places where a kernel source differs between its two builds, nvcc for a
// GPU and the host compiler for the CPU emulator (csrc/emu, which defines TX_KERNELS_EMU):
//   TX_LAUNCH(kernel, grid, block, smem, stream)(args...)   a <<<grid, block, smem, stream>>> launch
//   TX_SHARED(type, name);                                  a static __shared__ variable or array
//                                                           (type includes the extents: float[32])
//   TX_DYNAMIC_SHARED(type, name);                          the extern __shared__ buffer, 16-byte aligned
// The inline-PTX wrappers of attention_kernel_utils.cuh are the only other such place. Kernel
// bodies are one source for both targets.
#pragma once

namespace tx_kernels {
template <typename T>
using SharedType = T;  // lets an array type such as float[32] be written before the name
}  // namespace tx_kernels

#if defined(TX_KERNELS_EMU)
#define TX_LAUNCH(kernel, grid, block, smem, stream) ::txemu::Launch(kernel, grid, block, smem, stream)
#define TX_SHARED(type, name)                                                                   \
  ::tx_kernels::SharedType<type>& name = *static_cast<::tx_kernels::SharedType<type>*>(         \
      ::txemu::static_shared(__FILE__, __LINE__, sizeof(::tx_kernels::SharedType<type>),       \
                             alignof(::tx_kernels::SharedType<type>)))
#define TX_DYNAMIC_SHARED(type, name) type* const name = static_cast<type*>(::txemu::dynamic_shared())
#else
#define TX_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#define TX_SHARED(type, name) __shared__ ::tx_kernels::SharedType<type> name
#define TX_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#endif
