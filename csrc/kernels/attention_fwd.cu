// attention_fwd.cu: fused scaled-dot-product attention forward (FlashAttention-2 scheme), torch-free.
//
// Semantics: csrc/kernels/params.h (AttentionParams). Entry points: csrc/kernels/launchers.h.
//
// Three kernels:
//
// 1. attention_fwd_fast_kernel<T, FwdTraits<D>, kFeatures>  (fp16 / bf16, E == Ev)
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
//    Head dims: dispatch.cuh's AttentionHeadDims; any E with E % 8 == 0 and E <= 256 runs on the
//    next instantiation with zero padding (cp.async zero-fill; 80 -> 96, 160 -> 256), which
//    changes no score (padded q and k columns are 0) and no written output (padded v columns are
//    never stored).
//    kFeatures = false compiles out the mask and dropout code (the common fast case); causal is a
//    run-time flag because it only changes loop bounds and which tiles take the bounds test.
//    Epilogue: O / l staged through the warp's own Q rows in shared memory, then written with
//    16-byte stores (rows >= L skipped); lse = m ln 2 + ln l; l == 0 (fully masked row) gives
//    out = 0 and lse = -inf.
//
//    Configurations: FwdTraits<D> (tile sizes, warps, shared-memory bytes); D = 96 and 128 take
//    kBlockN = 32 because 2 x 16 rows x 64 keys of fp32 scores plus 2 x 16 x D fp32 accumulators
//    do not fit next to everything else (they spilled). Registers and spills per instantiation:
//    scripts/check_cuda_compile.sh. With 4 warps = 128 threads, up to 255 registers still allow
//    2 blocks per SM.
//
//    Tuning knobs (untimed so far): FwdTraits<D> (kBlockM, kBlockN, kMTiles: kMTiles = 1 is the
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
//    of 32 keys (lane j scores key j0 + j) in natural units, as the general backward rescores
//    them; q row and output accumulator in shared memory; K and V are read straight from global
//    memory through the caches. Simple and correct, not fast.
//
// Dropout: element (n, h, i, j) is kept iff DropoutRng::word(((n H + h) L + i) S + j) >=
// dropout_threshold(p), and kept probabilities are multiplied by dropout_scale(p); the row sum l
// is accumulated before dropout, so out = sum_j keep_j scale_p p_j v_j / l, exactly the CPU op.
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "attention_common.cuh"
#include "dispatch.cuh"
#include "launchers.h"
#include "params.h"

