// attention_bwd.cu: fused scaled-dot-product attention backward (FlashAttention-2 scheme),
// torch-free. Semantics: csrc/kernels/params.h (AttentionBwdParams); reference: the CPU backward in
// csrc/cpu/attention.cpp. Entry points: csrc/kernels/launchers.h.
//
// With s = scale q k^T + mask (causal/bool-masked entries -inf), P = exp(s - lse), Z the dropout
// factors (0 or 1 / (1 - p)) and Dsum = rowsum(dO * O):
//   dV = (P Z)^T dO     dP = (dO V^T) Z     dS = P (dP - Dsum)     dQ = scale dS K     dK = scale dS^T Q
// dS is also the mask gradient (params.dmask). A row with lse = -inf (nothing allowed) has P = 0,
// hence dS = 0 and no gradient anywhere.
//
// Kernels
// 1. attention_bwd_preprocess_kernel<T, Acc>: one warp per query row: Dsum = rowsum(dO * O) in Acc
//    into the workspace, and zeroes that row of the fp32 dQ accumulator (fast path, atomics).
//
// 2. attention_bwd_dkdv_kernel<T, BwdTraits<D>, kFeatures> (fp16/bf16, E == Ev, E % 8 == 0,
//    E <= 128; E is zero-padded to the next head dim of dispatch.cuh by the cp.async zero fill):
//    one thread block per (key tile of kBlockN = 128 rows, kv head, batch); kBlockN / 16 = 8 warps,
//    warp w owns key rows [16 w, 16 w + 16) of the tile and keeps their dK and dV (16 x D fp32
//    each) in registers for the whole kernel. The block loops over the H / Hkv query heads of its
//    group and over query tiles of kBlockM rows (64; 32 for D = 128), skipping under causality the
//    tiles entirely above the diagonal; the next tile's Q and dO are prefetched with cp.async into
//    a second stage while this one is computed:
//      S^T  = K Q^T        (per warp 16 x kBlockM; A = K rows, B = Q rows, both ldmatrix)
//      P^T  = exp2(S^T scale log2e (+ mask log2e) - lse log2e)   (lse staged in shared memory)
//      dV  += (P Z)^T dO   (A = P^T re-packed from the accumulators, B = dO via ldmatrix.trans)
//      dP^T = V dO^T       (A = V rows, B = dO rows)
//      dS^T = P^T (dP^T Z - Dsum)
//      dK  += dS^T Q       (A = dS^T from the accumulators, B = Q via ldmatrix.trans)
//      dQ  += dS K         only with atomics on: dS^T goes to shared memory (as T), each warp
//                          computes a 16 x (D / (8 / (kBlockM / 16))) block of the kBlockM x D
//                          product (A = dS via ldmatrix.trans of dS^T, B = K via ldmatrix.trans)
//                          and adds it with fp32 atomicAdd into the workspace accumulator.
//    Epilogue: dK * scale and dV staged through the K/V shared tiles, 16-byte stores.
//    Shared memory (rows padded to D + 8 elements, dS^T rows to kBlockM + 8: 8 consecutive rows
//    start 4 banks apart, so ldmatrix phases, cp.async writes and the fragment stores are
//    conflict-free): K, V (2 x 128 rows), 2 stages of Q and dO (kBlockM rows each), dS^T
//    (128 x (kBlockM + 8)), 2 stages of lse and Dsum (fp32); sizes in BwdTraits<D>. Registers and
//    spills per instantiation: scripts/check_cuda_compile.sh. kFeatures = false compiles out mask,
//    dropout and dmask.
//    D = 256 would need 256 accumulator registers per thread for dK and dV alone: general path.
//
// 3. attention_bwd_dq_convert_kernel<T>: dq = T(scale * dq_accum) through dq's strides.
//
// 4. Deterministic mode (params.deterministic): no atomics. The dK/dV kernel runs without its dQ
//    part and attention_bwd_dq_kernel<T, DqTraits<D>, kFeatures> computes dQ in a second pass: one
//    block per (query tile of 64 rows, head, batch), 4 warps of 16 query rows, looping in a fixed
//    order over key tiles of 64 (32 for D = 128), double-buffered with cp.async: recomputes S, P, dP, dS and
//    accumulates dQ in registers, then writes dq directly. Bit-identical run to run.
//    Cost: S = Q K^T and dP = dO V^T are computed twice, so 7 instead of 5 matrix products of the
//    same size (~1.4x the tensor-core work), minus the atomics and the conversion pass.
//
// 5. General path (fp32/fp64 inputs, Ev != E, head dims not a multiple of 8 or > 128, misaligned
//    pointers/strides, too little shared memory): Acc = fp32 (fp64 for fp64), no tensor cores,
//    no atomics (deterministic by construction):
//      Dsum: for fp32/fp64 inputs the preprocess kernel's rowsum(dO * O), `out` holding the
//        accumulator's precision; for fp16/bf16, attention_bwd_general_dsum_kernel, one warp per
//        query row, Dsum_i = sum_j p_ij Z_ij dP_ij (= rowsum(dO * O) for the exact O, without the
//        rounding of the stored `out`).
//      attention_bwd_general_dkdv_kernel: one warp per key row j: lanes take 32 query rows at a
//        time, compute p_ij, dS_ij; dv_j += sum_i p_ij Z_ij dO_i and dk_j += sum_i dS_ij q_i with
//        the lanes over the feature columns.
//      attention_bwd_general_dq_kernel: one warp per query row i: lanes take 32 keys at a time,
//        dq_i += sum_j dS_ij k_j; also writes dmask for the row.
//
// Workspace (attention_bwd_workspace_bytes): Dsum (N H L Acc values, rounded up to 256 bytes), then
// for the fast path the fp32 dQ accumulator (N H L E floats) -- requested whether or not
// params.deterministic is set, so the size does not depend on the flag. Its contents on entry do
// not matter: the preprocess kernel writes Dsum and zeroes the accumulator on the stream.
#include <cstdint>
#include <type_traits>

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

constexpr int kMaxFastDim = 128;
constexpr int kRowThreads = 256;  // preprocess and dq conversion kernels

// ---------------------------------------------------------------------------------------------
// 1. Preprocess: Dsum = rowsum(dO * O) (Acc), and zero the dQ accumulator row.
// ---------------------------------------------------------------------------------------------
template <typename T, typename Acc>
__global__ void __launch_bounds__(kRowThreads) attention_bwd_preprocess_kernel(const BwdArgs a) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + warp;  // (n H + h) L + i
  if (row >= a.N * a.H * a.L) return;
  const int64_t i = row % a.L, h = (row / a.L) % a.H, n = row / a.L / a.H;
  const SeqRows seq = seq_rows(a, n);
  if (i >= seq.L) return;
  const T* o = head_ptr<T>(a.out, a.out_stride, n, h, seq.q0 + i);
  const T* d = head_ptr<T>(a.dout, a.do_stride, n, h, seq.q0 + i);
  Acc acc = Acc(0);
  for (int64_t c = lane; c < a.Ev; c += 32) acc += convert<Acc>(o[c]) * convert<Acc>(d[c]);
  acc = warp_reduce_sum(acc);
  if (lane == 0) reinterpret_cast<Acc*>(a.dsum)[seq_row(seq, h, i)] = acc;
  if (a.dq_accum != nullptr) {
    float* dqa = a.dq_accum + seq_row(seq, h, i) * a.E;
    for (int64_t c = lane; c < a.E; c += 32) dqa[c] = 0.f;
  }
}

