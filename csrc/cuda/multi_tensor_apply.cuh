// Multi-tensor apply on CUDA: one kernel launch for a whole list, whatever its length.
//
// The launch reads a table in device memory: K data pointers and the element count of each tensor,
// then the prefix sum of each tensor's chunk count. Block b takes chunks b, b + gridDim.x, ... and
// finds each chunk's tensor by binary search in the prefix sums. Kernel-argument tables (apex,
// ATen) cap a launch at ~100 tensors; a device table does not. The table of a list seen before is
// reused from a small cache, so a warmed-up update allocates nothing, copies nothing to the device
// and can be captured in a CUDA graph. The index math (table, chunks, each thread's elements) is
// launch_plan.h, shared with a host emulation in the tests.
//
// A chunk whose tensors all start 16-byte aligned (every flat-buffer view does) moves whole
// vectors: each thread loads 16 bytes of the narrowest list (8 bf16, 4 fp32) and as many elements of
// the others with 128-bit accesses, which Hopper needs to reach its bandwidth; the rest of the
// chunk, and chunks of misaligned tensors, go one element at a time.
#pragma once

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstring>
#include <list>
#include <mutex>
#include <vector>

#include "../multi_tensor.h"
#include "launch_plan.h"

namespace swa_fast {

using plan::kThreads;

// kElems elements of each list of F in registers, moved as 128-bit words on the vector path and as
// single elements on the scalar one. The functor reads and writes them through pointers, as it
// does memory; every index is a constant once unrolled, so they stay registers
// (tests/test_machine_code.py checks that no kernel uses local memory).
template <typename F, int kElems>
struct Lanes {
  static constexpr int K = F::kLists;
  template <int k>
  using Elem = typename F::Lists::template type<k>;
  template <int k>
  using Word = std::conditional_t<kElems == 1, Elem<k>, uint4>;
  template <int k>
  static constexpr int kWords = static_cast<int>(kElems * sizeof(Elem<k>) / sizeof(Word<k>));
  // Held as the words moved (a char array would make the compiler split each 128-bit access into
  // four), with room for kElems of the widest type, fp64.
  using Storage = std::conditional_t<kElems == 1, uint64_t, uint4>;
  Storage bytes[K][kElems * 8 / sizeof(Storage)];

