// vec_io.h: vector loads/stores and reduction helpers shared by the CPU LayerNorm and bias +
// activation kernels (layernorm.cpp, bias_act.cpp).
//
// Every kernel works on "blocks" of two accumulator vectors: 16 floats for fp32/fp16/bf16 (the
// width at which at::vec converts 16-bit floats to two fp32 vectors) or 8 doubles for fp64 with
// AVX2, twice that in the AVX-512 copy (isa.h).
// Reduced-precision values are widened to fp32 on load and rounded once on store, so all arithmetic
// happens in fp32 (fp64 for double).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/intrinsics.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include "../kernels/params.h"
#include "isa.h"

namespace tx_kernels::cpu::TXK_CPU_ISA::detail {

using at::vec::Vectorized;

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

template <typename T>
struct Block {
  using Acc = typename AccOf<T>::type;
  using AVec = Vectorized<Acc>;
  static constexpr int64_t kLanes = AVec::size();
  static constexpr int64_t kSize = 2 * kLanes;
  static constexpr bool kWide = std::is_same_v<T, Acc>;  // no conversion needed

  // A full block of kSize elements.
  static inline void load(const T* p, AVec& a, AVec& b) {
    if constexpr (kWide) {
      a = AVec::loadu(p);
      b = AVec::loadu(p + kLanes);
    } else {
      std::tie(a, b) = at::vec::convert_to_float<T>(Vectorized<T>::loadu(p));
    }
  }
  // The first n (0 < n < kSize) elements; the rest of the block reads as zero.
  static inline void load(const T* p, int64_t n, AVec& a, AVec& b) {
    if constexpr (kWide) {
      a = AVec::loadu(p, std::min(n, kLanes));
      b = n > kLanes ? AVec::loadu(p + kLanes, n - kLanes) : AVec(Acc(0));
    } else {
      std::tie(a, b) = at::vec::convert_to_float<T>(Vectorized<T>::loadu(p, static_cast<int16_t>(n)));
    }
  }
  static inline void store(T* p, const AVec& a, const AVec& b) {
    if constexpr (kWide) {
      a.store(p);
      b.store(p + kLanes);
    } else {
      at::vec::convert_from_float<T>(a, b).store(p);
    }
  }
  static inline void store(T* p, int64_t n, const AVec& a, const AVec& b) {
    if constexpr (kWide) {
      a.store(p, std::min(n, kLanes));
      if (n > kLanes) b.store(p + kLanes, n - kLanes);
    } else {
      at::vec::convert_from_float<T>(a, b).store(p, static_cast<int>(n));
    }
  }
  // A full block to a kStreamAlign-aligned address with a non-temporal (streaming) store, which
  // skips reading the destination line into the cache first (see use_streaming_stores). Falls
  // back to a plain store without AVX2.
  static inline void store_stream(T* p, const AVec& a, const AVec& b) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, float>) {
      _mm512_stream_ps(p, a);
      _mm512_stream_ps(p + kLanes, b);
    } else if constexpr (std::is_same_v<T, double>) {
      _mm512_stream_pd(p, a);
      _mm512_stream_pd(p + kLanes, b);
    } else {
      const __m512i v = at::vec::convert_from_float<T>(a, b);
      _mm512_stream_si512(reinterpret_cast<__m512i*>(p), v);
    }
#elif defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<T, float>) {
      _mm256_stream_ps(p, a);
      _mm256_stream_ps(p + kLanes, b);
    } else if constexpr (std::is_same_v<T, double>) {
      _mm256_stream_pd(p, a);
      _mm256_stream_pd(p + kLanes, b);
    } else {
      const __m256i v = at::vec::convert_from_float<T>(a, b);
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), v);
    }
#else
    store(p, a, b);
#endif
  }
  // The first n (<= kSize) lanes of the block: a full block streams when `streaming` (the caller
  // checked use_streaming_stores and stream_aligned), a partial one takes a plain masked store.
  static inline void store_block(T* p, int64_t n, const AVec& a, const AVec& b, bool streaming) {
    if (n < kSize) {
      store(p, n, a, b);
    } else if (streaming) {
      store_stream(p, a, b);
    } else {
      store(p, a, b);
    }
  }
  // (a, b) rounded to T and widened back: the values a T tensor holds. A sum of two T inputs is
  // rounded so before it is normalized, as x + r in T would be, so the statistics describe the
  // residual_out the backward reads back (no-op for fp32/fp64).
  static inline void round_to_storage(AVec& a, AVec& b) {
    if constexpr (!kWide) std::tie(a, b) = at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(a, b));
  }
  // Zeroes lanes n.. of the block (a, b) in place (0 < n < kSize).
  static inline void keep_first(int64_t n, AVec& a, AVec& b) {
    const AVec zero(Acc(0));
    if (n < kLanes) {
      a = AVec::set(zero, a, n);
      b = zero;
    } else {
      b = AVec::set(zero, b, n - kLanes);
    }
  }
};

