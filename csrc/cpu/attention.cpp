// attention.cpp: fused attention on the CPU, forward and backward (FlashAttention-2 algorithm).
//
// Forward, per (batch n, head h, block of query rows):
//   for each block of keys: S = scale * Q K^T (+ mask, causal); online softmax: running row max m
//   and row sum l, rescale the accumulator by exp(m_old - m_new); O += P V.
//   out = O / l, lse = m + log(l). The L x S score matrix never exists: only a (q_block x
//   kv_block) tile per thread. Blocks of keys entirely above the causal diagonal are skipped.
// Backward, per (batch n, key/value head), for each query head of its GQA group and query block:
//   D = rowsum(dO * O); for each key block: recompute P = exp(S - lse); dV += P_drop^T dO;
//   dP = dO V^T (dropout applied); dS = P * (dP - D); dQ += scale dS K; dK += scale dS^T Q.
//   dK and dV accumulate in per-thread fp32 (fp64) buffers of S rows: O(S) extra memory.
// Tiles are multiplied by the BLAS in gemm.h; fp32/fp64 tiles are read in place through their
// strides, bf16/fp16 tiles are widened to fp32 first. Dropout regenerates its mask from the
// Philox counter (philox.h), so nothing of size L x S is stored between forward and backward.
// A packed variable-length batch (params.h, cu_seqlens_q/k) runs the same loops: each sequence
// is located by its offsets instead of the batch stride, and blocks past its end are skipped.
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include "dispatch.h"
#include "gemm.h"
#include "kernels.h"

namespace tx_kernels::cpu {
namespace {

template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
constexpr T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Block sizes: a (kQBlock x kKvBlock) fp32 score tile is 64 KiB, which stays in L2 with the
// Q/K/V tiles; query blocks small enough that short sequences still spread over the threads.
constexpr int64_t kQBlock = 64;
constexpr int64_t kKvBlock = 256;

// Rows [row0, row0 + rows) of one (n, h) matrix of `cols` columns and row stride `ld`, as an
// acc_t pointer with its leading dimension: in place when the type and stride allow, else widened
// into `buffer`.
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
const acc_t* tile(const scalar_t* base, int64_t ld, int64_t rows, int64_t cols, acc_t* buffer,
                  int64_t* tile_ld) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (ld >= cols && ld >= 1 && fits_blas_int(ld)) {
      *tile_ld = ld;
      return base;
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* src = base + r * ld;
    acc_t* dst = buffer + r * cols;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      std::copy(src, src + cols, dst);
    } else {
      at::vec::convert(src, dst, cols);
    }
  }
  *tile_ld = std::max<int64_t>(cols, 1);
  return buffer;
}

// Adds the mask for one query row to `scores` (additive) or sets disallowed scores to -inf (bool).
// Rows of a mask are usually contiguous along the keys (stride 1): those take branch-free loops
// the compiler vectorizes; a broadcast or strided key dimension takes the general loop.
template <typename acc_t>
void apply_mask_row(const AttentionParams& p, int64_t n, int64_t h, int64_t i, int64_t j0,
                    int64_t cols, acc_t* scores) {
  const int64_t off = n * p.mask_stride[0] + h * p.mask_stride[1] + i * p.mask_stride[2] +
                      j0 * p.mask_stride[3];
  const int64_t st = p.mask_stride[3];
  auto add = [&](auto* m) {
    if (st == 1) {
      for (int64_t c = 0; c < cols; ++c) scores[c] += static_cast<acc_t>(m[c]);
    } else {
      for (int64_t c = 0; c < cols; ++c) scores[c] += static_cast<acc_t>(m[c * st]);
    }
  };
  switch (p.mask_dtype) {
    case DType::kBool: {
      // Read as bytes: a bool tensor holds 0 or 1 per element.
      const uint8_t* m = static_cast<const uint8_t*>(p.mask) + off;
      const acc_t ninf = neg_inf<acc_t>();
      if (st == 1) {
        for (int64_t c = 0; c < cols; ++c) scores[c] = m[c] ? scores[c] : ninf;
      } else {
        for (int64_t c = 0; c < cols; ++c) scores[c] = m[c * st] ? scores[c] : ninf;
      }
      break;
    }
    case DType::kFloat32: add(static_cast<const float*>(p.mask) + off); break;
    case DType::kFloat64: add(static_cast<const double*>(p.mask) + off); break;
    case DType::kBFloat16: add(static_cast<const c10::BFloat16*>(p.mask) + off); break;
    case DType::kFloat16: add(static_cast<const c10::Half*>(p.mask) + off); break;
  }
}