  // The pointers come from a table in memory, so the compiler cannot tell that they are global and
  // would emit generic loads and stores: the assumptions give it global ones (LDG / STG).
  template <int k>
  __device__ void load(const plan::Chunk<K>& c, int64_t first) {
    if constexpr ((F::kReadLists >> k & 1u) != 0) {
      const auto* src = reinterpret_cast<const Word<k>*>(reinterpret_cast<const Elem<k>*>(c.address[k]) + first);
      __builtin_assume(__isGlobal(src));
#pragma unroll
      for (int w = 0; w < kWords<k>; ++w) reinterpret_cast<Word<k>*>(bytes[k])[w] = src[w];
    }
  }
  template <int k>
  __device__ void store(const plan::Chunk<K>& c, int64_t first, unsigned written) const {
    if ((written >> k & 1u) != 0) {
      auto* dst = reinterpret_cast<Word<k>*>(reinterpret_cast<Elem<k>*>(c.address[k]) + first);
      __builtin_assume(__isGlobal(dst));
#pragma unroll
      for (int w = 0; w < kWords<k>; ++w) dst[w] = reinterpret_cast<const Word<k>*>(bytes[k])[w];
    }
  }
  template <size_t... k>
  __device__ void load_all(const plan::Chunk<K>& c, int64_t first, std::index_sequence<k...>) {
    (load<k>(c, first), ...);
  }
  template <size_t... k>
  __device__ void store_all(const plan::Chunk<K>& c, int64_t first, unsigned written, std::index_sequence<k...>) const {
    (store<k>(c, first, written), ...);
  }
  // The functor's math on the kElems elements, in place. Counter: NoStats, or the Tally<S> of a
  // call with `stats`, in which each write is counted (Counting).
  template <typename Counter>
  __device__ void apply(const F& f, Counter* tally) {
    void* lanes[K];
#pragma unroll
    for (int k = 0; k < K; ++k) lanes[k] = bytes[k];
#pragma unroll
    for (int i = 0; i < kElems; ++i) {
      if constexpr (std::is_same_v<Counter, NoStats>) {
        f.store(lanes, i, f.load(lanes, i));
      } else {
        f.store(lanes, i, f.load(lanes, i), counted(Nearest{}, tally));
      }
    }
  }
  // The same, its written lists rounded stochastically: lane i is element n0 + i of the flat average.
  // (Only bf16 and fp16 averages round so: a vector is 8 elements, a scalar step 1.)
  template <int S, typename Counter>
  __device__ void apply_rounded(const F& f, const RoundingKey<S>& key, int64_t n0, Counter* tally) {
    static_assert(kElems == 1 || kElems == 8, "a vector of 8 bf16 or fp16 elements");
    void* lanes[K];
#pragma unroll
    for (int k = 0; k < K; ++k) lanes[k] = bytes[k];
    if constexpr (kElems == 1) {
      Stochastic<S> put;
#pragma unroll
      for (int s = 0; s < S; ++s) put.r[s] = key.bits(s, static_cast<uint64_t>(n0));
      f.store(lanes, 0, f.load(lanes, 0), counted(put, tally));
    } else {
      uint32_t words[S][4];
#pragma unroll
      for (int s = 0; s < S; ++s) key.eight(s, static_cast<uint64_t>(n0), words[s]);
#pragma unroll
      for (int i = 0; i < kElems; ++i) {
        Stochastic<S> put;
#pragma unroll
        for (int s = 0; s < S; ++s) put.r[s] = (i & 1) != 0 ? words[s][i >> 1] >> 16 : words[s][i >> 1] & 0xffffu;
        f.store(lanes, i, f.load(lanes, i), counted(put, tally));
      }
    }
  }
};

// One for_each_step visit: kU steps of kElems elements. Each thread loads all its steps before
// storing any: loads in flight hide memory latency, and the compiler cannot reorder them itself,
// since the lists may alias.
template <int kElems, int kU, typename F, int K, typename R, typename Counter>
__device__ void move_steps(const F& f, unsigned written, const plan::Chunk<K>& c, const int64_t* first,
                           const bool* valid, const R& rounding, Counter* tally) {
  constexpr auto lists = std::make_index_sequence<K>{};
  Lanes<F, kElems> lanes[kU];
#pragma unroll
  for (int u = 0; u < kU; ++u) {
    if (valid[u]) lanes[u].load_all(c, first[u], lists);
  }
#pragma unroll
  for (int u = 0; u < kU; ++u) {
    if (valid[u]) {
      if constexpr (std::is_same_v<R, NoRounding>) {
        lanes[u].apply(f, tally);
      } else {
        lanes[u].apply_rounded(f, rounding, c.flat_first + first[u], tally);
      }
      lanes[u].store_all(c, first[u], written, lists);
    }
  }
}

// 128-bit words a vector of kVec elements of every list of F takes.
template <typename F, int kVec, size_t... k>
constexpr int vector_words(std::index_sequence<k...>) {
  return (0 + ... + Lanes<F, kVec>::template kWords<k>);
}

// A block's counts added to a call's `stats` rows: summed (and maxed) across each warp by shuffles,
// then across the block's warps in shared memory, so that one thread makes the block's 4 atomics per
// row (an atomic per thread or per warp would queue tens of thousands on the same 32 bytes). Every
// thread of the block must call it. (A thread's 32-bit counts, and a warp's sums of them, hold any
// tensor memory can: each thread counts at most its share of the grid's elements.)
template <int S>
__device__ void add_block_tally(const Tally<S>& tally, const StatsRows<S>& rows) {
  constexpr int kWarps = kThreads / 32;
  __shared__ unsigned sums[kWarps][S][4];  // written, unchanged, non-finite, max |update| bits
  const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
#pragma unroll
  for (int s = 0; s < S; ++s) {
    unsigned written = tally.written[s], unchanged = tally.unchanged[s], non_finite = tally.non_finite[s];
    unsigned largest = tally.max_update[s];
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) {
      written += __shfl_down_sync(0xffffffffu, written, d);
      unchanged += __shfl_down_sync(0xffffffffu, unchanged, d);
      non_finite += __shfl_down_sync(0xffffffffu, non_finite, d);
      largest = max(largest, __shfl_down_sync(0xffffffffu, largest, d));
    }
    if (lane == 0) {
      sums[warp][s][0] = written;
      sums[warp][s][1] = unchanged;
      sums[warp][s][2] = non_finite;
      sums[warp][s][3] = largest;
    }
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
#pragma unroll
  for (int s = 0; s < S; ++s) {
    unsigned long long total[3] = {0, 0, 0};
    unsigned largest = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
#pragma unroll
      for (int j = 0; j < 3; ++j) total[j] += sums[w][s][j];
      largest = max(largest, sums[w][s][3]);
    }
    if (total[0] == 0) continue;  // nothing written by this block: its row is as it was
    auto* row = reinterpret_cast<unsigned long long*>(rows.row[s]);
#pragma unroll
    for (int j = 0; j < 3; ++j) atomicAdd(row + j, total[j]);  // (two's complement: the int64 sum)
    atomicMax(row + 3, static_cast<unsigned long long>(largest));  // (the row's maximum is not negative)
  }
}

