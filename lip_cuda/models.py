"""LIP-ResNet (Gao et al., ICCV 2019): ResNet with every stride-2
downsampling done by LIP.

* The stem max pool becomes :class:`~lip_cuda.nn.SimplifiedLIP` (``maxpool``).
* In the first block of stages 2-4, the strided 3x3 conv becomes
  ``conv2 = Sequential(BottleneckLIP, conv1x1)`` and the strided 1x1 shortcut
  becomes ``downsample = (lip: BottleneckLIP, conv: conv1x1, bn: BatchNorm2d)``;
  both LIP heads read one :class:`~lip_cuda.nn.BottleneckShared` trunk
  (``bottleneck_shared``) computed from the block input.

Names, shapes and initialisation follow the authors' ``imagenet/lip_resnet.py``
(github.com/sebgao/LIP), so their ImageNet checkpoints load with
``load_state_dict(strict=True)`` (see :func:`convert_reference_state_dict`).
With 1000 classes LIP-ResNet-50 has 23,864,232 parameters, -101 42,856,360,
-152 58,500,008.

This module also re-exports LIP-DenseNet-BC (:class:`LIPDenseNet`,
``lip_densenet121`` / ``169`` / ``201`` / ``161``, defined in
``lip_cuda/models_densenet.py``) and the torchvision detection builders
(:func:`lip_resnet_fpn_backbone`, :func:`fasterrcnn_lip_resnet50_fpn`,
:func:`retinanet_lip_resnet50_fpn`, defined in ``lip_cuda/detection.py``;
they need the optional torchvision, imported only when they are called).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from .nn import DEFAULT_BOTTLENECK_WIDTH, BottleneckLIP, BottleneckShared, SimplifiedLIP

#: Builds the norm layer after each conv from its channel count
#: (``nn.BatchNorm2d`` by default; detection backbones use a frozen BN).
NormLayer = Callable[[int], nn.Module]

__all__ = [
    "LIPBottleneck",
    "LIPDownsample",
    "LIPResNet",
    "lip_resnet50",
    "lip_resnet101",
    "lip_resnet152",
    "convert_reference_state_dict",
    # LIP-DenseNet-BC (lip_cuda/models_densenet.py)
    "LIPDenseNet",
    "lip_densenet121",
    "lip_densenet169",
    "lip_densenet201",
    "lip_densenet161",
    # detection backbones on torchvision (lip_cuda/detection.py)
    "lip_resnet_fpn_backbone",
    "fasterrcnn_lip_resnet50_fpn",
    "retinanet_lip_resnet50_fpn",
]


def _conv1x1(in_planes: int, out_planes: int) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, bias=False)


def _conv3x3(in_planes: int, out_planes: int) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, padding=1, bias=False)


class _LIPConv(nn.Sequential):
    """``Sequential(BottleneckLIP, conv1x1)`` whose LIP also takes the shared
    trunk output. A Sequential so the keys are ``conv2.0.*`` / ``conv2.1.*``
    as in the reference checkpoints."""

    def forward(self, x: Tensor, shared: Tensor) -> Tensor:  # type: ignore[override]
        lip, conv = self[0], self[1]
        return conv(lip(x, shared))


class LIPDownsample(nn.Module):
    """Strided shortcut of a LIP-ResNet block: ``bn(conv1x1(LIP(x, shared)))``.

    Keys: ``lip.postprocessing.{conv,bn}.*``, ``conv.weight``, ``bn.*``.

    Shape:
        x: ``(N, C_in, H, W)``, shared: ``(N, width, H, W)``
        -> ``(N, C_out, ceil(H / 2), ceil(W / 2))``.

    Example::

        >>> from lip_cuda.nn import BottleneckShared
        >>> x = torch.randn(2, 256, 28, 28)
        >>> LIPDownsample(256, 512)(x, BottleneckShared(256)(x)).shape
        torch.Size([2, 512, 14, 14])
    """

    def __init__(
        self,
        in_planes: int,
        out_planes: int,
        width: int = DEFAULT_BOTTLENECK_WIDTH,
        use_reference: bool = False,
        norm_layer: Optional[NormLayer] = None,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self.lip = BottleneckLIP(in_planes, width, use_reference=use_reference)
        self.conv = _conv1x1(in_planes, out_planes)
        self.bn = norm_layer(out_planes)

    def forward(self, x: Tensor, shared: Tensor) -> Tensor:
        return self.bn(self.conv(self.lip(x, shared)))


class LIPBottleneck(nn.Module):
    """ResNet bottleneck block (1x1, 3x3, 1x1, expansion 4) with LIP in place
    of stride 2.

    With ``stride=1`` it is the plain torchvision-style block. With
    ``stride=2`` the 3x3 conv becomes ``conv2 = [BottleneckLIP, conv1x1]`` and
    the shortcut a :class:`LIPDownsample`, both fed by ``bottleneck_shared``
    (a :class:`~lip_cuda.nn.BottleneckShared` on the block input).

    Args:
        inplanes: input channels.
        planes: bottleneck channels; output has ``planes * 4``.
        stride: 1 or 2.
        downsample: shortcut projection, or ``None`` for identity. For
            ``stride=2`` it must be a :class:`LIPDownsample`.
        width: width of the shared LIP trunk.
        use_reference: run LIP with the unfused reference op.
        norm_layer: norm after each conv (default ``nn.BatchNorm2d``).

    Shape:
        ``(N, inplanes, H, W)`` -> ``(N, 4 * planes, H', W')`` with
        ``H' = H`` for stride 1 and ``ceil(H / 2)`` for stride 2.

    Example::

        >>> blk = LIPBottleneck(256, 128, stride=2, downsample=LIPDownsample(256, 512))
        >>> blk(torch.randn(2, 256, 28, 28)).shape
        torch.Size([2, 512, 14, 14])
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        width: int = DEFAULT_BOTTLENECK_WIDTH,
        use_reference: bool = False,
        norm_layer: Optional[NormLayer] = None,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        if stride not in (1, 2):
            raise ValueError(f"LIPBottleneck supports stride 1 or 2, got {stride}")
        if stride == 2 and not isinstance(downsample, LIPDownsample):
            raise ValueError("a stride-2 LIPBottleneck needs a LIPDownsample shortcut")
        self.stride = stride
        if stride == 2:
            # Registered first to match the reference's parameter order.
            self.bottleneck_shared = BottleneckShared(inplanes, width)
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = norm_layer(planes)
        if stride == 2:
            self.conv2: nn.Module = _LIPConv(
                BottleneckLIP(planes, width, use_reference=use_reference),
                _conv1x1(planes, planes),
            )
        else:
            self.conv2 = _conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        if self.stride == 2:
            # One trunk from the block input serves both LIP heads.
            shared = self.bottleneck_shared(x)
            out = self.conv2(out, shared)
            identity = self.downsample(x, shared)
        else:
            out = self.conv2(out)
            identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn2(out))
        out = self.bn3(self.conv3(out))
        out = out + identity
        return self.relu(out)


