"""lip_cuda: fused CPU/CUDA kernels for LIP (Local Importance-based Pooling).

    >>> import torch, lip_cuda
    >>> y = lip_cuda.lip2d(torch.randn(1, 8, 32, 32), torch.randn(1, 8, 32, 32))
"""
from ._extension import built_with_cuda
from .functional import lip2d
from .reference import lip2d_reference
from . import models, nn  # noqa: E402  (modules built on lip2d)

__all__ = ["lip2d", "lip2d_reference", "built_with_cuda", "nn", "models"]
__version__ = "0.1.0"