// Streaming stores: an op whose outputs total at least this many bytes writes them with
// non-temporal stores. Such outputs are too large to still be in cache when the next op reads them,
// so bringing each destination line into the cache first (a read for ownership) only costs memory
// bandwidth: on the 2-core development machine it makes a fused add + LayerNorm of 8 x 512 x 768
// fp32 about 1.5x faster. glibc's memcpy switches to the same stores at a similar size.
constexpr int64_t kStreamingBytes = int64_t(8) << 20;

inline bool use_streaming_stores(int64_t bytes_written) { return bytes_written >= kStreamingBytes; }

// The alignment a streaming store needs: one vector register.
constexpr uintptr_t kStreamAlign = sizeof(Vectorized<float>);

inline bool stream_aligned(const void* p) { return (reinterpret_cast<uintptr_t>(p) % kStreamAlign) == 0; }

// Makes this thread's streaming stores visible before the parallel region ends.
inline void streaming_fence() {
#if defined(TXK_HAVE_AVX2)
  _mm_sfence();
#endif
}

// exp(x) for fp32 vectors, inline (no library call): Cody-Waite range reduction x = n ln2 + r,
// |r| <= ln2 / 2, then a degree-6 polynomial for exp(r) (Cephes' expf coefficients), scaled by 2^n
// through the exponent bits. Max relative error about 2 ulp for x in [-87, 88]; inputs are
// clamped to that range (exp(-87) ~ 1.6e-38, exp(88) ~ 1.7e38), NaN stays NaN. Sleef's exp, which
// at::vec calls, is a function call per vector and was the bottleneck of the GELU kernels.
inline Vectorized<float> exp_fast(const Vectorized<float>& x_in) {
  using V = Vectorized<float>;
  using I = Vectorized<int32_t>;
  const V x = at::vec::clamp(x_in, V(-87.0f), V(88.0f));  // at::vec's clamp keeps NaN
  const V n = (x * V(1.44269504088896341f)).round();
  V r = at::vec::fnmadd(n, V(0.693359375f), x);
  r = at::vec::fnmadd(n, V(-2.12194440e-4f), r);
  V p(1.9875691500e-4f);
  p = at::vec::fmadd(p, r, V(1.3981999507e-3f));
  p = at::vec::fmadd(p, r, V(8.3334519073e-3f));
  p = at::vec::fmadd(p, r, V(4.1665795894e-2f));
  p = at::vec::fmadd(p, r, V(1.6666665459e-1f));
  p = at::vec::fmadd(p, r, V(5.0000001201e-1f));
  p = at::vec::fmadd(p, r * r, r + V(1.0f));
  // 2^n built in the exponent bits (n is an integer in [-126, 127] here); cast is a bit cast.
  const I two_n = (at::vec::convert_to_int_of_same_size(n) + I(127)) << I(23);
  return p * at::vec::cast<float>(two_n);
}
inline Vectorized<double> exp_fast(const Vectorized<double>& x) { return x.exp(); }

// erf(x) by Abramowitz & Stegun 7.1.26 (max abs error 1.5e-7, the formula at::vec uses for fp32)
// with exp_fast; fp64 uses Sleef's erf.
inline Vectorized<float> erf_fast(const Vectorized<float>& x) {
  using V = Vectorized<float>;
  const V ax = x.abs();
  const V t = V(1.0f) / at::vec::fmadd(ax, V(0.3275911f), V(1.0f));
  V poly = at::vec::fmadd(V(1.061405429f), t, V(-1.453152027f));
  poly = at::vec::fmadd(poly, t, V(1.421413741f));
  poly = at::vec::fmadd(poly, t, V(-0.284496736f));
  poly = at::vec::fmadd(poly, t, V(0.254829592f));
  const V y = V(1.0f) - poly * t * exp_fast(V(0.0f) - x * x);
  return V::blendv(y, V(0.0f) - y, x < V(0.0f));  // odd function; NaN stays NaN
}
inline Vectorized<double> erf_fast(const Vectorized<double>& x) { return x.erf(); }

