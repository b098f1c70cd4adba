// attention_fwd.cu: fused scaled-dot-product attention forward (FlashAttention-2 scheme), torch-free.
//
// Semantics: csrc/kernels/params.h (AttentionParams). Entry points: csrc/kernels/launchers.h.
//
// Three kernels:
//
// 1. attention_fwd_fast_kernel<T, D, kBlockM, kBlockN, kMTiles, kFeatures>  (fp16 / bf16, E == Ev)
//    One thread block per (query tile of kBlockM rows, key split, head, batch); each warp owns
//    16 * kMTiles consecutive query rows (kMTiles m16 MMA row tiles; 2 for D <= 128, so that every
//    K / V fragment read from shared memory feeds two MMAs per m-tile pair: with one m-tile per
//    warp the ldmatrix traffic, 512 B per 2 MMAs, would exceed the MMA rate on H100).
//    Shared memory holds the Q tile and two stages of K and V tiles (kBlockN rows each), rows
//    padded to D + 8 elements so that the 8 row addresses of every ldmatrix phase (and every
//    cp.async 128-byte phase) fall in distinct banks: a row is 2D + 16 bytes, i.e. 4 banks
//    (mod 32) further than the previous one.
//    Pipeline per key tile t (one cp.async group per tile = K_t + V_t):
//        issue cp.async K_{t+1}, V_{t+1} into the other stage; wait for tile t; __syncthreads
//        S = Q K_t^T        mma.sync m16n8k16, A = Q (ldmatrix; kept in registers when
//                           kMTiles * D <= 128, re-read from shared memory otherwise),
//                           B = K rows (ldmatrix, non-transposed: K is already "col-major B")
//        scale (log2 e folded in), bounds / causal / mask / dropout on the fp32 scores
//        online softmax: running max m and partial row sum l in fp32 registers, exp2f
//        O += P V           P re-packed from the S accumulators into A fragments (no smem trip),
//                           B = V rows via ldmatrix.trans
//        __syncthreads      (the stage just read is overwritten by the next iteration's prefetch)
//    Causal (top-left): key tiles entirely above the diagonal of the block are never loaded; the
//    per-element bounds test runs only on tiles that cross the diagonal or the end of the keys.
//    Head dims are instantiated at D = 32, 64, 96, 128, 256; any E with E % 8 == 0 and E <= 256
//    runs on the next instantiation with zero padding (cp.async zero-fill; 80 -> 96, 160 -> 256),
//    which changes no score (padded q and k columns are 0) and no written output (padded v columns
//    are never stored).
//    kFeatures = false compiles out the mask and dropout code (the common fast case); causal is a
//    run-time flag because it only changes loop bounds and which tiles take the bounds test.
//    Epilogue: O / l staged through the warp's own Q rows in shared memory, then written with
//    16-byte stores (rows >= L skipped); lse = m ln 2 + ln l; l == 0 (fully masked row) gives
//    out = 0 and lse = -inf.
//
//    Configurations: FastTraits<D> (tile sizes, warps, shared-memory bytes); D = 96 and 128 take
//    kBlockN = 32 because 2 x 16 rows x 64 keys of fp32 scores plus 2 x 16 x D fp32 accumulators
//    do not fit next to everything else (they spilled). Registers and spills per instantiation:
//    scripts/check_cuda_compile.sh. With 4 warps = 128 threads, up to 255 registers still allow
//    2 blocks per SM.
//
//    Tuning knobs (untimed so far): FastTraits<D> (kBlockM, kBlockN, kMTiles: kMTiles = 1 is the
//    conservative fallback), the split heuristic in make_plan, and splitting the one cp.async group
//    per tile into K and V groups so that Q K^T starts before V has landed.
//
// 2. Split-KV (decode: L <= 64 and too few blocks to fill the SMs): the same fast kernel, but
//    blockIdx also selects a contiguous range of key tiles; each block writes its normalized
//    partial output (fp32) and partial lse to a caller-provided workspace, and
//    attention_fwd_combine_kernel merges the splits: lse = log sum_s exp(lse_s),
//    out = sum_s exp(lse_s - lse) o_s. Workspace size: attention_fwd_workspace_bytes().
//
// 3. attention_fwd_general_kernel<T, Acc>: everything else (fp32 and fp64 inputs, Ev != E, head
//    dims not a multiple of 8 or > 256, misaligned pointers or strides, too little shared memory).
//    One warp per query row, Acc = fp32 (fp64 for fp64 inputs) math, online softmax over blocks
//    of 32 keys (lane j scores key j0 + j), q row and output accumulator in shared memory; K and V
//    are read straight from global memory through the caches. Simple and correct, not fast.
//
// Dropout: element (n, h, i, j) is kept iff DropoutRng::word(((n H + h) L + i) S + j) >=
// dropout_threshold(p), and kept probabilities are multiplied by dropout_scale(p); the row sum l
// is accumulated before dropout, so out = sum_j keep_j scale_p p_j v_j / l, exactly the CPU op.
#include <cmath>
#include <cstdint>
#include <limits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "attention_kernel_utils.cuh"
#include "launchers.h"
#include "params.h"

namespace tx_kernels {
namespace {

using namespace attn;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Everything a kernel needs, flattened from AttentionParams by the launcher.
struct FwdArgs {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;
  int64_t N, H, L, S, E, Ev;
  int64_t group;  // H / Hkv: query heads per key/value head
  int64_t q_stride[3], k_stride[3], v_stride[3], out_stride[3];

  int mask_kind;  // MaskKind as int
  DType mask_dtype;
  const void* mask;
  int64_t mask_stride[4];

  float scale_log2;  // scale * log2(e) (fast kernel: scores live in the log2 domain)
  double scale;      // general kernel: fp64 inputs compute in double (params.h)
  bool causal;

  bool dropout;
  uint32_t drop_threshold;
  float drop_scale;
  double drop_scale_d;  // general kernel with fp64 accumulation
  DropoutRng rng;

