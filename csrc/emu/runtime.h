// runtime.h: the execution harness that runs csrc/kernels/*.cu on the CPU (torch-free).
//
// A launch runs every CUDA thread of a block as its own fiber (a register-only context switch,
// fiber.cpp); blocks run one after another, in an order that changes every launch, on each of a
// few worker threads. A fiber runs until it
// reaches a barrier or a warp collective and then yields, so:
//   __syncthreads        is a real barrier of the block's live threads;
//   __syncwarp, shuffles, ldmatrix, mma.sync
//                        are collectives of the lanes named in the mask: the last lane to arrive
//                        computes the result for all of them from the PTX ISA's definition;
//   cp.async             poisons its destination when issued and copies at the wait_group that
//                        covers it, so a missing or too-weak wait reads NaN;
//   shared memory        is the launched dynamic size exactly plus the static __shared__ arrays,
//                        NaN-filled at block start and shadowed byte by byte.
// Checkers (checks.cpp): every load and store of the kernel code reaches the harness through
// the compiler's ThreadSanitizer instrumentation (the emulated kernels are built with
// -fsanitize=thread and this runtime stands in for libtsan), which classifies the address as the
// fiber's stack, shared memory or a global buffer of the launch, and reports out-of-bounds
// accesses, shared-memory races (racecheck's rule: a conflicting access by another thread since
// the last barrier both passed) and reads of shared memory never written.
// Launches are checked as the hardware checks them (block and grid limits, dynamic shared memory
// over 48 KiB only after cudaFuncSetAttribute, at most the emulated device's opt-in limit) and
// fail through the normal cudaGetLastError path with a report for cudaGetErrorString.
// Not modelled: timing, registers and occupancy, __launch_bounds__, memory ordering beyond
// barriers, warp-synchronous code without a collective, races between blocks in global memory.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>
#include <vector_types.h>

namespace txemu {

// The emulated GPU: what a launch is checked against and what the bindings put in the params.
struct DeviceDesc {
  const char* name = "H100";
  int num_sms = 132;
  int64_t max_smem_per_block_optin = 232448;  // 227 KiB
};

// A buffer a launch may touch; anything else in global memory is out of bounds.
struct Buffer {
  const void* ptr = nullptr;
  size_t bytes = 0;
  const char* name = "";
};

// Scope of one emulated call (host side): the device and the buffers its launches may access.
void set_call(const DeviceDesc& device, const Buffer* buffers, int count);
void clear_call();
const DeviceDesc& current_device();

// Built-in variables of the running fiber.
uint3 thread_idx();
uint3 block_idx();
dim3 block_dim();
dim3 grid_dim();

void syncthreads();
void syncwarp(unsigned mask);

enum class ShflMode : int { kIdx = 0, kXor = 1, kDown = 2, kUp = 3 };
uint64_t shfl(unsigned mask, uint64_t value, int bytes, ShflMode mode, int arg, int width);

void* dynamic_shared();
void* static_shared(const char* file, int line, size_t bytes, size_t align);

void cp_async(void* smem_dst, const void* gmem_src, int bytes, int src_bytes);
void cp_async_commit();
void cp_async_wait(int pending_groups);

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16
void ldmatrix_x4(uint32_t (&r)[4], const void* row_address, bool trans);

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32, D = A B + D in place.
enum class MmaType : int { kF16 = 0, kBF16 = 1 };
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, MmaType type);

float atomic_add(float* address, float value);
double atomic_add(double* address, double value);
int atomic_add(int* address, int value);
unsigned atomic_add(unsigned* address, unsigned value);

// One kernel launch: `trampoline(args)` runs the kernel in each thread's fiber. `args` (the packed
// kernel parameters, `args_bytes` long) may be read by the kernel code.
using Trampoline = void (*)(const void* args);
void launch(const void* kernel, dim3 grid, dim3 block, size_t dynamic_smem, cudaStream_t stream,
            Trampoline trampoline, const void* args, size_t args_bytes);

// The report of the last failed launch of this host thread ("" when none).
const char* last_report();

}  // namespace txemu
