"""LIP-ResNet detection backbones and detectors on torchvision.

:func:`lip_resnet_fpn_backbone` wraps a :class:`~lip_cuda.models.LIPResNet`
in torchvision's ``BackboneWithFPN``; :func:`fasterrcnn_lip_resnet50_fpn` and
:func:`retinanet_lip_resnet50_fpn` put it into torchvision's ``FasterRCNN`` /
``RetinaNet`` the way torchvision builds its ResNet-50-FPN detectors. The
paper reports these detectors on MS COCO with LIP-ResNet backbones.

torchvision is an optional dependency (``pip install "lip_cuda[detection]"``):
it is imported only when one of these functions is called. The builders are
re-exported from :mod:`lip_cuda.models`.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .models import LIPResNet, convert_reference_state_dict

__all__ = ["lip_resnet_fpn_backbone", "fasterrcnn_lip_resnet50_fpn", "retinanet_lip_resnet50_fpn"]

#: A LIP-ResNet ImageNet checkpoint: a path for ``torch.load``, or what it
#: returns (a state dict or a ``{"state_dict": ...}`` training checkpoint, with
#: or without ``DataParallel``'s ``module.`` prefix).
Weights = Union[str, "os.PathLike[str]", Mapping[str, Any]]

_STAGES = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def _torchvision() -> Any:
    """Import torchvision, or say how to install it."""
    try:
        import torchvision
        import torchvision.models.detection  # noqa: F401
        import torchvision.ops.feature_pyramid_network  # noqa: F401
    except ImportError as e:  # pragma: no cover - exercised only without torchvision
        raise ImportError(
            'lip_cuda\'s detection models need torchvision: pip install "lip_cuda[detection]" '
            "(or pip install torchvision)"
        ) from e
    return torchvision


def _load_backbone_weights(model: LIPResNet, weights: Weights) -> None:
    """Load an ImageNet LIP-ResNet checkpoint into ``model``. Every key must
    match except the classifier ``fc.*``, which detection does not use (so a
    checkpoint with any number of classes, or none, loads)."""
    if isinstance(weights, (str, os.PathLike)):
        weights = torch.load(weights, map_location="cpu")
    state = {k: v for k, v in convert_reference_state_dict(weights).items() if not k.startswith("fc.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise RuntimeError(
            "the checkpoint does not match this LIP-ResNet: "
            f"missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )


def lip_resnet_fpn_backbone(
    depth: int = 50,
    trainable_layers: int = 3,
    returned_layers: Sequence[int] = (1, 2, 3, 4),
    norm_layer: Optional[Callable[[int], nn.Module]] = None,
    weights: Optional[Weights] = None,
    extra_blocks: Optional[nn.Module] = None,
    use_reference: bool = False,
) -> nn.Module:
    """A LIP-ResNet with a feature pyramid: torchvision's ``BackboneWithFPN``.

    Args:
        depth: 50, 101 or 152.
        trainable_layers: how many stages, from the last, train: 0-5 as in
            torchvision (3 = ``layer2``-``layer4``; 5 adds ``layer1`` and the
            stem ``conv1``/``bn1``/``maxpool``). Freezing a stage freezes the
            LIP logit modules inside it too (the stem LIP, ``maxpool``, goes
            with the stem).
        returned_layers: which stages (1-4) feed the FPN.
        norm_layer: the LIP-ResNet's norm after each conv; ``None`` means
            torchvision's ``FrozenBatchNorm2d`` (the usual choice when
            fine-tuning from ImageNet with small batches). The LIP logit
            modules keep their InstanceNorms.
        weights: an ImageNet LIP-ResNet checkpoint in the authors' format
            (see :data:`Weights`), loaded before the classifier is dropped.
        extra_blocks: torchvision FPN extra block (default ``LastLevelMaxPool``).
        use_reference: run every LIP with the unfused reference op.

    Returns:
        ``BackboneWithFPN`` (``out_channels == 256``) mapping ``(N, 3, H, W)``
        to an ``OrderedDict`` of ``(N, 256, H / s, W / s)`` maps, ``s = 4, 8,
        16, 32`` for stages 1-4, keys ``"0"``, ``"1"``, ... and ``"pool"``.

    Example::

        >>> backbone = lip_resnet_fpn_backbone(50, trainable_layers=3)
        >>> feats = backbone(torch.randn(1, 3, 128, 160))
        >>> [tuple(f.shape) for f in feats.values()]
        [(1, 256, 32, 40), (1, 256, 16, 20), (1, 256, 8, 10), (1, 256, 4, 5), (1, 256, 2, 3)]
    """
    tv = _torchvision()
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    if depth not in _STAGES:
        raise ValueError(f"depth must be one of {sorted(_STAGES)}, got {depth}")
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers must be in [0, 5], got {trainable_layers}")
    returned_layers = list(returned_layers)
    if not returned_layers or min(returned_layers) < 1 or max(returned_layers) > 4:
        raise ValueError(f"returned_layers must be stages in [1, 4], got {returned_layers}")

    body = LIPResNet(
        _STAGES[depth], norm_layer=norm_layer or tv.ops.FrozenBatchNorm2d, use_reference=use_reference
    )
    if weights is not None:
        _load_backbone_weights(body, weights)

    trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        trainable += ["bn1", "maxpool"]
    for name, p in body.named_parameters():
        if not any(name.startswith(prefix + ".") for prefix in trainable):
            p.requires_grad_(False)

    # Stage i has 256 * 2 ** (i - 1) output channels.
    in_channels = [(body.inplanes // 8) * 2 ** (i - 1) for i in returned_layers]
    return BackboneWithFPN(
        body,
        return_layers={f"layer{k}": str(v) for v, k in enumerate(returned_layers)},
        in_channels_list=in_channels,
        out_channels=256,
        extra_blocks=extra_blocks if extra_blocks is not None else LastLevelMaxPool(),
    )


def _detector_backbone(
    weights_backbone: Optional[Weights], trainable_backbone_layers: Optional[int], **kw: Any
) -> nn.Module:
    # As torchvision: frozen BN and 3 trainable stages when starting from
    # ImageNet weights; plain BN and everything trainable from scratch.
    pretrained = weights_backbone is not None
    if trainable_backbone_layers is None:
        trainable_backbone_layers = 3 if pretrained else 5
    norm = _torchvision().ops.FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
    return lip_resnet_fpn_backbone(
        50, trainable_backbone_layers, norm_layer=norm, weights=weights_backbone, **kw
    )


def fasterrcnn_lip_resnet50_fpn(
    num_classes: int = 91,
    weights_backbone: Optional[Weights] = None,
    trainable_backbone_layers: Optional[int] = None,
    **kwargs: Any,
) -> nn.Module:
    """Faster R-CNN with a LIP-ResNet-50-FPN backbone (torchvision ``FasterRCNN``).

    Built as ``torchvision.models.detection.fasterrcnn_resnet50_fpn`` builds
    its own: with ``weights_backbone`` (a LIP-ResNet-50 ImageNet checkpoint,
    see :func:`lip_resnet_fpn_backbone`) the backbone uses frozen BN and
    trains 3 stages by default; without, plain BN and all 5 stages (here an
    explicit ``trainable_backbone_layers`` is honoured in both cases).
    ``kwargs`` go to ``FasterRCNN`` (``min_size``, ``max_size``, ...).

    Input/output: torchvision's detection format. In eval mode
    ``model(list of (3, H, W) images)`` returns one dict per image with
    ``boxes`` ``(K, 4)`` (x1, y1, x2, y2), ``labels`` ``(K,)``, ``scores``
    ``(K,)``; in train mode ``model(images, targets)`` returns a dict of
    losses.

    Example::

        >>> model = fasterrcnn_lip_resnet50_fpn(num_classes=3, min_size=64, max_size=96).eval()
        >>> out = model([torch.rand(3, 64, 96)])
        >>> sorted(out[0])
        ['boxes', 'labels', 'scores']
    """
    _torchvision()
    from torchvision.models.detection import FasterRCNN

    backbone = _detector_backbone(weights_backbone, trainable_backbone_layers)
    return FasterRCNN(backbone, num_classes=num_classes, **kwargs)


def retinanet_lip_resnet50_fpn(
    num_classes: int = 91,
    weights_backbone: Optional[Weights] = None,
    trainable_backbone_layers: Optional[int] = None,
    **kwargs: Any,
) -> nn.Module:
    """RetinaNet with a LIP-ResNet-50-FPN backbone (torchvision ``RetinaNet``).

    As ``torchvision.models.detection.retinanet_resnet50_fpn``: the FPN reads
    stages 2-4 (P3-P5, no P2: too many anchors) and adds P6/P7
    (``LastLevelP6P7(256, 256)``). Backbone weights, norm and trainable
    stages as in :func:`fasterrcnn_lip_resnet50_fpn`; ``kwargs`` go to
    ``RetinaNet``. Same input/output format.

    Example::

        >>> model = retinanet_lip_resnet50_fpn(num_classes=3, min_size=64, max_size=96).eval()
        >>> out = model([torch.rand(3, 64, 96)])
        >>> sorted(out[0])
        ['boxes', 'labels', 'scores']
    """
    _torchvision()
    from torchvision.models.detection import RetinaNet
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    backbone = _detector_backbone(
        weights_backbone,
        trainable_backbone_layers,
        returned_layers=(2, 3, 4),
        extra_blocks=LastLevelP6P7(256, 256),
    )
    return RetinaNet(backbone, num_classes, **kwargs)