  // Fast kernel grid decomposition and split-KV.
  int num_m_blocks;
  int num_splits;        // 1: write out / lse directly
  int tiles_per_split;   // key tiles per split
  float* o_part;         // (splits, N*H, L, Ev) fp32 when num_splits > 1
  float* lse_part;       // (splits, N*H, L) fp32 when num_splits > 1
};

// Additive bias of mask element (n, h, i, j): the value itself for a floating mask, 0 / -inf for
// a bool mask (true = attend). Caller guarantees i < L and j < S.
template <typename Acc>
__device__ __forceinline__ Acc mask_bias(const FwdArgs& a, int64_t n, int64_t h, int64_t i, int64_t j) {
  const int64_t off = n * a.mask_stride[0] + h * a.mask_stride[1] + i * a.mask_stride[2] +
                      j * a.mask_stride[3];
  if (a.mask_kind == static_cast<int>(MaskKind::kBool)) {
    return reinterpret_cast<const uint8_t*>(a.mask)[off] ? Acc(0) : -static_cast<Acc>(__builtin_huge_valf());
  }
  switch (a.mask_dtype) {
    case DType::kFloat32: return static_cast<Acc>(reinterpret_cast<const float*>(a.mask)[off]);
    case DType::kFloat16: return static_cast<Acc>(__half2float(reinterpret_cast<const __half*>(a.mask)[off]));
    case DType::kBFloat16:
      return static_cast<Acc>(__bfloat162float(reinterpret_cast<const __nv_bfloat16*>(a.mask)[off]));
    case DType::kFloat64: return static_cast<Acc>(reinterpret_cast<const double*>(a.mask)[off]);
    default: return Acc(0);
  }
}

__device__ __forceinline__ uint32_t philox_pick(const Philox4& r, uint32_t which) {
  return which == 0 ? r.x : which == 1 ? r.y : which == 2 ? r.z : r.w;
}

// Keep decisions for the two consecutive elements idx and idx + 1 (one Philox call unless the
// pair straddles a group of four).
__device__ __forceinline__ void dropout_pair(const FwdArgs& a, uint64_t idx, bool& keep0, bool& keep1) {
  const Philox4 r = a.rng.words(idx >> 2);
  const uint32_t w0 = philox_pick(r, static_cast<uint32_t>(idx & 3));
  const uint32_t w1 = (idx & 3) == 3 ? a.rng.words((idx >> 2) + 1).x
                                     : philox_pick(r, static_cast<uint32_t>((idx + 1) & 3));
  keep0 = w0 >= a.drop_threshold;
  keep1 = w1 >= a.drop_threshold;
}

// ---------------------------------------------------------------------------------------------
// Fast kernel
// ---------------------------------------------------------------------------------------------
template <int D>
struct FastTraits;
// kMTiles: m16 tiles per warp (rows per warp = 16 kMTiles). 2 halves the shared-memory reads per
// MMA (each K / V fragment feeds two MMAs per m-tile pair) at the cost of twice the accumulators;
// setting it to 1 (8 warps for kBlockM = 128) is the low-register fallback.
template <> struct FastTraits<32> { static constexpr int kBlockM = 128, kBlockN = 64, kMTiles = 2; };
template <> struct FastTraits<64> { static constexpr int kBlockM = 128, kBlockN = 64, kMTiles = 2; };
template <> struct FastTraits<96> { static constexpr int kBlockM = 128, kBlockN = 32, kMTiles = 2; };
template <> struct FastTraits<128> { static constexpr int kBlockM = 128, kBlockN = 32, kMTiles = 2; };
template <> struct FastTraits<256> { static constexpr int kBlockM = 64, kBlockN = 32, kMTiles = 1; };

template <int D>
constexpr size_t fast_smem_bytes() {
  return static_cast<size_t>(FastTraits<D>::kBlockM + 4 * FastTraits<D>::kBlockN) * (D + 8) * 2;
}

// Issues cp.async copies of rows [row0, row0 + kRows) x cols [0, D) of a row-major global matrix
// (row stride `row_stride` elements, `nrows` valid rows, `ncols` valid columns, ncols % 8 == 0)
// into a padded shared tile of row stride D + 8. Invalid chunks are zero-filled.
// Thread tid always copies the 16-byte column chunk tid % (D / 8) of rows tid / (D / 8) + it *
// kRowsPerIter, so it needs one column offset and one row stride step, not one 64-bit address per
// chunk (those would stay live across the main loop and cost registers). When D / 8 does not
// divide the thread count (D = 96), the last few threads idle.
template <int kRows, int D, int kNThreads, typename T>
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
      cp_async_16(s + r * (D + 8) + col, valid ? src_row + it * step : g, valid);
    }
  }
}

