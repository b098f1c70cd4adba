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
// 2. attention_bwd_dkdv_kernel<T, D, kFeatures> (fp16/bf16, E == Ev, E % 8 == 0, E <= 128; E is
//    zero-padded to the next of D = 32, 64, 96, 128 by the cp.async zero fill):
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
//    part and attention_bwd_dq_kernel<T, D, kFeatures> computes dQ in a second pass: one block per
//    (query tile of 64 rows, head, batch), 4 warps of 16 query rows, looping in a fixed order over
//    key tiles of 64 (32 for D = 128), double-buffered with cp.async: recomputes S, P, dP, dS and
//    accumulates dQ in registers, then writes dq directly. Bit-identical run to run.
//    Cost: S = Q K^T and dP = dO V^T are computed twice, so 7 instead of 5 matrix products of the
//    same size (~1.4x the tensor-core work), minus the atomics and the conversion pass.
//
// 5. General path (fp32/fp64 inputs, Ev != E, head dims not a multiple of 8 or > 128, misaligned
//    pointers/strides, too little shared memory): Acc = fp32 (fp64 for fp64), no tensor cores,
//    no atomics (deterministic by construction):
//      attention_bwd_general_dsum_kernel: one warp per query row, Dsum_i = sum_j p_ij Z_ij dP_ij
//        (= rowsum(dO * O) for the exact O, without the rounding of the stored `out`).
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
#include <cmath>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "attention_bwd_utils.cuh"
#include "attention_kernel_utils.cuh"
#include "launchers.h"
#include "params.h"

namespace tx_kernels {
namespace {

using namespace attn;
using namespace attn_bwd;

constexpr float kLog2eF = 1.4426950408889634f;

// Everything the kernels need, flattened from AttentionBwdParams by the launcher.
struct BwdArgs {
  const void* q;
  const void* k;
  const void* v;
  const void* out;
  const void* dout;
  const float* lse;
  void* dq;
  void* dk;
  void* dv;
  float* dmask;     // (N, H, L, S) contiguous or nullptr; fp64 for fp64 inputs (see as_acc)
  void* dsum;       // (N, H, L) Acc, workspace
  float* dq_accum;  // (N, H, L, E) fp32, workspace; nullptr: no atomics (deterministic / general)
  int64_t N, H, Hkv, L, S, E, Ev;
  int64_t group;  // H / Hkv
  int64_t q_stride[3], k_stride[3], v_stride[3], out_stride[3], do_stride[3];
  int64_t dq_stride[3], dk_stride[3], dv_stride[3];

  int mask_kind;  // MaskKind as int; 0 when there is no mask
  DType mask_dtype;
  const void* mask;
  int64_t mask_stride[4];

  float scale;       // fast kernels (narrowed from the double in params)
  float scale_log2;  // scale * log2(e): the fast kernels' scores live in the log2 domain
  double scale_d;    // general kernels with fp64 accumulation
  bool causal;

  bool dropout;
  uint32_t drop_threshold;
  float drop_scale;
  double drop_scale_d;
  DropoutRng rng;

