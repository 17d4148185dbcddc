// CPU kernels: the tensors of one dtype group are cut into (tensor, chunk) work items that one
// parallel region (OpenMP through at::parallel_for) shares out; each item is a plain loop that the
// compiler vectorises, converting bf16/fp16 in registers.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../ops_impl.h"
#include "philox_blocks.h"

namespace swa_fast {
namespace {

// Elements per work item: large enough to amortise scheduling, small enough to balance 2+ threads.
constexpr int64_t kChunk = 1 << 16;
// Below this many elements in total (a few MB, cache-resident), waking the pool's other threads
// costs more than they save when the pool has gone to sleep (docs/benchmarks.md).
constexpr int64_t kSerialBelow = 1 << 19;

struct Item {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// x86-64-v4 (AVX-512) and x86-64-v3 (AVX2, FMA, F16C) clones next to the baseline one, picked at
// load time by the CPU: the bf16/fp16 conversions vectorise four times wider than with SSE2 alone,
// and AVX-512's masks and compares into them make the rounding and counting loops shorter still
// (docs/benchmarks.md). The clones store the same bits: their only fused multiply-adds are the
// explicit ones (functors.h; -ffp-contract=off).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SWA_FAST_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SWA_FAST_CPU_CLONES
#endif

// A work item's counts added to the call's `stats` rows, once per item: integer atomics, so that the
// totals do not depend on how the items were shared out among the threads.
template <int S>
void add_tally(const Tally<S>& tally, const StatsRows<S>& rows) {
  for (int s = 0; s < S; ++s) {
    if (tally.written[s] == 0) continue;
    int64_t* row = rows.row[s];
    std::atomic_ref<int64_t>(row[0]).fetch_add(tally.written[s], std::memory_order_relaxed);
    std::atomic_ref<int64_t>(row[1]).fetch_add(tally.unchanged[s], std::memory_order_relaxed);
    std::atomic_ref<int64_t>(row[2]).fetch_add(tally.non_finite[s], std::memory_order_relaxed);
    std::atomic_ref<int64_t> largest(row[3]);
    const int64_t seen = tally.max_update[s];
    int64_t held = largest.load(std::memory_order_relaxed);
    while (held < seen && !largest.compare_exchange_weak(held, seen, std::memory_order_relaxed)) {
    }
  }
}

// The element loop of a work item, each write through `put` (inlined into its caller, whose local
// values it must see as constants: a call would keep the counts in memory and the loop scalar).
template <typename F, typename Put>
C10_ALWAYS_INLINE void store_loop(const F& f, void* const* ptrs, int64_t begin, int64_t end, const Put& put) {
  if (f.weight_one()) {
    for (int64_t i = begin; i < end; ++i) f.store(ptrs, i, f.load(ptrs, i), put);
  } else {
    for (int64_t i = begin; i < end; ++i) f.template store<false>(ptrs, i, f.load(ptrs, i), put);
  }
}

// Asks for the cache lines of elements [from, to) of every list of F: the next block's, so that memory
// works on them while this block's compute runs (docs/benchmarks.md).
template <typename F>
C10_ALWAYS_INLINE void prefetch_elements(void* const* ptrs, int64_t from, int64_t to) {
  for (int k = 0; k < F::kLists; ++k) {
    const int64_t bytes = F::Lists::bytes(k);
    const char* p = static_cast<const char*>(ptrs[k]);
    for (int64_t at = from * bytes; at < to * bytes; at += 64) __builtin_prefetch(p + at, 1);
  }
}

// Elements a loop takes at a time where it prefetches the next block's.
constexpr int64_t kPrefetchBlock = 512;

// Count: NoStats, or the StatsRows of a call with `stats`, whose loop counts each write in this
// item's Tally (Counting) and adds it to them at the end.
template <typename F, typename Count = NoStats>
SWA_FAST_CPU_CLONES void run_item(F f, void* const* ptrs, int64_t begin, int64_t end, Count count = {}) {
  f.resolve();
  if (f.skip()) return;
  constexpr bool kCounts = !std::is_same_v<Count, NoStats>;
  [[maybe_unused]] TallyFor<Count> tally;
  for (int64_t b = begin; b < end; b += kPrefetchBlock) {
    const int64_t e = std::min(end, b + kPrefetchBlock);
    prefetch_elements<F>(ptrs, e, std::min(end, e + kPrefetchBlock));
    if constexpr (kCounts) {
      store_loop(f, ptrs, b, e, counted(Nearest{}, &tally));
    } else if (f.weight_one()) {  // the source as it is, through the select that ignores the destination
      for (int64_t i = b; i < e; ++i) f.store(ptrs, i, f.load(ptrs, i));
    } else {
      for (int64_t i = b; i < e; ++i) f.template store<false>(ptrs, i, f.load(ptrs, i));
    }
  }
  if constexpr (kCounts) add_tally(tally, count);
}

// Stochastic rounding: elements whose random bits are made at a time, into a buffer in L1, by
// philox_calls (SIMD across calls); then the element loop reads them. One Philox call serves 8
// elements of one written list.
constexpr int64_t kRoundBlock = 512;

// The random bits of the elements flat - (flat & 7) .. of stream s (groups Philox calls, 8 elements
// each), element flat - (flat & 7) + j's at bits[j]: call g's word w holds elements 8g + 2w (low
// half) and 8g + 2w + 1 (high half), the order of a little-endian machine's 16-bit halves.
template <int S>
C10_ALWAYS_INLINE void random_block(const RoundingKey<S>& key, int s, int64_t flat, int64_t groups,
                                    uint16_t* bits) {
  static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the halves' order is little-endian");
  philox_calls(key.stream(s), static_cast<uint64_t>(flat) >> 3, groups, reinterpret_cast<uint32_t*>(bits));
}

// run_item with the functor's S written lists rounded stochastically; `first`: the tensor's first
// element in the flat average; Count as run_item's.
template <typename F, int S, typename Count = NoStats>
SWA_FAST_CPU_CLONES void run_item_rounded(F f, const RoundingKey<S>& key, void* const* ptrs, int64_t begin,
                                          int64_t end, int64_t first, Count count = {}) {
  constexpr bool kCounts = !std::is_same_v<Count, NoStats>;
  f.resolve();
  if (f.skip()) return;
  [[maybe_unused]] TallyFor<Count> tally;
  alignas(64) uint16_t bits[S][kRoundBlock + 8];
  for (int64_t b = begin; b < end; b += kRoundBlock) {
    const int64_t n = std::min(end - b, kRoundBlock);
    const int64_t flat = first + b;
    const int64_t skew = flat & 7;
    prefetch_elements<F>(ptrs, b + n, std::min(end, b + n + kRoundBlock));
    for (int s = 0; s < S; ++s) random_block(key, s, flat, (skew + n + 7) >> 3, bits[s]);
    const auto put = [&](int64_t j) {
      Stochastic<S> out;
      for (int s = 0; s < S; ++s) out.r[s] = bits[s][skew + j];
      return counted(out, &tally);
    };
    if (f.weight_one()) {
      for (int64_t j = 0; j < n; ++j) f.store(ptrs, b + j, f.load(ptrs, b + j), put(j));
    } else {
      for (int64_t j = 0; j < n; ++j) f.template store<false>(ptrs, b + j, f.load(ptrs, b + j), put(j));
    }
  }
  if constexpr (kCounts) add_tally(tally, count);
}

// A copy between tensors of one dtype moves bytes as they are: kBytes per element (0: not one).
template <typename F>
struct PlainCopy {
  static constexpr int64_t kBytes = 0;
};
template <typename T>
struct PlainCopy<Copy<T, T>> {
  static constexpr int64_t kBytes = sizeof(T);
};
template <typename T>
struct PlainCopy<Move<T>> {
  static constexpr int64_t kBytes = sizeof(T);
};

// A copy of more than this many bytes does not fit in the caches: its destination is better
// written with non-temporal stores, which skip reading each line before overwriting it (a third
// of the traffic); below it, the destination would otherwise have stayed in cache (measured:
// docs/benchmarks.md).
constexpr int64_t kStreamAboveBytes = int64_t(32) << 20;

#if defined(__x86_64__)
// n bytes from src to dst, the aligned middle with 16-byte non-temporal stores (SSE2, in every
// x86-64 CPU; one core's stores saturate memory either way). The caller fences.
void stream_copy(char* dst, const char* src, size_t n) {
  const size_t head = std::min(n, (16 - reinterpret_cast<uintptr_t>(dst) % 16) % 16);
  std::memcpy(dst, src, head);
  dst += head;
  src += head;
  n -= head;
  const size_t body = n & ~size_t(63);
  for (size_t i = 0; i < body; i += 64) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 16));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 32));
    const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 48));
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), a);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 16), b);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 32), c);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 48), d);
  }
  std::memcpy(dst + body, src + body, n - body);
}