// The mask and causality for one block of keys [j0, j0 + cols) of one (n, h). A mask that is the
// same for every query (stride 0 along queries: key padding, the most common mask) is converted
// once per block into an additive bias row (0 or -inf for bool) and added with a vector loop.
template <typename acc_t>
class BlockMask {
 public:
  BlockMask(const AttentionParams& p, int64_t n, int64_t h, int64_t j0, int64_t cols, acc_t* buffer)
      : p_(p), n_(n), h_(h), j0_(j0), cols_(cols) {
    if (p.mask_kind != MaskKind::kNone && p.mask_stride[2] == 0) {
      std::fill(buffer, buffer + cols, acc_t(0));
      apply_mask_row(p, n, h, 0, j0, cols, buffer);
      shared_ = buffer;
      all_masked_ = std::all_of(buffer, buffer + cols, [](acc_t x) { return x == neg_inf<acc_t>(); });
    }
  }

  // Every score of the block is masked for every query (padding past a sequence's end): the block
  // contributes nothing and is skipped, GEMMs included.
  bool all_masked() const { return all_masked_; }

  // Scores of query row i: mask, then causal (key j > i is disallowed).
  void apply(int64_t i, acc_t* scores) const {
    if (shared_ != nullptr) {
      at::vec::map2([](auto a, auto b) { return a + b; }, scores, scores, shared_, cols_);
    } else if (p_.mask_kind != MaskKind::kNone) {
      apply_mask_row(p_, n_, h_, i, j0_, cols_, scores);
    }
    if (p_.is_causal) {
      for (int64_t c = std::max<int64_t>(i + 1 - j0_, 0); c < cols_; ++c) scores[c] = neg_inf<acc_t>();
    }
  }

 private:
  const AttentionParams& p_;
  int64_t n_, h_, j0_, cols_;
  const acc_t* shared_ = nullptr;
  bool all_masked_ = false;
};

// The dropout factor (0 or 1 / (1 - p)) of each of `cols` consecutive elements starting at flat
// index idx0, from the Philox stream shared with the CUDA kernels.
template <typename acc_t>
void dropout_factors(const DropoutRng& rng, uint32_t threshold, acc_t keep_scale, uint64_t idx0,
                     int64_t cols, acc_t* factor) {
  int64_t c = 0;
  while (c < cols) {
    const uint64_t idx = idx0 + static_cast<uint64_t>(c);
    const Philox4 w = rng.words(idx >> 2);
    const uint32_t words[4] = {w.x, w.y, w.z, w.w};
    for (uint64_t lane = idx & 3; lane < 4 && c < cols; ++lane, ++c) {
      factor[c] = words[lane] >= threshold ? keep_scale : acc_t(0);
    }
  }
}

// x[c] = exp(x[c] - shift) for c < cols; returns their sum. exp_u20 is the fp32 exponential
// torch's own CPU flash attention uses; fp64 uses the full-precision one.
template <typename acc_t>
acc_t exp_shift_sum(acc_t* x, int64_t cols, acc_t shift) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec vshift(shift);
  Vec vsum(acc_t(0));
  int64_t c = 0;
  for (; c + Vec::size() <= cols; c += Vec::size()) {
    Vec v = Vec::loadu(x + c) - vshift;
    if constexpr (std::is_same_v<acc_t, float>) {
      v = v.exp_u20();
    } else {
      v = v.exp();
    }
    v.store(x + c);
    vsum = vsum + v;
  }
  acc_t sum = at::vec::vec_reduce_all<acc_t>([](Vec a, Vec b) { return a + b; }, vsum);
  for (; c < cols; ++c) {
    x[c] = std::exp(x[c] - shift);
    sum += x[c];
  }
  return sum;
}

