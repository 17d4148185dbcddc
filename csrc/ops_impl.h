// The ops, written once over a device runner: `Run::run(group, functor)` applies the functor
// to every element of the tensors of one dtype group (csrc/cpu, csrc/cuda).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "functors.h"
#include "multi_tensor.h"

namespace swa_fast {

// --- stochastic rounding: the `rounding` argument of lerp_, moments_ and multi_lerp_ ----------------

// Written lists one call may number (rounding.py: MAX_STREAMS): the stream goes in the top byte of
// Philox's counter.
constexpr int64_t kMaxStreams = 256;

// A call's `rounding`, read: the seed, the step, the stream of its first written list, and each
// index's first element in the flat average.
struct RoundingArg {
  int64_t seed = 0, step = 0, stream = 0;
  std::vector<int64_t> firsts;
};

// `rounding` (None: to nearest) checked as rounding.py's check_rounding checks it, word for word, for
// a call of `count` indices that writes `written_lists` lists; checked after the lists and the
// weight, as checks.check_call does, so that a bad call writes nothing. Its values are read on every
// call (the step changes at each), never kept with a launch plan.
inline std::optional<RoundingArg> checked_rounding(const char* op, const std::optional<at::Tensor>& rounding,
                                                   size_t count, int64_t written_lists) {
  if (!rounding.has_value() || !rounding->defined()) return std::nullopt;
  const at::Tensor& t = *rounding;
  TORCH_CHECK_VALUE(t.scalar_type() == at::kLong && t.device().is_cpu(), "swa_fast.", op,
                    ": `rounding` must be an int64 tensor on the CPU, got ", dtype_name(t.scalar_type()), " on ",
                    t.device());
  const int64_t expected = 3 + static_cast<int64_t>(count);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == expected, "swa_fast.", op,
                    ": `rounding` must be a 1-D tensor of ", expected,
                    " elements (seed, step, stream, then the first element index of each of the ", count,
                    " tensors), got shape ", t.sizes());
  const at::Tensor values = t.is_neg() ? t.resolve_neg() : t;
  const int64_t* v = values.const_data_ptr<int64_t>();
  const int64_t stride = values.stride(0);
  RoundingArg out;
  out.seed = v[0];
  out.step = v[stride];
  out.stream = v[2 * stride];
  TORCH_CHECK_VALUE(out.step >= 0, "swa_fast.", op, ": `rounding` holds step ", out.step,
                    "; expected a step of at least 0");
  TORCH_CHECK_VALUE(out.stream >= 0 && out.stream <= kMaxStreams - written_lists, "swa_fast.", op,
                    ": `rounding` holds stream ", out.stream, "; expected 0 to ", kMaxStreams - written_lists,
                    " for a call that writes ", written_lists, " lists");
  out.firsts.resize(count);
  for (size_t i = 0; i < count; ++i) {
    out.firsts[i] = v[(3 + static_cast<int64_t>(i)) * stride];
    TORCH_CHECK_VALUE(out.firsts[i] >= 0, "swa_fast.", op, ": `rounding` holds ", out.firsts[i],
                      " as the first element index of tensor ", i, "; expected at least 0");
  }
  return out;
}

// --- stats: what the pass saw of each written list (swa_fast/ops/pass_stats.py) -------------------------

// `stats` (None: nothing counted) checked as pass_stats.py's check_stats checks it, word for word,
// for a call that writes `written_lists` lists on `device` (none: a call with no tensors); checked
// after `rounding`, so that a bad call writes nothing, the averages and `stats` alike.
inline std::optional<at::Tensor> checked_stats(const char* op, const std::optional<at::Tensor>& stats,
                                               int64_t written_lists, std::optional<at::Device> device) {
  if (!stats.has_value() || !stats->defined()) return std::nullopt;
  const at::Tensor& t = *stats;
  TORCH_CHECK_VALUE(t.scalar_type() == at::kLong && (!device.has_value() || t.device() == *device), "swa_fast.", op,
                    ": `stats` must be an int64 tensor on ",
                    device.has_value() ? c10::str(*device) : std::string("the lists' device"), ", got ",
                    dtype_name(t.scalar_type()), " on ", t.device());
  const bool shaped = t.dim() == 2 && t.size(0) == written_lists && t.size(1) == 4;
  TORCH_CHECK_VALUE(shaped && t.is_contiguous(), "swa_fast.", op, ": `stats` must be a contiguous tensor of shape [",
                    written_lists, ", 4] (one row per written list), got shape ", t.sizes(),
                    t.is_contiguous() ? "" : " (not contiguous)");
  return t;
}

