"""Python side of the torch.ops.lip_cuda operators: their fake (meta) kernels
for tracing. The kernels and the autograd formula are C++/CUDA (autograd in
csrc/lip2d_autograd.cpp: a Python autograd layer cost more host time than
the GPU kernels of small layers take).

Operators (schemas in csrc/lip2d.cpp):

* ``lip2d_forward(x, logit, kernel_size, stride, padding, ceil_mode)
  -> (out, window_max, inv_weight_sum)``: the pooled output (x's dtype) and,
  per output, a reference logit ``r`` and ``1 / sum exp(logit - r)`` over its
  window (float32; float64 for float64 x), which backward needs: the
  window's softmax weights are ``exp(logit - r) * inv_weight_sum``. ``r`` is
  the window's max logit (CUDA kernels, float64), or on the CPU the max
  over the window's strip of 4 output rows, shared by those windows so that
  each input needs one exp (docs/kernels.md, "One exp per input").
* ``lip2d_backward(grad_out, x, logit, out, window_max, inv_weight_sum, ...)
  -> (grad_x, grad_logit)``: grad_x in x's shape and dtype, grad_logit in
  the logit's (which may be shared across N and/or C: size 1 there).
"""
from typing import List, Tuple

import torch

from . import _extension  # noqa: F401  (registers the operators)
from ._geometry import kernel_memory_format, pooled_size


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


#: the dtypes the kernels take, for x and the logit
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MAX_WINDOW = 2**31 - 1  # as csrc/lip2d.cpp bounds kernel_size and stride


def _check_inputs(x: torch.Tensor, logit: torch.Tensor, kernel_size: List[int], stride: List[int],
                  padding: List[int]) -> None:
    """The C++ operator's argument checks (csrc/lip2d.cpp, check_inputs),
    for the fake kernels: a call that fails eagerly fails when traced too,
    with the same message, instead of tracing to garbage or to a Python error."""
    torch._check(x.dim() == 4, lambda: f"lip2d: expected x to be a 4-D (N, C, H, W) tensor, but got a "
                 f"{x.dim()}-D tensor of shape {tuple(x.shape)}")
    torch._check(
        logit.dim() == 4
        and logit.shape[0] in (1, x.shape[0])
        and logit.shape[1] in (1, x.shape[1])
        and logit.shape[2:] == x.shape[2:],
        lambda: f"lip2d: expected logit to have the same shape as x, {tuple(x.shape)}, or size 1 "
        f"in N and/or C, but got {tuple(logit.shape)}",
    )
    for name, t in (("x", x), ("logit", logit)):
        torch._check(t.dtype in KERNEL_DTYPES, lambda: f"lip2d: expected {name} to have a floating-point "
                     f"dtype (float16, bfloat16, float32 or float64), but got {t.dtype}")
    torch._check(logit.device == x.device, lambda: f"lip2d: expected logit on the same device as x, but x "
                 f"is on {x.device} and logit on {logit.device}")
    torch._check(x.shape[1] > 0 and x.shape[2] > 0 and x.shape[3] > 0,
                 lambda: "lip2d: expected C, H and W of x to be non-zero (only the batch may be empty), "
                 f"but x has shape {tuple(x.shape)}")
    for name, values in (("kernel_size", kernel_size), ("stride", stride), ("padding", padding)):
        torch._check(len(values) == 2, lambda: f"lip2d: expected {name} to hold 2 values (height, width), "
                     f"but got {len(values)}: {list(values)}")
    torch._check(kernel_size[0] > 0 and kernel_size[1] > 0,
                 lambda: f"lip2d: expected kernel_size to be positive, but got {list(kernel_size)}")
    torch._check(stride[0] > 0 and stride[1] > 0,
                 lambda: f"lip2d: expected stride to be positive, but got {list(stride)}")
    torch._check(max(kernel_size[0], kernel_size[1], stride[0], stride[1]) <= _MAX_WINDOW,
                 lambda: f"lip2d: expected kernel_size and stride to be at most {_MAX_WINDOW}, but got "
                 f"kernel_size {list(kernel_size)} and stride {list(stride)}")
    torch._check(
        0 <= padding[0] <= kernel_size[0] // 2 and 0 <= padding[1] <= kernel_size[1] // 2,
        lambda: "lip2d: expected padding to be non-negative and at most half the kernel size, but got "
        f"padding {list(padding)} with kernel_size {list(kernel_size)}",
    )


def _output_shape(x: torch.Tensor, kernel_size: List[int], stride: List[int], padding: List[int],
                  ceil_mode: bool) -> Tuple[int, int, int, int]:
    n, c, h, w = x.shape
    return (n, c, pooled_size(h, kernel_size[0], stride[0], padding[0], ceil_mode),
            pooled_size(w, kernel_size[1], stride[1], padding[1], ceil_mode))


@torch.library.register_fake("lip_cuda::lip2d_forward")
def _lip2d_forward_fake(
    x: torch.Tensor,
    logit: torch.Tensor,
    kernel_size: List[int],
    stride: List[int],
    padding: List[int],
    ceil_mode: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_inputs(x, logit, kernel_size, stride, padding)
    n, c, oh, ow = _output_shape(x, kernel_size, stride, padding, ceil_mode)
    torch._check(oh > 0 and ow > 0, lambda: "lip2d: the output would be empty")
    fmt = kernel_memory_format(x)
    out = torch.empty((n, c, oh, ow), dtype=x.dtype, device=x.device, memory_format=fmt)
    stats = dict(dtype=_stats_dtype(x.dtype), device=x.device, memory_format=fmt)
    return out, torch.empty((n, c, oh, ow), **stats), torch.empty((n, c, oh, ow), **stats)


@torch.library.register_fake("lip_cuda::lip2d_backward")
def _lip2d_backward_fake(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    logit: torch.Tensor,
    out: torch.Tensor,
    window_max: torch.Tensor,
    inv_weight_sum: torch.Tensor,
    kernel_size: List[int],
    stride: List[int],
    padding: List[int],
    ceil_mode: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    _check_inputs(x, logit, kernel_size, stride, padding)
    shape = _output_shape(x, kernel_size, stride, padding, ceil_mode)
    for name, t, dtype in (("grad_out", grad_out, x.dtype), ("out", out, x.dtype),
                           ("window_max", window_max, _stats_dtype(x.dtype)),
                           ("inv_weight_sum", inv_weight_sum, _stats_dtype(x.dtype))):
        torch._check(tuple(t.shape) == shape, lambda: f"lip2d_backward: expected {name} of shape "
                     f"{list(shape)} (the output of lip2d_forward), but got {list(t.shape)}")
        torch._check(t.device == x.device, lambda: f"lip2d_backward: expected {name} on the same device "
                     f"as x ({x.device}), but got {t.device}")
        torch._check(t.dtype == dtype, lambda: f"lip2d_backward: expected {name} of dtype {dtype} (as "
                     f"lip2d_forward returns it), but got {t.dtype}")
    fmt = kernel_memory_format(x)
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    grad_logit = torch.empty(logit.shape, dtype=logit.dtype, device=x.device, memory_format=fmt)
    return grad_x, grad_logit