template <typename acc_t>
acc_t row_max(const acc_t* x, int64_t cols) {
  using Vec = at::vec::Vectorized<acc_t>;
  Vec vmax(neg_inf<acc_t>());
  int64_t c = 0;
  for (; c + Vec::size() <= cols; c += Vec::size()) vmax = at::vec::maximum(vmax, Vec::loadu(x + c));
  acc_t out = at::vec::vec_reduce_all<acc_t>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, vmax);
  for (; c < cols; ++c) out = std::max(out, x[c]);
  return out;
}

template <typename acc_t>
void scale_row(acc_t* x, int64_t cols, acc_t factor) {
  at::vec::map([factor](auto v) { return v * decltype(v)(factor); }, x, x, cols);
}

template <typename scalar_t, typename acc_t>
void store_row(const acc_t* src, scalar_t* dst, int64_t cols, acc_t factor) {
  for (int64_t c = 0; c < cols; ++c) dst[c] = static_cast<scalar_t>(src[c] * factor);
}

// Where sequence n lies in the tensors: its first query and key rows (0 in a padded batch, whose
// batch strides locate it; the offsets of a packed one) and its lengths.
struct Sequence {
  int64_t q_row0, kv_row0, q_len, kv_len;
};

Sequence sequence(const AttentionParams& p, int64_t n) {
  if (p.cu_seqlens_q == nullptr) return {0, 0, p.q_len, p.kv_len};
  const int64_t q0 = p.cu_seqlens_q[n], k0 = p.cu_seqlens_k[n];
  return {q0, k0, p.cu_seqlens_q[n + 1] - q0, p.cu_seqlens_k[n + 1] - k0};
}

// lse of row 0 of (n, h): (N, H, L) padded, (H, total_q) packed.
float* lse_rows(const AttentionParams& p, const Sequence& seq, int64_t n, int64_t h) {
  if (p.cu_seqlens_q == nullptr) return p.lse + (n * p.heads + h) * p.q_len;
  return p.lse + h * static_cast<int64_t>(p.cu_seqlens_q[p.batch]) + seq.q_row0;
}

