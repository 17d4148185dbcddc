// CPU kernels: the tensors of one dtype group are cut into (tensor, chunk) work items that one
// parallel region (OpenMP through at::parallel_for) shares out; each item is a plain loop that the
// compiler vectorises, converting bf16/fp16 in registers.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../ops_impl.h"

namespace swa_fast {
namespace {

// Elements per work item: large enough to amortise scheduling, small enough to balance 2+ threads.
constexpr int64_t kChunk = 1 << 16;
// Below this many elements in total (a few MB, cache-resident), waking the pool's other threads
// costs more than they save: measured ~1 ms on a 2-core VM when the pool had gone to sleep.
constexpr int64_t kSerialBelow = 1 << 19;

struct Item {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// x86-64-v3 (AVX2, FMA, F16C) clone next to the baseline one, picked at load time by the CPU: the
// bf16/fp16 conversions vectorise four times wider than with SSE2 alone.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SWA_FAST_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define SWA_FAST_CPU_CLONES
#endif

template <typename F>
SWA_FAST_CPU_CLONES void run_item(F f, void* const* ptrs, int64_t begin, int64_t end) {
  f.resolve();
  if (f.skip()) return;
  for (int64_t i = begin; i < end; ++i) f.store(ptrs, i, f.load(ptrs, i));
}

struct CpuRun {
  template <size_t K, typename F>
  static void run(const DtypeGroup<K>& group, at::Device, F f) {
    static_assert(F::kLists == K, "functor and list count disagree");
    const std::vector<int64_t>& numels = group.numels;
    int64_t total = 0;
    for (const int64_t n : numels) total += n;
    if (total < kSerialBelow) {  // straight through, with no work list to build
      for (size_t j = 0; j < numels.size(); ++j) run_item(f, group.ptrs[j].data(), 0, numels[j]);
      return;
    }
    std::vector<Item> items;
    for (size_t j = 0; j < numels.size(); ++j) {
      for (int64_t b = 0; b < numels[j]; b += kChunk) {
        items.push_back({static_cast<int64_t>(j), b, std::min(numels[j], b + kChunk)});
      }
    }
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t first, int64_t last) {
      for (int64_t it = first; it < last; ++it) {
        const Item& item = items[it];
        run_item(f, group.ptrs[item.tensor].data(), item.begin, item.end);
      }
    });
  }
};

void lerp_cpu(at::TensorList avg, at::TensorList src, const at::Tensor& weight) {
  lerp_impl<CpuRun>(avg, src, weight);
}
void moments_cpu(at::TensorList mean, at::TensorList sq, at::TensorList src, const at::Tensor& weight) {
  moments_impl<CpuRun>(mean, sq, src, weight);
}
void copy_cpu(at::TensorList dst, at::TensorList src) { copy_impl<CpuRun>(dst, src); }
void swap_cpu(at::TensorList a, at::TensorList b) { swap_impl<CpuRun>(a, b); }

}  // namespace

TORCH_LIBRARY_IMPL(swa_fast, CPU, m) {
  m.impl("lerp_", &lerp_cpu);
  m.impl("moments_", &moments_cpu);
  m.impl("copy_", &copy_cpu);
  m.impl("swap_", &swap_cpu);
}

}  // namespace swa_fast
