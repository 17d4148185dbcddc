// Shared by the CPU and CUDA kernels: argument checks, dtype dispatch and grouping of a call's
// tensors by dtype, so that each group runs as one typed pass over all its tensors.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <iterator>
#include <memory>
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

// The integer and bool dtypes that copy_ moves as they are (checks.py: INTEGER_DTYPES).
inline bool is_supported_integer(at::ScalarType t) {
  switch (t) {
    case at::kBool: case at::kByte: case at::kChar: case at::kShort: case at::kInt: case at::kLong:
    case at::kUInt16: case at::kUInt32: case at::kUInt64: return true;
    default: return false;
  }
}

// The dtype as Python spells it ("torch.bfloat16"), so every backend's messages read alike.
inline std::string dtype_name(at::ScalarType t) { return "torch." + std::string(c10::getDtypeNames(t).first); }

// Calls f(T{}) with T the unsigned integer type of `bytes` bytes: an integer or bool tensor's
// elements moved as they are.
template <typename F>
decltype(auto) visit_bits(int64_t bytes, F&& f) {
  switch (bytes) {
    case 1: return f(uint8_t{});
    case 2: return f(uint16_t{});
    case 4: return f(uint32_t{});
    case 8: return f(uint64_t{});
    default: TORCH_CHECK_VALUE(false, "swa_fast: unsupported element size ", bytes);
  }
}

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

// The layout as Python spells it ("torch.sparse_coo").
inline std::string layout_name(at::Layout layout) {
  switch (layout) {
    case at::kStrided: return "torch.strided";
    case at::kSparse: return "torch.sparse_coo";
    case at::kSparseCsr: return "torch.sparse_csr";
    case at::kSparseCsc: return "torch.sparse_csc";
    case at::kSparseBsr: return "torch.sparse_bsr";
    case at::kSparseBsc: return "torch.sparse_bsc";
    case at::kMkldnn: return "torch._mkldnn";
    case at::kJagged: return "torch.jagged";
    default: return "layout " + std::to_string(static_cast<int>(layout));
  }
}

// One list argument of an op.
struct ListArg {
  const char* name;
  at::TensorList tensors;
  bool written;         // written in place: must be contiguous
  bool same_dtype = false;  // must have the first list's dtype at every index
  // may also hold integer and bool tensors (copy_), each with the first list's dtype at its index
  bool integers = false;
};

// The tensors of a call that share one dtype per list: their K data pointers and element counts,
// and each one's index in the call's lists (where stochastic rounding finds its first element in the
// flat average, which the call's `rounding` gives per index). Each group runs as one typed pass.
template <size_t K>
struct DtypeGroup {
  std::array<at::ScalarType, K> dtypes;
  std::vector<std::array<void*, K>> ptrs;
  std::vector<int64_t> numels;
  std::vector<uint32_t> index;
};

// What the kernels need of a call.
template <size_t K>
struct Gathered {
  at::Device device = at::kCPU;  // of the first tensor (when there is one)
  std::vector<DtypeGroup<K>> groups;
  std::vector<at::Tensor> contiguous_copies;  // of strided read-only inputs: alive until the kernels ran
};

// The bytes [begin, end) that a non-empty tensor of a call spans, and where it sits in the call.
struct Span {
  uintptr_t begin, end;
  uint32_t list, index;
  bool written;
};

// Where a tensor's first element lies, read from its storage: these paths are rare, and a second
// caller of const_data_ptr() keeps the compiler from inlining it into gather's loop.
inline uintptr_t first_byte(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.storage().data()) + t.storage_offset() * t.element_size();
}

// From the first element of the non-empty tensor `t` to one past the last byte its elements touch.
// (Out of line: it runs only for strided sources and on the error path.)
C10_NOINLINE inline Span span_of(const at::Tensor& t, size_t list, size_t index, bool written) {
  int64_t elements = 1;
  for (int64_t d = 0; d < t.dim(); ++d) elements += (t.size(d) - 1) * t.stride(d);
  const uintptr_t begin = first_byte(t);
  return {begin, begin + static_cast<uintptr_t>(elements * t.element_size()), static_cast<uint32_t>(list),
          static_cast<uint32_t>(index), written};
}

// Whether the read tensor lists[k][i] is the same view as a tensor written at index i: the one
// sharing of memory allowed (an average updated from itself).
template <size_t K>
bool is_own_destination(const std::array<ListArg, K>& lists, size_t k, size_t i) {
  const at::Tensor& t = lists[k].tensors[i];
  if (!t.is_contiguous() || t.is_neg()) return false;
  for (const ListArg& w : lists) {
    const at::Tensor& d = w.tensors[i];
    if (w.written && first_byte(d) == first_byte(t) && d.scalar_type() == t.scalar_type()) return true;
  }
  return false;
}

