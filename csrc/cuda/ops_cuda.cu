// CUDA kernels of the four ops: the shared op bodies (ops_impl.h) over the multi-tensor launcher.
#include <torch/library.h>

#include "../ops_impl.h"
#include "multi_tensor_apply.cuh"

namespace swa_fast {
namespace {

void lerp_cuda(at::TensorList avg, at::TensorList src, const at::Tensor& weight) {
  lerp_impl<CudaRun>(avg, src, weight);
}
void moments_cuda(at::TensorList mean, at::TensorList sq, at::TensorList src, const at::Tensor& weight) {
  moments_impl<CudaRun>(mean, sq, src, weight);
}
void multi_lerp_cuda(at::TensorList avgs, at::TensorList src, const at::Tensor& weights) {
  multi_lerp_impl<CudaRun>(avgs, src, weights);
}
void copy_cuda(at::TensorList dst, at::TensorList src) { copy_impl<CudaRun>(dst, src); }
void swap_cuda(at::TensorList a, at::TensorList b) { swap_impl<CudaRun>(a, b); }

}  // namespace

TORCH_LIBRARY_IMPL(swa_fast, CUDA, m) {
  m.impl("lerp_", &lerp_cuda);
  m.impl("moments_", &moments_cuda);
  m.impl("multi_lerp_", &multi_lerp_cuda);
  m.impl("copy_", &copy_cuda);
  m.impl("swap_", &swap_cuda);
}

}  // namespace swa_fast
