// internal.h: the harness's own state, shared by its translation units (never by kernel code).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>

#include "runtime.h"

namespace txemu {

// ---- fibers (fiber.cpp) ----------------------------------------------------------------------
struct Context {
  void* sp = nullptr;  // saved stack pointer; everything else lives on the stack
};
// Saves the running context into `from` and resumes `to`.
void switch_context(Context* from, Context* to);
// Prepares `ctx` to run entry(arg) on [stack, stack + bytes) when first switched to.
void make_context(Context* ctx, char* stack, size_t bytes, void (*entry)(void*), void* arg);

// ---- one launch ------------------------------------------------------------------------------
enum class Severity { kFatal, kError };

struct LaunchState {
  const void* kernel = nullptr;
  dim3 grid, block;
  size_t dynamic_smem = 0;
  Trampoline trampoline = nullptr;
  const void* args = nullptr;
  size_t args_bytes = 0;
  DeviceDesc device;
  std::vector<Buffer> buffers;

  std::atomic<int64_t> next_block{0};
  uint64_t block_stride = 1, block_offset = 0;  // block i of the schedule is (i * stride + offset) % blocks
  std::atomic<bool> fatal{false};
  std::mutex report_mutex;
  std::vector<std::string> reports;  // the first few, deduplicated by `seen`
  std::vector<std::string> seen;
  int64_t report_count = 0;
  cudaError_t error = cudaSuccess;
};

enum class FiberState : uint8_t { kRunnable, kBarrier, kWarp, kExited, kDead };

struct CpAsyncCopy {
  void* dst;
  const void* src;
  int bytes, src_bytes;
  const void* pc;
};

struct Block;

struct Fiber {
  Context ctx;
  char* stack = nullptr;
  size_t stack_bytes = 0;
  int tid = 0;  // linear thread index in the block
  uint3 idx{};
  FiberState state = FiberState::kRunnable;
  Block* block = nullptr;
  std::vector<CpAsyncCopy> cp_pending;  // issued, not yet copied
  std::vector<size_t> cp_group_ends;    // committed groups: end index into cp_pending
  void* coll_out = nullptr;             // where a collective's result for this lane goes
};

enum class Collective : uint8_t { kNone, kSyncWarp, kShfl, kLdmatrix, kMma };

struct CollectiveIn {
  uint64_t value = 0;  // shfl
  int bytes = 0, arg = 0, width = 32;
  ShflMode mode = ShflMode::kIdx;
  const void* address = nullptr;  // ldmatrix
  bool trans = false;
  uint32_t a[4] = {0, 0, 0, 0}, b[2] = {0, 0};  // mma
  float c[4] = {0, 0, 0, 0};
  MmaType type = MmaType::kF16;
  const void* pc = nullptr;
};

struct Warp {
  Collective op = Collective::kNone;
  unsigned mask = 0, arrived = 0;
  uint32_t sync_count = 0;  // __syncwarp executions: orders shared accesses of its lanes
  CollectiveIn in[32];
};

struct SharedRegion {
  uintptr_t lo = 0, hi = 0;
  const char* file = nullptr;  // static __shared__: where it is declared; nullptr: dynamic
  int line = 0;
};

// Per-byte shadow of shared memory: who wrote and read it since the last barrier.
struct ShadowByte {
  uint32_t gen = 0;  // the block generation this entry belongs to; stale entries are fresh
  uint32_t w_epoch = 0, r_epoch = 0;
  uint32_t r_warps = 0;  // warps that read it in r_epoch
  uint16_t w_tid = 0, r_tid = 0;
  uint32_t w_wsync = 0, r_wsync = 0;
  const void* w_pc = nullptr;
  const void* r_pc = nullptr;
  bool written = false;
};

struct Block {
  LaunchState* launch = nullptr;
  Context* scheduler = nullptr;  // the worker's context, resumed whenever a fiber blocks
  Fiber* fibers = nullptr;       // nthreads of them
  uint3 idx{};
  dim3 dim;
  int nthreads = 0, live = 0, arrived = 0, exited = 0;
  uint32_t epoch = 0;  // completed __syncthreads
  uint32_t gen = 0;
  bool aborted = false;
  Warp warps[32];
  // Shared memory: the worker's arena holds the dynamic buffer, then the static arrays.
  char* arena = nullptr;
  size_t arena_bytes = 0;
  uintptr_t static_next = 0;
  size_t static_bytes = 0;
  std::vector<SharedRegion> regions;  // [0] is the dynamic buffer
  ShadowByte* shadow = nullptr;
};

// A worker thread's reusable fibers, shared-memory arena and shadow.
struct Worker {
  std::vector<Fiber> fibers;
  Context scheduler;
  Block block;
  std::vector<char> arena_storage;
  std::vector<ShadowByte> shadow;
};

extern thread_local Fiber* tls_fiber __attribute__((tls_model("initial-exec")));

// ---- checks.cpp --------------------------------------------------------------------------------
// Shared or global access of `bytes` at `p` by the running fiber (no-op outside fibers).
void check_access(const void* p, size_t bytes, bool write, const void* pc);
// An access on behalf of fiber `f` to what must be shared memory (ldmatrix rows, cp.async
// destinations) or global memory (cp.async sources).
void check_shared_by(Fiber* f, const void* p, size_t bytes, bool write, const void* pc);
void check_global_by(Fiber* f, const void* p, size_t bytes, bool write, const void* pc);
void set_last_error(cudaError_t err, const std::string& report_text);
const std::vector<Buffer>& call_buffers();
cudaError_t set_func_max_dynamic_smem(const void* kernel, int bytes);
// Records a finding of the launch (thread-safe; deduplicated; the first few kept in full).
void record(LaunchState& L, Severity severity, cudaError_t error, const std::string& what, const void* pc);
// Records a finding of the running fiber; kFatal also ends its block (and does not return).
void report(Severity severity, cudaError_t error, const std::string& what, const void* pc);
std::string describe_thread(const Fiber* f);
std::string source_line(const void* pc);
// Leaves the running fiber for good (after a fatal report).
[[noreturn]] void abandon_fiber();

}  // namespace txemu
