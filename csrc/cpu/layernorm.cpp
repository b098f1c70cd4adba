// layernorm.cpp: CPU residual-add + LayerNorm, forward and backward (semantics in params.h).
//
// Forward: one pass over memory per row. The row s = input + residual (rounded to the data type,
// as x + r would be: the statistics then describe the residual_out the backward reads back) is read
// once, widened to the accumulator type into a cache-aligned thread-local row buffer (a few KB, so
// it stays in L1/L2); residual_out is written during that read, which also sums (s - k) and
// (s - k)^2 with k = s[0] (shifted sums: the cancellation of E[x^2] - E[x]^2 is bounded by how far k
// is from the mean, and rows where it is far take a second pass of squared deviations over the hot
// buffer); out is written once. Rows are independent and split across threads.
//
// Backward: per row, grad_input = rstd * (a - mean(a) - xhat * mean(a * xhat)) with a = g * w and
// xhat recomputed from input, mean and rstd. grad_weight / grad_bias are column sums reduced
// deterministically (see RowBlocks in vec_io.h).
#include <cmath>
#include <limits>
#include <vector>

#include "dispatch.h"
#include "isa.h"
#include "kernels.h"
#include "vec_io.h"

namespace tx_kernels::cpu::TXK_CPU_ISA {
namespace {

using detail::Block;
using detail::hsum;

// Rows per parallel task: at least ~16K elements so a task is worth waking a thread for.
int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, cols)); }