// Keys query row block [i0, i0 + rows) may see: all of the sequence's, or 0..i_max under causal.
int64_t kv_limit(const AttentionParams& p, const Sequence& seq, int64_t i0, int64_t rows) {
  return p.is_causal ? std::min(seq.kv_len, i0 + rows) : seq.kv_len;
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
void attention_fwd_impl(const AttentionParams& p) {
  using acc_t = acc_type<scalar_t>;
  const int64_t H = p.heads, L = p.q_len, S = p.kv_len, E = p.head_dim, Ev = p.v_head_dim;
  const int64_t group = p.heads / p.kv_heads;
  const int64_t bq = std::min(kQBlock, L);
  const int64_t bk = std::min(kKvBlock, S);
  const int64_t q_blocks = ceil_div(L, bq);
  const bool dropout = p.dropout_p > 0.0;
  const uint32_t threshold = dropout_threshold(p.dropout_p);
  const acc_t keep_scale = static_cast<acc_t>(dropout_scale(p.dropout_p));
  const auto* q_all = static_cast<const scalar_t*>(p.q);
  const auto* k_all = static_cast<const scalar_t*>(p.k);
  const auto* v_all = static_cast<const scalar_t*>(p.v);
  auto* out_all = static_cast<scalar_t*>(p.out);

  at::parallel_for(0, p.batch * H * q_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scores(bq * bk), acc(bq * Ev), m(bq), l(bq), factor(dropout ? bk : 0), mask_buf(bk);
    std::vector<acc_t> q_buf(bq * E), k_buf(bk * E), v_buf(bk * Ev);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qb = task % q_blocks;
      const int64_t h = (task / q_blocks) % H;
      const int64_t n = task / (q_blocks * H);
      const int64_t hk = h / group;
      const Sequence seq = sequence(p, n);
      const int64_t i0 = qb * bq;
      if (i0 >= seq.q_len) continue;  // a packed sequence shorter than the longest
      const int64_t rows = std::min(bq, seq.q_len - i0);
      const int64_t q_row = seq.q_row0 + i0;
      int64_t ldq, ldk, ldv;
      const acc_t* q = tile(q_all + n * p.q_stride[0] + h * p.q_stride[1] + q_row * p.q_stride[2],
                            p.q_stride[2], rows, E, q_buf.data(), &ldq);
      const scalar_t* k_nh = k_all + n * p.k_stride[0] + hk * p.k_stride[1] + seq.kv_row0 * p.k_stride[2];
      const scalar_t* v_nh = v_all + n * p.v_stride[0] + hk * p.v_stride[1] + seq.kv_row0 * p.v_stride[2];
      std::fill(acc.begin(), acc.end(), acc_t(0));
      std::fill(m.begin(), m.end(), neg_inf<acc_t>());
      std::fill(l.begin(), l.end(), acc_t(0));

      const int64_t kv_end = kv_limit(p, seq, i0, rows);
      for (int64_t j0 = 0; j0 < kv_end; j0 += bk) {
        const int64_t cols = std::min(bk, kv_end - j0);
        const BlockMask<acc_t> block_mask(p, n, h, j0, cols, mask_buf.data());
        if (block_mask.all_masked()) continue;
        const acc_t* k = tile(k_nh + j0 * p.k_stride[2], p.k_stride[2], cols, E, k_buf.data(), &ldk);
        gemm<acc_t>(false, true, rows, cols, E, static_cast<acc_t>(p.scale), q, ldq, k, ldk,
                    acc_t(0), scores.data(), bk);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = i0 + r;
          acc_t* s = scores.data() + r * bk;
          block_mask.apply(i, s);
          const acc_t new_max = std::max(m[r], row_max(s, cols));
          if (new_max == neg_inf<acc_t>()) {  // nothing allowed in this row so far
            std::fill(s, s + cols, acc_t(0));
            continue;
          }
          const acc_t sum = exp_shift_sum(s, cols, new_max);
          const acc_t alpha = std::exp(m[r] - new_max);  // 0 when m[r] is -inf
          if (alpha != acc_t(1)) scale_row(acc.data() + r * Ev, Ev, alpha);
          l[r] = l[r] * alpha + sum;
          m[r] = new_max;
          if (dropout) {
            const uint64_t idx0 = static_cast<uint64_t>(((n * H + h) * L + i) * S + j0);
            dropout_factors(p.rng, threshold, keep_scale, idx0, cols, factor.data());
            at::vec::map2([](auto x, auto f) { return x * f; }, s, s, factor.data(), cols);
          }
        }
        const acc_t* v = tile(v_nh + j0 * p.v_stride[2], p.v_stride[2], cols, Ev, v_buf.data(), &ldv);
        gemm<acc_t>(false, false, rows, Ev, cols, acc_t(1), scores.data(), bk, v, ldv, acc_t(1),
                    acc.data(), Ev);
      }

      scalar_t* o = out_all + n * p.out_stride[0] + h * p.out_stride[1] + q_row * p.out_stride[2];
      float* lse = lse_rows(p, seq, n, h) + i0;
      for (int64_t r = 0; r < rows; ++r) {
        const bool empty = !(l[r] > acc_t(0));
        store_row(acc.data() + r * Ev, o + r * p.out_stride[2], Ev,
                  empty ? acc_t(0) : acc_t(1) / l[r]);
        lse[r] = empty ? neg_inf<float>() : static_cast<float>(m[r] + std::log(l[r]));
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
void attention_bwd_impl(const AttentionBwdParams& p) {
  using acc_t = acc_type<scalar_t>;
  const int64_t H = p.heads, Hkv = p.kv_heads, L = p.q_len, S = p.kv_len;
  const int64_t E = p.head_dim, Ev = p.v_head_dim;
  const int64_t group = H / Hkv;
  const int64_t bq = std::min(kQBlock, L);
  const int64_t bk = std::min(kKvBlock, S);
  const bool dropout = p.dropout_p > 0.0;
  const uint32_t threshold = dropout_threshold(p.dropout_p);
  const acc_t keep_scale = static_cast<acc_t>(dropout_scale(p.dropout_p));
  const acc_t scale = static_cast<acc_t>(p.scale);
  const auto* q_all = static_cast<const scalar_t*>(p.q);
  const auto* k_all = static_cast<const scalar_t*>(p.k);
  const auto* v_all = static_cast<const scalar_t*>(p.v);
  const auto* o_all = static_cast<const scalar_t*>(p.out);
  const auto* do_all = static_cast<const scalar_t*>(p.grad_out);
  auto* dq_all = static_cast<scalar_t*>(p.dq);
  auto* dk_all = static_cast<scalar_t*>(p.dk);
  auto* dv_all = static_cast<scalar_t*>(p.dv);

  // One task per (n, key/value head): it owns dK and dV of its rows, so no two tasks write the
  // same memory and the result does not depend on the thread count.
  at::parallel_for(0, p.batch * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> dk_acc(S * E), dv_acc(S * Ev), dq_acc(bq * E), delta(bq);
    std::vector<acc_t> probs(bq * bk), dprobs(bq * bk), factors(dropout ? bq * bk : 0), mask_buf(bk);
    std::vector<acc_t> q_buf(bq * E), do_buf(bq * Ev), o_row(Ev), k_buf(bk * E), v_buf(bk * Ev);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t hk = task % Hkv, n = task / Hkv;
      const Sequence seq = sequence(p, n);
      const scalar_t* k_nh = k_all + n * p.k_stride[0] + hk * p.k_stride[1] + seq.kv_row0 * p.k_stride[2];
      const scalar_t* v_nh = v_all + n * p.v_stride[0] + hk * p.v_stride[1] + seq.kv_row0 * p.v_stride[2];
      std::fill(dk_acc.begin(), dk_acc.end(), acc_t(0));
      std::fill(dv_acc.begin(), dv_acc.end(), acc_t(0));

      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        for (int64_t i0 = 0; i0 < seq.q_len; i0 += bq) {
          const int64_t rows = std::min(bq, seq.q_len - i0);
          const int64_t q_row = seq.q_row0 + i0;
          int64_t ldq, ldo, ldk, ldv;
          const acc_t* q = tile(q_all + n * p.q_stride[0] + h * p.q_stride[1] + q_row * p.q_stride[2],
                                p.q_stride[2], rows, E, q_buf.data(), &ldq);
          const acc_t* dout = tile(
              do_all + n * p.grad_out_stride[0] + h * p.grad_out_stride[1] + q_row * p.grad_out_stride[2],
              p.grad_out_stride[2], rows, Ev, do_buf.data(), &ldo);
          const float* lse = lse_rows(p, seq, n, h) + i0;
          // delta = rowsum(dO * O): the softmax backward's correction term.
          const scalar_t* o_blk = o_all + n * p.out_stride[0] + h * p.out_stride[1] + q_row * p.out_stride[2];
          for (int64_t r = 0; r < rows; ++r) {
            const scalar_t* orow = o_blk + r * p.out_stride[2];
            if constexpr (std::is_same_v<scalar_t, acc_t>) {
              std::copy(orow, orow + Ev, o_row.data());
            } else {
              at::vec::convert(orow, o_row.data(), Ev);
            }
            delta[r] = detail::dot(dout + r * ldo, o_row.data(), Ev);
          }
          std::fill(dq_acc.begin(), dq_acc.end(), acc_t(0));

          const int64_t kv_end = kv_limit(p, seq, i0, rows);
          for (int64_t j0 = 0; j0 < kv_end; j0 += bk) {
            const int64_t cols = std::min(bk, kv_end - j0);
            const BlockMask<acc_t> block_mask(p, n, h, j0, cols, mask_buf.data());
            if (block_mask.all_masked()) continue;  // P = 0 there: no gradient flows
            const acc_t* k = tile(k_nh + j0 * p.k_stride[2], p.k_stride[2], cols, E, k_buf.data(), &ldk);
            const acc_t* v = tile(v_nh + j0 * p.v_stride[2], p.v_stride[2], cols, Ev, v_buf.data(), &ldv);
            // P = exp(scale q k^T + mask - lse): the forward's probabilities, recomputed.
            gemm<acc_t>(false, true, rows, cols, E, scale, q, ldq, k, ldk, acc_t(0), probs.data(), bk);
            for (int64_t r = 0; r < rows; ++r) {
              acc_t* s = probs.data() + r * bk;
              const float row_lse = lse[r];
              if (row_lse == neg_inf<float>()) {  // fully masked row: no gradient anywhere
                std::fill(s, s + cols, acc_t(0));
                continue;
              }
              block_mask.apply(i0 + r, s);
              exp_shift_sum(s, cols, static_cast<acc_t>(row_lse));
            }
            // dV += P_drop^T dO, with P_drop the probabilities the forward multiplied V by.
            const acc_t* p_used = probs.data();
            if (dropout) {
              for (int64_t r = 0; r < rows; ++r) {
                const uint64_t idx0 = static_cast<uint64_t>(((n * H + h) * L + i0 + r) * S + j0);
                acc_t* f = factors.data() + r * bk;
                dropout_factors(p.rng, threshold, keep_scale, idx0, cols, f);
                at::vec::map2([](auto x, auto y) { return x * y; }, dprobs.data() + r * bk,
                              probs.data() + r * bk, f, cols);
              }
              p_used = dprobs.data();
            }
            gemm<acc_t>(true, false, cols, Ev, rows, acc_t(1), p_used, bk, dout, ldo, acc_t(1),
                        dv_acc.data() + j0 * Ev, Ev);
            // dP = dO V^T (through the dropout), then dS = P * (dP - delta).
            gemm<acc_t>(false, true, rows, cols, Ev, acc_t(1), dout, ldo, v, ldv, acc_t(0),
                        dprobs.data(), bk);
            for (int64_t r = 0; r < rows; ++r) {
              acc_t* dp = dprobs.data() + r * bk;
              const acc_t* pr = probs.data() + r * bk;
              const acc_t d = delta[r];
              if (dropout) {
                const acc_t* f = factors.data() + r * bk;
                for (int64_t c = 0; c < cols; ++c) dp[c] = pr[c] * (dp[c] * f[c] - d);
              } else {
                at::vec::map2([d](auto x, auto y) { return y * (x - decltype(x)(d)); }, dp, dp, pr, cols);
              }
              if (p.dmask != nullptr) {
                float* dm = p.dmask + ((n * H + h) * L + i0 + r) * S + j0;
                for (int64_t c = 0; c < cols; ++c) dm[c] = static_cast<float>(dp[c]);
              }
            }
            gemm<acc_t>(false, false, rows, E, cols, scale, dprobs.data(), bk, k, ldk, acc_t(1),
                        dq_acc.data(), E);
            gemm<acc_t>(true, false, cols, E, rows, scale, dprobs.data(), bk, q, ldq, acc_t(1),
                        dk_acc.data() + j0 * E, E);
          }
          scalar_t* dq = dq_all + n * p.dq_stride[0] + h * p.dq_stride[1] + q_row * p.dq_stride[2];
          for (int64_t r = 0; r < rows; ++r) {
            store_row(dq_acc.data() + r * E, dq + r * p.dq_stride[2], E, acc_t(1));
          }
        }
      }
      scalar_t* dk = dk_all + n * p.dk_stride[0] + hk * p.dk_stride[1] + seq.kv_row0 * p.dk_stride[2];
      scalar_t* dv = dv_all + n * p.dv_stride[0] + hk * p.dv_stride[1] + seq.kv_row0 * p.dv_stride[2];
      for (int64_t j = 0; j < seq.kv_len; ++j) {
        store_row(dk_acc.data() + j * E, dk + j * p.dk_stride[2], E, acc_t(1));
        store_row(dv_acc.data() + j * Ev, dv + j * p.dv_stride[2], Ev, acc_t(1));
      }
    }
  });
}

}  // namespace

void attention_fwd(const AttentionParams& params) {
  dispatch_floating(params.dtype, "attention",
                    [&](auto tag) { attention_fwd_impl<decltype(tag)>(params); });
}

void attention_bwd(const AttentionBwdParams& params) {
  dispatch_floating(params.dtype, "attention backward",
                    [&](auto tag) { attention_bwd_impl<decltype(tag)>(params); });
}

}  // namespace tx_kernels::cpu