// A large pass whose functor writes some lists without reading them (bema_'s BEMA weights, a copy_
// that casts): those lists' values are computed into this thread's buffers in L1, a block at a time,
// then streamed to memory with non-temporal stores, which skip reading each line before
// overwriting it (bema_ from fp32: 20 bytes an element moved instead of 24).
constexpr int64_t kStreamBlock = 2048;

template <typename F>
void run_item_streamed(const F& f, void* const* ptrs, int64_t begin, int64_t end, unsigned streamed) {
  constexpr int K = F::kLists;
  alignas(64) thread_local char buffers[K][kStreamBlock * sizeof(double)];
  void* block[K];
  for (int64_t b = begin; b < end; b += kStreamBlock) {
    const int64_t n = std::min(end - b, kStreamBlock);
    for (int k = 0; k < K; ++k) {  // the block's elements from index 0, in memory or in a buffer
      block[k] = (streamed >> k & 1u) != 0 ? static_cast<void*>(buffers[k])
                                          : static_cast<void*>(static_cast<char*>(ptrs[k]) + b * F::Lists::bytes(k));
    }
    run_item(f, block, 0, n);
    for (int k = 0; k < K; ++k) {
      if ((streamed >> k & 1u) != 0) {
        stream_copy(static_cast<char*>(ptrs[k]) + b * F::Lists::bytes(k), buffers[k], n * F::Lists::bytes(k));
      }
    }
  }
}
#endif

