// Philox4x32-10 for a run of consecutive counters at once, on the CPU: the random bits of stochastic
// rounding (swa_fast/ops/rounding.py), 8 elements per call. The scalar philox4x32_10 of functors.h
// costs more than the rest of the element loop; here AVX-512 or AVX2 registers hold one counter per
// 64-bit lane (its 32-bit words in the low halves, which is all vpmuludq reads), so a round is two
// multiplies, two shuffles and two three-way xors for 8 (AVX-512) or 4 (AVX2) calls, and four
// registers' calls are in flight to hide the multiplies' latency. The words written are the scalar
// function's, bit for bit (tests/test_rounding.py runs the ops at each width against the scalar one).
//
// Which width runs follows the CPU, capped like torch's own kernels by ATEN_CPU_CAPABILITY
// (default, avx2, avx512), read once.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SWA_FAST_PHILOX_SIMD 1
#endif

#include "../functors.h"

namespace swa_fast {

// Calls g0 .. g0 + groups - 1 of the stream k (functors.h), call g's four words at out[4g .. 4g + 3].
inline void philox_calls_scalar(const PhiloxStream& k, uint64_t g0, int64_t groups, uint32_t* out) {
  for (int64_t g = 0; g < groups; ++g) {
    uint32_t c[4];
    k.words(g0 + static_cast<uint64_t>(g), c);
    std::memcpy(out + 4 * g, c, sizeof c);
  }
}

#if defined(SWA_FAST_PHILOX_SIMD)
// The templates below hold vector registers outside the functions with the target attribute; they
// are always inlined into those, so the ABI of passing them (GCC's -Wpsabi note) never applies.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
constexpr int kPhiloxRegisters = 4;  // independent registers per round: the multiplies' latency hidden

// One width's operations, so that the round and the transpose are written once. Lane order: lane j
// of a register holds call (j & 1) * W/2 + (j >> 1) of its W calls, so that the final unpacks of
// 64-bit lanes leave the calls in order (unpacklo: calls 0 .. W/2 - 1, unpackhi: the rest).
// (AVX-512's zero-masking forms with every lane kept: GCC 12 warns of the plain forms' undefined
// start value.)
struct Avx512 {
  using V = __m512i;
  static constexpr int kLanes = 8;
  __attribute__((target("avx512f"))) static V lane_order() { return _mm512_setr_epi64(0, 4, 1, 5, 2, 6, 3, 7); }
  __attribute__((target("avx512f"))) static V broadcast(uint64_t x) { return _mm512_set1_epi64(static_cast<int64_t>(x)); }
  __attribute__((target("avx512f"))) static V add(V a, V b) { return _mm512_add_epi64(a, b); }
  // each 64-bit lane's high word moved to its low half (a shuffle, off the multiplier's port)
  __attribute__((target("avx512f"))) static V high_to_low(V a) { return _mm512_maskz_shuffle_epi32(~0, a, _MM_PERM_DDBB); }
  __attribute__((target("avx512f"))) static V mul(V a, V b) { return _mm512_maskz_mul_epu32(~0, a, b); }
  __attribute__((target("avx512f"))) static V xor2(V a, V b) { return _mm512_xor_si512(a, b); }
  __attribute__((target("avx512f"))) static V xor3(V a, V b, V c) { return _mm512_ternarylogic_epi64(a, b, c, 0x96); }
  // low words of a and b as the 32-bit pairs (a, b)
  __attribute__((target("avx512f"))) static V pair(V a, V b) {
    return _mm512_mask_blend_epi32(0xAAAA, a, _mm512_maskz_slli_epi64(~0, b, 32));
  }
  __attribute__((target("avx512f"))) static void store_calls(uint32_t* out, V w01, V w23) {
    _mm512_storeu_si512(out, _mm512_maskz_unpacklo_epi64(~0, w01, w23));
    _mm512_storeu_si512(out + 16, _mm512_maskz_unpackhi_epi64(~0, w01, w23));
  }
};

struct Avx2 {
  using V = __m256i;
  static constexpr int kLanes = 4;
  __attribute__((target("avx2"))) static V lane_order() { return _mm256_setr_epi64x(0, 2, 1, 3); }
  __attribute__((target("avx2"))) static V broadcast(uint64_t x) { return _mm256_set1_epi64x(static_cast<int64_t>(x)); }
  __attribute__((target("avx2"))) static V add(V a, V b) { return _mm256_add_epi64(a, b); }
  __attribute__((target("avx2"))) static V high_to_low(V a) { return _mm256_shuffle_epi32(a, 0xF5); }
  __attribute__((target("avx2"))) static V mul(V a, V b) { return _mm256_mul_epu32(a, b); }
  __attribute__((target("avx2"))) static V xor2(V a, V b) { return _mm256_xor_si256(a, b); }
  __attribute__((target("avx2"))) static V xor3(V a, V b, V c) { return xor2(xor2(a, b), c); }
  __attribute__((target("avx2"))) static V pair(V a, V b) { return _mm256_blend_epi32(a, _mm256_slli_epi64(b, 32), 0xAA); }
  __attribute__((target("avx2"))) static void store_calls(uint32_t* out, V w01, V w23) {
    _mm256_storeu_si256(reinterpret_cast<V*>(out), _mm256_unpacklo_epi64(w01, w23));
    _mm256_storeu_si256(reinterpret_cast<V*>(out + 8), _mm256_unpackhi_epi64(w01, w23));
  }
};

// R registers of W::kLanes calls each, from call g0: PhiloxStream::words' counters and rounds,
// lane-wise.
template <typename W, int R>
C10_ALWAYS_INLINE void philox_registers(const PhiloxStream& k, uint64_t g0, uint32_t* out) {
  using V = typename W::V;
  const V round_a = W::broadcast(kPhiloxRoundA), round_b = W::broadcast(kPhiloxRoundB);
  V c0[R], c1[R], c2[R], c3[R];
  for (int r = 0; r < R; ++r) {
    const V counter = W::add(W::broadcast(g0 + static_cast<uint64_t>(r * W::kLanes)), W::lane_order());
    c0[r] = counter;  // (the high half is ignored)
    c1[r] = W::xor2(W::high_to_low(counter), W::broadcast(k.stream_hi));
    c2[r] = W::broadcast(k.step_lo);
    c3[r] = W::broadcast(k.step_hi);
  }
  uint32_t k0 = k.seed_lo, k1 = k.seed_hi;
#pragma GCC unroll 10
  for (int round = 0; round < 10; ++round) {
    const V key0 = W::broadcast(k0), key1 = W::broadcast(k1);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const V p0 = W::mul(c0[r], round_a), p1 = W::mul(c2[r], round_b);
      c0[r] = W::xor3(W::high_to_low(p1), c1[r], key0);
      c1[r] = p1;
      c2[r] = W::xor3(W::high_to_low(p0), c3[r], key1);
      c3[r] = p0;
    }
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  for (int r = 0; r < R; ++r) W::store_calls(out + 4 * r * W::kLanes, W::pair(c0[r], c1[r]), W::pair(c2[r], c3[r]));
}

// philox_calls_scalar's words, R registers' calls at a time, then one register's, then one call's.
template <typename W>
C10_ALWAYS_INLINE void philox_calls_simd(const PhiloxStream& k, uint64_t g0, int64_t groups, uint32_t* out) {
  constexpr int64_t kMany = kPhiloxRegisters * W::kLanes;
  int64_t g = 0;
  for (; g + kMany <= groups; g += kMany) philox_registers<W, kPhiloxRegisters>(k, g0 + g, out + 4 * g);
  for (; g + W::kLanes <= groups; g += W::kLanes) philox_registers<W, 1>(k, g0 + g, out + 4 * g);
  philox_calls_scalar(k, g0 + g, groups - g, out + 4 * g);
}

__attribute__((target("avx512f"))) inline void philox_calls_avx512(const PhiloxStream& k, uint64_t g0, int64_t groups,
                                                                   uint32_t* out) {
  philox_calls_simd<Avx512>(k, g0, groups, out);
}
__attribute__((target("avx2"))) inline void philox_calls_avx2(const PhiloxStream& k, uint64_t g0, int64_t groups,
                                                              uint32_t* out) {
  philox_calls_simd<Avx2>(k, g0, groups, out);
}

using PhiloxCalls = void (*)(const PhiloxStream&, uint64_t, int64_t, uint32_t*);

// The widest this CPU runs, at most ATEN_CPU_CAPABILITY's.
inline PhiloxCalls choose_philox_calls() {
  const char* cap = std::getenv("ATEN_CPU_CAPABILITY");
  const bool capped_default = cap != nullptr && std::strcmp(cap, "default") == 0;
  const bool capped_avx2 = cap != nullptr && std::strcmp(cap, "avx2") == 0;
  if (!capped_default && !capped_avx2 && __builtin_cpu_supports("avx512f")) return philox_calls_avx512;
  if (!capped_default && __builtin_cpu_supports("avx2")) return philox_calls_avx2;
  return philox_calls_scalar;
}
#pragma GCC diagnostic pop
#endif

// Philox calls g0 .. g0 + groups - 1 of a stream, call g's four words at out[4g .. 4g + 3].
inline void philox_calls(const PhiloxStream& k, uint64_t g0, int64_t groups, uint32_t* out) {
#if defined(SWA_FAST_PHILOX_SIMD)
  static const PhiloxCalls chosen = choose_philox_calls();
  chosen(k, g0, groups, out);
#else
  philox_calls_scalar(k, g0, groups, out);
#endif
}

}  // namespace swa_fast