// Names the first pair of tensors, in the order of their spans' starts, of which one is written and
// which share a byte: the rule checks.py applies too, so that both name the same pair. Called once
// an overlap is known to exist; it sorts the spans of every tensor of the call.
template <size_t K>
[[noreturn]] void raise_overlap(const char* op, const std::array<ListArg, K>& lists) {
  std::vector<Span> spans;
  for (size_t k = 0; k < K; ++k) {
    for (size_t i = 0; i < lists[k].tensors.size(); ++i) {
      const at::Tensor& t = lists[k].tensors[i];
      if (t.numel() == 0 || (!lists[k].written && is_own_destination(lists, k, i))) continue;
      spans.push_back(span_of(t, k, i, lists[k].written));
    }
  }
  std::stable_sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.begin < b.begin; });
  const Span* any_end = nullptr;      // the span reaching furthest so far
  const Span* written_end = nullptr;  // the written span reaching furthest so far
  for (const Span& s : spans) {
    const Span* other = s.written ? any_end : written_end;
    if (other != nullptr && other->end > s.begin) {
      const bool other_first = std::make_pair(other->list, other->index) < std::make_pair(s.list, s.index);
      const Span& a = other_first ? *other : s;
      const Span& b = other_first ? s : *other;
      TORCH_CHECK_VALUE(false, "swa_fast.", op, ": `", lists[a.list].name, "[", a.index, "]` and `",
                        lists[b.list].name, "[", b.index,
                        "]` overlap in memory; a tensor written in place must not share memory with "
                        "another tensor of the call (a source may only be its own destination, the "
                        "same view at the same index)");
    }
    if (any_end == nullptr || s.end > any_end->end) any_end = &s;
    if (s.written && (written_end == nullptr || s.end > written_end->end)) written_end = &s;
  }
  TORCH_CHECK(false, "swa_fast.", op, ": an overlap was found but not located");
}