// ---------------------------------------------------------------------------------------------
// 2. dK / dV (and atomic dQ) fast kernel
// ---------------------------------------------------------------------------------------------
// Per warp the dK and dV accumulators take D fp32 registers and S^T, dP^T 2 x kBlockM / 2 more:
// D = 128 takes kBlockM = 32 to stay under 255 registers without spilling.
template <int D>
struct BwdTraits {
  static constexpr int kHeadDim = D;
  static constexpr int kBlockM = D >= 128 ? 32 : 64;  // query rows per step
  static constexpr int kBlockN = 128;                 // key rows per block
  static constexpr int kNWarps = kBlockN / 16;        // warp w owns key rows [16 w, 16 w + 16)
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kStride = D + 8;           // padded shared row of Q, K, V, dO (elements)
  static constexpr int kSdsStride = kBlockM + 8;  // padded shared row of dS^T
  static constexpr int kMT = kBlockM / 8;         // n-tiles (query columns) of S^T / dP^T per warp
  static constexpr int kKT = D / 16;              // k-steps over the head dim
  static constexpr int kDT = D / 8;               // n-tiles of dK / dV
  static constexpr int kMK = kBlockM / 16;        // k-steps over query rows (dV, dK products)
  static constexpr int kRT = kBlockM / 16;        // dQ: row tiles of 16 query rows
  static constexpr int kCG = kNWarps / kRT;       // dQ: column groups
  static constexpr int kDC = D / kCG;             // dQ: columns per warp
  static constexpr int kNK = kBlockN / 16;        // dQ: k-steps over key rows
  // K, V, 2 x (Q, dO) and dS^T of 2-byte elements, then 2 x (lse, Dsum) fp32.
  static constexpr size_t kSmemBytes = static_cast<size_t>(2 * kBlockN + 4 * kBlockM) * kStride * 2 +
                                       static_cast<size_t>(kBlockN) * kSdsStride * 2 +
                                       static_cast<size_t>(4 * kBlockM) * sizeof(float);
  static_assert(D % 16 == 0 && kBlockM % 16 == 0 && kBlockN % 16 == 0, "tile shapes");
  static_assert(kNWarps % kRT == 0 && kDC % 16 == 0 && kDC * kCG == D, "dQ warp layout");
  static_assert(kMT * 4 <= 32, "dropout keep bits fit one word");
};

// Z of the dK / dV kernel, from one keep bit per accumulator element (bit nt * 4 + e); without
// dropout (on == false) values pass unscaled.
struct KeepBits {
  uint32_t bits;
  float scale;
  bool on;
  __device__ __forceinline__ float operator()(float x, int nt, int e) const {
    if (!on) return x;
    return ((bits >> (nt * 4 + e)) & 1u) ? x * scale : 0.f;
  }
};

// Fragment element (nt, e) of a warp of the dK / dV kernel: key j_w + g + 8 (e >> 1), query
// m0 + nt * 8 + cq + (e & 1) (the transposed products put keys on the rows).
__device__ __forceinline__ int64_t dkdv_key(int64_t j_w, int lane, int e) { return j_w + (lane >> 2) + ((e >> 1) << 3); }
__device__ __forceinline__ int dkdv_query(int lane, int nt, int e) { return nt * 8 + (lane & 3) * 2 + (e & 1); }

// P^T = exp2(S^T - lse) of the warp's 16 keys and the step's kBlockM queries; lse_s is +inf for
// rows >= L and fully masked rows, so p = 0 there.
template <typename Tr, bool kFeatures>
__device__ __forceinline__ void dkdv_probs(const BwdArgs& a, float (&s)[Tr::kMT][4], int64_t S, int64_t n, int64_t h,
                                           int64_t j_w, int64_t m0, const float* lse_s, int lane) {
  const bool need_bounds = (j_w + 15 >= S) || (a.causal && j_w + 15 > m0);
#pragma unroll
  for (int nt = 0; nt < Tr::kMT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int il = dkdv_query(lane, nt, e);
      const float sc = bwd_score<kFeatures>(a, s[nt][e], need_bounds, S, n, h, m0 + il, dkdv_key(j_w, lane, e));
      s[nt][e] = fast_exp2(sc - lse_s[il]);
    }
  }
}

template <typename Tr>
__device__ __forceinline__ uint32_t dkdv_keep_bits(const BwdArgs& a, const SeqRows& seq, int64_t n, int64_t h,
                                                   int64_t j_w, int64_t m0, int lane) {
  uint32_t bits = 0u;
#pragma unroll
  for (int nt = 0; nt < Tr::kMT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t j = dkdv_key(j_w, lane, e), i = m0 + dkdv_query(lane, nt, e);
      if (i < seq.L && j < seq.S && keep(a, element_index(a, n, h, i, j))) bits |= 1u << (nt * 4 + e);
    }
  }
  return bits;
}

// dS^T = P^T (dP^T Z - Dsum), in place of dP^T; also the mask gradient when asked for.
template <typename Tr, bool kFeatures>
__device__ __forceinline__ void dkdv_grad_scores(const BwdArgs& a, float (&dp)[Tr::kMT][4], const float (&p)[Tr::kMT][4],
                                                 const KeepBits& z, int64_t n, int64_t h, int64_t j_w, int64_t m0,
                                                 const float* dsum_s, int lane) {
#pragma unroll
  for (int nt = 0; nt < Tr::kMT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int il = dkdv_query(lane, nt, e);
      dp[nt][e] = softmax_grad(p[nt][e], z(dp[nt][e], nt, e) - dsum_s[il]);
      if constexpr (kFeatures) {
        const int64_t i = m0 + il, j = dkdv_key(j_w, lane, e);
        if (a.dmask != nullptr && i < a.L && j < a.S) a.dmask[element_index(a, n, h, i, j)] = dp[nt][e];
      }
    }
  }
}

