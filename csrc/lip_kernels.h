// What the operator code (lip2d.cpp) hands to the kernels of each device.
// The tensors are dense in one memory format (channels_last or contiguous),
// on one device; x's dtype is any floating type, the logit's is x's or, for
// float16/bfloat16 x, float32 (see dispatch_dtypes); the window statistics
// are float32 (float64 for float64 x); N * C > 0.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <string>
#include <type_traits>

#include "lip_kernel_threads.h"

namespace lip_cuda {

struct CallGeometry {
  LipGeometry g;
  LogitStrides ls;
  bool channels_last;
};

struct ForwardTensors {
  at::Tensor x, logit, out, window_max, inv_weight_sum;
};

// grad_logit is x-shaped in the logit's kernel dtype (see BackwardArgs).
struct BackwardTensors {
  at::Tensor grad_out, x, logit, out, window_max, inv_weight_sum, grad_x, grad_logit;
};

// Calls fn(x_t{}, l_t{}) for the kernel's (x, logit) element types: the same
// type, or a float32 logit for float16/bfloat16 x (autocast's mix: half
// features, float32 logits from a normalisation layer).
template <typename Fn>
void dispatch_dtypes(at::ScalarType x_type, at::ScalarType logit_type, Fn&& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_type, "lip2d", [&] {
    using x_t = scalar_t;
    if constexpr (std::is_same_v<x_t, at::Half> || std::is_same_v<x_t, at::BFloat16>) {
      if (logit_type == at::kFloat) {
        fn(x_t{}, float{});
        return;
      }
    }
    TORCH_CHECK(logit_type == x_type, "lip2d: internal error: no kernel for x of dtype ", x_type,
                " with logit of dtype ", logit_type);
    fn(x_t{}, x_t{});
  });
}

template <typename x_t>
using acc_type = std::conditional_t<std::is_same_v<x_t, double>, double, float>;

template <typename x_t, typename l_t>
ForwardArgs<x_t, l_t, acc_type<x_t>> forward_args(const ForwardTensors& t, const CallGeometry& cg) {
  using acc_t = acc_type<x_t>;
  return {t.x.const_data_ptr<x_t>(),           t.logit.const_data_ptr<l_t>(),
          t.out.mutable_data_ptr<x_t>(),       t.window_max.mutable_data_ptr<acc_t>(),
          t.inv_weight_sum.mutable_data_ptr<acc_t>(), cg.g, cg.ls};
}

template <typename x_t, typename l_t>
BackwardArgs<x_t, l_t, acc_type<x_t>> backward_args(const BackwardTensors& t,
                                                    const CallGeometry& cg) {
  using acc_t = acc_type<x_t>;
  return {t.grad_out.const_data_ptr<x_t>(),
          t.x.const_data_ptr<x_t>(),
          t.logit.const_data_ptr<l_t>(),
          t.out.const_data_ptr<x_t>(),
          t.window_max.const_data_ptr<acc_t>(),
          t.inv_weight_sum.const_data_ptr<acc_t>(),
          t.grad_x.mutable_data_ptr<x_t>(),
          t.grad_logit.mutable_data_ptr<l_t>(),
          cg.g,
          cg.ls};
}

const char* lip2d_forward_cpu(const ForwardTensors& t, const CallGeometry& cg);
// The L2 cache of one core, which a CPU kernel's task and the next task's
// prefetched rows should share: cpu0's as Linux reports it, else 512 KiB.
int64_t cpu_l2_cache_bytes();
const char* lip2d_backward_cpu(const BackwardTensors& t, const CallGeometry& cg);

#ifdef WITH_CUDA
const char* lip2d_forward_cuda(const ForwardTensors& t, const CallGeometry& cg);
const char* lip2d_backward_cuda(const BackwardTensors& t, const CallGeometry& cg);
#endif

// The CUDA kernels run on the CPU, thread by thread (lip2d_emulate.cpp).
// variant: "generic" or "fast". Each launcher returns the kernel that ran.
const char* lip2d_forward_emulated(const ForwardTensors& t, const CallGeometry& cg,
                                   const std::string& variant, bool force_int64);
const char* lip2d_backward_emulated(const BackwardTensors& t, const CallGeometry& cg,
                                    const std::string& variant, bool force_int64);

}  // namespace lip_cuda