// The (tensor, chunk) work items of a pass over tensors of these sizes.
std::vector<Item> work_items(const std::vector<int64_t>& numels) {
  std::vector<Item> items;
  for (size_t j = 0; j < numels.size(); ++j) {
    for (int64_t b = 0; b < numels[j]; b += kChunk) {
      items.push_back({static_cast<int64_t>(j), b, std::min(numels[j], b + kChunk)});
    }
  }
  return items;
}

// visit(tensor, begin, end) over every element of a group's tensors: each tensor whole below
// kSerialBelow elements in all (no work list to build), else its work items shared out by one
// parallel region.
template <size_t K, typename Visit>
void for_each_item(const DtypeGroup<K>& group, const Visit& visit) {
  const std::vector<int64_t>& numels = group.numels;
  int64_t total = 0;
  for (const int64_t n : numels) total += n;
  if (total < kSerialBelow) {
    for (size_t j = 0; j < numels.size(); ++j) visit(j, int64_t(0), numels[j]);
    return;
  }
  const std::vector<Item> items = work_items(numels);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t it = first; it < last; ++it) {
      visit(static_cast<size_t>(items[it].tensor), items[it].begin, items[it].end);
    }
  });
}

// Elements of weighted_sum_'s dst that a work item sums at a time: their accumulators (4 or 8 KB) stay
// in L1 while each source's part of the block is added to them.
constexpr int64_t kSumBlock = 1024;

template <typename S, bool kFirst, typename F>
C10_ALWAYS_INLINE void add_source_block(const F& f, typename F::A* acc, const void* src, int64_t first, int64_t n,
                                        int k) {
  for (int64_t j = 0; j < n; ++j) f.template add<S, kFirst>(acc[j], src, first + j, k);
}

// dst[begin, end) of one tensor of a weighted_sum_ pass (ptrs: dst, then the K sources), a block at
// a time: each source's part of the block added to the block's accumulators by a loop of that
// source's dtype (one dispatch per block and source: the loops vectorise), in the order of the
// sources; then the block rounded into dst, or with `streamed` into a buffer in L1 that is streamed
// to dst past the caches (dst is only written: two fp32 sources move 12 bytes an element, not 16).
template <typename F>
SWA_FAST_CPU_CLONES void run_sum_item(const F& f, void* const* ptrs, int64_t begin, int64_t end, bool streamed) {
  using A = typename F::A;
  using D = typename F::Dst;
  alignas(64) A acc[kSumBlock];
  alignas(64) D out[kSumBlock];
  for (int64_t b = begin; b < end; b += kSumBlock) {
    const int64_t n = std::min(end - b, kSumBlock);
    visit_source(f.dtypes[0], [&](auto s) { add_source_block<decltype(s), true>(f, acc, ptrs[1], b, n, 0); });
    for (int k = 1; k < f.count; ++k) {
      visit_source(f.dtypes[k],
                   [&](auto s) { add_source_block<decltype(s), false>(f, acc, ptrs[1 + k], b, n, k); });
    }
    if (!streamed) {
      for (int64_t j = 0; j < n; ++j) f.store(ptrs[0], b + j, acc[j]);
      continue;
    }
    for (int64_t j = 0; j < n; ++j) f.store(out, j, acc[j]);
#if defined(__x86_64__)
    stream_copy(static_cast<char*>(ptrs[0]) + b * sizeof(D), reinterpret_cast<const char*>(out), n * sizeof(D));
#endif
  }
}