// dQ += dS K for the step's kBlockM queries, added atomically into the fp32 workspace (scale
// applied on conversion): dS^T goes to shared memory, then warp (rt, cg) computes query rows
// rt * 16.. x features cg * kDC.. of the product. Every warp of the block calls this.
template <typename T, typename Tr>
__device__ __forceinline__ void dkdv_atomic_dq(const BwdArgs& a, const float (&ds)[Tr::kMT][4], T* sdS, const T* sK,
                                               const SeqRows& seq, int64_t h, int64_t m0, int warp, int lane) {
  store_frags<T>(sdS + warp * 16 * Tr::kSdsStride, Tr::kSdsStride, ds, 1.f, 1.f, lane);
  __syncthreads();
  const int rt = warp % Tr::kRT, cg = warp / Tr::kRT;
  float acc_q[Tr::kDC / 8][4];
  zero(acc_q);
  warp_mma<T, Tr::kNK>(
      acc_q, [&](uint32_t (&f)[4], int kk) { frag_a_t(f, sdS + rt * 16, Tr::kSdsStride, kk, lane); },
      [&](uint32_t (&f)[4], int dt, int kk) { frag_b_t(f, sK + cg * Tr::kDC, Tr::kStride, dt, kk, lane); });
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t i = m0 + rt * 16 + (lane >> 2) + 8 * r;
    if (i >= seq.L) continue;
    float* dst = a.dq_accum + seq_row(seq, h, i) * a.E;
#pragma unroll
    for (int dt = 0; dt < Tr::kDC / 8; ++dt) {
      const int col = cg * Tr::kDC + dt * 8 + (lane & 3) * 2;
      if (col >= a.E) continue;  // E % 8 == 0: col and col + 1 are both inside or both outside
      atomicAdd(dst + col, acc_q[dt][2 * r]);
      atomicAdd(dst + col + 1, acc_q[dt][2 * r + 1]);
    }
  }
}

// The shared tiles of one step: Q and dO rows, lse (log2 domain) and Dsum.
template <typename T>
struct DkdvStage {
  const T* sQ;
  const T* sdO;
  const float* lse;
  const float* dsum;
};

// One (head, query tile) step of the dK / dV kernel for one warp.
template <typename T, typename Tr, bool kFeatures>
__device__ __forceinline__ void dkdv_step(const BwdArgs& a, float (&acc_dk)[Tr::kDT][4], float (&acc_dv)[Tr::kDT][4],
                                          const DkdvStage<T>& st, const T* sK, T* sdS, const SeqRows& seq, int64_t n,
                                          int64_t h, int64_t m0, int64_t j_w, int warp, int lane) {
  constexpr int kStride = Tr::kStride;
  const T* sKw = sK + warp * 16 * kStride;
  const T* sVw = sKw + Tr::kBlockN * kStride;  // V follows K
  float s[Tr::kMT][4], dp[Tr::kMT][4];
  zero(s);
  warp_mma<T, Tr::kKT>(  // S^T = K Q^T
      s, [&](uint32_t (&f)[4], int kk) { frag_a(f, sKw, kStride, kk, lane); },
      [&](uint32_t (&f)[4], int nt, int kk) { frag_b(f, st.sQ, kStride, nt, kk, lane); });
  dkdv_probs<Tr, kFeatures>(a, s, seq.S, n, h, j_w, m0, st.lse, lane);
  KeepBits z{0u, a.drop_scale, false};
  if constexpr (kFeatures) {
    z.on = a.dropout;
    if (a.dropout) z.bits = dkdv_keep_bits<Tr>(a, seq, n, h, j_w, m0, lane);
  }
  warp_mma<T, Tr::kMK>(  // dV += (P Z)^T dO
      acc_dv, [&](uint32_t (&f)[4], int kp) { frag_a_acc<T>(f, s, kp, z); },
      [&](uint32_t (&f)[4], int dt, int kp) { frag_b_t(f, st.sdO, kStride, dt, kp, lane); });
  zero(dp);
  warp_mma<T, Tr::kKT>(  // dP^T = V dO^T
      dp, [&](uint32_t (&f)[4], int kk) { frag_a(f, sVw, kStride, kk, lane); },
      [&](uint32_t (&f)[4], int nt, int kk) { frag_b(f, st.sdO, kStride, nt, kk, lane); });
  dkdv_grad_scores<Tr, kFeatures>(a, dp, s, z, n, h, j_w, m0, st.dsum, lane);
  warp_mma<T, Tr::kMK>(  // dK += dS^T Q (scale applied in the epilogue)
      acc_dk, [&](uint32_t (&f)[4], int kp) { frag_a_acc<T>(f, dp, kp); },
      [&](uint32_t (&f)[4], int dt, int kp) { frag_b_t(f, st.sQ, kStride, dt, kp, lane); });
  if (a.dq_accum != nullptr) dkdv_atomic_dq<T, Tr>(a, dp, sdS, sK, seq, h, m0, warp, lane);  // uniform over the block
}