// The rows of a checked `stats` that a functor's S written lists add to: slot s writes the call's
// written list slots[s].
template <int S>
StatsRows<S> stats_rows(const at::Tensor& stats, const std::array<int, S>& slots) {
  StatsRows<S> out;
  for (int s = 0; s < S; ++s) out.row[s] = stats.data_ptr<int64_t>() + 4 * static_cast<int64_t>(slots[s]);
  return out;
}

// What a runner needs to round a dtype group's S written lists stochastically: the key (seed, step,
// each written list's stream) and each tensor's first element in the flat average.
template <int S>
struct Rounding {
  RoundingKey<S> key;
  std::vector<int64_t> firsts;  // per tensor of the group, in its order
};

// `group`'s Rounding; slot s of the functor writes the call's written list slots[s] (its stream:
// the call's stream + slots[s]).
template <int S, size_t N>
Rounding<S> rounding_of(const RoundingArg& arg, const DtypeGroup<N>& group, const std::array<int, S>& slots) {
  Rounding<S> out;
  const auto seed = static_cast<uint64_t>(arg.seed);  // a negative seed: its two's complement bits
  const auto step = static_cast<uint64_t>(arg.step);
  out.key.seed_lo = static_cast<uint32_t>(seed);
  out.key.seed_hi = static_cast<uint32_t>(seed >> 32);
  out.key.step_lo = static_cast<uint32_t>(step);
  out.key.step_hi = static_cast<uint32_t>(step >> 32);
  for (int s = 0; s < S; ++s) out.key.stream_hi[s] = static_cast<uint32_t>(arg.stream + slots[s]) << 24;
  out.firsts.reserve(group.index.size());
  for (const uint32_t i : group.index) out.firsts.push_back(arg.firsts[i]);
  return out;
}

// Runs f over `group`, its bf16 and fp16 written lists rounded stochastically where the call asks
// for it (slots: as rounding_of's); otherwise to nearest, by the very kernels of a call without
// `rounding`. With `stats` (checked), each written list's counts are added to its row (slot s: the
// call's written list slots[s]) by the runner's counting kernels, Run::run(group, device, f,
// rounding or NoRounding, rows); a call without it runs the kernels it always ran.
template <class Run, typename D, typename F, size_t N>
void run_rounding(const DtypeGroup<N>& group, at::Device device, const F& f, const std::optional<RoundingArg>& sr,
                  const std::array<int, F::kRoundedLists>& slots, const std::optional<at::Tensor>& stats) {
  constexpr int S = F::kRoundedLists;
  if constexpr (kRoundsStochastically<D>) {
    if (sr.has_value()) {
      if (stats.has_value()) {
        return Run::run(group, device, f, rounding_of<S>(*sr, group, slots), stats_rows<S>(*stats, slots));
      }
      return Run::run(group, device, f, rounding_of<S>(*sr, group, slots));
    }
  }
  if (stats.has_value()) return Run::run(group, device, f, NoRounding{}, stats_rows<S>(*stats, slots));
  Run::run(group, device, f);
}

