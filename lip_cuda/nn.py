"""``torch.nn`` modules built on the fused LIP op.

LIP (Local Importance-based Pooling, Gao, Wang and Wu, ICCV 2019) pools a
feature map ``x`` with weights ``exp(logit)``, where the logits come from a
small "logit module" applied to the features. This file holds the pooling
module itself (:class:`LIP2d`), the paper's gate (:class:`SoftGate`) and the
three logit modules LIP-ResNet uses:

* :class:`SimplifiedLIP` -- conv3x3 + InstanceNorm + gate on ``x`` itself; it
  replaces the stem max pool.
* :class:`BottleneckShared` + :class:`BottleneckLIP` -- the "Bottleneck-128"
  logit module: one shared trunk computed from a block's input feeds several
  cheap 1x1 heads, one per tensor that the block downsamples.
* :class:`TransitionLIP` -- the same Bottleneck-128 logit module with its own
  trunk, on a single input: LIP-DenseNet's transitions pool with it (2x2
  window, stride 2).

Submodule and parameter names follow the authors' implementation
(github.com/sebgao/LIP, ``imagenet/lip_resnet.py`` and
``imagenet/lip_densenet.py``) so that its published checkpoints load with
``load_state_dict(strict=True)``.

Every LIP module takes ``use_reference``: ``False`` runs the fused, overflow-safe
op (:func:`lip_cuda.functional.lip2d`), ``True`` runs the plain PyTorch
formulation (:func:`lip_cuda.reference.lip2d_reference`). Both compute the same
function; the flag exists for testing and benchmarking, and can be flipped on
a whole network with :func:`set_lip_backend`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .functional import lip2d
from .reference import lip2d_reference

__all__ = [
    "SoftGate",
    "LIP2d",
    "SimplifiedLIP",
    "BottleneckShared",
    "BottleneckLIP",
    "TransitionLIP",
    "set_lip_backend",
    "lip_logit_convs",
]

_IntPair = Union[int, Sequence[int]]

#: Width of the shared trunk of the Bottleneck logit module ("Bottleneck-128").
DEFAULT_BOTTLENECK_WIDTH = 128
#: The paper's gate maps logits into [0, COEFF].
DEFAULT_GATE_COEFF = 12.0


# Every logit module in the paper is built from these two pieces; the key
# names are arguments because the authors' ResNet and DenseNet name the same
# layers differently.
def _gated_head(
    in_channels: int, out_channels: int, kernel_size: int, conv_key: str, norm_key: str
) -> list[tuple[str, nn.Module]]:
    """``conv -> InstanceNorm -> SoftGate``: the layers that emit the logits."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
    return [(conv_key, conv), (norm_key, nn.InstanceNorm2d(out_channels, affine=True)), ("gate", SoftGate())]


def _bottleneck_trunk(channels: int, width: int) -> list[tuple[str, nn.Module]]:
    """``conv1x1 -> IN -> ReLU -> conv3x3 -> IN -> ReLU`` with ``width`` channels.

    The ReLUs are not in place: after InstanceNorm, an in-place ReLU made
    torch.compile fail when it recompiled for a new input size ("cannot
    determine truth value of Relational", torch 2.14 Inductor)."""
    return [
        ("conv1", nn.Conv2d(channels, width, 1, bias=False)),
        ("bn1", nn.InstanceNorm2d(width, affine=True)),
        ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(width, width, 3, padding=1, bias=False)),
        ("bn2", nn.InstanceNorm2d(width, affine=True)),
        ("relu2", nn.ReLU()),
    ]


class SoftGate(nn.Module):
    """``coeff * sigmoid(x)``: bounds the logits to ``[0, coeff]``.

    Bounded logits keep the importance weights ``exp(logit)`` within a factor
    ``exp(coeff)`` of each other, which is what the paper found trains stably.

    Shape:
        any shape in, same shape out.

    Example::

        >>> gate = SoftGate()
        >>> gate(torch.zeros(2))   # sigmoid(0) = 0.5
        tensor([6., 6.])
    """

    def __init__(self, coeff: float = DEFAULT_GATE_COEFF) -> None:
        super().__init__()
        self.coeff = float(coeff)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(x) * self.coeff

    def extra_repr(self) -> str:
        return f"coeff={self.coeff}"