template <typename T, int D, int kBlockM, int kBlockN, int kMTiles, bool kFeatures>
__global__ void __launch_bounds__(kBlockM / (16 * kMTiles) * 32, 1)
    attention_fwd_fast_kernel(const FwdArgs a) {
  constexpr int kWarpRows = 16 * kMTiles;  // query rows per warp: kMTiles m16 tiles
  constexpr int kNWarps = kBlockM / kWarpRows;
  constexpr int kNThreads = kNWarps * 32;
  constexpr int kStride = D + 8;    // padded shared row, elements
  constexpr int kNT = kBlockN / 8;  // n-tiles of S per m-tile
  constexpr int kKT = D / 16;       // k-steps of Q K^T
  constexpr int kDT = D / 8;        // n-tiles of O per m-tile
  constexpr int kPK = kBlockN / 16; // k-steps of P V
  // Q fragments cost kMTiles * D / 4 registers; keep them only while that stays small.
  constexpr bool kQInRegs = kMTiles * D <= 128;
  static_assert(kBlockM % kWarpRows == 0 && kBlockN % 16 == 0 && D % 16 == 0, "tile shapes");
  constexpr float kInf = __builtin_huge_valf();

  TX_DYNAMIC_SHARED(unsigned char, smem_raw);
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kBlockM * kStride;      // 2 stages of kBlockN rows
  T* sV = sK + 2 * kBlockN * kStride;  // 2 stages of kBlockN rows

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;

  // blockIdx.x -> (m tile fastest, split, head, batch): consecutive blocks share K/V in L2.
  int64_t bid = blockIdx.x;
  const int m_idx = static_cast<int>(bid % a.num_m_blocks);
  bid /= a.num_m_blocks;
  const int split = static_cast<int>(bid % a.num_splits);
  bid /= a.num_splits;
  const int64_t h = bid % a.H;
  const int64_t n = bid / a.H;
  // Causal: the last query tiles have the most key tiles; start them first.
  const int m_block = a.causal ? (a.num_m_blocks - 1 - m_idx) : m_idx;
  const int64_t m0 = static_cast<int64_t>(m_block) * kBlockM;
  const int64_t hk = h / a.group;
  const int64_t L = a.L, S = a.S;

  const T* gq = reinterpret_cast<const T*>(a.q) + n * a.q_stride[0] + h * a.q_stride[1];
  const T* gk = reinterpret_cast<const T*>(a.k) + n * a.k_stride[0] + hk * a.k_stride[1];
  const T* gv = reinterpret_cast<const T*>(a.v) + n * a.v_stride[0] + hk * a.v_stride[1];

  // Key tiles [t_begin, t_end) of this block.
  const int64_t n_tiles = (S + kBlockN - 1) / kBlockN;
  const int64_t t_begin = static_cast<int64_t>(split) * a.tiles_per_split;
  int64_t t_end = t_begin + a.tiles_per_split < n_tiles ? t_begin + a.tiles_per_split : n_tiles;
  if (a.causal) {
    // Query rows of this block that exist end at min(L, m0 + kBlockM); they see keys < that.
    int64_t keys = m0 + kBlockM < L ? m0 + kBlockM : L;
    keys = keys < S ? keys : S;
    const int64_t causal_tiles = (keys + kBlockN - 1) / kBlockN;
    t_end = t_end < causal_tiles ? t_end : causal_tiles;
  }

  // This warp owns query rows warp_row0 + [0, kWarpRows); m-tile mt covers rows mt*16 + [0, 16).
  const int64_t warp_row0 = m0 + warp * kWarpRows;
  const bool warp_active = warp_row0 < L;  // warps past the last query row only help load
  // Fragment coordinates of this lane: rows g and g + 8 of each m-tile, columns c and c + 1.
  const int g = lane >> 2;
  const int col_q = (lane & 3) * 2;

  float acc_o[kMTiles][kDT][4];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[mt][dt][e] = 0.f;
    }
  }
  // Running max (log2 domain) and this thread's partial row sum (quad-reduced at the end) of
  // rows g (index 0) and g + 8 (index 1) of each m-tile.
  float row_m[kMTiles][2], row_l[kMTiles][2];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
    row_m[mt][0] = row_m[mt][1] = -kInf;
    row_l[mt][0] = row_l[mt][1] = 0.f;
  }
  uint32_t q_frag[kQInRegs ? kMTiles : 1][kQInRegs ? kKT : 1][4];

  if (t_begin < t_end) {
    load_tile_async<kBlockM, D, kNThreads>(sQ, gq, a.q_stride[2], m0, L, a.E, tid);
    load_tile_async<kBlockN, D, kNThreads>(sK, gk, a.k_stride[2], t_begin * kBlockN, S, a.E, tid);
    load_tile_async<kBlockN, D, kNThreads>(sV, gv, a.v_stride[2], t_begin * kBlockN, S, a.E, tid);
    cp_async_commit();
  }

  const T* sQw = sQ + warp * kWarpRows * kStride;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int stage = static_cast<int>((t - t_begin) & 1);
    if (t + 1 < t_end) {
      const int next = stage ^ 1;
      load_tile_async<kBlockN, D, kNThreads>(sK + next * kBlockN * kStride, gk, a.k_stride[2],
                                              (t + 1) * kBlockN, S, a.E, tid);
      load_tile_async<kBlockN, D, kNThreads>(sV + next * kBlockN * kStride, gv, a.v_stride[2],
                                              (t + 1) * kBlockN, S, a.E, tid);
      cp_async_commit();
      cp_async_wait<1>();  // tile t (and Q) landed; tile t + 1 may still be in flight
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    if (warp_active) {
      const T* sKs = sK + stage * kBlockN * kStride;
      const T* sVs = sV + stage * kBlockN * kStride;
      if constexpr (kQInRegs) {
        if (t == t_begin) {
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
            for (int kk = 0; kk < kKT; ++kk) {
              ldmatrix_x4(q_frag[mt][kk],
                          sQw + (mt * 16 + (lane & 15)) * kStride + kk * 16 + (lane >> 4) * 8);
            }
          }
        }
      }

      // ---- S = Q K^T (kWarpRows x kBlockN per warp) ----
      float acc_s[kMTiles][kNT][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) acc_s[mt][nt][e] = 0.f;
        }
      }
#pragma unroll
      for (int kk = 0; kk < kKT; ++kk) {
        uint32_t qa[kMTiles][4];
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          if constexpr (kQInRegs) {
#pragma unroll
            for (int r = 0; r < 4; ++r) qa[mt][r] = q_frag[mt][kk][r];
          } else {
            // lanes 0-7: rows 0-7 / cols 0-7 (a0), 8-15: rows 8-15 (a1), 16-31: cols 8-15 (a2, a3)
            ldmatrix_x4(qa[mt], sQw + (mt * 16 + (lane & 15)) * kStride + kk * 16 + (lane >> 4) * 8);
          }
        }
