"""Architectures that ``lip_cuda.train`` can build, looked up by name.

The registry is built at call time from what is importable: every LIP
network that :mod:`lip_cuda.models` defines (a name missing from this version
of the package is reported as such, not as a typo), torchvision's plain
ResNet-50 for comparison (needs the ``train`` extra), and ``lip_smoke``, a
tiny LIP-ResNet for smoke tests and CI.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict

import torch
from torch import Tensor, nn

from .. import models
from ..models import LIPResNet
from ..nn import SimplifiedLIP, set_lip_backend
from .errors import TrainConfigError, require_torchvision

__all__ = ["Arch", "available_archs", "build_model", "SmokeLIPResNet"]

#: LIP networks looked up in :mod:`lip_cuda.models`; the ones it does not
#: define (yet) are left out of the registry.
LIP_ARCH_NAMES = ("lip_resnet50", "lip_resnet101", "lip_resnet152", "lip_densenet121")


@dataclass(frozen=True)
class Arch:
    """One registry entry: ``build(num_classes) -> nn.Module``."""

    name: str
    build: Callable[[int], nn.Module]
    has_lip: bool
    description: str
    #: smallest square --image-size the network takes: its logit modules'
    #: InstanceNorms need more than one position at their deepest stride
    #: (measured in train and eval mode; every larger size works)
    min_image_size: int = 1


class SmokeLIPResNet(LIPResNet):
    """A LIP-ResNet small enough for CPU smoke tests (``--arch lip_smoke``).

    A 3x3 stem (16 channels), the ``SimplifiedLIP`` stem pool and two
    single-block stages with LIP downsampling (16 -> 32 -> 64 channels, LIP
    trunk width 16): the same modules, key names and initialisation as the
    full LIP-ResNets at about 16k parameters.

    Shape:
        ``(N, 3, H, W)`` -> ``(N, num_classes)``; ``H, W >= 5``.

    Example::

        >>> SmokeLIPResNet(10)(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, use_reference: bool = False) -> None:
        nn.Module.__init__(self)
        self._width = 16
        self._use_reference = use_reference
        self._norm_layer = nn.BatchNorm2d
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = SimplifiedLIP(16, use_reference=use_reference)
        self.layer1 = self._make_layer(8, 1, stride=2)
        self.layer2 = self._make_layer(16, 1, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(self.inplanes, num_classes)
        self.reset_parameters()

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer2(self.layer1(x))


def _torchvision_resnet50(num_classes: int) -> nn.Module:
    tv = require_torchvision("--arch resnet50")
    return tv.models.resnet50(weights=None, num_classes=num_classes)


def available_archs() -> Dict[str, Arch]:
    """Name -> :class:`Arch` for everything this installation can build.

    Example::

        >>> "lip_resnet50" in available_archs()
        True
    """
    archs: Dict[str, Arch] = {}
    for name in LIP_ARCH_NAMES:
        fn = getattr(models, name, None)
        if callable(fn):
            min_size = 29 if "densenet" in name else 17
            archs[name] = Arch(name, lambda n, fn=fn: fn(num_classes=n), True, f"lip_cuda.models.{name}", min_size)
    archs["resnet50"] = Arch("resnet50", _torchvision_resnet50, False, "torchvision ResNet-50 (max-pool / strided conv)")
    archs["lip_smoke"] = Arch("lip_smoke", lambda n: SmokeLIPResNet(n), True, "tiny LIP-ResNet for smoke tests", 5)
    return archs


def lookup_arch(name: str) -> Arch:
    """The registry entry for ``name``, or a :class:`TrainConfigError` that
    lists what is available."""
    archs = available_archs()
    if name in archs:
        return archs[name]
    known = ", ".join(sorted(archs))
    if name in LIP_ARCH_NAMES:
        raise TrainConfigError(
            f"--arch {name} is not available: this version of lip_cuda.models does not define it "
            f"(available: {known})"
        )
    raise TrainConfigError(f"unknown --arch {name!r} (available: {known})")


def build_model(name: str, num_classes: int, lip_backend: str = "fused") -> nn.Module:
    """Build ``name`` with ``num_classes`` outputs and every LIP set to
    ``lip_backend`` (``"fused"`` or ``"reference"``).

    Example::

        >>> model = build_model("lip_smoke", 10, "reference")
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    arch = lookup_arch(name)
    model = arch.build(num_classes)
    set_lip_backend(model, use_reference=(lip_backend == "reference"))
    return model
