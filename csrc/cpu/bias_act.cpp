// bias_act.cpp: CPU bias + activation (+ dropout), forward and backward (semantics in params.h).
//
// out = dropout(act(input + bias)) in one pass over memory: each element is read once, widened to
// fp32 (fp64 for double), and written once. The work is split into tiles of up to kTile columns of
// one row, so a few long rows still spread over all threads.
//
// Activations (v = input + bias):
//   relu       max(v, 0)                               relu'  = [not v <= 0]
//   gelu       v * Phi(v), Phi(v) = (1 + erf(v/sqrt2))/2  gelu'  = Phi(v) + v * phi(v)
//   gelu_tanh  0.5 v (1 + tanh(u)), u = sqrt(2/pi) (v + 0.044715 v^3)
//              computed as v * sigmoid(2u) = v / (1 + exp(-2u)), the same function without the
//              cancellation of 1 + tanh(u) for negative v; its derivative is
//              s + 2 v s (1 - s) u', s = sigmoid(2u), u' = sqrt(2/pi) (1 + 3 * 0.044715 v^2).
//
// Dropout: element (row, col) has index row * cols + col; it is kept iff its Philox word
// (tx_kernels::DropoutRng, csrc/kernels/philox.h) is >= dropout_threshold(p), and kept values are
// scaled by dropout_scale(p), so the CUDA kernels draw the same mask and the backward regenerates it.
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "dispatch.h"
#include "isa.h"
#include "kernels.h"
#include "vec_io.h"

namespace tx_kernels::cpu::TXK_CPU_ISA {
namespace {

using detail::Block;

constexpr int64_t kTile = 2048;  // columns per task; a multiple of every block size and of 4

// ---------------------------------------------------------------------------------------------
// Dropout multipliers: out[j] = keep(first + j) ? scale : 0 for j < n, with the words of
// DropoutRng (philox.h). With AVX2, Philox runs on 8 counters at once (32 elements); tests check
// the mask bit for bit against an independent Python implementation of philox.h.
// ---------------------------------------------------------------------------------------------
#if defined(TXK_HAVE_AVX2)
// (hi, lo) 32-bit halves of the lane-wise 32x32->64-bit products a * m.
inline void mulhilo8(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);                         // lanes 0, 2, 4, 6
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);  // lanes 1, 3, 5, 7
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// Philox state of 8 counters (one per 32-bit lane).
struct Philox8 {
  __m256i x, y, z, w;
};

// Counters g .. g + 7: (lo(g + l), hi(g + l), offset lo, offset hi), built in registers (a scalar
// fill of a stack array would stall on store forwarding).
inline Philox8 philox8_counters(const DropoutRng& rng, uint64_t g) {
  const __m256i base = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(g)));
  const __m256i lo = _mm256_add_epi32(base, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256i no_wrap = _mm256_cmpeq_epi32(_mm256_max_epu32(lo, base), lo);  // lo >= base
  const __m256i hi = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(g >> 32))),
                                      _mm256_andnot_si256(no_wrap, _mm256_set1_epi32(-1)));
  return Philox8{lo, hi, _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(rng.offset))),
                 _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(rng.offset >> 32)))};
}

inline void philox8_round(Philox8& s, __m256i k0, __m256i k1) {
  __m256i hi0, lo0, hi1, lo1;
  mulhilo8(s.x, _mm256_set1_epi32(static_cast<int>(0xD2511F53u)), hi0, lo0);
  mulhilo8(s.z, _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u)), hi1, lo1);
  s.x = _mm256_xor_si256(_mm256_xor_si256(hi1, s.y), k0);
  s.z = _mm256_xor_si256(_mm256_xor_si256(hi0, s.w), k1);
  s.y = lo1;
  s.w = lo0;
}