  int num_m_blocks;  // query tiles (dq kernel) or query tiles per head (dkdv kernel)
  int num_n_blocks;  // key tiles (dkdv kernel)
};

// Additive bias of mask element (n, h, i, j): the value for a floating mask, 0 / -inf for a bool
// mask (true = attend). The caller guarantees i < L and j < S.
template <typename Acc>
__device__ __forceinline__ Acc mask_bias(const BwdArgs& a, int64_t n, int64_t h, int64_t i, int64_t j) {
  const int64_t off = n * a.mask_stride[0] + h * a.mask_stride[1] + i * a.mask_stride[2] +
                      j * a.mask_stride[3];
  if (a.mask_kind == static_cast<int>(MaskKind::kBool)) {
    return reinterpret_cast<const uint8_t*>(a.mask)[off] ? Acc(0)
                                                         : -static_cast<Acc>(__builtin_huge_valf());
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

template <typename To, typename From>
__device__ __forceinline__ To cvt(From x) {
  return convert<To, From>(x);
}
// convert<> in attention_kernel_utils.cuh covers float <-> half/bf16 and same-type casts; these
// two pairs are needed by the fp64 general path only through static_cast, which is what the
// generic template does.

// ---------------------------------------------------------------------------------------------
// 1. Preprocess: Dsum = rowsum(dO * O) (Acc), and zero the dQ accumulator row.
// ---------------------------------------------------------------------------------------------
template <typename T, typename Acc>
__global__ void __launch_bounds__(256) attention_bwd_preprocess_kernel(const BwdArgs a) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + warp;  // (n H + h) L + i
  if (row >= a.N * a.H * a.L) return;
  const int64_t i = row % a.L, bh = row / a.L;
  const int64_t h = bh % a.H, n = bh / a.H;
  const T* o = reinterpret_cast<const T*>(a.out) + n * a.out_stride[0] + h * a.out_stride[1] + i * a.out_stride[2];
  const T* d = reinterpret_cast<const T*>(a.dout) + n * a.do_stride[0] + h * a.do_stride[1] + i * a.do_stride[2];
  Acc acc = Acc(0);
  for (int64_t c = lane; c < a.Ev; c += 32) acc += cvt<Acc>(o[c]) * cvt<Acc>(d[c]);
  acc = warp_sum(acc);
  if (lane == 0) reinterpret_cast<Acc*>(a.dsum)[row] = acc;
  if (a.dq_accum != nullptr) {
    float* dqa = a.dq_accum + row * a.E;
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
  static constexpr int kBlockM = D >= 128 ? 32 : 64;  // query rows per step
  static constexpr int kBlockN = 128;                 // key rows per block (8 warps x 16)
};

template <int D>
constexpr size_t dkdv_smem_bytes() {
  constexpr int kBlockM = BwdTraits<D>::kBlockM, kBlockN = BwdTraits<D>::kBlockN;
  return static_cast<size_t>(2 * kBlockN + 4 * kBlockM) * (D + 8) * 2  // K, V, 2 x (Q, dO)
         + static_cast<size_t>(kBlockN) * (kBlockM + 8) * 2           // dS^T
         + static_cast<size_t>(4 * kBlockM) * sizeof(float);           // 2 x (lse, Dsum)
}

template <typename T, int D, bool kFeatures>
__global__ void __launch_bounds__(BwdTraits<D>::kBlockN / 16 * 32, 1) attention_bwd_dkdv_kernel(const BwdArgs a) {
  constexpr int kBlockM = BwdTraits<D>::kBlockM;
  constexpr int kBlockN = BwdTraits<D>::kBlockN;
  constexpr int kNWarps = kBlockN / 16;
  constexpr int kNThreads = kNWarps * 32;
  constexpr int kStride = D + 8;           // padded shared row of Q, K, V, dO (elements)
  constexpr int kSdsStride = kBlockM + 8;  // padded shared row of dS^T
  constexpr int kMT = kBlockM / 8;         // n-tiles (query columns) of S^T / dP^T per warp
  constexpr int kKT = D / 16;              // k-steps over the head dim
  constexpr int kDT = D / 8;               // n-tiles of dK / dV
  constexpr int kMK = kBlockM / 16;        // k-steps over query rows (dV, dK products)
  constexpr int kRT = kBlockM / 16;        // dQ: row tiles of 16 query rows
  constexpr int kCG = kNWarps / kRT;       // dQ: column groups
  constexpr int kDC = D / kCG;             // dQ: columns per warp
  constexpr int kNK = kBlockN / 16;        // dQ: k-steps over key rows
  static_assert(D % 16 == 0 && kBlockM % 16 == 0 && kBlockN % 16 == 0, "tile shapes");
  static_assert(kNWarps % kRT == 0 && kDC % 16 == 0 && kDC * kCG == D, "dQ warp layout");
  static_assert(kMT * 4 <= 32, "dropout keep bits fit one word");
  constexpr float kInf = __builtin_huge_valf();

  TX_DYNAMIC_SHARED(unsigned char, smem_raw);
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kBlockN * kStride;
  T* sQ = sV + kBlockN * kStride;        // 2 stages of kBlockM rows
  T* sdO = sQ + 2 * kBlockM * kStride;   // 2 stages of kBlockM rows
  T* sdS = sdO + 2 * kBlockM * kStride;  // kBlockN rows (keys) x kBlockM (queries)
  float* sLse = reinterpret_cast<float*>(sdS + kBlockN * kSdsStride);  // 2 stages, log2 domain
  float* sDsum = sLse + 2 * kBlockM;                                   // 2 stages

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int g = lane >> 2;         // fragment row (and row + 8)
  const int cq = (lane & 3) * 2;   // fragment column pair

  // blockIdx.x -> (key tile fastest, kv head, batch). Under causality key tile 0 has the most
  // query tiles, and it is scheduled first.
  int64_t bid = blockIdx.x;
  const int n_blk = static_cast<int>(bid % a.num_n_blocks);
  bid /= a.num_n_blocks;
  const int64_t hk = bid % a.Hkv;
  const int64_t n = bid / a.Hkv;
  const int64_t L = a.L, S = a.S, H = a.H;
  const int64_t n0 = static_cast<int64_t>(n_blk) * kBlockN;

  // Query tiles [m_begin, num_m) of each head. Causal (query i sees keys <= i): a tile whose last
  // row m0 + kBlockM - 1 is < n0 sees none of this block's keys.
  const int m_begin = a.causal ? static_cast<int>(n0 / kBlockM) : 0;
  const int per_head = a.num_m_blocks > m_begin ? a.num_m_blocks - m_begin : 0;
  const int n_steps = static_cast<int>(a.group) * per_head;

  const T* gk = reinterpret_cast<const T*>(a.k) + n * a.k_stride[0] + hk * a.k_stride[1];
  const T* gv = reinterpret_cast<const T*>(a.v) + n * a.v_stride[0] + hk * a.v_stride[1];
  const T* gq_n = reinterpret_cast<const T*>(a.q) + n * a.q_stride[0];
  const T* gdo_n = reinterpret_cast<const T*>(a.dout) + n * a.do_stride[0];
  const float* dsum_g = reinterpret_cast<const float*>(a.dsum);

  // Step s -> (head h, query tile m0).
  auto step_head = [&](int s) -> int64_t { return hk * a.group + s / per_head; };
  auto step_m0 = [&](int s) -> int64_t { return static_cast<int64_t>(m_begin + s % per_head) * kBlockM; };

  // Issues the loads of step s into `stage`: Q and dO rows by cp.async, lse and Dsum by plain
  // loads (they are transformed on the way: lse to the log2 domain, -inf -> +inf so that a fully
  // masked row gives exp2(s - inf) = 0 instead of exp2(+inf); rows >= L get +inf and 0).
  auto load_step = [&](int s, int stage) {
    const int64_t h = step_head(s), m0 = step_m0(s);
    load_rows_async<kBlockM, D, kStride, kNThreads>(sQ + stage * kBlockM * kStride, gq_n + h * a.q_stride[1],
                                                    a.q_stride[2], m0, L, a.E, tid);
    load_rows_async<kBlockM, D, kStride, kNThreads>(sdO + stage * kBlockM * kStride, gdo_n + h * a.do_stride[1],
                                                    a.do_stride[2], m0, L, a.E, tid);
    for (int r = tid; r < kBlockM; r += kNThreads) {
      const int64_t i = m0 + r;
      float l2 = kInf, ds = 0.f;
      if (i < L) {
        const float l = a.lse[(n * H + h) * L + i];
        l2 = l == -kInf ? kInf : l * kLog2eF;
        ds = dsum_g[(n * H + h) * L + i];
      }
      sLse[stage * kBlockM + r] = l2;
      sDsum[stage * kBlockM + r] = ds;
    }
  };

  load_rows_async<kBlockN, D, kStride, kNThreads>(sK, gk, a.k_stride[2], n0, S, a.E, tid);
  load_rows_async<kBlockN, D, kStride, kNThreads>(sV, gv, a.v_stride[2], n0, S, a.E, tid);
  if (n_steps > 0) load_step(0, 0);
  cp_async_commit();

  float acc_dk[kDT][4], acc_dv[kDT][4];
#pragma unroll
  for (int dt = 0; dt < kDT; ++dt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      acc_dk[dt][e] = 0.f;
      acc_dv[dt][e] = 0.f;
    }
  }

  const int64_t j_w = n0 + warp * 16;  // first key row of this warp
  const T* sKw = sK + warp * 16 * kStride;
  const T* sVw = sV + warp * 16 * kStride;

  for (int s = 0; s < n_steps; ++s) {
    const int stage = s & 1;
    if (s + 1 < n_steps) {
      load_step(s + 1, stage ^ 1);
      cp_async_commit();
      cp_async_wait<1>();  // step s (and K, V) landed; step s + 1 may still be in flight
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    const int64_t h = step_head(s), m0 = step_m0(s);
    const T* sQs = sQ + stage * kBlockM * kStride;
    const T* sdOs = sdO + stage * kBlockM * kStride;
    const float* lse_s = sLse + stage * kBlockM;
    const float* dsum_s = sDsum + stage * kBlockM;

    // ---- S^T = K Q^T: 16 keys x kBlockM queries per warp ----
    float acc_s[kMT][4];
#pragma unroll
    for (int nt = 0; nt < kMT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_s[nt][e] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < kKT; ++kk) {
      // A = K rows: lanes 0-15 address rows 0-15 at column kk*16, lanes 16-31 at kk*16 + 8.
      uint32_t ka[4];
      ldmatrix_x4(ka, sKw + (lane & 15) * kStride + kk * 16 + (lane >> 4) * 8);
#pragma unroll
      for (int nt = 0; nt < kMT; nt += 2) {
        // B = Q^T: Q rows are "column-major B". Lanes 0-7: queries nt*8.. / d kk*16 (b0 of nt),
        // 8-15: d + 8 (b1 of nt), 16-31: the same for queries nt*8 + 8.. (n-tile nt + 1).
        uint32_t qb[4];
        ldmatrix_x4(qb, sQs + (nt * 8 + (lane & 7) + ((lane >> 4) << 3)) * kStride + kk * 16 +
                            ((lane >> 3) & 1) * 8);
        mma_16816<T>(acc_s[nt], ka, qb[0], qb[1]);
        mma_16816<T>(acc_s[nt + 1], ka, qb[2], qb[3]);
      }
    }

    // ---- P^T = exp2(S^T scale log2e + mask - lse log2e) ----
    // Element (nt, e) of this lane: key j = j_w + g + 8 (e >> 1), query il = nt*8 + cq + (e & 1).
    const bool need_bounds = (j_w + 15 >= S) || (a.causal && j_w + 15 > m0);
#pragma unroll
    for (int nt = 0; nt < kMT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t j = j_w + g + ((e >> 1) << 3);
        const int il = nt * 8 + cq + (e & 1);
        const int64_t i = m0 + il;
        float sc = acc_s[nt][e] * a.scale_log2;
        if (need_bounds && (j >= S || (a.causal && j > i))) sc = -kInf;
        if constexpr (kFeatures) {
          if (a.mask_kind != 0 && sc != -kInf && i < L && j < S) {
            sc = add_mask(sc, mask_bias<float>(a, n, h, i, j), kLog2eF);
          }
        }
        // lse_s is +inf for rows >= L and fully masked rows: p = 0 there.
        acc_s[nt][e] = fast_exp2(sc - lse_s[il]);
      }
    }

    // Dropout keep bits: bit nt*4 + e. Element index ((n H + h) L + i) S + j.
    uint32_t keep = 0xFFFFFFFFu;
    if constexpr (kFeatures) {
      if (a.dropout) {
        keep = 0u;
#pragma unroll
        for (int nt = 0; nt < kMT; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int64_t j = j_w + g + ((e >> 1) << 3);
            const int64_t i = m0 + nt * 8 + cq + (e & 1);
            if (i < L && j < S) {
              const uint64_t idx = static_cast<uint64_t>(((n * H + h) * L + i) * S + j);
              if (a.rng.word(idx) >= a.drop_threshold) keep |= 1u << (nt * 4 + e);
            }
          }
        }
      }
    }
    auto dropped = [&](float x, int nt, int e) -> float {
      if constexpr (kFeatures) {
        if (a.dropout) return ((keep >> (nt * 4 + e)) & 1u) ? x * a.drop_scale : 0.f;
      }
      return x;
    };

    // ---- dV += (P Z)^T dO ----
#pragma unroll
    for (int kp = 0; kp < kMK; ++kp) {
      // The accumulators of n-tiles 2kp, 2kp+1 are exactly the A fragment of k-step kp.
      uint32_t pa[4];
      pa[0] = TypeTraits<T>::pack2(dropped(acc_s[2 * kp][0], 2 * kp, 0), dropped(acc_s[2 * kp][1], 2 * kp, 1));
      pa[1] = TypeTraits<T>::pack2(dropped(acc_s[2 * kp][2], 2 * kp, 2), dropped(acc_s[2 * kp][3], 2 * kp, 3));
      pa[2] = TypeTraits<T>::pack2(dropped(acc_s[2 * kp + 1][0], 2 * kp + 1, 0),
                                   dropped(acc_s[2 * kp + 1][1], 2 * kp + 1, 1));
      pa[3] = TypeTraits<T>::pack2(dropped(acc_s[2 * kp + 1][2], 2 * kp + 1, 2),
                                   dropped(acc_s[2 * kp + 1][3], 2 * kp + 1, 3));
#pragma unroll
      for (int dt = 0; dt < kDT; dt += 2) {
        // B = dO rows kp*16.. (k = query) x columns dt*8.. (n = feature), via .trans.
        uint32_t ob[4];
        ldmatrix_x4_trans(ob, sdOs + (kp * 16 + (lane & 15)) * kStride + dt * 8 + (lane >> 4) * 8);
        mma_16816<T>(acc_dv[dt], pa, ob[0], ob[1]);
        mma_16816<T>(acc_dv[dt + 1], pa, ob[2], ob[3]);
      }
    }

    // ---- dP^T = V dO^T ----
    float acc_dp[kMT][4];
#pragma unroll
    for (int nt = 0; nt < kMT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_dp[nt][e] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < kKT; ++kk) {
      uint32_t va[4];
      ldmatrix_x4(va, sVw + (lane & 15) * kStride + kk * 16 + (lane >> 4) * 8);
#pragma unroll
      for (int nt = 0; nt < kMT; nt += 2) {
        uint32_t ob[4];
        ldmatrix_x4(ob, sdOs + (nt * 8 + (lane & 7) + ((lane >> 4) << 3)) * kStride + kk * 16 +
                            ((lane >> 3) & 1) * 8);
        mma_16816<T>(acc_dp[nt], va, ob[0], ob[1]);
        mma_16816<T>(acc_dp[nt + 1], va, ob[2], ob[3]);
      }
    }

    // ---- dS^T = P^T (dP^T Z - Dsum), kept in acc_dp ----
#pragma unroll
    for (int nt = 0; nt < kMT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int il = nt * 8 + cq + (e & 1);
        acc_dp[nt][e] = softmax_grad(acc_s[nt][e], dropped(acc_dp[nt][e], nt, e) - dsum_s[il]);
      }
    }
    if constexpr (kFeatures) {
      if (a.dmask != nullptr) {
#pragma unroll
        for (int nt = 0; nt < kMT; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int64_t j = j_w + g + ((e >> 1) << 3);
            const int64_t i = m0 + nt * 8 + cq + (e & 1);
            if (i < L && j < S) a.dmask[((n * H + h) * L + i) * S + j] = acc_dp[nt][e];
          }
        }
      }
    }