template <class Run>
void lerp_impl(at::TensorList avg, at::TensorList src, const at::Tensor& weight,
               const std::optional<at::Tensor>& rounding, const std::optional<at::Tensor>& stats) {
  const auto call = gather<2>("lerp_", {{{"avg", avg, true}, {"src", src, false}}});
  if (avg.empty()) {
    checked_rounding("lerp_", rounding, 0, 1);
    checked_stats("lerp_", stats, 1, std::nullopt);
    return;
  }
  const at::Tensor w = checked_weight("lerp_", weight, call->device);
  const auto sr = checked_rounding("lerp_", rounding, avg.size(), 1);
  const auto counts = checked_stats("lerp_", stats, 1, call->device);
  for (const auto& group : call->groups) {
    visit_float(group.dtypes[0], [&](auto d) {
      visit_float(group.dtypes[1], [&](auto s) {
        using F = Lerp<decltype(d), decltype(s)>;
        run_rounding<Run, decltype(d)>(group, call->device, F{Weight<typename F::A>::from(w, call->device)}, sr,
                                       {0}, counts);
      });
    });
  }
}

template <class Run>
void moments_impl(at::TensorList mean, at::TensorList sq, at::TensorList src, const at::Tensor& weight,
                  const std::optional<at::Tensor>& rounding, const std::optional<at::Tensor>& stats) {
  const auto call =
      gather<3>("moments_", {{{"mean", mean, true}, {"sq", sq, true, /*same_dtype=*/true}, {"src", src, false}}});
  if (mean.empty()) {
    checked_rounding("moments_", rounding, 0, 2);
    checked_stats("moments_", stats, 2, std::nullopt);
    return;
  }
  const at::Tensor w = checked_weight("moments_", weight, call->device);
  const auto sr = checked_rounding("moments_", rounding, mean.size(), 2);
  const auto counts = checked_stats("moments_", stats, 2, call->device);
  for (const auto& group : call->groups) {
    visit_float(group.dtypes[0], [&](auto d) {
      visit_float(group.dtypes[2], [&](auto s) {
        using F = Moments<decltype(d), decltype(s)>;
        run_rounding<Run, decltype(d)>(group, call->device, F{Weight<typename F::A>::from(w, call->device)}, sr,
                                       {0, 1}, counts);
      });
    });
  }
}

template <class Run>
void copy_impl(at::TensorList dst, at::TensorList src) {
  const auto call = gather<2>("copy_", {{{"dst", dst, true, false, /*integers=*/true},
                                         {"src", src, false, false, /*integers=*/true}}});
  for (const auto& group : call->groups) {
    if (!is_supported_float(group.dtypes[0])) {  // integers, bool: one dtype, its bits as they are
      visit_bits(c10::elementSize(group.dtypes[0]), [&](auto t) { Run::run(group, call->device, Move<decltype(t)>{}); });
      continue;
    }
    visit_float(group.dtypes[0], [&](auto d) {
      visit_float(group.dtypes[1], [&](auto s) { Run::run(group, call->device, Copy<decltype(d), decltype(s)>{}); });
    });
  }
}

template <class Run>
void swap_impl(at::TensorList a, at::TensorList b) {
  const auto call = gather<2>("swap_", {{{"a", a, true}, {"b", b, true, /*same_dtype=*/true}}});
  for (const auto& group : call->groups) {
    visit_float(group.dtypes[0], [&](auto t) { Run::run(group, call->device, Swap<decltype(t)>{}); });
  }
}

// --- multi_lerp_: K averages of one source --------------------------------------------------------

// Averages one pass of the kernels updates: the functor keeps K averages' registers per element.
constexpr int64_t kMaxAveragesPerPass = 4;

// A vector of weights' dtype and shape (`meaning`: what each element is), checked before the lists.
// Returns its length.
inline int64_t checked_weight_vector(const char* op, const at::Tensor& weights, const char* meaning) {
  TORCH_CHECK_VALUE(at::isFloatingType(weights.scalar_type()), "swa_fast.", op,
                    ": `weights` must be a floating-point tensor, got ", dtype_name(weights.scalar_type()));
  TORCH_CHECK_VALUE(weights.dim() == 1, "swa_fast.", op, ": `weights` must be a 1-D tensor (", meaning,
                    "), got shape ", weights.sizes());
  return weights.size(0);
}

