// Shared by the CPU and CUDA kernels: argument checks, dtype dispatch and grouping of a call's
// tensors by dtype, so that each group runs as one typed pass over all its tensors.
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

// One list argument of an op.
struct ListArg {
  const char* name;
  at::TensorList tensors;
  bool written;         // written in place: must be contiguous
  bool same_dtype = false;  // must have the first list's dtype at every index
};

// The tensors of a call that share one dtype per list: their K data pointers and element counts.
// Each group runs as one typed pass.
template <size_t K>
struct DtypeGroup {
  std::array<at::ScalarType, K> dtypes;
  std::vector<std::array<void*, K>> ptrs;
  std::vector<int64_t> numels;
};

// What the kernels need of a call.
template <size_t K>
struct Gathered {
  at::Device device = at::kCPU;  // of the first tensor (when there is one)
  std::vector<DtypeGroup<K>> groups;
  std::vector<at::Tensor> contiguous_copies;  // of strided read-only inputs: alive until the kernels ran
};

inline bool same_sizes(at::IntArrayRef a, at::IntArrayRef b) {
  // An inline loop: these are 1 to 4 numbers, and a call to memcmp per tensor showed in profiles.
  if (a.size() != b.size()) return false;
  for (size_t d = 0; d < a.size(); ++d) {
    if (a[d] != b[d]) return false;
  }
  return true;
}

constexpr size_t kPrefetchAhead = 8;

inline void prefetch_metadata(const at::Tensor& t) {
  const char* impl = reinterpret_cast<const char*>(t.unsafeGetTensorImpl());
  for (int line = 0; line < 4; ++line) __builtin_prefetch(impl + 64 * line);
}

// Checks every tensor of a call and gathers what the kernels need, in one pass over the tensors:
// for a list of 1,000 small tensors on the CPU, reading each tensor's metadata costs about as much
// as the arithmetic, so it is read once. A bad argument raises a ValueError naming the op, the list, the index, what was
// expected and what came; everything is checked before a kernel runs, so a bad call writes nothing.
// Empty tensors are checked and then left out.
template <size_t K>
Gathered<K> gather(const char* op, const std::array<ListArg, K>& lists) {
  const ListArg& first = lists[0];
  for (const auto& l : lists) {
    TORCH_CHECK_VALUE(l.tensors.size() == first.tensors.size(), "swa_fast.", op, ": `", l.name, "` has ",
                      l.tensors.size(), " tensors but `", first.name, "` has ", first.tensors.size(),
                      "; the lists must have equal lengths");
  }
  Gathered<K> out;
  if (first.tensors.empty()) return out;
  out.device = first.tensors[0].device();
  size_t last = 0;  // the group of the previous tensor: usually that of the next one too
  const size_t n = first.tensors.size();
  for (size_t i = 0; i < n; ++i) {
    // The metadata of a list of tensors is scattered over the heap, and waiting for it is most of
    // this loop's time: ask for a later tensor's while this one is checked.
    if (i + kPrefetchAhead < n) {
      for (size_t k = 0; k < K; ++k) prefetch_metadata(lists[k].tensors[i + kPrefetchAhead]);
    }
    const at::Tensor& ref = first.tensors[i];
    std::array<at::ScalarType, K> dtypes;
    for (size_t k = 0; k < K; ++k) {
      const ListArg& l = lists[k];
      const at::Tensor& t = l.tensors[i];
      TORCH_CHECK_VALUE(t.defined(), "swa_fast.", op, ": `", l.name, "[", i, "]` is undefined");
      dtypes[k] = t.scalar_type();
      TORCH_CHECK_VALUE(is_supported_float(dtypes[k]), "swa_fast.", op, ": `", l.name, "[", i, "]` has dtype ",
                        dtype_name(dtypes[k]), "; expected float32, float64, float16 or bfloat16");
      TORCH_CHECK_VALUE(t.device() == out.device, "swa_fast.", op, ": `", l.name, "[", i, "]` is on ",
                        t.device(), " but `", first.name, "[0]` is on ", out.device,
                        "; all tensors of one call must be on one device");
      TORCH_CHECK_VALUE(same_sizes(t.sizes(), ref.sizes()), "swa_fast.", op, ": `", l.name, "[", i,
                        "]` has shape ", t.sizes(), " but `", first.name, "[", i, "]` has shape ", ref.sizes());
      TORCH_CHECK_VALUE(!l.written || t.is_contiguous(), "swa_fast.", op, ": `", l.name, "[", i,
                        "]` is written in place and must be contiguous (got strides ", t.strides(),
                        " for shape ", t.sizes(), ")");
      TORCH_CHECK_VALUE(!l.same_dtype || dtypes[k] == dtypes[0], "swa_fast.", op, ": `", l.name, "[", i,
                        "]` has dtype ", dtype_name(dtypes[k]), " but `", first.name, "[", i, "]` has dtype ",
                        dtype_name(dtypes[0]), "; both sides must have the same dtype");
    }
    const int64_t numel = ref.numel();
    if (numel == 0) continue;
    if (out.groups.empty() || out.groups[last].dtypes != dtypes) {
      last = 0;
      while (last < out.groups.size() && out.groups[last].dtypes != dtypes) ++last;
      if (last == out.groups.size()) out.groups.push_back({dtypes, {}, {}});
    }
    DtypeGroup<K>& group = out.groups[last];
    std::array<void*, K>& ptrs = group.ptrs.emplace_back();  // written in place: no copy to stall on
    for (size_t k = 0; k < K; ++k) {
      const at::Tensor& t = lists[k].tensors[i];
      if (lists[k].written) {
        ptrs[k] = t.data_ptr();
      } else {  // only read: the kernels see a contiguous copy of a strided tensor
        const at::Tensor& c = t.is_contiguous() ? t : out.contiguous_copies.emplace_back(t.contiguous());
        ptrs[k] = const_cast<void*>(c.const_data_ptr());
      }
    }
    group.numels.push_back(numel);
  }
  return out;
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

}  // namespace swa_fast