    // ---- dK += dS^T Q (scale applied in the epilogue) ----
#pragma unroll
    for (int kp = 0; kp < kMK; ++kp) {
      uint32_t da[4];
      da[0] = TypeTraits<T>::pack2(acc_dp[2 * kp][0], acc_dp[2 * kp][1]);
      da[1] = TypeTraits<T>::pack2(acc_dp[2 * kp][2], acc_dp[2 * kp][3]);
      da[2] = TypeTraits<T>::pack2(acc_dp[2 * kp + 1][0], acc_dp[2 * kp + 1][1]);
      da[3] = TypeTraits<T>::pack2(acc_dp[2 * kp + 1][2], acc_dp[2 * kp + 1][3]);
#pragma unroll
      for (int dt = 0; dt < kDT; dt += 2) {
        uint32_t qb[4];
        ldmatrix_x4_trans(qb, sQs + (kp * 16 + (lane & 15)) * kStride + dt * 8 + (lane >> 4) * 8);
        mma_16816<T>(acc_dk[dt], da, qb[0], qb[1]);
        mma_16816<T>(acc_dk[dt + 1], da, qb[2], qb[3]);
      }
    }

    // ---- dQ += dS K, added atomically into the fp32 workspace (scale applied on conversion) ----
    if (a.dq_accum != nullptr) {  // uniform over the block: the barrier below is safe
      // dS^T of this warp's 16 keys into shared rows [16 w, 16 w + 16), queries contiguous.
#pragma unroll
      for (int nt = 0; nt < kMT; ++nt) {
        const int jl = warp * 16 + g, il = nt * 8 + cq;
        *reinterpret_cast<uint32_t*>(sdS + jl * kSdsStride + il) = TypeTraits<T>::pack2(acc_dp[nt][0], acc_dp[nt][1]);
        *reinterpret_cast<uint32_t*>(sdS + (jl + 8) * kSdsStride + il) =
            TypeTraits<T>::pack2(acc_dp[nt][2], acc_dp[nt][3]);
      }
      __syncthreads();
      // Warp -> (row tile rt of 16 queries, column group cg of kDC features).
      const int rt = warp % kRT, cg = warp / kRT;
      float acc_q[kDC / 8][4];
#pragma unroll
      for (int dt = 0; dt < kDC / 8; ++dt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_q[dt][e] = 0.f;
      }
#pragma unroll
      for (int kk = 0; kk < kNK; ++kk) {
        // A = dS (queries x keys) from the key-major dS^T via .trans: lanes 0-7 keys kk*16.. /
        // queries rt*16 (a0), 8-15 queries + 8 (a1), 16-23 keys + 8 (a2), 24-31 both (a3).
        uint32_t da[4];
        ldmatrix_x4_trans(da, sdS + (kk * 16 + (lane & 7) + ((lane >> 4) << 3)) * kSdsStride + rt * 16 +
                                  ((lane >> 3) & 1) * 8);
#pragma unroll
        for (int dt = 0; dt < kDC / 8; dt += 2) {
          // B = K rows kk*16.. (k = key) x features, via .trans.
          uint32_t kb[4];
          ldmatrix_x4_trans(kb, sK + (kk * 16 + (lane & 15)) * kStride + cg * kDC + dt * 8 + (lane >> 4) * 8);
          mma_16816<T>(acc_q[dt], da, kb[0], kb[1]);
          mma_16816<T>(acc_q[dt + 1], da, kb[2], kb[3]);
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int64_t i = m0 + rt * 16 + g + 8 * r;
        if (i < L) {
          float* dst = a.dq_accum + ((n * H + h) * L + i) * a.E;
#pragma unroll
          for (int dt = 0; dt < kDC / 8; ++dt) {
            const int col = cg * kDC + dt * 8 + cq;
            if (col < a.E) {  // E % 8 == 0: col and col + 1 are both inside or both outside
              atomicAdd(dst + col, acc_q[dt][2 * r]);
              atomicAdd(dst + col + 1, acc_q[dt][2 * r + 1]);
            }
          }
        }
      }
    }
    __syncthreads();  // this stage and sdS are free before the next prefetch / dS^T store
  }