#pragma unroll
        for (int nt = 0; nt < kNT; nt += 2) {
          // lanes 0-7: keys nt*8+0..7 / d 0-7 (b0 of nt), 8-15: d 8-15 (b1 of nt),
          // 16-23, 24-31: the same for keys nt*8+8..15 (n-tile nt + 1). Each B fragment feeds
          // all kMTiles m-tiles: that reuse is what keeps shared-memory traffic below the MMA rate.
          uint32_t kb[4];
          ldmatrix_x4(kb, sKs + (nt * 8 + (lane & 7) + ((lane >> 4) << 3)) * kStride + kk * 16 +
                              ((lane >> 3) & 1) * 8);
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) {
            mma_16816<T>(acc_s[mt][nt], qa[mt], kb[0], kb[1]);
            mma_16816<T>(acc_s[mt][nt + 1], qa[mt], kb[2], kb[3]);
          }
        }
      }

      // ---- scale, bounds, causal, mask ----
      // Key j = n0 + jl of this tile is allowed for row i iff jl < lim(i) = min(S, causal ? i + 1
      // : S) - n0, an int in [.., kBlockN] after clamping: 32-bit compares per element.
      const int64_t n0 = t * kBlockN;
      const bool need_bounds = (n0 + kBlockN > S) || (a.causal && n0 + kBlockN - 1 > warp_row0);
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        const int64_t row_g = warp_row0 + mt * 16 + g;  // rows row_g (e = 0, 1), row_g + 8 (e = 2, 3)
        int lim[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          int64_t end = a.causal ? row_g + r * 8 + 1 : S;
          end = end < S ? end : S;
          const int64_t rel = end - n0;
          lim[r] = rel < 0 ? 0 : (rel > kBlockN ? kBlockN : static_cast<int>(rel));
        }
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int jl = nt * 8 + col_q + (e & 1);
            float s = acc_s[mt][nt][e] * a.scale_log2;
            if (need_bounds && jl >= lim[e >> 1]) s = -kInf;
            if constexpr (kFeatures) {
              const int64_t i = row_g + ((e >> 1) << 3);
              const int64_t j = n0 + jl;
              if (a.mask_kind != 0 && s != -kInf && i < L && j < S) {
                s = add_mask(s, mask_bias<float>(a, n, h, i, j), kLog2e);
              }
            }
            acc_s[mt][nt][e] = s;
          }
        }
      }

      // ---- online softmax ----
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        float mx[2] = {row_m[mt][0], row_m[mt][1]};
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
          mx[0] = fmaxf(mx[0], fmaxf(acc_s[mt][nt][0], acc_s[mt][nt][1]));
          mx[1] = fmaxf(mx[1], fmaxf(acc_s[mt][nt][2], acc_s[mt][nt][3]));
        }
        float m_use[2], alpha[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          mx[r] = quad_max(mx[r]);
          // A row with no allowed key so far keeps m = -inf; subtracting 0 instead of -inf
          // keeps exp2(-inf - m) at 0 instead of NaN.
          m_use[r] = mx[r] == -kInf ? 0.f : mx[r];
          alpha[r] = fast_exp2(row_m[mt][r] - m_use[r]);
          row_m[mt][r] = mx[r];
        }
        float rs[2] = {0.f, 0.f};
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float p = fast_exp2(acc_s[mt][nt][e] - m_use[e >> 1]);
            acc_s[mt][nt][e] = p;
            rs[e >> 1] += p;
          }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) row_l[mt][r] = row_l[mt][r] * alpha[r] + rs[r];
#pragma unroll
        for (int dt = 0; dt < kDT; ++dt) {
          acc_o[mt][dt][0] *= alpha[0];
          acc_o[mt][dt][1] *= alpha[0];
          acc_o[mt][dt][2] *= alpha[1];
          acc_o[mt][dt][3] *= alpha[1];
        }
      }

      if constexpr (kFeatures) {
        if (a.dropout) {
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              const int64_t i = warp_row0 + mt * 16 + g + r * 8;
              if (i < L) {
                const uint64_t row_base = (static_cast<uint64_t>(n * a.H + h) * L + i) * S;
#pragma unroll
                for (int nt = 0; nt < kNT; ++nt) {
                  const int64_t j = n0 + nt * 8 + col_q;
                  if (j < S) {
                    bool k0, k1;
                    dropout_pair(a, row_base + j, k0, k1);
                    acc_s[mt][nt][2 * r] = k0 ? acc_s[mt][nt][2 * r] * a.drop_scale : 0.f;
                    acc_s[mt][nt][2 * r + 1] = k1 ? acc_s[mt][nt][2 * r + 1] * a.drop_scale : 0.f;
                  }
                }
              }
            }
          }
        }
      }

      // ---- O += P V ----
#pragma unroll
      for (int kp = 0; kp < kPK; ++kp) {
        // The S accumulators of n-tiles 2kp, 2kp+1 are exactly the A fragment of k-step kp.
        uint32_t pa[kMTiles][4];
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          pa[mt][0] = TypeTraits<T>::pack2(acc_s[mt][2 * kp][0], acc_s[mt][2 * kp][1]);
          pa[mt][1] = TypeTraits<T>::pack2(acc_s[mt][2 * kp][2], acc_s[mt][2 * kp][3]);
          pa[mt][2] = TypeTraits<T>::pack2(acc_s[mt][2 * kp + 1][0], acc_s[mt][2 * kp + 1][1]);
          pa[mt][3] = TypeTraits<T>::pack2(acc_s[mt][2 * kp + 1][2], acc_s[mt][2 * kp + 1][3]);
        }
