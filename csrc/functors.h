// The element-wise math of each op, shared by the CPU loop and the CUDA kernel.
// p[k] is the data pointer of the k-th list's tensor; i is the element index.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/bit_cast.h>
#include <c10/util/Half.h>

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <utility>

#include "multi_tensor.h"

namespace swa_fast {

// Loops over a functor's K lists, unrolled in device code so that its register arrays stay in
// registers (indexed at run time they would live in local memory); the host compiler unrolls them
// itself and would warn about the pragma.
#if defined(__CUDA_ARCH__)
#define SWA_FAST_UNROLL_ON_DEVICE _Pragma("unroll")
#else
#define SWA_FAST_UNROLL_ON_DEVICE
#endif

// The element type of each list of a functor, in list order. With the functor's kReadLists and
// written_lists() (bit k: list k; a list it does not write in this call, such as an average at
// weight 0, is left out), the CUDA runner's vector path loads and stores whole vectors of each
// list and hands the functor registers in place of memory.
template <typename... T>
struct ListTypes {
  template <int k>
  using type = std::tuple_element_t<k, std::tuple<T...>>;
  static constexpr C10_HOST_DEVICE int bytes(int k) {
    int out = 0, at = 0;
    ((out = at++ == k ? static_cast<int>(sizeof(T)) : out), ...);
    return out;
  }
  static constexpr C10_HOST_DEVICE int min_bytes() {
    int out = 1 << 30;
    ((out = static_cast<int>(sizeof(T)) < out ? static_cast<int>(sizeof(T)) : out), ...);
    return out;
  }
  static constexpr C10_HOST_DEVICE int max_bytes() {
    int out = 0;
    ((out = static_cast<int>(sizeof(T)) > out ? static_cast<int>(sizeof(T)) : out), ...);
    return out;
  }
};

// ListTypes of K lists of D, then S.
template <typename D, typename S, size_t... k>
ListTypes<std::enable_if_t<(k < sizeof...(k)), D>..., S> repeated_list_types(std::index_sequence<k...>);

// The scalar weight: read from the host once per call, or from device memory once per CUDA block,
// so the host never waits for the device.
template <typename A>
struct Weight {
  const void* device_ptr = nullptr;
  bool is_double = false;
  A value = A(0);

  static Weight from(const at::Tensor& w, at::Device tensors_device) {
    Weight out;
    if (w.device().is_cpu()) {
      out.value = static_cast<A>(w.item<double>());  // host memory: no device synchronisation
    } else {
      TORCH_INTERNAL_ASSERT(w.device() == tensors_device);
      out.device_ptr = w.data_ptr();
      out.is_double = w.scalar_type() == at::kDouble;
    }
    return out;
  }
  C10_HOST_DEVICE A get() const {
    if (device_ptr == nullptr) return value;
    return is_double ? static_cast<A>(*static_cast<const double*>(device_ptr))
                     : static_cast<A>(*static_cast<const float*>(device_ptr));
  }
};

// Element i of p as the arithmetic type A. fp16 on the host is widened with integer and float ops
// that the compiler vectorises (c10's scalar conversion does not: docs/benchmarks.md);
// the result is exact, subnormals, infinities and NaN included. Device code uses the intrinsic.
template <typename A, typename T>
C10_HOST_DEVICE inline A load_as(const void* p, int64_t i) {
#if !defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, c10::Half>) {
    const uint32_t h = static_cast<const c10::Half*>(p)[i].x;
    const uint32_t exponent = h & 0x7c00u;
    const uint32_t normal = ((h & 0x7fffu) << 13) + ((127u - 15u) << 23);  // rebiased
    const uint32_t inf_nan = normal + ((128u - 16u) << 23);                 // maximal fp32 exponent
    const uint32_t subnormal =  // the fp32 unit normalises it
        c10::bit_cast<uint32_t>(c10::bit_cast<float>(normal + (1u << 23)) - 6.103515625e-05f);
    // Masks rather than branches or ?:, so that the loop vectorises.
    const uint32_t is_inf_nan = 0u - static_cast<uint32_t>(exponent == 0x7c00u);
    const uint32_t is_subnormal = 0u - static_cast<uint32_t>(exponent == 0u);
    const uint32_t magnitude =
        (normal & ~(is_inf_nan | is_subnormal)) | (inf_nan & is_inf_nan) | (subnormal & is_subnormal);
    return static_cast<A>(c10::bit_cast<float>(magnitude | ((h & 0x8000u) << 16)));
  }
#endif
  return static_cast<A>(static_cast<const T*>(p)[i]);
}

