// checks.cpp: the harness as a sanitizer. Every load and store of the emulated kernel code calls
// one of the __tsan_* entry points below (the kernels are compiled with -fsanitize=thread and
// linked without libtsan, so these definitions are its runtime), which classify the address:
//   the running fiber's stack            always fine;
//   the block's shared-memory arena      bounds (the launched dynamic size exactly, each static
//                                        array exactly), then the race and initialization rules;
//   anything else                        global memory: it must lie inside one buffer of the call
//                                        (each tensor's extent as its params describe it, the
//                                        workspace, the kernel parameters) or the module's data.
// Race rule (compute-sanitizer racecheck's): a shared byte read or written by thread T conflicts
// with a write by another thread (or, for a write, a read by another thread) since the last
// __syncthreads both passed; within one warp a __syncwarp also orders them. The shadow keeps, per
// byte, the last writer and the warps that read it in the current barrier interval (one reader
// thread is named; a conflict among several reading lanes of T's own warp may go unnamed).
#include <dlfcn.h>
#include <link.h>

#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include "internal.h"

namespace txemu {

namespace {

struct Module {
  std::vector<std::pair<uintptr_t, uintptr_t>> segments;  // this library's loaded segments
  std::string path;
};

int collect_segments(dl_phdr_info* info, size_t, void* data) {
  auto* m = static_cast<Module*>(data);
  const uintptr_t self = reinterpret_cast<uintptr_t>(&collect_segments);
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& ph = info->dlpi_phdr[i];
    if (ph.p_type != PT_LOAD) continue;
    const uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
    if (self >= lo && self < lo + ph.p_memsz) {
      for (int j = 0; j < info->dlpi_phnum; ++j) {
        const ElfW(Phdr)& seg = info->dlpi_phdr[j];
        if (seg.p_type == PT_LOAD) m->segments.emplace_back(info->dlpi_addr + seg.p_vaddr, info->dlpi_addr + seg.p_vaddr + seg.p_memsz);
      }
      m->path = info->dlpi_name ? info->dlpi_name : "";
      return 1;
    }
  }
  return 0;
}

const Module& module() {
  static const Module m = [] {
    Module out;
    dl_iterate_phdr(&collect_segments, &out);
    return out;
  }();
  return m;
}

std::string hex(uintptr_t v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%" PRIxPTR, v);
  return buf;
}

std::string access_name(size_t bytes, bool write) {
  return std::string(write ? "write of " : "read of ") + std::to_string(bytes) + (bytes == 1 ? " byte" : " bytes");
}

// Where `a` lies relative to the call's buffers, for an out-of-bounds report.
std::string nearest_buffer(const LaunchState& L, uintptr_t a) {
  std::string best;
  uintptr_t best_dist = ~uintptr_t{0};
  for (const Buffer& b : L.buffers) {
    const uintptr_t lo = reinterpret_cast<uintptr_t>(b.ptr), hi = lo + b.bytes;
    const uintptr_t dist = a < lo ? lo - a : (a >= hi ? a - hi + 1 : 0);
    if (dist < best_dist) {
      best_dist = dist;
      best = a < lo ? std::to_string(lo - a) + " bytes before `" + b.name + "`"
                    : std::to_string(a - hi) + " bytes past the end of `" + b.name + "` (" + std::to_string(b.bytes) + " bytes)";
    }
  }
  return best.empty() ? "the call registered no buffers" : best;
}

void global_access(Fiber* f, uintptr_t a, size_t bytes, bool write, const void* pc) {
  const LaunchState& L = *f->block->launch;
  for (const Buffer& b : L.buffers) {
    const uintptr_t lo = reinterpret_cast<uintptr_t>(b.ptr);
    if (a >= lo && a + bytes <= lo + b.bytes) return;
  }
  for (const auto& seg : module().segments) {
    if (a >= seg.first && a + bytes <= seg.second) return;
  }
  report(Severity::kFatal, cudaErrorIllegalAddress,
         "out-of-bounds global access: " + describe_thread(f) + " " + access_name(bytes, write) + " at " + hex(a) +
             ", " + nearest_buffer(L, a),
         pc);
}

const SharedRegion* find_region(const Block& b, uintptr_t a, size_t bytes) {
  for (const SharedRegion& r : b.regions) {
    if (a >= r.lo && a + bytes <= r.hi) return &r;
  }
  return nullptr;
}

std::string shared_offset(const Block& b, uintptr_t a) {
  const SharedRegion& dyn = b.regions[0];
  if (a >= dyn.lo && a < dyn.lo + 256 * 1024) return "dynamic shared + " + std::to_string(a - dyn.lo);
  return "shared " + hex(a - reinterpret_cast<uintptr_t>(b.arena));
}

void shared_bounds_error(Fiber* f, uintptr_t a, size_t bytes, bool write, const void* pc) {
  const Block& b = *f->block;
  const SharedRegion& dyn = b.regions[0];
  std::string where;
  if (a + bytes > dyn.hi && a < dyn.hi + 4096) {
    where = "past the launched dynamic shared memory of " + std::to_string(dyn.hi - dyn.lo) + " bytes";
  } else {
    where = "outside every shared-memory array of the block";
  }
  report(Severity::kFatal, cudaErrorIllegalAddress,
         "out-of-bounds shared access: " + describe_thread(f) + " " + access_name(bytes, write) + " at " +
             shared_offset(b, a) + ", " + where,
         pc);
}

std::string thread_of_tid(const Block& b, int tid) { return describe_thread(&b.fibers[tid]); }

void shared_access(Fiber* f, uintptr_t a, size_t bytes, bool write, const void* pc) {
  Block& b = *f->block;
  if (find_region(b, a, bytes) == nullptr) shared_bounds_error(f, a, bytes, write, pc);
  const int tid = f->tid, warp = tid >> 5;
  const uint32_t wsync = b.warps[warp].sync_count;
  const uintptr_t base = reinterpret_cast<uintptr_t>(b.arena);
  for (size_t i = 0; i < bytes; ++i) {
    ShadowByte& s = b.shadow[a - base + i];
    if (s.gen != b.gen) s = ShadowByte{b.gen};
    const char* kind = nullptr;
    int other = -1;
    const void* other_pc = nullptr;
    if (s.written && s.w_epoch == b.epoch && s.w_tid != tid &&
        ((s.w_tid >> 5) != warp || s.w_wsync == wsync)) {
      kind = write ? "write-after-write" : "read-after-write";
      other = s.w_tid;
      other_pc = s.w_pc;
    } else if (write && s.r_epoch == b.epoch && s.r_warps != 0) {
      const uint32_t other_warps = s.r_warps & ~(1u << warp);
      if (other_warps != 0 || (s.r_tid != tid && s.r_wsync == wsync)) {
        kind = "write-after-read";
        other = (s.r_tid >> 5) != warp || other_warps == 0 ? s.r_tid : -1;
        other_pc = s.r_pc;
        if (other < 0) other = __builtin_ctz(other_warps) * 32;  // some lane of that warp
      }
    }
    if (kind != nullptr) {
      report(Severity::kError, cudaErrorLaunchFailure,
             std::string("shared-memory race (") + kind + "): " + describe_thread(f) + " " + access_name(bytes, write) +
                 " at " + shared_offset(b, a + i) + " conflicts with " + thread_of_tid(b, other) +
                 " (at " + source_line(other_pc) + ") with no barrier between them",
             pc);
      break;
    }
    if (!write && !s.written) {
      report(Severity::kError, cudaErrorLaunchFailure,
             "uninitialized shared memory: " + describe_thread(f) + " " + access_name(bytes, write) + " at " +
                 shared_offset(b, a + i) + ", never written in this block",
             pc);
      break;
    }
  }
  for (size_t i = 0; i < bytes; ++i) {
    ShadowByte& s = b.shadow[a - base + i];
    if (write) {
      s.written = true;
      s.w_epoch = b.epoch;
      s.w_tid = static_cast<uint16_t>(tid);
      s.w_wsync = wsync;
      s.w_pc = pc;
      s.r_warps = 0;
    } else {
      if (s.r_epoch != b.epoch) s.r_warps = 0;
      s.r_epoch = b.epoch;
      s.r_warps |= 1u << warp;
      s.r_tid = static_cast<uint16_t>(tid);
      s.r_wsync = wsync;
      s.r_pc = pc;
    }
  }
}

}  // namespace

