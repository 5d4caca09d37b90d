// The lip_cuda operators: schemas, argument checks, output allocation and
// the per-device registrations. Kernels live in lip2d_cpu.cpp (chosen by
// lip2d_cpu_launch.cpp) and lip2d_cuda.cu (and their CPU emulation in
// lip2d_emulate.cpp); the autograd is lip2d_autograd.cpp, and the fake
// (meta) kernels are bound in Python (lip_cuda/_ops.py).
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <array>
#include <limits>
#include <string>

#include "lip_kernels.h"

namespace lip_cuda {
namespace {

using at::IntArrayRef;
using at::Tensor;

// The kernel that ran last on this thread, for tests and benchmarks.
thread_local std::string last_kernel;

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

// Window statistics (max, 1 / weight sum) are kept in the accumulation type.
at::ScalarType stats_dtype(at::ScalarType x_dtype) {
  return x_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

bool is_half_type(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

// The dtypes the kernels take (at::isFloatingType also admits the float8 types).
bool is_kernel_dtype(at::ScalarType t) { return is_half_type(t) || t == at::kFloat || t == at::kDouble; }

// The dtype the kernels read the logit in: its own when a kernel exists for
// (x, logit), else float32 for half x (exact for half logits) and x's dtype
// otherwise. The output and grad_x always have x's dtype, grad_logit the
// logit's.
at::ScalarType kernel_logit_dtype(at::ScalarType x_dtype, at::ScalarType logit_dtype) {
  if (logit_dtype == x_dtype) return x_dtype;
  return is_half_type(x_dtype) ? at::kFloat : x_dtype;
}

LipGeometry check_inputs(const Tensor& x, const Tensor& logit, IntArrayRef kernel_size,
                         IntArrayRef stride, IntArrayRef padding, bool ceil_mode) {
  TORCH_CHECK(x.dim() == 4, "lip2d: expected x to be a 4-D (N, C, H, W) tensor, but got a ",
              x.dim(), "-D tensor of shape ", x.sizes());
  TORCH_CHECK(logit.dim() == 4 && (logit.size(0) == x.size(0) || logit.size(0) == 1) &&
                  (logit.size(1) == x.size(1) || logit.size(1) == 1) &&
                  logit.size(2) == x.size(2) && logit.size(3) == x.size(3),
              "lip2d: expected logit to have the same shape as x, ", x.sizes(),
              ", or size 1 in N and/or C (shared across the batch or the channels), but got "
              "shape ", logit.sizes());
  TORCH_CHECK(is_kernel_dtype(x.scalar_type()),
              "lip2d: expected x to have a floating-point dtype (float16, bfloat16, float32 or "
              "float64), but got ", x.scalar_type());
  TORCH_CHECK(is_kernel_dtype(logit.scalar_type()),
              "lip2d: expected logit to have a floating-point dtype (float16, bfloat16, float32 "
              "or float64), but got ", logit.scalar_type());
  TORCH_CHECK(logit.device() == x.device(), "lip2d: expected logit on the same device as x, but x is on ",
              x.device(), " and logit on ", logit.device());
  TORCH_CHECK(x.size(1) > 0 && x.size(2) > 0 && x.size(3) > 0,
              "lip2d: expected C, H and W of x to be non-zero (only the batch may be empty), "
              "but x has shape ", x.sizes());

  const auto k = pair_arg(kernel_size, "kernel_size");
  const auto s = pair_arg(stride, "stride");
  const auto p = pair_arg(padding, "padding");
  TORCH_CHECK(k[0] > 0 && k[1] > 0, "lip2d: expected kernel_size to be positive, but got ",
              kernel_size);
  TORCH_CHECK(s[0] > 0 && s[1] > 0, "lip2d: expected stride to be positive, but got ", stride);
  // bounds that keep the output-size arithmetic far from int64 overflow
  constexpr int64_t kMaxWindow = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(k[0] <= kMaxWindow && k[1] <= kMaxWindow && s[0] <= kMaxWindow && s[1] <= kMaxWindow,
              "lip2d: expected kernel_size and stride to be at most ", kMaxWindow, ", but got kernel_size ",
              kernel_size, " and stride ", stride);
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

// Strides of the dense logit of shape (Nl, Cl, H, W) in format fmt, with 0
// for a dimension it shares (broadcast); a full logit gets x's strides.
LogitStrides logit_strides(const LipGeometry& g, const Tensor& logit, bool channels_last) {
  const int64_t Cl = logit.size(1);
  const int64_t plane = g.H * g.W;
  LogitStrides ls{};
  ls.n = logit.size(0) == g.N ? Cl * plane : 0;
  ls.c = Cl == g.C ? (channels_last ? 1 : plane) : 0;
  ls.pixel = channels_last ? Cl : 1;
  return ls;
}

// Arguments checked and made dense in the kernels' format and dtypes.
struct PreparedCall {
  CallGeometry cg;
  at::MemoryFormat fmt;
  Tensor x, logit;  // logit in its kernel dtype
};

PreparedCall prepare(const Tensor& x, const Tensor& logit, IntArrayRef kernel_size,
                     IntArrayRef stride, IntArrayRef padding, bool ceil_mode) {
  const LipGeometry g = check_inputs(x, logit, kernel_size, stride, padding, ceil_mode);
  const at::MemoryFormat fmt = kernel_memory_format(x);
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  const at::ScalarType ltype = kernel_logit_dtype(x.scalar_type(), logit.scalar_type());
  return {CallGeometry{g, logit_strides(g, logit, channels_last), channels_last}, fmt,
          x.contiguous(fmt), logit.to(ltype).contiguous(fmt)};
}

// Returns (out, window_max, inv_weight_sum): the pooled values and, per
// output, its window's max logit and 1 / sum exp(l - max), which backward
// needs. launch(ForwardTensors, CallGeometry) runs the kernels and returns
// the name of the kernel that ran.
template <typename Launch>
std::tuple<Tensor, Tensor, Tensor> lip2d_forward(const Tensor& x, const Tensor& logit,
                                                 IntArrayRef kernel_size, IntArrayRef stride,
                                                 IntArrayRef padding, bool ceil_mode,
                                                 Launch&& launch) {
  const c10::OptionalDeviceGuard guard(x.device());
  const PreparedCall call = prepare(x, logit, kernel_size, stride, padding, ceil_mode);
  const LipGeometry& g = call.cg.g;
  const auto stats_options =
      x.options().dtype(stats_dtype(x.scalar_type())).memory_format(call.fmt);
  Tensor out = at::empty({g.N, g.C, g.OH, g.OW}, x.options().memory_format(call.fmt));
  Tensor window_max = at::empty({g.N, g.C, g.OH, g.OW}, stats_options);
  Tensor inv_weight_sum = at::empty({g.N, g.C, g.OH, g.OW}, stats_options);
  if (out.numel() > 0) {
    last_kernel = launch(ForwardTensors{call.x, call.logit, out, window_max, inv_weight_sum}, call.cg);
  }
  return {out, window_max, inv_weight_sum};
}

template <typename Launch>
std::tuple<Tensor, Tensor> lip2d_backward(const Tensor& grad_out, const Tensor& x,
                                          const Tensor& logit, const Tensor& out,
                                          const Tensor& window_max, const Tensor& inv_weight_sum,
                                          IntArrayRef kernel_size, IntArrayRef stride,
                                          IntArrayRef padding, bool ceil_mode, Launch&& launch) {
  const c10::OptionalDeviceGuard guard(x.device());
  const PreparedCall call = prepare(x, logit, kernel_size, stride, padding, ceil_mode);
  const LipGeometry& g = call.cg.g;
  const std::array<int64_t, 4> out_shape{g.N, g.C, g.OH, g.OW};
  const auto check_output_like = [&](const Tensor& t, const char* name, at::ScalarType dtype) {
    TORCH_CHECK(t.sizes() == IntArrayRef(out_shape), "lip2d_backward: expected ", name,
                " of shape ", IntArrayRef(out_shape), " (the output of lip2d_forward), but got ",
                t.sizes());
    TORCH_CHECK(t.device() == x.device(), "lip2d_backward: expected ", name,
                " on the same device as x (", x.device(), "), but got ", t.device());
    TORCH_CHECK(t.scalar_type() == dtype, "lip2d_backward: expected ", name, " of dtype ", dtype,
                " (as lip2d_forward returns it), but got ", t.scalar_type());
  };
  check_output_like(grad_out, "grad_out", x.scalar_type());
  check_output_like(out, "out", x.scalar_type());
  check_output_like(window_max, "window_max", stats_dtype(x.scalar_type()));
  check_output_like(inv_weight_sum, "inv_weight_sum", stats_dtype(x.scalar_type()));

  const auto options = x.options().memory_format(call.fmt);
  Tensor grad_x = at::empty(x.sizes(), options);
  // The kernels write an x-shaped grad_logit in the logit's kernel dtype;
  // a shared (broadcast) or converted logit gets it reduced and cast.
  const bool direct =
      logit.sizes() == x.sizes() && logit.scalar_type() == call.logit.scalar_type();
  Tensor grad_logit_full = at::empty(x.sizes(), options.dtype(call.logit.scalar_type()));
  if (x.numel() > 0) {
    last_kernel = launch(BackwardTensors{grad_out.contiguous(call.fmt), call.x, call.logit,
                                         out.contiguous(call.fmt), window_max.contiguous(call.fmt),
                                         inv_weight_sum.contiguous(call.fmt), grad_x,
                                         grad_logit_full},
                         call.cg);
  }
  if (direct) {
    return {grad_x, grad_logit_full};
  }
  Tensor grad_logit = at::empty(logit.sizes(), logit.options().memory_format(call.fmt));
  grad_logit.copy_(grad_logit_full.sum_to_size(logit.sizes()));
  return {grad_x, grad_logit};
}

std::tuple<Tensor, Tensor, Tensor> lip2d_forward_cpu_op(const Tensor& x, const Tensor& logit,
                                                        IntArrayRef kernel_size, IntArrayRef stride,
                                                        IntArrayRef padding, bool ceil_mode) {
  return lip2d_forward(x, logit, kernel_size, stride, padding, ceil_mode, &lip2d_forward_cpu);
}

std::tuple<Tensor, Tensor> lip2d_backward_cpu_op(const Tensor& grad_out, const Tensor& x,
                                                 const Tensor& logit, const Tensor& out,
                                                 const Tensor& window_max,
                                                 const Tensor& inv_weight_sum,
                                                 IntArrayRef kernel_size, IntArrayRef stride,
                                                 IntArrayRef padding, bool ceil_mode) {
  return lip2d_backward(grad_out, x, logit, out, window_max, inv_weight_sum, kernel_size, stride,
                        padding, ceil_mode, &lip2d_backward_cpu);
}

// A test-only operator's output, computed inside a larger buffer whose
// margins hold a byte pattern: a thread that writes past the tensor (a bound
// off by one) changes a margin, and the call fails. Past a plain tensor
// such a write corrupted the heap, which glibc caught only by luck (a
// mutation check of lip_kernel_threads.h: 5 such bugs, each an abort). The
// margins keep the tensor's alignment; its own elements start as the
// pattern too, so one that no thread writes keeps it.
class GuardedOutput {
 public:
  explicit GuardedOutput(const Tensor& target) : target_(target) {
    buffer_ = at::empty({target.numel() + 2 * kMargin},
                        target.options().memory_format(at::MemoryFormat::Contiguous));
    buffer_.view(at::kByte).fill_(kPattern);
    view_ = buffer_.as_strided(target.sizes(), target.strides(), kMargin);
  }
  const Tensor& view() const { return view_; }

  // Checks the margins and copies the result into the target.
  void finish(const char* name) {
    const Tensor bytes = buffer_.view(at::kByte);
    const int64_t margin = kMargin * buffer_.element_size();
    const int64_t inside = view_.numel() * buffer_.element_size();
    TORCH_CHECK(bytes.narrow(0, 0, margin).eq(kPattern).all().item<bool>() &&
                    bytes.narrow(0, margin + inside, margin).eq(kPattern).all().item<bool>(),
                "lip2d emulation: a kernel wrote outside its output ", name);
    target_.copy_(view_);
  }

 private:
  static constexpr int64_t kMargin = 64;  // elements: a multiple of every vector width
  static constexpr uint8_t kPattern = 0xA5;
  Tensor target_, buffer_, view_;
};

// Test-only: the CUDA kernels run on the CPU thread by thread, with the
// variant ("generic" or "fast") and 64-bit offsets forced, their outputs
// guarded. Same arguments and results as the real operators.
std::tuple<Tensor, Tensor, Tensor> lip2d_forward_emulated_op(
    const Tensor& x, const Tensor& logit, IntArrayRef kernel_size, IntArrayRef stride,
    IntArrayRef padding, bool ceil_mode, c10::string_view variant, bool force_int64) {
  const std::string v(variant);
  return lip2d_forward(x, logit, kernel_size, stride, padding, ceil_mode,
                       [&](const ForwardTensors& t, const CallGeometry& cg) {
                         GuardedOutput out(t.out), window_max(t.window_max), inv(t.inv_weight_sum);
                         const char* kernel = lip2d_forward_emulated(
                             ForwardTensors{t.x, t.logit, out.view(), window_max.view(), inv.view()},
                             cg, v, force_int64);
                         out.finish("out");
                         window_max.finish("window_max");
                         inv.finish("inv_weight_sum");
                         return kernel;
                       });
}

std::tuple<Tensor, Tensor> lip2d_backward_emulated_op(
    const Tensor& grad_out, const Tensor& x, const Tensor& logit, const Tensor& out,
    const Tensor& window_max, const Tensor& inv_weight_sum, IntArrayRef kernel_size,
    IntArrayRef stride, IntArrayRef padding, bool ceil_mode, c10::string_view variant,
    bool force_int64) {
  const std::string v(variant);
  return lip2d_backward(grad_out, x, logit, out, window_max, inv_weight_sum, kernel_size, stride,
                        padding, ceil_mode, [&](const BackwardTensors& t, const CallGeometry& cg) {
                          GuardedOutput grad_x(t.grad_x), grad_logit(t.grad_logit);
                          const char* kernel = lip2d_backward_emulated(
                              BackwardTensors{t.grad_out, t.x, t.logit, t.out, t.window_max,
                                              t.inv_weight_sum, grad_x.view(), grad_logit.view()},
                              cg, v, force_int64);
                          grad_x.finish("grad_x");
                          grad_logit.finish("grad_logit");
                          return kernel;
                        });
}

std::string lip2d_last_kernel() { return last_kernel; }

#ifdef WITH_CUDA
std::tuple<Tensor, Tensor, Tensor> lip2d_forward_cuda_op(const Tensor& x, const Tensor& logit,
                                                         IntArrayRef kernel_size,
                                                         IntArrayRef stride, IntArrayRef padding,
                                                         bool ceil_mode) {
  return lip2d_forward(x, logit, kernel_size, stride, padding, ceil_mode, &lip2d_forward_cuda);
}

std::tuple<Tensor, Tensor> lip2d_backward_cuda_op(const Tensor& grad_out, const Tensor& x,
                                                  const Tensor& logit, const Tensor& out,
                                                  const Tensor& window_max,
                                                  const Tensor& inv_weight_sum,
                                                  IntArrayRef kernel_size, IntArrayRef stride,
                                                  IntArrayRef padding, bool ceil_mode) {
  return lip2d_backward(grad_out, x, logit, out, window_max, inv_weight_sum, kernel_size, stride,
                        padding, ceil_mode, &lip2d_backward_cuda);
}
#endif

}  // namespace

TORCH_LIBRARY(lip_cuda, m) {
  m.def(
      "lip2d_forward(Tensor x, Tensor logit, int[2] kernel_size, int[2] stride, "
      "int[2] padding, bool ceil_mode) -> (Tensor out, Tensor window_max, Tensor inv_weight_sum)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "lip2d_backward(Tensor grad_out, Tensor x, Tensor logit, Tensor out, Tensor window_max, "
      "Tensor inv_weight_sum, int[2] kernel_size, int[2] stride, int[2] padding, bool ceil_mode) "
      "-> (Tensor grad_x, Tensor grad_logit)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "_lip2d_forward_emulated(Tensor x, Tensor logit, int[2] kernel_size, int[2] stride, "
      "int[2] padding, bool ceil_mode, str variant, bool force_int64) "
      "-> (Tensor out, Tensor window_max, Tensor inv_weight_sum)");
  m.def(
      "_lip2d_backward_emulated(Tensor grad_out, Tensor x, Tensor logit, Tensor out, "
      "Tensor window_max, Tensor inv_weight_sum, int[2] kernel_size, int[2] stride, "
      "int[2] padding, bool ceil_mode, str variant, bool force_int64) "
      "-> (Tensor grad_x, Tensor grad_logit)");
  // The kernel the last lip2d call on this thread ran (e.g. "fast_channels_last").
  m.def("_lip2d_last_kernel() -> str", &lip2d_last_kernel);
}

TORCH_LIBRARY_IMPL(lip_cuda, CPU, m) {
  m.impl("lip2d_forward", &lip2d_forward_cpu_op);
  m.impl("lip2d_backward", &lip2d_backward_cpu_op);
  m.impl("_lip2d_forward_emulated", &lip2d_forward_emulated_op);
  m.impl("_lip2d_backward_emulated", &lip2d_backward_emulated_op);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(lip_cuda, CUDA, m) {
  m.impl("lip2d_forward", &lip2d_forward_cuda_op);
  m.impl("lip2d_backward", &lip2d_backward_cuda_op);
}
#endif

}  // namespace lip_cuda
