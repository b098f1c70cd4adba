// runtime.cpp: launches, the per-block scheduler, barriers and warp collectives (see runtime.h).
//
// Scheduling: a block's fibers run in thread order, each until it blocks in __syncthreads or a
// warp collective (or exits). The last thread to reach a barrier releases it; the last lane to
// reach a collective computes every participating lane's result, writes it where that lane asked
// and makes the lanes runnable again. A sweep over the block in which no fiber could run while
// some are still alive is a deadlock (e.g. lanes of one warp in different collectives, a lane
// waiting for a lane that exited) and fails the launch with the threads' states.
#include <sys/mman.h>

#include <algorithm>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <numeric>
#include <random>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "internal.h"

namespace txemu {

thread_local Fiber* tls_fiber __attribute__((tls_model("initial-exec"))) = nullptr;

namespace {

constexpr size_t kStackBytes = 64 * 1024;
constexpr size_t kGuardPage = 4096;
constexpr size_t kArenaGuard = 4096;            // unowned bytes around each shared region
constexpr size_t kMaxDynamicShared = 256 * 1024;  // above every device's opt-in limit
constexpr size_t kMaxStaticShared = 64 * 1024;
constexpr size_t kArenaBytes = kArenaGuard + kMaxDynamicShared + kArenaGuard + kMaxStaticShared + kArenaGuard;

// ---- the call scope (host thread) ----
struct CallScope {
  DeviceDesc device;
  std::vector<Buffer> buffers;
};
thread_local CallScope tls_call;
thread_local std::string tls_report;

Fiber& current(const char* what) {
  if (tls_fiber == nullptr) {
    std::fprintf(stderr, "tx_kernels emulator: %s called outside an emulated kernel\n", what);
    std::abort();
  }
  return *tls_fiber;
}

void yield(Fiber& f) { switch_context(&f.ctx, f.block->scheduler); }

// ---- workers ----
char* map_stack() {
  void* p = mmap(nullptr, kStackBytes + kGuardPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    std::perror("tx_kernels emulator: mmap of a fiber stack");
    std::abort();
  }
  mprotect(p, kGuardPage, PROT_NONE);  // an overflowing fiber faults instead of corrupting another
  return static_cast<char*>(p) + kGuardPage;
}

Worker& this_worker() {
  thread_local std::unique_ptr<Worker> worker;
  if (!worker) {
    worker = std::make_unique<Worker>();
    worker->arena_storage.resize(kArenaBytes + 256);
    worker->shadow.resize(kArenaBytes);
  }
  return *worker;
}

void complete_cp_async_group(Fiber& f, size_t end);
std::string state_name(const Fiber& f, const Block& b);

// Completes a __syncthreads. One that waits for threads which have exited is divergent: the
// programming guide leaves it undefined (sm_70+ hardware happens to count exited threads as
// arrived), so it is reported rather than relied on.
void release_barrier(Block& b) {
  if (b.exited > 0) {
    std::ostringstream os;
    os << "divergent barrier: __syncthreads in block (" << b.idx.x << "," << b.idx.y << "," << b.idx.z
       << ") completed after " << b.exited << " of its " << b.nthreads << " threads had exited";
    record(*b.launch, Severity::kError, cudaErrorLaunchFailure, os.str(), nullptr);
  }
  b.arrived = 0;
  ++b.epoch;
  for (int t = 0; t < b.nthreads; ++t) {
    if (b.fibers[t].state == FiberState::kBarrier) b.fibers[t].state = FiberState::kRunnable;
  }
}

void fiber_main(void* arg) {
  Fiber& f = *static_cast<Fiber*>(arg);
  Block& b = *f.block;
  b.launch->trampoline(b.launch->args);
  // Copies still in flight land eventually on the hardware too.
  if (!f.cp_pending.empty()) complete_cp_async_group(f, f.cp_pending.size());
  f.cp_group_ends.clear();
  const Warp& w = b.warps[f.tid >> 5];
  if (w.arrived != 0 && (w.mask >> (f.tid & 31) & 1u)) {
    report(Severity::kFatal, cudaErrorLaunchFailure,
           "invalid warp collective: " + describe_thread(&f) + " exits while lanes of its warp wait for it in " +
               state_name(b.fibers[(f.tid & ~31) + __builtin_ctz(w.arrived)], b) + ", which has exited",
           nullptr);
  }
  f.state = FiberState::kExited;
  --b.live;
  ++b.exited;
  if (b.arrived > 0 && b.arrived >= b.live) release_barrier(b);
  switch_context(&f.ctx, b.scheduler);
  std::abort();  // an exited fiber is never resumed
}

std::string state_name(const Fiber& f, const Block& b) {
  switch (f.state) {
    case FiberState::kBarrier: return "__syncthreads";
    case FiberState::kWarp: {
      static const char* names[] = {"-", "__syncwarp", "a shuffle", "ldmatrix", "mma.sync"};
      const Warp& w = b.warps[f.tid >> 5];
      char buf[96];
      std::snprintf(buf, sizeof buf, "%s (mask 0x%08x, arrived 0x%08x)", names[static_cast<int>(w.op)], w.mask, w.arrived);
      return buf;
    }
    case FiberState::kExited: return "exited";
    default: return "runnable";
  }
}

void report_deadlock(Block& b) {
  std::ostringstream os;
  os << "deadlock: block (" << b.idx.x << "," << b.idx.y << "," << b.idx.z << "): no thread can proceed;";
  int shown = 0;
  for (int t = 0; t < b.nthreads && shown < 8; ++t) {
    const Fiber& f = b.fibers[t];
    if (f.state == FiberState::kExited) continue;
    os << " thread " << t << " waits in " << state_name(f, b) << ";";
    ++shown;
  }
  os << " " << b.exited << " of " << b.nthreads << " threads have exited";
  record(*b.launch, Severity::kFatal, cudaErrorLaunchFailure, os.str(), nullptr);
  b.launch->fatal = true;
  b.aborted = true;
}

void run_block(Worker& w, LaunchState& L, int64_t linear) {
  Block& b = w.block;
  b.launch = &L;
  b.scheduler = &w.scheduler;
  const int64_t gx = L.grid.x, gy = L.grid.y;
  b.idx = uint3{static_cast<unsigned>(linear % gx), static_cast<unsigned>((linear / gx) % gy),
                static_cast<unsigned>(linear / (gx * gy))};
  b.dim = L.block;
  b.nthreads = static_cast<int>(L.block.x * L.block.y * L.block.z);
  b.live = b.nthreads;
  b.arrived = b.exited = 0;
  b.epoch = 0;
  ++b.gen;
  b.aborted = false;
  for (Warp& wp : b.warps) {
    wp.op = Collective::kNone;
    wp.mask = wp.arrived = 0;
    wp.sync_count = 0;
  }
  // Shared memory: the dynamic buffer ends exactly where the launch said, then a guard gap.
  char* base = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(w.arena_storage.data()) + 255) & ~uintptr_t{255});
  b.arena = base;
  b.arena_bytes = kArenaBytes;
  b.shadow = w.shadow.data();
  char* dyn = base + kArenaGuard;
  std::memset(dyn, 0xFF, L.dynamic_smem);  // NaN in every float type
  b.regions.clear();
  b.regions.push_back(SharedRegion{reinterpret_cast<uintptr_t>(dyn), reinterpret_cast<uintptr_t>(dyn) + L.dynamic_smem, nullptr, 0});
  b.static_next = reinterpret_cast<uintptr_t>(base) + kArenaGuard + kMaxDynamicShared + kArenaGuard;
  b.static_bytes = 0;