namespace tx_kernels {
namespace {

using namespace attn;
using cuda::AccType;
using cuda::dispatch_bool;
using cuda::dispatch_head_dim;
using cuda::kIs16Bit;

// ---------------------------------------------------------------------------------------------
// Fast kernel
// ---------------------------------------------------------------------------------------------
// The tile configuration for head dim D. kMTiles: m16 tiles per warp (rows per warp = 16
// kMTiles). 2 halves the shared-memory reads per MMA (each K / V fragment feeds two MMAs per
// m-tile pair) at the cost of twice the accumulators; 1 (8 warps for kBlockM = 128) is the
// low-register fallback, and D = 256's choice.
template <int D>
struct FwdTraits {
  static constexpr int kHeadDim = D;
  static constexpr int kBlockM = D <= 128 ? 128 : 64;  // query rows per block
  static constexpr int kBlockN = D <= 64 ? 64 : 32;    // keys per tile
  static constexpr int kMTiles = D <= 128 ? 2 : 1;
  static constexpr int kWarpRows = 16 * kMTiles;  // query rows per warp
  static constexpr int kNWarps = kBlockM / kWarpRows;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kStride = D + 8;     // padded shared row, elements
  static constexpr int kNT = kBlockN / 8;   // n-tiles of S per m-tile
  static constexpr int kKT = D / 16;        // k-steps of Q K^T
  static constexpr int kDT = D / 8;         // n-tiles of O per m-tile
  static constexpr int kPK = kBlockN / 16;  // k-steps of P V
  // Q fragments cost kMTiles * D / 4 registers; keep them only while that stays small.
  static constexpr bool kQInRegs = kMTiles * D <= 128;
  // The Q tile, then two stages of K and of V, of 2-byte elements.
  static constexpr size_t kSmemBytes = static_cast<size_t>(kBlockM + 4 * kBlockN) * kStride * 2;
  static_assert(kBlockM % kWarpRows == 0 && kBlockN % 16 == 0 && D % 16 == 0, "tile shapes");
};

constexpr int kMaxFastDim = 256;
constexpr int kMaxSplits = 128;
constexpr int kCombineThreads = 128;

// What a block of the fast kernel works on: head (n, h) of batch entry n (its rows: seq), query
// rows m0 + [0, kBlockM), key tiles [t_begin, t_end) of its split.
struct FwdBlock {
  int64_t n, h, hk, m0;
  int split;
  int64_t t_begin, t_end;
  SeqRows seq;
};

template <typename Tr>
__device__ __forceinline__ FwdBlock fwd_block(const AttnArgs& a) {
  FwdBlock b;
  // blockIdx.x -> (m tile fastest, split, head, batch): consecutive blocks share K/V in L2.
  int64_t bid = blockIdx.x;
  const int m_idx = static_cast<int>(bid % a.num_m_blocks);
  bid /= a.num_m_blocks;
  b.split = static_cast<int>(bid % a.num_splits);
  bid /= a.num_splits;
  b.h = bid % a.H;
  b.n = bid / a.H;
  b.hk = b.h / a.group;
  // Causal: the last query tiles have the most key tiles; start them first.
  const int m_block = a.causal ? (a.num_m_blocks - 1 - m_idx) : m_idx;
  b.m0 = static_cast<int64_t>(m_block) * Tr::kBlockM;
  b.seq = seq_rows(a, b.n);
  const int64_t n_tiles = (b.seq.S + Tr::kBlockN - 1) / Tr::kBlockN;
  b.t_begin = static_cast<int64_t>(b.split) * a.tiles_per_split;
  b.t_end = imin(b.t_begin + a.tiles_per_split, n_tiles);
  if (a.causal) {
    // Query rows of this block that exist end at min(L, m0 + kBlockM); they see keys < that.
    const int64_t keys = imin(imin(b.m0 + Tr::kBlockM, b.seq.L), b.seq.S);
    b.t_end = imin(b.t_end, (keys + Tr::kBlockN - 1) / Tr::kBlockN);
  }
  return b;
}

// One warp's output accumulators and running softmax state, for rows g (index 0) and g + 8
// (index 1) of each of its m-tiles.
template <typename Tr>
struct FwdRows {
  float o[Tr::kMTiles][Tr::kDT][4];
  float m[Tr::kMTiles][2];  // running maximum, log2 domain
  float l[Tr::kMTiles][2];  // this thread's partial row sum (quad-reduced at the end)
};

template <typename Tr>
__device__ __forceinline__ void fwd_init_rows(FwdRows<Tr>& st) {
  zero(st.o);
  zero(st.l);
#pragma unroll
  for (int mt = 0; mt < Tr::kMTiles; ++mt) st.m[mt][0] = st.m[mt][1] = -kInf;
}

template <typename T, typename Tr, typename QFrag>
__device__ __forceinline__ void fwd_load_q_frags(QFrag& q_frag, const T* sQw, int lane) {
  if constexpr (Tr::kQInRegs) {
#pragma unroll
    for (int mt = 0; mt < Tr::kMTiles; ++mt) {
#pragma unroll
      for (int kk = 0; kk < Tr::kKT; ++kk) frag_a(q_frag[mt][kk], sQw + mt * 16 * Tr::kStride, Tr::kStride, kk, lane);
    }
  }
}

// S = Q K^T for the warp's kWarpRows query rows and the tile's kBlockN keys.
template <typename T, typename Tr, typename QFrag>
__device__ __forceinline__ void fwd_scores(float (&s)[Tr::kMTiles][Tr::kNT][4], const QFrag& q_frag, const T* sQw,
                                           const T* sKs, int lane) {
  zero(s);
  warp_mma<T, Tr::kKT>(
      s,
      [&](uint32_t (&a)[4], int mt, int kk) {
        if constexpr (Tr::kQInRegs) {
#pragma unroll
          for (int r = 0; r < 4; ++r) a[r] = q_frag[mt][kk][r];
        } else {
          frag_a(a, sQw + mt * 16 * Tr::kStride, Tr::kStride, kk, lane);
        }
      },
      [&](uint32_t (&b)[4], int nt, int kk) { frag_b(b, sKs, Tr::kStride, nt, kk, lane); });
}

// Scores into the log2 domain; -inf beyond the keys and above the causal diagonal (tested only on
// tiles that may cross either); the mask (kFeatures). Key j = n0 + jl is allowed for row i iff
// jl < lim(i) = min(S, causal ? i + 1 : S) - n0, clamped into [0, kBlockN]: 32-bit compares.
template <typename Tr, bool kFeatures>
__device__ __forceinline__ void fwd_mask_scores(const AttnArgs& a, float (&s)[Tr::kMTiles][Tr::kNT][4],
                                                const FwdBlock& b, int64_t warp_row0, int64_t n0, int lane) {
  const int64_t S = b.seq.S;
  const bool need_bounds = (n0 + Tr::kBlockN > S) || (a.causal && n0 + Tr::kBlockN - 1 > warp_row0);
  const int g = lane >> 2, cq = (lane & 3) * 2;
#pragma unroll
  for (int mt = 0; mt < Tr::kMTiles; ++mt) {
    const int64_t row_g = warp_row0 + mt * 16 + g;  // rows row_g (e = 0, 1), row_g + 8 (e = 2, 3)
    int lim[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t rel = (a.causal ? imin(row_g + r * 8 + 1, S) : S) - n0;
      lim[r] = rel < 0 ? 0 : (rel > Tr::kBlockN ? Tr::kBlockN : static_cast<int>(rel));
    }
#pragma unroll
    for (int nt = 0; nt < Tr::kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int jl = nt * 8 + cq + (e & 1);
        float x = s[mt][nt][e] * a.scale_log2;
        if (need_bounds && jl >= lim[e >> 1]) x = -kInf;
        if constexpr (kFeatures) x = masked_score(a, x, float(kLog2e), b.n, b.h, row_g + ((e >> 1) << 3), n0 + jl);
        s[mt][nt][e] = x;
      }
    }
  }
}

// The online-softmax step of a tile: fold its row maxima into the running state, rescale the
// sums and outputs so far, and turn the scores into P = exp2(S - m).
template <typename Tr>
__device__ __forceinline__ void fwd_softmax(float (&s)[Tr::kMTiles][Tr::kNT][4], FwdRows<Tr>& st) {
#pragma unroll
  for (int mt = 0; mt < Tr::kMTiles; ++mt) {
    float m_use[2], alpha[2], sum[2] = {0.f, 0.f};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = st.m[mt][r];
#pragma unroll
      for (int nt = 0; nt < Tr::kNT; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * r], s[mt][nt][2 * r + 1]));
      alpha[r] = softmax_rescale(st.m[mt][r], quad_max(mx), m_use[r]);
    }
