// Autograd of the lip_cuda operators, in C++ (the Autograd dispatch key).
//
// Why C++ and not torch.library.register_autograd: a Python autograd kernel
// costs about 10 us of host time per forward and as much again per backward
// (measured on the CPU: docs/kernels.md, "What the GPU runs measured"). The GPU kernels of
// the small LIP-ResNet layers run for less than that, so a Python layer set
// their speed. The fake (meta) kernels stay in Python (lip_cuda/_ops.py);
// torch.compile traces this autograd like any other C++ one.
//
// Why autograd nodes written out, as PyTorch's generated ones are, and not a
// torch::autograd::Function: functorch's transforms (torch.func.grad, vjp,
// jacrev) refuse a C++ Function outright ("cannot use C++
// torch::autograd::Function with functorch transforms"), and a Function's
// node costs more host time (its context, saved-data map and output
// wrapping). A node also says what compiled autograd needs to trace it
// (compiled_args, apply_with_saved).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/dynamo/compiled_autograd.h>
#include <torch/library.h>

#include <array>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

namespace lip_cuda {
namespace {

using at::IntArrayRef;
using at::Tensor;
using torch::autograd::CompiledNodeArgs;
using torch::autograd::SavedVariable;
using torch::autograd::SwapSavedVariables;
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

// A new node in the pointer type this torch's autograd graph holds nodes
// by: std::shared_ptr up to torch 2.11 (the GPU machine's), c10::intrusive_ptr
// in later ones (torch 2.14 here). Generated nodes are made the same way.
template <class NodeType>
auto make_node() {
  using NodePointer = decltype(torch::autograd::Edge::function);
  if constexpr (std::is_same_v<NodePointer, std::shared_ptr<torch::autograd::Node>>) {
    // deleteNode (found by argument-dependent lookup: later torch has none)
    // frees long chains of nodes without deep recursion
    return std::shared_ptr<NodeType>(new NodeType(), [](NodeType* node) { deleteNode(node); });
  } else {
    return c10::make_intrusive<NodeType>();
  }
}

// Whether an autograd node must be recorded: grad mode on and an input
// that requires grad.
bool records_grad(std::initializer_list<const Tensor*> inputs) {
  if (!at::GradMode::is_enabled()) return false;
  for (const Tensor* t : inputs) {
    if (t->requires_grad()) return true;
  }
  return false;
}

// The gradients of x and the logit from grad_out (undefined where out
// took no part in the loss), each only where it is needed.
variable_list run_backward(const Tensor& grad_out, const Tensor& x, const Tensor& logit, const Tensor& out,
                           const Tensor& window_max, const Tensor& inv_weight_sum, IntArrayRef kernel_size,
                           IntArrayRef stride, IntArrayRef padding, bool ceil_mode, bool need_x,
                           bool need_logit) {
  if (!grad_out.defined() || !(need_x || need_logit)) return {Tensor(), Tensor()};
  // The kernels take grad_out in out's dtype. The autograd engine already
  // casts a gradient to its tensor's dtype (a float32 gradient of a
  // bfloat16 output arrives as bfloat16: test_output_gradient_in_another_dtype
  // passes without this cast); the cast is free where the dtypes agree and
  // keeps a caller that skips the engine's cast off the dtype check.
  auto [grad_x, grad_logit] = backward_op().call(grad_out.to(out.scalar_type()), x, logit, out, window_max,
                                                 inv_weight_sum, kernel_size, stride, padding, ceil_mode);
  return {need_x ? grad_x : Tensor(), need_logit ? grad_logit : Tensor()};
}

// The backward of lip2d_forward: grads of x and the logit (its next edges
// 0 and 1) from the gradient of out (its one input). The window statistics
// are not differentiable and get no history.
struct Lip2dForwardBackward : public torch::autograd::TraceableFunction {
  SavedVariable x, logit, out, window_max, inv_weight_sum;
  std::vector<int64_t> kernel_size, stride, padding;
  bool ceil_mode = false;

  std::string name() const override { return "Lip2dForwardBackward"; }

  // The saved tensors, for what every one of them goes through.
  std::array<SavedVariable*, 5> saved_variables() {
    return {&x, &logit, &out, &window_max, &inv_weight_sum};
  }
  std::array<const SavedVariable*, 5> saved_variables() const {
    return {&x, &logit, &out, &window_max, &inv_weight_sum};
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* v : saved_variables()) v->reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    return run_backward(grads[0], x.unpack(), logit.unpack(), out.unpack(getptr()), window_max.unpack(),
                        inv_weight_sum.unpack(), kernel_size, stride, padding, ceil_mode,
                        task_should_compute_output(0), task_should_compute_output(1));
  }

  void compiled_args(CompiledNodeArgs& args) const override {
    for (const SavedVariable* v : saved_variables()) {
      args.collect(*v, /*is_output=*/v == &out);
    }
    args.collect(kernel_size);
    args.collect(stride);
    args.collect(padding);
    args.collect(ceil_mode);
  }