#pragma unroll
        for (int dt = 0; dt < kDT; dt += 2) {
          // lanes 0-7: keys 0-7 / d dt*8.. (b0 of dt), 8-15: keys 8-15 (b1 of dt),
          // 16-31: the same for d dt*8+8.. (n-tile dt + 1); .trans turns rows into columns.
          uint32_t vb[4];
          ldmatrix_x4_trans(vb, sVs + (kp * 16 + (lane & 15)) * kStride + dt * 8 + (lane >> 4) * 8);
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) {
            mma_16816<T>(acc_o[mt][dt], pa[mt], vb[0], vb[1]);
            mma_16816<T>(acc_o[mt][dt + 1], pa[mt], vb[2], vb[3]);
          }
        }
      }
    }
    __syncthreads();  // everyone is done with this stage before the next prefetch overwrites it
  }

  // ---- epilogue ----
  float inv[kMTiles][2], lse_row[kMTiles][2];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float l = quad_sum(row_l[mt][r]);
      // l == 0 exactly when every key of the row was masked (the row max keeps one term at 1
      // otherwise); a NaN l (a NaN score) must reach out and lse, so no `l > 0` test.
      inv[mt][r] = l != 0.f ? 1.f / l : 0.f;
      lse_row[mt][r] = l != 0.f ? row_m[mt][r] * kLn2 + fast_log(l) : -kInf;
      if (l == 0.f) {
        // A fully masked row is 0 even where V holds NaN or Inf (its P is 0, but 0 * NaN is not).
#pragma unroll
        for (int dt = 0; dt < kDT; ++dt) acc_o[mt][dt][2 * r] = acc_o[mt][dt][2 * r + 1] = 0.f;
      }
    }
  }
  if (!warp_active) return;  // no block-wide barrier follows
  const int64_t bh = n * a.H + h;

  if (a.num_splits > 1) {
    // Split-KV partials: normalized fp32 output and lse of this key range.
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int64_t i = warp_row0 + mt * 16 + g + r * 8;
        if (i < L) {
          const int64_t prow = (static_cast<int64_t>(split) * a.N * a.H + bh) * L + i;
          float* op = a.o_part + prow * a.Ev;
#pragma unroll
          for (int dt = 0; dt < kDT; ++dt) {
            const int col = dt * 8 + col_q;
            if (col < a.Ev) {
              *reinterpret_cast<float2*>(op + col) =
                  make_float2(acc_o[mt][dt][2 * r] * inv[mt][r], acc_o[mt][dt][2 * r + 1] * inv[mt][r]);
            }
          }
          if ((lane & 3) == 0) a.lse_part[prow] = lse_row[mt][r];
        }
      }
    }
    return;
  }

