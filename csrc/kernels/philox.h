// philox.h: the counter-based random generator behind every dropout in tx_kernels.
//
// Shared verbatim by the CPU kernels (compiled by the host C++ compiler) and the CUDA kernels
// (compiled by nvcc), so both backends draw the same keep/drop decision for the same element and
// the backward passes regenerate the forward's mask instead of storing it.
//
// Scheme (Philox4x32-10, Salmon et al. 2011):
//   key     = the 64-bit seed, split into two 32-bit words;
//   counter = (group lo, group hi, offset lo, offset hi) with group = element_index / 4;
//   the generator yields four 32-bit words per counter; element i takes word i % 4.
// An element is kept when its word is >= threshold = floor(p * 2^32); kept values are scaled by
// 1 / (1 - p). element_index is the element's position in the logical row-major order of the
// tensor being dropped out: for attention probabilities ((n * H + h) * L + i) * S + j, for an
// activation the flat index of the contiguous (M, D) view.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define TXK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TXK_HOST_DEVICE inline
#endif

namespace tx_kernels {

struct Philox4 {
  uint32_t x, y, z, w;
};

TXK_HOST_DEVICE uint32_t philox_mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(product >> 32);
  return static_cast<uint32_t>(product);
}

// Ten rounds of Philox4x32 on `counter` under the key (k0, k1).
TXK_HOST_DEVICE Philox4 philox4x32_10(Philox4 counter, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = philox_mulhilo(kMul0, counter.x, &hi0);
    const uint32_t lo1 = philox_mulhilo(kMul1, counter.z, &hi1);
    counter = Philox4{hi1 ^ counter.y ^ k0, lo1, hi0 ^ counter.w ^ k1, lo0};
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return counter;
}

// The dropout stream of one op invocation: a seed and an offset, both drawn by the caller from
// torch's generator.
struct DropoutRng {
  uint64_t seed = 0;
  uint64_t offset = 0;

  // Four consecutive random words, for elements 4 * group .. 4 * group + 3.
  TXK_HOST_DEVICE Philox4 words(uint64_t group) const {
    return philox4x32_10(
        Philox4{static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32),
                static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32)},
        static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  }

  TXK_HOST_DEVICE uint32_t word(uint64_t element_index) const {
    const Philox4 r = words(element_index >> 2);
    switch (element_index & 3) {
      case 0: return r.x;
      case 1: return r.y;
      case 2: return r.z;
      default: return r.w;
    }
  }
};

// floor(p * 2^32), saturating: keep an element when its word is >= this.
TXK_HOST_DEVICE uint32_t dropout_threshold(double p) {
  if (p <= 0.0) return 0u;
  if (p >= 1.0) return 0xFFFFFFFFu;
  return static_cast<uint32_t>(p * 4294967296.0);
}

}  // namespace tx_kernels

namespace tx_kernels {

// Factor applied to kept elements; 0 when everything is dropped (p == 1).
TXK_HOST_DEVICE double dropout_scale(double p) {
  return p >= 1.0 ? 0.0 : 1.0 / (1.0 - p);
}

}  // namespace tx_kernels