#pragma unroll
    for (int nt = 0; nt < Tr::kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[mt][nt][e] = fast_exp2(s[mt][nt][e] - m_use[e >> 1]);
        sum[e >> 1] += s[mt][nt][e];
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) st.l[mt][r] = st.l[mt][r] * alpha[r] + sum[r];
#pragma unroll
    for (int dt = 0; dt < Tr::kDT; ++dt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) st.o[mt][dt][e] *= alpha[e >> 1];
    }
  }
}

// Dropout on P, after the row sums took it undropped: out = sum_j keep_j scale_p p_j v_j / l.
template <typename Tr>
__device__ __forceinline__ void fwd_dropout(const AttnArgs& a, float (&s)[Tr::kMTiles][Tr::kNT][4],
                                            const FwdBlock& b, int64_t warp_row0, int64_t n0, int lane) {
  const int g = lane >> 2, cq = (lane & 3) * 2;
#pragma unroll
  for (int mt = 0; mt < Tr::kMTiles; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t i = warp_row0 + mt * 16 + g + r * 8;
#pragma unroll
      for (int nt = 0; nt < Tr::kNT; ++nt) {
        const int64_t j = n0 + nt * 8 + cq;
        if (i >= b.seq.L || j >= b.seq.S) continue;
        bool k0, k1;
        keep_pair(a, element_index(a, b.n, b.h, i, j), k0, k1);
        s[mt][nt][2 * r] = k0 ? s[mt][nt][2 * r] * a.drop_scale : 0.f;
        s[mt][nt][2 * r + 1] = k1 ? s[mt][nt][2 * r + 1] * a.drop_scale : 0.f;
      }
    }
  }
}

// O += P V, P re-packed from the score accumulators, V rows via ldmatrix.trans.
template <typename T, typename Tr>
__device__ __forceinline__ void fwd_accumulate_pv(FwdRows<Tr>& st, const float (&p)[Tr::kMTiles][Tr::kNT][4],
                                                  const T* sVs, int lane) {
  warp_mma<T, Tr::kPK>(
      st.o, [&](uint32_t (&a)[4], int mt, int kp) { frag_a_acc<T>(a, p[mt], kp); },
      [&](uint32_t (&b)[4], int dt, int kp) { frag_b_t(b, sVs, Tr::kStride, dt, kp, lane); });
}