template <typename T>
void layer_norm_fwd_impl(const LayerNormParams& p) {
  using B = Block<T>;
  using Acc = typename B::Acc;
  using AVec = typename B::AVec;
  constexpr int64_t L = B::kLanes, K = B::kSize;
  const int64_t rows = p.rows, cols = p.cols;
  if (rows <= 0 || cols <= 0) return;
  const int64_t padded = detail::round_up(cols, K);
  const auto weight = detail::column_param<Acc>(p.weight, cols, padded, Acc(1));
  const auto bias = detail::column_param<Acc>(p.bias, cols, padded, Acc(0));
  const Acc* w = weight.data();
  const Acc* bb = bias.data();
  const int64_t full = cols - cols % K;
  const int64_t tail = cols - full;
  const Acc inv_n = Acc(1) / static_cast<Acc>(cols);
  const Acc eps = static_cast<Acc>(p.eps);

  const T* input = static_cast<const T*>(p.input);
  const T* residual = static_cast<const T*>(p.residual);
  T* residual_out = residual ? static_cast<T*>(p.residual_out) : nullptr;
  T* out = static_cast<T*>(p.out);

  const bool stream =
      detail::use_streaming_stores(rows * cols * int64_t(sizeof(T)) * (residual_out ? 2 : 1));

  // One row; kResidual (a std::bool_constant) compiles the residual add in or out of the loops.
  auto do_row = [&](auto kResidual, int64_t r, bool prefetch, Acc* buf) {
    constexpr bool has_res = decltype(kResidual)::value;
    const T* x = input + r * p.input_row_stride;
    const T* res = has_res ? residual + r * p.residual_row_stride : nullptr;
    T* ro = has_res && residual_out ? residual_out + r * cols : nullptr;
    T* y = out + r * cols;
    const bool nt_ro = stream && ro && detail::stream_aligned(ro), nt_y = stream && detail::stream_aligned(y);
    // The input two rows ahead is prefetched, a block at a time, while this row's output is
    // computed from the L1-resident buffer: otherwise memory reads sit idle during the two
    // in-cache passes (measured: a few percent, within noise of prefetching one row ahead).
    const T* ahead_x = x + 2 * p.input_row_stride;
    const T* ahead_res = has_res ? res + 2 * p.residual_row_stride : nullptr;

    // Pass over memory: s = x (+ residual), written to residual_out; s - k, with k = s[0], to the
    // row buffer and to the sum. k is s[0] rounded to T as s is: a row that is constant after
    // rounding then has s - k = 0 exactly and normalizes to exactly the bias, as in torch.
    Acc k = static_cast<Acc>(x[0]);
    if constexpr (has_res) k = static_cast<Acc>(static_cast<T>(k + static_cast<Acc>(res[0])));
    const AVec kv(k);
    AVec s0(0), s1(0), q0(0), q1(0), a, b;
    auto load_sum = [&](int64_t c, int64_t n) {  // n == K: a full block
      if (n == K) {
        B::load(x + c, a, b);
      } else {
        B::load(x + c, n, a, b);
      }
      if constexpr (has_res) {
        AVec ra, rb;
        if (n == K) {
          B::load(res + c, ra, rb);
        } else {
          B::load(res + c, n, ra, rb);
        }
        a = a + ra;
        b = b + rb;
        B::round_to_storage(a, b);
        if (ro) B::store_block(ro + c, n, a, b, nt_ro);
      }
    };
    auto accumulate = [&](int64_t c) {
      a.store(buf + c);
      b.store(buf + c + L);
      s0 = s0 + a;
      s1 = s1 + b;
      q0 = at::vec::fmadd(a, a, q0);
      q1 = at::vec::fmadd(b, b, q1);
    };
    int64_t c = 0;
    for (; c < full; c += K) {
      load_sum(c, K);
      a = a - kv;
      b = b - kv;
      accumulate(c);
    }
    if (tail) {
      load_sum(c, tail);
      a = a - kv;
      b = b - kv;
      B::keep_first(tail, a, b);
      accumulate(c);
    }
    // The buffer holds s - k; deviations from the mean are taken as (s - k) - (mean - k), so
    // the fp32 rounding of a large mean never enters them.
    const Acc shifted_mean = hsum(s0 + s1) * inv_n;
    const Acc mean = k + shifted_mean;
    const AVec m(shifted_mean);

    // Variance from the same pass: E[(s-k)^2] - E[s-k]^2. Its relative error is about
    // eps * (1 + (mean-k)^2 / var), small while the shift k = s[0] is a typical sample of the
    // row; when it is not ((mean-k)^2 > 4 var: about 5% of Gaussian rows), fall back to squared
    // deviations of the hot buffer.
    // Saving that pass matters: at hidden sizes like 768 the per-row arithmetic is a large part
    // of the time the row's memory traffic takes, and it does not overlap with it.
    Acc var = hsum(q0 + q1) * inv_n - shifted_mean * shifted_mean;
    if (!(shifted_mean * shifted_mean <= Acc(4) * var)) {
      q0 = AVec(0);
      q1 = AVec(0);
      for (c = 0; c < full; c += K) {
        const AVec d0 = AVec::loadu(buf + c) - m, d1 = AVec::loadu(buf + c + L) - m;
        q0 = at::vec::fmadd(d0, d0, q0);
        q1 = at::vec::fmadd(d1, d1, q1);
      }
      if (tail) {
        AVec d0 = AVec::loadu(buf + c) - m, d1 = AVec::loadu(buf + c + L) - m;
        B::keep_first(tail, d0, d1);  // the padding lanes hold 0, not the mean
        q0 = at::vec::fmadd(d0, d0, q0);
        q1 = at::vec::fmadd(d1, d1, q1);
      }
      var = hsum(q0 + q1) * inv_n;
    }
    Acc rstd;
    if (std::isinf(var)) {
      // The sum of squares overflowed. If the variance itself fits the type (fp32 values near
      // 1e18), recompute it in fp64 from the hot buffer; if it does not, rstd = 1/sqrt(inf) = 0
      // would turn the row into a finite 0: NaN instead (torch gives NaN, not a number).
      double q = 0.0;
      for (int64_t j = 0; j < cols; ++j) {
        const double d = static_cast<double>(buf[j]) - static_cast<double>(shifted_mean);
        q += d * d;
      }
      const double var64 = q / static_cast<double>(cols);
      rstd = var64 <= static_cast<double>(std::numeric_limits<Acc>::max())
                 ? static_cast<Acc>(1.0 / std::sqrt(var64 + static_cast<double>(eps)))
                 : std::numeric_limits<Acc>::quiet_NaN();
    } else {
      rstd = Acc(1) / std::sqrt(var + eps);
    }

    // out = (s - mean) * rstd * w + b = ((s - k) * rstd - shifted_mean * rstd) * w + b: two FMAs.
    const AVec rs(rstd), nmrs(-shifted_mean * rstd);
    auto normalized = [&](int64_t c) {
      a = at::vec::fmadd(at::vec::fmadd(AVec::loadu(buf + c), rs, nmrs), AVec::loadu(w + c),
                         AVec::loadu(bb + c));
      b = at::vec::fmadd(at::vec::fmadd(AVec::loadu(buf + c + L), rs, nmrs), AVec::loadu(w + c + L),
                         AVec::loadu(bb + c + L));
    };
    for (c = 0; c < full; c += K) {
      if (prefetch) {  // a block is at most one cache line (64 bytes) for every T
        detail::prefetch(ahead_x + c);
        if constexpr (has_res) detail::prefetch(ahead_res + c);
      }
      normalized(c);
      if (nt_y) {
        B::store_stream(y + c, a, b);
      } else {
        B::store(y + c, a, b);
      }
    }
    if (tail) {
      normalized(c);
      B::store(y + c, tail, a, b);
    }
    static_cast<Acc*>(p.mean)[r] = mean;
    static_cast<Acc*>(p.rstd)[r] = rstd;
  };

  at::parallel_for(0, rows, row_grain(cols), [&](int64_t r0, int64_t r1) {
    detail::CacheAligned<Acc> row_buf(padded);
    for (int64_t r = r0; r < r1; ++r) {
      if (residual) {
        do_row(std::true_type{}, r, r + 2 < r1, row_buf.data());
      } else {
        do_row(std::false_type{}, r, r + 2 < r1, row_buf.data());
      }
    }
    if (stream) detail::streaming_fence();
  });
}