template <typename T, typename Tr, bool kFeatures>
__global__ void __launch_bounds__(Tr::kNThreads, 1) attention_bwd_dkdv_kernel(const BwdArgs a) {
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kStride = Tr::kStride, D = Tr::kHeadDim;
  TX_DYNAMIC_SHARED(unsigned char, smem_raw);
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kBlockN * kStride;
  T* sQ = sV + kBlockN * kStride;        // 2 stages of kBlockM rows
  T* sdO = sQ + 2 * kBlockM * kStride;   // 2 stages of kBlockM rows
  T* sdS = sdO + 2 * kBlockM * kStride;  // kBlockN rows (keys) x kBlockM (queries)
  float* sLse = reinterpret_cast<float*>(sdS + kBlockN * Tr::kSdsStride);  // 2 stages, log2 domain
  float* sDsum = sLse + 2 * kBlockM;                                       // 2 stages
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;

  // blockIdx.x -> (key tile fastest, kv head, batch). Under causality key tile 0 has the most
  // query tiles, and it is scheduled first.
  const int64_t n0 = static_cast<int64_t>(blockIdx.x % a.num_n_blocks) * kBlockN;
  const int64_t hk = (blockIdx.x / a.num_n_blocks) % a.Hkv, n = blockIdx.x / a.num_n_blocks / a.Hkv;
  const SeqRows seq = seq_rows(a, n);
  if (n0 >= seq.S) return;  // past the end of a packed sequence: the whole block
  // Steps: (query head of the group, query tile m_begin..) pairs. Causal (query i sees keys <= i):
  // a tile whose last row m0 + kBlockM - 1 is < n0 sees none of this block's keys.
  const int num_m = static_cast<int>((seq.L + kBlockM - 1) / kBlockM);
  const int m_begin = a.causal ? static_cast<int>(n0 / kBlockM) : 0;
  const int per_head = num_m > m_begin ? num_m - m_begin : 0;
  const int n_steps = static_cast<int>(a.group) * per_head;
  auto step_head = [&](int s) -> int64_t { return hk * a.group + s / per_head; };
  auto step_m0 = [&](int s) -> int64_t { return static_cast<int64_t>(m_begin + s % per_head) * kBlockM; };

  // Q and dO rows of step s by cp.async, lse and Dsum by plain loads into `stage`.
  auto load_step = [&](int s, int stage) {
    const int64_t h = step_head(s), m0 = step_m0(s);
    load_tile_async<kBlockM, D, kStride, Tr::kNThreads>(sQ + stage * kBlockM * kStride,
                                                         head_ptr<T>(a.q, a.q_stride, n, h, seq.q0), a.q_stride[2],
                                                         m0, seq.L, a.E, tid);
    load_tile_async<kBlockM, D, kStride, Tr::kNThreads>(sdO + stage * kBlockM * kStride,
                                                         head_ptr<T>(a.dout, a.do_stride, n, h, seq.q0),
                                                         a.do_stride[2], m0, seq.L, a.E, tid);
    for (int r = tid; r < kBlockM; r += Tr::kNThreads) {
      const int64_t i = m0 + r;
      sLse[stage * kBlockM + r] = lse_log2(a, seq, h, i);
      sDsum[stage * kBlockM + r] = i < seq.L ? static_cast<const float*>(a.dsum)[seq_row(seq, h, i)] : 0.f;
    }
  };
  load_tile_async<kBlockN, D, kStride, Tr::kNThreads>(sK, head_ptr<T>(a.k, a.k_stride, n, hk, seq.k0), a.k_stride[2],
                                                       n0, seq.S, a.E, tid);
  load_tile_async<kBlockN, D, kStride, Tr::kNThreads>(sV, head_ptr<T>(a.v, a.v_stride, n, hk, seq.k0), a.v_stride[2],
                                                       n0, seq.S, a.E, tid);
  if (n_steps > 0) load_step(0, 0);
  cp_async_commit();

  float acc_dk[Tr::kDT][4], acc_dv[Tr::kDT][4];
  zero(acc_dk);
  zero(acc_dv);
  const int64_t j_w = n0 + warp * 16;  // first key row of this warp
  for (int s = 0; s < n_steps; ++s) {
    const int stage = s & 1;
    const bool has_next = s + 1 < n_steps;
    if (has_next) {
      load_step(s + 1, stage ^ 1);
      cp_async_commit();
    }
    pipeline_wait(has_next);  // step s (and K, V) landed; step s + 1 may still be in flight
    const DkdvStage<T> st{sQ + stage * kBlockM * kStride, sdO + stage * kBlockM * kStride, sLse + stage * kBlockM,
                          sDsum + stage * kBlockM};
    dkdv_step<T, Tr, kFeatures>(a, acc_dk, acc_dv, st, sK, sdS, seq, n, step_head(s), step_m0(s), j_w, warp, lane);
    __syncthreads();  // this stage and sdS are free before the next prefetch / dS^T store
  }

  // Epilogue: dK * scale and dV staged through the warp's own K / V rows, 16-byte stores.
  cp_async_wait<0>();  // with zero steps the K / V copies may still be landing
  __syncthreads();
  T* sdK = sK + warp * 16 * kStride;
  T* sdV = sV + warp * 16 * kStride;
  store_frags<T>(sdK, kStride, acc_dk, a.scale, a.scale, lane);
  store_frags<T>(sdV, kStride, acc_dv, 1.f, 1.f, lane);
  __syncwarp();
  warp_store_rows<16, D>(head_ptr<T>(a.dk, a.dk_stride, n, hk, seq.k0), a.dk_stride[2], j_w, seq.S, a.E, sdK, kStride,
                         lane);
  warp_store_rows<16, D>(head_ptr<T>(a.dv, a.dv_stride, n, hk, seq.k0), a.dv_stride[2], j_w, seq.S, a.E, sdV, kStride,
                         lane);
}

// ---------------------------------------------------------------------------------------------
// 3. dq = T(scale * dq_accum)
// ---------------------------------------------------------------------------------------------
constexpr int64_t kMaxConvertBlocks = int64_t{1} << 20;  // the kernel is grid-stride beyond this

template <typename T>
__global__ void __launch_bounds__(kRowThreads) attention_bwd_dq_convert_kernel(const BwdArgs a) {
  const int64_t total = a.N * a.H * a.L * a.E;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += step) {
    const int64_t c = idx % a.E, row = idx / a.E;
    const int64_t i = row % a.L, h = (row / a.L) % a.H, n = row / a.L / a.H;
    const SeqRows seq = seq_rows(a, n);
    if (i >= seq.L) continue;
    head_ptr<T>(a.dq, a.dq_stride, n, h, seq.q0 + i)[c] = convert<T>(a.dq_accum[seq_row(seq, h, i) * a.E + c] * a.scale);
  }
}

// ---------------------------------------------------------------------------------------------
// 4. Deterministic dQ pass: one block per (query tile, head, batch), loop over key tiles.
// ---------------------------------------------------------------------------------------------
// Keys per step: dQ takes D / 2 registers, S and dP kBlockN / 2 each.
template <int D>
struct DqTraits {
  static constexpr int kHeadDim = D;
  static constexpr int kBlockM = 64;  // query rows per block, 16 per warp
  static constexpr int kBlockN = D >= 128 ? 32 : 64;
  static constexpr int kNThreads = kBlockM / 16 * 32;
  static constexpr int kStride = D + 8;
  static constexpr int kNT = kBlockN / 8;   // n-tiles of S / dP per warp
  static constexpr int kKT = D / 16;        // k-steps over the head dim
  static constexpr int kDT = D / 8;         // n-tiles of dQ
  static constexpr int kNK = kBlockN / 16;  // k-steps over keys (dQ product)
  // Q, dO, then 2 stages of K and of V, 2-byte elements.
  static constexpr size_t kSmemBytes = static_cast<size_t>(2 * kBlockM + 4 * kBlockN) * kStride * 2;
};

// Keep decisions of the key pair j, j + 1 of the warp's two rows (false outside the problem).
__device__ __forceinline__ void dq_keep_pairs(const BwdArgs& a, const SeqRows& seq, int64_t n, int64_t h,
                                              const int64_t (&row_i)[2], int64_t j, bool (&kept)[2][2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    kept[r][0] = kept[r][1] = false;
    if (row_i[r] < seq.L && j < seq.S) keep_pair(a, element_index(a, n, h, row_i[r], j), kept[r][0], kept[r][1]);
  }
}

// dS = P (dP Z - Dsum) in place of dP, element (nt, e) being query row_i[e >> 1] and key
// j0 + nt * 8 + cq + (e & 1).
template <typename Tr, bool kFeatures>
__device__ __forceinline__ void dq_grad_scores(const BwdArgs& a, const float (&s)[Tr::kNT][4], float (&dp)[Tr::kNT][4],
                                               const SeqRows& seq, int64_t n, int64_t h, const int64_t (&row_i)[2],
                                               int64_t j0, const float (&lse2)[2], const float (&dsum)[2], int lane) {
  const int64_t warp_row0 = row_i[0] - (lane >> 2);
  const bool need_bounds = (j0 + Tr::kBlockN > seq.S) || (a.causal && j0 + Tr::kBlockN - 1 > warp_row0);
  const int cq = (lane & 3) * 2;
#pragma unroll
  for (int nt = 0; nt < Tr::kNT; ++nt) {
    bool kept[2][2] = {{true, true}, {true, true}};
    if (kFeatures && a.dropout) dq_keep_pairs(a, seq, n, h, row_i, j0 + nt * 8 + cq, kept);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = e >> 1;
      const int64_t j = j0 + nt * 8 + cq + (e & 1);
      const float p = fast_exp2(bwd_score<kFeatures>(a, s[nt][e], need_bounds, seq.S, n, h, row_i[r], j) - lse2[r]);
      float dpz = dp[nt][e];
      if (kFeatures && a.dropout) dpz = kept[r][e & 1] ? dpz * a.drop_scale : 0.f;
      dp[nt][e] = softmax_grad(p, dpz - dsum[r]);
    }
  }
}