struct CpuRun {
  static constexpr bool kHostWeightsOnly = true;  // CPU tensors take CPU weights

  // weighted_sum_: its own loop (run_sum_item), over the same work items as the other ops.
  template <size_t K, typename D, typename A>
  static void run(const DtypeGroup<K>& group, at::Device, WeightedSum<D, A> f) {
    f.resolve();
    const std::vector<int64_t>& numels = group.numels;
    int64_t total = 0;
    for (const int64_t n : numels) total += n;
    if (total < kSerialBelow) {
      for (size_t j = 0; j < numels.size(); ++j) run_sum_item(f, group.ptrs[j].data(), 0, numels[j], false);
      return;
    }
#if defined(__x86_64__)
    const bool streamed = total * static_cast<int64_t>(sizeof(D)) > kStreamAboveBytes;
#else
    const bool streamed = false;  // (stream_copy is x86-64's)
#endif
    const std::vector<Item> items = work_items(numels);
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t first, int64_t last) {
      for (int64_t it = first; it < last; ++it) {
        const Item& item = items[it];
        run_sum_item(f, group.ptrs[item.tensor].data(), item.begin, item.end, streamed);
      }
#if defined(__x86_64__)
      if (streamed) _mm_sfence();  // this thread's streamed stores land before its part counts as done
#endif
    });
  }

  // An op whose bf16 or fp16 written lists are rounded stochastically: the same work items, each
  // tensor's elements numbered from its first in the flat average. Count: NoStats, or the StatsRows
  // of a call with `stats`.
  template <size_t K, typename F, int S, typename Count = NoStats>
  static void run(const DtypeGroup<K>& group, at::Device, F f, const Rounding<S>& rounding, Count count = {}) {
    static_assert(F::kLists == K && F::kRoundedLists == S, "functor and list count disagree");
    for_each_item(group, [&](size_t j, int64_t begin, int64_t end) {
      run_item_rounded(f, rounding.key, group.ptrs[j].data(), begin, end, rounding.firsts[j], count);
    });
  }

  // A call with `stats` that rounds to nearest: the work items of one without, each counting what it
  // writes (run_item's Count).
  template <size_t K, typename F, int S>
  static void run(const DtypeGroup<K>& group, at::Device, F f, NoRounding, const StatsRows<S>& rows) {
    static_assert(F::kLists == K && F::kRoundedLists == S, "functor and list count disagree");
    for_each_item(group, [&](size_t j, int64_t begin, int64_t end) {
      run_item(f, group.ptrs[j].data(), begin, end, rows);
    });
  }

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
    const std::vector<Item> items = work_items(numels);
#if defined(__x86_64__)
    if constexpr (PlainCopy<F>::kBytes > 0) {
      constexpr int64_t bytes = PlainCopy<F>::kBytes;
      if (total * bytes > kStreamAboveBytes) {
        at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t first, int64_t last) {
          for (int64_t it = first; it < last; ++it) {
            const Item& item = items[it];
            const auto& p = group.ptrs[item.tensor];
            stream_copy(static_cast<char*>(p[0]) + item.begin * bytes,
                        static_cast<const char*>(p[1]) + item.begin * bytes, (item.end - item.begin) * bytes);
          }
          _mm_sfence();  // this thread's streamed stores land before its part counts as done
        });
        return;
      }
    }
    f.resolve();  // (the lists this call writes can depend on its weights)
    const unsigned streamed = f.written_lists() & ~F::kReadLists;
    if (streamed != 0 && total * F::Lists::min_bytes() > kStreamAboveBytes) {
      at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t first, int64_t last) {
        for (int64_t it = first; it < last; ++it) {
          const Item& item = items[it];
          run_item_streamed(f, group.ptrs[item.tensor].data(), item.begin, item.end, streamed);
        }
        _mm_sfence();  // this thread's streamed stores land before its part counts as done
      });
      return;
    }
#endif
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t first, int64_t last) {
      for (int64_t it = first; it < last; ++it) {
        const Item& item = items[it];
        run_item(f, group.ptrs[item.tensor].data(), item.begin, item.end);
      }
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(swa_fast, CPU, m) { register_ops<CpuRun>(m); }

}  // namespace swa_fast
