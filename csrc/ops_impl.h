// The four ops, written once over a device runner: `Run::run(lists, indices, functor)` applies the
// functor to every element of the tensors at `indices` of `lists` (csrc/cpu, csrc/cuda).
#pragma once

#include <ATen/ATen.h>

#include "functors.h"
#include "multi_tensor.h"

namespace swa_fast {

template <class Run>
void lerp_impl(at::TensorList avg, at::TensorList src, const at::Tensor& weight) {
  check_lists("lerp_", {{"avg", avg, true}, {"src", src, false}}, false);
  if (avg.empty()) return;
  check_weight("lerp_", weight, avg[0].device());
  const ContiguousList src_c(src);
  const std::array<at::TensorList, 2> lists{avg, src_c.list};
  for (const auto& [key, indices] : group_by_dtypes<2>(lists)) {
    visit_float(key[0], [&](auto d) {
      visit_float(key[1], [&](auto s) {
        using F = Lerp<decltype(d), decltype(s)>;
        Run::run(lists, indices, F{Weight<typename F::A>::from(weight, avg[0].device())});
      });
    });
  }
}

template <class Run>
void moments_impl(at::TensorList mean, at::TensorList sq, at::TensorList src, const at::Tensor& weight) {
  check_lists("moments_", {{"mean", mean, true}, {"sq", sq, true}}, true);
  check_lists("moments_", {{"mean", mean, true}, {"src", src, false}}, false);
  if (mean.empty()) return;
  check_weight("moments_", weight, mean[0].device());
  const ContiguousList src_c(src);
  const std::array<at::TensorList, 3> lists{mean, sq, src_c.list};
  for (const auto& [key, indices] : group_by_dtypes<3>(lists)) {
    visit_float(key[0], [&](auto d) {
      visit_float(key[2], [&](auto s) {
        using F = Moments<decltype(d), decltype(s)>;
        Run::run(lists, indices, F{Weight<typename F::A>::from(weight, mean[0].device())});
      });
    });
  }
}

template <class Run>
void copy_impl(at::TensorList dst, at::TensorList src) {
  check_lists("copy_", {{"dst", dst, true}, {"src", src, false}}, false);
  const ContiguousList src_c(src);
  const std::array<at::TensorList, 2> lists{dst, src_c.list};
  for (const auto& [key, indices] : group_by_dtypes<2>(lists)) {
    visit_float(key[0], [&](auto d) {
      visit_float(key[1], [&](auto s) { Run::run(lists, indices, Copy<decltype(d), decltype(s)>{}); });
    });
  }
}

template <class Run>
void swap_impl(at::TensorList a, at::TensorList b) {
  check_lists("swap_", {{"a", a, true}, {"b", b, true}}, true);
  const std::array<at::TensorList, 2> lists{a, b};
  for (const auto& [key, indices] : group_by_dtypes<2>(lists)) {
    visit_float(key[0], [&](auto t) { Run::run(lists, indices, Swap<decltype(t)>{}); });
  }
}

}  // namespace swa_fast