// One key tile of the dQ kernel for one warp: S = Q K^T, dP = dO V^T, dS, then dQ += dS K.
template <typename T, typename Tr, bool kFeatures>
__device__ __forceinline__ void dq_tile(const BwdArgs& a, float (&acc_q)[Tr::kDT][4], const T* sQw, const T* sdOw,
                                        const T* sKs, const T* sVs, const SeqRows& seq, int64_t n, int64_t h,
                                        const int64_t (&row_i)[2], int64_t j0, const float (&lse2)[2],
                                        const float (&dsum)[2], int lane) {
  constexpr int kStride = Tr::kStride;
  float s[Tr::kNT][4], dp[Tr::kNT][4];
  zero(s);
  zero(dp);
  warp_mma<T, Tr::kKT>(
      s, [&](uint32_t (&f)[4], int kk) { frag_a(f, sQw, kStride, kk, lane); },
      [&](uint32_t (&f)[4], int nt, int kk) { frag_b(f, sKs, kStride, nt, kk, lane); });
  warp_mma<T, Tr::kKT>(
      dp, [&](uint32_t (&f)[4], int kk) { frag_a(f, sdOw, kStride, kk, lane); },
      [&](uint32_t (&f)[4], int nt, int kk) { frag_b(f, sVs, kStride, nt, kk, lane); });
  dq_grad_scores<Tr, kFeatures>(a, s, dp, seq, n, h, row_i, j0, lse2, dsum, lane);
  warp_mma<T, Tr::kNK>(
      acc_q, [&](uint32_t (&f)[4], int kp) { frag_a_acc<T>(f, dp, kp); },
      [&](uint32_t (&f)[4], int dt, int kp) { frag_b_t(f, sKs, kStride, dt, kp, lane); });
}