// Element i of p, of type T, set to x. fp32 -> fp16 on the host is narrowed with integer and float
// ops that the compiler vectorises (c10's scalar conversion does not, and ran copy_ into fp16 at a
// fifth of torch's speed); it rounds to nearest even and gives c10's bits, subnormals, overflow to
// infinity and NaN (0x7e00 with its sign) included. fp32 -> bf16 likewise, with masks for c10's
// NaN branch (0x7fc0, whatever the sign), which GCC if-converts in the plain loop but not in the
// loop that counts (`stats`). Device code uses the intrinsic.
template <typename T, typename A>
C10_HOST_DEVICE inline void store_as(void* p, int64_t i, A x) {
#if !defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<A, float>) {
    const uint32_t bits = c10::bit_cast<uint32_t>(x);
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;  // to nearest even
    const uint32_t is_nan = 0u - static_cast<uint32_t>((bits & 0x7fffffffu) > 0x7f800000u);
    static_cast<c10::BFloat16*>(p)[i].x = static_cast<uint16_t>((rounded & ~is_nan) | (0x7fc0u & is_nan));
    return;
  }
  if constexpr (std::is_same_v<T, c10::Half> && std::is_same_v<A, float>) {
    const uint32_t bits = c10::bit_cast<uint32_t>(x);
    const uint32_t sign = bits & 0x80000000u;
    const uint32_t f = bits ^ sign;  // |x|
    // At least 2^16 (fp16's infinity; from 65520 up the rounding of `normal` carries there too), or NaN.
    const uint32_t is_big = 0u - static_cast<uint32_t>(f >= ((127u + 16u) << 23));
    const uint32_t is_nan = 0u - static_cast<uint32_t>(f > 0x7f800000u);
    const uint32_t big = 0x7c00u | (is_nan & 0x0200u);
    // Below 2^-14: an fp16 subnormal or zero. Adding 0.5 puts its bits in the low mantissa, rounded
    // to nearest even by the fp32 unit.
    const uint32_t is_small = 0u - static_cast<uint32_t>(f < (113u << 23));
    const uint32_t small = c10::bit_cast<uint32_t>(c10::bit_cast<float>(f) + 0.5f) - 0x3f000000u;
    // Otherwise rebias the exponent and round the 13 dropped bits to nearest even.
    const uint32_t normal = (f + ((15u - 127u) << 23) + 0xfffu + ((f >> 13) & 1u)) >> 13;
    const uint32_t magnitude = (normal & ~(is_big | is_small)) | (small & is_small) | (big & is_big);
    static_cast<c10::Half*>(p)[i].x = static_cast<uint16_t>(magnitude | (sign >> 16));
    return;
  }
#endif
  static_cast<T*>(p)[i] = static_cast<T>(x);
}

// --- stochastic rounding: swa_fast/ops/rounding.py defines the bits, which every backend computes alike ---

// Philox4x32-10's constants (Salmon et al., SC 2011; Random123's): the rounds' multipliers and the
// key's increments (the golden ratio, sqrt(3) - 1).
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u, kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u, kPhiloxKeyB = 0xBB67AE85u;

// Philox4x32-10 of the counter c under the key (k0, k1), in place: a pure function, so each
// element's bits are computed where it is stored.
C10_HOST_DEVICE C10_ALWAYS_INLINE void philox4x32_10(uint32_t (&c)[4], uint32_t k0, uint32_t k1) {
  // Unrolled on the host too, so that a loop over counters vectorises across them.
#if defined(__CUDACC__) || defined(__clang__)
#pragma unroll
#elif defined(__GNUC__)
#pragma GCC unroll 10
#endif
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxRoundA) * c[0];
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxRoundB) * c[2];
    const uint32_t c1 = c[1], c3 = c[3];
    c[0] = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    c[1] = static_cast<uint32_t>(p1);
    c[2] = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c[3] = static_cast<uint32_t>(p0);
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
}

// One written list's Philox calls: the key (the seed), and the counter's words besides the element
// group's (the step, and the list's stream already shifted into the counter's top byte).
struct PhiloxStream {
  uint32_t seed_lo, seed_hi, step_lo, step_hi, stream_hi;

  // The four 32-bit words (32 random bits for each of 8 elements, two each) of the 8 elements
  // 8g .. 8g + 7: element n's 16 bits are word (n >> 1) & 3's low half for even n, its high half
  // for odd n.
  C10_HOST_DEVICE C10_ALWAYS_INLINE void words(uint64_t g, uint32_t (&c)[4]) const {
    c[0] = static_cast<uint32_t>(g);
    c[1] = static_cast<uint32_t>(g >> 32) ^ stream_hi;
    c[2] = step_lo;
    c[3] = step_hi;
    philox4x32_10(c, seed_lo, seed_hi);
  }
};

// What the random bits of a call's written lists depend on besides the element: the seed (Philox's
// key), the step, and each written list's stream (S of them, the functor's kRoundedLists, in its
// order), already shifted into the counter's top byte.
template <int S>
struct RoundingKey {
  uint32_t seed_lo = 0, seed_hi = 0, step_lo = 0, step_hi = 0;
  uint32_t stream_hi[S]{};

