// dispatch.cuh: from the run-time values of a params struct (dtype, booleans) to the template
// arguments of the kernels, once per launcher; csrc/cpu/dispatch.h is the CPU counterpart.
//   dispatch_dtype(dtype, fn)           fn(Tag<T>{}) with T float, __half, __nv_bfloat16, double
//   dispatch_dtype<false>(dtype, fn)    the same without double (fp32-statistics kernels)
//   dispatch_bool(value, fn)            fn(std::integral_constant<bool, value>{})
//   element_bytes(dtype)                bytes per element, for plans made before T is known
//   dispatch_head_dim<kMax>(D, fn)      fn(std::integral_constant<int, D>{}) for D one of
//                                       AttentionHeadDims up to kMax (pick_head_dim chooses it)
// fn reads the type off its argument: [&](auto tag) { using T = typename decltype(tag)::type; }.
// A dtype outside the list is cudaErrorNotSupported, which the bindings report as a dtype error.
#pragma once

#include <cstdint>
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

// Bytes per element of a floating dtype (0 otherwise), for plans made before a type is chosen.
constexpr int element_bytes(DType dtype) {
  return dtype == DType::kFloat32 ? 4 : dtype == DType::kFloat64 ? 8
       : (dtype == DType::kFloat16 || dtype == DType::kBFloat16) ? 2 : 0;
}

template <typename Fn>
cudaError_t dispatch_bool(bool value, Fn&& fn) {
  return value ? fn(std::true_type{}) : fn(std::false_type{});
}

template <typename T>
inline constexpr bool kIs16Bit = std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

// The accumulation type of a kernel that computes in its inputs' precision or better: fp64 for
// fp64, fp32 for everything else.
template <typename T>
using AccType = std::conditional_t<std::is_same_v<T, double>, double, float>;

// The one list of head dimensions the attention tensor-core kernels are instantiated for. A head
// dim with E % 8 == 0 up to one of them runs on the next one up, zero-padded (the cp.async zero
// fill), which changes no score and no written output.
template <int... Ds>
struct HeadDimList {};
using AttentionHeadDims = HeadDimList<32, 64, 96, 128, 256>;

// The smallest instantiated head dim >= E that is at most kMaxDim, or 0.
template <int kMaxDim, int... Ds>
constexpr int pick_head_dim(int64_t E, HeadDimList<Ds...>) {
  int picked = 0;
  ((picked == 0 && E <= Ds && Ds <= kMaxDim ? (picked = Ds) : 0), ...);
  return picked;
}
template <int kMaxDim>
constexpr int pick_head_dim(int64_t E) {
  return pick_head_dim<kMaxDim>(E, AttentionHeadDims{});
}

template <int kMaxDim, typename Fn, int... Ds>
cudaError_t dispatch_head_dim(int D, Fn&& fn, HeadDimList<Ds...>) {
  cudaError_t err = cudaErrorNotSupported;
  auto one = [&](auto d) {
    if constexpr (decltype(d)::value <= kMaxDim) {
      if (D == decltype(d)::value) err = fn(d);
    }
  };
  (one(std::integral_constant<int, Ds>{}), ...);
  return err;
}
template <int kMaxDim, typename Fn>
cudaError_t dispatch_head_dim(int D, Fn&& fn) {
  return dispatch_head_dim<kMaxDim>(D, fn, AttentionHeadDims{});
}

}  // namespace tx_kernels::cuda