// multi_lerp_'s weights, checked before the lists, which their count splits. Returns K.
inline int64_t checked_weight_count(const at::Tensor& weights) {
  const int64_t k = checked_weight_vector("multi_lerp_", weights, "one weight per average");
  TORCH_CHECK_VALUE(k >= 1 && k <= kMaxAveragesPerPass, "swa_fast.multi_lerp_: `weights` has ", k,
                    " elements; the op updates 1 to ", kMaxAveragesPerPass,
                    " averages per call (swa_fast.multi_lerp_ splits more into several calls)");
  return k;
}

// The weights as the kernels read them: on the CPU as contiguous float64 (read on the host), on the
// device as float32 or float64 (read by the kernel: no host synchronisation).
inline at::Tensor checked_weights(const char* op, const at::Tensor& weights, at::Device device) {
  TORCH_CHECK_VALUE(weights.device() == device || weights.device().is_cpu(), "swa_fast.", op, ": `weights` is on ",
                    weights.device(), " but the tensors are on ", device, "; pass them on ", device,
                    " (or on the CPU)");
  if (weights.device().is_cpu()) {
    const bool readable = weights.scalar_type() == at::kDouble && !weights.is_neg();
    return readable ? weights : weights.resolve_neg().to(at::kDouble);
  }
  const bool readable = (weights.scalar_type() == at::kFloat || weights.scalar_type() == at::kDouble) &&
                        !weights.is_neg();
  return readable ? weights : weights.to(at::kFloat).resolve_neg();
}

// Element k of checked_weights' result, as the functors read a weight.
template <typename A>
Weight<A> weight_element(const at::Tensor& weights, int64_t k) {
  Weight<A> out;
  if (weights.device().is_cpu()) {
    out.value = static_cast<A>(weights.const_data_ptr<double>()[k * weights.stride(0)]);
  } else {
    out.device_ptr = static_cast<const char*>(weights.const_data_ptr()) + k * weights.stride(0) * weights.element_size();
    out.is_double = weights.scalar_type() == at::kDouble;
  }
  return out;
}

// Whether a runner's weights are always read on the host (Run::kHostWeightsOnly: the CPU's, whose
// tensors live there); its multi_lerp_ passes then leave out the averages of weight 0 up front.
template <class Run>
constexpr bool host_weights_only() {
  if constexpr (requires { Run::kHostWeightsOnly; }) {
    return Run::kHostWeightsOnly;
  } else {
    return false;
  }
}

// Whether weight k is known on the host to be 0 in the arithmetic dtype of averages of `dtype`.
inline bool host_zero(const at::Tensor& weights, int k, at::ScalarType dtype) {
  if (!weights.device().is_cpu()) return false;
  const double value = weights.const_data_ptr<double>()[k * weights.stride(0)];
  return dtype == at::kDouble ? value == 0 : static_cast<float>(value) == 0.0f;
}

// One pass over the averages `averages` (indices into p) of `group`'s tensors `members` (null:
// all), with the source last in p.
template <class Run, int K, size_t N>
void run_multi_lerp(const DtypeGroup<N>& group, at::Device device, const at::Tensor& w,
                    const std::array<int, K>& averages, const std::vector<size_t>* members,
                    const std::optional<RoundingArg>& sr, const std::optional<at::Tensor>& stats) {
  std::array<at::ScalarType, K + 1> dtypes;
  for (int k = 0; k < K; ++k) dtypes[k] = group.dtypes[averages[k]];
  dtypes[K] = group.dtypes[N - 1];
  visit_float(dtypes[0], [&](auto d) {
    visit_float(dtypes[K], [&](auto s) {
      using F = MultiLerp<K, decltype(d), decltype(s), !host_weights_only<Run>()>;
      F f{};
      for (int k = 0; k < K; ++k) f.weight[k] = weight_element<typename F::A>(w, averages[k]);
      if constexpr (K + 1 == N) {
        if (members == nullptr) {  // every average of the whole group: the group as it is
          run_rounding<Run, decltype(d)>(group, device, f, sr, averages, stats);
          return;
        }
      }
      DtypeGroup<K + 1> part{dtypes, {}, {}, {}};
      const size_t n = members != nullptr ? members->size() : group.numels.size();
      for (size_t m = 0; m < n; ++m) {
        const size_t j = members != nullptr ? (*members)[m] : m;
        auto& ptrs = part.ptrs.emplace_back();
        for (int k = 0; k < K; ++k) ptrs[k] = group.ptrs[j][averages[k]];
        ptrs[K] = group.ptrs[j][N - 1];
        part.numels.push_back(group.numels[j]);
        part.index.push_back(group.index[j]);
      }
      if (!part.numels.empty()) run_rounding<Run, decltype(d)>(part, device, f, sr, averages, stats);
    });
  });
}