#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t i = warp_row0 + mt * 16 + g + r * 8;
      if (i < L && (lane & 3) == 0) a.lse[bh * L + i] = lse_row[mt][r];
    }
  }
  // Stage the warp's kWarpRows x D output tile in its own Q rows (only this warp ever read them,
  // and the loop's last __syncthreads ordered those reads), then store 16-byte chunks.
  T* sO = sQ + warp * kWarpRows * kStride;
  __syncwarp();
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt) {
      const int col = dt * 8 + col_q;
      *reinterpret_cast<uint32_t*>(sO + (mt * 16 + g) * kStride + col) =
          TypeTraits<T>::pack2(acc_o[mt][dt][0] * inv[mt][0], acc_o[mt][dt][1] * inv[mt][0]);
      *reinterpret_cast<uint32_t*>(sO + (mt * 16 + g + 8) * kStride + col) =
          TypeTraits<T>::pack2(acc_o[mt][dt][2] * inv[mt][1], acc_o[mt][dt][3] * inv[mt][1]);
    }
  }
  __syncwarp();
  T* go = reinterpret_cast<T*>(a.out) + n * a.out_stride[0] + h * a.out_stride[1];
  constexpr int kChunksPerRow = D / 8;
  constexpr int kIters = kWarpRows * kChunksPerRow / 32;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int c = lane + it * 32;
    const int r = c / kChunksPerRow;
    const int col = (c % kChunksPerRow) * 8;
    const int64_t i = warp_row0 + r;
    if (i < L && col < a.Ev) {
      *reinterpret_cast<uint4*>(go + i * a.out_stride[2] + col) =
          *reinterpret_cast<const uint4*>(sO + r * kStride + col);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Split-KV combine: one block per (n, h, i) row.
// ---------------------------------------------------------------------------------------------
constexpr int kMaxSplits = 128;

template <typename T>
__global__ void __launch_bounds__(128) attention_fwd_combine_kernel(const FwdArgs a) {
  TX_SHARED(float[kMaxSplits], w);
  TX_SHARED(float, lse_final);
  const int64_t NHL = a.N * a.H * a.L;
  const int64_t row = blockIdx.x;  // (n * H + h) * L + i
  const int splits = a.num_splits;
  if (threadIdx.x == 0) {
    // A NaN partial lse (a NaN score in that split) must win the max so that it reaches the row;
    // fmaxf would drop it.
    float mx = -__builtin_huge_valf();
    for (int s = 0; s < splits; ++s) {
      const float ls = a.lse_part[s * NHL + row];
      mx = (ls > mx || ls != ls) ? ls : mx;
    }
    float sum = 0.f;
    for (int s = 0; s < splits; ++s) {
      const float ls = a.lse_part[s * NHL + row];
      w[s] = mx == -__builtin_huge_valf() ? 0.f : __expf(ls - mx);  // exp(-inf) = 0 for empty splits
      sum += w[s];
    }
    const float inv = sum != 0.f ? 1.f / sum : 0.f;
    for (int s = 0; s < splits; ++s) w[s] *= inv;
    lse_final = sum != 0.f ? mx + logf(sum) : -__builtin_huge_valf();
  }
  __syncthreads();
  const int64_t bh = row / a.L, i = row % a.L;
  const int64_t n = bh / a.H, h = bh % a.H;
  if (threadIdx.x == 0) a.lse[row] = lse_final;
  T* go = reinterpret_cast<T*>(a.out) + n * a.out_stride[0] + h * a.out_stride[1] + i * a.out_stride[2];
  for (int64_t c = threadIdx.x; c < a.Ev; c += blockDim.x) {
    float acc = 0.f;
    for (int s = 0; s < splits; ++s) acc += w[s] * a.o_part[(s * NHL + row) * a.Ev + c];
    go[c] = convert<T>(acc);
  }
}

// ---------------------------------------------------------------------------------------------
// General kernel: one warp per query row, any dtype, any head dims.
// ---------------------------------------------------------------------------------------------
template <typename T, typename Acc>
__global__ void __launch_bounds__(128) attention_fwd_general_kernel(const FwdArgs a) {
  TX_DYNAMIC_SHARED(unsigned char, smem_raw);
  const int warps = blockDim.x >> 5;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int64_t E = a.E, Ev = a.Ev, L = a.L, S = a.S;
  Acc* sq = reinterpret_cast<Acc*>(smem_raw) + static_cast<int64_t>(warp) * (E + Ev + 32);
  Acc* sacc = sq + E;
  Acc* sp = sacc + Ev;

  const int64_t row = static_cast<int64_t>(blockIdx.x) * warps + warp;  // (n * H + h) * L + i
  if (row >= a.N * a.H * L) return;  // only warp-level syncs below
  const int64_t i = row % L, bh = row / L;
  const int64_t h = bh % a.H, n = bh / a.H, hk = h / a.group;
  const T* q = reinterpret_cast<const T*>(a.q) + n * a.q_stride[0] + h * a.q_stride[1] + i * a.q_stride[2];
  const T* k = reinterpret_cast<const T*>(a.k) + n * a.k_stride[0] + hk * a.k_stride[1];
  const T* v = reinterpret_cast<const T*>(a.v) + n * a.v_stride[0] + hk * a.v_stride[1];
  const Acc inf = static_cast<Acc>(__builtin_huge_valf());
  const Acc log2e = Acc(1.4426950408889634073599246810019);
  const Acc scale_log2 = static_cast<Acc>(a.scale) * log2e;

  for (int64_t d = lane; d < E; d += 32) sq[d] = convert<Acc>(q[d]) * scale_log2;
  for (int64_t c = lane; c < Ev; c += 32) sacc[c] = Acc(0);
  __syncwarp();

  Acc m = -inf, l = Acc(0);
  const int64_t j_end = a.causal ? (i + 1 < S ? i + 1 : S) : S;
  const uint64_t drop_base = (static_cast<uint64_t>(bh) * L + i) * S;
  for (int64_t j0 = 0; j0 < j_end; j0 += 32) {
    const int64_t j = j0 + lane;
    Acc s = -inf;
    if (j < j_end) {
      const T* kr = k + j * a.k_stride[2];
      Acc dot = Acc(0);
      for (int64_t d = 0; d < E; ++d) dot += sq[d] * convert<Acc>(kr[d]);
      s = dot;
      if (a.mask_kind != 0) s = add_mask(s, mask_bias<Acc>(a, n, h, i, j), log2e);
    }
    const Acc m_new = warp_max(s);  // all lanes participate (out-of-range lanes hold -inf)
    const Acc m_tile = m_new > m ? m_new : m;
    const Acc m_use = m_tile == -inf ? Acc(0) : m_tile;
    const Acc alpha = fast_exp2(m - m_use);
    Acc p = fast_exp2(s - m_use);
    l = l * alpha + warp_sum(p);
    if (a.dropout && j < j_end) {
      const bool keep = a.rng.word(drop_base + static_cast<uint64_t>(j)) >= a.drop_threshold;
      p = keep ? p * static_cast<Acc>(a.drop_scale_d) : Acc(0);
    }
    sp[lane] = p;
    __syncwarp();
    const int cnt = static_cast<int>(j_end - j0 < 32 ? j_end - j0 : 32);
    for (int64_t c = lane; c < Ev; c += 32) {
      Acc acc = sacc[c] * alpha;
      const T* vc = v + j0 * a.v_stride[2] + c;
      for (int t = 0; t < cnt; ++t) acc += sp[t] * convert<Acc>(vc[t * a.v_stride[2]]);
      sacc[c] = acc;
    }
    __syncwarp();  // sp is rewritten next iteration
    m = m_tile;
  }

  T* o = reinterpret_cast<T*>(a.out) + n * a.out_stride[0] + h * a.out_stride[1] + i * a.out_stride[2];
  const Acc inv = l != Acc(0) ? Acc(1) / l : Acc(0);  // as in the fast kernel: NaN passes
  for (int64_t c = lane; c < Ev; c += 32) o[c] = convert<T>(l != Acc(0) ? sacc[c] * inv : Acc(0));
  if (lane == 0) {
    as_acc<Acc>(a.lse)[row] = l != Acc(0) ? m * Acc(0.69314718055994530941723212145818) + fast_log(l)
                                         : -static_cast<Acc>(__builtin_huge_valf());
  }
}

// ---------------------------------------------------------------------------------------------
// Host side: planning and dispatch
// ---------------------------------------------------------------------------------------------
enum class Path { kGeneral, kFast };

struct Plan {
  Path path = Path::kGeneral;
  int D = 0;  // fast path instantiation
  int block_m = 0, block_n = 0;
  size_t smem = 0;
  int num_m_blocks = 1;
  int num_splits = 1;
  int tiles_per_split = 0;
};

int fast_head_dim(int64_t E) {
  if (E <= 32) return 32;
  if (E <= 64) return 64;
  if (E <= 96) return 96;
  if (E <= 128) return 128;
  if (E <= 256) return 256;
  return 0;
}

void fast_shape(int D, int& bm, int& bn, size_t& smem) {
  switch (D) {
    case 32: bm = FastTraits<32>::kBlockM; bn = FastTraits<32>::kBlockN; smem = fast_smem_bytes<32>(); break;
    case 64: bm = FastTraits<64>::kBlockM; bn = FastTraits<64>::kBlockN; smem = fast_smem_bytes<64>(); break;
    case 96: bm = FastTraits<96>::kBlockM; bn = FastTraits<96>::kBlockN; smem = fast_smem_bytes<96>(); break;
    case 128: bm = FastTraits<128>::kBlockM; bn = FastTraits<128>::kBlockN; smem = fast_smem_bytes<128>(); break;
    default: bm = FastTraits<256>::kBlockM; bn = FastTraits<256>::kBlockN; smem = fast_smem_bytes<256>(); break;
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }
bool strides_mult8(const int64_t* s) { return s[0] % 8 == 0 && s[1] % 8 == 0 && s[2] % 8 == 0; }

int64_t smem_limit(const DeviceInfo& dev) {
  // The binding should pass the opt-in limit (cudaDevAttrMaxSharedMemoryPerBlockOptin: 227 KB on
  // H100, 163 KB on A100). 0 means it did not say: assume 99 KB, the smallest opt-in limit of
  // the sm_80+ devices this file's kernels can run on (sm_86 / sm_89), which every fast config
  // fits; 48 KB would silently send head dims >= 64 to the slow general kernel.
  return dev.max_smem_per_block > 0 ? dev.max_smem_per_block : 101376;
}

Plan make_plan(const AttentionParams& p, const DeviceInfo& dev) {
  Plan plan;
  const bool low_precision = p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16;
  const int D = fast_head_dim(p.head_dim);
  if (!low_precision || D == 0 || p.head_dim != p.v_head_dim || p.head_dim % 8 != 0 || p.head_dim == 0) {
    return plan;
  }
  if (!aligned16(p.q) || !aligned16(p.k) || !aligned16(p.v) || !aligned16(p.out)) return plan;
  if (!strides_mult8(p.q_stride) || !strides_mult8(p.k_stride) || !strides_mult8(p.v_stride) ||
      !strides_mult8(p.out_stride)) {
    return plan;
  }
  int bm, bn;
  size_t smem;
  fast_shape(D, bm, bn, smem);
  if (static_cast<int64_t>(smem) > smem_limit(dev)) return plan;
  const int64_t num_m = (p.q_len + bm - 1) / bm;
  if (num_m > (int64_t{1} << 30)) return plan;
  plan.path = Path::kFast;
  plan.D = D;
  plan.block_m = bm;
  plan.block_n = bn;
  plan.smem = smem;
  plan.num_m_blocks = static_cast<int>(num_m);
  const int64_t n_tiles = (p.kv_len + bn - 1) / bn;
  plan.tiles_per_split = static_cast<int>(n_tiles > 0 ? (n_tiles < (int64_t{1} << 30) ? n_tiles : (int64_t{1} << 30)) : 1);

  // Split-KV for decode-like shapes: one query tile, too few blocks to fill the SMs, many keys.
  const int64_t base_blocks = num_m * p.batch * p.heads;
  const int64_t useful_keys = p.is_causal ? (p.q_len < p.kv_len ? p.q_len : p.kv_len) : p.kv_len;
  const int64_t useful_tiles = (useful_keys + bn - 1) / bn;
  if (p.q_len <= 64 && num_m == 1 && dev.num_sms > 0 && base_blocks > 0 && base_blocks < dev.num_sms &&
      useful_tiles >= 4) {
    int64_t splits = (2 * static_cast<int64_t>(dev.num_sms) + base_blocks - 1) / base_blocks;
    splits = splits < useful_tiles / 2 ? splits : useful_tiles / 2;
    splits = splits < kMaxSplits ? splits : kMaxSplits;
    if (splits >= 2) {
      const int64_t tps = (useful_tiles + splits - 1) / splits;
      plan.tiles_per_split = static_cast<int>(tps);
      plan.num_splits = static_cast<int>((useful_tiles + tps - 1) / tps);
    }
  }
  return plan;
}

size_t split_workspace_bytes(const AttentionParams& p, int splits) {
  if (splits <= 1) return 0;
  const size_t rows = static_cast<size_t>(p.batch) * p.heads * p.q_len;
  // o_part first (its size is a multiple of 32 bytes since Ev % 8 == 0), then lse_part.
  return static_cast<size_t>(splits) * rows * (static_cast<size_t>(p.v_head_dim) + 1) * sizeof(float);
}

FwdArgs make_args(const AttentionParams& p) {
  FwdArgs a{};
  a.q = p.q;
  a.k = p.k;
  a.v = p.v;
  a.out = p.out;
  a.lse = static_cast<float*>(p.lse);  // fp64 for fp64 inputs (read through as_acc)
  a.N = p.batch;
  a.H = p.heads;
  a.L = p.q_len;
  a.S = p.kv_len;
  a.E = p.head_dim;
  a.Ev = p.v_head_dim;
  a.group = p.heads / p.kv_heads;
  for (int d = 0; d < 3; ++d) {
    a.q_stride[d] = p.q_stride[d];
    a.k_stride[d] = p.k_stride[d];
    a.v_stride[d] = p.v_stride[d];
    a.out_stride[d] = p.out_stride[d];
  }
  a.mask_kind = p.mask == nullptr ? 0 : static_cast<int>(p.mask_kind);
  a.mask_dtype = p.mask_dtype;
  a.mask = p.mask;
  for (int d = 0; d < 4; ++d) a.mask_stride[d] = p.mask_stride[d];
  a.scale = p.scale;
  a.scale_log2 = static_cast<float>(p.scale * 1.4426950408889634);
  a.causal = p.is_causal;
  // Same host-side threshold and scale functions as the CPU kernel, from the same float p.
  a.dropout = p.dropout_p > 0.0f;
  a.drop_threshold = dropout_threshold(static_cast<double>(p.dropout_p));
  a.drop_scale_d = dropout_scale(p.dropout_p);
  a.drop_scale = static_cast<float>(a.drop_scale_d);
  a.rng = p.rng;
  a.num_m_blocks = 1;
  a.num_splits = 1;
  a.tiles_per_split = 1;
  a.o_part = nullptr;
  a.lse_part = nullptr;
  return a;
}

template <typename T, int D, bool kFeatures>
cudaError_t launch_fast(const FwdArgs& a, const Plan& plan, cudaStream_t stream) {
  constexpr int kBlockM = FastTraits<D>::kBlockM, kBlockN = FastTraits<D>::kBlockN;
  constexpr int kMTiles = FastTraits<D>::kMTiles;
  constexpr int kThreads = kBlockM / (16 * kMTiles) * 32;
  constexpr size_t kSmem = fast_smem_bytes<D>();
  auto kernel = attention_fwd_fast_kernel<T, D, kBlockM, kBlockN, kMTiles, kFeatures>;
  if (kSmem > 48 * 1024) {
    cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmem));
    if (err != cudaSuccess) return err;
    // A hint: prefer the largest shared-memory carveout so that two blocks fit per SM.
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                               static_cast<int>(cudaSharedmemCarveoutMaxShared));
    if (err != cudaSuccess) return err;
  }
  const int64_t blocks = static_cast<int64_t>(plan.num_m_blocks) * plan.num_splits * a.N * a.H;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  TX_LAUNCH(kernel, static_cast<unsigned>(blocks), kThreads, kSmem, stream)(a);
  return cudaGetLastError();
}