// Raises (raise_overlap) when a written tensor shares a byte with another tensor of the call, except
// a read tensor that is its own destination. Reads the gathered pointers (no tensor metadata) and
// `copied_reads`, the spans of the read tensors the kernels see through a copy (whose pointers in
// the groups, fresh memory, overlap nothing). The written spans are sorted list by list and merged:
// usually each list is one flat buffer's views, already in order, so this is one pass, then for
// each read tensor one comparison with the written spans' bounds (it lives in another allocation)
// or a binary search.
template <size_t K>
void check_no_overlap(const char* op, const std::array<ListArg, K>& lists, const std::vector<DtypeGroup<K>>& groups,
                      const std::vector<Span>& copied_reads) {
  size_t n = 0;
  for (const auto& group : groups) n += group.numels.size();
  std::unique_ptr<Span[]> spans(new Span[n * K]);
  Span* const written = spans.get();
  size_t n_written = 0;
  const auto by_begin = [](const Span& a, const Span& b) { return a.begin < b.begin; };
  for (size_t k = 0; k < K; ++k) {
    if (!lists[k].written) continue;
    const size_t run = n_written;
    for (const auto& group : groups) {
      const int64_t item = c10::elementSize(group.dtypes[k]);
      for (size_t j = 0; j < group.numels.size(); ++j) {
        const auto begin = reinterpret_cast<uintptr_t>(group.ptrs[j][k]);
        written[n_written++] = {begin, begin + static_cast<uintptr_t>(group.numels[j] * item), 0, 0, true};
      }
    }
    if (!std::is_sorted(written + run, written + n_written, by_begin)) {
      std::sort(written + run, written + n_written, by_begin);
    }
    std::inplace_merge(written, written + run, written + n_written, by_begin);
  }
  if (n_written == 0) return;
  for (size_t j = 1; j < n_written; ++j) {
    if (written[j].begin < written[j - 1].end) raise_overlap(op, lists);
  }
  // Disjoint and sorted: the ends grow too.
  const uintptr_t low = written[0].begin, high = written[n_written - 1].end;
  const auto hits_written = [&](uintptr_t begin, uintptr_t end) {
    if (end <= low || begin >= high) return false;
    const Span* after = std::lower_bound(written, written + n_written, end,
                                         [](const Span& w, uintptr_t e) { return w.begin < e; });
    return after != written && std::prev(after)->end > begin;
  };
  for (const auto& group : groups) {
    for (size_t j = 0; j < group.numels.size(); ++j) {
      for (size_t k = 0; k < K; ++k) {
        if (lists[k].written) continue;
        const void* p = group.ptrs[j][k];
        bool own_destination = false;
        for (size_t w = 0; w < K; ++w) {
          own_destination |= lists[w].written && group.ptrs[j][w] == p && group.dtypes[w] == group.dtypes[k];
        }
        const auto begin = reinterpret_cast<uintptr_t>(p);
        const auto end = begin + static_cast<uintptr_t>(group.numels[j] * c10::elementSize(group.dtypes[k]));
        if (!own_destination && hits_written(begin, end)) raise_overlap(op, lists);
      }
    }
  }
  for (const Span& s : copied_reads) {
    if (hits_written(s.begin, s.end)) raise_overlap(op, lists);
  }
}

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
// Empty tensors are checked and then left out. A written tensor must not share memory with any other
// tensor of the call, except a read tensor at its own index that is the same view (avg updated
// from itself). A lazily negated read tensor (Tensor.is_neg()) is read through a resolved copy; a
// negated one cannot be written in place.
template <size_t K>
Gathered<K> gather_checked(const char* op, const std::array<ListArg, K>& lists) {
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
  std::vector<Span> copied_reads;  // of the read tensors that the kernels see through a copy
  // Each written list's bytes, and whether its tensors come in increasing, disjoint order (the
  // views of one flat buffer do): then the overlap check needs no sorting (check_no_overlap).
  std::array<uintptr_t, K> low, high, last_end;
  low.fill(UINTPTR_MAX), high.fill(0), last_end.fill(0);
  bool written_in_order = true;
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
      TORCH_CHECK_VALUE(t.layout() == at::kStrided, "swa_fast.", op, ": `", l.name, "[", i, "]` has layout ",
                        layout_name(t.layout()), "; expected a strided (dense) tensor");
      dtypes[k] = t.scalar_type();
      TORCH_CHECK_VALUE(is_supported_float(dtypes[k]) || (l.integers && is_supported_integer(dtypes[k])),
                        "swa_fast.", op, ": `", l.name, "[", i, "]` has dtype ", dtype_name(dtypes[k]),
                        l.integers ? "; expected float32, float64, float16, bfloat16, or an integer or bool dtype"
                                   : "; expected float32, float64, float16 or bfloat16");
      TORCH_CHECK_VALUE(t.device() == out.device, "swa_fast.", op, ": `", l.name, "[", i, "]` is on ",
                        t.device(), " but `", first.name, "[0]` is on ", out.device,
                        "; all tensors of one call must be on one device");
      TORCH_CHECK_VALUE(same_sizes(t.sizes(), ref.sizes()), "swa_fast.", op, ": `", l.name, "[", i,
                        "]` has shape ", t.sizes(), " but `", first.name, "[", i, "]` has shape ", ref.sizes());
      TORCH_CHECK_VALUE(!l.written || t.is_contiguous(), "swa_fast.", op, ": `", l.name, "[", i,
                        "]` is written in place and must be contiguous (got strides ", t.strides(),
                        " for shape ", t.sizes(), ")");
      TORCH_CHECK_VALUE(!l.written || !t.is_neg(), "swa_fast.", op, ": `", l.name, "[", i,
                        "]` is written in place and must not be a negated view (is_neg()); write into "
                        "the tensor it views");
      TORCH_CHECK_VALUE(!l.same_dtype || dtypes[k] == dtypes[0], "swa_fast.", op, ": `", l.name, "[", i,
                        "]` has dtype ", dtype_name(dtypes[k]), " but `", first.name, "[", i, "]` has dtype ",
                        dtype_name(dtypes[0]), "; both sides must have the same dtype");
      TORCH_CHECK_VALUE(!l.integers || dtypes[k] == dtypes[0] ||
                            (is_supported_float(dtypes[k]) && is_supported_float(dtypes[0])),
                        "swa_fast.", op, ": `", l.name, "[", i, "]` has dtype ", dtype_name(dtypes[k]), " but `",
                        first.name, "[", i, "]` has dtype ", dtype_name(dtypes[0]),
                        "; an integer or bool tensor is copied only to and from its own dtype");
    }
    const int64_t numel = ref.numel();
    if (numel == 0) continue;
    if (out.groups.empty() || out.groups[last].dtypes != dtypes) {
      last = 0;
      while (last < out.groups.size() && out.groups[last].dtypes != dtypes) ++last;
      if (last == out.groups.size()) out.groups.push_back({dtypes, {}, {}, {}});
    }
    DtypeGroup<K>& group = out.groups[last];
    std::array<void*, K>& ptrs = group.ptrs.emplace_back();  // written in place: no copy to stall on
    for (size_t k = 0; k < K; ++k) {
      const at::Tensor& t = lists[k].tensors[i];
      if (lists[k].written) {
        ptrs[k] = t.data_ptr();
        const auto begin = reinterpret_cast<uintptr_t>(ptrs[k]);
        const auto end = begin + static_cast<uintptr_t>(numel * c10::elementSize(dtypes[k]));
        written_in_order &= begin >= last_end[k];
        last_end[k] = end;
        low[k] = std::min(low[k], begin);
        high[k] = std::max(high[k], end);
      } else {  // only read: the kernels see a contiguous copy of a strided or negated tensor
        const bool plain = t.is_contiguous() && !t.is_neg();
        if (!plain) copied_reads.push_back(span_of(t, k, i, false));
        const at::Tensor& c = plain ? t : out.contiguous_copies.emplace_back(t.resolve_neg().contiguous());
        ptrs[k] = const_cast<void*>(c.const_data_ptr());
      }
    }
    group.numels.push_back(numel);
    group.index.push_back(static_cast<uint32_t>(i));
  }
  // The usual call: each written list in order and in its own range, every read tensor outside
  // all of them. Anything else goes through the full check.
  bool plainly_apart = written_in_order;
  for (size_t a = 0; a < K && plainly_apart; ++a) {
    for (size_t b = a + 1; b < K && plainly_apart; ++b) {
      if (lists[a].written && lists[b].written) plainly_apart = high[a] <= low[b] || high[b] <= low[a];
    }
  }
  const auto outside_written = [&](uintptr_t begin, uintptr_t end) {
    for (size_t w = 0; w < K; ++w) {
      if (lists[w].written && end > low[w] && begin < high[w]) return false;
    }
    return true;
  };
  for (const auto& group : out.groups) {
    for (size_t j = 0; j < group.numels.size() && plainly_apart; ++j) {
      for (size_t k = 0; k < K; ++k) {
        if (lists[k].written) continue;
        const auto begin = reinterpret_cast<uintptr_t>(group.ptrs[j][k]);
        plainly_apart &= outside_written(begin, begin + group.numels[j] * c10::elementSize(group.dtypes[k]));
      }
    }
  }
  for (const Span& s : copied_reads) plainly_apart = plainly_apart && outside_written(s.begin, s.end);
  if (!plainly_apart) check_no_overlap(op, lists, out.groups, copied_reads);
  return out;
}

