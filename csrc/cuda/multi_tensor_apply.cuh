// Multi-tensor apply on CUDA: one kernel launch for a whole list, whatever its length.
//
// The launch reads a table in device memory: K data pointers and the element count of each tensor,
// then the prefix sum of each tensor's chunk count. Block b takes chunks b, b + gridDim.x, ... and
// finds each chunk's tensor by binary search in the prefix sums. Kernel-argument tables (apex,
// ATen) cap a launch at ~100 tensors; a device table does not. The table of a list seen before is
// reused from a small cache, so a warmed-up update allocates nothing, copies nothing to the device
// and can be captured in a CUDA graph.
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

namespace swa_fast {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;
constexpr int64_t kChunkElems = 16 * 1024;

template <int K, typename F>
__global__ void __launch_bounds__(kThreads) multi_tensor_kernel(const int64_t* table, int64_t n_tensors,
                                                                int64_t n_chunks, F f) {
  const int64_t* numels = table + n_tensors * K;
  const int64_t* chunk_prefix = numels + n_tensors;  // n_tensors + 1 entries
  f.resolve();
  if (f.skip()) return;  // a weight of 0: nothing to write (uniform across the grid)
  for (int64_t chunk = blockIdx.x; chunk < n_chunks; chunk += gridDim.x) {
    int64_t lo = 0, hi = n_tensors - 1;  // the last tensor whose first chunk is <= chunk
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (chunk_prefix[mid] <= chunk) lo = mid; else hi = mid - 1;
    }
    void* ptrs[K];
#pragma unroll
    for (int k = 0; k < K; ++k) ptrs[k] = reinterpret_cast<void*>(table[lo * K + k]);
    const int64_t begin = (chunk - chunk_prefix[lo]) * kChunkElems;
    const int64_t end = min(begin + kChunkElems, numels[lo]);
    // Each thread loads kUnroll elements before storing any: that many loads in flight per thread
    // hide memory latency. Neighbouring threads touch neighbouring elements (coalesced).
    for (int64_t base = begin + threadIdx.x; base < end; base += kThreads * kUnroll) {
      typename F::Regs regs[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + u * kThreads;
        if (i < end) regs[u] = f.load(ptrs, i);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + u * kThreads;
        if (i < end) f.store(ptrs, i, regs[u]);
      }
    }
  }
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

    std::vector<int64_t> host(n * K + n + n + 1);
    int64_t* numels = host.data() + n * K;
    int64_t* prefix = numels + n;
    prefix[0] = 0;
    for (int64_t j = 0; j < n; ++j) {
      for (size_t k = 0; k < K; ++k) host[j * K + k] = reinterpret_cast<int64_t>(group.ptrs[j][k]);
      numels[j] = group.numels[j];
      prefix[j + 1] = prefix[j] + (numels[j] + kChunkElems - 1) / kChunkElems;
    }
    const int64_t n_chunks = prefix[n];
    const at::Tensor table = table_cache().get(host, device);

    const int64_t max_blocks = multiprocessor_count(device.index()) * 8;
    const int64_t blocks = std::max<int64_t>(1, std::min(n_chunks, max_blocks));
    multi_tensor_kernel<K, F><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        table.data_ptr<int64_t>(), n, n_chunks, f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace swa_fast
