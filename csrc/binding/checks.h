// checks.h: argument checks shared by every binding. Each failure raises a Python exception
// (ValueError or TypeError through TORCH_CHECK_VALUE / TORCH_CHECK_TYPE) that names the argument.
#pragma once

#include <initializer_list>
#include <string>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "../kernels/params.h"

namespace tx_kernels::binding {

inline void check_defined(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), "tx_kernels: `", name, "` must be a tensor, got None");
}

inline void check_dim(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK_VALUE(t.dim() == dim, "tx_kernels: `", name, "` must have ", dim,
                    " dimensions, got shape ", t.sizes());
}

inline void check_floating(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble,
                   "tx_kernels: `", name,
                   "` must be float32, float16, bfloat16 or float64, got ", s);
}

inline void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref,
                             const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "tx_kernels: `", name, "` has dtype ",
                   t.scalar_type(), " but `", ref_name, "` has dtype ", ref.scalar_type(),
                   "; they must match");
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref,
                              const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "tx_kernels: `", name, "` is on ", t.device(),
                    " but `", ref_name, "` is on ", ref.device(), "; they must be on one device");
}

inline void check_size(const at::Tensor& t, const char* name, int64_t dim, int64_t expected,
                       const char* what) {
  TORCH_CHECK_VALUE(t.size(dim) == expected, "tx_kernels: `", name, "` has size ", t.size(dim),
                    " in dimension ", dim, " (", what, "), expected ", expected, "; shape ",
                    t.sizes());
}

// The type in which kernels take parameters and write statistics, logsumexp and parameter
// gradients for data of type `s` (params.h): fp64 for fp64, so fp64 stays fp64-accurate end to
// end; fp32 otherwise.
inline at::ScalarType acc_type(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

inline DType to_dtype(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kFloat64;
    case at::kBool: return DType::kBool;
    default: TORCH_CHECK_TYPE(false, "tx_kernels: unsupported dtype ", s);
  }
}

}  // namespace tx_kernels::binding
