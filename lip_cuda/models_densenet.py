"""LIP-DenseNet-BC (Gao et al., ICCV 2019): DenseNet-BC with every
downsampling after the stem conv done by LIP.

* The stem max pool becomes a :class:`~lip_cuda.nn.SimplifiedLIP` (3x3
  window, stride 2, padding 1), ``features.pool0``.
* The ``AvgPool2d(2, 2)`` of every transition becomes a
  :class:`~lip_cuda.nn.TransitionLIP` (the Bottleneck-128 logit module on the
  transition's output, 2x2 window, stride 2, no padding),
  ``features.transition{i}.pool``.

Everything else is the torchvision-style DenseNet-BC. Names, shapes and
initialisation follow the authors' ``imagenet/lip_densenet.py``
(github.com/sebgao/LIP), so their ImageNet checkpoint loads with
``load_state_dict(strict=True)`` (after
:func:`lip_cuda.models.convert_reference_state_dict`, which strips a
``DataParallel`` prefix). With 1000 classes LIP-DenseNet-121 has 8,690,920
parameters. The builders are re-exported from :mod:`lip_cuda.models`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .nn import DEFAULT_BOTTLENECK_WIDTH, SimplifiedLIP, TransitionLIP

__all__ = ["LIPDenseNet", "lip_densenet121", "lip_densenet169", "lip_densenet201", "lip_densenet161"]


class _StemLIP(SimplifiedLIP):
    """:class:`SimplifiedLIP` under the names the authors' DenseNet gives it:
    ``logit.conv1`` / ``logit.bn1`` (their ResNet says ``conv`` / ``bn``)."""

    _keys = ("conv1", "bn1")


class _DenseLayer(nn.Sequential):
    """BN-ReLU-conv1x1-BN-ReLU-conv3x3; its ``growth_rate`` new channels are
    concatenated to its input."""

    def __init__(self, in_channels: int, growth_rate: int, bn_size: int, drop_rate: float) -> None:
        mid = bn_size * growth_rate
        super().__init__(
            OrderedDict(
                [
                    ("norm1", nn.BatchNorm2d(in_channels)),
                    ("relu1", nn.ReLU(inplace=True)),
                    ("conv1", nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)),
                    ("norm2", nn.BatchNorm2d(mid)),
                    ("relu2", nn.ReLU(inplace=True)),
                    ("conv2", nn.Conv2d(mid, growth_rate, kernel_size=3, padding=1, bias=False)),
                ]
            )
        )
        self.drop_rate = float(drop_rate)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        new = super().forward(x)
        if self.drop_rate > 0:
            new = F.dropout(new, p=self.drop_rate, training=self.training)
        return torch.cat([x, new], 1)


class _DenseBlock(nn.Sequential):
    def __init__(self, num_layers: int, in_channels: int, bn_size: int, growth_rate: int, drop_rate: float) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(in_channels + i * growth_rate, growth_rate, bn_size, drop_rate)
            self.add_module(f"denselayer{i + 1}", layer)


class _Transition(nn.Sequential):
    """BN-ReLU-conv1x1 halving the channels, then LIP over 2x2 windows."""

    def __init__(self, in_channels: int, out_channels: int, width: int, use_reference: bool) -> None:
        super().__init__(
            OrderedDict(
                [
                    ("norm", nn.BatchNorm2d(in_channels)),
                    ("relu", nn.ReLU(inplace=True)),
                    ("conv", nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)),
                    (
                        "pool",
                        TransitionLIP(
                            out_channels, width, kernel_size=2, stride=2, padding=0, use_reference=use_reference
                        ),
                    ),
                ]
            )
        )


class LIPDenseNet(nn.Module):
    """LIP-DenseNet-BC.

    Args:
        growth_rate: channels each dense layer adds (``k``).
        block_config: dense layers per block, e.g. ``(6, 12, 24, 16)`` for 121.
        num_init_features: channels of the stem conv.
        bn_size: bottleneck width of a dense layer, in multiples of ``k``.
        drop_rate: dropout after each dense layer.
        num_classes: size of the ``classifier`` output.
        width: width of the transitions' LIP logit trunks (paper: 128).
        use_reference: run every LIP with the unfused reference op.

    Keys: ``features.{conv0,norm0,pool0}``, ``features.denseblock{i}.denselayer{j}.*``,
    ``features.transition{i}.{norm,conv,pool}``, ``features.norm5``,
    ``classifier``.

    Shape:
        ``(N, 3, H, W)`` -> ``(N, num_classes)``. ``H, W >= 29`` (DenseNet-121's
        layout) in training and in eval (InstanceNorm in the last transition
        needs more than one position).

    Example::

        >>> model = LIPDenseNet(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16, num_classes=10)
        >>> model(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: Sequence[int] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        drop_rate: float = 0.0,
        num_classes: int = 1000,
        width: int = DEFAULT_BOTTLENECK_WIDTH,
        use_reference: bool = False,
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
                [
                    ("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
                    ("norm0", nn.BatchNorm2d(num_init_features)),
                    ("relu0", nn.ReLU(inplace=True)),
                    ("pool0", _StemLIP(num_init_features, use_reference=use_reference)),
                ]
            )
        )
        channels = num_init_features
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(num_layers, channels, bn_size, growth_rate, drop_rate)
            self.features.add_module(f"denseblock{i + 1}", block)
            channels += num_layers * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module(
                    f"transition{i + 1}", _Transition(channels, channels // 2, width, use_reference)
                )
                channels //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(channels))
        self.classifier = nn.Linear(channels, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The authors' initialisation: He-normal (fan_in) for every conv,
        the LIP logit convs included (their DenseNet does not zero them, unlike
        their ResNet), BN = (1, 0), InstanceNorm = (1, 0), classifier bias 0
        and PyTorch's default classifier weight."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) and m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.classifier.reset_parameters()
        nn.init.zeros_(self.classifier.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """``(N, 3, H, W)`` -> ``(N, C, H/32, W/32)``, after the final ReLU."""
        return F.relu(self.features(x), inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        x = F.adaptive_avg_pool2d(self.forward_features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def _build(growth_rate: int, block_config: Sequence[int], num_init_features: int, **kw: Any) -> LIPDenseNet:
    return LIPDenseNet(growth_rate=growth_rate, block_config=block_config, num_init_features=num_init_features, **kw)


def lip_densenet121(num_classes: int = 1000, use_reference: bool = False, **kw: Any) -> LIPDenseNet:
    """LIP-DenseNet-BC-121 (k = 32, blocks 6, 12, 24, 16; 8,690,920
    parameters at 1000 classes).

    ``kw`` goes to :class:`LIPDenseNet` (e.g. ``drop_rate``, ``width``).

    Example::

        >>> model = lip_densenet121()
        >>> model(torch.randn(1, 3, 224, 224)).shape
        torch.Size([1, 1000])
    """
    return _build(32, (6, 12, 24, 16), 64, num_classes=num_classes, use_reference=use_reference, **kw)


def lip_densenet169(num_classes: int = 1000, use_reference: bool = False, **kw: Any) -> LIPDenseNet:
    """LIP-DenseNet-BC-169 (k = 32, blocks 6, 12, 32, 32)."""
    return _build(32, (6, 12, 32, 32), 64, num_classes=num_classes, use_reference=use_reference, **kw)


def lip_densenet201(num_classes: int = 1000, use_reference: bool = False, **kw: Any) -> LIPDenseNet:
    """LIP-DenseNet-BC-201 (k = 32, blocks 6, 12, 48, 32)."""
    return _build(32, (6, 12, 48, 32), 64, num_classes=num_classes, use_reference=use_reference, **kw)


def lip_densenet161(num_classes: int = 1000, use_reference: bool = False, **kw: Any) -> LIPDenseNet:
    """LIP-DenseNet-BC-161 (k = 48, 96 stem channels, blocks 6, 12, 36, 24)."""
    return _build(48, (6, 12, 36, 24), 96, num_classes=num_classes, use_reference=use_reference, **kw)