// The body of a multi-tensor launch. R: NoRounding, or the RoundingKey of a launch whose table
// holds each tensor's first element in the flat average (the stochastic rounding of bf16 and fp16
// averages, kernels of their own, so that the nearest kernels stay as they were). Count: NoStats, or
// the StatsRows of a call with `stats` (kernels of their own too), each thread's writes counted in a
// Tally in its registers and the block's added to them at its end.
template <int K, typename F, typename R, typename Count = NoStats>
__device__ C10_ALWAYS_INLINE void multi_tensor_body(const int64_t* table_data, int64_t n_tensors, const F& f,
                                                    const R& rounding, const Count& count = {}) {
  constexpr bool kRounds = !std::is_same_v<R, NoRounding>;
  constexpr bool kCounts = !std::is_same_v<Count, NoStats>;
  constexpr int kVec = plan::vector_elems(F::Lists::min_bytes());
  constexpr int kVecU =
      vector_words<F, kVec>(std::make_index_sequence<K>{}) <= plan::kVecUnrollWords ? plan::kVecUnroll : 1;
  if (f.skip()) return;  // a weight of 0: nothing to write (uniform across the grid)
  [[maybe_unused]] TallyFor<Count> tally;
  const unsigned written = f.written_lists();
  int elem_bytes[K];
#pragma unroll
  for (int k = 0; k < K; ++k) elem_bytes[k] = F::Lists::bytes(k);
  plan::run_block<K, kVec, kVecU, kRounds>(
      plan::Table<K>{table_data, n_tensors}, elem_bytes, blockIdx.x, gridDim.x, threadIdx.x, kThreads,
      [&](const plan::Chunk<K>& c, const int64_t* first, const bool* valid) {
        move_steps<kVec, kVecU>(f, written, c, first, valid, rounding, &tally);
      },
      [&](const plan::Chunk<K>& c, const int64_t* first, const bool* valid) {
        move_steps<1, plan::kUnroll>(f, written, c, first, valid, rounding, &tally);
      });
  if constexpr (kCounts) add_block_tally(tally, count);
}