// One key tile of the main loop, for one warp.
template <typename T, typename Tr, bool kFeatures, typename QFrag>
__device__ __forceinline__ void fwd_tile(const AttnArgs& a, const FwdBlock& b, FwdRows<Tr>& st, const QFrag& q_frag,
                                         const T* sQw, const T* sKs, const T* sVs, int64_t warp_row0, int64_t n0,
                                         int lane) {
  float s[Tr::kMTiles][Tr::kNT][4];
  fwd_scores<T, Tr>(s, q_frag, sQw, sKs, lane);
  fwd_mask_scores<Tr, kFeatures>(a, s, b, warp_row0, n0, lane);
  fwd_softmax<Tr>(s, st);
  if constexpr (kFeatures) {
    if (a.dropout) fwd_dropout<Tr>(a, s, b, warp_row0, n0, lane);
  }
  fwd_accumulate_pv<T, Tr>(st, s, sVs, lane);
}

// 1 / l and lse of the warp's rows. A fully masked row (l == 0) gets output 0 even where V holds
// NaN or Inf (its P is 0, but 0 * NaN is not).
template <typename Tr>
__device__ __forceinline__ void fwd_finish_rows(FwdRows<Tr>& st, float (&inv)[Tr::kMTiles][2],
                                                float (&lse)[Tr::kMTiles][2]) {
#pragma unroll
  for (int mt = 0; mt < Tr::kMTiles; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float l = quad_sum(st.l[mt][r]);
      inv[mt][r] = l != 0.f ? 1.f / l : 0.f;
      lse[mt][r] = row_lse(st.m[mt][r], l);
#pragma unroll
      for (int dt = 0; dt < Tr::kDT; ++dt) {
        if (l == 0.f) st.o[mt][dt][2 * r] = st.o[mt][dt][2 * r + 1] = 0.f;
      }
    }
  }
}

// Split-KV partials: the normalized fp32 output and the lse of this split's key range.
template <typename Tr>
__device__ __forceinline__ void fwd_store_partials(const AttnArgs& a, const FwdBlock& b, const FwdRows<Tr>& st,
                                                   const float (&inv)[Tr::kMTiles][2],
                                                   const float (&lse)[Tr::kMTiles][2], int64_t warp_row0, int lane) {
  const int g = lane >> 2, cq = (lane & 3) * 2;
#pragma unroll
  for (int mt = 0; mt < Tr::kMTiles; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t i = warp_row0 + mt * 16 + g + r * 8;
      if (i >= b.seq.L) continue;
      const int64_t prow = static_cast<int64_t>(b.split) * a.N * a.H * a.L + seq_row(b.seq, b.h, i);
      float* op = a.o_part + prow * a.Ev;
#pragma unroll
      for (int dt = 0; dt < Tr::kDT; ++dt) {
        const int col = dt * 8 + cq;
        const float f = inv[mt][r];
        if (col < a.Ev) *reinterpret_cast<float2*>(op + col) = make_float2(st.o[mt][dt][2 * r] * f, st.o[mt][dt][2 * r + 1] * f);
      }
      if ((lane & 3) == 0) a.lse_part[prow] = lse[mt][r];
    }
  }
}

// lse, and the output: staged in the warp's own Q rows sO (only this warp ever read them, and the
// main loop's last __syncthreads ordered those reads), then written in 16-byte chunks.
template <typename T, typename Tr>
__device__ __forceinline__ void fwd_store_out(const AttnArgs& a, const FwdBlock& b, const FwdRows<Tr>& st,
                                              const float (&inv)[Tr::kMTiles][2], const float (&lse)[Tr::kMTiles][2],
                                              T* sO, int64_t warp_row0, int lane) {
#pragma unroll
  for (int mt = 0; mt < Tr::kMTiles; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t i = warp_row0 + mt * 16 + (lane >> 2) + r * 8;
      if (i < b.seq.L && (lane & 3) == 0) a.lse[seq_row(b.seq, b.h, i)] = lse[mt][r];
    }
  }
  __syncwarp();
#pragma unroll
  for (int mt = 0; mt < Tr::kMTiles; ++mt) {
    store_frags<T>(sO + mt * 16 * Tr::kStride, Tr::kStride, st.o[mt], inv[mt][0], inv[mt][1], lane);
  }
  __syncwarp();
  warp_store_rows<Tr::kWarpRows, Tr::kHeadDim>(head_ptr<T>(a.out, a.out_stride, b.n, b.h, b.seq.q0), a.out_stride[2],
                                               warp_row0, b.seq.L, a.Ev, sO, Tr::kStride, lane);
}

