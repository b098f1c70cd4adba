// attention_common.cuh: what the attention forward (attention_fwd.cu) and backward
// (attention_bwd.cu) share, torch-free:
//   AttnArgs / BwdArgs, make_args          the kernels' argument struct, flattened from the params
//   kDefaultMaxSmemPerBlock, smem_limit    the shared-memory budget when the caller did not say
//   tiles_vectorizable                     the alignment test of the 16-byte tile paths
//   validate_shape, allow_smem, launch_*   host-side checks and launches
//   mask_bias, masked_score                mask reading and the masked score
//   bwd_score, lse_log2, softmax_grad      the backward's scores, lse and dS
//   element_index, keep, keep_pair         the Philox keep decisions (params.h's element index)
//   load_tile_async                        cp.async tile loader with zero fill
//   softmax_rescale, row_lse               the online-softmax update and the final logsumexp
//   frag_* , warp_mma, store_frags         warp-level m16n8k16 MMA tiles
//   warp_* row helpers                     the one-warp-per-row loops of the general kernels
// Scores of the tensor-core kernels live in the log2 domain (scale * log2(e) folded in) so that
// softmax uses exp2; the general kernels score in natural units with exp, forward and backward
// alike (attention_fwd.cu says why).
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "attention_kernel_utils.cuh"
#include "common.cuh"
#include "params.h"
#include "philox.h"