template <int K, typename F>
__global__ void __launch_bounds__(kThreads) multi_tensor_kernel(const int64_t* table_data, int64_t n_tensors, F f) {
  f.resolve();
  multi_tensor_body<K>(table_data, n_tensors, f, NoRounding{});
}

// Stochastic rounding of F's S written lists. A launch of 3 or 4 averages, or with an fp64 list, is
// allowed the registers its Philox words need beside its elements' (one block per multiprocessor):
// held to 128 (two blocks), or left to ptxas for an fp64 source, they spilled on sm_80 and sm_86
// (tests/test_machine_code.py); the others fit in 128.
template <typename F>
constexpr int kRoundingMinBlocks = F::Lists::max_bytes() == 8 || F::kRoundedLists >= 3 ? 1 : 2;

template <int K, typename F, int S>
__global__ void __launch_bounds__(kThreads, kRoundingMinBlocks<F>)
    multi_tensor_rounding_kernel(const int64_t* table_data, int64_t n_tensors, F f, RoundingKey<S> key) {
  f.resolve();
  multi_tensor_body<K>(table_data, n_tensors, f, key);
}

// A call with `stats`: R as multi_tensor_body's (NoRounding, or the RoundingKey of bf16 / fp16
// averages rounded stochastically), each write counted; kernels of their own, so that a call without
// `stats` runs the kernels it always ran. Registers as the kernels without `stats` are allowed them,
// but a launch that rounds two or more lists stochastically gets those of one block per
// multiprocessor: the counts of moments_' fp16 mean and sq beside their Philox words spilled at 128
// on sm_80 and sm_90 (tests/test_machine_code.py).
template <typename F, typename R>
constexpr int kCountingMinBlocks =
    std::is_same_v<R, NoRounding> || F::kRoundedLists >= 2 ? 1 : kRoundingMinBlocks<F>;

template <int K, typename F, typename R, int S>
__global__ void __launch_bounds__(kThreads, kCountingMinBlocks<F, R>)
    multi_tensor_counting_kernel(const int64_t* table_data, int64_t n_tensors, F f, R rounding,
                                 StatsRows<S> rows) {
  f.resolve();
  multi_tensor_body<K>(table_data, n_tensors, f, rounding, rows);
}

// A few recent tables per device, keyed by their full host content.
class TableCache {
 public:
  at::Tensor get(const std::vector<int64_t>& host, at::Device device) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto stream = c10::cuda::getCurrentCUDAStream(device.index());
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      if (it->device == device && it->host == host) {
        if (it->stream != stream) {
          // Used on another stream than it was made on: keep the allocator from reusing its memory
          // before this stream is done with it.
          c10::cuda::CUDACachingAllocator::recordStream(it->table.storage().data_ptr(), stream);
        }
        entries_.splice(entries_.begin(), entries_, it);
        return entries_.front().table;
      }
    }
    auto pinned = at::empty({static_cast<int64_t>(host.size())},
                            at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    std::memcpy(pinned.data_ptr<int64_t>(), host.data(), host.size() * sizeof(int64_t));
    auto table = at::empty_like(pinned, at::TensorOptions().device(device)).copy_(pinned, /*non_blocking=*/true);
    entries_.push_front({device, stream, host, table});
    if (entries_.size() > kCapacity) entries_.pop_back();
    return table;
  }

 private:
  static constexpr size_t kCapacity = 32;
  struct Entry {
    at::Device device;
    c10::cuda::CUDAStream stream;
    std::vector<int64_t> host;
    at::Tensor table;
  };
  std::mutex mutex_;
  std::list<Entry> entries_;
};

inline TableCache& table_cache() {
  static TableCache cache;
  return cache;
}