  if (w.fibers.size() < static_cast<size_t>(b.nthreads)) w.fibers.resize(b.nthreads);
  b.fibers = w.fibers.data();
  for (int t = 0; t < b.nthreads; ++t) {
    Fiber& f = w.fibers[t];
    if (f.stack == nullptr) {
      f.stack = map_stack();
      f.stack_bytes = kStackBytes;
    }
    f.tid = t;
    f.idx = uint3{static_cast<unsigned>(t % L.block.x), static_cast<unsigned>((t / L.block.x) % L.block.y),
                  static_cast<unsigned>(t / (L.block.x * L.block.y))};
    f.state = FiberState::kRunnable;
    f.block = &b;
    f.cp_pending.clear();
    f.cp_group_ends.clear();
    f.coll_out = nullptr;
    make_context(&f.ctx, f.stack, f.stack_bytes, &fiber_main, &f);
  }

  while (b.live > 0 && !b.aborted) {
    bool ran = false;
    for (int t = 0; t < b.nthreads && !b.aborted; ++t) {
      Fiber& f = w.fibers[t];
      if (f.state != FiberState::kRunnable) continue;
      tls_fiber = &f;
      switch_context(&w.scheduler, &f.ctx);
      tls_fiber = nullptr;
      ran = true;
    }
    if (!ran && b.live > 0 && !b.aborted) report_deadlock(b);
  }
}

