"""Python side of the torch.ops.lip_cuda operators: fake (meta) kernels for
tracing and the autograd formula. The kernels themselves are C++/CUDA."""
from typing import List, Tuple

import torch

from . import _extension  # noqa: F401  (registers the operators)
from ._geometry import kernel_memory_format, pooled_size

_LSE_DTYPE = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


@torch.library.register_fake("lip_cuda::lip2d_forward")
def _lip2d_forward_fake(
    x: torch.Tensor,
    logit: torch.Tensor,
    kernel_size: List[int],
    stride: List[int],
    padding: List[int],
    ceil_mode: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    torch._check(x.dim() == 4, lambda: f"lip2d: expected x to be a 4-D (N, C, H, W) tensor, got {x.dim()}-D")
    torch._check(logit.shape == x.shape, lambda: "lip2d: expected logit to have the same shape as x")
    n, c, h, w = x.shape
    oh = pooled_size(h, kernel_size[0], stride[0], padding[0], ceil_mode)
    ow = pooled_size(w, kernel_size[1], stride[1], padding[1], ceil_mode)
    torch._check(oh > 0 and ow > 0, lambda: "lip2d: the output would be empty")
    fmt = kernel_memory_format(x)
    out = torch.empty((n, c, oh, ow), dtype=x.dtype, device=x.device, memory_format=fmt)
    lse = torch.empty(
        (n, c, oh, ow), dtype=_LSE_DTYPE.get(x.dtype, x.dtype), device=x.device, memory_format=fmt
    )
    return out, lse


@torch.library.register_fake("lip_cuda::lip2d_backward")
def _lip2d_backward_fake(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    logit: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kernel_size: List[int],
    stride: List[int],
    padding: List[int],
    ceil_mode: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    fmt = kernel_memory_format(x)
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    grad_logit = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    return grad_x, grad_logit


def _forward_setup_context(ctx, inputs, output) -> None:
    x, logit, kernel_size, stride, padding, ceil_mode = inputs
    out, lse = output
    ctx.save_for_backward(x, logit, out, lse)
    ctx.pool_args = (kernel_size, stride, padding, ceil_mode)
    ctx.mark_non_differentiable(lse)


def _forward_backward(ctx, grad_out: torch.Tensor, grad_lse: torch.Tensor):
    x, logit, out, lse = ctx.saved_tensors
    grad_x, grad_logit = torch.ops.lip_cuda.lip2d_backward(grad_out, x, logit, out, lse, *ctx.pool_args)
    return grad_x, grad_logit, None, None, None, None


def _backward_setup_context(ctx, inputs, output) -> None:
    pass


def _backward_backward(ctx, *grads):
    raise NotImplementedError("lip_cuda: double backward (grad of grad) of lip2d is not supported")


torch.library.register_autograd(
    "lip_cuda::lip2d_forward", _forward_backward, setup_context=_forward_setup_context
)
torch.library.register_autograd(
    "lip_cuda::lip2d_backward", _backward_backward, setup_context=_backward_setup_context
)