inline int64_t multiprocessor_count(int device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

// --- weighted_sum_: a loop over K sources of any dtypes ------------------------------------------------

// A weighted_sum_ launch's table row: dst, then kMaxSourcesPerPass sources (null past a pass's K),
// so that one kernel takes any count.
constexpr int kSumLists = 1 + kMaxSourcesPerPass;

// The sources' "dtype" of a launch whose sources differ: each source's loads and conversions are
// then chosen by its dtype, a branch that every thread of the launch takes alike.
struct MixedSources {};

// kElems elements of T in registers, moved as 128-bit words where they fill them, else 64-bit ones
// (kElems == 1: the element itself). The assumptions give the compiler global loads, as in Lanes.
template <typename T, int kElems>
struct Words {
  static constexpr int kBytes = kElems * static_cast<int>(sizeof(T));
  using Word = std::conditional_t<kElems == 1, T, std::conditional_t<kBytes % 16 == 0, uint4, uint2>>;
  static_assert(kElems == 1 || kBytes % 8 == 0, "whole 64-bit words");
  static constexpr int kCount = kBytes / static_cast<int>(sizeof(Word));
  Word w[kCount];

  __device__ void load(int64_t address, int64_t first) {
    const auto* src = reinterpret_cast<const Word*>(reinterpret_cast<const T*>(address) + first);
    __builtin_assume(__isGlobal(src));
#pragma unroll
    for (int i = 0; i < kCount; ++i) w[i] = src[i];
  }
  // Whole words through __stwb (st.global.wb, the default caching): a word assembled from the
  // functor's elements was stored as four 32-bit stores in these kernels, plain or as make_uint4.
  __device__ void store(int64_t address, int64_t first) const {
    auto* dst = reinterpret_cast<Word*>(reinterpret_cast<T*>(address) + first);
    __builtin_assume(__isGlobal(dst));
#pragma unroll
    for (int i = 0; i < kCount; ++i) {
      if constexpr (kElems == 1) {
        dst[i] = w[i];
      } else {
        __stwb(dst + i, w[i]);
      }
    }
  }
};

// acc[u][i] (+)= w_k * element first[u] + i of source k (of type S) for each valid step u: all the
// steps' loads, then their arithmetic.
template <typename S, bool kFirst, int kElems, int kU, typename F>
__device__ void add_source(const F& f, int k, int64_t address, const int64_t* first, const bool* valid,
                           typename F::A (&acc)[kU][kElems]) {
  if constexpr (std::is_same_v<S, MixedSources>) {
    visit_source(f.dtypes[k],
                 [&](auto s) { add_source<decltype(s), kFirst, kElems, kU>(f, k, address, first, valid, acc); });
  } else {
    Words<S, kElems> in[kU];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      if (valid[u]) in[u].load(address, first[u]);
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      if (valid[u]) {
#pragma unroll
        for (int i = 0; i < kElems; ++i) f.template add<S, kFirst>(acc[u][i], in[u].w, i, k);
      }
    }
  }
}

// One for_each_step visit: kU steps of kElems elements of dst, each the sum of its sources in their
// order, rounded once into dst. The loop over the sources is unrolled, each past the pass's count
// skipped (the same branch for every thread), so that every index into the functor and the chunk is a
// constant and they stay in registers.
template <typename S, int kElems, int kU, typename F>
__device__ void sum_steps(const F& f, const plan::Chunk<kSumLists>& c, const int64_t* first, const bool* valid) {
  using D = typename F::Dst;
  typename F::A acc[kU][kElems];
  add_source<S, true, kElems, kU>(f, 0, c.address[1], first, valid, acc);
#pragma unroll
  for (int k = 1; k < kMaxSourcesPerPass; ++k) {
    if (k < f.count) add_source<S, false, kElems, kU>(f, k, c.address[1 + k], first, valid, acc);
  }
#pragma unroll
  for (int u = 0; u < kU; ++u) {
    if (valid[u]) {
      Words<D, kElems> out;
#pragma unroll
      for (int i = 0; i < kElems; ++i) f.store(out.w, i, acc[u][i]);
      out.store(c.address[0], first[u]);
    }
  }
}