// Writes the keep multipliers of the 32 elements of state s (lane l: elements 4l .. 4l + 3) to
// m[0..32) in element order: a 4 x 8 transpose, then word >= threshold ? scale : 0.
inline void philox8_multipliers(const Philox8& s, __m256i thr, __m256 scale, float* m) {
  const __m256i xy_lo = _mm256_unpacklo_epi32(s.x, s.y), xy_hi = _mm256_unpackhi_epi32(s.x, s.y);
  const __m256i zw_lo = _mm256_unpacklo_epi32(s.z, s.w), zw_hi = _mm256_unpackhi_epi32(s.z, s.w);
  const __m256i l04 = _mm256_unpacklo_epi64(xy_lo, zw_lo), l15 = _mm256_unpackhi_epi64(xy_lo, zw_lo);
  const __m256i l26 = _mm256_unpacklo_epi64(xy_hi, zw_hi), l37 = _mm256_unpackhi_epi64(xy_hi, zw_hi);
  const __m256i words[4] = {_mm256_permute2x128_si256(l04, l15, 0x20),   // lanes 0, 1
                            _mm256_permute2x128_si256(l26, l37, 0x20),   // lanes 2, 3
                            _mm256_permute2x128_si256(l04, l15, 0x31),   // lanes 4, 5
                            _mm256_permute2x128_si256(l26, l37, 0x31)};  // lanes 6, 7
  for (int q = 0; q < 4; ++q) {
    // unsigned word >= threshold  <=>  max(word, threshold) == word
    const __m256i keep = _mm256_cmpeq_epi32(_mm256_max_epu32(words[q], thr), words[q]);
    _mm256_storeu_ps(m + 8 * q, _mm256_and_ps(_mm256_castsi256_ps(keep), scale));
  }
}

// Stores the 32 multipliers m of elements 4g .. 4g + 31 into out (element e at out[e - first]),
// clipped to [0, n).
inline void place32(const float* m, uint64_t g, uint64_t first, int64_t n, float* out) {
  const int64_t base = static_cast<int64_t>(4 * g) - static_cast<int64_t>(first);
  if (base >= 0 && base + 32 <= n) {
    std::memcpy(out + base, m, 32 * sizeof(float));
  } else {
    const int64_t i0 = std::max<int64_t>(0, -base), i1 = std::min<int64_t>(32, n - base);
    for (int64_t i = i0; i < i1; ++i) out[base + i] = m[i];
  }
}
#endif