template <typename T, typename Tr, bool kFeatures>
__global__ void __launch_bounds__(Tr::kNThreads, 1) attention_fwd_fast_kernel(const AttnArgs a) {
  constexpr int kStride = Tr::kStride, kBlockN = Tr::kBlockN, D = Tr::kHeadDim;
  TX_DYNAMIC_SHARED(unsigned char, smem_raw);
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + Tr::kBlockM * kStride;  // 2 stages of kBlockN rows
  T* sV = sK + 2 * kBlockN * kStride;  // 2 stages of kBlockN rows
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;

  const FwdBlock b = fwd_block<Tr>(a);
  if (b.m0 >= b.seq.L) return;  // past the end of a packed sequence: the whole block
  const T* gk = head_ptr<T>(a.k, a.k_stride, b.n, b.hk, b.seq.k0);
  const T* gv = head_ptr<T>(a.v, a.v_stride, b.n, b.hk, b.seq.k0);
  auto load_kv = [&](int64_t t, int stage) {
    load_tile_async<kBlockN, D, kStride, Tr::kNThreads>(sK + stage * kBlockN * kStride, gk, a.k_stride[2],
                                                         t * kBlockN, b.seq.S, a.E, tid);
    load_tile_async<kBlockN, D, kStride, Tr::kNThreads>(sV + stage * kBlockN * kStride, gv, a.v_stride[2],
                                                         t * kBlockN, b.seq.S, a.E, tid);
  };
  // This warp owns query rows warp_row0 + [0, kWarpRows); warps past the last query row only help
  // load.
  const int64_t warp_row0 = b.m0 + warp * Tr::kWarpRows;
  const bool warp_active = warp_row0 < b.seq.L;
  T* sQw = sQ + warp * Tr::kWarpRows * kStride;

  FwdRows<Tr> st;
  fwd_init_rows(st);
  uint32_t q_frag[Tr::kQInRegs ? Tr::kMTiles : 1][Tr::kQInRegs ? Tr::kKT : 1][4];
  if (b.t_begin < b.t_end) {
    load_tile_async<Tr::kBlockM, D, kStride, Tr::kNThreads>(sQ, head_ptr<T>(a.q, a.q_stride, b.n, b.h, b.seq.q0),
                                                             a.q_stride[2], b.m0, b.seq.L, a.E, tid);
    load_kv(b.t_begin, 0);
    cp_async_commit();
  }
  // One cp.async group per key tile (K_t + V_t); tile t + 1 loads while tile t is computed.
  for (int64_t t = b.t_begin; t < b.t_end; ++t) {
    const int stage = static_cast<int>((t - b.t_begin) & 1);
    const bool has_next = t + 1 < b.t_end;
    if (has_next) {
      load_kv(t + 1, stage ^ 1);
      cp_async_commit();
    }
    pipeline_wait(has_next);
    if (warp_active) {
      if (t == b.t_begin) fwd_load_q_frags<T, Tr>(q_frag, sQw, lane);
      fwd_tile<T, Tr, kFeatures>(a, b, st, q_frag, sQw, sK + stage * kBlockN * kStride,
                                 sV + stage * kBlockN * kStride, warp_row0, t * kBlockN, lane);
    }
    __syncthreads();  // everyone is done with this stage before the next prefetch overwrites it
  }

  float inv[Tr::kMTiles][2], lse[Tr::kMTiles][2];
  fwd_finish_rows(st, inv, lse);
  if (!warp_active) return;  // no block-wide barrier follows
  if (a.num_splits > 1) {
    fwd_store_partials<Tr>(a, b, st, inv, lse, warp_row0, lane);
  } else {
    fwd_store_out<T, Tr>(a, b, st, inv, lse, sQw, warp_row0, lane);
  }
}