template <typename T, bool kFeatures>
cudaError_t dispatch_fast_dim(const FwdArgs& a, const Plan& plan, cudaStream_t stream) {
  switch (plan.D) {
    case 32: return launch_fast<T, 32, kFeatures>(a, plan, stream);
    case 64: return launch_fast<T, 64, kFeatures>(a, plan, stream);
    case 96: return launch_fast<T, 96, kFeatures>(a, plan, stream);
    case 128: return launch_fast<T, 128, kFeatures>(a, plan, stream);
    case 256: return launch_fast<T, 256, kFeatures>(a, plan, stream);
    default: return cudaErrorNotSupported;
  }
}

template <typename T>
cudaError_t run_fast(const FwdArgs& a, const Plan& plan, cudaStream_t stream) {
  const bool features = a.mask_kind != 0 || a.dropout;
  cudaError_t err = features ? dispatch_fast_dim<T, true>(a, plan, stream)
                             : dispatch_fast_dim<T, false>(a, plan, stream);
  if (err != cudaSuccess || plan.num_splits <= 1) return err;
  const int64_t rows = a.N * a.H * a.L;
  if (rows > 0x7fffffff) return cudaErrorInvalidConfiguration;
  TX_LAUNCH(attention_fwd_combine_kernel<T>, static_cast<unsigned>(rows), 128, 0, stream)(a);
  return cudaGetLastError();
}

