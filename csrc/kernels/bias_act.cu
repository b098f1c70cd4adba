// bias_act.cu: bias + activation (+ dropout) forward and backward on CUDA (torch-free).
//
// Semantics: csrc/kernels/params.h (BiasActParams, BiasActBwdParams); entry points:
// csrc/kernels/launchers.h. fp32 / fp16 / bf16 data, fp32 bias and arithmetic; fp64 data returns
// cudaErrorNotSupported (the CUDA binding rejects it first).
//
//   forward:  z = x + b;  y = act(z);  out = keep ? y * scale : 0
//   backward: grad_input = grad_out * (keep ? scale : 0) * act'(z);  grad_bias = sum_rows grad_input
//   relu(z) = max(z, 0)                     relu'(z) = z > 0
//   gelu(z) = z * Phi(z)                    gelu'(z) = Phi(z) + z * phi(z)
//   gelu_tanh(z) = z * sigmoid(2u),  u = sqrt(2/pi) * (z + 0.044715 z^3)    (= 0.5 z (1 + tanh u))
//   gelu_tanh'(z) = s + z * s * (1 - s) * 2 u',  s = sigmoid(2u),  u' = sqrt(2/pi)(1 + 3 * 0.044715 z^2)
// The sigmoid form needs one exp and no tanh, and stays accurate for large |z| (no 1 + tanh
// cancellation); it does not depend on --use_fast_math's tanh approximation.
//
// Dropout (csrc/kernels/philox.h): element (row, col) has index row * cols + col; its Philox group
// is index / 4 and its word index % 4; keep iff word >= dropout_threshold(p), kept values scaled by
// dropout_scale(p). A 16-byte chunk starts at a multiple of 4 elements (cols % VEC == 0 on the
// vector path), so it takes whole Philox groups: one call per 4 elements, exactly the CPU mask.
//
// Layout: thread (x, y) of CTA (bx, by) owns column chunk bx * blockDim.x + x (VEC elements, 16
// bytes when pointers and strides allow, else 1) and visits rows by * R + y + j * blockDim.y,
// j < ROWS, R = blockDim.y * ROWS, then strides by gridDim.y * R: ROWS independent 16-byte
// loads in flight per thread and tensor (ROWS = kFwdRows or kBwdRows). The bias chunk is loaded once.
// Backward: each thread sums grad_input of its columns over the rows it visits; a CTA adds its
// blockDim.y row slices in order through shared memory and writes workspace[by][cols]; a second
// kernel sums the gridDim.y partials of every column in a fixed order (deterministic, no atomics).
#include <cstddef>
#include <cstdint>

#include "common.cuh"
#include "dispatch.cuh"
#include "launchers.h"