// ---- the worker pool: the calling thread plus TX_KERNELS_EMU_THREADS - 1 helpers ----
class Pool {
 public:
  static Pool& get() {
    static Pool* pool = new Pool();  // never destroyed: its threads outlive static destructors
    return *pool;
  }

  void run(LaunchState& L, int64_t blocks) {
    std::lock_guard<std::mutex> one_launch(launch_mutex_);
    const int helpers = static_cast<int>(std::min<int64_t>(static_cast<int64_t>(threads_.size()), blocks - 1));
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &L;
      job_blocks_ = blocks;
      wanted_ = helpers;
      busy_ = helpers;
      ++generation_;
    }
    cv_.notify_all();
    work(L, blocks);
    std::unique_lock<std::mutex> lock(mutex_);
    done_cv_.wait(lock, [&] { return busy_ == 0; });
    job_ = nullptr;
  }

 private:
  Pool() {
    int n = static_cast<int>(std::thread::hardware_concurrency());
    if (const char* env = std::getenv("TX_KERNELS_EMU_THREADS")) n = std::atoi(env);
    n = std::max(1, std::min(n, 16));
    for (int i = 1; i < n; ++i) threads_.emplace_back([this, i] { loop(i); });
    for (auto& t : threads_) t.detach();
  }

  static void work(LaunchState& L, int64_t blocks) {
    Worker& w = this_worker();
    for (;;) {
      if (L.fatal.load()) break;
      const int64_t i = L.next_block.fetch_add(1);
      if (i >= blocks) break;
      run_block(w, L, static_cast<int64_t>((static_cast<uint64_t>(i) * L.block_stride + L.block_offset) % static_cast<uint64_t>(blocks)));
    }
  }

  void loop(int index) {
    uint64_t seen = 0;
    for (;;) {
      LaunchState* job;
      int64_t blocks;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        cv_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (index > wanted_) continue;
        job = job_;
        blocks = job_blocks_;
      }
      work(*job, blocks);
      {
        std::lock_guard<std::mutex> lock(mutex_);
        --busy_;
      }
      done_cv_.notify_all();
    }
  }

  std::vector<std::thread> threads_;
  std::mutex launch_mutex_, mutex_;
  std::condition_variable cv_, done_cv_;
  LaunchState* job_ = nullptr;
  int64_t job_blocks_ = 0;
  int wanted_ = 0, busy_ = 0;
  uint64_t generation_ = 0;
};

// ---- per-function attributes (cudaFuncSetAttribute), per emulated device ----
std::mutex attr_mutex;
std::map<std::pair<const void*, std::string>, int> max_dynamic_smem;

}  // namespace

// ---- the call scope ----
void set_call(const DeviceDesc& device, const Buffer* buffers, int count) {
  tls_call.device = device;
  tls_call.buffers.assign(buffers, buffers + count);
}
void clear_call() {
  tls_call.buffers.clear();
  tls_call.device = DeviceDesc{};
}
const DeviceDesc& current_device() { return tls_call.device; }
const std::vector<Buffer>& call_buffers() { return tls_call.buffers; }