// weighted_sum_ over one table: S the sources' dtype when they all have one (the usual call: K
// checkpoints of one dtype), else MixedSources. A chunk whose tensors all start 16-byte aligned
// moves whole words, one step of 16 bytes of the narrowest list per thread at a time (a source of a
// mixed launch may be 2 bytes wide; an fp64 sum at most 4 elements, a bf16 dst then 64-bit words);
// the rest element by element. Register budgets: ptxas held the kernels to 64 or 80 registers by
// itself and spilled some (for sm_75, sm_86 and sm_120, at two steps a thread, 8 elements of an fp64
// sum, or mixed fp64 sources), so a step at a time, at least 2 blocks per multiprocessor (128
// registers), and fp64 sums and mixed sources get the registers they need (1 block: rare calls; at
// 128, sm_100 spilled fp64 sources into bf16).
template <typename S, typename F>
constexpr int kSumMinBlocks = std::is_same_v<S, MixedSources> || std::is_same_v<typename F::A, double> ? 1 : 2;

template <typename S, typename F>
__global__ void __launch_bounds__(kThreads, kSumMinBlocks<S, F>)
    weighted_sum_kernel(const int64_t* table_data, int64_t n_tensors, F f) {
  using D = typename F::Dst;
  constexpr bool kWideAcc = std::is_same_v<typename F::A, double>;
  constexpr int kNarrowest =
      std::is_same_v<S, MixedSources> ? 2 : static_cast<int>(std::min(sizeof(S), sizeof(D)));
  constexpr int kVec = plan::vector_elems(kWideAcc ? std::max(kNarrowest, 4) : kNarrowest);
  constexpr int kVecU = 1;
  f.resolve();
  int elem_bytes[kSumLists];
  elem_bytes[0] = sizeof(D);
#pragma unroll
  for (int k = 0; k < kMaxSourcesPerPass; ++k) elem_bytes[1 + k] = k < f.count ? f.bytes[k] : 1;
  plan::run_block<kSumLists, kVec, kVecU>(
      plan::Table<kSumLists>{table_data, n_tensors}, elem_bytes, blockIdx.x, gridDim.x, threadIdx.x, kThreads,
      [&](const plan::Chunk<kSumLists>& c, const int64_t* first, const bool* valid) {
        sum_steps<S, kVec, kVecU>(f, c, first, valid);
      },
      [&](const plan::Chunk<kSumLists>& c, const int64_t* first, const bool* valid) {
        sum_steps<S, 1, plan::kUnroll>(f, c, first, valid);
      });
}

