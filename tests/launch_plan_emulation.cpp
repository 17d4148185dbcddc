// Runs the CUDA launcher's index math (csrc/cuda/launch_plan.h, the code the kernel runs) on the
// host over an emulated grid, and checks that every element of every tensor is visited exactly
// once, that each vector lies inside its chunk and starts 16-byte aligned in every list, and that
// the scalar path takes only what the vector path left. tests/test_launch_plan.py builds and
// drives it.
//
// Input (stdin), one case after another:
//   K kVec kVecU blocks              kVecU: vectors a thread takes at a time
//   bytes_0 ... bytes_{K-1}        element size of each list
//   n                              tensors
//   numel address_0 ... address_{K-1}   (n lines; addresses need not point anywhere)
// Output: one line per case, "ok vectors=<elements> scalars=<elements> chunks=<n>", or
// "error: ..." and exit status 1.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "../csrc/cuda/launch_plan.h"

namespace plan = swa_fast::plan;

namespace {

[[noreturn]] void fail(const std::string& what) {
  std::printf("error: %s\n", what.c_str());
  std::exit(1);
}

struct Case {
  int K = 0, vec = 0, vec_unroll = 0;
  int64_t blocks = 0;
  std::vector<int> bytes;
  std::vector<int64_t> numels;
  std::vector<const void*> ptrs;  // n * K
};

template <int K, int kVec, int kVecU>
void emulate(const Case& c) {
  const int64_t n = static_cast<int64_t>(c.numels.size());
  const std::vector<int64_t> host = plan::build_table<K>(c.ptrs.data(), c.numels.data(), n);
  const plan::Table<K> table{host.data(), n};
  std::vector<int64_t> offset(n + 1, 0);
  for (int64_t j = 0; j < n; ++j) offset[j + 1] = offset[j] + c.numels[j];
  std::vector<uint8_t> visits(offset[n], 0);
  int64_t vector_elems = 0, scalar_elems = 0;

  const auto visit = [&](int64_t tensor, int64_t element) {
    if (tensor < 0 || tensor >= n || element < 0 || element >= c.numels[tensor]) {
      fail("element " + std::to_string(element) + " of tensor " + std::to_string(tensor) + " is out of range");
    }
    if (visits[offset[tensor] + element]++ != 0) {
      fail("element " + std::to_string(element) + " of tensor " + std::to_string(tensor) + " visited twice");
    }
  };
  const auto vector = [&](const plan::Chunk<K>& ch, const int64_t* first, const bool* valid) {
    for (int u = 0; u < kVecU; ++u) {
      if (!valid[u]) continue;
      if (first[u] < ch.begin || first[u] + kVec > ch.vec_end) fail("a vector leaves its chunk's vector part");
      for (int k = 0; k < K; ++k) {
        if (ch.address[k] != host[ch.tensor * K + k]) fail("a chunk has another tensor's address");
        if ((ch.address[k] + first[u] * c.bytes[k]) % plan::kVecBytes != 0) {
          fail("a vector of list " + std::to_string(k) + " of tensor " + std::to_string(ch.tensor) +
               " is not 16-byte aligned");
        }
      }
      for (int e = 0; e < kVec; ++e) visit(ch.tensor, first[u] + e);
      vector_elems += kVec;
    }
  };
  const auto scalar = [&](const plan::Chunk<K>& ch, const int64_t* first, const bool* valid) {
    for (int u = 0; u < plan::kUnroll; ++u) {
      if (!valid[u]) continue;
      if (first[u] < ch.vec_end || first[u] >= ch.end) fail("a scalar element outside its chunk's tail");
      visit(ch.tensor, first[u]);
      ++scalar_elems;
    }
  };
  for (int64_t block = 0; block < c.blocks; ++block) {
    for (int thread = 0; thread < plan::kThreads; ++thread) {
      plan::run_block<K, kVec, kVecU>(table, c.bytes.data(), block, c.blocks, thread, plan::kThreads, vector,
                                      scalar);
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t e = 0; e < c.numels[j]; ++e) {
      if (visits[offset[j] + e] != 1) {
        fail("element " + std::to_string(e) + " of tensor " + std::to_string(j) + " (of " +
             std::to_string(c.numels[j]) + ") never visited");
      }
    }
  }
  std::printf("ok vectors=%lld scalars=%lld chunks=%lld\n", static_cast<long long>(vector_elems),
              static_cast<long long>(scalar_elems), static_cast<long long>(table.n_chunks()));
}

template <int K, int kVecU>
void emulate_k(const Case& c) {
  switch (c.vec) {
    case 1: return emulate<K, 1, kVecU>(c);
    case 2: return emulate<K, 2, kVecU>(c);
    case 4: return emulate<K, 4, kVecU>(c);
    case 8: return emulate<K, 8, kVecU>(c);
    case 16: return emulate<K, 16, kVecU>(c);
    default: fail("unsupported vector length " + std::to_string(c.vec));
  }
}

// The kernel takes one vector or plan::kVecUnroll at a time, depending on the lists' widths.
template <int K>
void emulate_k(const Case& c) {
  if (c.vec_unroll == 1) return emulate_k<K, 1>(c);
  if (c.vec_unroll == plan::kVecUnroll) return emulate_k<K, plan::kVecUnroll>(c);
  fail("unsupported vector unroll " + std::to_string(c.vec_unroll));
}

}  // namespace

int main() {
  Case c;
  long long blocks = 0;
  while (std::scanf("%d %d %d %lld", &c.K, &c.vec, &c.vec_unroll, &blocks) == 4) {
    c.blocks = blocks;
    c.bytes.assign(c.K, 0);
    for (int& b : c.bytes) {
      if (std::scanf("%d", &b) != 1) fail("bad element sizes");
    }
    long long n = 0;
    if (std::scanf("%lld", &n) != 1) fail("bad tensor count");
    c.numels.assign(n, 0);
    c.ptrs.assign(n * c.K, nullptr);
    for (long long j = 0; j < n; ++j) {
      long long numel = 0;
      if (std::scanf("%lld", &numel) != 1) fail("bad numel");
      c.numels[j] = numel;
      for (int k = 0; k < c.K; ++k) {
        long long address = 0;
        if (std::scanf("%lld", &address) != 1) fail("bad address");
        c.ptrs[j * c.K + k] = reinterpret_cast<const void*>(static_cast<intptr_t>(address));
      }
    }
    switch (c.K) {
      case 2: emulate_k<2>(c); break;
      case 3: emulate_k<3>(c); break;
      case 5: emulate_k<5>(c); break;
      default: fail("unsupported list count " + std::to_string(c.K));
    }
  }
  return 0;
}