// --- launch plans: a checked call, reused while its tensors are unchanged ---------------------------

// What the checks and the gathered pointers of a call depend on, of one of its tensors: the same
// object (impl), of the same kind (its dispatch keys: layout, device type, negation, wrappers),
// over the same memory (the storage's pointer and its owner: a copy-on-write share replaces the
// owner) from the same offset, with the same dtype, device, sizes and strides (in LaunchPlan).
struct Seen {
  const c10::TensorImpl* impl;
  uint64_t keys;
  const void* data;
  const void* owner;
  int64_t offset;
  c10::ScalarType dtype;
  c10::DeviceIndex device_index;
  int64_t dim;
};

// Reads `t`'s Seen (its sizes and strides are compared apart). Only for a tensor that a checked call
// took (so its storage and default sizes policy are there to read).
inline Seen seen_of(const at::Tensor& t) {
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  const at::DataPtr& data = impl->unsafe_storage().unsafeGetStorageImpl()->data_ptr();
  return {impl, impl->key_set().raw_repr(), data.get(), data.get_context(), impl->storage_offset(),
          impl->dtype().toScalarType(), impl->device().index(), impl->dim()};
}

// Whether `impl` is the tensor `seen` describes, unchanged. The object and its kind are compared
// first: only then are its storage and fields read as a dense tensor's. Field by field, with no
// Seen built to compare whole: a struct assembled on the stack and read back at once stalls on
// store forwarding, which showed as most of this function's time in profiles.
inline bool still(const c10::TensorImpl* impl, const Seen& seen) {
  if (impl != seen.impl || impl->key_set().raw_repr() != seen.keys) return false;
  const c10::StorageImpl* storage = impl->unsafe_storage().unsafeGetStorageImpl();
  if (storage == nullptr) return false;
  const at::DataPtr& data = storage->data_ptr();
  return data.get() == seen.data && data.get_context() == seen.owner && impl->storage_offset() == seen.offset &&
         impl->dtype().toScalarType() == seen.dtype && impl->device().index() == seen.device_index &&
         impl->dim() == seen.dim;
}