  C10_HOST_DEVICE C10_ALWAYS_INLINE PhiloxStream stream(int s) const {
    return {seed_lo, seed_hi, step_lo, step_hi, stream_hi[s]};
  }
  // Stream s's words of the 8 elements 8g .. 8g + 7 (PhiloxStream::words).
  C10_HOST_DEVICE C10_ALWAYS_INLINE void words(int s, uint64_t g, uint32_t (&c)[4]) const { stream(s).words(g, c); }
  // The bits of the 8 elements n0 .. n0 + 7 of stream s (the CUDA vector path), laid out as `words`
  // lays them out (element n0 + i's in word i >> 1, its low half for even i): one Philox call where
  // n0 is a multiple of 8 (every vector of a tensor whose first element is: a flat buffer's views),
  // else two, shifted down by n0's remainder in 16-bit halves through selects whose indices are all
  // constants, so that on the device the words stay in registers.
  C10_HOST_DEVICE C10_ALWAYS_INLINE void eight(int s, uint64_t n0, uint32_t (&out)[4]) const {
    uint32_t here[4], next[4] = {0, 0, 0, 0}, w[8];
    const auto skew = static_cast<unsigned>(n0 & 7);
    words(s, n0 >> 3, here);
    if (skew != 0) words(s, (n0 >> 3) + 1, next);
    SWA_FAST_UNROLL_ON_DEVICE
    for (int j = 0; j < 4; ++j) w[j] = here[j], w[j + 4] = next[j];
    SWA_FAST_UNROLL_ON_DEVICE
    for (int j = 0; j < 8; ++j) w[j] = (skew & 4u) != 0 ? (j + 2 < 8 ? w[j + 2] : 0u) : w[j];
    SWA_FAST_UNROLL_ON_DEVICE
    for (int j = 0; j < 8; ++j) w[j] = (skew & 2u) != 0 ? (j + 1 < 8 ? w[j + 1] : 0u) : w[j];
    SWA_FAST_UNROLL_ON_DEVICE
    for (int j = 0; j < 8; ++j) {  // (a funnel shift on the device)
      w[j] = (skew & 1u) != 0 ? (w[j] >> 16) | ((j + 1 < 8 ? w[j + 1] : 0u) << 16) : w[j];
    }
    SWA_FAST_UNROLL_ON_DEVICE
    for (int j = 0; j < 4; ++j) out[j] = w[j];
  }
  // Element n's 16 bits of stream s, alone: a Philox call for one element (the CUDA scalar path).
  C10_HOST_DEVICE uint32_t bits(int s, uint64_t n) const {
    uint32_t c[4];
    words(s, n >> 3, c);
    const unsigned j = static_cast<unsigned>(n >> 1) & 3u;  // selects, not an index: c stays in registers
    const uint32_t word = j == 0 ? c[0] : j == 1 ? c[1] : j == 2 ? c[2] : c[3];
    return (n & 1) != 0 ? word >> 16 : word & 0xffffu;
  }
};

// x rounded into bf16 or fp16 with the 16 random bits r (rounding.py's `round_stochastically`), as
// the type's bits: integer and float operations and selects, no branch, so that the CPU loop
// vectorises. A value the type holds exactly is never changed; inf stays inf and NaN NaN.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE uint16_t round_stochastically(float x, uint32_t r) {
  static_assert(std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>, "only into bf16 or fp16");
  const uint32_t u = c10::bit_cast<uint32_t>(x);
  const uint32_t sign = u & 0x80000000u;
  const uint32_t f = u ^ sign;  // |x|
  const bool finite = f < 0x7f800000u;
  uint32_t bits;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    // the 16 dropped bits plus r, truncated (the carry reaches the exponent and the sign stays)
    bits = (u + r) >> 16;
  } else {
    // Normal range (from 2^-14): the 13 dropped bits plus r's top 13, truncated, rebiased; from
    // 2^16 up, infinity.
    const uint32_t t = (f + (r >> 3)) & ~0x1fffu;
    const uint32_t normal = t >= 0x47800000u ? 0x7c00u : (t - 0x38000000u) >> 13;
    // Below 2^-14, steps of 2^-24: q = |x| 2^24 (exact), its integer part m and the first 16 bits
    // of its fraction F (exact), up with probability F / 2^16. (|x| held below 2^-14 first, so that
    // the conversions stay in range where this result is not taken.)
    const float q = c10::bit_cast<float>(f < 0x38800000u ? f : 0x38800000u) * 16777216.0f;
    const int32_t m = static_cast<int32_t>(q);
    const int32_t fraction = static_cast<int32_t>((q - static_cast<float>(m)) * 65536.0f);
    const uint32_t small = static_cast<uint32_t>(m) + ((static_cast<uint32_t>(fraction) + r) >> 16);
    bits = (f >= 0x38800000u ? normal : small) | (sign >> 16);
  }
