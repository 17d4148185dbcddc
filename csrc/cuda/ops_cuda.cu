// CUDA kernels of the ops: the shared op bodies (ops_impl.h) over the multi-tensor launcher.
#include <torch/library.h>

#include "../ops_impl.h"
#include "multi_tensor_apply.cuh"

namespace swa_fast {

TORCH_LIBRARY_IMPL(swa_fast, CUDA, m) { register_ops<CudaRun>(m); }

}  // namespace swa_fast