class LIP2d(nn.Module):
    """Parameter-free LIP pooling of ``x`` with given logits; a drop-in for ``nn.AvgPool2d``.

    ``y = avg_pool2d(x * exp(logit)) / avg_pool2d(exp(logit))`` over each
    ``kernel_size`` window, i.e. a softmax-weighted average per window.
    Arguments and defaults are ``nn.AvgPool2d``'s (``stride`` defaults to
    ``kernel_size``, ``padding`` to 0), so swapping one for the other changes
    only the weighting. Padded positions carry no weight: with constant
    logits this is ``avg_pool2d(..., count_include_pad=False)``; the
    ``count_include_pad`` and ``divisor_override`` arguments are accepted for
    compatibility and change nothing, since they cancel in the ratio.

    The paper's modules pool with ``LIP2d(3, 2, 1)`` (3x3 windows, stride 2,
    padding 1), which halves ``H`` and ``W`` (rounding up).

    Args:
        kernel_size: window size, int or ``(kH, kW)``.
        stride: window step, int or pair; ``None`` (default) means ``kernel_size``.
        padding: implicit padding on both sides, at most ``kernel_size // 2``.
        ceil_mode: round the output size up instead of down, as ``avg_pool2d``.
        count_include_pad, divisor_override: accepted, no effect (see above).
        use_reference: run the unfused PyTorch formulation instead of the
            fused op (same result, more memory, overflows for large logits).

    Shape:
        x: ``(N, C, H, W)`` or unbatched ``(C, H, W)``.
        logit: broadcastable to x; ``(N, 1, H, W)`` shares one importance map
        across the channels without a copy (see :func:`lip_cuda.lip2d`).
        output: ``(N, C, H_out, W_out)``, ``nn.AvgPool2d``'s output shape,
        in x's dtype.

    Example::

        >>> pool = LIP2d(3, 2, 1)               # the paper's 3x3, stride 2, pad 1
        >>> x = torch.randn(2, 8, 32, 32)
        >>> pool(x, torch.randn_like(x)).shape
        torch.Size([2, 8, 16, 16])
        >>> LIP2d(2)                             # like nn.AvgPool2d(2)
        LIP2d(kernel_size=2, stride=2, padding=0)
    """

    def __init__(
        self,
        kernel_size: _IntPair,
        stride: Optional[_IntPair] = None,
        padding: _IntPair = 0,
        ceil_mode: bool = False,
        count_include_pad: bool = True,
        divisor_override: Optional[int] = None,
        *,
        use_reference: bool = False,
    ) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride if (stride is not None) else kernel_size
        self.padding = padding
        self.ceil_mode = ceil_mode
        self.count_include_pad = count_include_pad
        self.divisor_override = divisor_override
        self.use_reference = use_reference

    def forward(self, x: Tensor, logit: Tensor) -> Tensor:
        """Pool ``x`` with weights ``exp(logit)`` over each window.

        Args:
            x: ``(N, C, H, W)`` or ``(C, H, W)`` features (float16, bfloat16,
                float32 or float64).
            logit: importance logits broadcastable to ``x`` (e.g.
                ``(N, 1, H, W)``: one map for all channels), any finite values
                or -inf (masked out); its dtype may differ from ``x``'s.

        Returns:
            ``(N, C, H_out, W_out)`` in ``x``'s dtype: per window, ``sum(x * exp(logit)) /
            sum(exp(logit))`` over the window clipped to the input, computed
            relative to the window's largest logit so it never overflows (with
            ``use_reference=True``, the plain formula, which can). Differentiable
            in both ``x`` and ``logit``.

        Example::

            >>> pool = LIP2d(2)
            >>> x = torch.randn(1, 3, 4, 4)
            >>> torch.allclose(pool(x, torch.zeros_like(x)), nn.functional.avg_pool2d(x, 2), atol=1e-6)
            True
        """
        op = lip2d_reference if self.use_reference else lip2d
        return op(x, logit, self.kernel_size, self.stride, self.padding, self.ceil_mode)

    def extra_repr(self) -> str:
        s = f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"
        if self.ceil_mode:
            s += ", ceil_mode=True"
        if self.use_reference:
            s += ", use_reference=True"
        return s