template <typename T, typename Acc>
cudaError_t run_general(const FwdArgs& a, int64_t smem_max, cudaStream_t stream) {
  const int64_t per_warp = (a.E + a.Ev + 32) * static_cast<int64_t>(sizeof(Acc));
  int warps = 4;
  while (warps > 1 && warps * per_warp > smem_max) warps /= 2;
  const int64_t smem = warps * per_warp;
  if (smem > smem_max) return cudaErrorNotSupported;  // head dims of tens of thousands
  auto kernel = attention_fwd_general_kernel<T, Acc>;
  if (smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const int64_t rows = a.N * a.H * a.L;
  const int64_t blocks = (rows + warps - 1) / warps;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  TX_LAUNCH(kernel, static_cast<unsigned>(blocks), warps * 32, static_cast<size_t>(smem), stream)(a);
  return cudaGetLastError();
}

cudaError_t validate(const AttentionParams& p) {
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
  if (p.q == nullptr || p.k == nullptr || p.v == nullptr || p.out == nullptr || p.lse == nullptr) {
    return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

}  // namespace

size_t attention_fwd_workspace_bytes(const AttentionParams& params, const DeviceInfo& device) {
  if (validate(params) != cudaSuccess) return 0;
  const Plan plan = make_plan(params, device);
  return plan.path == Path::kFast ? split_workspace_bytes(params, plan.num_splits) : 0;
}

cudaError_t attention_fwd_cuda(const AttentionParams& params, const DeviceInfo& device,
                               void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (params.batch == 0 || params.heads == 0 || params.q_len == 0) return cudaSuccess;  // nothing to write
  const cudaError_t bad = validate(params);
  if (bad != cudaSuccess) return bad;
  FwdArgs a = make_args(params);
  const Plan plan = make_plan(params, device);
  if (plan.path == Path::kFast) {
    if (!workspace_ok(workspace, workspace_bytes, split_workspace_bytes(params, plan.num_splits))) {
      return cudaErrorInvalidValue;
    }
    a.num_m_blocks = plan.num_m_blocks;
    a.num_splits = plan.num_splits;
    a.tiles_per_split = plan.tiles_per_split;
    if (plan.num_splits > 1) {
      const size_t rows = static_cast<size_t>(params.batch) * params.heads * params.q_len;
      a.o_part = static_cast<float*>(workspace);
      a.lse_part = a.o_part + static_cast<size_t>(plan.num_splits) * rows * params.v_head_dim;
    }
    if (params.dtype == DType::kFloat16) return run_fast<__half>(a, plan, stream);
    return run_fast<__nv_bfloat16>(a, plan, stream);
  }
  const int64_t smem_max = smem_limit(device);
  switch (params.dtype) {
    case DType::kFloat32: return run_general<float, float>(a, smem_max, stream);
    case DType::kFloat16: return run_general<__half, float>(a, smem_max, stream);
    case DType::kBFloat16: return run_general<__nv_bfloat16, float>(a, smem_max, stream);
    case DType::kFloat64: return run_general<double, double>(a, smem_max, stream);
    default: return cudaErrorNotSupported;
  }
}

}  // namespace tx_kernels