template <typename T, typename Tr, bool kFeatures>
__global__ void __launch_bounds__(Tr::kNThreads, 1) attention_bwd_dq_kernel(const BwdArgs a) {
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kStride = Tr::kStride, D = Tr::kHeadDim;
  TX_DYNAMIC_SHARED(unsigned char, smem_raw);
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + kBlockM * kStride;
  T* sK = sdO + kBlockM * kStride;     // 2 stages
  T* sV = sK + 2 * kBlockN * kStride;  // 2 stages
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;

  const int m_idx = static_cast<int>(blockIdx.x % a.num_m_blocks);
  const int64_t h = (blockIdx.x / a.num_m_blocks) % a.H, n = blockIdx.x / a.num_m_blocks / a.H;
  // Causal: the last query tiles have the most key tiles; start them first.
  const int64_t m0 = static_cast<int64_t>(a.causal ? a.num_m_blocks - 1 - m_idx : m_idx) * kBlockM;
  const SeqRows seq = seq_rows(a, n);
  if (m0 >= seq.L) return;  // past the end of a packed sequence: the whole block
  // Causal: rows < m0 + kBlockM see keys < that.
  const int64_t keys = a.causal ? imin(imin(m0 + kBlockM, seq.L), seq.S) : seq.S;
  const int64_t n_tiles = (keys + kBlockN - 1) / kBlockN;
  const T* gk = head_ptr<T>(a.k, a.k_stride, n, h / a.group, seq.k0);
  const T* gv = head_ptr<T>(a.v, a.v_stride, n, h / a.group, seq.k0);
  auto load_kv = [&](int64_t t, int stage) {
    load_tile_async<kBlockN, D, kStride, Tr::kNThreads>(sK + stage * kBlockN * kStride, gk, a.k_stride[2],
                                                         t * kBlockN, seq.S, a.E, tid);
    load_tile_async<kBlockN, D, kStride, Tr::kNThreads>(sV + stage * kBlockN * kStride, gv, a.v_stride[2],
                                                         t * kBlockN, seq.S, a.E, tid);
  };
  load_tile_async<kBlockM, D, kStride, Tr::kNThreads>(sQ, head_ptr<T>(a.q, a.q_stride, n, h, seq.q0), a.q_stride[2],
                                                       m0, seq.L, a.E, tid);
  load_tile_async<kBlockM, D, kStride, Tr::kNThreads>(sdO, head_ptr<T>(a.dout, a.do_stride, n, h, seq.q0),
                                                       a.do_stride[2], m0, seq.L, a.E, tid);
  if (n_tiles > 0) load_kv(0, 0);
  cp_async_commit();

  const int64_t warp_row0 = m0 + warp * 16;
  const bool warp_active = warp_row0 < seq.L;
  const int64_t row_i[2] = {warp_row0 + (lane >> 2), warp_row0 + (lane >> 2) + 8};
  float lse2[2], dsum[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    lse2[r] = lse_log2(a, seq, h, row_i[r]);
    dsum[r] = row_i[r] < seq.L ? static_cast<const float*>(a.dsum)[seq_row(seq, h, row_i[r])] : 0.f;
  }
  float acc_q[Tr::kDT][4];
  zero(acc_q);
  for (int64_t t = 0; t < n_tiles; ++t) {
    const int stage = static_cast<int>(t & 1);
    const bool has_next = t + 1 < n_tiles;
    if (has_next) {
      load_kv(t + 1, stage ^ 1);
      cp_async_commit();
    }
    pipeline_wait(has_next);
    if (warp_active) {
      dq_tile<T, Tr, kFeatures>(a, acc_q, sQ + warp * 16 * kStride, sdO + warp * 16 * kStride,
                                sK + stage * kBlockN * kStride, sV + stage * kBlockN * kStride, seq, n, h, row_i,
                                t * kBlockN, lse2, dsum, lane);
    }
    __syncthreads();
  }
  cp_async_wait<0>();  // nothing may be left in flight when the block exits
  if (!warp_active) return;
  T* gdq = head_ptr<T>(a.dq, a.dq_stride, n, h, seq.q0);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
#pragma unroll
    for (int dt = 0; dt < Tr::kDT; ++dt) {
      const int col = dt * 8 + (lane & 3) * 2;
      if (row_i[r] >= seq.L || col >= a.E) continue;
      gdq[row_i[r] * a.dq_stride[2] + col] = convert<T>(acc_q[dt][2 * r] * a.scale);
      gdq[row_i[r] * a.dq_stride[2] + col + 1] = convert<T>(acc_q[dt][2 * r + 1] * a.scale);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// 5. General path: one warp per row, lanes over 32 rows of the other side at a time
// ---------------------------------------------------------------------------------------------
// p_ij and the dropout factor Z_ij of query i, key j, from qk = q_i . k_j (unscaled). Only the
// mask zeroes p: a -inf score in a row whose lse is NaN (all its scores -inf without the mask
// saying so, or a NaN score) gives p = NaN, as torch's softmax does.
template <typename Acc>
__device__ __forceinline__ void general_prob(const BwdArgs& a, Acc qk, int64_t n, int64_t h, int64_t i, int64_t j,
                                             Acc lse, Acc& p, Acc& z) {
  const Acc sc = masked_score(a, qk * scale_as<Acc>(a), Acc(1), n, h, i, j);
  const bool masked = a.mask_kind != 0 && mask_bias<Acc>(a, n, h, i, j) == -static_cast<Acc>(kInf);
  p = masked ? Acc(0) : exp_acc(sc - lse);
  z = !a.dropout ? Acc(1) : keep(a, element_index(a, n, h, i, j)) ? drop_scale_as<Acc>(a) : Acc(0);
}

// The per-row state of general_dsum / general_dq: q_i and dO_i in shared memory (Acc), lse, and
// where the row and the keys of its head lie. `exists` is false for a row past the end of its
// packed sequence (nothing else is filled in then).
template <typename T, typename Acc>
struct GeneralQueryRow {
  bool exists;
  int64_t n, h, i, j_end;
  SeqRows seq;
  int64_t lse_row;
  Acc lse;
  const T* k;
  const T* v;
};

template <typename T, typename Acc>
__device__ __forceinline__ GeneralQueryRow<T, Acc> general_query_row(const BwdArgs& a, int64_t row, Acc* sq, Acc* sdo,
                                                                     int lane) {
  GeneralQueryRow<T, Acc> r;
  r.i = row % a.L;
  r.h = (row / a.L) % a.H;
  r.n = row / a.L / a.H;
  r.seq = seq_rows(a, r.n);
  r.exists = r.i < r.seq.L;
  if (!r.exists) return r;
  r.j_end = a.causal ? imin(r.i + 1, r.seq.S) : r.seq.S;
  r.lse_row = seq_row(r.seq, r.h, r.i);
  r.lse = as_acc<Acc>(a.lse)[r.lse_row];
  r.k = head_ptr<T>(a.k, a.k_stride, r.n, r.h / a.group, r.seq.k0);
  r.v = head_ptr<T>(a.v, a.v_stride, r.n, r.h / a.group, r.seq.k0);
  warp_load_row(sq, head_ptr<T>(a.q, a.q_stride, r.n, r.h, r.seq.q0 + r.i), a.E, Acc(1), lane);
  warp_load_row(sdo, head_ptr<T>(a.dout, a.do_stride, r.n, r.h, r.seq.q0 + r.i), a.Ev, Acc(1), lane);
  __syncwarp();
  return r;
}

// p_ij and dP_ij Z_ij of row r and key j. A fully masked row (lse = -inf) has no gradient.
template <typename T, typename Acc>
__device__ __forceinline__ void general_p_dpz(const BwdArgs& a, const GeneralQueryRow<T, Acc>& r, const Acc* sq,
                                              const Acc* sdo, int64_t j, Acc& p, Acc& dpz) {
  Acc z;
  general_prob(a, dot_row(sq, r.k + j * a.k_stride[2], a.E), r.n, r.h, r.i, j, r.lse, p, z);
  dpz = dot_row(sdo, r.v + j * a.v_stride[2], a.Ev) * z;
}

// Dsum, one warp per query row: D_i = sum_j p_ij Z_ij dP_ij, which equals rowsum(dO * O) for the
// exact O. Computed this way instead of from the stored `out` because `out` was rounded to the
// input dtype: for fp16/bf16 that rounding (2^-11 / 2^-8 relative) would be the largest error of
// every gradient (sum_j dS_ij = dO.O - D_i is exactly 0 only with the exact O). It costs one more
// pass over the keys; the general path is the slow path anyway.
template <typename Acc>
constexpr int64_t general_dsum_smem_per_warp(int64_t E, int64_t Ev) {
  return (E + Ev) * static_cast<int64_t>(sizeof(Acc));
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(128) attention_bwd_general_dsum_kernel(const BwdArgs a) {
  TX_DYNAMIC_SHARED(unsigned char, smem_raw);
  const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  Acc* sq = reinterpret_cast<Acc*>(smem_raw + warp * general_dsum_smem_per_warp<Acc>(a.E, a.Ev));
  Acc* sdo = sq + a.E;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * warps + warp;  // (n H + h) L + i
  if (row >= a.N * a.H * a.L) return;  // only warp-level syncs below
  const GeneralQueryRow<T, Acc> r = general_query_row<T>(a, row, sq, sdo, lane);
  if (!r.exists) return;
  Acc acc = Acc(0);
  for (int64_t j = lane; j < r.j_end && r.lse != -static_cast<Acc>(kInf); j += 32) {
    Acc p, dpz;
    general_p_dpz(a, r, sq, sdo, j, p, dpz);
    acc += p * dpz;
  }
  acc = warp_reduce_sum(acc);
  if (lane == 0) reinterpret_cast<Acc*>(a.dsum)[r.lse_row] = acc;
}

// One warp per key row j of (n, hk): dk_j, dv_j over every query row of the group's heads.
template <typename Acc>
constexpr int64_t general_dkdv_smem_per_warp(int64_t E, int64_t Ev) {
  return (2 * E + 2 * Ev + 64) * static_cast<int64_t>(sizeof(Acc));  // k, v, dk, dv rows, 2 x 32 weights
}

// p_ij Z_ij and dS_ij of query i of head h for the key row j (k_j and v_j in shared memory).
template <typename T, typename Acc>
__device__ __forceinline__ void general_key_lane(const BwdArgs& a, const Acc* sk, const Acc* sv, const SeqRows& seq,
                                                 int64_t n, int64_t h, int64_t i, int64_t j, Acc& pz, Acc& ds) {
  pz = ds = Acc(0);
  const Acc lse = i < seq.L ? as_acc<Acc>(a.lse)[seq_row(seq, h, i)] : -static_cast<Acc>(kInf);
  if (lse == -static_cast<Acc>(kInf)) return;
  Acc p, z;
  general_prob(a, dot_row(sk, head_ptr<T>(a.q, a.q_stride, n, h, seq.q0 + i), a.E), n, h, i, j, lse, p, z);
  const Acc dp = dot_row(sv, head_ptr<T>(a.dout, a.do_stride, n, h, seq.q0 + i), a.Ev);
  ds = softmax_grad(p, dp * z - reinterpret_cast<const Acc*>(a.dsum)[seq_row(seq, h, i)]);
  pz = p * z;
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(128) attention_bwd_general_dkdv_kernel(const BwdArgs a) {
  TX_DYNAMIC_SHARED(unsigned char, smem_raw);
  const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t E = a.E, Ev = a.Ev, S = a.S;
  Acc* sk = reinterpret_cast<Acc*>(smem_raw + warp * general_dkdv_smem_per_warp<Acc>(E, Ev));
  Acc* sv = sk + E;
  Acc* dk_acc = sv + Ev;
  Acc* dv_acc = dk_acc + E;
  Acc* sp = dv_acc + Ev;  // 32 dropped probabilities
  Acc* sds = sp + 32;     // 32 dS values

  const int64_t row = static_cast<int64_t>(blockIdx.x) * warps + warp;  // (n Hkv + hk) S + j
  if (row >= a.N * a.Hkv * S) return;  // only warp-level syncs below
  const int64_t j = row % S, hk = (row / S) % a.Hkv, n = row / S / a.Hkv;
  const SeqRows seq = seq_rows(a, n);
  if (j >= seq.S) return;
  const int64_t L = seq.L;
  warp_load_row(sk, head_ptr<T>(a.k, a.k_stride, n, hk, seq.k0 + j), E, Acc(1), lane);
  warp_load_row(sv, head_ptr<T>(a.v, a.v_stride, n, hk, seq.k0 + j), Ev, Acc(1), lane);
  for (int64_t c = lane; c < E; c += 32) dk_acc[c] = Acc(0);
  for (int64_t c = lane; c < Ev; c += 32) dv_acc[c] = Acc(0);
  __syncwarp();

  for (int64_t h = hk * a.group; h < (hk + 1) * a.group; ++h) {
    const T* qh = head_ptr<T>(a.q, a.q_stride, n, h, seq.q0);
    const T* doh = head_ptr<T>(a.dout, a.do_stride, n, h, seq.q0);
    for (int64_t i0 = a.causal ? j : 0; i0 < L; i0 += 32) {  // causal: query i sees key j iff j <= i
      Acc pz, ds;
      general_key_lane<T>(a, sk, sv, seq, n, h, i0 + lane, j, pz, ds);
      sp[lane] = pz;
      sds[lane] = ds;
      __syncwarp();
      const int cnt = static_cast<int>(imin<int64_t>(L - i0, 32));
      warp_axpy_rows(dv_acc, Ev, Acc(1), sp, cnt, doh + i0 * a.do_stride[2], a.do_stride[2], lane);
      warp_axpy_rows(dk_acc, E, Acc(1), sds, cnt, qh + i0 * a.q_stride[2], a.q_stride[2], lane);
      __syncwarp();  // sp / sds are rewritten next iteration
    }
  }
  warp_store_row(head_ptr<T>(a.dk, a.dk_stride, n, hk, seq.k0 + j), dk_acc, E, scale_as<Acc>(a), lane);
  warp_store_row(head_ptr<T>(a.dv, a.dv_stride, n, hk, seq.k0 + j), dv_acc, Ev, Acc(1), lane);
}

// One warp per query row i of (n, h): dq_i, and the row of dmask.
template <typename Acc>
constexpr int64_t general_dq_smem_per_warp(int64_t E, int64_t Ev) {
  return (2 * E + Ev + 32) * static_cast<int64_t>(sizeof(Acc));  // q, dO, dq rows, 32 dS values
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(128) attention_bwd_general_dq_kernel(const BwdArgs a) {
  TX_DYNAMIC_SHARED(unsigned char, smem_raw);
  const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t E = a.E;
  Acc* sq = reinterpret_cast<Acc*>(smem_raw + warp * general_dq_smem_per_warp<Acc>(E, a.Ev));
  Acc* sdo = sq + E;
  Acc* dq_acc = sdo + a.Ev;
  Acc* sds = dq_acc + E;  // 32 dS values

  const int64_t row = static_cast<int64_t>(blockIdx.x) * warps + warp;  // (n H + h) L + i
  if (row >= a.N * a.H * a.L) return;  // only warp-level syncs below
  const GeneralQueryRow<T, Acc> r = general_query_row<T>(a, row, sq, sdo, lane);
  if (!r.exists) return;
  for (int64_t c = lane; c < E; c += 32) dq_acc[c] = Acc(0);
  const Acc dsum = reinterpret_cast<const Acc*>(a.dsum)[r.lse_row];
  for (int64_t j0 = 0; j0 < r.j_end; j0 += 32) {
    const int64_t j = j0 + lane;
    Acc ds = Acc(0);
    if (j < r.j_end && r.lse != -static_cast<Acc>(kInf)) {
      Acc p, dpz;
      general_p_dpz(a, r, sq, sdo, j, p, dpz);
      ds = softmax_grad(p, dpz - dsum);
    }
    if (a.dmask != nullptr && j < r.j_end) as_acc<Acc>(a.dmask)[element_index(a, r.n, r.h, r.i, j)] = ds;
    sds[lane] = ds;
    __syncwarp();
    const int cnt = static_cast<int>(imin<int64_t>(r.j_end - j0, 32));
    warp_axpy_rows(dq_acc, E, Acc(1), sds, cnt, r.k + j0 * a.k_stride[2], a.k_stride[2], lane);
    __syncwarp();
  }
  warp_store_row(head_ptr<T>(a.dq, a.dq_stride, r.n, r.h, r.seq.q0 + r.i), dq_acc, E, scale_as<Acc>(a), lane);
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------
// The fast head-dim instantiation for this problem, or 0 for the general path.
int fast_plan(const AttentionBwdParams& p, const DeviceInfo& device) {
  const bool low_precision = p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16;
  if (!low_precision || p.head_dim != p.v_head_dim || p.head_dim <= 0 || p.head_dim % 8 != 0) return 0;
  const int D = cuda::pick_head_dim<kMaxFastDim>(p.head_dim);
  if (D == 0 || p.q_len <= 0 || p.kv_len <= 0) return 0;
  if (!tiles_vectorizable(p.q, p.q_stride) || !tiles_vectorizable(p.k, p.k_stride) ||
      !tiles_vectorizable(p.v, p.v_stride) || !tiles_vectorizable(p.grad_out, p.grad_out_stride) ||
      !tiles_vectorizable(p.dk, p.dk_stride) || !tiles_vectorizable(p.dv, p.dv_stride)) {
    return 0;
  }
  bool fits = false;
  dispatch_head_dim<kMaxFastDim>(D, [&](auto d) {
    using Tr = BwdTraits<decltype(d)::value>;
    using Dq = DqTraits<decltype(d)::value>;
    constexpr size_t kSmem = Tr::kSmemBytes > Dq::kSmemBytes ? Tr::kSmemBytes : Dq::kSmemBytes;
    // The 1-D grids and the kernels' int step and tile counters must hold.
    const int64_t dkdv_m = (p.q_len + Tr::kBlockM - 1) / Tr::kBlockM, dq_m = (p.q_len + Dq::kBlockM - 1) / Dq::kBlockM;
    const int64_t n_tiles = (p.kv_len + Tr::kBlockN - 1) / Tr::kBlockN;
    fits = static_cast<int64_t>(kSmem) <= smem_limit(device) && dkdv_m * (p.heads / p.kv_heads) <= 0x7fffffff &&
           dq_m * p.batch * p.heads <= 0x7fffffff && n_tiles * p.batch * p.kv_heads <= 0x7fffffff;
    return cudaSuccess;
  });
  return fits ? D : 0;
}

size_t dsum_bytes(const AttentionBwdParams& p) {
  const size_t acc = p.dtype == DType::kFloat64 ? sizeof(double) : sizeof(float);
  return cuda::round_up(static_cast<size_t>(p.batch) * p.heads * p.q_len * acc, 256);
}

template <typename T, typename Tr, bool kFeatures>
cudaError_t launch_fast_dim(BwdArgs a, bool deterministic, cudaStream_t stream) {
  using Dq = DqTraits<Tr::kHeadDim>;
  auto dkdv = attention_bwd_dkdv_kernel<T, Tr, kFeatures>;
  cudaError_t err = allow_smem(dkdv, Tr::kSmemBytes);
  if (err != cudaSuccess) return err;
  a.num_m_blocks = static_cast<int>((a.L + Tr::kBlockM - 1) / Tr::kBlockM);
  a.num_n_blocks = static_cast<int>((a.S + Tr::kBlockN - 1) / Tr::kBlockN);
  err = launch_1d(dkdv, static_cast<int64_t>(a.num_n_blocks) * a.Hkv * a.N, Tr::kNThreads, Tr::kSmemBytes, stream, a);
  if (err != cudaSuccess) return err;
  if (!deterministic) {
    const int64_t blocks = imin((a.N * a.H * a.L * a.E + kRowThreads - 1) / kRowThreads, kMaxConvertBlocks);
    return launch_1d(attention_bwd_dq_convert_kernel<T>, blocks, kRowThreads, 0, stream, a);
  }
  auto dq = attention_bwd_dq_kernel<T, Dq, kFeatures>;
  err = allow_smem(dq, Dq::kSmemBytes);
  if (err != cudaSuccess) return err;
  a.num_m_blocks = static_cast<int>((a.L + Dq::kBlockM - 1) / Dq::kBlockM);
  return launch_1d(dq, static_cast<int64_t>(a.num_m_blocks) * a.H * a.N, Dq::kNThreads, Dq::kSmemBytes, stream, a);
}

template <typename T, typename Acc>
cudaError_t launch_preprocess(const BwdArgs& a, cudaStream_t stream) {
  constexpr int kRowsPerBlock = kRowThreads / 32;  // one warp per row
  return launch_1d(attention_bwd_preprocess_kernel<T, Acc>, (a.N * a.H * a.L + kRowsPerBlock - 1) / kRowsPerBlock,
                   kRowThreads, 0, stream, a);
}

template <typename T>
cudaError_t run_fast(const BwdArgs& a, int D, bool deterministic, cudaStream_t stream) {
  const cudaError_t err = launch_preprocess<T, float>(a, stream);
  if (err != cudaSuccess) return err;
  return dispatch_head_dim<kMaxFastDim>(D, [&](auto d) {
    return dispatch_bool(a.mask_kind != 0 || a.dropout || a.dmask != nullptr, [&](auto features) {
      return launch_fast_dim<T, BwdTraits<decltype(d)::value>, decltype(features)::value>(a, deterministic, stream);
    });
  });
}

template <typename T, typename Acc>
cudaError_t run_general(const BwdArgs& a, int64_t smem_max, cudaStream_t stream) {
  const int64_t q_rows = a.N * a.H * a.L, k_rows = a.N * a.Hkv * a.S;
  // With `out` in the accumulator's precision, rowsum(dO * O) is the better Dsum: sum_j p_ij dP_ij
  // carries lse's absolute rounding (about ulp(lse), large for large scores) into every p_ij alike,
  // and that common error does not cancel in dQ = scale sum_j dS_ij k_j (measured: 20x the CPU
  // kernel's dQ error at scale 1.7).
  cudaError_t err = std::is_same_v<T, Acc>
                        ? launch_preprocess<T, Acc>(a, stream)
                        : launch_general(attention_bwd_general_dsum_kernel<T, Acc>, q_rows,
                                         general_dsum_smem_per_warp<Acc>(a.E, a.Ev), smem_max, stream, a);
  if (err != cudaSuccess) return err;
  err = launch_general(attention_bwd_general_dkdv_kernel<T, Acc>, k_rows, general_dkdv_smem_per_warp<Acc>(a.E, a.Ev),
                       smem_max, stream, a);
  if (err != cudaSuccess) return err;
  return launch_general(attention_bwd_general_dq_kernel<T, Acc>, q_rows, general_dq_smem_per_warp<Acc>(a.E, a.Ev),
                        smem_max, stream, a);
}

cudaError_t validate(const AttentionBwdParams& p) {
  const cudaError_t err = validate_shape(p);
  if (err != cudaSuccess) return err;
  if (p.out == nullptr || p.lse == nullptr || p.grad_out == nullptr || p.dq == nullptr || p.dk == nullptr ||
      p.dv == nullptr) {
    return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

}  // namespace

// Depends on the sizes, the dtype, the shared-memory limit and the alignment of the pointers and
// strides already filled in (unset output pointers count as aligned, which can only over-estimate),
// not on params.deterministic.
size_t attention_bwd_workspace_bytes(const AttentionBwdParams& params, const DeviceInfo& device) {
  if (validate_shape(params) != cudaSuccess) return 0;
  size_t bytes = dsum_bytes(params);
  if (fast_plan(params, device) != 0) {
    bytes += static_cast<size_t>(params.batch) * params.heads * params.q_len * params.head_dim * sizeof(float);
  }
  return bytes;
}

cudaError_t attention_bwd_cuda(const AttentionBwdParams& params, const DeviceInfo& device,
                               void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (params.batch == 0 || params.heads == 0) return cudaSuccess;  // no element of any output
  const cudaError_t bad = validate(params);
  if (bad != cudaSuccess) return bad;
  if (!workspace_ok(workspace, workspace_bytes, attention_bwd_workspace_bytes(params, device))) {
    return cudaErrorInvalidValue;
  }
  BwdArgs a = make_args(params, workspace);
  const int D = fast_plan(params, device);
  if (D != 0 && !params.deterministic) {
    a.dq_accum = reinterpret_cast<float*>(static_cast<unsigned char*>(workspace) + dsum_bytes(params));
  }
  // The general path also covers L == 0 or S == 0: it writes the zero gradients of the other side.
  return cuda::dispatch_dtype(params.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (kIs16Bit<T>) {
      if (D != 0) return run_fast<T>(a, D, params.deterministic, stream);
    }
    return run_general<T, AccType<T>>(a, smem_limit(device), stream);
  });
}

}  // namespace tx_kernels