// One pass over the first `count` of `averages` (K, K - 1, ... 1 of them).
template <class Run, int K, size_t N>
void run_first(const DtypeGroup<N>& group, at::Device device, const at::Tensor& w,
               const std::array<int, N - 1>& averages, int count, const std::optional<RoundingArg>& sr,
               const std::optional<at::Tensor>& stats) {
  if constexpr (K >= 1) {
    if (count < K) return run_first<Run, K - 1>(group, device, w, averages, count, sr, stats);
    std::array<int, K> first;
    std::copy_n(averages.begin(), K, first.begin());
    run_multi_lerp<Run, K>(group, device, w, first, nullptr, sr, stats);
  }
}

template <class Run, int K>
void multi_lerp_passes(at::TensorList avgs, at::TensorList src, const at::Tensor& weights,
                       const std::optional<at::Tensor>& rounding, const std::optional<at::Tensor>& stats) {
  static const char* const names[] = {"avgs[0]", "avgs[1]", "avgs[2]", "avgs[3]"};
  static_assert(K <= std::size(names));
  const size_t n = avgs.size() / K;
  std::array<ListArg, K + 1> lists;
  for (int k = 0; k < K; ++k) lists[k] = {names[k], avgs.slice(k * n, n), true};
  lists[K] = {"src", src, false};
  const auto call = gather<K + 1>("multi_lerp_", lists);
  if (n == 0) {
    checked_rounding("multi_lerp_", rounding, 0, K);
    checked_stats("multi_lerp_", stats, K, std::nullopt);
    return;
  }
  const at::Tensor w = checked_weights("multi_lerp_", weights, call->device);
  // (average k of the call: stream `stream` + k, and row k of `stats`, whichever pass writes it)
  const auto sr = checked_rounding("multi_lerp_", rounding, n, K);
  const auto counts = checked_stats("multi_lerp_", stats, K, call->device);
  for (const auto& group : call->groups) {
    bool one_dtype = true;
    for (int k = 1; k < K; ++k) one_dtype &= group.dtypes[k] == group.dtypes[0];
    if (one_dtype) {  // the usual call: all K averages in one pass
      // bar those of a host weight 0: they are not written, and the CPU loop with a conditional
      // store would not vectorise
      std::array<int, K> written;
      int count = 0;
      for (int k = 0; k < K; ++k) {
        if (!host_zero(w, k, group.dtypes[0])) written[count++] = k;
      }
      run_first<Run, K>(group, call->device, w, written, count, sr, counts);
      continue;
    }
    // Averages of different dtypes at one index: one pass per average. A source that is its own
    // destination (average k's) is read by every pass, and its pass can change it (lerp of inf
    // with itself is NaN): at those tensors the other averages' passes run first, average k's last.
    std::vector<size_t> apart;
    std::array<std::vector<size_t>, K> reading, own;  // per k: tensors whose source is another
                                                      // average, tensors whose source is average k
    for (size_t j = 0; j < group.numels.size(); ++j) {
      int own_k = -1;  // (two averages cannot share memory: at most one)
      for (int k = 0; k < K; ++k) own_k = group.ptrs[j][k] == group.ptrs[j][K] ? k : own_k;
      if (own_k < 0) {
        apart.push_back(j);
        continue;
      }
      own[own_k].push_back(j);
      for (int k = 0; k < K; ++k) {
        if (k != own_k) reading[k].push_back(j);
      }
    }
    for (int k = 0; k < K; ++k) run_multi_lerp<Run, 1>(group, call->device, w, {k}, &apart, sr, counts);
    for (int k = 0; k < K; ++k) run_multi_lerp<Run, 1>(group, call->device, w, {k}, &reading[k], sr, counts);
    for (int k = 0; k < K; ++k) run_multi_lerp<Run, 1>(group, call->device, w, {k}, &own[k], sr, counts);
  }
}