#if !defined(__CUDA_ARCH__)
  // A non-finite x by integer ops (rounding.py's rule): an infinity as it is, NaN with its sign
  // (bf16: its top bits, quieted; fp16: 0x7e00).
  uint32_t nearest;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    nearest = (u >> 16) | (f > 0x7f800000u ? 0x40u : 0u);
  } else {
    nearest = (f > 0x7f800000u ? 0x7e00u : 0x7c00u) | (sign >> 16);
  }
#else
  // On the device the conversion instruction (inf as it is, NaN as the instruction's NaN): the
  // integer rule above made moments_' fp16 kernel spill on sm_75-sm_86.
  const uint32_t nearest = static_cast<T>(x).x;
#endif
  return static_cast<uint16_t>(finite ? bits : nearest);
}

// How a functor's store writes each of its written lists: to nearest (store_as), or stochastically
// with the element's 16 random bits of each written list (slot s: the functor's s-th written list).
struct Nearest {
  template <typename T, typename A>
  C10_HOST_DEVICE C10_ALWAYS_INLINE void put(void* p, int64_t i, int, A x) const {
    store_as<T>(p, i, x);
  }
};

template <int S>
struct Stochastic {
  uint32_t r[S];
  template <typename T, typename A>
  C10_HOST_DEVICE C10_ALWAYS_INLINE void put(void* p, int64_t i, int s, A x) const {
    static_assert(std::is_same_v<A, float>, "bf16 and fp16 averages are computed in fp32");
    const uint16_t bits = round_stochastically<T>(x, r[s]);
    static_cast<T*>(p)[i] = T(bits, T::from_bits());
  }
};

// --- stats: what a pass saw of each written list (swa_fast/ops/pass_stats.py) -------------------------

// A pass that rounds to nearest (the runners' R where a call has no `rounding`); one that rounds
// stochastically takes its Rounding (host) or RoundingKey (device) instead.
struct NoRounding {};

// Where a pass adds what it saw of its S written lists: row s of the call's `stats` for the functor's
// s-th written list (4 int64: written, unchanged, non-finite, max |update| as fp32 bits).
template <int S>
struct StatsRows {
  int64_t* row[S];
};

// A pass without `stats`: the runners' default, which compiles the kernels of a call without it.
struct NoStats {};

// What one thread (CUDA) or work item (CPU) saw so far, in 32-bit counters: integer adds and maxima
// that a CPU loop vectorises (a work item is at most a tensor below 2^19 elements or a 2^16 chunk;
// a CUDA thread counts a share of the grid's elements), merged into StatsRows once at its end.
template <int S>
struct Tally {
  uint32_t written[S]{}, unchanged[S]{}, non_finite[S]{}, max_update[S]{};
};

// What a pass counts in for its Count: NoStats for a call without `stats` (functors that have no
// written-list slots, kRoundedLists, included), a Tally<S> for one with its StatsRows<S>.
template <typename Count>
struct TallyOf {
  using type = NoStats;
};
template <int S>
struct TallyOf<StatsRows<S>> {
  using type = Tally<S>;
};
template <typename Count>
using TallyFor = typename TallyOf<Count>::type;

// A stored element of T as unsigned integer bits of its width, and its exponent field (all ones:
// inf or NaN).
template <typename T>
struct StoredBits;
template <>
struct StoredBits<float> {
  using Bits = uint32_t;
  static constexpr Bits kExponent = 0x7f800000u;
  static constexpr Bits kMagnitude = 0x7fffffffu;
};
template <>
struct StoredBits<double> {
  using Bits = uint64_t;
  static constexpr Bits kExponent = 0x7ff0000000000000ull;
  static constexpr Bits kMagnitude = 0x7fffffffffffffffull;
};
template <>
struct StoredBits<c10::BFloat16> {
  using Bits = uint16_t;
  static constexpr Bits kExponent = 0x7f80u;
  static constexpr Bits kMagnitude = 0x7fffu;
};
template <>
struct StoredBits<c10::Half> {
  using Bits = uint16_t;
  static constexpr Bits kExponent = 0x7c00u;
  static constexpr Bits kMagnitude = 0x7fffu;
};

