"""The pure-PyTorch LIP of the paper: the baseline for tests and benchmarks."""
from typing import Optional

import torch
import torch.nn.functional as F

from ._geometry import IntPair, check_ceil_mode, pool_args


def lip2d_reference(
    x: torch.Tensor,
    logit: torch.Tensor,
    kernel_size: IntPair = 3,
    stride: Optional[IntPair] = 2,
    padding: IntPair = 1,
    ceil_mode: bool = False,
) -> torch.Tensor:
    """LIP as the paper writes it: avg_pool2d(x * exp(logit)) / avg_pool2d(exp(logit)).

    Five kernels and two input-sized temporaries, and it overflows: in
    float16 any window whose logits reach ~11.1 gives inf / inf = NaN.
    Same signature and output shape as :func:`lip_cuda.lip2d`.

    Args:
        x: (N, C, H, W) features.
        logit: (N, C, H, W) importance logits.

    Returns:
        (N, C, H_out, W_out), avg_pool2d's output shape.

    Example:
        >>> x, logit = torch.randn(2, 8, 16, 16), torch.randn(2, 8, 16, 16)
        >>> lip2d_reference(x, logit).shape
        torch.Size([2, 8, 8, 8])
    """
    kernel, strides, pads = pool_args(kernel_size, stride, padding)
    check_ceil_mode(ceil_mode)
    weight = logit.exp()
    numerator = F.avg_pool2d(x * weight, kernel, strides, pads, ceil_mode=ceil_mode)
    denominator = F.avg_pool2d(weight, kernel, strides, pads, ceil_mode=ceil_mode)
    return numerator / denominator
