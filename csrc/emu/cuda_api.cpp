// cuda_api.cpp: the CUDA runtime calls the launchers make, answered by the harness. Hidden, so a
// process that also loads the real libcudart (a GPU machine running both backends) keeps both.
#include <cstring>
#include <string>

#include "internal.h"

namespace txemu {

namespace {
thread_local cudaError_t tls_error = cudaSuccess;
thread_local cudaError_t tls_reported_error = cudaSuccess;
thread_local std::string tls_report;
thread_local std::string tls_message;

const char* plain_name(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorMisalignedAddress: return "misaligned address";
    case cudaErrorNotSupported: return "operation not supported";
    case cudaErrorInvalidDeviceFunction: return "invalid device function";
    default: return "unknown error";
  }
}
}  // namespace

void set_last_error(cudaError_t err, const std::string& report_text) {
  tls_error = err;
  tls_reported_error = err;
  tls_report = report_text;
}

const char* last_report() { return tls_report.c_str(); }

}  // namespace txemu

#define TXEMU_API extern "C" __attribute__((visibility("hidden")))

TXEMU_API cudaError_t cudaGetLastError() {
  const cudaError_t err = txemu::tls_error;
  txemu::tls_error = cudaSuccess;
  return err;
}

TXEMU_API cudaError_t cudaPeekAtLastError() { return txemu::tls_error; }

// The launch's findings travel with its error code, so a binding that prints
// cudaGetErrorString(err) shows them.
TXEMU_API const char* cudaGetErrorString(cudaError_t err) {
  if (err != cudaSuccess && err == txemu::tls_reported_error && !txemu::tls_report.empty()) {
    txemu::tls_message = std::string(txemu::plain_name(err)) + " [CUDA emulator: " + txemu::tls_report + "]";
    return txemu::tls_message.c_str();
  }
  return txemu::plain_name(err);
}

TXEMU_API const char* cudaGetErrorName(cudaError_t err) { return txemu::plain_name(err); }

TXEMU_API cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  switch (attr) {
    case cudaFuncAttributeMaxDynamicSharedMemorySize: return txemu::set_func_max_dynamic_smem(func, value);
    case cudaFuncAttributePreferredSharedMemoryCarveout:
      return value >= -1 && value <= 100 ? cudaSuccess : cudaErrorInvalidValue;
    default: return cudaErrorInvalidValue;
  }
}

TXEMU_API cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t) {
  const uintptr_t lo = reinterpret_cast<uintptr_t>(ptr);
  for (const txemu::Buffer& b : txemu::call_buffers()) {
    const uintptr_t blo = reinterpret_cast<uintptr_t>(b.ptr);
    if (lo >= blo && lo + count <= blo + b.bytes) {
      std::memset(ptr, value, count);
      return cudaSuccess;
    }
  }
  txemu::set_last_error(cudaErrorInvalidValue, "cudaMemsetAsync of " + std::to_string(count) +
                                                   " bytes outside every buffer of the call");
  return cudaErrorInvalidValue;
}