// A put policy that counts each write into *tally and leaves the write to Inner (Nearest or
// Stochastic<S>): the functors' store() stays as it is, and a call without `stats` never sees this
// type, so its kernels are the ones it always ran. The stored bits before and after are read where
// the element lives (memory on the CPU, registers on the CUDA vector and scalar paths) rather than
// rebuilt from the A value, which would lose a NaN's payload; `old` is loaded as the functor loaded
// it. Everything is integer compares, adds and maxima (no branch), so the CPU loop still vectorises:
// non-negative floats order as their bits do, so the largest |update| is kept as uint32 bits.
template <typename Inner, int S>
struct Counting {
  Inner inner;
  Tally<S>* tally;
  template <typename T, typename A>
  C10_HOST_DEVICE C10_ALWAYS_INLINE void put(void* p, int64_t i, int s, A x) const {
    using Bits = typename StoredBits<T>::Bits;
    constexpr Bits kExponent = StoredBits<T>::kExponent;
    const Bits before = c10::bit_cast<Bits>(static_cast<const T*>(p)[i]);
    const A old = load_as<A, T>(p, i);
    inner.template put<T>(p, i, s, x);
    const Bits after = c10::bit_cast<Bits>(static_cast<const T*>(p)[i]);
    // |x - old| in A, rounded to fp32 (to nearest: the fp64 difference's), as bits; a NaN left out
    const uint32_t update = c10::bit_cast<uint32_t>(static_cast<float>(x - old)) & 0x7fffffffu;
    // (a mask, not a select: GCC turns a select before the maximum into a conditional maximum, a
    // reduction it does not vectorise)
    const uint32_t counted = update & (0u - static_cast<uint32_t>(update <= 0x7f800000u));
    tally->written[s] += 1u;
    // unchanged: the same bits, or NaN before and after (the conversions' NaN payloads differ
    // between backends: pass_stats.py)
    constexpr Bits kMagnitude = StoredBits<T>::kMagnitude;
    const bool both_nan = ((after & kMagnitude) > kExponent) & ((before & kMagnitude) > kExponent);
    tally->unchanged[s] += static_cast<uint32_t>((after == before) | both_nan);
    tally->non_finite[s] += static_cast<uint32_t>((after & kExponent) == kExponent);
    tally->max_update[s] = std::max(tally->max_update[s], counted);
  }
};

// A write's put policy: Inner as it is (a call without `stats`: NoStats), or counted into *tally.
template <typename Inner>
C10_HOST_DEVICE C10_ALWAYS_INLINE Inner counted(const Inner& inner, NoStats*) {
  return inner;
}
template <typename Inner, int S>
C10_HOST_DEVICE C10_ALWAYS_INLINE Counting<Inner, S> counted(const Inner& inner, Tally<S>* tally) {
  return {inner, tally};
}

// Whether averages of T are rounded stochastically when a call asks for it (rounding.py:
// STOCHASTIC_DTYPES); fp32 and fp64 ones are stored to nearest as always.
template <typename T>
constexpr bool kRoundsStochastically = std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

// PyTorch's lerp (the same formula on the same side of |weight| = 0.5, so that non-finite values
// give what torch.lerp gives): exact at both ends and accurate on either side of 0.5. Weight 1 gives end as it
// is, even where start is inf or NaN (the formula would give NaN there), so the first SWA update,
// weight 1/(0+1), is a copy whatever the average held. Weight 0 writes nothing at all (`skip()`,
// checked by the runners once per work item), so start stays as it was even where end is inf or
// NaN: that is how an update is skipped on the device.
template <typename A>
struct LerpWeight {
  A w = A(0), w_minus_one = A(-1);
  bool upper = false, one = false;
  C10_HOST_DEVICE void set(A weight) {
    w = weight;
    w_minus_one = weight - A(1);
    // loop-invariant: the compiler hoists the branches out of the loop
    upper = !(weight < A(0.5) && weight > A(-0.5));  // as torch.lerp: |weight| >= 0.5
    one = weight == A(1);
  }
  C10_HOST_DEVICE bool zero() const { return w == A(0); }
  // kMayBeOne = false drops the weight-1 select: the CPU runner takes that loop whenever the weight
  // is not 1, since the select in the loop halves the speed of moments_ (the compiler does not
  // hoist it there).
  template <bool kMayBeOne = true>
  C10_HOST_DEVICE A mix(A start, A end) const {
    // One explicit fused multiply-add, as torch's vectorised CPU lerp computes it: (weight - 1) or
    // weight times (end - start), plus end or start. Nothing else is fused (setup.py: the host code
    // with -ffp-contract=off, the device code with --fmad=false), so the bits do not depend on how
    // the compiler shapes, unswitches or clones a loop, and are the same on the CPU and the GPU.
    // (One fma of selected operands, not a select of two fmas, which GCC does not vectorise in the
    // stochastic rounding loop that counts. The baseline x86-64 clone, for CPUs without FMA, calls
    // the C library's fma: the same bits, slower.)
    const A mixed = std::fma(upper ? w_minus_one : w, end - start, upper ? end : start);
    if constexpr (kMayBeOne) {
      return one ? end : mixed;  // a select, not a branch: the loop stays vectorised
    } else {
      return mixed;
    }
  }
};

