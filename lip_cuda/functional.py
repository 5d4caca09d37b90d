"""The functional API: lip2d on the fused operators."""
from typing import Optional

import torch

from . import _ops  # (fake kernels and autograd)
from ._geometry import IntPair, check_ceil_mode, pool_args


def _check_tensors(x: torch.Tensor, logit: torch.Tensor) -> None:
    for name, t in (("x", x), ("logit", logit)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"lip2d: expected {name} to be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _ops.KERNEL_DTYPES:
            raise TypeError(
                f"lip2d: expected {name} to have a floating-point dtype (float16, bfloat16, "
                f"float32 or float64), but got {t.dtype}"
            )
    if x.device != logit.device:
        raise ValueError(
            f"lip2d: expected x and logit on the same device, but x is on {x.device} "
            f"and logit on {logit.device}"
        )
    if x.dim() not in (3, 4):
        raise ValueError(
            f"lip2d: expected x to be a 4-D (N, C, H, W) or 3-D (C, H, W) tensor, but got a "
            f"{x.dim()}-D tensor of shape {tuple(x.shape)}"
        )
    if 0 in x.shape[-3:]:
        raise ValueError(
            f"lip2d: expected C, H and W of x to be non-zero (only the batch may be empty), but x "
            f"has shape {tuple(x.shape)}"
        )


def _logit_for_kernel(x: torch.Tensor, logit: torch.Tensor) -> torch.Tensor:
    """The logit as the operator takes it: 4-D, sized as x or 1 in N and/or C.

    Sharing across N and C is read natively by the kernels (no copy); any
    other broadcast (over H or W) is expanded first."""
    if logit.dim() == 4:  # the common case, without broadcast_shapes' host cost
        ln, lc, lh, lw = logit.shape
        n, c, h, w = x.shape
        if lh == h and lw == w and ln in (1, n) and lc in (1, c):
            return logit
    try:
        shape = torch.broadcast_shapes(logit.shape, x.shape)
    except RuntimeError:
        shape = None
    if shape != x.shape:
        raise ValueError(
            f"lip2d: expected logit to be broadcastable to x's shape {tuple(x.shape)}, but it "
            f"has shape {tuple(logit.shape)}"
        )
    logit = logit.reshape((1,) * (4 - logit.dim()) + tuple(logit.shape))
    if logit.shape[2:] != x.shape[2:]:
        logit = logit.expand(logit.shape[0], logit.shape[1], *x.shape[2:])
    return logit


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
        x: (N, C, H, W) or unbatched (C, H, W) features: float16, bfloat16,
            float32 or float64, contiguous or channels_last (the output keeps
            the layout).
        logit: importance logits broadcastable to x. Shapes (N, C, H, W),
            (1, C, H, W), (N, 1, H, W) or (1, 1, H, W) (one map shared by all
            channels) are read as they are, without a copy; any other
            broadcast is expanded first. Its dtype may differ from x's: a
            float32 logit with float16/bfloat16 x (what autocast produces) is
            read natively; other mixes convert the logit to x's dtype
            (float32 for half x), so a float64 logit with narrower x loses
            its extra digits: weights off by up to about |logit| * 1.2e-7
            relative.
        kernel_size, stride, padding, ceil_mode: as torch.nn.functional.avg_pool2d
            takes them (stride=None means kernel_size); padding at most
            kernel_size // 2.

    Returns:
        avg_pool2d's output shape, in x's dtype. The gradient of logit has
        logit's shape and dtype. A logit of -inf masks its position out
        completely (whatever x is there); a window whose logits are all -inf
        gives 0.

    Example:
        >>> x = torch.randn(2, 64, 56, 56)
        >>> logit = 12 * torch.sigmoid(torch.randn(2, 64, 56, 56))
        >>> lip2d(x, logit).shape
        torch.Size([2, 64, 28, 28])
        >>> lip2d(x, logit[:, :1]).shape    # one importance map for all channels
        torch.Size([2, 64, 28, 28])
    """
    kernel, strides, pads = pool_args(kernel_size, stride, padding)
    check_ceil_mode(ceil_mode)
    if (type(x) is torch.Tensor and type(logit) is torch.Tensor and x.dim() == 4
            and x.shape == logit.shape and x.numel() > 0 and x.dtype in _ops.KERNEL_DTYPES
            and logit.dtype in _ops.KERNEL_DTYPES and x.device == logit.device):
        # the common call, which passes every check below unchanged, at a
        # third of their host time
        return torch.ops.lip_cuda.lip2d_forward(x, logit, kernel, strides, pads, ceil_mode)[0]
    _check_tensors(x, logit)
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    out, _, _ = torch.ops.lip_cuda.lip2d_forward(
        x, _logit_for_kernel(x, logit), kernel, strides, pads, ceil_mode
    )
    return out.squeeze(0) if unbatched else out
