// The lip_cuda operators: schemas, argument checks, output allocation and
// the per-device registrations. Kernels live in lip2d_cpu.cpp and
// lip2d_cuda.cu; the autograd formula and the fake (meta) kernels are bound
// in Python (lip_cuda/_ops.py).
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <array>

#include "lip_kernels.h"

namespace lip_cuda {
namespace {

using at::IntArrayRef;
using at::Tensor;

std::array<int64_t, 2> pair_arg(IntArrayRef values, const char* name) {
  TORCH_CHECK(values.size() == 2, "lip2d: expected ", name,
              " to hold 2 values (height, width), but got ", values.size(), ": ", values);
  return {values[0], values[1]};
}

// Dense layout the kernels run in: channels_last when x is already dense in
// it, contiguous otherwise (avg_pool2d's rule for dense inputs). The fake
// kernels in Python apply the same rule.
at::MemoryFormat kernel_memory_format(const Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous()
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

at::ScalarType lse_dtype(at::ScalarType dtype) {
  return dtype == at::kHalf || dtype == at::kBFloat16 ? at::kFloat : dtype;
}

void check_same(const Tensor& t, const char* name, const Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), "lip2d: expected ", name,
              " on the same device as x, but x is on ", x.device(), " and ", name, " on ",
              t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "lip2d: expected ", name,
              " to have the same dtype as x (", x.scalar_type(), "), but got ", t.scalar_type(),
              "; lip_cuda.lip2d promotes mixed floating dtypes for you");
}

LipGeometry check_inputs(const Tensor& x, const Tensor& logit, IntArrayRef kernel_size,
                         IntArrayRef stride, IntArrayRef padding, bool ceil_mode) {
  TORCH_CHECK(x.dim() == 4, "lip2d: expected x to be a 4-D (N, C, H, W) tensor, but got a ",
              x.dim(), "-D tensor of shape ", x.sizes());
  TORCH_CHECK(logit.sizes() == x.sizes(),
              "lip2d: expected logit to have the same shape as x, but x has shape ", x.sizes(),
              " and logit has shape ", logit.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()),
              "lip2d: expected x to have a floating-point dtype (float16, bfloat16, float32 or "
              "float64), but got ", x.scalar_type());
  check_same(logit, "logit", x);
  TORCH_CHECK(x.size(1) > 0 && x.size(2) > 0 && x.size(3) > 0,
              "lip2d: expected C, H and W of x to be non-zero (only the batch may be empty), "
              "but x has shape ", x.sizes());

  const auto k = pair_arg(kernel_size, "kernel_size");
  const auto s = pair_arg(stride, "stride");
  const auto p = pair_arg(padding, "padding");
  TORCH_CHECK(k[0] > 0 && k[1] > 0, "lip2d: expected kernel_size to be positive, but got ",
              kernel_size);
  TORCH_CHECK(s[0] > 0 && s[1] > 0, "lip2d: expected stride to be positive, but got ", stride);
  TORCH_CHECK(p[0] >= 0 && p[1] >= 0 && p[0] <= k[0] / 2 && p[1] <= k[1] / 2,
              "lip2d: expected padding to be non-negative and at most half the kernel size, "
              "but got padding ", padding, " with kernel_size ", kernel_size);

  LipGeometry g{};
  g.N = x.size(0);
  g.C = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  g.kH = k[0];
  g.kW = k[1];
  g.sH = s[0];
  g.sW = s[1];
  g.pH = p[0];
  g.pW = p[1];
  g.OH = pooled_size(g.H, g.kH, g.sH, g.pH, ceil_mode);
  g.OW = pooled_size(g.W, g.kW, g.sW, g.pW, ceil_mode);
  TORCH_CHECK(g.OH > 0 && g.OW > 0, "lip2d: the output would be empty: kernel_size ",
              kernel_size, " is larger than the padded input (H, W) = (", g.H, ", ", g.W,
              ") with padding ", padding);
  return g;
}

using ForwardLauncher = void (*)(const Tensor&, const Tensor&, const LipGeometry&, bool,
                                 const Tensor&, const Tensor&);
using BackwardLauncher = void (*)(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                  const Tensor&, const LipGeometry&, bool, const Tensor&,
                                  const Tensor&);

// Returns (out, lse): the pooled values and, per output, the log-sum-exp of
// its window's logits, which backward needs.
std::tuple<Tensor, Tensor> lip2d_forward(const Tensor& x, const Tensor& logit,
                                         IntArrayRef kernel_size, IntArrayRef stride,
                                         IntArrayRef padding, bool ceil_mode,
                                         ForwardLauncher launch) {
  const LipGeometry g = check_inputs(x, logit, kernel_size, stride, padding, ceil_mode);
  const at::MemoryFormat fmt = kernel_memory_format(x);
  const c10::OptionalDeviceGuard guard(x.device());
  const Tensor x_dense = x.contiguous(fmt);
  const Tensor logit_dense = logit.contiguous(fmt);
  Tensor out = at::empty({g.N, g.C, g.OH, g.OW}, x.options().memory_format(fmt));
  Tensor lse = at::empty({g.N, g.C, g.OH, g.OW},
                         x.options().dtype(lse_dtype(x.scalar_type())).memory_format(fmt));
  if (out.numel() > 0) {
    launch(x_dense, logit_dense, g, fmt == at::MemoryFormat::ChannelsLast, out, lse);
  }
  return {out, lse};
}