// ---------------------------------------------------------------------------------------------
// Split-KV combine: one block per (n, h, i) row.
// ---------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kCombineThreads) attention_fwd_combine_kernel(const AttnArgs a) {
  TX_SHARED(float[kMaxSplits], w);
  TX_SHARED(float, lse_final);
  const int64_t NHL = a.N * a.H * a.L;
  const int64_t row = blockIdx.x;  // (n * H + h) * L + i
  const int splits = a.num_splits;
  if (threadIdx.x == 0) {
    // A NaN partial lse (a NaN score in that split) must win the max so that it reaches the row;
    // fmaxf would drop it.
    float mx = -kInf;
    for (int s = 0; s < splits; ++s) {
      const float ls = a.lse_part[s * NHL + row];
      mx = (ls > mx || ls != ls) ? ls : mx;
    }
    float sum = 0.f;
    for (int s = 0; s < splits; ++s) {
      w[s] = mx == -kInf ? 0.f : __expf(a.lse_part[s * NHL + row] - mx);  // exp(-inf) = 0 for empty splits
      sum += w[s];
    }
    const float inv = sum != 0.f ? 1.f / sum : 0.f;
    for (int s = 0; s < splits; ++s) w[s] *= inv;
    lse_final = sum != 0.f ? mx + logf(sum) : -kInf;
  }
  __syncthreads();
  const int64_t bh = row / a.L, i = row % a.L;
  if (threadIdx.x == 0) a.lse[row] = lse_final;
  T* go = head_ptr<T>(a.out, a.out_stride, bh / a.H, bh % a.H) + i * a.out_stride[2];
  for (int64_t c = threadIdx.x; c < a.Ev; c += blockDim.x) {
    float acc = 0.f;
    for (int s = 0; s < splits; ++s) acc += w[s] * a.o_part[(s * NHL + row) * a.Ev + c];
    go[c] = convert<T>(acc);
  }
}

// ---------------------------------------------------------------------------------------------
// General kernel: one warp per query row, any dtype, any head dims.
// ---------------------------------------------------------------------------------------------
template <typename Acc>
constexpr int64_t general_fwd_smem_per_warp(int64_t E, int64_t Ev) {
  return (E + Ev + 32) * static_cast<int64_t>(sizeof(Acc));  // q row, output row, 32 probabilities
}