class SimplifiedLIP(nn.Module):
    """LIP with a one-layer logit module: ``SoftGate(IN(conv3x3(x)))``.

    Used in place of LIP-ResNet's stem max pool (3x3 window, stride 2, pad 1).
    The conv starts at zero, so the logits start constant and the module
    starts out as ``avg_pool2d(x, 3, 2, 1, count_include_pad=False)``.

    State-dict keys: ``logit.conv.weight``, ``logit.bn.weight``,
    ``logit.bn.bias`` (the paper's names; ``bn`` is an InstanceNorm).

    Args:
        channels: ``C`` of the input.
        use_reference: pool with the unfused reference op.

    Shape:
        x: ``(N, C, H, W)`` -> ``(N, C, floor((H - 1) / 2) + 1, floor((W - 1) / 2) + 1)``.

    Example::

        >>> lip = SimplifiedLIP(64)
        >>> lip(torch.randn(2, 64, 56, 56)).shape
        torch.Size([2, 64, 28, 28])
    """

    #: State-dict names of the conv and the norm (LIP-DenseNet's stem uses
    #: ``conv1`` / ``bn1``; see :class:`lip_cuda.models.LIPDenseNet`).
    _keys = ("conv", "bn")

    def __init__(self, channels: int, use_reference: bool = False) -> None:
        super().__init__()
        self.logit = nn.Sequential(OrderedDict(_gated_head(channels, channels, 3, *self._keys)))
        self.pool = LIP2d(3, 2, 1, use_reference=use_reference)
        self.reset_parameters()

    @property
    def logit_conv(self) -> nn.Conv2d:
        """The conv that emits the logits (zero at initialisation)."""
        return self.logit[0]

    def reset_parameters(self) -> None:
        """Zero the logit conv (start as average pooling) and reset the norm."""
        nn.init.zeros_(self.logit_conv.weight)
        self.logit[1].reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(x, self.logit(x))


class BottleneckShared(nn.Module):
    """Shared trunk of the Bottleneck logit module.

    ``relu(IN(conv3x3(relu(IN(conv1x1(x))))))`` with ``width`` channels. One
    trunk per LIP-ResNet downsampling block; its output feeds every
    :class:`BottleneckLIP` head of that block.

    State-dict keys: ``logit.conv1.weight``, ``logit.bn1.{weight,bias}``,
    ``logit.conv2.weight``, ``logit.bn2.{weight,bias}``.

    Args:
        channels: ``C`` of the input.
        width: trunk width (the paper's "Bottleneck-128" uses 128).

    Shape:
        x: ``(N, C, H, W)`` -> ``(N, width, H, W)``.

    Example::

        >>> trunk = BottleneckShared(256)
        >>> trunk(torch.randn(2, 256, 28, 28)).shape
        torch.Size([2, 128, 28, 28])
    """

    def __init__(self, channels: int, width: int = DEFAULT_BOTTLENECK_WIDTH) -> None:
        super().__init__()
        self.logit = nn.Sequential(OrderedDict(_bottleneck_trunk(channels, width)))

    def forward(self, x: Tensor) -> Tensor:
        return self.logit(x)


class BottleneckLIP(nn.Module):
    """LIP whose logits are a 1x1 head on a :class:`BottleneckShared` output.

    ``forward(x, shared) = lip2d(x, SoftGate(IN(conv1x1(shared))))`` with a 3x3
    window, stride 2, padding 1. ``x`` and ``shared`` share ``H, W`` but not
    channels: the head maps ``width`` channels to ``x``'s ``channels``. The
    head conv starts at zero, so the module starts as average pooling.

    State-dict keys: ``postprocessing.conv.weight``,
    ``postprocessing.bn.{weight,bias}``.

    Args:
        channels: ``C`` of ``x``.
        width: channels of ``shared``.
        use_reference: pool with the unfused reference op.

    Shape:
        x: ``(N, C, H, W)``, shared: ``(N, width, H, W)``
        -> ``(N, C, floor((H - 1) / 2) + 1, floor((W - 1) / 2) + 1)``.

    Example::

        >>> trunk, head = BottleneckShared(256), BottleneckLIP(256)
        >>> x = torch.randn(2, 256, 28, 28)
        >>> head(x, trunk(x)).shape
        torch.Size([2, 256, 14, 14])
    """

    def __init__(
        self,
        channels: int,
        width: int = DEFAULT_BOTTLENECK_WIDTH,
        use_reference: bool = False,
    ) -> None:
        super().__init__()
        self.postprocessing = nn.Sequential(OrderedDict(_gated_head(width, channels, 1, "conv", "bn")))
        self.pool = LIP2d(3, 2, 1, use_reference=use_reference)
        self.reset_parameters()

    @property
    def logit_conv(self) -> nn.Conv2d:
        """The conv that emits the logits (zero at initialisation)."""
        return self.postprocessing.conv

    def reset_parameters(self) -> None:
        """Zero the head conv (start as average pooling) and reset the norm."""
        nn.init.zeros_(self.postprocessing.conv.weight)
        self.postprocessing.bn.reset_parameters()

    def forward(self, x: Tensor, shared: Tensor) -> Tensor:
        return self.pool(x, self.postprocessing(shared))


