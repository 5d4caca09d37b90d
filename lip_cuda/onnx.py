"""ONNX export of lip2d: the fused operator written out in standard ONNX ops.

``torch.onnx.export(..., dynamo=True)`` cannot translate the custom operator
``torch.ops.lip_cuda.lip2d_forward`` on its own. This module gives it a
translation into standard ONNX operators (opset 18), so a model that calls
:func:`lip_cuda.lip2d` (or :class:`lip_cuda.nn.LIP2d`, or a LIP-ResNet) runs in
ONNX Runtime, TensorRT or any other ONNX backend, without lip_cuda.

How the graph computes LIP, stably: per output it takes the max ``m`` of the
logits in its window (clipped to the input), then sums ``exp(l - m)`` and
``x * exp(l - m)`` over the window and divides (a tap of weight 0 adds
exactly 0 whatever its x, and the value sum is scaled by 1/16 against
overflow, as in the kernels). Every weight is at most 1 and
the largest is exactly 1, so nothing overflows and nothing underflows to
0/0, for any finite logits in any float dtype: the same result as the fused
kernels, to rounding. The windows are gathered as ``kH * kW`` strided
slices of the padded inputs (padding: logit -inf, so padded positions weigh
nothing), i.e. ``kH * kW`` exps per output, about 2.25 per input for the
paper's 3x3 / stride-2 windows.

(The shorter form ``AvgPool(x * e) / AvgPool(e)`` with ``e = exp(l - M)`` and
one max ``M`` per image and channel computes one exp per input, but is only
stable as long as no window's logits lie more than ~87 (float32) below ``M``:
there its weights all underflow and the output is 0/0. The slice form has no
such limit, which is why it is used here.)

Requires the ``onnx`` extra: ``pip install -e .[onnx]`` (onnx, onnxscript,
onnxruntime).

Example::

    import torch, lip_cuda, lip_cuda.onnx
    from lip_cuda.nn import SimplifiedLIP

    model = SimplifiedLIP(8).eval()
    program = lip_cuda.onnx.export(model, (torch.randn(1, 8, 32, 32),), "lip.onnx")

    # or, after `import lip_cuda.onnx`, plain torch.onnx.export works too:
    torch.onnx.export(model, (torch.randn(1, 8, 32, 32),), "lip.onnx", dynamo=True)
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch

try:
    from onnxscript import ir
    from onnxscript import opset18 as op
except ImportError as error:  # pragma: no cover - only without the extra
    raise ImportError(
        f"lip_cuda.onnx needs onnxscript ({error}); install the extra: pip install -e .[onnx]"
    ) from error

from . import _ops  # noqa: F401  (registers the operators)
from ._geometry import pooled_size

__all__ = ["lip2d_forward_onnx", "custom_translation_table", "export", "register"]

#: The operator this module translates.
LIP2D_FORWARD = torch.ops.lip_cuda.lip2d_forward.default

_HALF = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


def _ints(values: Sequence[int]) -> Any:
    return op.Constant(value_ints=[int(v) for v in values])


def _scalar_like(value: float, like: Any) -> Any:
    return op.CastLike(op.Constant(value_float=value), like)


def _window_span(x: Any, dim: int, k: int, s: int, p: int, ceil_mode: bool) -> Any:
    """``(out - 1) * s + 1`` along ``dim``: how far one offset's strided slice reaches.

    A Python int when the input size is static, else computed in the graph
    (avg_pool2d's output-size rule, including ceil_mode's last-window check).
    """
    size = x.shape[dim] if x.shape is not None else None
    if isinstance(size, int):
        return (pooled_size(size, k, s, p, ceil_mode) - 1) * s + 1
    n = op.Shape(x, start=dim, end=dim + 1)
    out = op.Add(op.Div(op.Add(n, _ints([2 * p - k + (s - 1 if ceil_mode else 0)])), _ints([s])), _ints([1]))
    if ceil_mode:
        # The last window must start inside the input or its left padding.
        starts_outside = op.GreaterOrEqual(op.Mul(op.Sub(out, _ints([1])), _ints([s])), op.Add(n, _ints([p])))
        out = op.Sub(out, op.Cast(starts_outside, to=ir.DataType.INT64))
    return op.Add(op.Mul(op.Sub(out, _ints([1])), _ints([s])), _ints([1]))


def _auxiliary_outputs(window_max: Any, weight_sum: Any, out: Any, aux_dtype: ir.DataType) -> Tuple[Any, ...]:
    """The operator's outputs after ``out``, from each window's max logit and sum of exp(l - max).

    Schema ``(Tensor out, Tensor window_max, Tensor inv_weight_sum)``: a
    reference logit per output and 1 / sum exp(l - reference) (0 for a
    window whose logits are all -inf). The graph takes each window's max
    (0 for such windows; window_max arrives here with that 0 already); the
    CPU kernels may take a larger reference shared by many windows, which
    gives the same softmax weights exp(l - reference) * inv.
    Inference graphs do not use these (the exporter's optimiser drops them);
    they exist to match the schema. This is the one place to change when the
    schema does.
    """
    zero = _scalar_like(0.0, weight_sum)
    inv = op.Where(op.Greater(weight_sum, zero), op.Reciprocal(weight_sum), zero)
    # logits may broadcast over N and C
    return tuple(op.Expand(op.Cast(t, to=aux_dtype), op.Shape(out)) for t in (window_max, inv))


def lip2d_forward_onnx(
    x: Any,
    logit: Any,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    ceil_mode: bool = False,
) -> Tuple[Any, ...]:
    """ONNX translation of ``torch.ops.lip_cuda.lip2d_forward`` (see the module docstring).

    Called by the exporter with the node's inputs: ``x`` (N, C, H, W),
    ``logit`` of a shape that broadcasts to it over N and C, and the pooling
    arguments as int pairs. Returns the operator's outputs: ``out``
    (N, C, H_out, W_out) in x's dtype, then :func:`_auxiliary_outputs`.
    Half-precision inputs are computed in float32, like the kernels do.

    Example:
        >>> table = {torch.ops.lip_cuda.lip2d_forward.default: lip2d_forward_onnx}
        >>> # torch.onnx.export(model, args, dynamo=True, custom_translation_table=table)
    """
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    double = ir.DataType.DOUBLE in (x.dtype, logit.dtype)
    compute = ir.DataType.DOUBLE if double else ir.DataType.FLOAT
    aux_dtype = ir.DataType.DOUBLE if x.dtype == ir.DataType.DOUBLE else ir.DataType.FLOAT
    xc = x if x.dtype == compute else op.Cast(x, to=compute)
    lc = logit if logit.dtype == compute else op.Cast(logit, to=compute)

    # Pad (top/left = padding, bottom/right = k - 1, enough for ceil_mode's
    # last window); padded logits are -inf, so they get weight exp(-inf) = 0.
    pads = _ints([0, 0, ph, pw, 0, 0, kh - 1, kw - 1])
    xp = op.Pad(xc, pads, _scalar_like(0.0, xc))
    lp = op.Pad(lc, pads, _scalar_like(float("-inf"), lc))

    span_h = _window_span(x, 2, kh, sh, ph, ceil_mode)
    span_w = _window_span(x, 3, kw, sw, pw, ceil_mode)
    axes, steps = _ints([2, 3]), _ints([sh, sw])
    x_slices, l_slices = [], []
    for a in range(kh):
        for b in range(kw):
            starts = _ints([a, b])
            if isinstance(span_h, int) and isinstance(span_w, int):
                ends = _ints([a + span_h, b + span_w])
            else:
                hend = _ints([a + span_h]) if isinstance(span_h, int) else op.Add(span_h, _ints([a]))
                wend = _ints([b + span_w]) if isinstance(span_w, int) else op.Add(span_w, _ints([b]))
                ends = op.Concat(hend, wend, axis=0)
            x_slices.append(op.Slice(xp, starts, ends, axes, steps))
            l_slices.append(op.Slice(lp, starts, ends, axes, steps))

    window_max = op.Max(*l_slices) if len(l_slices) > 1 else l_slices[0]
    # A window whose logits are all -inf has no weight at all: subtract 0
    # there instead of -inf (-inf - -inf = NaN); its sums stay 0.
    window_max = op.Where(op.IsInf(window_max, detect_positive=0), _scalar_like(0.0, window_max), window_max)
    # As the kernels (csrc/lip_window.h, WindowStep): a tap of weight 0 adds
    # exactly 0 whatever its x (a masked inf or NaN x would give NaN), and
    # the value sum holds x e / 16, so that it does not overflow where the
    # window mean cannot (x near the dtype's max); a power of two, so it
    # changes no bit of the result in the normal range.
    sum_scale = _scalar_like(1.0 / 16.0, xc)
    zero = _scalar_like(0.0, xc)
    weight_sum, value_sum = None, None
    for xs, ls in zip(x_slices, l_slices):
        e = op.Exp(op.Sub(ls, window_max))
        weight_sum = e if weight_sum is None else op.Add(weight_sum, e)
        term = op.Where(op.Equal(e, zero), zero, op.Mul(e, op.Mul(xs, sum_scale)))
        value_sum = term if value_sum is None else op.Add(value_sum, term)
    has_weight = op.Greater(weight_sum, zero)
    out = op.Where(has_weight, op.Div(value_sum, weight_sum), zero)
    out = op.Mul(out, _scalar_like(16.0, xc))
    if x.dtype != compute:
        out = op.Cast(out, to=x.dtype)
    return (out, *_auxiliary_outputs(window_max, weight_sum, out, aux_dtype))


def custom_translation_table() -> Dict[Callable, Callable]:
    """The ``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``.

    Example:
        >>> table = custom_translation_table()
        >>> # torch.onnx.export(model, args, "m.onnx", dynamo=True, custom_translation_table=table)
    """
    return {LIP2D_FORWARD: lip2d_forward_onnx}


def export(
    model: Union[torch.nn.Module, torch.export.ExportedProgram],
    args: Tuple[Any, ...],
    f: Optional[Union[str, os.PathLike]] = None,
    **kwargs: Any,
) -> "torch.onnx.ONNXProgram":
    """``torch.onnx.export(model, args, f, dynamo=True, ...)`` with lip2d's translation added.

    Keyword arguments go to ``torch.onnx.export``; a ``custom_translation_table``
    given there is merged with this module's.

    Args:
        model: the module (or exported program) to export; call ``model.eval()`` first.
        args: example inputs, e.g. ``(torch.randn(1, 3, 224, 224),)``.
        f: where to write the .onnx file (None: only return the program).

    Returns:
        The ``torch.onnx.ONNXProgram`` (``.model_proto``, ``.save(path)``, ``.call_reference``).

    Example:
        >>> from lip_cuda.nn import SimplifiedLIP
        >>> program = export(SimplifiedLIP(4).eval(), (torch.randn(1, 4, 16, 16),))  # doctest: +SKIP
    """
    table = {**custom_translation_table(), **(kwargs.pop("custom_translation_table", None) or {})}
    kwargs.setdefault("dynamo", True)
    return torch.onnx.export(model, args, f, custom_translation_table=table, **kwargs)


def register() -> bool:
    """Add lip2d's translation to torch.onnx's default table, so a plain
    ``torch.onnx.export(..., dynamo=True)`` finds it. Done on import.

    This uses a private part of torch.onnx (its built-in translation list);
    returns False, changing nothing, where that is not available. The public
    route is :func:`export` or :func:`custom_translation_table`.
    """
    try:
        from torch.onnx._internal.exporter import _registration
        from torch.onnx._internal.exporter._torchlib import _torchlib_registry

        entries = _torchlib_registry._registry
        if any(getattr(m, "fx_target", None) is LIP2D_FORWARD for m in entries):
            return True
        entries.append(
            _registration.OnnxDecompMeta(
                onnx_function=lip2d_forward_onnx, fx_target=LIP2D_FORWARD, signature=None, is_custom=True
            )
        )
        return True
    except Exception:  # noqa: BLE001  (private API: any change means "not available")
        return False


REGISTERED = register()