cudaError_t set_func_max_dynamic_smem(const void* kernel, int bytes) {
  const DeviceDesc& dev = current_device();
  if (bytes < 0 || bytes > dev.max_smem_per_block_optin) return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lock(attr_mutex);
  max_dynamic_smem[{kernel, dev.name}] = bytes;
  return cudaSuccess;
}

// ---- built-in variables ----
uint3 thread_idx() { return current("threadIdx").idx; }
uint3 block_idx() { return current("blockIdx").block->idx; }
dim3 block_dim() { return current("blockDim").block->dim; }
dim3 grid_dim() { return current("gridDim").block->launch->grid; }

// ---- barriers ----
void syncthreads() {
  Fiber& f = current("__syncthreads");
  Block& b = *f.block;
  ++b.arrived;
  if (b.arrived >= b.live) {
    release_barrier(b);
    return;
  }
  f.state = FiberState::kBarrier;
  yield(f);
}

// ---- warp collectives ----
namespace {

float b16_to_float(uint16_t bits, MmaType type) {
  if (type == MmaType::kBF16) {
    const uint32_t w = static_cast<uint32_t>(bits) << 16;
    float out;
    std::memcpy(&out, &w, 4);
    return out;
  }
  __half_raw raw;
  raw.x = bits;
  return __half2float(__half(raw));
}

void compute_shfl(Block& b, Warp& w, int warp) {
  for (int lane = 0; lane < 32; ++lane) {
    if (!(w.mask >> lane & 1u)) continue;
    const CollectiveIn& in = w.in[lane];
    const int width = in.width;
    const int base = lane & ~(width - 1);
    int src = lane;
    switch (in.mode) {
      case ShflMode::kIdx: src = base + (in.arg & (width - 1)); break;
      case ShflMode::kXor: src = lane ^ in.arg; break;
      case ShflMode::kDown: src = lane + in.arg; break;
      case ShflMode::kUp: src = lane - in.arg; break;
    }
    if (src < base || src >= base + width) src = lane;  // outside the segment: own value
    if (!(w.mask >> src & 1u)) {
      report(Severity::kError, cudaErrorLaunchFailure,
             "invalid warp collective: " + describe_thread(&b.fibers[warp * 32 + lane]) + " shuffles from lane " +
                 std::to_string(src) + ", which is not in the mask (undefined value)",
             in.pc);
    }
    uint64_t v = w.in[src].value;
    std::memcpy(b.fibers[warp * 32 + lane].coll_out, &v, static_cast<size_t>(in.bytes));
  }
}

// PTX ISA, "Warp-level matrix load instruction: ldmatrix": for .x4, threads 8m..8m+7 supply the
// addresses of rows 0..7 of matrix m; each row is 8 contiguous 16-bit elements. Without .trans,
// register m of lane t holds row t/4, elements 2(t%4) and 2(t%4)+1 (lower element in the lower
// half); with .trans the matrix is read column-major: rows 2(t%4) and 2(t%4)+1 of column t/4.
void compute_ldmatrix(Block& b, Warp& w, int warp) {
  uint16_t rows[4][8][8];
  bool trans = w.in[0].trans;
  for (int lane = 0; lane < 32; ++lane) {
    const CollectiveIn& in = w.in[lane];
    Fiber* f = &b.fibers[warp * 32 + lane];
    if (in.trans != trans) {
      report(Severity::kError, cudaErrorLaunchFailure, "invalid warp collective: lanes of one warp mix ldmatrix and ldmatrix.trans", in.pc);
    }
    if (reinterpret_cast<uintptr_t>(in.address) % 16 != 0) {
      report(Severity::kFatal, cudaErrorMisalignedAddress,
             "misaligned address: " + describe_thread(f) + " gives ldmatrix a row address not 16-byte aligned", in.pc);
    }
    check_shared_by(f, in.address, 16, false, in.pc);
    std::memcpy(rows[lane / 8][lane % 8], in.address, 16);
  }
  for (int lane = 0; lane < 32; ++lane) {
    auto* out = static_cast<uint32_t*>(b.fibers[warp * 32 + lane].coll_out);
    const int q = lane % 4, r = lane / 4;
    for (int m = 0; m < 4; ++m) {
      const uint16_t lo = trans ? rows[m][2 * q][r] : rows[m][r][2 * q];
      const uint16_t hi = trans ? rows[m][2 * q + 1][r] : rows[m][r][2 * q + 1];
      out[m] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
  }
}

// PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type": with groupID = lane / 4
// and tig = lane % 4 (threadID_in_group):
//   A (16x16, .f16x2 registers a0..a3 holding elements a0..a7, lower index in the lower half):
//     element i: row groupID (i in {0,1,4,5}) or groupID + 8 (i in {2,3,6,7}),
//                col tig * 2 + (i & 1) (i < 4) or tig * 2 + 8 + (i & 1) (i >= 4)
//   B (16x8, registers b0, b1 holding elements b0..b3):
//     element i: row tig * 2 + (i & 1) (i < 2) or tig * 2 + 8 + (i & 1) (i >= 2), col groupID
//   C, D (16x8 f32, c0..c3): row groupID (i < 2) or groupID + 8 (i >= 2), col tig * 2 + (i & 1)
void compute_mma(Block& b, Warp& w, int warp) {
  float A[16][16], B[16][8], C[16][8];
  const MmaType type = w.in[0].type;
  for (int lane = 0; lane < 32; ++lane) {
    const CollectiveIn& in = w.in[lane];
    if (in.type != type) report(Severity::kError, cudaErrorLaunchFailure, "invalid warp collective: lanes of one warp mix mma types", in.pc);
    const int g = lane / 4, tig = lane % 4;
    for (int i = 0; i < 8; ++i) {
      const uint16_t bits = static_cast<uint16_t>(in.a[i / 2] >> (16 * (i & 1)));
      const int row = (i == 0 || i == 1 || i == 4 || i == 5) ? g : g + 8;
      const int col = (i < 4) ? tig * 2 + (i & 1) : tig * 2 + 8 + (i & 1);
      A[row][col] = b16_to_float(bits, type);
    }
    for (int i = 0; i < 4; ++i) {
      const uint16_t bits = static_cast<uint16_t>(in.b[i / 2] >> (16 * (i & 1)));
      const int row = (i < 2) ? tig * 2 + (i & 1) : tig * 2 + 8 + (i & 1);
      B[row][g] = b16_to_float(bits, type);
    }
    for (int i = 0; i < 4; ++i) C[(i < 2) ? g : g + 8][tig * 2 + (i & 1)] = in.c[i];
  }
  for (int lane = 0; lane < 32; ++lane) {
    auto* out = static_cast<float*>(b.fibers[warp * 32 + lane].coll_out);
    const int g = lane / 4, tig = lane % 4;
    for (int i = 0; i < 4; ++i) {
      const int row = (i < 2) ? g : g + 8, col = tig * 2 + (i & 1);
      // fp16/bf16 products are exact in double; the hardware accumulates with at least fp32
      // precision, so one rounding at the end is within its error.
      double acc = C[row][col];
      for (int k = 0; k < 16; ++k) acc += static_cast<double>(A[row][k]) * B[k][col];
      out[i] = static_cast<float>(acc);
    }
  }
  (void)b;
}

// Arrival of the calling lane at a collective; returns once the collective has completed.
void collective(Collective op, unsigned mask, const CollectiveIn& in, void* out) {
  Fiber& f = current("a warp collective");
  Block& b = *f.block;
  const int warp = f.tid >> 5, lane = f.tid & 31;
  Warp& w = b.warps[warp];
  const int lanes = std::min(32, b.nthreads - warp * 32);
  const unsigned existing = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
  if (!(mask >> lane & 1u)) {
    report(Severity::kFatal, cudaErrorLaunchFailure, "invalid warp collective: " + describe_thread(&f) + " calls a warp collective whose mask excludes itself", in.pc);
  }
  if (mask & ~existing) {
    report(Severity::kFatal, cudaErrorLaunchFailure,
           "invalid warp collective: " + describe_thread(&f) + " names lanes that do not exist (the block has " +
               std::to_string(b.nthreads) + " threads)",
           in.pc);
  }
  if (w.arrived == 0) {
    w.op = op;
    w.mask = mask;
  } else if (w.op != op || w.mask != mask) {
    report(Severity::kFatal, cudaErrorLaunchFailure,
           "invalid warp collective: " + describe_thread(&f) + " reaches a different collective (or mask) than lanes waiting in " +
               state_name(b.fibers[warp * 32 + __builtin_ctz(w.arrived)], b),
           in.pc);
  }
  for (int l = 0; l < lanes; ++l) {
    if ((mask >> l & 1u) && b.fibers[warp * 32 + l].state == FiberState::kExited) {
      report(Severity::kFatal, cudaErrorLaunchFailure,
             "invalid warp collective: " + describe_thread(&f) + " waits for lane " + std::to_string(l) + ", which has exited",
             in.pc);
    }
  }
  w.in[lane] = in;
  f.coll_out = out;
  w.arrived |= 1u << lane;
  if (w.arrived != mask) {
    f.state = FiberState::kWarp;
    yield(f);
    return;
  }
  switch (op) {
    case Collective::kSyncWarp: ++w.sync_count; break;
    case Collective::kShfl: compute_shfl(b, w, warp); break;
    case Collective::kLdmatrix: compute_ldmatrix(b, w, warp); break;
    case Collective::kMma: compute_mma(b, w, warp); break;
    case Collective::kNone: break;
  }
  w.op = Collective::kNone;
  w.arrived = 0;
  for (int l = 0; l < lanes; ++l) {
    Fiber& other = b.fibers[warp * 32 + l];
    if ((mask >> l & 1u) && other.state == FiberState::kWarp) other.state = FiberState::kRunnable;
  }
}

}  // namespace

void syncwarp(unsigned mask) {
  CollectiveIn in;
  in.pc = __builtin_return_address(0);
  collective(Collective::kSyncWarp, mask, in, nullptr);
}

uint64_t shfl(unsigned mask, uint64_t value, int bytes, ShflMode mode, int arg, int width) {
  CollectiveIn in;
  in.pc = __builtin_return_address(0);
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) {
    report(Severity::kFatal, cudaErrorLaunchFailure, "invalid warp collective: shuffle width " + std::to_string(width) + " is not a power of two <= 32", in.pc);
  }
  in.value = value;
  in.bytes = bytes;
  in.mode = mode;
  in.arg = arg;
  in.width = width;
  uint64_t out = 0;
  collective(Collective::kShfl, mask, in, &out);
  return out;
}