// Whether query i of (n, h) may attend to any of keys 0 .. j_end by the mask alone (causality
// is in j_end); the same answer in every lane. Read only for rows whose scores were all -inf.
template <typename Acc>
__device__ bool general_row_has_key(const AttnArgs& a, int64_t n, int64_t h, int64_t i, int64_t j_end, int lane) {
  if (a.mask_kind == 0 || j_end == 0) return j_end > 0;
  Acc allowed = Acc(0);
  for (int64_t j = lane; j < j_end; j += 32) {
    if (mask_bias<Acc>(a, n, h, i, j) != -static_cast<Acc>(kInf)) allowed = Acc(1);
  }
  return warp_reduce_max(allowed) > Acc(0);
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(128) attention_fwd_general_kernel(const AttnArgs a) {
  TX_DYNAMIC_SHARED(unsigned char, smem_raw);
  const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t E = a.E, Ev = a.Ev, L = a.L;
  Acc* sq = reinterpret_cast<Acc*>(smem_raw + warp * general_fwd_smem_per_warp<Acc>(E, Ev));
  Acc* sacc = sq + E;
  Acc* sp = sacc + Ev;

  const int64_t row = static_cast<int64_t>(blockIdx.x) * warps + warp;  // (n * H + h) * L + i
  if (row >= a.N * a.H * L) return;  // only warp-level syncs below
  const int64_t i = row % L, h = (row / L) % a.H, n = row / L / a.H;
  const SeqRows seq = seq_rows(a, n);
  if (i >= seq.L) return;
  const int64_t S = seq.S;
  const T* k = head_ptr<T>(a.k, a.k_stride, n, h / a.group, seq.k0);
  const T* v = head_ptr<T>(a.v, a.v_stride, n, h / a.group, seq.k0);
  // Natural units and the unscaled q, scored exactly as the general backward rescores them
  // (general_prob): its p_ij = exp(s_ij - lse) then matches this normalization to the rounding of
  // lse. Scores in the log2 domain (scale * log2(e) folded into q, as the tensor-core kernels do)
  // differed from that rescoring by a few ulp each, and fp32 dV / dQ kept the difference: up to
  // 20x stock torch's error at large scores.
  warp_load_row(sq, head_ptr<T>(a.q, a.q_stride, n, h, seq.q0 + i), E, Acc(1), lane);
  for (int64_t c = lane; c < Ev; c += 32) sacc[c] = Acc(0);
  __syncwarp();

  // Online softmax over blocks of 32 keys, lane t scoring key j0 + t (lanes past the end hold
  // -inf, so every lane takes part in the reductions).
  Acc m = -static_cast<Acc>(kInf), l = Acc(0);
  const int64_t j_end = a.causal ? imin(i + 1, S) : S;
  for (int64_t j0 = 0; j0 < j_end; j0 += 32) {
    const int64_t j = j0 + lane;
    Acc s = -static_cast<Acc>(kInf);
    if (j < j_end) s = masked_score(a, dot_row(sq, k + j * a.k_stride[2], E) * scale_as<Acc>(a), Acc(1), n, h, i, j);
    Acc m_use;
    const Acc alpha = softmax_rescale<Acc, false>(m, warp_reduce_max(s), m_use);
    Acc p = exp_acc(s - m_use);
    l = l * alpha + warp_reduce_sum(p);
    if (a.dropout && j < j_end) p = keep(a, element_index(a, n, h, i, j)) ? p * drop_scale_as<Acc>(a) : Acc(0);
    sp[lane] = p;
    __syncwarp();
    warp_axpy_rows(sacc, Ev, alpha, sp, static_cast<int>(imin<int64_t>(j_end - j0, 32)), v + j0 * a.v_stride[2],
                   a.v_stride[2], lane);
    __syncwarp();  // sp is rewritten next iteration
  }

  // l == 0: every score was -inf. Only a row that the mask and causality leave without a key is
  // empty (output 0, lse -inf); scores that are -inf for another reason (an infinite q, k or
  // scale) give NaN, as torch's softmax does, and a NaN lse makes the row's gradients NaN.
  const bool empty = l == Acc(0) && !general_row_has_key<Acc>(a, n, h, i, j_end, lane);
  const Acc nan = static_cast<Acc>(__builtin_nan(""));
  T* o = head_ptr<T>(a.out, a.out_stride, n, h, seq.q0 + i);
  const Acc inv = l != Acc(0) ? Acc(1) / l : nan;  // a NaN l passes
  for (int64_t c = lane; c < Ev; c += 32) o[c] = convert<T>(empty ? Acc(0) : sacc[c] * inv);
  const Acc lse = empty ? -static_cast<Acc>(kInf) : l != Acc(0) ? row_lse<Acc, false>(m, l) : nan;
  if (lane == 0) as_acc<Acc>(a.lse)[seq_row(seq, h, i)] = lse;
}

// ---------------------------------------------------------------------------------------------
// Host side: planning and dispatch
// ---------------------------------------------------------------------------------------------
struct Plan {
  int D = 0;  // the fast kernel's head-dim instantiation; 0: the general kernel
  int block_n = 0;
  size_t smem = 0;
  int num_m_blocks = 1;
  int num_splits = 1;
  int tiles_per_split = 1;
};

// Split-KV for decode-like shapes: one query tile, too few blocks to fill the SMs, many keys.
void plan_splits(const AttentionParams& p, int num_sms, Plan& plan) {
  const int64_t base_blocks = static_cast<int64_t>(plan.num_m_blocks) * p.batch * p.heads;
  const int64_t useful_keys = p.is_causal ? imin(p.q_len, p.kv_len) : p.kv_len;
  const int64_t useful_tiles = (useful_keys + plan.block_n - 1) / plan.block_n;
  // Packed batches never split: the partials and the combine are laid out by padded rows, and a
  // batch of sequences is not the one-query-tile decode shape splitting serves.
  if (p.cu_seqlens_q != nullptr || p.q_len > 64 || plan.num_m_blocks != 1 || num_sms <= 0 || base_blocks <= 0 ||
      base_blocks >= num_sms || useful_tiles < 4) {
    return;
  }
  int64_t splits = (2 * static_cast<int64_t>(num_sms) + base_blocks - 1) / base_blocks;
  splits = imin(imin(splits, useful_tiles / 2), int64_t{kMaxSplits});
  if (splits < 2) return;
  const int64_t tps = (useful_tiles + splits - 1) / splits;
  plan.tiles_per_split = static_cast<int>(tps);
  plan.num_splits = static_cast<int>((useful_tiles + tps - 1) / tps);
}

Plan make_plan(const AttentionParams& p, const DeviceInfo& device) {
  Plan plan;
  const int D = cuda::pick_head_dim<kMaxFastDim>(p.head_dim);
  const bool low_precision = p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16;
  if (!low_precision || D == 0 || p.head_dim != p.v_head_dim || p.head_dim % 8 != 0 || p.head_dim == 0) return plan;
  if (!tiles_vectorizable(p.q, p.q_stride) || !tiles_vectorizable(p.k, p.k_stride) ||
      !tiles_vectorizable(p.v, p.v_stride) || !tiles_vectorizable(p.out, p.out_stride)) {
    return plan;
  }
  int block_m = 0;
  dispatch_head_dim<kMaxFastDim>(D, [&](auto d) {
    using Tr = FwdTraits<decltype(d)::value>;
    block_m = Tr::kBlockM;
    plan.block_n = Tr::kBlockN;
    plan.smem = Tr::kSmemBytes;
    return cudaSuccess;
  });
  const int64_t num_m = (p.q_len + block_m - 1) / block_m;
  if (static_cast<int64_t>(plan.smem) > smem_limit(device) || num_m > (int64_t{1} << 30)) return plan;
  plan.D = D;
  plan.num_m_blocks = static_cast<int>(num_m);
  const int64_t n_tiles = (p.kv_len + plan.block_n - 1) / plan.block_n;
  plan.tiles_per_split = static_cast<int>(n_tiles > 0 ? imin(n_tiles, int64_t{1} << 30) : 1);
  plan_splits(p, device.num_sms, plan);
  return plan;
}

size_t split_workspace_bytes(const AttentionParams& p, int splits) {
  if (splits <= 1) return 0;
  const size_t rows = static_cast<size_t>(p.batch) * p.heads * p.q_len;
  // o_part first (its size is a multiple of 32 bytes since Ev % 8 == 0), then lse_part.
  return static_cast<size_t>(splits) * rows * (static_cast<size_t>(p.v_head_dim) + 1) * sizeof(float);
}

template <typename T, typename Tr, bool kFeatures>
cudaError_t launch_fast(const AttnArgs& a, cudaStream_t stream) {
  auto kernel = attention_fwd_fast_kernel<T, Tr, kFeatures>;
  cudaError_t err = allow_smem(kernel, Tr::kSmemBytes);
  if (err != cudaSuccess) return err;
  if (Tr::kSmemBytes > 48 * 1024) {
    // A hint: prefer the largest shared-memory carveout so that two blocks fit per SM.
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                               static_cast<int>(cudaSharedmemCarveoutMaxShared));
    if (err != cudaSuccess) return err;
  }
  const int64_t blocks = static_cast<int64_t>(a.num_m_blocks) * a.num_splits * a.N * a.H;
  return launch_1d(kernel, blocks, Tr::kNThreads, Tr::kSmemBytes, stream, a);
}