namespace tx_kernels {
namespace {

using cuda::aligned16_or_null;
using cuda::ceil_div;
using cuda::from_float;
using cuda::is_aligned;
using cuda::load_f32;
using cuda::load_vec;
using cuda::round_up;
using cuda::store_f32;
using cuda::store_vec;

constexpr int kThreads = 256;      // per CTA
// Rows a thread has in flight per iteration: 4 loads of 16 bytes in the forward, 2 x 2 in the
// backward (input and grad_out), which keeps registers low enough for 3 CTAs (768 threads) per
// SM with GELU and dropout inlined (see the launch bounds; ptxas -v in check_cuda_compile.sh).
constexpr int kFwdRows = 4;
constexpr int kBwdRows = 2;
constexpr int kMinCtasPerSm = 3;
constexpr int kCtasPerSm = 6;      // backward persistent grid size, per SM

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

constexpr float kSqrt1_2 = 0.70710678118654752440f;       // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;    // 1 / sqrt(2 pi)
constexpr float kSqrt2OverPi = 0.79788456080286535588f;   // sqrt(2 / pi)
constexpr float kGeluTanhCoef = 0.044715f;

template <Activation ACT>
__device__ __forceinline__ float act_fwd(float z) {
  if constexpr (ACT == Activation::kRelu) {
    return z < 0.0f ? 0.0f : z;  // NaN propagates, as in torch.relu
  } else if constexpr (ACT == Activation::kGelu) {
    return 0.5f * z * (1.0f + erff(z * kSqrt1_2));
  } else {
    const float u = kSqrt2OverPi * (z + kGeluTanhCoef * z * z * z);
    return z / (1.0f + __expf(-2.0f * u));
  }
}

template <Activation ACT>
__device__ __forceinline__ float act_grad(float z) {
  // The CPU kernels' rules (csrc/cpu/bias_act.cpp), which are torch's: NaN in, NaN out, except
  // relu, whose gradient at NaN passes through as in threshold_backward; + (z - z) gives the
  // NaN of torch's inf * 0 at z = +-inf where the formulas below would saturate to a number.
  if constexpr (ACT == Activation::kRelu) {
    return z <= 0.0f ? 0.0f : 1.0f;
  } else if constexpr (ACT == Activation::kGelu) {
    const float cdf = 0.5f * (1.0f + erff(z * kSqrt1_2));
    const float pdf = kInvSqrt2Pi * __expf(-0.5f * z * z);
    return cdf + z * pdf + (z - z);
  } else {
    // Beyond |z| = 20 the derivative is 1 or 0 to fp32 precision; clamping (fminf / fmaxf keep a
    // NaN only through the + (z - z)) stops z^3 overflowing to 0 * inf for huge finite inputs.
    const float zc = fminf(fmaxf(z, -20.0f), 20.0f);
    const float u = kSqrt2OverPi * (zc + kGeluTanhCoef * zc * zc * zc);
    const float du = kSqrt2OverPi * (1.0f + 3.0f * kGeluTanhCoef * zc * zc);
    const float s = 1.0f / (1.0f + __expf(-2.0f * u));
    return s + zc * s * (1.0f - s) * 2.0f * du + (z - z);
  }
}

// Element e0 + i: v[i] * scale if kept, else exactly 0 (even for inf / NaN inputs).
template <int VEC>
__device__ __forceinline__ void apply_dropout(const DropoutRng& rng, uint64_t e0, uint32_t threshold,
                                              float scale, float (&v)[VEC]) {
  if constexpr (VEC % 4 == 0) {
    // e0 % 4 == 0 here: whole Philox groups.
#pragma unroll
    for (int q = 0; q < VEC / 4; ++q) {
      const Philox4 r = rng.words((e0 >> 2) + q);
      v[4 * q + 0] = r.x >= threshold ? v[4 * q + 0] * scale : 0.0f;
      v[4 * q + 1] = r.y >= threshold ? v[4 * q + 1] * scale : 0.0f;
      v[4 * q + 2] = r.z >= threshold ? v[4 * q + 2] * scale : 0.0f;
      v[4 * q + 3] = r.w >= threshold ? v[4 * q + 3] * scale : 0.0f;
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = rng.word(e0 + i) >= threshold ? v[i] * scale : 0.0f;
  }
}

template <int VEC>
__device__ __forceinline__ void load_bias(const float* bias, int64_t cc, float (&b)[VEC]) {
  if (bias != nullptr) {
    load_f32<VEC>(bias + cc * VEC, b);
  } else {
#pragma unroll
    for (int v = 0; v < VEC; ++v) b[v] = 0.0f;
  }
}

template <typename T, int VEC, Activation ACT>
__global__ void __launch_bounds__(kThreads, kMinCtasPerSm)
bias_act_fwd_kernel(const BiasActParams p, bool dropout, uint32_t threshold, float scale) {
  const int64_t chunks = p.cols / VEC;
  const int64_t cc = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (cc >= chunks) return;  // no barriers below
  const T* __restrict__ input = static_cast<const T*>(p.input);
  T* __restrict__ out = static_cast<T*>(p.out);
  float b[VEC];
  load_bias<VEC>(static_cast<const float*>(p.bias), cc, b);
  const int64_t rows_per_iter = static_cast<int64_t>(blockDim.y) * kFwdRows;
  for (int64_t base = blockIdx.y * rows_per_iter; base < p.rows;
       base += static_cast<int64_t>(gridDim.y) * rows_per_iter) {
    float x[kFwdRows][VEC];
#pragma unroll
    for (int j = 0; j < kFwdRows; ++j) {
      const int64_t r = base + threadIdx.y + static_cast<int64_t>(j) * blockDim.y;
      if (r < p.rows) load_vec<T, VEC>(input + r * p.input_row_stride + cc * VEC, x[j]);
    }
#pragma unroll
    for (int j = 0; j < kFwdRows; ++j) {
      const int64_t r = base + threadIdx.y + static_cast<int64_t>(j) * blockDim.y;
      if (r < p.rows) {
        float y[VEC];
#pragma unroll
        for (int v = 0; v < VEC; ++v) y[v] = act_fwd<ACT>(x[j][v] + b[v]);
        const int64_t e0 = r * p.cols + cc * VEC;
        if (dropout) apply_dropout<VEC>(p.rng, static_cast<uint64_t>(e0), threshold, scale, y);
        store_vec<T, VEC>(out + e0, y);
      }
    }
  }
}

// Writes grad_input and, when want_partials, this CTA's column sums of grad_input (fp32, before
// rounding) to workspace[blockIdx.y][cols]. Static shared memory: kThreads * VEC floats.
template <typename T, int VEC, Activation ACT>
__global__ void __launch_bounds__(kThreads, kMinCtasPerSm)
bias_act_bwd_kernel(const BiasActBwdParams p, bool dropout, uint32_t threshold, float scale,
                    float* workspace, bool want_partials, bool workspace_vec) {
  TX_SHARED(float[kThreads * VEC], slices);  // [blockDim.y][blockDim.x * VEC]
  const int64_t chunks = p.cols / VEC;
  const int64_t cc = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool col_ok = cc < chunks;  // no early return: the epilogue has a barrier
  const T* __restrict__ input = static_cast<const T*>(p.input);
  const T* __restrict__ grad_out = static_cast<const T*>(p.grad_out);
  T* __restrict__ grad_input = static_cast<T*>(p.grad_input);

  float b[VEC], acc[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) acc[v] = b[v] = 0.0f;
  if (col_ok) load_bias<VEC>(static_cast<const float*>(p.bias), cc, b);

  const int64_t rows_per_iter = static_cast<int64_t>(blockDim.y) * kBwdRows;
  for (int64_t base = blockIdx.y * rows_per_iter; col_ok && base < p.rows;
       base += static_cast<int64_t>(gridDim.y) * rows_per_iter) {
    float x[kBwdRows][VEC], dy[kBwdRows][VEC];
#pragma unroll
    for (int j = 0; j < kBwdRows; ++j) {
      const int64_t r = base + threadIdx.y + static_cast<int64_t>(j) * blockDim.y;
      if (r < p.rows) {
        load_vec<T, VEC>(input + r * p.input_row_stride + cc * VEC, x[j]);
        load_vec<T, VEC>(grad_out + r * p.cols + cc * VEC, dy[j]);
      }
    }
#pragma unroll
    for (int j = 0; j < kBwdRows; ++j) {
      const int64_t r = base + threadIdx.y + static_cast<int64_t>(j) * blockDim.y;
      if (r < p.rows) {
        float g[VEC];
#pragma unroll
        for (int v = 0; v < VEC; ++v) g[v] = dy[j][v] * act_grad<ACT>(x[j][v] + b[v]);
        const int64_t e0 = r * p.cols + cc * VEC;
        if (dropout) apply_dropout<VEC>(p.rng, static_cast<uint64_t>(e0), threshold, scale, g);
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[v] += g[v];
        store_vec<T, VEC>(grad_input + e0, g);
      }
    }
  }

  if (!want_partials) return;  // uniform over the grid
  const int width = static_cast<int>(blockDim.x) * VEC;
#pragma unroll
  for (int v = 0; v < VEC; ++v) slices[threadIdx.y * width + threadIdx.x * VEC + v] = acc[v];
  __syncthreads();
  if (threadIdx.y == 0 && col_ok) {
    float total[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) total[v] = 0.0f;
    for (int y = 0; y < static_cast<int>(blockDim.y); ++y) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) total[v] += slices[y * width + threadIdx.x * VEC + v];
    }
    float* ws = workspace + static_cast<int64_t>(blockIdx.y) * p.cols + cc * VEC;
    if (workspace_vec) {
      store_f32<VEC>(ws, total);
    } else {
#pragma unroll
      for (int v = 0; v < VEC; ++v) ws[v] = total[v];
    }
  }
}

// grad_bias[col] = sum over k of workspace[k][col], k in a fixed order (slices of 16, then the
// slices in order). blockDim = (32, 16), grid = ceil(cols / 32).
__global__ void __launch_bounds__(512)
bias_grad_finalize_kernel(const float* __restrict__ workspace, int64_t num_partials, int64_t cols,
                          float* __restrict__ grad_bias) {
  TX_SHARED(float[16][33], part);
  const int64_t col = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  float acc = 0.0f;
  if (col < cols) {
#pragma unroll 4
    for (int64_t k = threadIdx.y; k < num_partials; k += 16) acc += workspace[k * cols + col];
  }
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    float total = 0.0f;
    for (int y = 0; y < 16; ++y) total += part[y][threadIdx.x];
    grad_bias[col] = total;
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------

// The CTA shape and grid for a (rows, cols) problem; shared by the launch and workspace query.
struct Plan {
  bool vec = false;
  int vec_elems = 1;
  dim3 block;
  int64_t grid_x = 0, grid_y = 0;
};

Plan make_plan(const BiasActParams& p, bool bwd, const void* grad_out, const void* grad_input,
               int num_sms) {
  Plan plan;
  const int esize = cuda::element_bytes(p.dtype);
  const int V = esize > 0 ? 16 / esize : 1;
  plan.vec = esize > 0 && p.cols % V == 0 && is_aligned(p.input, 16) &&
             p.input_row_stride % V == 0 && aligned16_or_null(p.bias) &&
             (bwd ? (is_aligned(grad_out, 16) && is_aligned(grad_input, 16)) : is_aligned(p.out, 16));
  plan.vec_elems = plan.vec ? V : 1;
  const int64_t chunks = p.cols / plan.vec_elems;
  // Up to 128 threads across columns (fewer for narrow rows), the rest of the 256 across rows.
  const int64_t bx = chunks >= 128 ? 128 : round_up(chunks, int64_t{32});
  plan.block = dim3(static_cast<unsigned>(bx), static_cast<unsigned>(kThreads / bx));
  plan.grid_x = ceil_div(chunks, bx);
  int64_t grid_y = ceil_div(p.rows, int64_t{plan.block.y} * (bwd ? kBwdRows : kFwdRows));
  if (bwd) {
    // Persistent in rows: every CTA row is one row of bias-gradient partials.
    if (num_sms < 1) num_sms = 1;
    int64_t cap = ceil_div(int64_t{num_sms} * kCtasPerSm, plan.grid_x);
    if (grid_y > cap) grid_y = cap;
  }
  if (grid_y > 65535) grid_y = 65535;
  plan.grid_y = grid_y < 1 ? 1 : grid_y;
  return plan;
}

struct Dropout {
  bool on = false;
  uint32_t threshold = 0;
  float scale = 1.0f;
};

Dropout dropout_of(const BiasActParams& p) {
  Dropout d;
  if (p.dropout_p > 0.0f) {
    d.on = true;
    // Same double-precision formulas as the CPU kernel, from the same float p.
    d.threshold = dropout_threshold(static_cast<double>(p.dropout_p));
    d.scale = dropout_scale(static_cast<double>(p.dropout_p));
  }
  return d;
}

template <typename T, int VEC, Activation ACT>
cudaError_t launch_fwd(const BiasActParams& p, const Plan& plan, cudaStream_t stream) {
  const Dropout d = dropout_of(p);
  const dim3 grid(static_cast<unsigned>(plan.grid_x), static_cast<unsigned>(plan.grid_y));
  const auto kernel = bias_act_fwd_kernel<T, VEC, ACT>;
  TX_LAUNCH(kernel, grid, plan.block, 0, stream)(p, d.on, d.threshold, d.scale);
  return cudaGetLastError();
}

template <typename T, int VEC>
cudaError_t fwd_by_act(const BiasActParams& p, const Plan& plan, cudaStream_t stream) {
  switch (p.activation) {
    case Activation::kRelu: return launch_fwd<T, VEC, Activation::kRelu>(p, plan, stream);
    case Activation::kGelu: return launch_fwd<T, VEC, Activation::kGelu>(p, plan, stream);
    case Activation::kGeluTanh: return launch_fwd<T, VEC, Activation::kGeluTanh>(p, plan, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t fwd_typed(const BiasActParams& p, cudaStream_t stream) {
  const Plan plan = make_plan(p, /*bwd=*/false, nullptr, nullptr, 0);
  return plan.vec ? fwd_by_act<T, cuda::kVecElems<T>>(p, plan, stream)
                  : fwd_by_act<T, 1>(p, plan, stream);
}

template <typename T, int VEC, Activation ACT>
cudaError_t launch_bwd(const BiasActBwdParams& p, const Plan& plan, float* workspace,
                       cudaStream_t stream) {
  const Dropout d = dropout_of(p);
  const bool want = p.grad_bias != nullptr;
  const dim3 grid(static_cast<unsigned>(plan.grid_x), static_cast<unsigned>(plan.grid_y));
  const auto kernel = bias_act_bwd_kernel<T, VEC, ACT>;
  TX_LAUNCH(kernel, grid, plan.block, 0, stream)(
      p, d.on, d.threshold, d.scale, workspace, want, is_aligned(workspace, 16));
  return cudaGetLastError();
}

template <typename T, int VEC>
cudaError_t bwd_by_act(const BiasActBwdParams& p, const Plan& plan, float* workspace,
                       cudaStream_t stream) {
  switch (p.activation) {
    case Activation::kRelu: return launch_bwd<T, VEC, Activation::kRelu>(p, plan, workspace, stream);
    case Activation::kGelu: return launch_bwd<T, VEC, Activation::kGelu>(p, plan, workspace, stream);
    case Activation::kGeluTanh: return launch_bwd<T, VEC, Activation::kGeluTanh>(p, plan, workspace, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t bwd_typed(const BiasActBwdParams& p, const Plan& plan, float* workspace, cudaStream_t stream) {
  cudaError_t err = plan.vec ? bwd_by_act<T, cuda::kVecElems<T>>(p, plan, workspace, stream)
                             : bwd_by_act<T, 1>(p, plan, workspace, stream);
  if (err != cudaSuccess || p.grad_bias == nullptr) return err;
  const int64_t grid = ceil_div(p.cols, int64_t{32});
  TX_LAUNCH(bias_grad_finalize_kernel, static_cast<unsigned>(grid), dim3(32, 16), 0, stream)(
      workspace, plan.grid_y, p.cols, static_cast<float*>(p.grad_bias));
  return cudaGetLastError();
}

Plan bwd_plan(const BiasActBwdParams& p, const DeviceInfo& device) {
  return make_plan(p, /*bwd=*/true, p.grad_out, p.grad_input, device.num_sms);
}

size_t partials_bytes(const BiasActBwdParams& p, const Plan& plan) {
  if (p.grad_bias == nullptr) return 0;
  return static_cast<size_t>(plan.grid_y) * static_cast<size_t>(p.cols) * sizeof(float);
}

}  // namespace

size_t bias_act_fwd_workspace_bytes(const BiasActParams&, const DeviceInfo&) { return 0; }

cudaError_t bias_act_fwd_cuda(const BiasActParams& params, const DeviceInfo&, void*, size_t,
                              cudaStream_t stream) {
  if (params.rows <= 0 || params.cols <= 0) return cudaSuccess;
  return cuda::dispatch_dtype</*kWithFp64=*/false>(params.dtype, [&](auto tag) {
    return fwd_typed<typename decltype(tag)::type>(params, stream);
  });
}

size_t bias_act_bwd_workspace_bytes(const BiasActBwdParams& params, const DeviceInfo& device) {
  if (params.rows <= 0 || params.cols <= 0) return 0;
  return partials_bytes(params, bwd_plan(params, device));
}

cudaError_t bias_act_bwd_cuda(const BiasActBwdParams& params, const DeviceInfo& device,
                              void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (params.rows <= 0 || params.cols <= 0) {
    // Nothing to launch; an empty batch still has a (zero) bias gradient of `cols` entries.
    if (params.grad_bias != nullptr && params.cols > 0) {
      return cudaMemsetAsync(params.grad_bias, 0, static_cast<size_t>(params.cols) * sizeof(float),
                             stream);
    }
    return cudaSuccess;
  }
  const Plan plan = bwd_plan(params, device);
  if (!workspace_ok(workspace, workspace_bytes, partials_bytes(params, plan))) return cudaErrorInvalidValue;
  return cuda::dispatch_dtype</*kWithFp64=*/false>(params.dtype, [&](auto tag) {
    return bwd_typed<typename decltype(tag)::type>(params, plan, static_cast<float*>(workspace), stream);
  });
}

}  // namespace tx_kernels
