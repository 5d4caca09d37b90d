// The CUDA kernels on the CPU: the same dispatch (lip_kernel_launch.h) picks
// the same kernel and launch grid as lip2d_cuda.cu, and a loop over that
// grid calls each thread's function (lip_kernel_threads.h). Threads own
// disjoint outputs, so blocks run in parallel here as on the GPU. Test-only
// (torch.ops.lip_cuda._lip2d_{forward,backward}_emulated): it is how CI
// checks the CUDA code paths, in every dtype pair, layout, variant and
// offset width, without a GPU.
#include <ATen/Parallel.h>

#include "lip_kernel_launch.h"

namespace lip_cuda {
namespace {

struct EmulatedLauncher {
  template <typename Kernel, typename Args>
  void launch(const LaunchShape& shape, const Args& args) {
    at::parallel_for(0, shape.grid_x, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bx = begin; bx < end; ++bx) {
        for (int32_t by = 0; by < shape.grid_y; ++by) {
          for (int32_t ty = 0; ty < shape.block_y; ++ty) {
            for (int32_t tx = 0; tx < shape.block_x; ++tx) {
              Kernel::run(ThreadIndex{bx, by, tx, ty, shape.block_x, shape.block_y}, args);
            }
          }
        }
      }
    });
  }
};

KernelVariant parse_variant(const std::string& variant) {
  TORCH_CHECK(variant == "generic" || variant == "fast",
              "lip2d emulation: variant must be 'generic' or 'fast', but got '", variant, "'");
  return variant == "fast" ? KernelVariant::Fast : KernelVariant::Generic;
}

}  // namespace

const char* lip2d_forward_emulated(const ForwardTensors& t, const CallGeometry& cg,
                                   const std::string& variant, bool force_int64) {
  EmulatedLauncher launcher;
  return launch_forward(launcher, t, cg, parse_variant(variant), force_int64);
}

const char* lip2d_backward_emulated(const BackwardTensors& t, const CallGeometry& cg,
                                    const std::string& variant, bool force_int64) {
  EmulatedLauncher launcher;
  return launch_backward(launcher, t, cg, parse_variant(variant), force_int64);
}

}  // namespace lip_cuda
