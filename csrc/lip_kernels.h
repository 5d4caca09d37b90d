// Launchers of the LIP kernels, one pair per device. The operator code in
// lip2d.cpp validates the arguments and allocates; a launcher gets tensors
// that are dense in one memory format (channels_last or contiguous), of one
// dtype (lse: float32 for half and bfloat16) on one device, with N*C > 0.
#pragma once

#include <ATen/core/Tensor.h>

#include "lip_window.h"

namespace lip_cuda {

void lip2d_forward_cpu(const at::Tensor& x, const at::Tensor& logit, const LipGeometry& geom,
                       bool channels_last, const at::Tensor& out, const at::Tensor& lse);

void lip2d_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& logit,
                        const at::Tensor& out, const at::Tensor& lse, const LipGeometry& geom,
                        bool channels_last, const at::Tensor& grad_x,
                        const at::Tensor& grad_logit);

#ifdef WITH_CUDA
void lip2d_forward_cuda(const at::Tensor& x, const at::Tensor& logit, const LipGeometry& geom,
                        bool channels_last, const at::Tensor& out, const at::Tensor& lse);

void lip2d_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                         const at::Tensor& logit, const at::Tensor& out, const at::Tensor& lse,
                         const LipGeometry& geom, bool channels_last, const at::Tensor& grad_x,
                         const at::Tensor& grad_logit);
#endif

}  // namespace lip_cuda