// Software prefetch of one cache line (a hint; nothing without SSE).
inline void prefetch(const void* p) {
#if defined(TXK_HAVE_AVX2)
  _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0);
#else
  (void)p;
#endif
}

// Sum of the lanes in a fixed order (deterministic).
template <typename Acc>
inline Acc hsum(const Vectorized<Acc>& v) {
  alignas(64) Acc tmp[Vectorized<Acc>::size()];
  v.store(tmp);
  Acc s = 0;
  for (int64_t i = 0; i < Vectorized<Acc>::size(); ++i) s += tmp[i];
  return s;
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// A heap array aligned to a cache line. Row buffers and column parameters live here rather than in
// a std::vector, whose 16-byte alignment makes every other 32-byte vector access split a cache
// line: measured, that alone slowed the fp32 add + LayerNorm forward by about 10%.
template <typename T>
class CacheAligned {
 public:
  explicit CacheAligned(int64_t n, T fill = T(0))
      : data_(static_cast<T*>(std::aligned_alloc(64, round_up(std::max<int64_t>(n, 1) * int64_t(sizeof(T)), 64)))) {
    TORCH_CHECK(data_ != nullptr, "tx_kernels: out of memory for a ", n, "-element buffer");
    std::fill(data_.get(), data_.get() + n, fill);
  }
  T* data() { return data_.get(); }
  const T* data() const { return data_.get(); }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> data_;
};

// A per-column parameter (weight or bias; params.h passes it in the accumulator type), padded to a
// whole number of blocks: the kernels can then read full blocks at a row's tail. A missing
// parameter reads as `fill` (1 for a weight, 0 for a bias).
template <typename Acc>
CacheAligned<Acc> column_param(const void* param, int64_t cols, int64_t padded, Acc fill) {
  CacheAligned<Acc> out(padded);
  Acc* o = out.data();
  const Acc* p = static_cast<const Acc*>(param);  // parameters come in the accumulator type
  for (int64_t c = 0; c < cols; ++c) o[c] = p ? p[c] : fill;
  return out;
}

// Deterministic column reductions (grad_weight, grad_bias). Rows are split into a fixed number of
// contiguous row blocks that depends only on (rows, cols), never on the thread count; each block
// accumulates its own partial row in order, and the partials are then combined in block order.
// The result is therefore bit-identical from run to run and for any number of threads.
struct RowBlocks {
  int64_t count = 1;           // number of row blocks
  int64_t rows_per_block = 0;  // last block may be shorter

  static RowBlocks make(int64_t rows, int64_t partial_cols) {
    // Enough blocks to balance a few dozen threads, few enough that the partials stay small
    // (at most ~8 Mi accumulators) and each block has some rows to amortize its partial row.
    constexpr int64_t kMaxBlocks = 64, kMinRowsPerBlock = 4, kMaxPartialElems = int64_t(8) << 20;
    int64_t count = std::min<int64_t>(kMaxBlocks, std::max<int64_t>(1, rows / kMinRowsPerBlock));
    count = std::min<int64_t>(count, std::max<int64_t>(1, kMaxPartialElems / std::max<int64_t>(1, partial_cols)));
    RowBlocks rb;
    rb.rows_per_block = (rows + count - 1) / count;
    rb.count = rows == 0 ? 1 : (rows + rb.rows_per_block - 1) / rb.rows_per_block;
    return rb;
  }
};

// out[c] = sum over blocks b (in order) of partial[b * stride + c], for c < cols; parallel over
// columns (each column's sum order is fixed).
template <typename Acc>
void combine_partials(const Acc* partial, int64_t blocks, int64_t stride, int64_t cols, void* out_param) {
  if (out_param == nullptr) return;
  Acc* out = static_cast<Acc*>(out_param);  // parameter gradients come in the accumulator type
  constexpr int64_t kChunk = 1024;
  at::parallel_for(0, (cols + kChunk - 1) / kChunk, 1, [&](int64_t k0, int64_t k1) {
    Acc acc[kChunk];
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t c0 = k * kChunk, n = std::min(kChunk, cols - c0);
      std::fill(acc, acc + n, Acc(0));
      for (int64_t b = 0; b < blocks; ++b) {
        const Acc* src = partial + b * stride + c0;
        for (int64_t j = 0; j < n; ++j) acc[j] += src[j];
      }
      for (int64_t j = 0; j < n; ++j) out[c0 + j] = acc[j];
    }
  });
}

}  // namespace tx_kernels::cpu::TXK_CPU_ISA::detail
