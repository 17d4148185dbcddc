// Shared by the CPU and CUDA kernels: argument checks, dtype dispatch and grouping of a list by
// dtype, so that each group runs as one typed pass over all its tensors.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <string>
#include <type_traits>
#include <vector>

namespace swa_fast {

// Arithmetic is done in fp32, or fp64 when the destination is fp64.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// The dtype as Python spells it ("torch.bfloat16"), so every backend's messages read alike.
inline std::string dtype_name(at::ScalarType t) { return "torch." + std::string(c10::getDtypeNames(t).first); }

// Calls f(T{}) with T the C++ type of `t`.
template <typename F>
decltype(auto) visit_float(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: return f(float{});
    case at::kDouble: return f(double{});
    case at::kHalf: return f(c10::Half{});
    case at::kBFloat16: return f(c10::BFloat16{});
    default: TORCH_CHECK_VALUE(false, "swa_fast: unsupported dtype ", dtype_name(t));
  }
}

struct NamedList {
  const char* name;
  at::TensorList tensors;
  bool written;  // written lists must be contiguous
};

// Raises a ValueError naming the op, the list, the index, what was expected and what came.
// Everything is checked before a kernel runs, so a bad call writes nothing.
inline void check_lists(const char* op, const std::vector<NamedList>& lists, bool same_dtype) {
  const NamedList& first = lists.front();
  for (const auto& l : lists) {
    TORCH_CHECK_VALUE(l.tensors.size() == first.tensors.size(), "swa_fast.", op, ": `", l.name, "` has ",
                      l.tensors.size(), " tensors but `", first.name, "` has ", first.tensors.size(),
                      "; the lists must have equal lengths");
  }
  if (first.tensors.empty()) return;
  const at::Device device = first.tensors[0].device();
  for (size_t i = 0; i < first.tensors.size(); ++i) {
    const at::Tensor& ref = first.tensors[i];
    for (const auto& l : lists) {
      const at::Tensor& t = l.tensors[i];
      TORCH_CHECK_VALUE(t.defined(), "swa_fast.", op, ": `", l.name, "[", i, "]` is undefined");
      TORCH_CHECK_VALUE(is_supported_float(t.scalar_type()), "swa_fast.", op, ": `", l.name, "[", i,
                        "]` has dtype ", dtype_name(t.scalar_type()),
                        "; expected float32, float64, float16 or bfloat16");
      TORCH_CHECK_VALUE(t.device() == device, "swa_fast.", op, ": `", l.name, "[", i, "]` is on ",
                        t.device(), " but `", first.name, "[0]` is on ", device,
                        "; all tensors of one call must be on one device");
      TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), "swa_fast.", op, ": `", l.name, "[", i, "]` has shape ",
                        t.sizes(), " but `", first.name, "[", i, "]` has shape ", ref.sizes());
      TORCH_CHECK_VALUE(!l.written || t.is_contiguous(), "swa_fast.", op, ": `", l.name, "[", i,
                        "]` is written in place and must be contiguous (got strides ", t.strides(),
                        " for shape ", t.sizes(), ")");
      TORCH_CHECK_VALUE(!same_dtype || t.scalar_type() == ref.scalar_type(), "swa_fast.", op, ": `", l.name,
                        "[", i, "]` has dtype ", dtype_name(t.scalar_type()), " but `", first.name, "[", i,
                        "]` has dtype ", dtype_name(ref.scalar_type()), "; both sides must have the same dtype");
    }
  }
}

// The weight: a 0-dim floating tensor on the destination's device or on the CPU.
inline void check_weight(const char* op, const at::Tensor& weight, at::Device device) {
  TORCH_CHECK_VALUE(weight.dim() == 0, "swa_fast.", op, ": `weight` must be a 0-dim tensor, got shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble, "swa_fast.",
                    op, ": `weight` must be float32 or float64, got ", dtype_name(weight.scalar_type()));
  TORCH_CHECK_VALUE(weight.device() == device || weight.device().is_cpu(), "swa_fast.", op,
                    ": `weight` is on ", weight.device(), " but the tensors are on ", device,
                    "; pass it on ", device, " (or on the CPU)");
}

// Indices of the non-empty tensors of a list, grouped by the dtypes of the lists at each index.
// Few groups (usually one): a vector searched from the last hit beats a map.
template <size_t K>
using DtypeGroups = std::vector<std::pair<std::array<at::ScalarType, K>, std::vector<int64_t>>>;

template <size_t K>
DtypeGroups<K> group_by_dtypes(const std::array<at::TensorList, K>& lists) {
  DtypeGroups<K> groups;
  size_t last = 0;
  for (size_t i = 0; i < lists[0].size(); ++i) {
    if (lists[0][i].numel() == 0) continue;
    std::array<at::ScalarType, K> key;
    for (size_t k = 0; k < K; ++k) key[k] = lists[k][i].scalar_type();
    if (groups.empty() || groups[last].first != key) {
      last = 0;
      while (last < groups.size() && groups[last].first != key) ++last;
      if (last == groups.size()) {
        groups.push_back({key, {}});
        groups.back().second.reserve(lists[0].size() - i);
      }
    }
    groups[last].second.push_back(static_cast<int64_t>(i));
  }
  return groups;
}

// Read-only inputs may be strided: the kernels see contiguous copies, made only for the tensors
// that need one.
struct ContiguousList {
  explicit ContiguousList(at::TensorList src) : list(src) {
    for (size_t i = 0; i < src.size(); ++i) {
      if (src[i].is_contiguous()) continue;
      owned.assign(src.begin(), src.end());
      for (size_t j = i; j < src.size(); ++j) owned[j] = owned[j].contiguous();
      list = owned;
      break;
    }
  }
  std::vector<at::Tensor> owned;
  at::TensorList list;
};

}  // namespace swa_fast
