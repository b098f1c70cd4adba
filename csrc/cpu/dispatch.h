// dispatch.h: from a params DType to a C++ element type, once for every CPU kernel entry point.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include "../kernels/params.h"

namespace tx_kernels::cpu {

// Calls fn(T{}) with T the element type of `dtype` (float, double, c10::BFloat16, c10::Half);
// fn reads the type off its argument: [&](auto tag) { impl<decltype(tag)>(params); }.
template <typename Fn>
void dispatch_floating(DType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: return fn(float{});
    case DType::kFloat64: return fn(double{});
    case DType::kBFloat16: return fn(c10::BFloat16{});
    case DType::kFloat16: return fn(c10::Half{});
    default: TORCH_CHECK_TYPE(false, "tx_kernels: ", op, ": unsupported dtype");
  }
}

}  // namespace tx_kernels::cpu