struct CudaRun {
  template <size_t K, typename F>
  static void run(const DtypeGroup<K>& group, at::Device device, F f) {
    static_assert(F::kLists == K, "functor and list count disagree");
    static_assert(sizeof(group.ptrs[0]) == K * sizeof(void*), "pointer rows are K pointers");
    if (group.numels.empty()) return;
    const c10::cuda::CUDAGuard guard(device);
    const Launch launch = prepare<K>(group.ptrs[0].data(), group.numels, device);
    multi_tensor_kernel<K, F><<<launch.blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        launch.table.data_ptr<int64_t>(), launch.n, f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // Stochastic rounding of the functor's S written lists (bf16 or fp16): the table carries each
  // tensor's first element in the flat average (cached by content like any table: a model's firsts
  // do not change), the key (the step changes at every call) goes as a kernel argument.
  template <size_t K, typename F, int S>
  static void run(const DtypeGroup<K>& group, at::Device device, F f, const Rounding<S>& rounding) {
    static_assert(F::kLists == K && F::kRoundedLists == S, "functor and list count disagree");
    if (group.numels.empty()) return;
    const c10::cuda::CUDAGuard guard(device);
    const Launch launch = prepare<K>(group.ptrs[0].data(), group.numels, device, rounding.firsts.data());
    multi_tensor_rounding_kernel<K, F><<<launch.blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        launch.table.data_ptr<int64_t>(), launch.n, f, rounding.key);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // A call with `stats`, to nearest or rounding stochastically: the launches above, their kernels'
  // counting twins, each adding to `rows`.
  template <size_t K, typename F, int S>
  static void run(const DtypeGroup<K>& group, at::Device device, F f, NoRounding, const StatsRows<S>& rows) {
    static_assert(F::kLists == K && F::kRoundedLists == S, "functor and list count disagree");
    if (group.numels.empty()) return;
    const c10::cuda::CUDAGuard guard(device);
    const Launch launch = prepare<K>(group.ptrs[0].data(), group.numels, device);
    multi_tensor_counting_kernel<K, F><<<launch.blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        launch.table.data_ptr<int64_t>(), launch.n, f, NoRounding{}, rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <size_t K, typename F, int S>
  static void run(const DtypeGroup<K>& group, at::Device device, F f, const Rounding<S>& rounding,
                  const StatsRows<S>& rows) {
    static_assert(F::kLists == K && F::kRoundedLists == S, "functor and list count disagree");
    if (group.numels.empty()) return;
    const c10::cuda::CUDAGuard guard(device);
    const Launch launch = prepare<K>(group.ptrs[0].data(), group.numels, device, rounding.firsts.data());
    multi_tensor_counting_kernel<K, F><<<launch.blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        launch.table.data_ptr<int64_t>(), launch.n, f, rounding.key, rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // weighted_sum_: its own kernel, over the group's pointer rows padded to kSumLists.
  template <size_t K, typename D, typename A>
  static void run(const DtypeGroup<K>& group, at::Device device, WeightedSum<D, A> f) {
    if (group.numels.empty()) return;
    const c10::cuda::CUDAGuard guard(device);
    std::vector<const void*> rows(group.numels.size() * kSumLists, nullptr);
    for (size_t j = 0; j < group.numels.size(); ++j) std::copy_n(group.ptrs[j].begin(), K, &rows[j * kSumLists]);
    const Launch launch = prepare<kSumLists>(rows.data(), group.numels, device);
    bool one_dtype = true;
    for (int k = 1; k < f.count; ++k) one_dtype &= f.dtypes[k] == f.dtypes[0];
    const auto start = [&](auto s) {
      weighted_sum_kernel<decltype(s)><<<launch.blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          launch.table.data_ptr<int64_t>(), launch.n, f);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (!one_dtype) return start(MixedSources{});
    visit_float(f.dtypes[0], [&](auto s) {
      using S = decltype(s);
      // A follows from D and S alone here: only those kernels are compiled
      if constexpr (std::is_same_v<A, acc_t<std::conditional_t<std::is_same_v<S, double>, S, D>>>) {
        start(s);
      } else {
        start(MixedSources{});  // (not reached)
      }
    });
  }

 private:
  struct Launch {
    at::Tensor table;
    int64_t n = 0, blocks = 1;
  };

  // The device table of a launch over K pointers per tensor (cached) and its grid: a block per
  // chunk, up to 8 per multiprocessor. For at least one tensor, under the device's guard.
  template <int K>
  static Launch prepare(const void* const* rows, const std::vector<int64_t>& numels, at::Device device,
                        const int64_t* firsts = nullptr) {
    Launch out;
    out.n = static_cast<int64_t>(numels.size());
    const std::vector<int64_t> host = plan::build_table<K>(rows, numels.data(), out.n, firsts);
    const int64_t n_chunks = host[out.n * K + out.n + out.n];  // the last chunk prefix sum
    out.table = table_cache().get(host, device);
    const int64_t max_blocks = multiprocessor_count(device.index()) * 8;
    out.blocks = std::max<int64_t>(1, std::min(n_chunks, max_blocks));
    return out;
  }
};

}  // namespace swa_fast
