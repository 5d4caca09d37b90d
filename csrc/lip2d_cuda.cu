// CUDA launchers: one __global__ entry point per kernel of
// lip_kernel_threads.h, launched on the current stream with the grid that
// lip_kernel_launch.h picks (the CPU emulation picks the same). Backward is a
// gather (each thread writes only its own inputs' gradients): no atomics,
// deterministic.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "lip_kernel_launch.h"
#include "lip_kernels.h"

namespace lip_cuda {
namespace {

static_assert(kGenericThreads == kFastThreads, "one __launch_bounds__ for all kernels");

template <typename Kernel, typename Args>
__global__ void __launch_bounds__(kFastThreads) lip_kernel_entry(const Args args) {
  Kernel::run(ThreadIndex{static_cast<int64_t>(blockIdx.x), static_cast<int32_t>(blockIdx.y),
                          static_cast<int32_t>(threadIdx.x), static_cast<int32_t>(threadIdx.y),
                          static_cast<int32_t>(blockDim.x), static_cast<int32_t>(blockDim.y)},
              args);
}

struct CudaLauncher {
  cudaStream_t stream;

  template <typename Kernel, typename Args>
  void launch(const LaunchShape& shape, const Args& args) {
    const dim3 grid(static_cast<unsigned int>(shape.grid_x), static_cast<unsigned int>(shape.grid_y));
    const dim3 block(static_cast<unsigned int>(shape.block_x), static_cast<unsigned int>(shape.block_y));
    lip_kernel_entry<Kernel, Args><<<grid, block, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace

const char* lip2d_forward_cuda(const ForwardTensors& t, const CallGeometry& cg) {
  CudaLauncher launcher{c10::cuda::getCurrentCUDAStream()};
  return launch_forward(launcher, t, cg, kernel_variant_from_env(), false);
}

const char* lip2d_backward_cuda(const BackwardTensors& t, const CallGeometry& cg) {
  CudaLauncher launcher{c10::cuda::getCurrentCUDAStream()};
  return launch_backward(launcher, t, cg, kernel_variant_from_env(), false);
}

}  // namespace lip_cuda