namespace tx_kernels {
namespace attn {

using cuda::convert;
using cuda::pack2;
using cuda::warp_reduce_max;
using cuda::warp_reduce_sum;

constexpr double kLog2e = 1.4426950408889634073599246810019;
constexpr double kLn2 = 0.69314718055994530941723212145818;
constexpr float kInf = __builtin_huge_valf();

// The opt-in shared-memory limit to assume when the binding did not pass one: 99 KB, the
// smallest opt-in limit of the sm_80+ devices these kernels run on (sm_86 / sm_89). 48 KB would
// silently send most fast configurations to the slow general kernels.
constexpr int64_t kDefaultMaxSmemPerBlock = 101376;

inline int64_t smem_limit(const DeviceInfo& device) {
  return device.max_smem_per_block > 0 ? device.max_smem_per_block : kDefaultMaxSmemPerBlock;
}

// The tensor-core paths move 16-byte chunks of 2-byte elements: the base must be 16-byte aligned
// and every stride a multiple of 8 elements.
inline bool tiles_vectorizable(const void* p, const int64_t (&stride)[3]) {
  return cuda::is_aligned(p, 16) && stride[0] % 8 == 0 && stride[1] % 8 == 0 && stride[2] % 8 == 0;
}

template <typename A>
__host__ __device__ __forceinline__ constexpr A imin(A a, A b) {
  return a < b ? a : b;
}

// Sizes and mask description (the workspace queries may run before the outputs exist).
inline cudaError_t validate_shape(const AttentionParams& p) {
  if (p.batch < 0 || p.heads < 0 || p.kv_heads < 0 || p.q_len < 0 || p.kv_len < 0 || p.head_dim < 0 ||
      p.v_head_dim < 0) {
    return cudaErrorInvalidValue;
  }
  if (p.kv_heads == 0 || p.heads % p.kv_heads != 0) return cudaErrorInvalidValue;
  if (p.mask_kind != MaskKind::kNone) {
    if (p.mask == nullptr) return cudaErrorInvalidValue;
    if (p.mask_kind == MaskKind::kBool && p.mask_dtype != DType::kBool) return cudaErrorInvalidValue;
    if (p.mask_kind == MaskKind::kAdditive && p.mask_dtype == DType::kBool) return cudaErrorInvalidValue;
  }
  if (p.q == nullptr || p.k == nullptr || p.v == nullptr) return cudaErrorInvalidValue;
  return cudaSuccess;
}

// Lets `kernel` use `smem` bytes of dynamic shared memory (above 48 KB it must opt in).
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t smem) {
  if (smem <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
}

// A 1-D launch of `blocks` blocks (none: nothing to do; more than a 1-D grid holds: an error).
template <typename Kernel, typename Args>
cudaError_t launch_1d(Kernel kernel, int64_t blocks, int threads, size_t smem, cudaStream_t stream, const Args& a) {
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  TX_LAUNCH(kernel, static_cast<unsigned>(blocks), threads, smem, stream)(a);
  return cudaGetLastError();
}

// A general kernel: one warp per row, each warp with `per_warp` bytes of shared memory; 4 warps
// per block, halved until they fit the limit.
template <typename Kernel, typename Args>
cudaError_t launch_general(Kernel kernel, int64_t rows, int64_t per_warp, int64_t smem_max, cudaStream_t stream,
                           const Args& a) {
  int warps = 4;
  while (warps > 1 && warps * per_warp > smem_max) warps /= 2;
  if (warps * per_warp > smem_max) return cudaErrorNotSupported;  // head dims of tens of thousands
  const size_t smem = static_cast<size_t>(warps * per_warp);
  const cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  return launch_1d(kernel, (rows + warps - 1) / warps, warps * 32, smem, stream, a);
}

// ---------------------------------------------------------------------------------------------
// Arguments
// ---------------------------------------------------------------------------------------------
// Everything a forward kernel needs, flattened from AttentionParams by make_args. The float
// fields feed the tensor-core kernels (fp32 math); the double ones the general kernels, which
// compute in double for fp64 inputs.
struct AttnArgs {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;  // fp64 for fp64 inputs (read and written through as_acc)
  int64_t N, H, Hkv, L, S, E, Ev;  // L, S: the maximum lengths of a packed batch
  int64_t group;  // H / Hkv: query heads per key/value head
  int64_t q_stride[3], k_stride[3], v_stride[3], out_stride[3];
  const int32_t* cu_seqlens_q;  // packed batch (params.h), on the device; nullptr: padded
  const int32_t* cu_seqlens_k;

  int mask_kind;  // MaskKind as int; 0 when there is no mask
  DType mask_dtype;
  const void* mask;
  int64_t mask_stride[4];

  float scale;
  float scale_log2;  // scale * log2(e)
  double scale_d;
  bool causal;

  bool dropout;
  uint32_t drop_threshold;
  float drop_scale;
  double drop_scale_d;
  DropoutRng rng;

  int num_m_blocks;  // query tiles of the launched grid (set by the launcher)

  // Forward split-KV (num_splits > 1): key tiles per split and the fp32 partials in the workspace.
  int num_splits;
  int tiles_per_split;
  float* o_part;    // (splits, N H, L, Ev)
  float* lse_part;  // (splits, N H, L)
};

// The backward's additions.
struct BwdArgs : AttnArgs {
  const void* dout;
  void* dq;
  void* dk;
  void* dv;
  float* dmask;     // (N, H, L, S) contiguous or nullptr; fp64 for fp64 inputs (see as_acc)
  void* dsum;       // (N, H, L) Acc, workspace
  float* dq_accum;  // (N, H, L, E) fp32, workspace; nullptr: no atomics (deterministic / general)
  int64_t do_stride[3], dq_stride[3], dk_stride[3], dv_stride[3];
  int num_n_blocks;  // key tiles of the launched grid
};

inline void copy_strides(int64_t (&dst)[3], const int64_t (&src)[3]) {
  for (int d = 0; d < 3; ++d) dst[d] = src[d];
}

inline AttnArgs make_args(const AttentionParams& p) {
  AttnArgs a{};
  a.q = p.q;
  a.k = p.k;
  a.v = p.v;
  a.out = p.out;
  a.lse = static_cast<float*>(p.lse);
  a.N = p.batch;
  a.H = p.heads;
  a.Hkv = p.kv_heads;
  a.L = p.q_len;
  a.S = p.kv_len;
  a.E = p.head_dim;
  a.Ev = p.v_head_dim;
  a.group = p.kv_heads > 0 ? p.heads / p.kv_heads : 1;
  copy_strides(a.q_stride, p.q_stride);
  copy_strides(a.k_stride, p.k_stride);
  copy_strides(a.v_stride, p.v_stride);
  copy_strides(a.out_stride, p.out_stride);
  a.cu_seqlens_q = p.cu_seqlens_q;
  a.cu_seqlens_k = p.cu_seqlens_k;
  a.mask_kind = p.mask == nullptr ? 0 : static_cast<int>(p.mask_kind);
  a.mask_dtype = p.mask_dtype;
  a.mask = p.mask;
  for (int d = 0; d < 4; ++d) a.mask_stride[d] = p.mask_stride[d];
  a.scale_d = p.scale;
  a.scale = static_cast<float>(p.scale);
  a.scale_log2 = static_cast<float>(p.scale * kLog2e);
  a.causal = p.is_causal;
  // The same host-side threshold and scale functions as the CPU kernels.
  a.dropout = p.dropout_p > 0.0;
  a.drop_threshold = dropout_threshold(p.dropout_p);
  a.drop_scale_d = dropout_scale(p.dropout_p);
  a.drop_scale = static_cast<float>(a.drop_scale_d);
  a.rng = p.rng;
  a.num_m_blocks = 1;
  a.num_splits = 1;
  a.tiles_per_split = 1;
  return a;
}

inline BwdArgs make_args(const AttentionBwdParams& p, void* dsum) {
  BwdArgs a{};
  static_cast<AttnArgs&>(a) = make_args(static_cast<const AttentionParams&>(p));
  a.dout = p.grad_out;
  a.dq = p.dq;
  a.dk = p.dk;
  a.dv = p.dv;
  a.dmask = static_cast<float*>(p.dmask);
  a.dsum = dsum;
  a.dq_accum = nullptr;
  copy_strides(a.do_stride, p.grad_out_stride);
  copy_strides(a.dq_stride, p.dq_stride);
  copy_strides(a.dk_stride, p.dk_stride);
  copy_strides(a.dv_stride, p.dv_stride);
  a.num_n_blocks = 1;
  return a;
}

// Row `row0` of head (n, h) of a (batch, head, row)-strided tensor.
template <typename T>
__device__ __forceinline__ const T* head_ptr(const void* base, const int64_t (&stride)[3], int64_t n, int64_t h,
                                             int64_t row0 = 0) {
  return reinterpret_cast<const T*>(base) + n * stride[0] + h * stride[1] + row0 * stride[2];
}
template <typename T>
__device__ __forceinline__ T* head_ptr(void* base, const int64_t (&stride)[3], int64_t n, int64_t h,
                                       int64_t row0 = 0) {
  return reinterpret_cast<T*>(base) + n * stride[0] + h * stride[1] + row0 * stride[2];
}

// Where the rows of batch entry n lie. Padded: L query and S key rows from row 0 of entry n;
// lse / Dsum row (n H + h) L + i. Packed (cu_seqlens_q set; batch strides 0): sequence n is rows
// q0 .. q0 + L of q / out and k0 .. k0 + S of k / v, and its lse row is h total_q + q0 + i (lse is
// (H, total_q)). Every kernel bounds its loops by these lengths; blocks and rows past them exit.
struct SeqRows {
  int64_t L, S;             // query and key rows of the entry
  int64_t q0, k0;           // its first query / key row in the tensors (0 when padded)
  int64_t row0, head_rows;  // lse / Dsum row of (h, i): row0 + h * head_rows + i
};

__device__ __forceinline__ SeqRows seq_rows(const AttnArgs& a, int64_t n) {
  SeqRows s;
  if (a.cu_seqlens_q == nullptr) {
    s.L = a.L;
    s.S = a.S;
    s.q0 = s.k0 = 0;
    s.row0 = n * a.H * a.L;
    s.head_rows = a.L;
    return s;
  }
  s.q0 = a.cu_seqlens_q[n];
  s.L = a.cu_seqlens_q[n + 1] - s.q0;
  s.k0 = a.cu_seqlens_k[n];
  s.S = a.cu_seqlens_k[n + 1] - s.k0;
  s.row0 = s.q0;
  s.head_rows = a.cu_seqlens_q[a.N];
  return s;
}

__device__ __forceinline__ int64_t seq_row(const SeqRows& s, int64_t h, int64_t i) {
  return s.row0 + h * s.head_rows + i;
}

// lse and dmask hold Acc values (params.h: fp64 for fp64 inputs). The argument structs keep the
// float pointers the fp32-accumulating kernels use; the general kernels read them through this.
template <typename Acc, typename P>
__device__ __forceinline__ auto as_acc(P* ptr) {
  if constexpr (std::is_const_v<P>) {
    return reinterpret_cast<const Acc*>(ptr);
  } else {
    return reinterpret_cast<Acc*>(ptr);
  }
}

template <typename Acc>
__device__ __forceinline__ Acc scale_as(const AttnArgs& a) {
  return static_cast<Acc>(a.scale_d);
}
template <typename Acc>
__device__ __forceinline__ Acc drop_scale_as(const AttnArgs& a) {
  return static_cast<Acc>(a.drop_scale_d);
}

// ---------------------------------------------------------------------------------------------
// Mask and scores
// ---------------------------------------------------------------------------------------------
// Additive bias of mask element (n, h, i, j): the value itself for a floating mask, 0 / -inf for
// a bool mask (true = attend). The caller guarantees i < L and j < S.
template <typename Acc>
__device__ __forceinline__ Acc mask_bias(const AttnArgs& a, int64_t n, int64_t h, int64_t i, int64_t j) {
  const int64_t off = n * a.mask_stride[0] + h * a.mask_stride[1] + i * a.mask_stride[2] +
                      j * a.mask_stride[3];
  if (a.mask_kind == static_cast<int>(MaskKind::kBool)) {
    return reinterpret_cast<const uint8_t*>(a.mask)[off] ? Acc(0) : -static_cast<Acc>(kInf);
  }
  switch (a.mask_dtype) {
    case DType::kFloat32: return convert<Acc>(reinterpret_cast<const float*>(a.mask)[off]);
    case DType::kFloat16: return convert<Acc>(reinterpret_cast<const __half*>(a.mask)[off]);
    case DType::kBFloat16: return convert<Acc>(reinterpret_cast<const __nv_bfloat16*>(a.mask)[off]);
    case DType::kFloat64: return convert<Acc>(reinterpret_cast<const double*>(a.mask)[off]);
    default: return Acc(0);
  }
}

// A score plus the mask's bias times `factor` (log2(e) where scores live in the log2 domain).
// A bias of -inf (a False entry, or -inf in a floating mask) replaces the score, so a NaN or Inf
// score at a masked key cannot reach its row (params.h). Scores that may lie outside (L, S) or be
// -inf already (tile bounds, causal) are left alone.
template <typename Acc>
__device__ __forceinline__ Acc masked_score(const AttnArgs& a, Acc s, Acc factor, int64_t n, int64_t h,
                                            int64_t i, int64_t j) {
  if (a.mask_kind == 0 || s == -static_cast<Acc>(kInf) || i >= a.L || j >= a.S) return s;
  const Acc bias = mask_bias<Acc>(a, n, h, i, j);
  return bias == -static_cast<Acc>(kInf) ? bias : s + bias * factor;
}

// The backward tensor-core kernels' score of query i, key j (log2 domain): -inf outside the S
// keys or above the causal diagonal (tested only where the tile may cross either), plus the mask.
template <bool kFeatures>
__device__ __forceinline__ float bwd_score(const AttnArgs& a, float acc, bool need_bounds, int64_t S, int64_t n,
                                           int64_t h, int64_t i, int64_t j) {
  float s = acc * a.scale_log2;
  if (need_bounds && (j >= S || (a.causal && j > i))) s = -kInf;
  if constexpr (kFeatures) s = masked_score(a, s, static_cast<float>(kLog2e), n, h, i, j);
  return s;
}

// lse of row i, read for the log2-domain softmax of the backward: -inf (a row with no allowed
// key) becomes +inf so that exp2(s - lse) is 0 there instead of exp2(+inf); rows >= L too.
__device__ __forceinline__ float lse_log2(const AttnArgs& a, const SeqRows& seq, int64_t h, int64_t i) {
  if (i >= seq.L) return kInf;
  const float l = a.lse[seq_row(seq, h, i)];
  return l == -kInf ? kInf : l * static_cast<float>(kLog2e);
}

// dS = P (dP - D). An exactly zero probability (a masked key, every key of a fully masked row)
// contributes no gradient, also where dP - D is NaN or Inf (0 * NaN would leak it into dq and
// dk of rows that params.h promises zero gradients).
template <typename Acc>
__device__ __forceinline__ Acc softmax_grad(Acc p, Acc dp_minus_d) {
  return p == Acc(0) ? Acc(0) : p * dp_minus_d;
}

// ---------------------------------------------------------------------------------------------
// Dropout: element (n, h, i, j) is kept iff DropoutRng::word(((n H + h) L + i) S + j) >=
// dropout_threshold(p) (params.h), and kept values are multiplied by dropout_scale(p). L and S
// are the maximum lengths and i, j count within the sequence, so a packed batch drops what the
// padded op drops on it padded to those lengths.
// ---------------------------------------------------------------------------------------------
// Also the index of (n, h, i, j) in the (N, H, L, S) mask gradient (padded batches only).
__device__ __forceinline__ uint64_t element_index(const AttnArgs& a, int64_t n, int64_t h, int64_t i, int64_t j) {
  return static_cast<uint64_t>((n * a.H + h) * a.L + i) * static_cast<uint64_t>(a.S) + static_cast<uint64_t>(j);
}

__device__ __forceinline__ bool keep(const AttnArgs& a, uint64_t idx) {
  return a.rng.word(idx) >= a.drop_threshold;
}

__device__ __forceinline__ uint32_t philox_word(const Philox4& r, uint32_t which) {
  return which == 0 ? r.x : which == 1 ? r.y : which == 2 ? r.z : r.w;
}

// Keep decisions of the two consecutive elements idx and idx + 1 (same query row, adjacent
// keys): one Philox evaluation unless the pair straddles a group of four words.
__device__ __forceinline__ void keep_pair(const AttnArgs& a, uint64_t idx, bool& keep0, bool& keep1) {
  const Philox4 r = a.rng.words(idx >> 2);
  const uint32_t w0 = philox_word(r, static_cast<uint32_t>(idx & 3));
  const uint32_t w1 = (idx & 3) == 3 ? a.rng.words((idx >> 2) + 1).x
                                     : philox_word(r, static_cast<uint32_t>((idx + 1) & 3));
  keep0 = w0 >= a.drop_threshold;
  keep1 = w1 >= a.drop_threshold;
}

// ---------------------------------------------------------------------------------------------
// cp.async tile loader
// ---------------------------------------------------------------------------------------------
// Issues cp.async copies of rows [row0, row0 + kRows) x columns [0, D) of a row-major global
// matrix (row stride `row_stride` elements; `nrows` rows and `ncols` columns exist, ncols % 8 ==
// 0) into a shared tile whose rows are kStride elements apart. Chunks outside the matrix are
// zero-filled, so tail rows and padded head-dim columns read as exact zeros: they add nothing to
// any dot product and, multiplied by zero probabilities, never create NaN.
// Thread tid always copies the 16-byte column chunk tid % (D / 8) of rows tid / (D / 8) + it *
// kRowsPerIter, so it needs one column offset and one row step, not one 64-bit address per chunk
// (those would stay live across the main loop and cost registers). When D / 8 does not divide the
// thread count (D = 96), the last few threads idle.
template <int kRows, int D, int kStride, int kNThreads, typename T>
__device__ __forceinline__ void load_tile_async(T* s, const T* g, int64_t row_stride, int64_t row0,
                                                int64_t nrows, int64_t ncols, int tid) {
  constexpr int kChunksPerRow = D / 8;
  constexpr int kRowsPerIter = kNThreads / kChunksPerRow;
  static_assert(kRowsPerIter > 0, "tile loader needs at least one row per pass");
  constexpr int kIters = (kRows + kRowsPerIter - 1) / kRowsPerIter;
  const int r0 = tid / kChunksPerRow;
  const int col = (tid % kChunksPerRow) * 8;
  if (r0 >= kRowsPerIter) return;
  const bool col_ok = col < ncols;
  const T* src_row = g + (row0 + r0) * row_stride + col;
  const int64_t step = static_cast<int64_t>(kRowsPerIter) * row_stride;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int r = r0 + it * kRowsPerIter;
    if (kRows % kRowsPerIter == 0 || r < kRows) {
      const bool valid = col_ok && row0 + r < nrows;
      cp_async_16(s + r * kStride + col, valid ? src_row + it * step : g, valid);
    }
  }
}

// One step of a double-buffered cp.async pipeline: with a next tile in flight (committed by the
// caller), wait for all but that one; else for everything. Then the block sees the landed tile.
__device__ __forceinline__ void pipeline_wait(bool next_in_flight) {
  if (next_in_flight) {
    cp_async_wait<1>();
  } else {
    cp_async_wait<0>();
  }
  __syncthreads();
}

// ---------------------------------------------------------------------------------------------
// Online softmax (log2 domain)
// ---------------------------------------------------------------------------------------------
// Folds a tile's row maximum into the running maximum m and returns the factor that rescales the
// running sum and output accumulated so far; m_use is what the tile's scores subtract. A row with
// no allowed key so far keeps m = -inf; subtracting 0 instead keeps exp2(-inf - m) at 0, not NaN.
// kLog2Domain = false: scores in natural units (the general kernels), exp instead of exp2.
template <typename Acc, bool kLog2Domain = true>
__device__ __forceinline__ Acc softmax_rescale(Acc& m, Acc tile_max, Acc& m_use) {
  const Acc mx = tile_max > m ? tile_max : m;
  m_use = mx == -static_cast<Acc>(kInf) ? Acc(0) : mx;
  const Acc alpha = kLog2Domain ? fast_exp2(m - m_use) : exp_acc(m - m_use);
  m = mx;
  return alpha;
}

// Natural-log lse of a row from its maximum (log2 domain unless kLog2Domain is false) and sum.
// l == 0 when every score of the row was -inf: -inf (the general forward tells a row the mask
// emptied from one that is NaN in torch; the tensor-core kernels treat both as empty). A NaN l
// (a NaN score) reaches lse, hence no `l > 0` test.
template <typename Acc, bool kLog2Domain = true>
__device__ __forceinline__ Acc row_lse(Acc m, Acc l) {
  if (l == Acc(0)) return -static_cast<Acc>(kInf);
  return (kLog2Domain ? m * static_cast<Acc>(kLn2) : m) + fast_log(l);
}

// ---------------------------------------------------------------------------------------------
// Warp-level MMA tiles (mma.sync m16n8k16, fp32 accumulators; layouts in attention_kernel_utils.cuh)
// ---------------------------------------------------------------------------------------------
// A fragment of k-step kk from 16 rows of a shared tile stored with the m index as its row
// (lanes 0-7: rows 0-7 / cols 0-7 (a0), 8-15: rows 8-15 (a1), 16-31: cols 8-15 (a2, a3)).
template <typename T>
__device__ __forceinline__ void frag_a(uint32_t (&a)[4], const T* s, int stride, int kk, int lane) {
  ldmatrix_x4(a, s + (lane & 15) * stride + kk * 16 + (lane >> 4) * 8);
}

// The same from a tile stored transposed (k index as the row, m index as the column), via .trans:
// lanes 0-7 address k rows kk*16.. at m 0 (a0), 8-15 m + 8 (a1), 16-23 k + 8 (a2), 24-31 both (a3).
template <typename T>
__device__ __forceinline__ void frag_a_t(uint32_t (&a)[4], const T* s, int stride, int kk, int lane) {
  ldmatrix_x4_trans(a, s + (kk * 16 + (lane & 7) + ((lane >> 4) << 3)) * stride + ((lane >> 3) & 1) * 8);
}

// B fragments of n-tiles nt and nt + 1 at k-step kk from a tile stored with the n index as its
// row ("column-major B", e.g. K rows for Q K^T): lanes 0-7 rows nt*8.. / k 0-7 (b0 of nt), 8-15
// k 8-15 (b1 of nt), 16-31 the same for rows nt*8 + 8.. (n-tile nt + 1).
template <typename T>
__device__ __forceinline__ void frag_b(uint32_t (&b)[4], const T* s, int stride, int nt, int kk, int lane) {
  ldmatrix_x4(b, s + (nt * 8 + (lane & 7) + ((lane >> 4) << 3)) * stride + kk * 16 + ((lane >> 3) & 1) * 8);
}

// The same from a tile stored with the k index as its row (e.g. V rows for P V), via .trans:
// lanes 0-15 address k rows kk*16.. at column nt*8, lanes 16-31 at nt*8 + 8.
template <typename T>
__device__ __forceinline__ void frag_b_t(uint32_t (&b)[4], const T* s, int stride, int nt, int kk, int lane) {
  ldmatrix_x4_trans(b, s + (kk * 16 + (lane & 15)) * stride + nt * 8 + (lane >> 4) * 8);
}

// A fragment of k-step kp from fp32 accumulators of a 16-row tile: the accumulators of n-tiles
// 2 kp and 2 kp + 1 are exactly that fragment, so P never takes a trip through shared memory.
// f(x, nt, e) transforms each value on the way (dropout); identity by default.
struct Identity {
  __device__ __forceinline__ float operator()(float x, int, int) const { return x; }
};

template <typename T, int kN, typename F = Identity>
__device__ __forceinline__ void frag_a_acc(uint32_t (&a)[4], const float (&acc)[kN][4], int kp, F f = {}) {
  const int n0 = 2 * kp, n1 = 2 * kp + 1;
  a[0] = pack2<T>(f(acc[n0][0], n0, 0), f(acc[n0][1], n0, 1));
  a[1] = pack2<T>(f(acc[n0][2], n0, 2), f(acc[n0][3], n0, 3));
  a[2] = pack2<T>(f(acc[n1][0], n1, 0), f(acc[n1][1], n1, 1));
  a[3] = pack2<T>(f(acc[n1][2], n1, 2), f(acc[n1][3], n1, 3));
}

// acc(mt, nt) += A_mt B_nt summed over kK k-steps of 16, for kM m-tiles and kN n-tiles (kN even):
// get_a(a, mt, kk) provides the A fragment of m-tile mt, get_b(b, nt, kk) the B fragments of
// n-tiles nt and nt + 1. Each B pair feeds all kM m-tiles: that reuse is what keeps shared-memory
// traffic below the MMA rate when kM = 2.
template <typename T, int kM, int kN, int kK, typename AccAt, typename GetA, typename GetB>
__device__ __forceinline__ void warp_mma_tiles(AccAt&& acc, GetA&& get_a, GetB&& get_b) {
  static_assert(kN % 2 == 0, "B fragments come in n-tile pairs");
#pragma unroll
  for (int kk = 0; kk < kK; ++kk) {
    uint32_t a[kM][4];
#pragma unroll
    for (int mt = 0; mt < kM; ++mt) get_a(a[mt], mt, kk);
#pragma unroll
    for (int nt = 0; nt < kN; nt += 2) {
      uint32_t b[4];
      get_b(b, nt, kk);
#pragma unroll
      for (int mt = 0; mt < kM; ++mt) {
        mma_16816<T>(acc(mt, nt), a[mt], b[0], b[1]);
        mma_16816<T>(acc(mt, nt + 1), a[mt], b[2], b[3]);
      }
    }
  }
}

template <typename T, int kK, int kM, int kN, typename GetA, typename GetB>
__device__ __forceinline__ void warp_mma(float (&acc)[kM][kN][4], GetA&& get_a, GetB&& get_b) {
  warp_mma_tiles<T, kM, kN, kK>([&](int mt, int nt) -> float (&)[4] { return acc[mt][nt]; }, get_a, get_b);
}

// One m-tile: acc[nt] += A B_nt.
template <typename T, int kK, int kN, typename GetA, typename GetB>
__device__ __forceinline__ void warp_mma(float (&acc)[kN][4], GetA&& get_a, GetB&& get_b) {
  warp_mma_tiles<T, 1, kN, kK>([&](int, int nt) -> float (&)[4] { return acc[nt]; },
                               [&](uint32_t (&a)[4], int, int kk) { get_a(a, kk); }, get_b);
}

// Sets every element of a (nested) float array to 0.
__device__ __forceinline__ void zero(float& x) { x = 0.f; }
template <typename E, int N>
__device__ __forceinline__ void zero(E (&x)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) zero(x[i]);
}