void dropout_multipliers(const DropoutRng& rng, uint64_t first, int64_t n, uint32_t threshold,
                         float scale, float* out) {
  const uint64_t g_begin = first >> 2, g_end = (first + static_cast<uint64_t>(n) + 3) >> 2;
  uint64_t g = g_begin;
#if defined(TXK_HAVE_AVX2)
  const __m256 vscale = _mm256_set1_ps(scale);
  const __m256i vthr = _mm256_set1_epi32(static_cast<int>(threshold));
  alignas(32) float m[64];
  __m256i key0[10], key1[10];  // the round keys, the same for every counter
  {
    uint32_t k0 = static_cast<uint32_t>(rng.seed), k1 = static_cast<uint32_t>(rng.seed >> 32);
    for (int round = 0; round < 10; ++round) {
      key0[round] = _mm256_set1_epi32(static_cast<int>(k0));
      key1[round] = _mm256_set1_epi32(static_cast<int>(k1));
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
  }
  // Two independent 8-counter states per iteration: one state's 10 rounds are a serial chain of
  // multiplies, so interleaving two keeps the multipliers busy.
  for (; g + 16 <= g_end; g += 16) {
    Philox8 a = philox8_counters(rng, g), b = philox8_counters(rng, g + 8);
    for (int round = 0; round < 10; ++round) {
      philox8_round(a, key0[round], key1[round]);
      philox8_round(b, key0[round], key1[round]);
    }
    philox8_multipliers(a, vthr, vscale, m);
    philox8_multipliers(b, vthr, vscale, m + 32);
    place32(m, g, first, n, out);
    place32(m + 32, g + 8, first, n, out);
  }
  for (; g + 8 <= g_end; g += 8) {
    Philox8 a = philox8_counters(rng, g);
    for (int round = 0; round < 10; ++round) philox8_round(a, key0[round], key1[round]);
    philox8_multipliers(a, vthr, vscale, m);
    place32(m, g, first, n, out);
  }
#endif
  for (; g < g_end; ++g) {
    const Philox4 r = rng.words(g);
    const uint32_t words[4] = {r.x, r.y, r.z, r.w};
    const int64_t base = static_cast<int64_t>(4 * g) - static_cast<int64_t>(first);
    const int64_t i0 = std::max<int64_t>(0, -base), i1 = std::min<int64_t>(4, n - base);
    for (int64_t i = i0; i < i1; ++i) out[base + i] = words[i] >= threshold ? scale : 0.0f;
  }
}

// ---------------------------------------------------------------------------------------------
// Activations on accumulator vectors
// ---------------------------------------------------------------------------------------------
template <typename Acc, Activation A>
struct Act {
  using V = at::vec::Vectorized<Acc>;
  static constexpr double kSqrt1_2 = 0.70710678118654752440;
  static constexpr double kInvSqrt2Pi = 0.39894228040143267794;
  static constexpr double kSqrt2OverPi = 0.79788456080286535588;
  static constexpr double kCubic = 0.044715;

  static inline V fwd(const V& v) {
    if constexpr (A == Activation::kRelu) {
      return at::vec::clamp_min(v, V(Acc(0)));
    } else if constexpr (A == Activation::kGelu) {
      return V(Acc(0.5)) * v * (V(Acc(1)) + detail::erf_fast(v * V(Acc(kSqrt1_2))));
    } else {
      // v / (1 + exp(-2u)), -2u = v * (c0 + c1 v^2)
      const V v2 = v * v;
      const V neg2u = v * at::vec::fmadd(v2, V(Acc(-2 * kSqrt2OverPi * kCubic)), V(Acc(-2 * kSqrt2OverPi)));
      // exp_fast saturates at e^88, so v = -inf would give -inf; torch's 0.5 v (1 + tanh(u)) is
      // -inf * 0 = NaN there.
      const V ninf(-std::numeric_limits<Acc>::infinity());
      return V::blendv(v / (V(Acc(1)) + detail::exp_fast(neg2u)),
                       V(std::numeric_limits<Acc>::quiet_NaN()), v == ninf);
    }
  }
  // d act / dv
  static inline V grad(const V& v) {
    if constexpr (A == Activation::kRelu) {
      // [not v <= 0], as torch's threshold_backward: a NaN input passes its gradient through.
      return V::blendv(V(Acc(1)), V(Acc(0)), v <= V(Acc(0)));
    } else if constexpr (A == Activation::kGelu) {
      const V cdf = V(Acc(0.5)) * (V(Acc(1)) + detail::erf_fast(v * V(Acc(kSqrt1_2))));
      const V pdf = detail::exp_fast(v * v * V(Acc(-0.5))) * V(Acc(kInvSqrt2Pi));
      // + (v - v): NaN at v = +-inf, where torch's cdf + v * pdf is inf * 0 (exp_fast saturates,
      // so it would be inf here).
      return at::vec::fmadd(v, pdf, cdf) + (v - v);
    } else {
      // Beyond |v| = 20 the derivative is 1 or 0 to the type's precision; clamping (which keeps
      // NaN) stops v^2 overflowing to a 0 * inf = NaN for huge fp32 inputs. + (v - v) below keeps
      // torch's NaN at v = +-inf.
      const V vc = at::vec::clamp(v, V(Acc(-20)), V(Acc(20)));
      const V v2 = vc * vc;
      const V neg2u = vc * at::vec::fmadd(v2, V(Acc(-2 * kSqrt2OverPi * kCubic)), V(Acc(-2 * kSqrt2OverPi)));
      const V s = V(Acc(1)) / (V(Acc(1)) + detail::exp_fast(neg2u));
      // 2u' = 2 sqrt(2/pi) (1 + 3 c v^2)
      const V du2 = at::vec::fmadd(v2, V(Acc(6 * kSqrt2OverPi * kCubic)), V(Acc(2 * kSqrt2OverPi)));
      return at::vec::fmadd(vc * s * (V(Acc(1)) - s), du2, s) + (v - v);
    }
  }
};

struct Dropout {
  bool active = false;
  bool drop_all = false;
  uint32_t threshold = 0;
  float scale = 1.0f;    // of the fp32 multipliers
  double scale64 = 1.0;  // fp64 applies this one, so its outputs carry no fp32 rounding
  explicit Dropout(const BiasActParams& p) {
    active = p.dropout_p > 0.0f;
    drop_all = p.dropout_p >= 1.0f;
    threshold = dropout_threshold(static_cast<double>(p.dropout_p));
    scale64 = dropout_scale(static_cast<double>(p.dropout_p));
    scale = static_cast<float>(scale64);
  }
};

// Loads kSize dropout multipliers starting at m[c] into accumulator vectors.
template <typename Acc>
inline void load_mask(const float* m, const Dropout& drop, at::vec::Vectorized<Acc>& a,
                      at::vec::Vectorized<Acc>& b) {
  using V = at::vec::Vectorized<Acc>;
  if constexpr (std::is_same_v<Acc, float>) {
    a = V::loadu(m);
    b = V::loadu(m + V::size());
  } else {
    alignas(64) Acc tmp[2 * V::size()];
    for (int64_t i = 0; i < 2 * V::size(); ++i) tmp[i] = m[i] != 0.0f ? static_cast<Acc>(drop.scale64) : Acc(0);
    a = V::loadu(tmp);
    b = V::loadu(tmp + V::size());
  }
}

// Calls fn(row, c0, c1) for every tile of every row, in parallel.
template <typename Fn>
void for_each_tile(int64_t rows, int64_t cols, const Fn& fn) {
  const int64_t tiles_per_row = (cols + kTile - 1) / kTile;
  const int64_t tile_cols = std::min(cols, kTile);
  const int64_t grain = std::max<int64_t>(1, 16384 / tile_cols);
  at::parallel_for(0, rows * tiles_per_row, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t / tiles_per_row, c0 = (t % tiles_per_row) * kTile;
      fn(r, c0, std::min(cols, c0 + kTile));
    }
  });
}