  // ---- epilogue: dK * scale and dV through the K / V tiles, 16-byte stores ----
  cp_async_wait<0>();  // with zero steps the K / V copies may still be landing
  __syncthreads();
  T* sdK = sK + warp * 16 * kStride;
  T* sdV = sV + warp * 16 * kStride;
#pragma unroll
  for (int dt = 0; dt < kDT; ++dt) {
    const int col = dt * 8 + cq;
    *reinterpret_cast<uint32_t*>(sdK + g * kStride + col) =
        TypeTraits<T>::pack2(acc_dk[dt][0] * a.scale, acc_dk[dt][1] * a.scale);
    *reinterpret_cast<uint32_t*>(sdK + (g + 8) * kStride + col) =
        TypeTraits<T>::pack2(acc_dk[dt][2] * a.scale, acc_dk[dt][3] * a.scale);
    *reinterpret_cast<uint32_t*>(sdV + g * kStride + col) = TypeTraits<T>::pack2(acc_dv[dt][0], acc_dv[dt][1]);
    *reinterpret_cast<uint32_t*>(sdV + (g + 8) * kStride + col) = TypeTraits<T>::pack2(acc_dv[dt][2], acc_dv[dt][3]);
  }
  __syncwarp();
  T* gdk = reinterpret_cast<T*>(a.dk) + n * a.dk_stride[0] + hk * a.dk_stride[1];
  T* gdv = reinterpret_cast<T*>(a.dv) + n * a.dv_stride[0] + hk * a.dv_stride[1];
  constexpr int kChunksPerRow = D / 8;
  constexpr int kIters = 16 * kChunksPerRow / 32;
  static_assert(16 * kChunksPerRow % 32 == 0, "epilogue chunks");
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int c = lane + it * 32;
    const int r = c / kChunksPerRow;
    const int col = (c % kChunksPerRow) * 8;
    const int64_t j = j_w + r;
    if (j < S && col < a.E) {
      *reinterpret_cast<uint4*>(gdk + j * a.dk_stride[2] + col) = *reinterpret_cast<const uint4*>(sdK + r * kStride + col);
      *reinterpret_cast<uint4*>(gdv + j * a.dv_stride[2] + col) = *reinterpret_cast<const uint4*>(sdV + r * kStride + col);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// 3. dq = T(scale * dq_accum)
// ---------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(256) attention_bwd_dq_convert_kernel(const BwdArgs a) {
  const int64_t total = a.N * a.H * a.L * a.E;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += step) {
    const int64_t c = idx % a.E, row = idx / a.E;
    const int64_t i = row % a.L, bh = row / a.L;
    const int64_t h = bh % a.H, n = bh / a.H;
    reinterpret_cast<T*>(a.dq)[n * a.dq_stride[0] + h * a.dq_stride[1] + i * a.dq_stride[2] + c] =
        TypeTraits<T>::from_float(a.dq_accum[idx] * a.scale);
  }
}

// ---------------------------------------------------------------------------------------------
// 4. Deterministic dQ pass: one block per (query tile, head, batch), loop over key tiles.
// ---------------------------------------------------------------------------------------------
constexpr int kDqBlockM = 64;  // 4 warps x 16 query rows

// Keys per step: dQ takes D / 2 registers, S and dP kBlockN / 2 each.
template <int D>
struct DqTraits {
  static constexpr int kBlockN = D >= 128 ? 32 : 64;
};

template <int D>
constexpr size_t dq_smem_bytes() {
  return static_cast<size_t>(2 * kDqBlockM + 4 * DqTraits<D>::kBlockN) * (D + 8) * 2;  // Q, dO, 2 x (K, V)
}

template <typename T, int D, bool kFeatures>
__global__ void __launch_bounds__(kDqBlockM / 16 * 32, 1) attention_bwd_dq_kernel(const BwdArgs a) {
  constexpr int kBlockM = kDqBlockM, kBlockN = DqTraits<D>::kBlockN;
  constexpr int kNThreads = kBlockM / 16 * 32;
  constexpr int kStride = D + 8;
  constexpr int kNT = kBlockN / 8;   // n-tiles of S / dP per warp
  constexpr int kKT = D / 16;        // k-steps over the head dim
  constexpr int kDT = D / 8;         // n-tiles of dQ
  constexpr int kNK = kBlockN / 16;  // k-steps over keys (dQ product)
  constexpr float kInf = __builtin_huge_valf();

  TX_DYNAMIC_SHARED(unsigned char, smem_raw);
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + kBlockM * kStride;
  T* sK = sdO + kBlockM * kStride;     // 2 stages
  T* sV = sK + 2 * kBlockN * kStride;  // 2 stages

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, cq = (lane & 3) * 2;

  int64_t bid = blockIdx.x;
  const int m_idx = static_cast<int>(bid % a.num_m_blocks);
  bid /= a.num_m_blocks;
  const int64_t h = bid % a.H;
  const int64_t n = bid / a.H;
  // Causal: the last query tiles have the most key tiles; start them first.
  const int m_blk = a.causal ? a.num_m_blocks - 1 - m_idx : m_idx;
  const int64_t m0 = static_cast<int64_t>(m_blk) * kBlockM;
  const int64_t hk = h / a.group;
  const int64_t L = a.L, S = a.S, H = a.H;

  const T* gq = reinterpret_cast<const T*>(a.q) + n * a.q_stride[0] + h * a.q_stride[1];
  const T* gdo = reinterpret_cast<const T*>(a.dout) + n * a.do_stride[0] + h * a.do_stride[1];
  const T* gk = reinterpret_cast<const T*>(a.k) + n * a.k_stride[0] + hk * a.k_stride[1];
  const T* gv = reinterpret_cast<const T*>(a.v) + n * a.v_stride[0] + hk * a.v_stride[1];

  int64_t keys = S;
  if (a.causal) {
    const int64_t last = m0 + kBlockM < L ? m0 + kBlockM : L;  // rows < last see keys < last
    keys = last < S ? last : S;
  }
  const int64_t n_tiles = (keys + kBlockN - 1) / kBlockN;

  load_rows_async<kBlockM, D, kStride, kNThreads>(sQ, gq, a.q_stride[2], m0, L, a.E, tid);
  load_rows_async<kBlockM, D, kStride, kNThreads>(sdO, gdo, a.do_stride[2], m0, L, a.E, tid);
  if (n_tiles > 0) {
    load_rows_async<kBlockN, D, kStride, kNThreads>(sK, gk, a.k_stride[2], 0, S, a.E, tid);
    load_rows_async<kBlockN, D, kStride, kNThreads>(sV, gv, a.v_stride[2], 0, S, a.E, tid);
  }
  cp_async_commit();

  const int64_t warp_row0 = m0 + warp * 16;
  const bool warp_active = warp_row0 < L;
  const int64_t row_i[2] = {warp_row0 + g, warp_row0 + g + 8};
  float lse2[2], dsum[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    lse2[r] = kInf;
    dsum[r] = 0.f;
    if (row_i[r] < L) {
      const float l = a.lse[(n * H + h) * L + row_i[r]];
      lse2[r] = l == -kInf ? kInf : l * kLog2eF;
      dsum[r] = reinterpret_cast<const float*>(a.dsum)[(n * H + h) * L + row_i[r]];
    }
  }

  float acc_q[kDT][4];
#pragma unroll
  for (int dt = 0; dt < kDT; ++dt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_q[dt][e] = 0.f;
  }
  const T* sQw = sQ + warp * 16 * kStride;
  const T* sdOw = sdO + warp * 16 * kStride;

  for (int64_t t = 0; t < n_tiles; ++t) {
    const int stage = static_cast<int>(t & 1);
    if (t + 1 < n_tiles) {
      load_rows_async<kBlockN, D, kStride, kNThreads>(sK + (stage ^ 1) * kBlockN * kStride, gk, a.k_stride[2],
                                                      (t + 1) * kBlockN, S, a.E, tid);
      load_rows_async<kBlockN, D, kStride, kNThreads>(sV + (stage ^ 1) * kBlockN * kStride, gv, a.v_stride[2],
                                                      (t + 1) * kBlockN, S, a.E, tid);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    if (warp_active) {
      const T* sKs = sK + stage * kBlockN * kStride;
      const T* sVs = sV + stage * kBlockN * kStride;
      const int64_t j0 = t * kBlockN;

      // ---- S = Q K^T and dP = dO V^T: 16 queries x kBlockN keys per warp ----
      float acc_s[kNT][4], acc_dp[kNT][4];
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          acc_s[nt][e] = 0.f;
          acc_dp[nt][e] = 0.f;
        }
      }
#pragma unroll
      for (int kk = 0; kk < kKT; ++kk) {
        uint32_t qa[4], oa[4];
        ldmatrix_x4(qa, sQw + (lane & 15) * kStride + kk * 16 + (lane >> 4) * 8);
        ldmatrix_x4(oa, sdOw + (lane & 15) * kStride + kk * 16 + (lane >> 4) * 8);
#pragma unroll
        for (int nt = 0; nt < kNT; nt += 2) {
          uint32_t kb[4], vb[4];
          const int off = (nt * 8 + (lane & 7) + ((lane >> 4) << 3)) * kStride + kk * 16 + ((lane >> 3) & 1) * 8;
          ldmatrix_x4(kb, sKs + off);
          ldmatrix_x4(vb, sVs + off);
          mma_16816<T>(acc_s[nt], qa, kb[0], kb[1]);
          mma_16816<T>(acc_s[nt + 1], qa, kb[2], kb[3]);
          mma_16816<T>(acc_dp[nt], oa, vb[0], vb[1]);
          mma_16816<T>(acc_dp[nt + 1], oa, vb[2], vb[3]);
        }
      }

      // ---- P, then dS = P (dP Z - Dsum) in acc_dp ----
      // Element (nt, e): query row_i[e >> 1], key j0 + nt*8 + cq + (e & 1).
      const bool need_bounds = (j0 + kBlockN > S) || (a.causal && j0 + kBlockN - 1 > warp_row0);
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        bool keep[2][2] = {{true, true}, {true, true}};
        if constexpr (kFeatures) {
          if (a.dropout) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              const int64_t i = row_i[r], j = j0 + nt * 8 + cq;
              keep[r][0] = keep[r][1] = false;
              if (i < L && j < S) {
                keep_pair(a.rng, a.drop_threshold, static_cast<uint64_t>(((n * H + h) * L + i) * S + j),
                          keep[r][0], keep[r][1]);
              }
            }
          }
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e >> 1;
          const int64_t i = row_i[r];
          const int64_t j = j0 + nt * 8 + cq + (e & 1);
          float sc = acc_s[nt][e] * a.scale_log2;
          if (need_bounds && (j >= S || (a.causal && j > i))) sc = -kInf;
          if constexpr (kFeatures) {
            if (a.mask_kind != 0 && sc != -kInf && i < L && j < S) {
              sc = add_mask(sc, mask_bias<float>(a, n, h, i, j), kLog2eF);
            }
          }
          const float p = fast_exp2(sc - lse2[r]);
          float dp = acc_dp[nt][e];
          if constexpr (kFeatures) {
            if (a.dropout) dp = keep[r][e & 1] ? dp * a.drop_scale : 0.f;
          }
          acc_dp[nt][e] = softmax_grad(p, dp - dsum[r]);
        }
      }

      // ---- dQ += dS K ----