// Each op is split into load (read element i of every list into registers) and store (compute and
// write it back), so the CUDA kernel can issue several elements' loads before any store: the
// compiler cannot reorder them itself, since the lists may alias.

// avg += w * (src - avg)
template <typename D, typename S>
struct Lerp {
  static constexpr int kLists = 2;
  using Lists = ListTypes<D, S>;
  static constexpr unsigned kReadLists = 0b11;
  C10_HOST_DEVICE unsigned written_lists() const { return 0b01; }
  using A = acc_t<D>;
  struct Regs {
    A avg, src;
  };
  Weight<A> weight;
  LerpWeight<A> lerp;
  C10_HOST_DEVICE void resolve() { lerp.set(weight.get()); }
  C10_HOST_DEVICE bool skip() const { return lerp.zero(); }
  C10_HOST_DEVICE bool weight_one() const { return lerp.one; }
  C10_HOST_DEVICE Regs load(void* const* p, int64_t i) const {
    return {load_as<A, D>(p[0], i), load_as<A, S>(p[1], i)};
  }
  // `put` writes each written list (Nearest, or Stochastic with each one's random bits: slot 0, avg)
  static constexpr int kRoundedLists = 1;
  template <bool kMayBeOne = true, typename Put = Nearest>
  C10_HOST_DEVICE void store(void* const* p, int64_t i, const Regs& r, const Put& put = {}) const {
    put.template put<D>(p[0], i, 0, lerp.template mix<kMayBeOne>(r.avg, r.src));
  }
};

// mean += w * (src - mean); sq += w * (src^2 - sq)   (SWAG's first and second moments)
template <typename D, typename S>
struct Moments {
  static constexpr int kLists = 3;
  using Lists = ListTypes<D, D, S>;
  static constexpr unsigned kReadLists = 0b111;
  C10_HOST_DEVICE unsigned written_lists() const { return 0b011; }
  using A = acc_t<D>;
  struct Regs {
    A mean, sq, src;
  };
  Weight<A> weight;
  LerpWeight<A> lerp;
  C10_HOST_DEVICE void resolve() { lerp.set(weight.get()); }
  C10_HOST_DEVICE bool skip() const { return lerp.zero(); }
  C10_HOST_DEVICE bool weight_one() const { return lerp.one; }
  C10_HOST_DEVICE Regs load(void* const* p, int64_t i) const {
    return {load_as<A, D>(p[0], i), load_as<A, D>(p[1], i), load_as<A, S>(p[2], i)};
  }
  static constexpr int kRoundedLists = 2;  // slot 0 mean, slot 1 sq
  template <bool kMayBeOne = true, typename Put = Nearest>
  C10_HOST_DEVICE void store(void* const* p, int64_t i, const Regs& r, const Put& put = {}) const {
    put.template put<D>(p[0], i, 0, lerp.template mix<kMayBeOne>(r.mean, r.src));
    put.template put<D>(p[1], i, 1, lerp.template mix<kMayBeOne>(r.sq, r.src * r.src));
  }
};

// ema += w (src - ema); out = ema + c (src - start)   (BEMA, Block et al. 2025: the EMA and its
// bias correction from the starting weights, in one pass). `out` is written at every call, so
// nothing is ever skipped; kKeepsAtZero keeps the EMA as it was at weight 0, as lerp_ does, even
// beside a source that is not finite, by a select that costs the vector path its 128-bit stores of
// `out` (the compiler splits them): the body passes it only where weight 0 can happen (a device
// weight, or a host weight of 0).
template <typename D, typename S, bool kKeepsAtZero>
struct Bema {
  static constexpr int kLists = 4;
  using Lists = ListTypes<D, D, D, S>;
  static constexpr unsigned kReadLists = 0b1101;  // out is only written
  C10_HOST_DEVICE unsigned written_lists() const { return 0b0011; }
  using A = acc_t<D>;
  struct Regs {
    A ema, start, src;
  };
  Weight<A> weight, correction;
  LerpWeight<A> lerp;
  A scale = A(0);
  C10_HOST_DEVICE void resolve() {
    lerp.set(weight.get());
    scale = correction.get();
  }
  C10_HOST_DEVICE bool skip() const { return false; }
  C10_HOST_DEVICE bool weight_one() const { return lerp.one; }
  C10_HOST_DEVICE Regs load(void* const* p, int64_t i) const {
    return {load_as<A, D>(p[0], i), load_as<A, D>(p[2], i), load_as<A, S>(p[3], i)};
  }
  template <bool kMayBeOne = true>
  C10_HOST_DEVICE void store(void* const* p, int64_t i, const Regs& r) const {
    A ema = lerp.template mix<kMayBeOne>(r.ema, r.src);
    if constexpr (kKeepsAtZero) ema = lerp.zero() ? r.ema : ema;
    store_as<D>(p[0], i, ema);
    store_as<D>(p[1], i, ema + scale * (r.src - r.start));
  }
};

