// emu_ops.cpp: the CUDA emulator backend, torch.ops.tx_kernels_emu.* on CPU tensors: the CUDA
// backend's own implementations (device_ops.h) calling the CUDA kernels built for the CPU
// execution harness (csrc/emu). That library is built for tests only (tx_kernels/emu.py) and
// loaded at run time by tx_kernels_emu::_load, so a normal build compiles none of it.
#include <dlfcn.h>

#include <mutex>
#include <string>

#include "../emu/api.h"
#include "device_ops.h"
#include "registry.h"

namespace tx_kernels::binding {
namespace {

// The loaded library and the emulated device: process state of this backend, set from Python.
struct EmuState {
  std::mutex mutex;
  const emu::Api* api = nullptr;
  std::string device_name = "H100";
  emu::Device device{nullptr, 132, 232448};
};

EmuState& state() {
  static EmuState s;
  return s;
}

const emu::Api& api() {
  const emu::Api* a = state().api;
  TORCH_CHECK(a != nullptr,
              "tx_kernels: the CUDA emulator is not loaded; call tx_kernels.emu.load() first (it builds "
              "csrc/kernels for the CPU execution harness)");
  return *a;
}

emu::Device device() {
  emu::Device d = state().device;
  d.name = state().device_name.c_str();
  return d;
}

void check_launch(const emu::Api& a, int err, const char* op) {
  constexpr int kNotSupported = 801;  // cudaErrorNotSupported
  TORCH_CHECK_TYPE(err != kNotSupported, "tx_kernels: ", op,
                   " has no CUDA kernel for these arguments' dtype (", a.error_string(err), ")");
  TORCH_CHECK(err == 0, "tx_kernels: CUDA kernel of ", op, " failed: ", a.error_string(err), " (",
              err, ")");
}

struct Emulator {
  struct Guard {
    explicit Guard(const at::Tensor&) {}
  };

  static void check_on_device(const at::Tensor& t, const char* name) {
    TORCH_CHECK_VALUE(t.device().is_cpu(), "tx_kernels: `", name,
                      "` must be a CPU tensor for the CUDA emulator, got one on ", t.device());
    api();
  }

  static DeviceInfo info() { return DeviceInfo{state().device.num_sms, state().device.max_smem_per_block_optin}; }

  // The emulated launch describes the device itself (device(), which info() mirrors).
  template <typename Params>
  static size_t workspace_bytes(const Params& p, const DeviceInfo&) {
    return emu::entry_of(api(), p).workspace_bytes(p, device());
  }
  template <typename Params>
  static void launch(const Params& p, const DeviceInfo&, void* ws, size_t bytes) {
    const auto entry = emu::entry_of(api(), p);
    check_launch(api(), entry.launch(p, ws, bytes, device()), entry.op);
  }
};

void load(c10::string_view path) {
  const std::string file(path);
  void* handle = dlopen(file.c_str(), RTLD_NOW | RTLD_LOCAL);
  TORCH_CHECK(handle != nullptr, "tx_kernels: cannot load the CUDA emulator library ", file, ": ", dlerror());
  auto entry = reinterpret_cast<const emu::Api* (*)()>(dlsym(handle, "tx_kernels_emu_api"));
  TORCH_CHECK(entry != nullptr, "tx_kernels: ", file, " is not a CUDA emulator library");
  const emu::Api* a = entry();
  TORCH_CHECK(a->version == emu::kApiVersion, "tx_kernels: ", file, " has emulator API version ",
              a->version, ", this build expects ", emu::kApiVersion, "; rebuild it");
  std::lock_guard<std::mutex> lock(state().mutex);
  state().api = a;
}

void set_device(c10::string_view name, int64_t num_sms, int64_t max_smem_per_block_optin) {
  TORCH_CHECK_VALUE(num_sms > 0 && max_smem_per_block_optin >= 48 * 1024,
                    "tx_kernels: an emulated device needs num_sms > 0 and at least 48 KiB of shared memory");
  std::lock_guard<std::mutex> lock(state().mutex);
  state().device_name = std::string(name);
  state().device.num_sms = static_cast<int>(num_sms);
  state().device.max_smem_per_block_optin = max_smem_per_block_optin;
}

}  // namespace

TORCH_LIBRARY(tx_kernels_emu, m) {
  define_ops(m);
  m.def("_load(str path) -> ()", &load);
  m.def("_set_device(str name, int num_sms, int max_smem_per_block_optin) -> ()", &set_device);
}

TORCH_LIBRARY_IMPL(tx_kernels_emu, CPU, m) { DeviceOps<Emulator>::register_impls(m); }

}  // namespace tx_kernels::binding