std::tuple<Tensor, Tensor> lip2d_backward(const Tensor& grad_out, const Tensor& x,
                                          const Tensor& logit, const Tensor& out,
                                          const Tensor& lse, IntArrayRef kernel_size,
                                          IntArrayRef stride, IntArrayRef padding,
                                          bool ceil_mode, BackwardLauncher launch) {
  const LipGeometry g = check_inputs(x, logit, kernel_size, stride, padding, ceil_mode);
  const std::array<int64_t, 4> out_shape{g.N, g.C, g.OH, g.OW};
  const auto check_output_like = [&](const Tensor& t, const char* name) {
    TORCH_CHECK(t.sizes() == IntArrayRef(out_shape), "lip2d_backward: expected ", name,
                " of shape ", IntArrayRef(out_shape), " (the output of lip2d_forward), but got ",
                t.sizes());
    TORCH_CHECK(t.device() == x.device(), "lip2d_backward: expected ", name,
                " on the same device as x (", x.device(), "), but got ", t.device());
  };
  check_output_like(grad_out, "grad_out");
  check_output_like(out, "out");
  check_output_like(lse, "lse");
  check_same(grad_out, "grad_out", x);
  check_same(out, "out", x);
  TORCH_CHECK(lse.scalar_type() == lse_dtype(x.scalar_type()), "lip2d_backward: expected lse of dtype ",
              lse_dtype(x.scalar_type()), " (as lip2d_forward returns it), but got ",
              lse.scalar_type());

  const at::MemoryFormat fmt = kernel_memory_format(x);
  const c10::OptionalDeviceGuard guard(x.device());
  const Tensor x_dense = x.contiguous(fmt);
  Tensor grad_x = at::empty(x.sizes(), x.options().memory_format(fmt));
  Tensor grad_logit = at::empty(x.sizes(), x.options().memory_format(fmt));
  if (x.numel() > 0) {
    launch(grad_out.contiguous(fmt), x_dense, logit.contiguous(fmt), out.contiguous(fmt),
           lse.contiguous(fmt), g, fmt == at::MemoryFormat::ChannelsLast, grad_x, grad_logit);
  }
  return {grad_x, grad_logit};
}

std::tuple<Tensor, Tensor> lip2d_forward_cpu_op(const Tensor& x, const Tensor& logit,
                                                IntArrayRef kernel_size, IntArrayRef stride,
                                                IntArrayRef padding, bool ceil_mode) {
  return lip2d_forward(x, logit, kernel_size, stride, padding, ceil_mode, &lip2d_forward_cpu);
}

std::tuple<Tensor, Tensor> lip2d_backward_cpu_op(const Tensor& grad_out, const Tensor& x,
                                                 const Tensor& logit, const Tensor& out,
                                                 const Tensor& lse, IntArrayRef kernel_size,
                                                 IntArrayRef stride, IntArrayRef padding,
                                                 bool ceil_mode) {
  return lip2d_backward(grad_out, x, logit, out, lse, kernel_size, stride, padding, ceil_mode,
                        &lip2d_backward_cpu);
}

#ifdef WITH_CUDA
std::tuple<Tensor, Tensor> lip2d_forward_cuda_op(const Tensor& x, const Tensor& logit,
                                                 IntArrayRef kernel_size, IntArrayRef stride,
                                                 IntArrayRef padding, bool ceil_mode) {
  return lip2d_forward(x, logit, kernel_size, stride, padding, ceil_mode, &lip2d_forward_cuda);
}

std::tuple<Tensor, Tensor> lip2d_backward_cuda_op(const Tensor& grad_out, const Tensor& x,
                                                  const Tensor& logit, const Tensor& out,
                                                  const Tensor& lse, IntArrayRef kernel_size,
                                                  IntArrayRef stride, IntArrayRef padding,
                                                  bool ceil_mode) {
  return lip2d_backward(grad_out, x, logit, out, lse, kernel_size, stride, padding, ceil_mode,
                        &lip2d_backward_cuda);
}
#endif

}  // namespace

TORCH_LIBRARY(lip_cuda, m) {
  m.def(
      "lip2d_forward(Tensor x, Tensor logit, int[2] kernel_size, int[2] stride, "
      "int[2] padding, bool ceil_mode) -> (Tensor out, Tensor lse)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "lip2d_backward(Tensor grad_out, Tensor x, Tensor logit, Tensor out, Tensor lse, "
      "int[2] kernel_size, int[2] stride, int[2] padding, bool ceil_mode) "
      "-> (Tensor grad_x, Tensor grad_logit)",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(lip_cuda, CPU, m) {
  m.impl("lip2d_forward", &lip2d_forward_cpu_op);
  m.impl("lip2d_backward", &lip2d_backward_cpu_op);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(lip_cuda, CUDA, m) {
  m.impl("lip2d_forward", &lip2d_forward_cuda_op);
  m.impl("lip2d_backward", &lip2d_backward_cuda_op);
}
#endif

}  // namespace lip_cuda
