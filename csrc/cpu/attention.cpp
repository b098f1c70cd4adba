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
#include "isa.h"
#include "gemm.h"
#include "kernels.h"

namespace tx_kernels::cpu::TXK_CPU_ISA {
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
  // -inf masks its key as False does: the score is replaced, so a NaN or +inf score there does
  // not poison the row (adding would give NaN).
  auto add = [&](auto* m) {
    auto masked_add = [](acc_t s, acc_t b) { return b == neg_inf<acc_t>() ? b : s + b; };
    if constexpr (std::is_same_v<std::remove_cv_t<std::remove_pointer_t<decltype(m)>>, acc_t>) {
      if (st == 1) {  // the common case: a mask of the accumulation type, contiguous keys
        using V = at::vec::Vectorized<acc_t>;
        const V ninf(neg_inf<acc_t>());
        int64_t c = 0;
        for (; c + V::size() <= cols; c += V::size()) {
          const V b = V::loadu(m + c);
          V::blendv(V::loadu(scores + c) + b, b, b == ninf).store(scores + c);
        }
        for (; c < cols; ++c) scores[c] = masked_add(scores[c], m[c]);
        return;
      }
    }
    if (st == 1) {
      for (int64_t c = 0; c < cols; ++c) scores[c] = masked_add(scores[c], static_cast<acc_t>(m[c]));
    } else {
      for (int64_t c = 0; c < cols; ++c) scores[c] = masked_add(scores[c], static_cast<acc_t>(m[c * st]));
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
      : p_(p), n_(n), h_(h), j0_(j0), cols_(cols),
        per_row_(p.mask_kind != MaskKind::kNone && p.mask_stride[2] != 0) {
    if (p.mask_kind != MaskKind::kNone && p.mask_stride[2] == 0) {
      std::fill(buffer, buffer + cols, acc_t(0));
      apply_mask_row(p, n, h, 0, j0, cols, buffer);
      all_masked_ = std::all_of(buffer, buffer + cols, [](acc_t x) { return x == neg_inf<acc_t>(); });
      // A row of zeros (no key of the block masked, e.g. a batch without padding) changes no
      // score: adding it is skipped. -0 counts as 0, as s + (-0) is s.
      if (!std::all_of(buffer, buffer + cols, [](acc_t x) { return x == acc_t(0); })) shared_ = buffer;
    }
  }

  // Every score of the block is masked for every query (padding past a sequence's end): the block
  // contributes nothing and is skipped, GEMMs included.
  bool all_masked() const { return all_masked_; }

  // Scores of query row i: mask, then causal (key j > i is disallowed).
  void apply(int64_t i, acc_t* scores) const {
    if (shared_ != nullptr) {  // -inf replaces the score, as in apply_mask_row
      at::vec::map2([](auto a, auto b) {
        using V = decltype(a);
        return V::blendv(a + b, b, b == V(neg_inf<acc_t>()));
      }, scores, scores, shared_, cols_);
    } else if (per_row_) {
      apply_mask_row(p_, n_, h_, i, j0_, cols_, scores);
    }
    if (p_.is_causal) {
      for (int64_t c = std::max<int64_t>(i + 1 - j0_, 0); c < cols_; ++c) scores[c] = neg_inf<acc_t>();
    }
  }

 private:
  const AttentionParams& p_;
  int64_t n_, h_, j0_, cols_;
  bool per_row_;                  // the mask differs between queries: read row by row
  const acc_t* shared_ = nullptr;  // else the additive row every query shares, unless all zero
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
// torch's own CPU flash attention uses; fp64 uses the full-precision one. exp_u20 clamps its
// argument with a min that turns NaN into the largest finite exponent (a NaN score, or inf - inf,
// would become a finite weight of 3e38), so NaN lanes are put back.
template <typename acc_t>
acc_t exp_shift_sum(acc_t* x, int64_t cols, acc_t shift) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec vshift(shift);
  Vec vsum(acc_t(0));
  int64_t c = 0;
  for (; c + Vec::size() <= cols; c += Vec::size()) {
    Vec v = Vec::loadu(x + c) - vshift;
    if constexpr (std::is_same_v<acc_t, float>) {
      v = Vec::blendv(v.exp_u20(), v, v != v);
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

// max that propagates NaN (std::max(a, NaN) is a): a NaN score must poison its row, not be
// dropped, as at::vec::maximum does for the vector lanes.
template <typename acc_t>
acc_t nan_max(acc_t a, acc_t b) {
  return (a > b || a != a) ? a : b;
}

template <typename acc_t>
acc_t row_max(const acc_t* x, int64_t cols) {
  using Vec = at::vec::Vectorized<acc_t>;
  Vec vmax(neg_inf<acc_t>());
  int64_t c = 0;
  for (; c + Vec::size() <= cols; c += Vec::size()) vmax = at::vec::maximum(vmax, Vec::loadu(x + c));
  acc_t out = at::vec::vec_reduce_all<acc_t>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, vmax);
  for (; c < cols; ++c) out = nan_max(out, x[c]);
  return out;
}

// Whether query row i of (n, h) may attend to any key, by the mask and causality alone. Fully
// masked rows (output 0) are told apart from rows whose scores are NaN or all -inf (output NaN,
// as torch) by this, never by the softmax sum. Only called for rows whose sum is not positive.
bool row_has_key(const AttentionParams& p, int64_t kv_len, int64_t n, int64_t h, int64_t i) {
  const int64_t end = p.is_causal ? std::min(kv_len, i + 1) : kv_len;
  if (p.mask_kind == MaskKind::kNone || end <= 0) return end > 0;
  const int64_t off = n * p.mask_stride[0] + h * p.mask_stride[1] + i * p.mask_stride[2];
  const int64_t st = p.mask_stride[3];
  auto any_finite = [&](auto* m) {  // an additive -inf masks its key; anything else (NaN too) does not
    for (int64_t c = 0; c < end; ++c) {
      if (!(static_cast<double>(m[c * st]) == -std::numeric_limits<double>::infinity())) return true;
    }
    return false;
  };
  switch (p.mask_dtype) {
    case DType::kBool: {
      const uint8_t* m = static_cast<const uint8_t*>(p.mask) + off;
      for (int64_t c = 0; c < end; ++c) {
        if (m[c * st]) return true;
      }
      return false;
    }
    case DType::kFloat32: return any_finite(static_cast<const float*>(p.mask) + off);
    case DType::kFloat64: return any_finite(static_cast<const double*>(p.mask) + off);
    case DType::kBFloat16: return any_finite(static_cast<const c10::BFloat16*>(p.mask) + off);
    case DType::kFloat16: return any_finite(static_cast<const c10::Half*>(p.mask) + off);
  }
  return true;
}

template <typename acc_t>
void scale_row(acc_t* x, int64_t cols, acc_t factor) {
  at::vec::map([factor](auto v) { return v * decltype(v)(factor); }, x, x, cols);
}

template <typename scalar_t, typename acc_t>
void store_row(const acc_t* src, scalar_t* dst, int64_t cols, acc_t factor) {
  for (int64_t c = 0; c < cols; ++c) dst[c] = static_cast<scalar_t>(src[c] * factor);
}

// scale q k^T for a (rows x cols) tile of leading dimension ld. The BLAS may not propagate a NaN
// or Inf alpha (one tested did not), so a non-finite scale multiplies the scores afterwards,
// giving what torch's composite gives.
template <typename acc_t>
void scaled_scores(int64_t rows, int64_t cols, int64_t E, acc_t scale, const acc_t* q, int64_t ldq,
                   const acc_t* k, int64_t ldk, acc_t* scores, int64_t ld) {
  const bool finite = std::isfinite(scale);
  gemm<acc_t>(false, true, rows, cols, E, finite ? scale : acc_t(1), q, ldq, k, ldk, acc_t(0),
              scores, ld);
  if (!finite) {
    for (int64_t r = 0; r < rows; ++r) scale_row(scores + r * ld, cols, scale);
  }
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

// lse of row 0 of (n, h): (N, H, L) padded, (H, total_q) packed; in the accumulation type.
template <typename acc_t>
acc_t* lse_rows(const AttentionParams& p, const Sequence& seq, int64_t n, int64_t h) {
  acc_t* lse = static_cast<acc_t*>(p.lse);
  if (p.cu_seqlens_q == nullptr) return lse + (n * p.heads + h) * p.q_len;
  return lse + h * static_cast<int64_t>(p.cu_seqlens_q[p.batch]) + seq.q_row0;
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
        scaled_scores(rows, cols, E, static_cast<acc_t>(p.scale), q, ldq, k, ldk, scores.data(), bk);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = i0 + r;
          acc_t* s = scores.data() + r * bk;
          block_mask.apply(i, s);
          const acc_t new_max = nan_max(m[r], row_max(s, cols));
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
      acc_t* lse = lse_rows<acc_t>(p, seq, n, h) + i0;
      for (int64_t r = 0; r < rows; ++r) {
        // A sum that is not positive is 0 (no allowed key, or all allowed scores -inf) or NaN.
        const bool live = l[r] > acc_t(0);
        const bool empty = !live && !row_has_key(p, seq.kv_len, n, h, i0 + r);
        // A live row with sum 0 or NaN gets 0 / 0 or NaN, and lse = NaN so its gradients are NaN.
        // An empty row is written as zeros: its accumulator may hold NaN (a NaN score plus an
        // additive -inf mask is NaN).
        scalar_t* orow = o + r * p.out_stride[2];
        if (empty) {
          std::fill(orow, orow + Ev, scalar_t(0));
        } else {
          store_row(acc.data() + r * Ev, orow, Ev, acc_t(1) / l[r]);
        }
        lse[r] = empty ? neg_inf<acc_t>()
                       : live ? m[r] + std::log(l[r]) : std::numeric_limits<acc_t>::quiet_NaN();
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
  // bf16/fp16 at tiny value head dims: delta from an extra pass over the key blocks (see below).
  // It costs the QK^T and dO V^T products once more, cheap only where the head dims are small.
  constexpr int64_t kExactDeltaMaxEv = 16;
  const bool exact_delta = !std::is_same_v<scalar_t, acc_t> && Ev <= kExactDeltaMaxEv;
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
    std::vector<acc_t> probs(bq * bk), dprobs(bq * bk), factors(dropout ? bq * bk : 0), mask_buf(bk), nan_row(bk);
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
          const acc_t* lse = lse_rows<acc_t>(p, seq, n, h) + i0;
          // delta = rowsum(dO * O): the softmax backward's correction term.
          if (exact_delta) {
            // As rowsum(P_drop * dP) over the very dP tiles the main pass recomputes, not from the
            // output rounded to bf16/fp16: dS = P * (dP - delta) cancels, and at tiny head dims
            // the rounding of O (and a different summation order) dominated dq/dk, up to 80x the
            // error of torch's math backend, which computes delta this way in fp32.
            std::fill(delta.begin(), delta.end(), acc_t(0));
            const int64_t kv_stop = kv_limit(p, seq, i0, rows);
            for (int64_t j0 = 0; j0 < kv_stop; j0 += bk) {
              const int64_t cols = std::min(bk, kv_stop - j0);
              const BlockMask<acc_t> block_mask(p, n, h, j0, cols, mask_buf.data());
              if (block_mask.all_masked()) continue;
              int64_t ldk2, ldv2;
              const acc_t* k = tile(k_nh + j0 * p.k_stride[2], p.k_stride[2], cols, E, k_buf.data(), &ldk2);
              const acc_t* v = tile(v_nh + j0 * p.v_stride[2], p.v_stride[2], cols, Ev, v_buf.data(), &ldv2);
              scaled_scores(rows, cols, E, scale, q, ldq, k, ldk2, probs.data(), bk);
              for (int64_t r = 0; r < rows; ++r) {
                acc_t* s = probs.data() + r * bk;
                if (!(lse[r] > neg_inf<acc_t>())) {  // fully masked (0) or NaN row (NaN)
                  std::fill(s, s + cols, lse[r] == neg_inf<acc_t>() ? acc_t(0) : lse[r]);
                  continue;
                }
                block_mask.apply(i0 + r, s);
                exp_shift_sum(s, cols, lse[r]);
                if (dropout) {
                  const uint64_t idx0 = static_cast<uint64_t>(((n * H + h) * L + i0 + r) * S + j0);
                  acc_t* f = factors.data() + r * bk;
                  dropout_factors(p.rng, threshold, keep_scale, idx0, cols, f);
                  at::vec::map2([](auto x, auto y) { return x * y; }, s, s, f, cols);
                }
              }
              gemm<acc_t>(false, true, rows, cols, Ev, acc_t(1), dout, ldo, v, ldv2, acc_t(0),
                          dprobs.data(), bk);
              for (int64_t r = 0; r < rows; ++r) {
                delta[r] += detail::dot(probs.data() + r * bk, dprobs.data() + r * bk, cols);
              }
            }
          }
          const scalar_t* o_blk = o_all + n * p.out_stride[0] + h * p.out_stride[1] + q_row * p.out_stride[2];
          for (int64_t r = 0; r < rows && !exact_delta; ++r) {
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
            scaled_scores(rows, cols, E, scale, q, ldq, k, ldk, probs.data(), bk);
            for (int64_t r = 0; r < rows; ++r) {
              acc_t* s = probs.data() + r * bk;
              const acc_t row_lse = lse[r];
              // -inf only for rows the mask leaves no key (the forward's rule): no gradient.
              if (row_lse == neg_inf<acc_t>()) {
                std::fill(s, s + cols, acc_t(0));
                continue;
              }
              if (row_lse != row_lse) {
                // A NaN row (NaN or Inf in its scores): P is NaN, except that keys the mask
                // disallows keep P = 0 and get no gradient (exp(-inf - NaN) would be NaN). The
                // mask alone decides which: applied to zeros, it gives -inf exactly there.
                std::fill(nan_row.begin(), nan_row.begin() + cols, acc_t(0));
                block_mask.apply(i0 + r, nan_row.data());
                for (int64_t c = 0; c < cols; ++c) s[c] = nan_row[c] == neg_inf<acc_t>() ? acc_t(0) : row_lse;
                continue;
              }
              block_mask.apply(i0 + r, s);
              exp_shift_sum(s, cols, row_lse);
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
              // A masked key (P = 0) gets no gradient, even when dP - delta is NaN (a NaN elsewhere
              // in the row): 0 * NaN would spread the NaN to every key's gradient.
              if (dropout) {
                const acc_t* f = factors.data() + r * bk;
                for (int64_t c = 0; c < cols; ++c) dp[c] = pr[c] == acc_t(0) ? acc_t(0) : pr[c] * (dp[c] * f[c] - d);
              } else {
                at::vec::map2([d](auto x, auto y) {
                  using V = decltype(x);
                  return V::blendv(y * (x - V(d)), V(0), y == V(0));
                }, dp, dp, pr, cols);
              }
              if (p.dmask != nullptr) {
                acc_t* dm = static_cast<acc_t*>(p.dmask) + ((n * H + h) * L + i0 + r) * S + j0;
                std::copy(dp, dp + cols, dm);
              }
            }
            gemm<acc_t>(false, false, rows, E, cols, scale, dprobs.data(), bk, k, ldk, acc_t(1),
                        dq_acc.data(), E);
            gemm<acc_t>(true, false, cols, E, rows, scale, dprobs.data(), bk, q, ldq, acc_t(1),
                        dk_acc.data() + j0 * E, E);
          }
          scalar_t* dq = dq_all + n * p.dq_stride[0] + h * p.dq_stride[1] + q_row * p.dq_stride[2];
          for (int64_t r = 0; r < rows; ++r) {
            // A fully masked row's dS is 0, but 0 times a NaN or Inf key is NaN in the GEMM: its
            // gradient is 0 by definition, so it is written as such.
            scalar_t* dqrow = dq + r * p.dq_stride[2];
            if (lse[r] == neg_inf<acc_t>()) {
              std::fill(dqrow, dqrow + E, scalar_t(0));
            } else {
              store_row(dq_acc.data() + r * E, dqrow, E, acc_t(1));
            }
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

}  // namespace tx_kernels::cpu::TXK_CPU_ISA
