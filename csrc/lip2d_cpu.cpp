// CPU kernels: at::parallel_for over output (forward) or input (backward)
// elements in memory order, each one the shared per-element step of
// lip_window.h. Offsets are int64: on the CPU they cost nothing extra.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "lip_kernels.h"

namespace lip_cuda {
namespace {

// Enough elements per task to amortise the thread hand-off; each element
// costs about kH * kW exps.
constexpr int64_t kGrainSize = 4096;

template <bool ChannelsLast, typename scalar_t>
void forward_loop(const at::Tensor& x, const at::Tensor& logit, const LipGeometry& geom,
                  const at::Tensor& out, const at::Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const scalar_t* l_ptr = logit.const_data_ptr<scalar_t>();
  scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
  acc_t* lse_ptr = lse.mutable_data_ptr<acc_t>();
  at::parallel_for(0, out.numel(), kGrainSize, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      lip_forward_element<ChannelsLast, scalar_t, acc_t, int64_t>(o, geom, x_ptr, l_ptr, out_ptr,
                                                                  lse_ptr);
    }
  });
}

template <bool ChannelsLast, typename scalar_t>
void backward_loop(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& logit,
                   const at::Tensor& out, const at::Tensor& lse, const LipGeometry& geom,
                   const at::Tensor& grad_x, const at::Tensor& grad_logit) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* g_ptr = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const scalar_t* l_ptr = logit.const_data_ptr<scalar_t>();
  const scalar_t* out_ptr = out.const_data_ptr<scalar_t>();
  const acc_t* lse_ptr = lse.const_data_ptr<acc_t>();
  scalar_t* gx_ptr = grad_x.mutable_data_ptr<scalar_t>();
  scalar_t* gl_ptr = grad_logit.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, x.numel(), kGrainSize, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      lip_backward_element<ChannelsLast, scalar_t, acc_t, int64_t>(
          i, geom, g_ptr, x_ptr, l_ptr, out_ptr, lse_ptr, gx_ptr, gl_ptr);
    }
  });
}

}  // namespace

void lip2d_forward_cpu(const at::Tensor& x, const at::Tensor& logit, const LipGeometry& geom,
                       bool channels_last, const at::Tensor& out, const at::Tensor& lse) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lip2d_forward_cpu", [&] {
    if (channels_last) {
      forward_loop<true, scalar_t>(x, logit, geom, out, lse);
    } else {
      forward_loop<false, scalar_t>(x, logit, geom, out, lse);
    }
  });
}

void lip2d_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& logit,
                        const at::Tensor& out, const at::Tensor& lse, const LipGeometry& geom,
                        bool channels_last, const at::Tensor& grad_x,
                        const at::Tensor& grad_logit) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lip2d_backward_cpu", [&] {
    if (channels_last) {
      backward_loop<true, scalar_t>(grad_out, x, logit, out, lse, geom, grad_x, grad_logit);
    } else {
      backward_loop<false, scalar_t>(grad_out, x, logit, out, lse, geom, grad_x, grad_logit);
    }
  });
}

}  // namespace lip_cuda