class TransitionLIP(nn.Module):
    """LIP with the full Bottleneck-128 logit module on its own input.

    ``logit = SoftGate(IN(conv1x1(relu(IN(conv3x3(relu(IN(conv1x1(x)))))))))``
    (``channels -> width -> width -> channels``), then ``lip2d(x, logit)``.
    This is how LIP-DenseNet's transitions downsample, over a 2x2 window with
    stride 2 and no padding (the defaults here, the geometry of the
    ``AvgPool2d(2, 2)`` it replaces). Unlike :class:`BottleneckLIP` there is
    no trunk shared with other heads.

    ``reset_parameters`` zeroes ``logit.conv3`` so the module starts as
    average pooling; :class:`lip_cuda.models.LIPDenseNet` instead initialises
    it as the authors' DenseNet does (He-normal, like every other conv).

    State-dict keys: ``logit.conv1.weight``, ``logit.bn1.{weight,bias}``,
    ``logit.conv2.weight``, ``logit.bn2.{weight,bias}``,
    ``logit.conv3.weight``, ``logit.bn3.{weight,bias}``.

    Args:
        channels: ``C`` of the input.
        width: trunk width (the paper's "Bottleneck-128" uses 128).
        kernel_size, stride, padding: the pooling window, as in ``nn.AvgPool2d``.
        use_reference: pool with the unfused reference op.

    Shape:
        x: ``(N, C, H, W)`` -> ``(N, C, H_out, W_out)`` as for ``avg_pool2d``;
        ``(N, C, floor(H / 2), floor(W / 2))`` with the defaults.

    Example::

        >>> lip = TransitionLIP(64)
        >>> lip(torch.randn(2, 64, 28, 27)).shape
        torch.Size([2, 64, 14, 13])
    """

    def __init__(
        self,
        channels: int,
        width: int = DEFAULT_BOTTLENECK_WIDTH,
        kernel_size: int = 2,
        stride: int = 2,
        padding: int = 0,
        use_reference: bool = False,
    ) -> None:
        super().__init__()
        layers = _bottleneck_trunk(channels, width) + _gated_head(width, channels, 1, "conv3", "bn3")
        self.logit = nn.Sequential(OrderedDict(layers))
        self.pool = LIP2d(kernel_size=kernel_size, stride=stride, padding=padding, use_reference=use_reference)
        self.reset_parameters()

    @property
    def logit_conv(self) -> nn.Conv2d:
        """The conv that emits the logits (zero after ``reset_parameters``)."""
        return self.logit.conv3

    def reset_parameters(self) -> None:
        """Default-initialise the trunk, zero the last conv (start as average
        pooling) and reset the norms."""
        for m in self.logit:
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        nn.init.zeros_(self.logit_conv.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(x, self.logit(x))


def set_lip_backend(module: nn.Module, use_reference: bool) -> nn.Module:
    """Switch every :class:`LIP2d` inside ``module`` to the fused op
    (``use_reference=False``) or to the reference formulation (``True``).

    Weights are untouched, so one model can be run both ways. Returns
    ``module``.

    Example::

        >>> from lip_cuda.models import lip_resnet50
        >>> model = set_lip_backend(lip_resnet50(), use_reference=True)
    """
    for m in module.modules():
        if isinstance(m, LIP2d):
            m.use_reference = use_reference
    return module


def _lip_modules(module: nn.Module) -> list[nn.Module]:
    """The LIP logit modules inside ``module``, in ``modules()`` order."""
    return [m for m in module.modules() if isinstance(m, (SimplifiedLIP, BottleneckLIP, TransitionLIP))]


def lip_logit_convs(module: nn.Module) -> list[nn.Conv2d]:
    """The last conv of every LIP logit head in ``module`` (the ones that
    ``reset_parameters`` zeroes). Handy for tests and for giving those
    weights their own optimiser settings."""
    return [m.logit_conv for m in _lip_modules(module)]