// avg_k += w_k * (src - avg_k) for k < K, reading src once (post-hoc EMA's K averages of one model).
// p[0..K-1] are the averages (one dtype D), p[K] the source. An average whose weight is 0 is not
// written at all, as lerp_ at weight 0: kZeroSkips = false drops that conditional store, which keeps
// a CPU loop from vectorising, for runners that only see host weights (multi_lerp_impl leaves an
// average of host weight 0 out of the pass instead).
template <int K, typename D, typename S, bool kZeroSkips = true>
struct MultiLerp {
  static constexpr int kLists = K + 1;
  using Lists = decltype(repeated_list_types<D, S>(std::make_index_sequence<K>{}));
  static constexpr unsigned kReadLists = (1u << (K + 1)) - 1;
  using A = acc_t<D>;
  struct Regs {
    A avg[K];
    A src;
  };
  Weight<A> weight[K];
  LerpWeight<A> lerp[K];
  bool any_zero = false;
  C10_HOST_DEVICE void resolve() {
    any_zero = false;
    SWA_FAST_UNROLL_ON_DEVICE
    for (int k = 0; k < K; ++k) {
      lerp[k].set(weight[k].get());
      any_zero |= lerp[k].zero();
    }
  }
  C10_HOST_DEVICE bool skip() const {
    bool all_zero = true;
    SWA_FAST_UNROLL_ON_DEVICE
    for (int k = 0; k < K; ++k) all_zero &= lerp[k].zero();
    return all_zero;
  }
  C10_HOST_DEVICE unsigned written_lists() const {
    unsigned out = 0;
    SWA_FAST_UNROLL_ON_DEVICE
    for (int k = 0; k < K; ++k) out |= lerp[k].zero() ? 0u : 1u << k;
    return out;
  }
  C10_HOST_DEVICE bool weight_one() const {
    bool any_one = false;
    SWA_FAST_UNROLL_ON_DEVICE
    for (int k = 0; k < K; ++k) any_one |= lerp[k].one;
    return any_one;
  }
  C10_HOST_DEVICE Regs load(void* const* p, int64_t i) const {
    Regs r;
    SWA_FAST_UNROLL_ON_DEVICE
    for (int k = 0; k < K; ++k) r.avg[k] = load_as<A, D>(p[k], i);
    r.src = load_as<A, S>(p[K], i);
    return r;
  }
  static constexpr int kRoundedLists = K;  // slot k: average k of the pass
  template <bool kMayBeOne = true, typename Put = Nearest>
  C10_HOST_DEVICE void store(void* const* p, int64_t i, const Regs& r, const Put& put = {}) const {
    SWA_FAST_UNROLL_ON_DEVICE
    for (int k = 0; k < K; ++k) {
      if constexpr (kZeroSkips) {
        if (any_zero && lerp[k].zero()) continue;
      }
      put.template put<D>(p[k], i, k, lerp[k].template mix<kMayBeOne>(r.avg[k], r.src));
    }
  }
};

// dst = w_0 src_0 + w_1 src_1 + ... + w_{K-1} src_{K-1}   (weighted_sum_: model soups, task
// arithmetic), accumulated in A in that order from the first term (not from 0, which would turn a
// first term of -0 into +0), rounded once into D. dst is only written.
//
// Unlike the functors above, its K sources' dtypes are known at run time only, one per source for a
// whole dtype group: up to kMaxSourcesPerPass sources of four dtypes each would be more kernels than
// any build should compile, and the loop over the sources is a loop at run time, so one kernel takes
// any count. The runners dispatch a source's dtype once per block of elements (CPU) or once per
// source for a whole launch (CUDA), never per element, and call `add` for each element.
constexpr int kMaxSourcesPerPass = 8;  // checks.py: MAX_SOURCES_PER_PASS

// x rounded to fp32 to odd: towards zero, the last bit set where that dropped anything. Rounding the
// result to nearest into a format of at least two bits fewer (bf16, fp16) rounds x once, where fp64
// -> fp32 -> bf16 to nearest each time (torch's conversion) can round twice: 1 + 2^-8 + 2^-40 would
// become the tie 1 + 2^-8, then 1.
C10_HOST_DEVICE inline float to_odd_float(double x) {
  const float nearest = static_cast<float>(x);
  const double back = nearest;
  if (back == x || x != x) return nearest;        // exact, or NaN
  const bool away = x > 0 ? back > x : back < x;  // rounded away from zero (to inf past the range)
  return c10::bit_cast<float>((c10::bit_cast<uint32_t>(nearest) - (away ? 1u : 0u)) | 1u);
}