void ldmatrix_x4(uint32_t (&r)[4], const void* row_address, bool trans) {
  CollectiveIn in;
  in.pc = __builtin_return_address(0);
  in.address = row_address;
  in.trans = trans;
  collective(Collective::kLdmatrix, 0xffffffffu, in, r);
}

void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, MmaType type) {
  CollectiveIn in;
  in.pc = __builtin_return_address(0);
  std::memcpy(in.a, a, sizeof in.a);
  in.b[0] = b0;
  in.b[1] = b1;
  std::memcpy(in.c, d, sizeof in.c);
  in.type = type;
  collective(Collective::kMma, 0xffffffffu, in, d);
}

// ---- shared memory ----
void* dynamic_shared() {
  Fiber& f = current("extern __shared__");
  return reinterpret_cast<void*>(f.block->regions[0].lo);
}

void* static_shared(const char* file, int line, size_t bytes, size_t align) {
  Fiber& f = current("__shared__");
  Block& b = *f.block;
  for (size_t i = 1; i < b.regions.size(); ++i) {
    if (b.regions[i].file == file && b.regions[i].line == line) return reinterpret_cast<void*>(b.regions[i].lo);
  }
  align = std::max<size_t>(align, 16);
  const uintptr_t lo = (b.static_next + align - 1) & ~(uintptr_t)(align - 1);
  const uintptr_t end = reinterpret_cast<uintptr_t>(b.arena) + b.arena_bytes - kArenaGuard;
  b.static_bytes += bytes;
  const DeviceDesc& dev = b.launch->device;
  if (lo + bytes > end || b.static_bytes > 48 * 1024 ||
      static_cast<int64_t>(b.static_bytes + b.launch->dynamic_smem) > dev.max_smem_per_block_optin) {
    report(Severity::kFatal, cudaErrorInvalidValue,
           "too much shared memory: static __shared__ arrays of " + std::to_string(b.static_bytes) + " bytes plus " +
               std::to_string(b.launch->dynamic_smem) + " dynamic bytes exceed the limits of " + dev.name,
           __builtin_return_address(0));
  }
  std::memset(reinterpret_cast<void*>(lo), 0xFF, bytes);
  b.regions.push_back(SharedRegion{lo, lo + bytes, file, line});
  b.static_next = lo + bytes + 64;  // a gap, so an overrun lands outside every region
  return reinterpret_cast<void*>(lo);
}

