"""The functional API: lip2d on the fused operators."""
from typing import Optional

import torch

from . import _ops  # noqa: F401  (fake kernels and autograd)
from ._geometry import IntPair, pool_args


def _as_floating_pair(x: torch.Tensor, logit: torch.Tensor):
    for name, t in (("x", x), ("logit", logit)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"lip2d: expected {name} to be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(
                f"lip2d: expected {name} to have a floating-point dtype (float16, bfloat16, "
                f"float32 or float64), but got {t.dtype}"
            )
    if x.device != logit.device:
        raise ValueError(
            f"lip2d: expected x and logit on the same device, but x is on {x.device} "
            f"and logit on {logit.device}"
        )
    # The reference formula x * exp(logit) promotes mixed dtypes; so do we.
    dtype = torch.promote_types(x.dtype, logit.dtype)
    return x.to(dtype), logit.to(dtype)


def lip2d(
    x: torch.Tensor,
    logit: torch.Tensor,
    kernel_size: IntPair = 3,
    stride: Optional[IntPair] = 2,
    padding: IntPair = 1,
    ceil_mode: bool = False,
) -> torch.Tensor:
    """Local Importance-based Pooling, fused and numerically stable.

    Computes avg_pool2d(x * exp(logit)) / avg_pool2d(exp(logit)) as a softmax
    of the logits over each pooling window (clipped to the input), so it is
    finite for any finite logits in every dtype. One kernel forward, one
    backward; differentiable in both x and logit.

    Args:
        x: (N, C, H, W) features, float16, bfloat16, float32 or float64,
            contiguous or channels_last (the output keeps the layout).
        logit: (N, C, H, W) importance logits; a different floating dtype
            is promoted with x's, as the reference formula would.
        kernel_size, stride, padding, ceil_mode: as torch.nn.functional.avg_pool2d
            takes them (stride=None means kernel_size); padding at most
            kernel_size // 2.

    Returns:
        (N, C, H_out, W_out) with avg_pool2d's output shape.

    Example:
        >>> x = torch.randn(2, 64, 56, 56)
        >>> logit = 12 * torch.sigmoid(torch.randn(2, 64, 56, 56))
        >>> lip2d(x, logit).shape
        torch.Size([2, 64, 28, 28])
    """
    kernel, strides, pads = pool_args(kernel_size, stride, padding)
    x, logit = _as_floating_pair(x, logit)
    out, _ = torch.ops.lip_cuda.lip2d_forward(x, logit, kernel, strides, pads, ceil_mode)
    return out