// avgs: the K lists of averages concatenated (avgs[k * len(src) + i]), K = len(weights).
template <class Run>
void multi_lerp_impl(at::TensorList avgs, at::TensorList src, const at::Tensor& weights,
                     const std::optional<at::Tensor>& rounding, const std::optional<at::Tensor>& stats) {
  const int64_t k = checked_weight_count(weights);
  TORCH_CHECK_VALUE(avgs.size() % k == 0, "swa_fast.multi_lerp_: `avgs` has ", avgs.size(),
                    " tensors, which is not a multiple of the ", k,
                    " weights; expected one list of averages per weight, concatenated");
  switch (k) {
    case 1: return multi_lerp_passes<Run, 1>(avgs, src, weights, rounding, stats);
    case 2: return multi_lerp_passes<Run, 2>(avgs, src, weights, rounding, stats);
    case 3: return multi_lerp_passes<Run, 3>(avgs, src, weights, rounding, stats);
    default: return multi_lerp_passes<Run, 4>(avgs, src, weights, rounding, stats);
  }
}

// --- bema_: an EMA and its bias correction ---------------------------------------------------------

// weights: (the EMA's weight, the correction's scale).
template <class Run>
void bema_impl(at::TensorList ema, at::TensorList out, at::TensorList start, at::TensorList src,
               const at::Tensor& weights) {
  const int64_t count = checked_weight_vector("bema_", weights, "ema_weight, correction");
  TORCH_CHECK_VALUE(count == 2, "swa_fast.bema_: `weights` has ", count, " elements; expected 2 (ema_weight, correction)");
  const auto call = gather<4>("bema_", {{{"ema", ema, true},
                                         {"out", out, true, /*same_dtype=*/true},
                                         {"start", start, false, /*same_dtype=*/true},
                                         {"src", src, false}}});
  if (ema.empty()) return;
  const at::Tensor w = checked_weights("bema_", weights, call->device);
  for (const auto& group : call->groups) {
    const bool may_be_zero = !w.device().is_cpu() || host_zero(w, 0, group.dtypes[0]);
    visit_float(group.dtypes[0], [&](auto d) {
      visit_float(group.dtypes[3], [&](auto s) {
        const auto run = [&](auto keeps_at_zero) {
          using F = Bema<decltype(d), decltype(s), decltype(keeps_at_zero)::value>;
          F f{};
          f.weight = weight_element<typename F::A>(w, 0);
          f.correction = weight_element<typename F::A>(w, 1);
          Run::run(group, call->device, f);
        };
        if constexpr (std::is_same_v<decltype(d), double>) {
          // fp64 averages always take the select: without it, nvcc for sm_100 spilled the fp64 EMA of
          // a bf16 model to local memory (tests/test_machine_code.py), and their `out` is not what
          // the 128-bit path is for
          run(std::true_type{});
        } else {
          may_be_zero ? run(std::true_type{}) : run(std::false_type{});
        }
      });
    });
  }
}

// --- weighted_sum_: dst = sum_k weights[k] * srcs[k] ------------------------------------------------

// weighted_sum_'s weights, checked before the lists, which their count splits. Returns K.
inline int64_t checked_source_count(const at::Tensor& weights) {
  const int64_t k = checked_weight_vector("weighted_sum_", weights, "one weight per list of sources");
  TORCH_CHECK_VALUE(k >= 1 && k <= kMaxSourcesPerPass, "swa_fast.weighted_sum_: `weights` has ", k,
                    " elements; the op sums 1 to ", kMaxSourcesPerPass,
                    " lists of sources per call (swa_fast.weighted_sum_ splits more into several calls)");
  return k;
}

