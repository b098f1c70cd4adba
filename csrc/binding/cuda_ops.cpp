// cuda_ops.cpp: the CUDA backend of the tx_kernels operators (schemas in registry.cpp): the shared
// implementations of device_ops.h over the real device, its current stream and the launchers of
// csrc/kernels.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime_api.h>

#include "../kernels/launchers.h"
#include "device_ops.h"

namespace tx_kernels::binding {
namespace {

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK_TYPE(err != cudaErrorNotSupported, "tx_kernels: ", op,
                   " has no CUDA kernel for these arguments' dtype (", cudaGetErrorString(err), ")");
  TORCH_CHECK(err == cudaSuccess, "tx_kernels: CUDA kernel of ", op, " failed: ",
              cudaGetErrorString(err), " (", static_cast<int>(err), ")");
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

struct Cuda {
  struct Guard {
    explicit Guard(const at::Tensor& t) : guard(t.device()) {}
    c10::cuda::CUDAGuard guard;
  };

  static void check_on_device(const at::Tensor& t, const char* name) {
    TORCH_CHECK_VALUE(t.is_cuda(), "tx_kernels: `", name, "` must be a CUDA tensor here, got one on ",
                      t.device());
  }

  // Properties of the current device (the guard has already been set). Read with
  // cudaDeviceGetAttribute, a cheap host-side query, rather than at::cuda::getCurrentDeviceProperties:
  // its header (ATen/cuda/CUDAContext.h) pulls in cuBLAS/cuSPARSE/cuSOLVER headers, which this
  // binding does not need and which CPU-only machines lack, so the file could not be
  // syntax-checked there.
  static DeviceInfo info() {
    int device = 0;
    check_launch(cudaGetDevice(&device), "a device query");
    int sms = 0, smem = 0;
    check_launch(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "a device query");
    check_launch(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
                 "a device query");
    return DeviceInfo{sms, static_cast<int64_t>(smem)};
  }

  template <typename Params>
  static size_t workspace_bytes(const Params& p, const DeviceInfo& d) {
    return launcher_of(p).workspace_bytes(p, d);
  }
  template <typename Params>
  static void launch(const Params& p, const DeviceInfo& d, void* ws, size_t bytes) {
    const auto entry = launcher_of(p);
    check_launch(entry.launch(p, d, ws, bytes, current_stream()), entry.op);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(tx_kernels, CUDA, m) { DeviceOps<Cuda>::register_impls(m); }

}  // namespace tx_kernels::binding
