// dispatch.cuh: from the run-time values of a params struct (dtype, booleans) to the template
// arguments of the kernels, once per launcher; csrc/cpu/dispatch.h is the CPU counterpart.
//   dispatch_dtype(dtype, fn)           fn(Tag<T>{}) with T float, __half, __nv_bfloat16, double
//   dispatch_dtype<false>(dtype, fn)    the same without double (fp32-statistics kernels)
//   dispatch_bool(value, fn)            fn(std::integral_constant<bool, value>{})
// fn reads the type off its argument: [&](auto tag) { using T = typename decltype(tag)::type; }.
// A dtype outside the list is cudaErrorNotSupported, which the bindings report as a dtype error.
#pragma once

#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include "params.h"

namespace tx_kernels::cuda {

template <typename T>
struct Tag {
  using type = T;
};

template <bool kWithFp64 = true, typename Fn>
cudaError_t dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: return fn(Tag<float>{});
    case DType::kFloat16: return fn(Tag<__half>{});
    case DType::kBFloat16: return fn(Tag<__nv_bfloat16>{});
    case DType::kFloat64:
      if constexpr (kWithFp64) return fn(Tag<double>{});
      return cudaErrorNotSupported;
    default: return cudaErrorNotSupported;
  }
}

template <typename Fn>
cudaError_t dispatch_bool(bool value, Fn&& fn) {
  return value ? fn(std::true_type{}) : fn(std::false_type{});
}

}  // namespace tx_kernels::cuda