void check_shared_by(Fiber* f, const void* p, size_t bytes, bool write, const void* pc) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const Block& b = *f->block;
  if (a - reinterpret_cast<uintptr_t>(b.arena) >= b.arena_bytes) {
    report(Severity::kFatal, cudaErrorIllegalAddress,
           "out-of-bounds shared access: " + describe_thread(f) + " " + access_name(bytes, write) + " at " + hex(a) +
               ", which is not shared memory",
           pc);
  }
  shared_access(f, a, bytes, write, pc);
}

void check_global_by(Fiber* f, const void* p, size_t bytes, bool write, const void* pc) {
  global_access(f, reinterpret_cast<uintptr_t>(p), bytes, write, pc);
}

void check_access(const void* p, size_t bytes, bool write, const void* pc) {
  Fiber* f = tls_fiber;
  if (f == nullptr) return;  // host code of the launchers
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a - reinterpret_cast<uintptr_t>(f->stack) < f->stack_bytes) return;
  const Block& b = *f->block;
  if (a - reinterpret_cast<uintptr_t>(b.arena) < b.arena_bytes) {
    shared_access(f, a, bytes, write, pc);
    return;
  }
  global_access(f, a, bytes, write, pc);
}

std::string describe_thread(const Fiber* f) {
  std::ostringstream os;
  os << "thread (" << f->idx.x << "," << f->idx.y << "," << f->idx.z << ") of block (" << f->block->idx.x << ","
     << f->block->idx.y << "," << f->block->idx.z << ")";
  return os.str();
}

