// CUDA kernels and their launchers: one thread per output element forward,
// one per input element backward (a gather: no atomics, deterministic).
// Threads are laid out in memory order, so neighbours read neighbouring
// elements along W (contiguous) or C (channels_last) and the overlapping
// window rows are shared through L1/L2 instead of re-read from DRAM.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

#include "lip_kernels.h"

namespace lip_cuda {
namespace {

constexpr int kThreads = 256;

template <bool ChannelsLast, typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    lip2d_forward_kernel(index_t numel, LipGeometry geom, const scalar_t* __restrict__ x,
                         const scalar_t* __restrict__ logit, scalar_t* __restrict__ out,
                         acc_t* __restrict__ lse) {
  const int64_t o = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (o >= numel) {
    return;
  }
  lip_forward_element<ChannelsLast, scalar_t, acc_t, index_t>(static_cast<index_t>(o), geom, x,
                                                               logit, out, lse);
}

template <bool ChannelsLast, typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    lip2d_backward_kernel(index_t numel, LipGeometry geom, const scalar_t* __restrict__ grad_out,
                          const scalar_t* __restrict__ x, const scalar_t* __restrict__ logit,
                          const scalar_t* __restrict__ out, const acc_t* __restrict__ lse,
                          scalar_t* __restrict__ grad_x, scalar_t* __restrict__ grad_logit) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= numel) {
    return;
  }
  lip_backward_element<ChannelsLast, scalar_t, acc_t, index_t>(
      static_cast<index_t>(i), geom, grad_out, x, logit, out, lse, grad_x, grad_logit);
}

unsigned int grid_size(int64_t numel) {
  const int64_t blocks = (numel + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "lip2d: tensor of ", numel,
              " elements is too large for one CUDA launch");
  return static_cast<unsigned int>(blocks);
}

// 32-bit offsets are faster. The output can outnumber the input (k=2, s=1,
// p=1 gives (H+1) x (W+1)), so both count.
bool needs_64bit_index(const at::Tensor& input, const at::Tensor& output) {
  const int64_t limit = std::numeric_limits<int32_t>::max();
  return input.numel() > limit || output.numel() > limit;
}

template <typename scalar_t, typename index_t>
void launch_forward(const at::Tensor& x, const at::Tensor& logit, const LipGeometry& geom,
                    bool channels_last, const at::Tensor& out, const at::Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t numel = out.numel();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  auto kernel = channels_last ? lip2d_forward_kernel<true, scalar_t, acc_t, index_t>
                              : lip2d_forward_kernel<false, scalar_t, acc_t, index_t>;
  kernel<<<grid_size(numel), kThreads, 0, stream>>>(
      static_cast<index_t>(numel), geom, x.const_data_ptr<scalar_t>(),
      logit.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
      lse.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename index_t>
void launch_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& logit,
                     const at::Tensor& out, const at::Tensor& lse, const LipGeometry& geom,
                     bool channels_last, const at::Tensor& grad_x, const at::Tensor& grad_logit) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t numel = x.numel();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  auto kernel = channels_last ? lip2d_backward_kernel<true, scalar_t, acc_t, index_t>
                              : lip2d_backward_kernel<false, scalar_t, acc_t, index_t>;
  kernel<<<grid_size(numel), kThreads, 0, stream>>>(
      static_cast<index_t>(numel), geom, grad_out.const_data_ptr<scalar_t>(),
      x.const_data_ptr<scalar_t>(), logit.const_data_ptr<scalar_t>(),
      out.const_data_ptr<scalar_t>(), lse.const_data_ptr<acc_t>(),
      grad_x.mutable_data_ptr<scalar_t>(), grad_logit.mutable_data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void lip2d_forward_cuda(const at::Tensor& x, const at::Tensor& logit, const LipGeometry& geom,
                        bool channels_last, const at::Tensor& out, const at::Tensor& lse) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lip2d_forward_cuda", [&] {
    if (needs_64bit_index(x, out)) {
      launch_forward<scalar_t, int64_t>(x, logit, geom, channels_last, out, lse);
    } else {
      launch_forward<scalar_t, int32_t>(x, logit, geom, channels_last, out, lse);
    }
  });
}

void lip2d_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                         const at::Tensor& logit, const at::Tensor& out, const at::Tensor& lse,
                         const LipGeometry& geom, bool channels_last, const at::Tensor& grad_x,
                         const at::Tensor& grad_logit) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lip2d_backward_cuda", [&] {
    if (needs_64bit_index(x, out)) {
      launch_backward<scalar_t, int64_t>(grad_out, x, logit, out, lse, geom, channels_last,
                                         grad_x, grad_logit);
    } else {
      launch_backward<scalar_t, int32_t>(grad_out, x, logit, out, lse, geom, channels_last,
                                         grad_x, grad_logit);
    }
  });
}

}  // namespace lip_cuda
