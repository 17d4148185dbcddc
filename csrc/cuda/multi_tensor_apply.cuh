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
  // The functor's math on the kElems elements, in place.
  __device__ void apply(const F& f) {
    void* lanes[K];
#pragma unroll
    for (int k = 0; k < K; ++k) lanes[k] = bytes[k];
#pragma unroll
    for (int i = 0; i < kElems; ++i) f.store(lanes, i, f.load(lanes, i));
  }
};

// One for_each_step visit: kU steps of kElems elements. Each thread loads all its steps before
// storing any: loads in flight hide memory latency, and the compiler cannot reorder them itself,
// since the lists may alias.
template <int kElems, int kU, typename F, int K>
__device__ void move_steps(const F& f, unsigned written, const plan::Chunk<K>& c, const int64_t* first,
                           const bool* valid) {
  constexpr auto lists = std::make_index_sequence<K>{};
  Lanes<F, kElems> lanes[kU];
#pragma unroll
  for (int u = 0; u < kU; ++u) {
    if (valid[u]) lanes[u].load_all(c, first[u], lists);
  }
#pragma unroll
  for (int u = 0; u < kU; ++u) {
    if (valid[u]) {
      lanes[u].apply(f);
      lanes[u].store_all(c, first[u], written, lists);
    }
  }
}

// 128-bit words a vector of kVec elements of every list of F takes.
template <typename F, int kVec, size_t... k>
constexpr int vector_words(std::index_sequence<k...>) {
  return (0 + ... + Lanes<F, kVec>::template kWords<k>);
}

template <int K, typename F>
__global__ void __launch_bounds__(kThreads) multi_tensor_kernel(const int64_t* table_data, int64_t n_tensors, F f) {
  constexpr int kVec = plan::vector_elems(F::Lists::min_bytes());
  constexpr int kVecU =
      vector_words<F, kVec>(std::make_index_sequence<K>{}) <= plan::kVecUnrollWords ? plan::kVecUnroll : 1;
  f.resolve();
  if (f.skip()) return;  // a weight of 0: nothing to write (uniform across the grid)
  const unsigned written = f.written_lists();
  int elem_bytes[K];
#pragma unroll
  for (int k = 0; k < K; ++k) elem_bytes[k] = F::Lists::bytes(k);
  plan::run_block<K, kVec, kVecU>(
      plan::Table<K>{table_data, n_tensors}, elem_bytes, blockIdx.x, gridDim.x, threadIdx.x, kThreads,
      [&](const plan::Chunk<K>& c, const int64_t* first, const bool* valid) {
        move_steps<kVec, kVecU>(f, written, c, first, valid);
      },
      [&](const plan::Chunk<K>& c, const int64_t* first, const bool* valid) {
        move_steps<1, plan::kUnroll>(f, written, c, first, valid);
      });
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

struct CudaRun {
  template <size_t K, typename F>
  static void run(const DtypeGroup<K>& group, at::Device device, F f) {
    static_assert(F::kLists == K, "functor and list count disagree");
    const int64_t n = static_cast<int64_t>(group.numels.size());
    if (n == 0) return;
    const c10::cuda::CUDAGuard guard(device);

    static_assert(sizeof(group.ptrs[0]) == K * sizeof(void*), "pointer rows are K pointers");
    const std::vector<int64_t> host =
        plan::build_table<K>(group.ptrs[0].data(), group.numels.data(), n);
    const int64_t n_chunks = host.back();
    const at::Tensor table = table_cache().get(host, device);

    const int64_t max_blocks = multiprocessor_count(device.index()) * 8;
    const int64_t blocks = std::max<int64_t>(1, std::min(n_chunks, max_blocks));
    multi_tensor_kernel<K, F><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        table.data_ptr<int64_t>(), n, f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace swa_fast
