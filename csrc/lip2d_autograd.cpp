// Autograd of the lip_cuda operators, in C++ (the Autograd dispatch key).
//
// Why C++ and not torch.library.register_autograd: a Python autograd kernel
// costs about 10 us of host time per forward and as much again per backward
// (measured on the CPU: docs/kernels.md, "What the GPU runs measured"). The GPU kernels of
// the small LIP-ResNet layers run for less than that, so a Python layer set
// their speed. The fake (meta) kernels stay in Python (lip_cuda/_ops.py);
// torch.compile traces this autograd like any other C++ one.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace lip_cuda {
namespace {

using at::IntArrayRef;
using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardSignature = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, IntArrayRef,
                                                            IntArrayRef, IntArrayRef, bool);
using BackwardSignature = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                     const Tensor&, const Tensor&, const Tensor&,
                                                     IntArrayRef, IntArrayRef, IntArrayRef, bool);

// The operators below the Autograd key, looked up once.
const c10::TypedOperatorHandle<ForwardSignature>& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("lip_cuda::lip2d_forward", "")
                              .typed<ForwardSignature>();
  return op;
}

const c10::TypedOperatorHandle<BackwardSignature>& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lip_cuda::lip2d_backward", "")
                             .typed<BackwardSignature>();
  return op;
}

// The pooling arguments a backward needs, kept in the context.
void save_pool_args(AutogradContext* ctx, IntArrayRef kernel_size, IntArrayRef stride,
                    IntArrayRef padding, bool ceil_mode) {
  ctx->saved_data["kernel_size"] = kernel_size.vec();
  ctx->saved_data["stride"] = stride.vec();
  ctx->saved_data["padding"] = padding.vec();
  ctx->saved_data["ceil_mode"] = ceil_mode;
}

// Forward-mode AD (torch.func.jvp, jacfwd, torch.autograd.forward_ad) has
// no formula here: without this check the tangents of x and the logit were
// dropped and the output's came out as zeros, a silently wrong answer.
// Level 0 is the one forward AD level that tensors carry outside functorch,
// and functorch's jvp runs on it too.
void check_no_forward_ad(std::initializer_list<const Tensor*> inputs) {
  for (const Tensor* t : inputs) {
    TORCH_CHECK(!t->defined() || !t->_fw_grad(/*level=*/0).defined(),
                "lip_cuda: forward-mode AD (torch.func.jvp, torch.func.jacfwd, "
                "torch.autograd.forward_ad) of lip2d is not supported; use reverse mode "
                "(torch.autograd.grad or backward())");
  }
}

class Lip2dForward : public torch::autograd::Function<Lip2dForward> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& logit,
                               IntArrayRef kernel_size, IntArrayRef stride, IntArrayRef padding,
                               bool ceil_mode) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, window_max, inv_weight_sum] =
        forward_op().call(x, logit, kernel_size, stride, padding, ceil_mode);
    ctx->save_for_backward({x, logit, out, window_max, inv_weight_sum});
    save_pool_args(ctx, kernel_size, stride, padding, ceil_mode);
    // The two statistics are not differentiable, but not marked so here:
    // compiled autograd (torch._dynamo.compiled_autograd) asserts that a
    // C++ autograd node has no marked outputs, and failed with an internal
    // assert on a graph holding this one. lip2d_forward_autograd returns
    // them detached instead.
    // backward needs no zero-filled gradients for the two statistics (two
    // output-sized allocations and fills a call, 4% of a small layer's
    // backward in a timer profile)
    ctx->set_materialize_grads(false);
    return {out, window_max, inv_weight_sum};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor& out = saved[2];
    const std::vector<int64_t> kernel_size = ctx->saved_data["kernel_size"].toIntVector();
    const std::vector<int64_t> stride = ctx->saved_data["stride"].toIntVector();
    const std::vector<int64_t> padding = ctx->saved_data["padding"].toIntVector();
    if (!grads[0].defined()) {  // out took no part in the loss
      return {Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    }
    // The kernels take grad_out in out's dtype. The autograd engine already
    // casts a gradient to its tensor's dtype (a float32 gradient of a
    // bfloat16 output arrives as bfloat16: test_output_gradient_in_another_dtype
    // passes without this cast); the cast is free where the dtypes agree and
    // keeps a caller that skips the engine's cast off the dtype check.
    auto [grad_x, grad_logit] =
        backward_op().call(grads[0].to(out.scalar_type()), saved[0], saved[1], out, saved[3],
                           saved[4], kernel_size, stride, padding, ctx->saved_data["ceil_mode"].toBool());
    return {grad_x, grad_logit, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// lip2d_backward is differentiable only once: its own backward says so.
class Lip2dBackward : public torch::autograd::Function<Lip2dBackward> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& grad_out, const Tensor& x,
                               const Tensor& logit, const Tensor& out, const Tensor& window_max,
                               const Tensor& inv_weight_sum, IntArrayRef kernel_size,
                               IntArrayRef stride, IntArrayRef padding, bool ceil_mode) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [grad_x, grad_logit] = backward_op().call(grad_out, x, logit, out, window_max,
                                                   inv_weight_sum, kernel_size, stride, padding,
                                                   ceil_mode);
    return {grad_x, grad_logit};
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false,
                "lip_cuda: double backward (grad of grad) of lip2d is not supported; "
                "call torch.autograd.grad without create_graph=True");
    return {};
  }
};

std::tuple<Tensor, Tensor, Tensor> lip2d_forward_autograd(const Tensor& x, const Tensor& logit,
                                                          IntArrayRef kernel_size,
                                                          IntArrayRef stride, IntArrayRef padding,
                                                          bool ceil_mode) {
  check_no_forward_ad({&x, &logit});
  if (!at::GradMode::is_enabled() || !(x.requires_grad() || logit.requires_grad())) {
    // nothing to differentiate (inference): skip the autograd node, its
    // context and saved arguments, a few microseconds a call
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return forward_op().call(x, logit, kernel_size, stride, padding, ceil_mode);
  }
  const variable_list outs = Lip2dForward::apply(x, logit, kernel_size, stride, padding, ceil_mode);
  return {outs[0], outs[1].detach(), outs[2].detach()};
}

std::tuple<Tensor, Tensor> lip2d_backward_autograd(const Tensor& grad_out, const Tensor& x,
                                                   const Tensor& logit, const Tensor& out,
                                                   const Tensor& window_max,
                                                   const Tensor& inv_weight_sum,
                                                   IntArrayRef kernel_size, IntArrayRef stride,
                                                   IntArrayRef padding, bool ceil_mode) {
  check_no_forward_ad({&grad_out, &x, &logit, &out, &window_max, &inv_weight_sum});
  // as in the forward; this is the case of lip2d's own backward pass, which
  // runs with grad mode off unless create_graph=True
  if (!at::GradMode::is_enabled() ||
      !(grad_out.requires_grad() || x.requires_grad() || logit.requires_grad() || out.requires_grad() ||
        window_max.requires_grad() || inv_weight_sum.requires_grad())) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return backward_op().call(grad_out, x, logit, out, window_max, inv_weight_sum, kernel_size, stride,
                              padding, ceil_mode);
  }
  const variable_list grads = Lip2dBackward::apply(grad_out, x, logit, out, window_max,
                                                   inv_weight_sum, kernel_size, stride, padding,
                                                   ceil_mode);
  return {grads[0], grads[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(lip_cuda, Autograd, m) {
  m.impl("lip2d_forward", &lip2d_forward_autograd);
  m.impl("lip2d_backward", &lip2d_backward_autograd);
}

}  // namespace lip_cuda