#pragma unroll
      for (int kp = 0; kp < kNK; ++kp) {
        uint32_t da[4];
        da[0] = TypeTraits<T>::pack2(acc_dp[2 * kp][0], acc_dp[2 * kp][1]);
        da[1] = TypeTraits<T>::pack2(acc_dp[2 * kp][2], acc_dp[2 * kp][3]);
        da[2] = TypeTraits<T>::pack2(acc_dp[2 * kp + 1][0], acc_dp[2 * kp + 1][1]);
        da[3] = TypeTraits<T>::pack2(acc_dp[2 * kp + 1][2], acc_dp[2 * kp + 1][3]);
#pragma unroll
        for (int dt = 0; dt < kDT; dt += 2) {
          uint32_t kb[4];
          ldmatrix_x4_trans(kb, sKs + (kp * 16 + (lane & 15)) * kStride + dt * 8 + (lane >> 4) * 8);
          mma_16816<T>(acc_q[dt], da, kb[0], kb[1]);
          mma_16816<T>(acc_q[dt + 1], da, kb[2], kb[3]);
        }
      }
    }
    __syncthreads();
  }
  cp_async_wait<0>();  // nothing may be left in flight when the block exits

  if (!warp_active) return;
  T* gdq = reinterpret_cast<T*>(a.dq) + n * a.dq_stride[0] + h * a.dq_stride[1];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t i = row_i[r];
    if (i < L) {
      T* dst = gdq + i * a.dq_stride[2];
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
        const int col = dt * 8 + cq;
        if (col < a.E) {
          dst[col] = TypeTraits<T>::from_float(acc_q[dt][2 * r] * a.scale);
          dst[col + 1] = TypeTraits<T>::from_float(acc_q[dt][2 * r + 1] * a.scale);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// 5. General path
// ---------------------------------------------------------------------------------------------
template <typename Acc>
__device__ __forceinline__ Acc general_scale(const BwdArgs& a) {
  return static_cast<Acc>(a.scale_d);
}
template <typename Acc>
__device__ __forceinline__ Acc general_drop_scale(const BwdArgs& a) {
  return static_cast<Acc>(a.drop_scale_d);
}

// One warp per key row j of (n, hk): dk_j, dv_j over every query row of the group's heads.
template <typename T, typename Acc>
__global__ void __launch_bounds__(128) attention_bwd_general_dkdv_kernel(const BwdArgs a) {
  TX_DYNAMIC_SHARED(unsigned char, smem_raw);
  const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t E = a.E, Ev = a.Ev, L = a.L, S = a.S, H = a.H;
  Acc* sk = reinterpret_cast<Acc*>(smem_raw) + static_cast<int64_t>(warp) * (2 * E + 2 * Ev + 64);
  Acc* sv = sk + E;
  Acc* dk_acc = sv + Ev;
  Acc* dv_acc = dk_acc + E;
  Acc* sp = dv_acc + Ev;  // 32 dropped probabilities
  Acc* sds = sp + 32;     // 32 dS values

  const int64_t row = static_cast<int64_t>(blockIdx.x) * warps + warp;  // (n Hkv + hk) S + j
  if (row >= a.N * a.Hkv * S) return;  // only warp-level syncs below
  const int64_t j = row % S, nh = row / S;
  const int64_t hk = nh % a.Hkv, n = nh / a.Hkv;
  const Acc inf = static_cast<Acc>(__builtin_huge_valf());
  const Acc scale = general_scale<Acc>(a);
  const Acc drop_scale = general_drop_scale<Acc>(a);
  const T* kj = reinterpret_cast<const T*>(a.k) + n * a.k_stride[0] + hk * a.k_stride[1] + j * a.k_stride[2];
  const T* vj = reinterpret_cast<const T*>(a.v) + n * a.v_stride[0] + hk * a.v_stride[1] + j * a.v_stride[2];
  for (int64_t c = lane; c < E; c += 32) {
    sk[c] = cvt<Acc>(kj[c]);
    dk_acc[c] = Acc(0);
  }
  for (int64_t c = lane; c < Ev; c += 32) {
    sv[c] = cvt<Acc>(vj[c]);
    dv_acc[c] = Acc(0);
  }
  __syncwarp();
  const Acc* dsum_all = reinterpret_cast<const Acc*>(a.dsum);

  for (int64_t h = hk * a.group; h < (hk + 1) * a.group; ++h) {
    const T* qh = reinterpret_cast<const T*>(a.q) + n * a.q_stride[0] + h * a.q_stride[1];
    const T* doh = reinterpret_cast<const T*>(a.dout) + n * a.do_stride[0] + h * a.do_stride[1];
    const int64_t bh = n * H + h;
    // Causal: query i sees key j iff j <= i.
    for (int64_t i0 = a.causal ? j : 0; i0 < L; i0 += 32) {
      const int64_t i = i0 + lane;
      Acc p = Acc(0), ds = Acc(0);
      if (i < L) {
        const Acc lse = as_acc<Acc>(a.lse)[bh * L + i];
        if (lse != -inf) {
          const T* qi = qh + i * a.q_stride[2];
          Acc dot = Acc(0);
          for (int64_t c = 0; c < E; ++c) dot += cvt<Acc>(qi[c]) * sk[c];
          Acc sc = dot * scale;
          if (a.mask_kind != 0) sc = add_mask(sc, mask_bias<Acc>(a, n, h, i, j), Acc(1));
          p = sc == -inf ? Acc(0) : exp_acc(sc - lse);
          const T* doi = doh + i * a.do_stride[2];
          Acc dp = Acc(0);
          for (int64_t c = 0; c < Ev; ++c) dp += cvt<Acc>(doi[c]) * sv[c];
          if (a.dropout) {
            const bool keep = a.rng.word(static_cast<uint64_t>((bh * L + i) * S + j)) >= a.drop_threshold;
            const Acc f = keep ? drop_scale : Acc(0);
            ds = softmax_grad(p, dp * f - dsum_all[bh * L + i]);
            p *= f;
          } else {
            ds = softmax_grad(p, dp - dsum_all[bh * L + i]);
          }
        }
      }
      sp[lane] = p;
      sds[lane] = ds;
      __syncwarp();
      const int cnt = static_cast<int>(L - i0 < 32 ? L - i0 : 32);
      for (int64_t c = lane; c < Ev; c += 32) {
        Acc acc = dv_acc[c];
        for (int t = 0; t < cnt; ++t) acc += sp[t] * cvt<Acc>(doh[(i0 + t) * a.do_stride[2] + c]);
        dv_acc[c] = acc;
      }
      for (int64_t c = lane; c < E; c += 32) {
        Acc acc = dk_acc[c];
        for (int t = 0; t < cnt; ++t) acc += sds[t] * cvt<Acc>(qh[(i0 + t) * a.q_stride[2] + c]);
        dk_acc[c] = acc;
      }
      __syncwarp();  // sp / sds are rewritten next iteration
    }
  }
  T* dkj = reinterpret_cast<T*>(a.dk) + n * a.dk_stride[0] + hk * a.dk_stride[1] + j * a.dk_stride[2];
  T* dvj = reinterpret_cast<T*>(a.dv) + n * a.dv_stride[0] + hk * a.dv_stride[1] + j * a.dv_stride[2];
  for (int64_t c = lane; c < E; c += 32) dkj[c] = cvt<T>(dk_acc[c] * scale);
  for (int64_t c = lane; c < Ev; c += 32) dvj[c] = cvt<T>(dv_acc[c]);
}

// p_ij and dP_ij Z_ij of query row i (q_i and dO_i in shared memory, Acc) and key j.
template <typename T, typename Acc>
__device__ __forceinline__ void general_p_dpz(const BwdArgs& a, const Acc* sq, const Acc* sdo, const T* k,
                                              const T* v, int64_t n, int64_t h, int64_t i, int64_t j,
                                              int64_t row, Acc lse, Acc& p, Acc& dpz) {
  const T* kj = k + j * a.k_stride[2];
  Acc dot = Acc(0);
  for (int64_t c = 0; c < a.E; ++c) dot += sq[c] * cvt<Acc>(kj[c]);
  Acc sc = dot * general_scale<Acc>(a);
  if (a.mask_kind != 0) sc = add_mask(sc, mask_bias<Acc>(a, n, h, i, j), Acc(1));
  p = sc == -static_cast<Acc>(__builtin_huge_valf()) ? Acc(0) : exp_acc(sc - lse);
  const T* vj = v + j * a.v_stride[2];
  Acc dp = Acc(0);
  for (int64_t c = 0; c < a.Ev; ++c) dp += sdo[c] * cvt<Acc>(vj[c]);
  if (a.dropout) {
    const bool keep = a.rng.word(static_cast<uint64_t>(row * a.S + j)) >= a.drop_threshold;
    dp *= keep ? general_drop_scale<Acc>(a) : Acc(0);
  }
  dpz = dp;
}

// General path Dsum, one warp per query row: D_i = sum_j p_ij Z_ij dP_ij, which equals
// rowsum(dO * O) for the exact O. Computed this way instead of from the stored `out` because
// `out` was rounded to the input dtype: for fp16/bf16 that rounding (2^-11 / 2^-8 relative) would
// be the largest error of every gradient (sum_j dS_ij = dO.O - D_i is exactly 0 only with the
// exact O). It costs one more pass over the keys; the general path is the slow path anyway.
template <typename T, typename Acc>
__global__ void __launch_bounds__(128) attention_bwd_general_dsum_kernel(const BwdArgs a) {
  TX_DYNAMIC_SHARED(unsigned char, smem_raw);
  const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t E = a.E, Ev = a.Ev, L = a.L, S = a.S, H = a.H;
  Acc* sq = reinterpret_cast<Acc*>(smem_raw) + static_cast<int64_t>(warp) * (E + Ev);
  Acc* sdo = sq + E;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * warps + warp;  // (n H + h) L + i
  if (row >= a.N * H * L) return;  // only warp-level syncs below
  const int64_t i = row % L, bh = row / L;
  const int64_t h = bh % H, n = bh / H, hk = h / a.group;
  const T* qi = reinterpret_cast<const T*>(a.q) + n * a.q_stride[0] + h * a.q_stride[1] + i * a.q_stride[2];
  const T* doi = reinterpret_cast<const T*>(a.dout) + n * a.do_stride[0] + h * a.do_stride[1] + i * a.do_stride[2];
  const T* k = reinterpret_cast<const T*>(a.k) + n * a.k_stride[0] + hk * a.k_stride[1];
  const T* v = reinterpret_cast<const T*>(a.v) + n * a.v_stride[0] + hk * a.v_stride[1];
  for (int64_t c = lane; c < E; c += 32) sq[c] = cvt<Acc>(qi[c]);
  for (int64_t c = lane; c < Ev; c += 32) sdo[c] = cvt<Acc>(doi[c]);
  __syncwarp();
  const Acc lse = as_acc<Acc>(a.lse)[row];
  Acc acc = Acc(0);
  if (lse != -static_cast<Acc>(__builtin_huge_valf())) {  // a fully masked row keeps D = 0
    const int64_t j_end = a.causal ? (i + 1 < S ? i + 1 : S) : S;
    for (int64_t j = lane; j < j_end; j += 32) {
      Acc p, dpz;
      general_p_dpz<T, Acc>(a, sq, sdo, k, v, n, h, i, j, row, lse, p, dpz);
      acc += p * dpz;
    }
  }
  acc = warp_sum(acc);
  if (lane == 0) reinterpret_cast<Acc*>(a.dsum)[row] = acc;
}

// One warp per query row i of (n, h): dq_i, and the row of dmask.
template <typename T, typename Acc>
__global__ void __launch_bounds__(128) attention_bwd_general_dq_kernel(const BwdArgs a) {
  TX_DYNAMIC_SHARED(unsigned char, smem_raw);
  const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t E = a.E, Ev = a.Ev, L = a.L, S = a.S, H = a.H;
  Acc* sq = reinterpret_cast<Acc*>(smem_raw) + static_cast<int64_t>(warp) * (2 * E + Ev + 32);
  Acc* sdo = sq + E;
  Acc* dq_acc = sdo + Ev;
  Acc* sds = dq_acc + E;  // 32 dS values

  const int64_t row = static_cast<int64_t>(blockIdx.x) * warps + warp;  // (n H + h) L + i
  if (row >= a.N * H * L) return;  // only warp-level syncs below
  const int64_t i = row % L, bh = row / L;
  const int64_t h = bh % H, n = bh / H, hk = h / a.group;
  const Acc scale = general_scale<Acc>(a);
  const T* qi = reinterpret_cast<const T*>(a.q) + n * a.q_stride[0] + h * a.q_stride[1] + i * a.q_stride[2];
  const T* doi = reinterpret_cast<const T*>(a.dout) + n * a.do_stride[0] + h * a.do_stride[1] + i * a.do_stride[2];
  const T* k = reinterpret_cast<const T*>(a.k) + n * a.k_stride[0] + hk * a.k_stride[1];
  const T* v = reinterpret_cast<const T*>(a.v) + n * a.v_stride[0] + hk * a.v_stride[1];
  for (int64_t c = lane; c < E; c += 32) {
    sq[c] = cvt<Acc>(qi[c]);
    dq_acc[c] = Acc(0);
  }
  for (int64_t c = lane; c < Ev; c += 32) sdo[c] = cvt<Acc>(doi[c]);
  __syncwarp();
  const Acc lse = as_acc<Acc>(a.lse)[row];
  const bool live = lse != -static_cast<Acc>(__builtin_huge_valf());  // a fully masked row has zero gradients
  const Acc dsum = reinterpret_cast<const Acc*>(a.dsum)[row];

  const int64_t j_end = a.causal ? (i + 1 < S ? i + 1 : S) : S;
  for (int64_t j0 = 0; j0 < j_end; j0 += 32) {
    const int64_t j = j0 + lane;
    Acc ds = Acc(0);
    if (j < j_end && live) {
      Acc p, dpz;
      general_p_dpz<T, Acc>(a, sq, sdo, k, v, n, h, i, j, row, lse, p, dpz);
      ds = softmax_grad(p, dpz - dsum);
    }
    if (a.dmask != nullptr && j < j_end) as_acc<Acc>(a.dmask)[row * S + j] = ds;
    sds[lane] = ds;
    __syncwarp();
    const int cnt = static_cast<int>(j_end - j0 < 32 ? j_end - j0 : 32);
    for (int64_t c = lane; c < E; c += 32) {
      Acc acc = dq_acc[c];
      for (int t = 0; t < cnt; ++t) acc += sds[t] * cvt<Acc>(k[(j0 + t) * a.k_stride[2] + c]);
      dq_acc[c] = acc;
    }
    __syncwarp();
  }
  T* dqi = reinterpret_cast<T*>(a.dq) + n * a.dq_stride[0] + h * a.dq_stride[1] + i * a.dq_stride[2];
  for (int64_t c = lane; c < E; c += 32) dqi[c] = cvt<T>(dq_acc[c] * scale);
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------
bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }
bool strides_mult8(const int64_t* s) { return s[0] % 8 == 0 && s[1] % 8 == 0 && s[2] % 8 == 0; }

int64_t smem_limit(const DeviceInfo& dev) {
  return dev.max_smem_per_block > 0 ? dev.max_smem_per_block : 48 * 1024;
}

int fast_head_dim(int64_t E) {
  if (E <= 32) return 32;
  if (E <= 64) return 64;
  if (E <= 96) return 96;
  if (E <= 128) return 128;
  return 0;
}

size_t dkdv_smem_for(int D) {
  switch (D) {
    case 32: return dkdv_smem_bytes<32>();
    case 64: return dkdv_smem_bytes<64>();
    case 96: return dkdv_smem_bytes<96>();
    default: return dkdv_smem_bytes<128>();
  }
}
size_t dq_smem_for(int D) {
  switch (D) {
    case 32: return dq_smem_bytes<32>();
    case 64: return dq_smem_bytes<64>();
    case 96: return dq_smem_bytes<96>();
    default: return dq_smem_bytes<128>();
  }
}

// The fast head-dim instantiation for this problem, or 0 for the general path.
int fast_plan(const AttentionBwdParams& p, const DeviceInfo& dev) {
  const bool low_precision = p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16;
  if (!low_precision || p.head_dim != p.v_head_dim || p.head_dim <= 0 || p.head_dim % 8 != 0) return 0;
  const int D = fast_head_dim(p.head_dim);
  if (D == 0 || p.q_len <= 0 || p.kv_len <= 0) return 0;
  if (!aligned16(p.q) || !aligned16(p.k) || !aligned16(p.v) || !aligned16(p.grad_out) || !aligned16(p.dk) ||
      !aligned16(p.dv)) {
    return 0;
  }
  if (!strides_mult8(p.q_stride) || !strides_mult8(p.k_stride) || !strides_mult8(p.v_stride) ||
      !strides_mult8(p.grad_out_stride) || !strides_mult8(p.dk_stride) || !strides_mult8(p.dv_stride)) {
    return 0;
  }
  const size_t smem = dkdv_smem_for(D) > dq_smem_for(D) ? dkdv_smem_for(D) : dq_smem_for(D);
  if (static_cast<int64_t>(smem) > smem_limit(dev)) return 0;
  // Grid sizes (1D) and the int step / tile counters of the kernels.
  const int64_t m_tiles = (p.q_len + 31) / 32;  // the smallest query tile of any kernel
  if (m_tiles * p.batch * p.heads > 0x7fffffff || m_tiles * (p.heads / p.kv_heads) > 0x7fffffff) return 0;
  const int64_t n_tiles = (p.kv_len + 127) / 128;
  if (n_tiles * p.batch * p.kv_heads > 0x7fffffff) return 0;
  return D;
}

size_t round_up256(size_t x) { return (x + 255) / 256 * 256; }

size_t dsum_bytes(const AttentionBwdParams& p) {
  const size_t acc = p.dtype == DType::kFloat64 ? sizeof(double) : sizeof(float);
  return round_up256(static_cast<size_t>(p.batch) * p.heads * p.q_len * acc);
}

BwdArgs make_args(const AttentionBwdParams& p, void* workspace) {
  BwdArgs a{};
  a.q = p.q;
  a.k = p.k;
  a.v = p.v;
  a.out = p.out;
  a.dout = p.grad_out;
  a.lse = static_cast<const float*>(p.lse);  // fp64 for fp64 inputs (read through as_acc)
  a.dq = p.dq;
  a.dk = p.dk;
  a.dv = p.dv;
  a.dmask = static_cast<float*>(p.dmask);  // fp64 for fp64 inputs (written through as_acc)
  a.dsum = workspace;
  a.dq_accum = nullptr;
  a.N = p.batch;
  a.H = p.heads;
  a.Hkv = p.kv_heads;
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
    a.do_stride[d] = p.grad_out_stride[d];
    a.dq_stride[d] = p.dq_stride[d];
    a.dk_stride[d] = p.dk_stride[d];
    a.dv_stride[d] = p.dv_stride[d];
  }
  a.mask_kind = p.mask == nullptr ? 0 : static_cast<int>(p.mask_kind);
  a.mask_dtype = p.mask_dtype;
  a.mask = p.mask;
  for (int d = 0; d < 4; ++d) a.mask_stride[d] = p.mask_stride[d];
  a.scale = static_cast<float>(p.scale);
  a.scale_log2 = static_cast<float>(p.scale) * kLog2eF;
  a.scale_d = p.scale;
  a.causal = p.is_causal;
  // The same host-side threshold and scale functions as the CPU kernel and the forward.
  a.dropout = p.dropout_p > 0.0;
  a.drop_threshold = dropout_threshold(p.dropout_p);
  a.drop_scale_d = dropout_scale(p.dropout_p);
  a.drop_scale = static_cast<float>(a.drop_scale_d);
  a.rng = p.rng;
  a.num_m_blocks = 1;
  a.num_n_blocks = 1;
  return a;
}

template <typename K>
cudaError_t allow_smem(K kernel, size_t smem) {
  if (smem <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
}

template <typename T, typename Acc>
cudaError_t launch_preprocess(const BwdArgs& a, cudaStream_t stream) {
  const int64_t rows = a.N * a.H * a.L;
  const int64_t blocks = (rows + 7) / 8;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const auto kernel = attention_bwd_preprocess_kernel<T, Acc>;
  TX_LAUNCH(kernel, static_cast<unsigned>(blocks), 256, 0, stream)(a);
  return cudaGetLastError();
}

template <typename T, int D, bool kFeatures>
cudaError_t launch_fast_dim(BwdArgs a, bool deterministic, cudaStream_t stream) {
  constexpr size_t kSmem = dkdv_smem_bytes<D>();
  auto dkdv = attention_bwd_dkdv_kernel<T, D, kFeatures>;
  cudaError_t err = allow_smem(dkdv, kSmem);
  if (err != cudaSuccess) return err;
  a.num_m_blocks = static_cast<int>((a.L + BwdTraits<D>::kBlockM - 1) / BwdTraits<D>::kBlockM);
  a.num_n_blocks = static_cast<int>((a.S + BwdTraits<D>::kBlockN - 1) / BwdTraits<D>::kBlockN);
  const int64_t blocks = static_cast<int64_t>(a.num_n_blocks) * a.Hkv * a.N;
  TX_LAUNCH(dkdv, static_cast<unsigned>(blocks), BwdTraits<D>::kBlockN / 16 * 32, kSmem, stream)(a);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  if (!deterministic) {
    const int64_t total = a.N * a.H * a.L * a.E;
    int64_t cblocks = (total + 255) / 256;
    const int64_t cap = int64_t{1} << 20;  // the kernel is grid-stride beyond this
    cblocks = cblocks < cap ? cblocks : cap;
    if (cblocks == 0) return cudaSuccess;
    TX_LAUNCH(attention_bwd_dq_convert_kernel<T>, static_cast<unsigned>(cblocks), 256, 0, stream)(a);
    return cudaGetLastError();
  }
  constexpr size_t kDqSmem = dq_smem_bytes<D>();
  auto dqk = attention_bwd_dq_kernel<T, D, kFeatures>;
  err = allow_smem(dqk, kDqSmem);
  if (err != cudaSuccess) return err;
  a.num_m_blocks = static_cast<int>((a.L + kDqBlockM - 1) / kDqBlockM);
  const int64_t qblocks = static_cast<int64_t>(a.num_m_blocks) * a.H * a.N;
  TX_LAUNCH(dqk, static_cast<unsigned>(qblocks), kDqBlockM / 16 * 32, kDqSmem, stream)(a);
  return cudaGetLastError();
}

template <typename T, bool kFeatures>
cudaError_t dispatch_fast_dim(const BwdArgs& a, int D, bool deterministic, cudaStream_t stream) {
  switch (D) {
    case 32: return launch_fast_dim<T, 32, kFeatures>(a, deterministic, stream);
    case 64: return launch_fast_dim<T, 64, kFeatures>(a, deterministic, stream);
    case 96: return launch_fast_dim<T, 96, kFeatures>(a, deterministic, stream);
    case 128: return launch_fast_dim<T, 128, kFeatures>(a, deterministic, stream);
    default: return cudaErrorNotSupported;
  }
}

template <typename T>
cudaError_t run_fast(BwdArgs a, int D, bool deterministic, cudaStream_t stream) {
  cudaError_t err = launch_preprocess<T, float>(a, stream);
  if (err != cudaSuccess) return err;
  const bool features = a.mask_kind != 0 || a.dropout || a.dmask != nullptr;
  return features ? dispatch_fast_dim<T, true>(a, D, deterministic, stream)
                  : dispatch_fast_dim<T, false>(a, D, deterministic, stream);
}

// Warps per block of a general kernel whose warps need `per_warp` bytes of shared memory.
template <typename K>
cudaError_t general_launch_shape(K kernel, int64_t per_warp, int64_t smem_max, int& warps, size_t& smem) {
  warps = 4;
  while (warps > 1 && warps * per_warp > smem_max) warps /= 2;
  if (warps * per_warp > smem_max) return cudaErrorNotSupported;  // head dims of tens of thousands
  smem = static_cast<size_t>(warps * per_warp);
  return allow_smem(kernel, smem);
}

template <typename T, typename Acc>
cudaError_t run_general(const BwdArgs& a, int64_t smem_max, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  int warps;
  size_t smem;
  {
    auto kernel = attention_bwd_general_dsum_kernel<T, Acc>;
    err = general_launch_shape(kernel, (a.E + a.Ev) * static_cast<int64_t>(sizeof(Acc)), smem_max, warps, smem);
    if (err != cudaSuccess) return err;
    const int64_t rows = a.N * a.H * a.L;
    const int64_t blocks = (rows + warps - 1) / warps;
    if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
    if (blocks > 0) {
      TX_LAUNCH(kernel, static_cast<unsigned>(blocks), warps * 32, smem, stream)(a);
      err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
  }
  {
    auto kernel = attention_bwd_general_dkdv_kernel<T, Acc>;
    err = general_launch_shape(kernel, (2 * a.E + 2 * a.Ev + 64) * static_cast<int64_t>(sizeof(Acc)), smem_max,
                               warps, smem);
    if (err != cudaSuccess) return err;
    const int64_t rows = a.N * a.Hkv * a.S;
    const int64_t blocks = (rows + warps - 1) / warps;
    if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
    if (blocks > 0) {
      TX_LAUNCH(kernel, static_cast<unsigned>(blocks), warps * 32, smem, stream)(a);
      err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
  }
  {
    auto kernel = attention_bwd_general_dq_kernel<T, Acc>;
    err = general_launch_shape(kernel, (2 * a.E + a.Ev + 32) * static_cast<int64_t>(sizeof(Acc)), smem_max,
                               warps, smem);
    if (err != cudaSuccess) return err;
    const int64_t rows = a.N * a.H * a.L;
    const int64_t blocks = (rows + warps - 1) / warps;
    if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
    if (blocks > 0) {
      TX_LAUNCH(kernel, static_cast<unsigned>(blocks), warps * 32, smem, stream)(a);
      err = cudaGetLastError();
    }
  }
  return err;
}

// Sizes and mask description only: the workspace query may run before the outputs exist.
cudaError_t validate_shape(const AttentionBwdParams& p) {
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
  return cudaSuccess;
}

cudaError_t validate(const AttentionBwdParams& p) {
  const cudaError_t err = validate_shape(p);
  if (err != cudaSuccess) return err;
  if (p.q == nullptr || p.k == nullptr || p.v == nullptr || p.out == nullptr || p.lse == nullptr ||
      p.grad_out == nullptr || p.dq == nullptr || p.dk == nullptr || p.dv == nullptr) {
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
  if (D != 0) {
    if (!params.deterministic) {
      a.dq_accum = reinterpret_cast<float*>(static_cast<unsigned char*>(workspace) + dsum_bytes(params));
    }
    if (params.dtype == DType::kFloat16) return run_fast<__half>(a, D, params.deterministic, stream);
    return run_fast<__nv_bfloat16>(a, D, params.deterministic, stream);
  }
  // The general path also covers L == 0 or S == 0: it writes the zero gradients of the other side.
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
