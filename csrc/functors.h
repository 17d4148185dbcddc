// The element-wise math of each op, shared by the CPU loop and the CUDA kernel.
// p[k] is the data pointer of the k-th list's tensor; i is the element index.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/bit_cast.h>
#include <c10/util/Half.h>

#include <ATen/ATen.h>

#include <cstdint>

#include "multi_tensor.h"

namespace swa_fast {

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

// PyTorch's lerp (the same formula on the same side of |weight| = 0.5, so that non-finite values
// give what torch.lerp gives): exact at both ends and accurate on either side of 0.5. Weight 1 gives end as it
// is, even where start is inf or NaN (the formula would give NaN there), so the first SWA update,
// weight 1/(0+1), is a copy whatever the average held. Weight 0 writes nothing at all (`skip()`,
// checked by the runners once per work item), so start stays as it was even where end is inf or
// NaN: that is how an update is skipped on the device.
template <typename A>
struct LerpWeight {
  A w = A(0), one_minus_w = A(1);
  bool upper = false, one = false;
  C10_HOST_DEVICE void set(A weight) {
    w = weight;
    one_minus_w = A(1) - weight;
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
    const A mixed = upper ? end - (end - start) * one_minus_w : start + w * (end - start);
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
  template <bool kMayBeOne = true>
  C10_HOST_DEVICE void store(void* const* p, int64_t i, const Regs& r) const {
    static_cast<D*>(p[0])[i] = static_cast<D>(lerp.template mix<kMayBeOne>(r.avg, r.src));
  }
};

// mean += w * (src - mean); sq += w * (src^2 - sq)   (SWAG's first and second moments)
template <typename D, typename S>
struct Moments {
  static constexpr int kLists = 3;
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
  template <bool kMayBeOne = true>
  C10_HOST_DEVICE void store(void* const* p, int64_t i, const Regs& r) const {
    static_cast<D*>(p[0])[i] = static_cast<D>(lerp.template mix<kMayBeOne>(r.mean, r.src));
    static_cast<D*>(p[1])[i] = static_cast<D>(lerp.template mix<kMayBeOne>(r.sq, r.src * r.src));
  }
};

// dst = src, cast to dst's dtype (through fp64 when either side is fp64)
template <typename D, typename S>
struct Copy {
  static constexpr int kLists = 2;
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
    static_cast<D*>(p[0])[i] = static_cast<D>(r.src);
  }
};

// a <-> b, same dtype
template <typename T>
struct Swap {
  static constexpr int kLists = 2;
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
