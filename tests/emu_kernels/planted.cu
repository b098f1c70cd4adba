// planted.cu: small kernels for tests/test_emu_harness.py, each either a correct use of one
// emulated feature (checked against NumPy) or a planted bug that one of the harness's checkers
// must catch. Built with the harness only (tx_kernels.emu.build(kernel_sources=[this file])).
#include <cstdint>

#include "../../csrc/kernels/attention_kernel_utils.cuh"

using tx_kernels::attn::cp_async_16;
using tx_kernels::attn::cp_async_commit;
using tx_kernels::attn::cp_async_wait;
using tx_kernels::attn::ldmatrix_x4;
using tx_kernels::attn::ldmatrix_x4_trans;
using tx_kernels::attn::mma_16816;

namespace {

// Neighbour exchange through shared memory; `barrier` false plants the missing __syncthreads.
__global__ void exchange_kernel(const float* in, float* out, int n, bool barrier) {
  TX_SHARED(float[256], s);
  const int t = threadIdx.x;
  s[t] = in[t];
  if (barrier) __syncthreads();
  out[t] = s[(t + 32) % n];
}

// Write-after-read: thread t reads s[t + 32], then (without a barrier) thread t + 32 overwrites it.
__global__ void war_kernel(float* out) {
  TX_SHARED(float[128], s);
  const int t = threadIdx.x;
  s[t] = static_cast<float>(t);
  __syncthreads();
  const float v = s[(t + 32) % 128];
  s[t] = v + 1.0f;
  __syncthreads();
  out[t] = s[t];
}

// Each thread reads index t + offset of a global buffer of n floats.
__global__ void global_read_kernel(const float* in, float* out, int offset) {
  out[threadIdx.x] = in[threadIdx.x + offset];
}

// Dynamic shared memory of `n` floats, indexed up to blockDim.x + extra - 1.
__global__ void dynamic_shared_kernel(float* out, int extra) {
  TX_DYNAMIC_SHARED(float, s);
  const int t = threadIdx.x;
  s[t] = 1.0f;
  __syncthreads();
  out[t] = s[(t + extra) % (blockDim.x + extra)];
}

// Reads a shared word no thread wrote (the write of element 5 is skipped).
__global__ void uninitialized_kernel(float* out) {
  TX_SHARED(float[64], s);
  const int t = threadIdx.x;
  if (t != 5) s[t] = 2.0f;
  __syncthreads();
  out[t] = s[63 - t];
}

// One 16-byte cp.async per thread from `in` into shared memory, then read back; `wait` selects
// the wait: 0 none (planted), 1 a wait_group<1> with two groups in flight (too weak, planted),
// 2 the right wait_group<0>. `zero_fill` issues the copies with src-size 0.
__global__ void cp_async_kernel(const float* in, float* out, int wait, bool zero_fill) {
  TX_DYNAMIC_SHARED(float, s);
  const int t = threadIdx.x;
  cp_async_16(s + 4 * t, in + 4 * t, !zero_fill);
  cp_async_commit();
  cp_async_16(s + 4 * (t + blockDim.x), in + 4 * (t + blockDim.x), !zero_fill);
  cp_async_commit();
  if (wait == 1) cp_async_wait<1>();
  if (wait == 2) cp_async_wait<0>();
  for (int i = 0; i < 8; ++i) out[8 * t + i] = s[(i < 4 ? 4 * t : 4 * (t + blockDim.x) - 4) + i];
}

// One warp: D (16x8, fp32) = A (16x16, row-major) x B (16x8, stored as B^T: 8 rows of 16), both
// fp16, staged in shared memory and loaded with ldmatrix (A: rows as they are; B^T rows are B's
// columns, so the non-transposed load gives the "col" operand). `planted` swaps the address of
// two lanes, as a wrong lane-to-row mapping would. Also writes B via ldmatrix.trans of the
// row-major B (16 rows of 8) to check .trans: out_trans = A x B again.
__global__ void mma_kernel(const __half* a, const __half* bt, const __half* b_rowmajor, float* d,
                           float* d_trans, bool planted) {
  TX_SHARED(__half[16 * 16], sa);
  TX_SHARED(__half[8 * 16], sbt);
  TX_SHARED(__half[16 * 8], sb);
  const int lane = threadIdx.x;
  for (int i = lane; i < 256; i += 32) sa[i] = a[i];
  for (int i = lane; i < 128; i += 32) {
    sbt[i] = bt[i];
    sb[i] = b_rowmajor[i];
  }
  __syncwarp();
  // A fragment: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (8-15, 8-15).
  int row = lane % 16, col = (lane / 16) * 8;
  if (planted && lane < 2) row = 1 - lane;
  uint32_t fa[4];
  ldmatrix_x4(fa, sa + row * 16 + col);
  // B fragment from B^T rows (n = lane % 8): matrices (k 0-7) and (k 8-15); lanes 16-31 repeat.
  uint32_t fb[4];
  ldmatrix_x4(fb, sbt + (lane % 8) * 16 + ((lane / 8) % 2) * 8);
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  mma_16816<__half>(acc, fa, fb[0], fb[1]);
  const int g = lane / 4, c = (lane % 4) * 2;
  d[g * 8 + c] = acc[0];
  d[g * 8 + c + 1] = acc[1];
  d[(g + 8) * 8 + c] = acc[2];
  d[(g + 8) * 8 + c + 1] = acc[3];
  // The same B from row-major storage: .trans of rows k (matrices k 0-7, k 8-15).
  uint32_t fbt[4];
  ldmatrix_x4_trans(fbt, sb + (lane % 16) * 8);
  float acc2[4] = {0.f, 0.f, 0.f, 0.f};
  mma_16816<__half>(acc2, fa, fbt[0], fbt[1]);
  d_trans[g * 8 + c] = acc2[0];
  d_trans[g * 8 + c + 1] = acc2[1];
  d_trans[(g + 8) * 8 + c] = acc2[2];
  d_trans[(g + 8) * 8 + c + 1] = acc2[3];
}

// out[mode][lane] = the shuffles of value = 100 + lane: xor 5, idx 7 (width 8), down 3, up 2.
__global__ void shuffle_kernel(int* out) {
  const int lane = threadIdx.x;
  const int v = 100 + lane;
  out[lane] = __shfl_xor_sync(0xffffffffu, v, 5);
  out[32 + lane] = __shfl_sync(0xffffffffu, v, 7, 8);
  out[64 + lane] = __shfl_down_sync(0xffffffffu, v, 3);
  out[96 + lane] = __shfl_up_sync(0xffffffffu, v, 2);
}

// Planted: half the warp exits before a full-mask shuffle.
__global__ void exited_lane_kernel(float* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

__global__ void empty_kernel(float* out) { out[threadIdx.x] = 0.0f; }

// order[k] = the k-th block to start (order[gridDim.x] counts them).
__global__ void block_order_kernel(int* order) {
  if (threadIdx.x == 0) order[atomicAdd(order + gridDim.x, 1)] = static_cast<int>(blockIdx.x);
}

txemu::DeviceDesc device_named(const char* name) {
  txemu::DeviceDesc d;
  d.name = name;
  if (name[0] == 'A') {
    d.num_sms = 108;
    d.max_smem_per_block_optin = 163 * 1024;
  }
  return d;
}

// Runs `launch` with `count` buffers (pointer, bytes) registered and returns the launch's error.
template <typename F>
int run(const char* device, void** ptrs, const size_t* bytes, int count, F&& launch) {
  txemu::Buffer buffers[8];
  for (int i = 0; i < count; ++i) buffers[i] = txemu::Buffer{ptrs[i], bytes[i], i == 0 ? "buffer0" : "buffer1"};
  txemu::set_call(device_named(device), buffers, count);
  launch();
  txemu::clear_call();
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

#define PLANTED extern "C" __attribute__((visibility("default")))

PLANTED const char* planted_report() { return txemu::last_report(); }

PLANTED int planted_exchange(void** p, const size_t* b, int n, int barrier) {
  return run("H100", p, b, 2, [&] {
    TX_LAUNCH(exchange_kernel, 1, n, 0, nullptr)(static_cast<const float*>(p[0]), static_cast<float*>(p[1]), n, barrier != 0);
  });
}

PLANTED int planted_war(void** p, const size_t* b) {
  return run("H100", p, b, 1, [&] { TX_LAUNCH(war_kernel, 1, 128, 0, nullptr)(static_cast<float*>(p[0])); });
}

PLANTED int planted_global_read(void** p, const size_t* b, int threads, int offset) {
  return run("H100", p, b, 2, [&] {
    TX_LAUNCH(global_read_kernel, 1, threads, 0, nullptr)(static_cast<const float*>(p[0]), static_cast<float*>(p[1]), offset);
  });
}

PLANTED int planted_dynamic_shared(void** p, const size_t* b, int threads, int extra) {
  return run("H100", p, b, 1, [&] {
    TX_LAUNCH(dynamic_shared_kernel, 1, threads, threads * sizeof(float), nullptr)(static_cast<float*>(p[0]), extra);
  });
}

PLANTED int planted_uninitialized(void** p, const size_t* b) {
  return run("H100", p, b, 1, [&] { TX_LAUNCH(uninitialized_kernel, 1, 64, 0, nullptr)(static_cast<float*>(p[0])); });
}

PLANTED int planted_cp_async(void** p, const size_t* b, int threads, int wait, int zero_fill) {
  return run("H100", p, b, 2, [&] {
    TX_LAUNCH(cp_async_kernel, 1, threads, 2 * threads * 16, nullptr)(static_cast<const float*>(p[0]),
                                                                      static_cast<float*>(p[1]), wait, zero_fill != 0);
  });
}

PLANTED int planted_mma(void** p, const size_t* b, int planted) {
  return run("H100", p, b, 5, [&] {
    TX_LAUNCH(mma_kernel, 1, 32, 0, nullptr)(static_cast<const __half*>(p[0]), static_cast<const __half*>(p[1]),
                                            static_cast<const __half*>(p[2]), static_cast<float*>(p[3]),
                                            static_cast<float*>(p[4]), planted != 0);
  });
}

PLANTED int planted_shuffle(void** p, const size_t* b) {
  return run("H100", p, b, 1, [&] { TX_LAUNCH(shuffle_kernel, 1, 32, 0, nullptr)(static_cast<int*>(p[0])); });
}

PLANTED int planted_exited_lane(void** p, const size_t* b) {
  return run("H100", p, b, 1, [&] { TX_LAUNCH(exited_lane_kernel, 1, 32, 0, nullptr)(static_cast<float*>(p[0])); });
}

PLANTED int planted_block_order(void** p, const size_t* b, int blocks) {
  return run("H100", p, b, 1, [&] { TX_LAUNCH(block_order_kernel, blocks, 32, 0, nullptr)(static_cast<int*>(p[0])); });
}

// Launch configuration checks: returns the launch error for block (bx, by), grid (gx, gy) and
// `smem` dynamic bytes, after raising the kernel's limit to `attribute` bytes when > 0 (that call's
// own error is returned instead if it fails).
PLANTED int planted_launch(void** p, const size_t* b, const char* device, int bx, int by, int gx, int gy,
                           int smem, int attribute) {
  int attr_err = 0;
  const int err = run(device, p, b, 1, [&] {
    if (attribute > 0) {
      attr_err = static_cast<int>(cudaFuncSetAttribute(empty_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, attribute));
      if (attr_err != 0) return;
    }
    TX_LAUNCH(empty_kernel, dim3(gx, gy), dim3(bx, by), smem, nullptr)(static_cast<float*>(p[0]));
  });
  return attr_err != 0 ? attr_err : err;
}