template <typename T>
cudaError_t run_fast(const AttnArgs& a, int D, cudaStream_t stream) {
  cudaError_t err = dispatch_head_dim<kMaxFastDim>(D, [&](auto d) {
    return dispatch_bool(a.mask_kind != 0 || a.dropout, [&](auto features) {
      return launch_fast<T, FwdTraits<decltype(d)::value>, decltype(features)::value>(a, stream);
    });
  });
  if (err != cudaSuccess || a.num_splits <= 1) return err;
  return launch_1d(attention_fwd_combine_kernel<T>, a.N * a.H * a.L, kCombineThreads, 0, stream, a);
}

cudaError_t validate(const AttentionParams& p) {
  const cudaError_t err = validate_shape(p);
  if (err != cudaSuccess) return err;
  return p.out == nullptr || p.lse == nullptr ? cudaErrorInvalidValue : cudaSuccess;
}

}  // namespace

size_t attention_fwd_workspace_bytes(const AttentionParams& params, const DeviceInfo& device) {
  if (validate(params) != cudaSuccess) return 0;
  const Plan plan = make_plan(params, device);
  return plan.D != 0 ? split_workspace_bytes(params, plan.num_splits) : 0;
}

cudaError_t attention_fwd_cuda(const AttentionParams& params, const DeviceInfo& device,
                               void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (params.batch == 0 || params.heads == 0 || params.q_len == 0) return cudaSuccess;  // nothing to write
  const cudaError_t bad = validate(params);
  if (bad != cudaSuccess) return bad;
  const Plan plan = make_plan(params, device);
  if (!workspace_ok(workspace, workspace_bytes, split_workspace_bytes(params, plan.num_splits))) {
    return cudaErrorInvalidValue;
  }
  AttnArgs a = make_args(params);
  a.num_m_blocks = plan.num_m_blocks;
  a.num_splits = plan.num_splits;
  a.tiles_per_split = plan.tiles_per_split;
  if (plan.num_splits > 1) {
    a.o_part = static_cast<float*>(workspace);
    a.lse_part = a.o_part + static_cast<size_t>(plan.num_splits) * a.N * a.H * a.L * a.Ev;
  }
  return cuda::dispatch_dtype(params.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (kIs16Bit<T>) {
      if (plan.D != 0) return run_fast<T>(a, plan.D, stream);
    }
    return launch_general(attention_fwd_general_kernel<T, AccType<T>>, a.N * a.H * a.L,
                          general_fwd_smem_per_warp<AccType<T>>(a.E, a.Ev), smem_limit(device), stream, a);
  });
}

}  // namespace tx_kernels