  // Compiled autograd traces a graph's nodes with placeholder tensors, so
  // this node's backward goes into its graph as a function of IValues
  // (backward_functional), as PyTorch's own nodes and C++ Functions do.
  variable_list apply_with_saved(const variable_list& grads, SwapSavedVariables& saved) override {
    namespace ca = torch::dynamo::autograd;
    for (SavedVariable* v : saved_variables()) saved.before(*v);
    ca::PackedArgs packed;
    packed.pack(x.unpack());
    packed.pack(logit.unpack());
    packed.pack(out.unpack(getptr()));
    packed.pack(window_max.unpack());
    packed.pack(inv_weight_sum.unpack());
    packed.pack(kernel_size);
    packed.pack(stride);
    packed.pack(padding);
    packed.pack(ceil_mode);
    packed.pack(std::vector<bool>{task_should_compute_output(0), task_should_compute_output(1)});
    const std::vector<c10::IValue>& args = packed.vec();
    std::vector<at::TypePtr> schema;
    schema.reserve(args.size());
    for (const c10::IValue& arg : args) schema.push_back(arg.isTensor() ? at::TensorType::get() : arg.type());
    const auto& compiler = ca::getPyCompilerInterface();
    const std::string fn_name =
        compiler->bind_function(saved.get_py_compiler(), name(), backward_functional, schema,
                                /*is_custom_function=*/true, /*is_traceable=*/true);
    variable_list result = compiler->call_function(
        saved.get_py_compiler(), "apply_functional", fn_name, grads, args,
        ca::IValuePacker<std::vector<std::optional<torch::autograd::InputMetadata>>>::pack(
            ca::get_input_metadata(next_edges())));
    for (SavedVariable* v : saved_variables()) saved.after(*v);
    return result;
  }

  // apply's work on what apply_with_saved packs.
  static variable_list backward_functional(const variable_list& grads, const std::vector<c10::IValue>& args) {
    torch::dynamo::autograd::PackedArgs packed(args);
    const auto x = packed.unpack<Tensor>();
    const auto logit = packed.unpack<Tensor>();
    const auto out = packed.unpack<Tensor>();
    const auto window_max = packed.unpack<Tensor>();
    const auto inv_weight_sum = packed.unpack<Tensor>();
    const auto kernel_size = packed.unpack<std::vector<int64_t>>();
    const auto stride = packed.unpack<std::vector<int64_t>>();
    const auto padding = packed.unpack<std::vector<int64_t>>();
    const auto ceil_mode = packed.unpack<bool>();
    const auto needed = packed.unpack<std::vector<bool>>();
    return run_backward(grads[0], x, logit, out, window_max, inv_weight_sum, kernel_size, stride, padding,
                        ceil_mode, needed[0], needed[1]);
  }
};

// lip2d_backward is differentiable only once: the node recorded when a
// backward runs with create_graph=True says so if it is ever reached.
struct Lip2dBackwardBackward : public torch::autograd::TraceableFunction {
  std::string name() const override { return "Lip2dBackwardBackward"; }

  variable_list apply(variable_list&&) override {
    TORCH_CHECK(false,
                "lip_cuda: double backward (grad of grad) of lip2d is not supported; "
                "call torch.autograd.grad without create_graph=True");
    return {};
  }

  void compiled_args(CompiledNodeArgs&) const override {}

  variable_list apply_with_saved(const variable_list& grads, SwapSavedVariables&) override {
    return apply(variable_list(grads));
  }
};

std::tuple<Tensor, Tensor, Tensor> lip2d_forward_autograd(const Tensor& x, const Tensor& logit,
                                                          IntArrayRef kernel_size,
                                                          IntArrayRef stride, IntArrayRef padding,
                                                          bool ceil_mode) {
  check_no_forward_ad({&x, &logit});
  const bool record = records_grad({&x, &logit});
  auto [out, window_max, inv_weight_sum] = [&] {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return forward_op().call(x, logit, kernel_size, stride, padding, ceil_mode);
  }();
  if (record) {
    auto node = make_node<Lip2dForwardBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(x, logit));
    node->x = SavedVariable(x, false);
    node->logit = SavedVariable(logit, false);
    node->window_max = SavedVariable(window_max, false);
    node->inv_weight_sum = SavedVariable(inv_weight_sum, false);
    node->kernel_size = kernel_size.vec();
    node->stride = stride.vec();
    node->padding = padding.vec();
    node->ceil_mode = ceil_mode;
    torch::autograd::set_history(out, node);
    node->out = SavedVariable(out, true);  // after set_history: out is the node's own output
  }
  return {out, window_max, inv_weight_sum};
}

std::tuple<Tensor, Tensor> lip2d_backward_autograd(const Tensor& grad_out, const Tensor& x,
                                                   const Tensor& logit, const Tensor& out,
                                                   const Tensor& window_max,
                                                   const Tensor& inv_weight_sum,
                                                   IntArrayRef kernel_size, IntArrayRef stride,
                                                   IntArrayRef padding, bool ceil_mode) {
  check_no_forward_ad({&grad_out, &x, &logit, &out, &window_max, &inv_weight_sum});
  // lip2d's own backward pass runs with grad mode off unless create_graph=True
  const bool record = records_grad({&grad_out, &x, &logit, &out, &window_max, &inv_weight_sum});
  auto [grad_x, grad_logit] = [&] {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return backward_op().call(grad_out, x, logit, out, window_max, inv_weight_sum, kernel_size, stride,
                              padding, ceil_mode);
  }();
  if (record) {
    auto node = make_node<Lip2dBackwardBackward>();
    node->set_next_edges(
        torch::autograd::collect_next_edges(grad_out, x, logit, out, window_max, inv_weight_sum));
    torch::autograd::set_history(grad_x, node);
    torch::autograd::set_history(grad_logit, node);
  }
  return {grad_x, grad_logit};
}

}  // namespace

TORCH_LIBRARY_IMPL(lip_cuda, Autograd, m) {
  m.impl("lip2d_forward", &lip2d_forward_autograd);
  m.impl("lip2d_backward", &lip2d_backward_autograd);
}

}  // namespace lip_cuda
