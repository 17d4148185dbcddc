// The index math of the CUDA multi-tensor launch, written once for the kernel and the host: the
// device table (pointers, sizes, chunk prefix sums), which tensor a chunk belongs to, and which
// elements each thread of a block takes, through 128-bit vectors where a chunk allows it and one
// element at a time otherwise. tests/test_launch_plan.py compiles this header into a host program
// that runs it over an emulated grid and checks that every element is visited exactly once.
//
// Nothing here touches memory but the table: pointers are only compared for alignment, so the
// host emulation can give any addresses.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>
#include <vector>

// The per-thread loops below are fully unrolled on the device and in the host emulation alike.
#if defined(__CUDACC__) || defined(__clang__)
#define SWA_FAST_UNROLL _Pragma("unroll")
#else
#define SWA_FAST_UNROLL _Pragma("GCC unroll 16")
#endif

namespace swa_fast {
namespace plan {

constexpr int kThreads = 256;
constexpr int64_t kChunkElems = 16 * 1024;
// Scalar path: elements a thread loads before storing any (loads in flight hide memory latency).
constexpr int kUnroll = 4;
// Vector path: vectors a thread loads before storing any, when a vector of all the lists is at most
// kVecUnrollWords 128-bit words; one otherwise (more would spill registers: four fp32 averages of
// an fp64 source, say).
constexpr int kVecUnroll = 2;
constexpr int kVecUnrollWords = 4;
constexpr int kVecBytes = 16;

// Elements per vector for lists whose smallest element has `min_bytes`: one 128-bit access of
// that list, a whole number of 128-bit accesses of every wider one.
constexpr int vector_elems(int min_bytes) { return kVecBytes / min_bytes; }

// The table of a launch, laid out as [n * K addresses][n numels][n + 1 chunk prefix sums], then,
// for a launch that rounds stochastically, [n firsts]: each tensor's first element in the flat
// average, which numbers its elements' random bits. `ptrs` holds the K pointers of tensor j at
// ptrs[j * K + k].
template <int K>
std::vector<int64_t> build_table(const void* const* ptrs, const int64_t* numels, int64_t n,
                                 const int64_t* firsts = nullptr) {
  std::vector<int64_t> host(n * K + n + n + 1 + (firsts != nullptr ? n : 0));
  if (firsts != nullptr) {
    for (int64_t j = 0; j < n; ++j) host[n * K + n + n + 1 + j] = firsts[j];
  }
  int64_t* sizes = host.data() + n * K;
  int64_t* prefix = sizes + n;
  prefix[0] = 0;
  for (int64_t j = 0; j < n; ++j) {
    for (int k = 0; k < K; ++k) host[j * K + k] = reinterpret_cast<int64_t>(ptrs[j * K + k]);
    sizes[j] = numels[j];
    prefix[j + 1] = prefix[j] + (numels[j] + kChunkElems - 1) / kChunkElems;
  }
  return host;
}

template <int K>
struct Table {
  const int64_t* data;
  int64_t n;
  C10_HOST_DEVICE int64_t address(int64_t j, int k) const { return data[j * K + k]; }
  C10_HOST_DEVICE int64_t numel(int64_t j) const { return data[n * K + j]; }
  C10_HOST_DEVICE const int64_t* prefix() const { return data + n * K + n; }
  C10_HOST_DEVICE int64_t n_chunks() const { return prefix()[n]; }
  // (only in a table built with firsts)
  C10_HOST_DEVICE int64_t flat_first(int64_t j) const { return data[n * K + n + n + 1 + j]; }
};

// The last tensor whose first chunk is <= chunk: a tensor of no elements has no chunk, so its
// prefix equals the next tensor's and the search passes over it.
C10_HOST_DEVICE inline int64_t tensor_of_chunk(const int64_t* prefix, int64_t n, int64_t chunk) {
  int64_t lo = 0, hi = n - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (prefix[mid] <= chunk) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// One chunk: elements [begin, vec_end) of `tensor` go by vectors, [vec_end, end) one at a time.
// The tensor's addresses are read from the table once: the kernel's stores could alias the table
// as far as the compiler knows, and would make it read them again after every store.
template <int K>
struct Chunk {
  int64_t tensor, begin, vec_end, end;
  int64_t address[K];
  int64_t flat_first = 0;  // the tensor's first element in the flat average (kFirsts), else 0
};

// A chunk takes the vector path when the first element of every list is 16-byte aligned (then so
// is every vector's: a vector spans a multiple of 16 bytes in each list); its whole vectors go
// that way and the rest, fewer than kVec elements, is the scalar tail.
template <int K, int kVec, bool kFirsts = false>
C10_HOST_DEVICE Chunk<K> chunk_plan(const Table<K>& table, int64_t chunk, const int* elem_bytes) {
  Chunk<K> c;
  c.tensor = tensor_of_chunk(table.prefix(), table.n, chunk);
  if constexpr (kFirsts) c.flat_first = table.flat_first(c.tensor);
  c.begin = (chunk - table.prefix()[c.tensor]) * kChunkElems;
  const int64_t remaining = table.numel(c.tensor) - c.begin;
  c.end = c.begin + (remaining < kChunkElems ? remaining : kChunkElems);
  bool aligned = true;
  SWA_FAST_UNROLL
  for (int k = 0; k < K; ++k) {
    c.address[k] = table.address(c.tensor, k);
    aligned &= (c.address[k] + c.begin * elem_bytes[k]) % kVecBytes == 0;
  }
  c.vec_end = aligned ? c.begin + (c.end - c.begin) / kVec * kVec : c.begin;
  return c;
}

// Steps of kStep elements over [begin, end) (a multiple of kStep long): thread t takes steps
// t, t + threads, ..., kU at a time, so neighbouring threads touch neighbouring memory. visit gets
// the first element of each of the kU steps and whether that step exists.
template <int kStep, int kU, typename Visit>
C10_HOST_DEVICE void for_each_step(int64_t begin, int64_t end, int thread, int threads, Visit&& visit) {
  const int64_t steps = (end - begin) / kStep;
  for (int64_t base = thread; base < steps; base += static_cast<int64_t>(threads) * kU) {
    int64_t first[kU];
    bool valid[kU];
    SWA_FAST_UNROLL
    for (int u = 0; u < kU; ++u) {
      const int64_t step = base + static_cast<int64_t>(u) * threads;
      valid[u] = step < steps;
      first[u] = begin + step * kStep;
    }
    visit(first, valid);
  }
}

// What one block does: chunks block, block + grid, ...; in each, its vectors (kVecU at a time),
// then its tail. vector(chunk, first, valid) and scalar(chunk, first, valid) are the for_each_step
// visits. kFirsts: the table holds firsts, which each chunk carries.
template <int K, int kVec, int kVecU, bool kFirsts = false, typename Vector, typename Scalar>
C10_HOST_DEVICE void run_block(const Table<K>& table, const int* elem_bytes, int64_t block, int64_t grid,
                               int thread, int threads, Vector&& vector, Scalar&& scalar) {
  const int64_t n_chunks = table.n_chunks();
  for (int64_t chunk = block; chunk < n_chunks; chunk += grid) {
    const Chunk<K> c = chunk_plan<K, kVec, kFirsts>(table, chunk, elem_bytes);
    for_each_step<kVec, kVecU>(c.begin, c.vec_end, thread, threads,
                                    [&](const int64_t* first, const bool* valid) { vector(c, first, valid); });
    for_each_step<1, kUnroll>(c.vec_end, c.end, thread, threads,
                              [&](const int64_t* first, const bool* valid) { scalar(c, first, valid); });
  }
}

}  // namespace plan
}  // namespace swa_fast
