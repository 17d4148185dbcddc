// The element-wise math of each op, shared by the CPU loop and the CUDA kernel.
// p[k] is the data pointer of the k-th list's tensor; i is the element index.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <ATen/ATen.h>

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

// avg += w * (src - avg)
template <typename D, typename S>
struct Lerp {
  static constexpr int kLists = 2;
  using A = acc_t<D>;
  Weight<A> weight;
  A w = A(0);
  C10_HOST_DEVICE void resolve() { w = weight.get(); }
  C10_HOST_DEVICE void operator()(void* const* p, int64_t i) const {
    D* avg = static_cast<D*>(p[0]);
    const S* src = static_cast<const S*>(p[1]);
    const A a = static_cast<A>(avg[i]);
    avg[i] = static_cast<D>(a + w * (static_cast<A>(src[i]) - a));
  }
};

// mean += w * (src - mean); sq += w * (src^2 - sq)   (SWAG's first and second moments)
template <typename D, typename S>
struct Moments {
  static constexpr int kLists = 3;
  using A = acc_t<D>;
  Weight<A> weight;
  A w = A(0);
  C10_HOST_DEVICE void resolve() { w = weight.get(); }
  C10_HOST_DEVICE void operator()(void* const* p, int64_t i) const {
    D* mean = static_cast<D*>(p[0]);
    D* sq = static_cast<D*>(p[1]);
    const A x = static_cast<A>(static_cast<const S*>(p[2])[i]);
    const A m = static_cast<A>(mean[i]);
    const A q = static_cast<A>(sq[i]);
    mean[i] = static_cast<D>(m + w * (x - m));
    sq[i] = static_cast<D>(q + w * (x * x - q));
  }
};

// dst = src, cast to dst's dtype (through fp64 when either side is fp64)
template <typename D, typename S>
struct Copy {
  static constexpr int kLists = 2;
  using A = std::conditional_t<std::is_same_v<D, double> || std::is_same_v<S, double>, double, float>;
  C10_HOST_DEVICE void resolve() {}
  C10_HOST_DEVICE void operator()(void* const* p, int64_t i) const {
    static_cast<D*>(p[0])[i] = static_cast<D>(static_cast<A>(static_cast<const S*>(p[1])[i]));
  }
};

// a <-> b, same dtype
template <typename T>
struct Swap {
  static constexpr int kLists = 2;
  C10_HOST_DEVICE void resolve() {}
  C10_HOST_DEVICE void operator()(void* const* p, int64_t i) const {
    T* a = static_cast<T*>(p[0]);
    T* b = static_cast<T*>(p[1]);
    const T t = a[i];
    a[i] = b[i];
    b[i] = t;
  }
};

}  // namespace swa_fast