// A call whose tensors passed every check, and what it gathered: a later call of the same op whose
// tensors are all unchanged (each the same object, memory, dtype, device, sizes and strides, read
// anew) would pass them again and gather the same pointers, so it takes these instead. Calls whose
// read tensors needed contiguous copies are not kept (their copies are made per call).
template <size_t K>
struct LaunchPlan {
  const char* op = nullptr;
  size_t n = 0;
  std::vector<Seen> seen;        // the K lists' tensors, list after list
  std::vector<int64_t> shapes;   // each one's sizes then strides, in the same order
  std::shared_ptr<const Gathered<K>> gathered;  // shared with the calls that take it

  bool holds(const char* call_op, const std::array<ListArg, K>& lists) const {
    if (call_op != op) return false;
    for (const ListArg& l : lists) {
      if (l.tensors.size() != n) return false;
    }
    size_t j = 0;
    const int64_t* shape = shapes.data();
    for (size_t k = 0; k < K; ++k) {
      for (size_t i = 0; i < n; ++i, ++j) {
        if (i + kPrefetchAhead < n) prefetch_metadata(lists[k].tensors[i + kPrefetchAhead]);
        const at::Tensor& t = lists[k].tensors[i];
        const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
        if (!still(impl, seen[j])) return false;
        for (const int64_t size : impl->sizes()) {
          if (size != *shape++) return false;
        }
        for (const int64_t stride : impl->strides()) {
          if (stride != *shape++) return false;
        }
      }
    }
    return true;
  }

  void keep(const char* call_op, const std::array<ListArg, K>& lists, std::shared_ptr<const Gathered<K>> call) {
    op = call_op;
    n = lists[0].tensors.size();
    seen.clear();
    shapes.clear();
    for (const ListArg& l : lists) {
      for (const at::Tensor& t : l.tensors) {
        seen.push_back(seen_of(t));
        shapes.insert(shapes.end(), t.sizes().begin(), t.sizes().end());
        shapes.insert(shapes.end(), t.strides().begin(), t.strides().end());
      }
    }
    gathered = std::move(call);
  }
};

// This thread's last few launch plans per list count (a manager's update, its buffers' copy, a
// second manager...), replaced in turn.
template <size_t K>
struct LaunchPlans {
  static constexpr size_t kKept = 4;
  std::array<LaunchPlan<K>, kKept> plans;
  size_t next = 0;

  static LaunchPlans& of_this_thread() {
    thread_local LaunchPlans cache;
    return cache;
  }
};

// Checks every tensor of a call and gathers what the kernels need (gather_checked), or takes both
// from a launch plan of an earlier call of this thread whose tensors are all unchanged (shared, not
// copied: a plan of 1,000 tensors holds 1,000 pointer rows). A call of empty lists keeps nothing.
template <size_t K>
std::shared_ptr<const Gathered<K>> gather(const char* op, const std::array<ListArg, K>& lists) {
  LaunchPlans<K>& cache = LaunchPlans<K>::of_this_thread();
  for (const LaunchPlan<K>& plan : cache.plans) {
    if (plan.n != 0 && plan.holds(op, lists)) return plan.gathered;
  }
  auto out = std::make_shared<const Gathered<K>>(gather_checked(op, lists));
  if (out->contiguous_copies.empty() && !lists[0].tensors.empty()) {
    cache.plans[cache.next].keep(op, lists, out);
    cache.next = (cache.next + 1) % LaunchPlans<K>::kKept;
  }
  return out;
}

// The weight: a 0-dim floating tensor on the destination's device or on the CPU. Returned as the
// kernels read it: a CPU weight as it is (read once on the host), a device weight as float32 or
// float64 (converted on the device, so the host does not wait).
inline at::Tensor checked_weight(const char* op, const at::Tensor& weight, at::Device device) {
  TORCH_CHECK_VALUE(weight.dim() == 0, "swa_fast.", op, ": `weight` must be a 0-dim tensor, got shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(weight.scalar_type()), "swa_fast.", op,
                    ": `weight` must be a floating-point tensor, got ", dtype_name(weight.scalar_type()));
  TORCH_CHECK_VALUE(weight.device() == device || weight.device().is_cpu(), "swa_fast.", op,
                    ": `weight` is on ", weight.device(), " but the tensors are on ", device,
                    "; pass it on ", device, " (or on the CPU)");
  const bool readable = weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble;
  if (weight.device().is_cpu() || (readable && !weight.is_neg())) return weight;
  return weight.to(at::kFloat).resolve_neg();
}

}  // namespace swa_fast