// Stores the 16-row fp32 accumulator tile `acc` (kN n-tiles of 8 columns) as T into a shared tile
// (row stride `stride`): rows g scaled by f0, rows g + 8 by f1.
template <typename T, int kN>
__device__ __forceinline__ void store_frags(T* s, int stride, const float (&acc)[kN][4], float f0, float f1,
                                            int lane) {
  const int g = lane >> 2, c = (lane & 3) * 2;
#pragma unroll
  for (int nt = 0; nt < kN; ++nt) {
    *reinterpret_cast<uint32_t*>(s + g * stride + nt * 8 + c) = pack2<T>(acc[nt][0] * f0, acc[nt][1] * f0);
    *reinterpret_cast<uint32_t*>(s + (g + 8) * stride + nt * 8 + c) = pack2<T>(acc[nt][2] * f1, acc[nt][3] * f1);
  }
}

// One warp copies rows [0, kRows) x columns [0, D) of a shared tile (row stride `stride`) to
// global rows row0 + r (those < nrows; columns < ncols) in 16-byte chunks.
template <int kRows, int D, typename T>
__device__ __forceinline__ void warp_store_rows(T* g, int64_t row_stride, int64_t row0, int64_t nrows,
                                                int64_t ncols, const T* s, int stride, int lane) {
  constexpr int kChunksPerRow = D / 8;
  static_assert(kRows * kChunksPerRow % 32 == 0, "whole passes of the warp");
#pragma unroll
  for (int it = 0; it < kRows * kChunksPerRow / 32; ++it) {
    const int c = lane + it * 32;
    const int r = c / kChunksPerRow;
    const int col = (c % kChunksPerRow) * 8;
    if (row0 + r < nrows && col < ncols) {
      *reinterpret_cast<uint4*>(g + (row0 + r) * row_stride + col) =
          *reinterpret_cast<const uint4*>(s + r * stride + col);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// General kernels: one warp per row, lanes over the columns
// ---------------------------------------------------------------------------------------------
// x[c] = convert(g[c]) * f for c < n, by the lanes of a warp.
template <typename Acc, typename T>
__device__ __forceinline__ void warp_load_row(Acc* x, const T* g, int64_t n, Acc f, int lane) {
  for (int64_t c = lane; c < n; c += 32) x[c] = convert<Acc>(g[c]) * f;
}

// g[c] = T(x[c] * f) for c < n.
template <typename T, typename Acc>
__device__ __forceinline__ void warp_store_row(T* g, const Acc* x, int64_t n, Acc f, int lane) {
  for (int64_t c = lane; c < n; c += 32) g[c] = convert<T>(x[c] * f);
}

// x[c] = x[c] * alpha + sum_t w[t] g[t * row_stride + c] over cnt rows of g, for c < n.
template <typename Acc, typename T>
__device__ __forceinline__ void warp_axpy_rows(Acc* x, int64_t n, Acc alpha, const Acc* w, int cnt, const T* g,
                                               int64_t row_stride, int lane) {
  for (int64_t c = lane; c < n; c += 32) {
    Acc acc = x[c] * alpha;
    for (int t = 0; t < cnt; ++t) acc += w[t] * convert<Acc>(g[t * row_stride + c]);
    x[c] = acc;
  }
}

// sum_c x[c] g[c] over c < n by one thread.
template <typename Acc, typename T>
__device__ __forceinline__ Acc dot_row(const Acc* x, const T* g, int64_t n) {
  Acc dot = Acc(0);
  for (int64_t c = 0; c < n; ++c) dot += x[c] * convert<Acc>(g[c]);
  return dot;
}

}  // namespace attn
}  // namespace tx_kernels