template <typename D, typename A_>
struct WeightedSum {
  using Dst = D;
  using A = A_;
  int count = 0;                                // K, the sources summed in this pass
  at::ScalarType dtypes[kMaxSourcesPerPass]{};  // each source's, for the whole group
  int bytes[kMaxSourcesPerPass]{};              // each source's element size
  Weight<A> weight[kMaxSourcesPerPass];
  A w[kMaxSourcesPerPass]{};
  C10_HOST_DEVICE void resolve() {
    // (unrolled on the device: every index a constant, so w stays in registers)
    SWA_FAST_UNROLL_ON_DEVICE
    for (int k = 0; k < kMaxSourcesPerPass; ++k) {
      if (k < count) w[k] = weight[k].get();
    }
  }
  // Element i of dst, of type D at p, set to the sum x, rounded once.
  C10_HOST_DEVICE void store(void* p, int64_t i, A x) const {
    if constexpr (std::is_same_v<A, double> && !std::is_same_v<D, double> && !std::is_same_v<D, float>) {
      store_as<D>(p, i, to_odd_float(x));
    } else {
      store_as<D>(p, i, x);
    }
  }
  // acc (+)= w_k * element i of source k, of type S at p: kFirst sets acc.
  template <typename S, bool kFirst>
  C10_HOST_DEVICE void add(A& acc, const void* p, int64_t i, int k) const {
    const A term = w[k] * load_as<A, S>(p, i);
    if constexpr (kFirst) {
      acc = term;
    } else {
      acc += term;
    }
  }
};

// Calls f(S{}) with S the C++ type of a weighted_sum_ source of dtype t (already checked): no
// exception path, so that it can run inside the kernels' loops.
template <typename F>
C10_HOST_DEVICE C10_ALWAYS_INLINE void visit_source(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kDouble: f(double{}); return;
    case at::kHalf: f(c10::Half{}); return;
    case at::kBFloat16: f(c10::BFloat16{}); return;
    default: f(float{}); return;
  }
}

// dst = src, cast to dst's dtype (through fp64 when either side is fp64)
template <typename D, typename S>
struct Copy {
  static constexpr int kLists = 2;
  using Lists = ListTypes<D, S>;
  static constexpr unsigned kReadLists = 0b10;  // dst is only written
  C10_HOST_DEVICE unsigned written_lists() const { return 0b01; }
  using A = std::conditional_t<std::is_same_v<D, double> || std::is_same_v<S, double>, double, float>;
  struct Regs {
    A src;
  };
  C10_HOST_DEVICE void resolve() {}
  C10_HOST_DEVICE bool skip() const { return false; }
  C10_HOST_DEVICE bool weight_one() const { return false; }
  C10_HOST_DEVICE Regs load(void* const* p, int64_t i) const {
    return {load_as<A, S>(p[1], i)};
  }
  template <bool = true>
  C10_HOST_DEVICE void store(void* const* p, int64_t i, const Regs& r) const {
    store_as<D>(p[0], i, r.src);
  }
};

// dst = src, bit for bit: integer and bool tensors of one dtype, as unsigned integers of their width
template <typename T>
struct Move {
  static constexpr int kLists = 2;
  using Lists = ListTypes<T, T>;
  static constexpr unsigned kReadLists = 0b10;  // dst is only written
  C10_HOST_DEVICE unsigned written_lists() const { return 0b01; }
  struct Regs {
    T src;
  };
  C10_HOST_DEVICE void resolve() {}
  C10_HOST_DEVICE bool skip() const { return false; }
  C10_HOST_DEVICE bool weight_one() const { return false; }
  C10_HOST_DEVICE Regs load(void* const* p, int64_t i) const { return {static_cast<const T*>(p[1])[i]}; }
  template <bool = true>
  C10_HOST_DEVICE void store(void* const* p, int64_t i, const Regs& r) const {
    static_cast<T*>(p[0])[i] = r.src;
  }
};

// a <-> b, same dtype
template <typename T>
struct Swap {
  static constexpr int kLists = 2;
  using Lists = ListTypes<T, T>;
  static constexpr unsigned kReadLists = 0b11;
  C10_HOST_DEVICE unsigned written_lists() const { return 0b11; }
  struct Regs {
    T a, b;
  };
  C10_HOST_DEVICE void resolve() {}
  C10_HOST_DEVICE bool skip() const { return false; }
  C10_HOST_DEVICE bool weight_one() const { return false; }
  C10_HOST_DEVICE Regs load(void* const* p, int64_t i) const {
    return {static_cast<const T*>(p[0])[i], static_cast<const T*>(p[1])[i]};
  }
  template <bool = true>
  C10_HOST_DEVICE void store(void* const* p, int64_t i, const Regs& r) const {
    static_cast<T*>(p[0])[i] = r.b;
    static_cast<T*>(p[1])[i] = r.a;
  }
};

}  // namespace swa_fast