class LIPResNet(nn.Module):
    """LIP-ResNet built from :class:`LIPBottleneck` blocks.

    Args:
        layers: blocks per stage, e.g. ``(3, 4, 6, 3)`` for LIP-ResNet-50.
        num_classes: size of the ``fc`` output.
        width: width of the shared LIP trunks (paper: 128).
        use_reference: run every LIP with the unfused reference op.
        norm_layer: the norm after every conv outside the LIP logit modules
            (default ``nn.BatchNorm2d``; detectors pass torchvision's
            ``FrozenBatchNorm2d``, see :func:`lip_resnet_fpn_backbone`). The
            logit modules keep their InstanceNorms.

    Shape:
        ``(N, 3, H, W)`` -> ``(N, num_classes)``. ``H, W >= 17`` in training
        and in eval (the logit modules' InstanceNorms at stride 16 need more
        than one position).

    Example::

        >>> model = LIPResNet((3, 4, 6, 3), num_classes=10)
        >>> model(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        layers: Sequence[int],
        num_classes: int = 1000,
        width: int = DEFAULT_BOTTLENECK_WIDTH,
        use_reference: bool = False,
        norm_layer: Optional[NormLayer] = None,
    ) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"layers must have 4 entries, got {list(layers)}")
        self._width = width
        self._use_reference = use_reference
        self._norm_layer = norm_layer or nn.BatchNorm2d
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = self._norm_layer(64)
        self.relu = nn.ReLU(inplace=True)
        # Named ``maxpool`` because that is what it replaces (and the
        # reference checkpoints' key).
        self.maxpool = SimplifiedLIP(64, use_reference=use_reference)
        self.layer1 = self._make_layer(64, layers[0], stride=1)
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * LIPBottleneck.expansion, num_classes)
        self.reset_parameters()

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        out_planes = planes * LIPBottleneck.expansion
        downsample: Optional[nn.Module] = None
        if stride == 2:
            downsample = LIPDownsample(
                self.inplanes, out_planes, self._width, self._use_reference, self._norm_layer
            )
        elif self.inplanes != out_planes:
            # A Sequential of named children: keys ``downsample.conv`` /
            # ``downsample.bn`` as in the reference (not torchvision's 0/1).
            downsample = nn.Sequential(
                OrderedDict(
                    [("conv", _conv1x1(self.inplanes, out_planes)), ("bn", self._norm_layer(out_planes))]
                )
            )
        kw = dict(width=self._width, use_reference=self._use_reference, norm_layer=self._norm_layer)
        blocks_list = [LIPBottleneck(self.inplanes, planes, stride, downsample, **kw)]
        self.inplanes = out_planes
        blocks_list += [LIPBottleneck(self.inplanes, planes, **kw) for _ in range(1, blocks)]
        return nn.Sequential(*blocks_list)

    def reset_parameters(self) -> None:
        """The reference initialisation: kaiming (fan_out) convs, BN = (1, 0),
        fc ~ N(0, 0.01), then zero the last BN of every block (each residual
        branch starts as identity) and the LIP logit head convs (each LIP
        starts as average pooling).

        A norm layer without a learnable ``weight`` (a frozen BN) is left at
        its own initialisation: zeroed, it could never learn its way back
        and the block's residual branch would stay dead."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) and m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.fc.weight, 0.0, 0.01)
        nn.init.zeros_(self.fc.bias)
        for m in self.modules():
            if isinstance(m, LIPBottleneck):
                if isinstance(getattr(m.bn3, "weight", None), nn.Parameter):
                    nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, (SimplifiedLIP, BottleneckLIP)):
                m.reset_parameters()

    def forward_features(self, x: Tensor) -> Tensor:
        """``(N, 3, H, W)`` -> ``(N, 2048, H/32, W/32)`` (before pooling)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.forward_features(x))
        return self.fc(torch.flatten(x, 1))


def convert_reference_state_dict(checkpoint: Mapping[str, Any]) -> "OrderedDict[str, Tensor]":
    """Turn a checkpoint from the authors' code into a plain state dict.

    Accepts either a bare state dict or a training checkpoint
    (``{"state_dict": ..., "epoch": ...}``), and strips the ``module.`` prefix
    that ``DataParallel`` / ``DistributedDataParallel`` add. Key names are
    otherwise the same as :class:`LIPResNet`'s.

    Example::

        >>> ckpt = torch.load("lip_resnet-50.pth", map_location="cpu")  # doctest: +SKIP
        >>> model = lip_resnet50()
        >>> model.load_state_dict(convert_reference_state_dict(ckpt))  # doctest: +SKIP
    """
    sd = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else checkpoint
    out: "OrderedDict[str, Tensor]" = OrderedDict()
    for k, v in sd.items():
        out[k[len("module."):] if k.startswith("module.") else k] = v
    return out


def _build(layers: Sequence[int], num_classes: int, use_reference: bool, **kw: Any) -> LIPResNet:
    return LIPResNet(layers, num_classes=num_classes, use_reference=use_reference, **kw)


def lip_resnet50(num_classes: int = 1000, use_reference: bool = False, **kw: Any) -> LIPResNet:
    """LIP-ResNet-50 (stages 3, 4, 6, 3; 23,864,232 parameters at 1000 classes).

    ``kw`` goes to :class:`LIPResNet` (e.g. ``width``).

    Example::

        >>> model = lip_resnet50()
        >>> model(torch.randn(1, 3, 224, 224)).shape
        torch.Size([1, 1000])
    """
    return _build((3, 4, 6, 3), num_classes, use_reference, **kw)


def lip_resnet101(num_classes: int = 1000, use_reference: bool = False, **kw: Any) -> LIPResNet:
    """LIP-ResNet-101 (stages 3, 4, 23, 3; 42,856,360 parameters at 1000 classes)."""
    return _build((3, 4, 23, 3), num_classes, use_reference, **kw)


def lip_resnet152(num_classes: int = 1000, use_reference: bool = False, **kw: Any) -> LIPResNet:
    """LIP-ResNet-152 (stages 3, 8, 36, 3; 58,500,008 parameters at 1000 classes)."""
    return _build((3, 8, 36, 3), num_classes, use_reference, **kw)


# Other model families live in their own files; they are imported here, after
# LIPResNet is defined, because the detection builders are built on it.
from .models_densenet import LIPDenseNet, lip_densenet121, lip_densenet161, lip_densenet169, lip_densenet201  # noqa: E402
from .detection import fasterrcnn_lip_resnet50_fpn, lip_resnet_fpn_backbone, retinanet_lip_resnet50_fpn  # noqa: E402