template <typename T, Activation A>
void bias_act_fwd_impl(const BiasActParams& p) {
  using B = Block<T>;
  using Acc = typename B::Acc;
  using AVec = typename B::AVec;
  constexpr int64_t L = B::kLanes, K = B::kSize;
  const int64_t rows = p.rows, cols = p.cols;
  if (rows <= 0 || cols <= 0) return;
  const Dropout drop(p);
  const T* input = static_cast<const T*>(p.input);
  T* out = static_cast<T*>(p.out);
  if (drop.drop_all) {  // p == 1: every element is dropped
    for_each_tile(rows, cols, [&](int64_t r, int64_t c0, int64_t c1) {
      std::memset(static_cast<void*>(out + r * cols + c0), 0, sizeof(T) * (c1 - c0));
    });
    return;
  }
  const int64_t padded = detail::round_up(cols, K);
  const auto bias_v = detail::column_param<Acc>(p.bias, cols, padded, Acc(0));
  const Acc* bias = bias_v.data();
  const bool stream = detail::use_streaming_stores(rows * cols * int64_t(sizeof(T)));

  for_each_tile(rows, cols, [&](int64_t r, int64_t c0, int64_t c1) {
    alignas(64) float mask[kTile];
    if (drop.active) {
      dropout_multipliers(p.rng, static_cast<uint64_t>(r * cols + c0), c1 - c0, drop.threshold,
                          drop.scale, mask);
      std::fill(mask + (c1 - c0), mask + detail::round_up(c1 - c0, K), 0.0f);
    }
    const T* x = input + r * p.input_row_stride;
    T* y = out + r * cols;
    const bool nt = stream && detail::stream_aligned(y + c0);
    AVec a, b, ma, mb;
    for (int64_t c = c0; c < c1; c += K) {
      const int64_t n = std::min(K, c1 - c);
      if (n == K) {
        B::load(x + c, a, b);
      } else {
        B::load(x + c, n, a, b);
      }
      a = Act<Acc, A>::fwd(a + AVec::loadu(bias + c));
      b = Act<Acc, A>::fwd(b + AVec::loadu(bias + c + L));
      if (drop.active) {
        load_mask<Acc>(mask + (c - c0), drop, ma, mb);  // mask has kTile entries; read only n are used
        a = a * ma;
        b = b * mb;
      }
      B::store_block(y + c, n, a, b, nt);
    }
    if (nt) detail::streaming_fence();
  });
}