// ---- cp.async ----
namespace {
void complete_cp_async_group(Fiber& f, size_t end) {
  for (size_t i = 0; i < end; ++i) {
    const CpAsyncCopy& c = f.cp_pending[i];
    if (c.src_bytes > 0) std::memcpy(c.dst, c.src, static_cast<size_t>(c.src_bytes));
    if (c.src_bytes < c.bytes) std::memset(static_cast<char*>(c.dst) + c.src_bytes, 0, static_cast<size_t>(c.bytes - c.src_bytes));
    check_shared_by(&f, c.dst, static_cast<size_t>(c.bytes), true, c.pc);
  }
  f.cp_pending.erase(f.cp_pending.begin(), f.cp_pending.begin() + static_cast<std::ptrdiff_t>(end));
}
}  // namespace

void cp_async(void* smem_dst, const void* gmem_src, int bytes, int src_bytes) {
  Fiber& f = current("cp.async");
  const void* pc = __builtin_return_address(0);
  if ((bytes != 4 && bytes != 8 && bytes != 16) || src_bytes < 0 || src_bytes > bytes) {
    report(Severity::kFatal, cudaErrorLaunchFailure, "invalid cp.async: " + std::to_string(bytes) + " bytes (src-size " + std::to_string(src_bytes) + ")", pc);
  }
  if (reinterpret_cast<uintptr_t>(smem_dst) % bytes != 0 || (src_bytes > 0 && reinterpret_cast<uintptr_t>(gmem_src) % bytes != 0)) {
    report(Severity::kFatal, cudaErrorMisalignedAddress, "misaligned address: " + describe_thread(&f) + " issues a cp.async not aligned to its size", pc);
  }
  check_shared_by(&f, smem_dst, static_cast<size_t>(bytes), true, pc);
  if (src_bytes > 0) check_global_by(&f, gmem_src, static_cast<size_t>(src_bytes), false, pc);
  std::memset(smem_dst, 0xFF, static_cast<size_t>(bytes));  // in flight: reads before the wait see NaN
  f.cp_pending.push_back(CpAsyncCopy{smem_dst, gmem_src, bytes, src_bytes, pc});
}

