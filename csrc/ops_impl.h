// The four ops, written once over a device runner: `Run::run(group, functor)` applies the functor
// to every element of the tensors of one dtype group (csrc/cpu, csrc/cuda).
#pragma once

#include <ATen/ATen.h>

#include "functors.h"
#include "multi_tensor.h"

namespace swa_fast {

template <class Run>
void lerp_impl(at::TensorList avg, at::TensorList src, const at::Tensor& weight) {
  const auto call = gather<2>("lerp_", {{{"avg", avg, true}, {"src", src, false}}});
  if (avg.empty()) return;
  const at::Tensor w = checked_weight("lerp_", weight, call.device);
  for (const auto& group : call.groups) {
    visit_float(group.dtypes[0], [&](auto d) {
      visit_float(group.dtypes[1], [&](auto s) {
        using F = Lerp<decltype(d), decltype(s)>;
        Run::run(group, call.device, F{Weight<typename F::A>::from(w, call.device)});
      });
    });
  }
}

template <class Run>
void moments_impl(at::TensorList mean, at::TensorList sq, at::TensorList src, const at::Tensor& weight) {
  const auto call =
      gather<3>("moments_", {{{"mean", mean, true}, {"sq", sq, true, /*same_dtype=*/true}, {"src", src, false}}});
  if (mean.empty()) return;
  const at::Tensor w = checked_weight("moments_", weight, call.device);
  for (const auto& group : call.groups) {
    visit_float(group.dtypes[0], [&](auto d) {
      visit_float(group.dtypes[2], [&](auto s) {
        using F = Moments<decltype(d), decltype(s)>;
        Run::run(group, call.device, F{Weight<typename F::A>::from(w, call.device)});
      });
    });
  }
}

template <class Run>
void copy_impl(at::TensorList dst, at::TensorList src) {
  const auto call = gather<2>("copy_", {{{"dst", dst, true}, {"src", src, false}}});
  for (const auto& group : call.groups) {
    visit_float(group.dtypes[0], [&](auto d) {
      visit_float(group.dtypes[1], [&](auto s) { Run::run(group, call.device, Copy<decltype(d), decltype(s)>{}); });
    });
  }
}

template <class Run>
void swap_impl(at::TensorList a, at::TensorList b) {
  const auto call = gather<2>("swap_", {{{"a", a, true}, {"b", b, true, /*same_dtype=*/true}}});
  for (const auto& group : call.groups) {
    visit_float(group.dtypes[0], [&](auto t) { Run::run(group, call.device, Swap<decltype(t)>{}); });
  }
}

}  // namespace swa_fast