template <typename T, Activation A>
void bias_act_bwd_impl(const BiasActBwdParams& p) {
  using B = Block<T>;
  using Acc = typename B::Acc;
  using AVec = typename B::AVec;
  constexpr int64_t L = B::kLanes, K = B::kSize;
  const int64_t rows = p.rows, cols = p.cols;
  if (rows <= 0 || cols <= 0) return;
  const Dropout drop(p);
  const T* input = static_cast<const T*>(p.input);
  const T* grad_out = static_cast<const T*>(p.grad_out);
  T* grad_input = static_cast<T*>(p.grad_input);
  const int64_t padded = detail::round_up(cols, K);

  if (drop.drop_all) {
    for_each_tile(rows, cols, [&](int64_t r, int64_t c0, int64_t c1) {
      std::memset(static_cast<void*>(grad_input + r * cols + c0), 0, sizeof(T) * (c1 - c0));
    });
    if (p.grad_bias) std::fill(static_cast<Acc*>(p.grad_bias), static_cast<Acc*>(p.grad_bias) + cols, Acc(0));
    return;
  }
  const auto bias_v = detail::column_param<Acc>(p.bias, cols, padded, Acc(0));
  const Acc* bias = bias_v.data();
  const bool stream = detail::use_streaming_stores(rows * cols * int64_t(sizeof(T)));

  // Columns c0..c1 of row r; adds the gradient to pb[c] (relative to column 0) when pb is given.
  auto do_tile = [&](int64_t r, int64_t c0, int64_t c1, Acc* pb) {
    alignas(64) float mask[kTile];
    if (drop.active) {
      dropout_multipliers(p.rng, static_cast<uint64_t>(r * cols + c0), c1 - c0, drop.threshold,
                          drop.scale, mask);
      // The last block of a row may read past c1 - c0; make those (discarded) lanes finite.
      std::fill(mask + (c1 - c0), mask + detail::round_up(c1 - c0, K), 0.0f);
    }
    const T* x = input + r * p.input_row_stride;
    const T* g = grad_out + r * cols;
    T* dx = grad_input + r * cols;
    const bool nt = stream && detail::stream_aligned(dx + c0);
    AVec a, b, ga, gb, ma, mb;
    for (int64_t c = c0; c < c1; c += K) {
      const int64_t n = std::min(K, c1 - c);
      if (n == K) {
        B::load(x + c, a, b);
        B::load(g + c, ga, gb);
      } else {
        B::load(x + c, n, a, b);
        B::load(g + c, n, ga, gb);  // zero beyond the row: adds nothing to pb
      }
      a = ga * Act<Acc, A>::grad(a + AVec::loadu(bias + c));
      b = gb * Act<Acc, A>::grad(b + AVec::loadu(bias + c + L));
      if (drop.active) {
        load_mask<Acc>(mask + (c - c0), drop, ma, mb);
        a = a * ma;
        b = b * mb;
      }
      B::store_block(dx + c, n, a, b, nt);
      if (pb) {
        (AVec::loadu(pb + c) + a).store(pb + c);
        (AVec::loadu(pb + c + L) + b).store(pb + c + L);
      }
    }
    if (nt) detail::streaming_fence();
  };

  if (p.grad_bias == nullptr) {
    for_each_tile(rows, cols, [&](int64_t r, int64_t c0, int64_t c1) { do_tile(r, c0, c1, nullptr); });
    return;
  }
  // grad_bias: deterministic per-row-block partial column sums, combined in block order.
  const auto rb = detail::RowBlocks::make(rows, padded);
  std::vector<Acc> partial(static_cast<size_t>(rb.count * padded));
  at::parallel_for(0, rb.count, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      Acc* pb = partial.data() + blk * padded;
      std::fill(pb, pb + padded, Acc(0));
      const int64_t r0 = blk * rb.rows_per_block, r1 = std::min(rows, r0 + rb.rows_per_block);
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t c0 = 0; c0 < cols; c0 += kTile) do_tile(r, c0, std::min(cols, c0 + kTile), pb);
      }
    }
  });
  detail::combine_partials(partial.data(), rb.count, padded, cols, p.grad_bias);
}

template <typename T>
void bias_act_fwd_typed(const BiasActParams& p) {
  switch (p.activation) {
    case Activation::kRelu: return bias_act_fwd_impl<T, Activation::kRelu>(p);
    case Activation::kGelu: return bias_act_fwd_impl<T, Activation::kGelu>(p);
    case Activation::kGeluTanh: return bias_act_fwd_impl<T, Activation::kGeluTanh>(p);
  }
  TORCH_CHECK_VALUE(false, "tx_kernels: bias_act: unknown activation");
}

template <typename T>
void bias_act_bwd_typed(const BiasActBwdParams& p) {
  switch (p.activation) {
    case Activation::kRelu: return bias_act_bwd_impl<T, Activation::kRelu>(p);
    case Activation::kGelu: return bias_act_bwd_impl<T, Activation::kGelu>(p);
    case Activation::kGeluTanh: return bias_act_bwd_impl<T, Activation::kGeluTanh>(p);
  }
  TORCH_CHECK_VALUE(false, "tx_kernels: bias_act backward: unknown activation");
}

}  // namespace

void bias_act_fwd(const BiasActParams& params) {
  dispatch_floating(params.dtype, "bias_act",
                    [&](auto tag) { bias_act_fwd_typed<decltype(tag)>(params); });
}

void bias_act_bwd(const BiasActBwdParams& params) {
  dispatch_floating(params.dtype, "bias_act backward",
                    [&](auto tag) { bias_act_bwd_typed<decltype(tag)>(params); });
}

}  // namespace tx_kernels::cpu::TXK_CPU_ISA