template <typename T>
void layer_norm_bwd_impl(const LayerNormBwdParams& p) {
  using B = Block<T>;
  using Acc = typename B::Acc;
  using AVec = typename B::AVec;
  constexpr int64_t L = B::kLanes, K = B::kSize;
  const int64_t rows = p.rows, cols = p.cols;
  if (rows <= 0 || cols <= 0) return;
  const int64_t padded = detail::round_up(cols, K);
  const auto weight = detail::column_param<Acc>(p.weight, cols, padded, Acc(1));
  const Acc* w = weight.data();
  const int64_t full = cols - cols % K;
  const int64_t tail = cols - full;
  const Acc inv_n = Acc(1) / static_cast<Acc>(cols);

  const T* grad_out = static_cast<const T*>(p.grad_out);
  const T* grad_res = static_cast<const T*>(p.grad_residual_out);
  const T* input = static_cast<const T*>(p.input);
  const T* residual = static_cast<const T*>(p.residual);
  T* grad_input = static_cast<T*>(p.grad_input);
  const bool want_gw = p.grad_weight != nullptr, want_gb = p.grad_bias != nullptr;
  const bool stream = detail::use_streaming_stores(rows * cols * int64_t(sizeof(T)));

  // Rows r0..r1; when pw / pb are given, adds g * xhat and g to them (padded-length partial rows).
  // xbuf and abuf are per-thread row buffers for xhat and a = g * w.
  auto do_rows = [&](int64_t r0, int64_t r1, Acc* pw, Acc* pb, Acc* xbuf, Acc* abuf) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* g = grad_out + r * cols;
      const T* x = input + r * cols;
      const T* xr = residual ? residual + r * cols : nullptr;
      T* dx = grad_input + r * cols;
      const bool nt = stream && detail::stream_aligned(dx);
      const AVec m(static_cast<const Acc*>(p.mean)[r]), rs(static_cast<const Acc*>(p.rstd)[r]);
      AVec sa0(0), sa1(0), sx0(0), sx1(0), g0, g1, x0, x1;
      for (int64_t c = 0; c < padded; c += K) {
        if (c < full) {
          B::load(g + c, g0, g1);
          B::load(x + c, x0, x1);
          if (xr) {
            AVec r0, r1;
            B::load(xr + c, r0, r1);
            x0 = x0 + r0;
            x1 = x1 + r1;
            B::round_to_storage(x0, x1);  // as the forward normalized it
          }
        } else {
          B::load(g + c, tail, g0, g1);  // g = 0 beyond the row: a = 0 and no contribution
          B::load(x + c, tail, x0, x1);
          if (xr) {
            AVec r0, r1;
            B::load(xr + c, tail, r0, r1);
            x0 = x0 + r0;
            x1 = x1 + r1;
            B::round_to_storage(x0, x1);  // as the forward normalized it
          }
        }
        const AVec xh0 = (x0 - m) * rs, xh1 = (x1 - m) * rs;
        const AVec a0 = g0 * AVec::loadu(w + c), a1 = g1 * AVec::loadu(w + c + L);
        sa0 = sa0 + a0;
        sa1 = sa1 + a1;
        sx0 = at::vec::fmadd(a0, xh0, sx0);
        sx1 = at::vec::fmadd(a1, xh1, sx1);
        xh0.store(xbuf + c);
        xh1.store(xbuf + c + L);
        a0.store(abuf + c);
        a1.store(abuf + c + L);
        if (pw) {
          at::vec::fmadd(g0, xh0, AVec::loadu(pw + c)).store(pw + c);
          at::vec::fmadd(g1, xh1, AVec::loadu(pw + c + L)).store(pw + c + L);
        }
        if (pb) {
          (AVec::loadu(pb + c) + g0).store(pb + c);
          (AVec::loadu(pb + c + L) + g1).store(pb + c + L);
        }
      }
      const AVec mean_a(hsum(sa0 + sa1) * inv_n), mean_ax(hsum(sx0 + sx1) * inv_n);
      for (int64_t c = 0; c < padded; c += K) {
        // rstd * (a - mean(a) - xhat * mean(a * xhat))
        AVec d0 = rs * (AVec::loadu(abuf + c) - mean_a - AVec::loadu(xbuf + c) * mean_ax);
        AVec d1 = rs * (AVec::loadu(abuf + c + L) - mean_a - AVec::loadu(xbuf + c + L) * mean_ax);
        const int64_t n = std::min(K, cols - c);
        if (grad_res) {
          AVec r0v, r1v;
          if (n == K) {
            B::load(grad_res + r * cols + c, r0v, r1v);
          } else {
            B::load(grad_res + r * cols + c, n, r0v, r1v);
          }
          d0 = d0 + r0v;
          d1 = d1 + r1v;
        }
        B::store_block(dx + c, n, d0, d1, nt);
      }
    }
    if (stream) detail::streaming_fence();
  };

  if (!want_gw && !want_gb) {
    at::parallel_for(0, rows, row_grain(cols), [&](int64_t r0, int64_t r1) {
      detail::CacheAligned<Acc> bufs(2 * padded);
      do_rows(r0, r1, nullptr, nullptr, bufs.data(), bufs.data() + padded);
    });
    return;
  }

  // Partial rows per row block: [grad_weight partial | grad_bias partial], each `padded` long.
  const auto rb = detail::RowBlocks::make(rows, 2 * padded);
  const int64_t stride = 2 * padded;
  std::vector<Acc> partial(static_cast<size_t>(rb.count * stride));
  at::parallel_for(0, rb.count, 1, [&](int64_t b0, int64_t b1) {
    detail::CacheAligned<Acc> bufs(2 * padded);
    for (int64_t blk = b0; blk < b1; ++blk) {
      Acc* pw = partial.data() + blk * stride;
      Acc* pb = pw + padded;
      std::fill(pw, pw + stride, Acc(0));
      const int64_t r0 = blk * rb.rows_per_block, r1 = std::min(rows, r0 + rb.rows_per_block);
      do_rows(r0, r1, want_gw ? pw : nullptr, want_gb ? pb : nullptr, bufs.data(), bufs.data() + padded);
    }
  });
  detail::combine_partials(partial.data(), rb.count, stride, cols, p.grad_weight);
  detail::combine_partials(partial.data() + padded, rb.count, stride, cols, p.grad_bias);
}

}  // namespace

void layer_norm_fwd(const LayerNormParams& params) {
  dispatch_floating(params.dtype, "layer_norm",
                    [&](auto tag) { layer_norm_fwd_impl<decltype(tag)>(params); });
}

void layer_norm_bwd(const LayerNormBwdParams& params) {
  dispatch_floating(params.dtype, "layer_norm backward",
                    [&](auto tag) { layer_norm_bwd_impl<decltype(tag)>(params); });
}

}  // namespace tx_kernels::cpu::TXK_CPU_ISA
