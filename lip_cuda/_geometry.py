"""Pooling arguments as avg_pool2d takes them, and the output size it gives.

Shared by the functional API, the fake (meta) kernels and the reference, so
that all of them agree with the C++ operator on what a call means.
"""
from typing import Optional, Sequence, Tuple, Union

import torch

IntPair = Union[int, Sequence[int]]


def _pair(value: IntPair, name: str) -> Tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    values = tuple(value)
    if len(values) == 1:
        return (values[0], values[0])
    if len(values) != 2:
        raise ValueError(f"lip2d: expected {name} to be an int or a pair of ints, got {value!r}")
    return values  # type: ignore[return-value]


def pool_args(
    kernel_size: IntPair, stride: Optional[IntPair], padding: IntPair
) -> Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int]]:
    """Normalise to (kernel, stride, padding) pairs; stride None means kernel_size."""
    kernel = _pair(kernel_size, "kernel_size")
    if stride is None or (not isinstance(stride, int) and len(stride) == 0):
        strides = kernel
    else:
        strides = _pair(stride, "stride")
    return kernel, strides, _pair(padding, "padding")


def pooled_size(size, kernel: int, stride: int, padding: int, ceil_mode: bool):
    """avg_pool2d's output length along one dimension (works on SymInts)."""
    out = (size + 2 * padding - kernel + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out = out - 1
    return out


def kernel_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout the kernels run in and return: the C++ operator's rule."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format
