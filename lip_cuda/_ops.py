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


def _check_logit_shape(x: torch.Tensor, logit: torch.Tensor) -> None:
    torch._check(x.dim() == 4, lambda: f"lip2d: expected x to be a 4-D (N, C, H, W) tensor, got {x.dim()}-D")
    torch._check(
        logit.dim() == 4
        and logit.shape[0] in (1, x.shape[0])
        and logit.shape[1] in (1, x.shape[1])
        and logit.shape[2:] == x.shape[2:],
        lambda: f"lip2d: expected logit to have the same shape as x, {tuple(x.shape)}, or size 1 "
        f"in N and/or C, but got {tuple(logit.shape)}",
    )


@torch.library.register_fake("lip_cuda::lip2d_forward")
def _lip2d_forward_fake(
    x: torch.Tensor,
    logit: torch.Tensor,
    kernel_size: List[int],
    stride: List[int],
    padding: List[int],
    ceil_mode: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_logit_shape(x, logit)
    n, c, h, w = x.shape
    oh = pooled_size(h, kernel_size[0], stride[0], padding[0], ceil_mode)
    ow = pooled_size(w, kernel_size[1], stride[1], padding[1], ceil_mode)
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
    _check_logit_shape(x, logit)
    fmt = kernel_memory_format(x)
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    grad_logit = torch.empty(logit.shape, dtype=logit.dtype, device=x.device, memory_format=fmt)
    return grad_x, grad_logit
