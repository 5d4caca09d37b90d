"""Pooling arguments as avg_pool2d takes them, and the output size it gives.

Shared by the functional API, the fake (meta) kernels and the reference, so
that all of them agree with the C++ operator on what a call means.
"""
import operator
from typing import Optional, Sequence, Tuple, Union

import torch

IntPair = Union[int, Sequence[int]]


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _int_value(item, name: str, value) -> int:
    """One size value: a Python int (or an object with __index__, e.g. a
    numpy integer) within int64; SymInts pass through for tracing."""
    if isinstance(item, torch.SymInt):
        return item  # type: ignore[return-value]
    number = None
    if not isinstance(item, (bool, torch.Tensor)):
        try:
            number = operator.index(item)
        except TypeError:  # no __index__, or a numpy array's, which takes one element only
            pass
    if number is None:
        kind = "a tensor" if isinstance(item, torch.Tensor) else f"{type(item).__name__} {item!r}"
        raise TypeError(
            f"lip2d: expected {name} to be an int or a pair of ints, but got {kind}"
            + (f" in {value!r}" if item is not value else "")
        )
    if not _INT64_MIN <= number <= _INT64_MAX:
        raise ValueError(
            f"lip2d: expected {name} to hold values that fit in a 64-bit integer, but got {number}"
        )
    return number


def _pair(value: IntPair, name: str) -> Tuple[int, int]:
    if isinstance(value, (str, bytes)) or isinstance(value, torch.Tensor) or not isinstance(value, Sequence):
        single = _int_value(value, name, value)
        return (single, single)
    values = tuple(value)
    if len(values) == 1:
        values = (values[0], values[0])
    if len(values) != 2:
        raise ValueError(f"lip2d: expected {name} to be an int or a pair of ints, got {value!r}")
    return (_int_value(values[0], name, value), _int_value(values[1], name, value))


def pool_args(
    kernel_size: IntPair, stride: Optional[IntPair], padding: IntPair
) -> Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int]]:
    """Normalise to (kernel, stride, padding) pairs; stride None means kernel_size."""
    if (type(kernel_size) is int and type(stride) is int and type(padding) is int
            and _INT64_MIN <= min(kernel_size, stride, padding)
            and max(kernel_size, stride, padding) <= _INT64_MAX):
        # the common call, e.g. lip2d(x, logit, 3, 2, 1), at a fraction of the host cost
        return (kernel_size, kernel_size), (stride, stride), (padding, padding)
    kernel = _pair(kernel_size, "kernel_size")
    if stride is None or (isinstance(stride, Sequence) and not isinstance(stride, str) and len(stride) == 0):
        strides = kernel
    else:
        strides = _pair(stride, "stride")
    return kernel, strides, _pair(padding, "padding")


def check_ceil_mode(ceil_mode: bool) -> bool:
    """ceil_mode as avg_pool2d takes it: a bool, nothing that merely converts to one."""
    if ceil_mode is not True and ceil_mode is not False:
        kind = type(ceil_mode)
        kind_name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"
        raise TypeError(
            f"lip2d: expected ceil_mode to be a bool (True or False), but got {kind_name} {ceil_mode!r}"
        )
    return ceil_mode


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