// One pass over every dtype group of a call of K lists of sources. The arithmetic dtype of a group is
// fp64 when dst or any of its sources is, else fp32.
template <class Run, int K>
void weighted_sum_passes(at::TensorList dst, at::TensorList srcs, const at::Tensor& weights) {
  static const char* const names[] = {"srcs[0]", "srcs[1]", "srcs[2]", "srcs[3]",
                                      "srcs[4]", "srcs[5]", "srcs[6]", "srcs[7]"};
  static_assert(K <= std::size(names) && K <= kMaxSourcesPerPass);
  const size_t n = dst.size();
  std::array<ListArg, K + 1> lists;
  lists[0] = {"dst", dst, true};
  for (int k = 0; k < K; ++k) lists[k + 1] = {names[k], srcs.slice(k * n, n), false};
  const auto call = gather<K + 1>("weighted_sum_", lists);
  if (n == 0) return;
  const at::Tensor w = checked_weights("weighted_sum_", weights, call->device);
  for (const auto& group : call->groups) {
    bool wide = false;
    for (const at::ScalarType t : group.dtypes) wide |= t == at::kDouble;
    visit_float(group.dtypes[0], [&](auto d) {
      using D = decltype(d);
      const auto run = [&](auto a) {
        using A = decltype(a);
        WeightedSum<D, A> f{};
        f.count = K;
        for (int k = 0; k < K; ++k) {
          f.dtypes[k] = group.dtypes[k + 1];
          f.bytes[k] = static_cast<int>(c10::elementSize(group.dtypes[k + 1]));
          f.weight[k] = weight_element<A>(w, k);
        }
        Run::run(group, call->device, f);
      };
      if constexpr (std::is_same_v<D, double>) {
        run(double{});
      } else {
        wide ? run(double{}) : run(float{});
      }
    });
  }
}

// srcs: the K lists of sources concatenated (srcs[k * len(dst) + i]), K = len(weights).
template <class Run>
void weighted_sum_impl(at::TensorList dst, at::TensorList srcs, const at::Tensor& weights) {
  const int64_t k = checked_source_count(weights);
  const size_t n = dst.size();
  TORCH_CHECK_VALUE(srcs.size() == static_cast<size_t>(k) * n, "swa_fast.weighted_sum_: `srcs` has ", srcs.size(),
                    " tensors but `dst` has ", n, "; expected ", k, " lists of ", n,
                    " (one per weight), concatenated: the lists must have equal lengths");
  switch (k) {
    case 1: return weighted_sum_passes<Run, 1>(dst, srcs, weights);
    case 2: return weighted_sum_passes<Run, 2>(dst, srcs, weights);
    case 3: return weighted_sum_passes<Run, 3>(dst, srcs, weights);
    case 4: return weighted_sum_passes<Run, 4>(dst, srcs, weights);
    case 5: return weighted_sum_passes<Run, 5>(dst, srcs, weights);
    case 6: return weighted_sum_passes<Run, 6>(dst, srcs, weights);
    case 7: return weighted_sum_passes<Run, 7>(dst, srcs, weights);
    default: return weighted_sum_passes<Run, 8>(dst, srcs, weights);
  }
}

// Every op's body over the runner `Run`, registered for one device (csrc/cpu, csrc/cuda: inside
// their TORCH_LIBRARY_IMPL), so that an op listed here runs on each device the build has.
template <class Run>
void register_ops(torch::Library& m) {
  m.impl("lerp_", &lerp_impl<Run>);
  m.impl("moments_", &moments_impl<Run>);
  m.impl("multi_lerp_", &multi_lerp_impl<Run>);
  m.impl("bema_", &bema_impl<Run>);
  m.impl("weighted_sum_", &weighted_sum_impl<Run>);
  m.impl("copy_", &copy_impl<Run>);
  m.impl("swap_", &swap_impl<Run>);
}

}  // namespace swa_fast