void cp_async_commit() {
  Fiber& f = current("cp.async.commit_group");
  f.cp_group_ends.push_back(f.cp_pending.size());
}

void cp_async_wait(int pending_groups) {
  Fiber& f = current("cp.async.wait_group");
  while (static_cast<int>(f.cp_group_ends.size()) > pending_groups) {
    const size_t end = f.cp_group_ends.front();
    complete_cp_async_group(f, end);
    f.cp_group_ends.erase(f.cp_group_ends.begin());
    for (size_t& e : f.cp_group_ends) e -= end;
  }
}

// ---- atomics (real atomics: blocks run on several worker threads) ----
namespace {
template <typename F>
F atomic_add_float(F* p, F v, const void* pc) {
  check_access(p, sizeof(F), true, pc);
  F old;
  __atomic_load(p, &old, __ATOMIC_RELAXED);
  for (;;) {
    F sum = old + v;
    if (__atomic_compare_exchange(p, &old, &sum, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return old;
  }
}
}  // namespace

float atomic_add(float* p, float v) { return atomic_add_float(p, v, __builtin_return_address(0)); }
double atomic_add(double* p, double v) { return atomic_add_float(p, v, __builtin_return_address(0)); }
int atomic_add(int* p, int v) {
  check_access(p, sizeof(int), true, __builtin_return_address(0));
  return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
unsigned atomic_add(unsigned* p, unsigned v) {
  check_access(p, sizeof(unsigned), true, __builtin_return_address(0));
  return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}

// ---- launch ----
void launch(const void* kernel, dim3 grid, dim3 block, size_t dynamic_smem, cudaStream_t stream,
            Trampoline trampoline, const void* args, size_t args_bytes) {
  (void)stream;  // emulated launches run to completion before returning
  const DeviceDesc& dev = current_device();
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  if (block.x == 0 || block.y == 0 || block.z == 0 || block.x > 1024 || block.y > 1024 || block.z > 64 ||
      threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu ||
      grid.y > 65535 || grid.z > 65535) {
    set_last_error(cudaErrorInvalidConfiguration,
                   "launch with grid (" + std::to_string(grid.x) + "," + std::to_string(grid.y) + "," +
                       std::to_string(grid.z) + ") and block (" + std::to_string(block.x) + "," +
                       std::to_string(block.y) + "," + std::to_string(block.z) + ") exceeds the hardware limits");
    return;
  }
  int allowed = 48 * 1024;
  {
    std::lock_guard<std::mutex> lock(attr_mutex);
    auto it = max_dynamic_smem.find({kernel, dev.name});
    if (it != max_dynamic_smem.end()) allowed = std::max(allowed, it->second);
  }
  allowed = static_cast<int>(std::min<int64_t>(allowed, dev.max_smem_per_block_optin));
  if (dynamic_smem > static_cast<size_t>(allowed)) {
    set_last_error(cudaErrorInvalidValue,
                   "launch with " + std::to_string(dynamic_smem) + " bytes of dynamic shared memory; the kernel may use " +
                       std::to_string(allowed) + " on " + dev.name +
                       " (more than 48 KiB needs cudaFuncSetAttribute(MaxDynamicSharedMemorySize))");
    return;
  }
  LaunchState L;
  L.kernel = kernel;
  L.grid = grid;
  L.block = block;
  L.dynamic_smem = dynamic_smem;
  L.trampoline = trampoline;
  L.args = args;
  L.args_bytes = args_bytes;
  L.device = dev;
  L.buffers = call_buffers();
  L.buffers.push_back(Buffer{args, args_bytes, "the kernel parameters"});
  const int64_t blocks = static_cast<int64_t>(grid.x) * grid.y * grid.z;
  // Blocks run in a different order every launch, as a GPU schedules them: results that depend on
  // the order (atomics, code that assumes block 0 runs first) differ from run to run here too.
  std::random_device entropy;
  const uint64_t seed = (static_cast<uint64_t>(entropy()) << 32) ^ entropy();
  L.block_offset = seed % static_cast<uint64_t>(blocks);
  L.block_stride = 1;
  for (uint64_t candidate = (seed >> 20) % static_cast<uint64_t>(blocks) + 1; candidate < 4 * static_cast<uint64_t>(blocks) + 2; ++candidate) {
    if (std::gcd(candidate, static_cast<uint64_t>(blocks)) == 1) {
      L.block_stride = candidate;
      break;
    }
  }
  Pool::get().run(L, blocks);
  if (L.error != cudaSuccess) {
    std::ostringstream os;
    for (size_t i = 0; i < L.reports.size(); ++i) os << (i ? "\n  " : "") << L.reports[i];
    if (L.report_count > static_cast<int64_t>(L.reports.size())) {
      os << "\n  (" << (L.report_count - static_cast<int64_t>(L.reports.size())) << " more findings)";
    }
    set_last_error(L.error, os.str());
  }
}

}  // namespace txemu