std::string source_line(const void* pc) {
  if (pc == nullptr) return "?";
  Dl_info info;
  if (dladdr(pc, &info) == 0 || info.dli_fname == nullptr) return hex(reinterpret_cast<uintptr_t>(pc));
  const uintptr_t offset = reinterpret_cast<uintptr_t>(pc) - reinterpret_cast<uintptr_t>(info.dli_fbase) - 1;
  const std::string cmd = "addr2line -C -i -e '" + std::string(info.dli_fname) + "' " + hex(offset) + " 2>/dev/null";
  std::string out;
  if (FILE* p = popen(cmd.c_str(), "r")) {
    char line[512];
    while (std::fgets(line, sizeof line, p)) {
      std::string s(line);
      while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
      const size_t disc = s.find(" (discriminator");
      if (disc != std::string::npos) s.resize(disc);
      const size_t slash = s.find("csrc/");
      if (slash != std::string::npos) s = s.substr(slash);
      else if (s.find("tests/") != std::string::npos) s = s.substr(s.find("tests/"));
      if (s.empty() || s[0] == '?') continue;
      out += (out.empty() ? "" : " inlined in ") + s;
    }
    pclose(p);
  }
  return out.empty() ? hex(offset) : out;
}

void record(LaunchState& L, Severity severity, cudaError_t error, const std::string& what, const void* pc) {
  std::lock_guard<std::mutex> lock(L.report_mutex);
  ++L.report_count;
  // One report per kind of finding and place: a race in a loop would otherwise repeat per byte.
  const size_t conflicts = what.find(" conflicts");
  const std::string key = what.substr(0, what.find(':')) + "@" + hex(reinterpret_cast<uintptr_t>(pc)) +
                          (conflicts == std::string::npos ? "" : what.substr(what.rfind("(at ")));
  // Messages are "<kind>: <details>"; the kind, the place and (for races) the other place make the key.
  bool fresh = true;
  for (const std::string& s : L.seen) fresh = fresh && s != key;
  if (fresh && L.reports.size() < 12) {
    L.seen.push_back(key);
    L.reports.push_back(pc != nullptr ? what + " [at " + source_line(pc) + "]" : what);
  }
  if (L.error == cudaSuccess || severity == Severity::kFatal) L.error = error;
}

void report(Severity severity, cudaError_t error, const std::string& what, const void* pc) {
  Fiber* f = tls_fiber;
  record(*f->block->launch, severity, error, what, pc);
  if (severity == Severity::kFatal) {
    f->block->launch->fatal = true;
    f->block->aborted = true;
    abandon_fiber();
  }
}

void abandon_fiber() {
  Fiber* f = tls_fiber;
  f->state = FiberState::kDead;
  switch_context(&f->ctx, f->block->scheduler);
  __builtin_trap();  // a dead fiber is never resumed
}

}  // namespace txemu

// ThreadSanitizer's compiler interface, served by the harness (hidden: never interposes libtsan).
#define TXEMU_TSAN(bytes)                                                                           \
  __attribute__((visibility("hidden"))) void __tsan_read##bytes(void* p) {                          \
    txemu::check_access(p, bytes, false, __builtin_return_address(0));                              \
  }                                                                                                 \
  __attribute__((visibility("hidden"))) void __tsan_write##bytes(void* p) {                         \
    txemu::check_access(p, bytes, true, __builtin_return_address(0));                               \
  }                                                                                                 \
  __attribute__((visibility("hidden"))) void __tsan_unaligned_read##bytes(void* p) {                \
    txemu::check_access(p, bytes, false, __builtin_return_address(0));                              \
  }                                                                                                 \
  __attribute__((visibility("hidden"))) void __tsan_unaligned_write##bytes(void* p) {               \
    txemu::check_access(p, bytes, true, __builtin_return_address(0));                               \
  }

extern "C" {
TXEMU_TSAN(1)
TXEMU_TSAN(2)
TXEMU_TSAN(4)
TXEMU_TSAN(8)
TXEMU_TSAN(16)
__attribute__((visibility("hidden"))) void __tsan_read_range(void* p, unsigned long bytes) {
  txemu::check_access(p, bytes, false, __builtin_return_address(0));
}
__attribute__((visibility("hidden"))) void __tsan_write_range(void* p, unsigned long bytes) {
  txemu::check_access(p, bytes, true, __builtin_return_address(0));
}
__attribute__((visibility("hidden"))) void __tsan_init() {}
__attribute__((visibility("hidden"))) void __tsan_func_entry(void*) {}
__attribute__((visibility("hidden"))) void __tsan_func_exit() {}
__attribute__((visibility("hidden"))) void __tsan_vptr_update(void**, void*) {}
__attribute__((visibility("hidden"))) void __tsan_vptr_read(void**) {}
}
