"""Tests for the LIP-ResNet detection backbones and detectors
(lip_cuda.models.lip_resnet_fpn_backbone, fasterrcnn_lip_resnet50_fpn,
retinanet_lip_resnet50_fpn), on the CPU with small images.

torchvision is an optional dependency of lip_cuda; CI installs it so these
tests run there.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

from lip_cuda.models import (
    LIPBottleneck,
    fasterrcnn_lip_resnet50_fpn,
    lip_resnet50,
    lip_resnet_fpn_backbone,
    retinanet_lip_resnet50_fpn,
)
from lip_cuda.nn import BottleneckLIP, LIP2d, SimplifiedLIP, lip_logit_convs, set_lip_backend

SIZES = [(64, 96), (80, 64)]  # (H, W) of the two test images
NUM_CLASSES = 5
# Keep torchvision from resizing to 800 pixels.
SMALL = dict(min_size=64, max_size=96)
# Fewer proposals and sampled boxes than the defaults: a quick CPU train step.
FEW = dict(
    rpn_pre_nms_top_n_train=200,
    rpn_post_nms_top_n_train=100,
    rpn_batch_size_per_image=64,
    box_batch_size_per_image=64,
)


@pytest.fixture(scope="module")
def tv():
    return pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def imagenet_checkpoint() -> dict:
    """What the authors' training script saves for a LIP-ResNet-50: a
    DataParallel state dict under "state_dict", here with random weights that
    leave none of the zero-initialised tensors at zero, and random BN
    statistics."""
    torch.manual_seed(11)
    src = lip_resnet50()
    with torch.no_grad():
        for c in lip_logit_convs(src):
            c.weight.normal_(0.0, 0.3)
        for m in src.modules():
            if isinstance(m, LIPBottleneck):
                m.bn3.weight.uniform_(0.2, 1.0)
        for name, b in src.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0.0, 0.1)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 2.0)
    return {"epoch": 90, "state_dict": {"module." + k: v.clone() for k, v in src.state_dict().items()}}


def _plain_state(ckpt: dict) -> dict:
    return {k[len("module."):]: v for k, v in ckpt["state_dict"].items()}


def _images() -> list[torch.Tensor]:
    return [torch.rand(3, h, w) for h, w in SIZES]


def _targets() -> list[dict]:
    out = []
    for h, w in SIZES:
        k = 3
        xy = torch.rand(k, 2) * torch.tensor([w / 2, h / 2])
        wh = 12 + torch.rand(k, 2) * torch.tensor([w / 2 - 12, h / 2 - 12])
        out.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(1, NUM_CLASSES, (k,))})
    return out


def _stage_of(name: str) -> str:
    return name.split(".")[0]


def _check_eval_output(out: list, first_label: int) -> None:
    """torchvision's detection output; ``first_label`` is 1 where class 0 is
    the background (Faster R-CNN), 0 where there is none (RetinaNet)."""
    assert isinstance(out, list) and len(out) == len(SIZES)
    for det, (h, w) in zip(out, SIZES):
        assert set(det) == {"boxes", "labels", "scores"}
        k = det["boxes"].shape[0]
        assert det["boxes"].shape == (k, 4) and det["boxes"].dtype == torch.float32
        assert det["labels"].shape == (k,) and det["labels"].dtype == torch.int64
        assert det["scores"].shape == (k,)
        assert k > 0
        b = det["boxes"]
        # Boxes come back in the input image's coordinates, clipped to it.
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
        assert (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
        assert (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()
        assert ((det["labels"] >= first_label) & (det["labels"] < NUM_CLASSES)).all()
        assert ((det["scores"] >= 0) & (det["scores"] <= 1)).all()


# ------------------------------------------------------------------ backbone


def test_backbone_features(tv, seed) -> None:
    backbone = lip_resnet_fpn_backbone(50).eval()
    assert isinstance(backbone, tv.models.detection.backbone_utils.BackboneWithFPN)
    assert backbone.out_channels == 256
    # The LIP-ResNet is inside, with frozen BN by default.
    assert isinstance(backbone.body.maxpool, SimplifiedLIP)
    assert isinstance(backbone.body.bn1, tv.ops.FrozenBatchNorm2d)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    assert sum(isinstance(m, BottleneckLIP) for m in backbone.modules()) == 6
    # A frozen BN cannot learn its way out of a zero: the residual branches
    # keep their norm's initial weight of one instead of the zero init.
    blocks = [m for m in backbone.modules() if isinstance(m, LIPBottleneck)]
    assert len(blocks) == 16 and all(torch.equal(b.bn3.weight, torch.ones_like(b.bn3.weight)) for b in blocks)
    with torch.no_grad():
        feats = backbone(torch.randn(2, 3, 64, 96))
    assert list(feats) == ["0", "1", "2", "3", "pool"]
    for (key, f), s in zip(feats.items(), (4, 8, 16, 32, 64)):
        assert f.shape == (2, 256, -(-64 // s), -(-96 // s)), key
        assert torch.isfinite(f).all()

    b2 = lip_resnet_fpn_backbone(50, returned_layers=(2, 4))
    with torch.no_grad():
        feats = b2(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape) for f in feats.values()] == [(1, 256, 8, 8), (1, 256, 2, 2), (1, 256, 1, 1)]


@pytest.mark.parametrize("depth,blocks", [(101, 23), (152, 36)])
def test_backbone_depths(tv, depth, blocks) -> None:
    backbone = lip_resnet_fpn_backbone(depth)
    assert len(backbone.body.layer3) == blocks


def test_backbone_argument_checks(tv) -> None:
    with pytest.raises(ValueError, match="depth"):
        lip_resnet_fpn_backbone(34)
    with pytest.raises(ValueError, match="trainable_layers"):
        lip_resnet_fpn_backbone(50, trainable_layers=6)
    with pytest.raises(ValueError, match="returned_layers"):
        lip_resnet_fpn_backbone(50, returned_layers=(0, 1))


@pytest.mark.parametrize("trainable", [0, 1, 3, 5])
def test_frozen_layers_include_their_lip_modules(tv, trainable) -> None:
    backbone = lip_resnet_fpn_backbone(50, trainable_layers=trainable)
    # The stages that train, from the last; 5 adds the stem, stem LIP included.
    order = [["layer4"], ["layer3"], ["layer2"], ["layer1"], ["conv1", "bn1", "maxpool"]]
    want = {s for group in order[:trainable] for s in group}
    for name, p in backbone.body.named_parameters():
        assert p.requires_grad == (_stage_of(name) in want), name
    # The LIP logit modules of frozen stages are frozen with them.
    for name, m in backbone.body.named_modules():
        if isinstance(m, (SimplifiedLIP, BottleneckLIP)):
            assert all(p.requires_grad == (_stage_of(name) in want) for p in m.parameters()), name
    # The FPN always trains.
    assert all(p.requires_grad for p in backbone.fpn.parameters())


def test_backbone_fused_matches_reference_float64(tv, imagenet_checkpoint, seed) -> None:
    fused = lip_resnet_fpn_backbone(50, weights=imagenet_checkpoint).double().eval()
    ref = set_lip_backend(copy.deepcopy(fused), True)
    assert all(m.use_reference for m in ref.modules() if isinstance(m, LIP2d))
    x = torch.randn(1, 3, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        a, b = fused(x), ref(x)
    for key in a:
        assert a[key].abs().max() > 0
        torch.testing.assert_close(a[key], b[key], rtol=1e-7, atol=1e-10)


# ------------------------------------------------------------ checkpoints


def test_lip_resnet50_checkpoint_loads_into_backbone(tv, imagenet_checkpoint, tmp_path, seed) -> None:
    path = tmp_path / "lip_resnet-50.pth"
    torch.save(imagenet_checkpoint, path)
    backbone = lip_resnet_fpn_backbone(50, weights=str(path)).eval()
    src = lip_resnet50()
    src.load_state_dict(_plain_state(imagenet_checkpoint))
    src.eval()
    # Every tensor of the backbone's LIP-ResNet is the checkpoint's.
    want = src.state_dict()
    body = backbone.body.state_dict()
    assert len(body) > 300
    for k, v in body.items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=0, msg=k)
    # ... and computes the ImageNet model's stage outputs (frozen BN = eval BN).
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        got = backbone.body(x)
        h = src.maxpool(src.relu(src.bn1(src.conv1(x))))
        for i, key in enumerate(["0", "1", "2", "3"]):
            h = getattr(src, f"layer{i + 1}")(h)
            assert h.abs().max() > 0
            torch.testing.assert_close(got[key], h, rtol=1e-4, atol=1e-5)


def test_checkpoint_classifier_is_ignored_other_mismatches_raise(tv, imagenet_checkpoint) -> None:
    torch.manual_seed(2)
    ten_classes = lip_resnet50(num_classes=10).state_dict()
    lip_resnet_fpn_backbone(50, weights=ten_classes)  # fc (10 classes) is not used
    no_fc = {k: v for k, v in _plain_state(imagenet_checkpoint).items() if not k.startswith("fc.")}
    lip_resnet_fpn_backbone(50, weights=no_fc)
    state = _plain_state(imagenet_checkpoint)
    short = {k: v for k, v in state.items() if k != "layer3.0.bottleneck_shared.logit.conv1.weight"}
    with pytest.raises(RuntimeError, match=r"missing keys \['layer3.0.bottleneck_shared.logit.conv1.weight'\]"):
        lip_resnet_fpn_backbone(50, weights=short)
    extra = dict(state, **{"layer3.6.conv1.weight": state["layer3.5.conv1.weight"]})
    with pytest.raises(RuntimeError, match=r"unexpected keys \['layer3.6.conv1.weight'\]"):
        lip_resnet_fpn_backbone(50, weights=extra)
    with pytest.raises(RuntimeError, match="missing keys"):  # a 50 is not a 101
        lip_resnet_fpn_backbone(101, weights=state)


# ---------------------------------------------------------------- detectors


def test_fasterrcnn_eval_output_format(tv, seed) -> None:
    model = fasterrcnn_lip_resnet50_fpn(num_classes=NUM_CLASSES, box_score_thresh=0.0, **SMALL).eval()
    assert isinstance(model, tv.models.detection.FasterRCNN)
    # From scratch, as torchvision: plain BN, every stage trainable.
    assert isinstance(model.backbone.body.bn1, torch.nn.BatchNorm2d)
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        _check_eval_output(model(_images()), first_label=1)


def test_retinanet_eval_output_format(tv, seed) -> None:
    model = retinanet_lip_resnet50_fpn(
        num_classes=NUM_CLASSES, score_thresh=0.0, topk_candidates=100, detections_per_img=50, **SMALL
    ).eval()
    assert isinstance(model, tv.models.detection.RetinaNet)
    # P3-P7: stages 2-4 plus two extra levels.
    with torch.no_grad():
        feats = model.backbone(torch.randn(1, 3, 128, 128))
    assert [f.shape[-1] for f in feats.values()] == [16, 8, 4, 2, 1]
    with torch.no_grad():
        _check_eval_output(model(_images()), first_label=0)


@pytest.mark.parametrize(
    "builder,loss_keys,stages",
    [
        (
            fasterrcnn_lip_resnet50_fpn,
            {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"},
            ("layer2", "layer3", "layer4"),
        ),
        (retinanet_lip_resnet50_fpn, {"classification", "bbox_regression"}, ("layer2", "layer3", "layer4")),
    ],
    ids=["fasterrcnn", "retinanet"],
)
def test_train_losses_finite_and_reach_lip(tv, imagenet_checkpoint, builder, loss_keys, stages, seed) -> None:
    """From ImageNet weights: frozen BN, stages 2-4 train. The losses are
    finite, their gradients reach every LIP logit conv of the trainable
    stages, and nothing frozen gets a gradient."""
    extra = FEW if builder is fasterrcnn_lip_resnet50_fpn else {}
    model = builder(num_classes=NUM_CLASSES, weights_backbone=imagenet_checkpoint, **SMALL, **extra).train()
    body = model.backbone.body
    assert isinstance(body.bn1, tv.ops.FrozenBatchNorm2d)
    losses = model(_images(), _targets())
    assert set(losses) == loss_keys
    for k, v in losses.items():
        assert v.ndim == 0 and torch.isfinite(v), k
    sum(losses.values()).backward()

    trainable_lips = [c for s in stages for c in lip_logit_convs(getattr(body, s))]
    assert len(trainable_lips) == 2 * len(stages)
    for conv in trainable_lips:
        assert conv.weight.grad is not None
        assert torch.isfinite(conv.weight.grad).all() and conv.weight.grad.abs().max() > 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            continue
        assert p.grad is None, name
    frozen = [n for n, p in body.named_parameters() if not p.requires_grad]
    assert {_stage_of(n) for n in frozen} == {"conv1", "maxpool", "layer1"}
    # The stem LIP is frozen with the stem.
    assert body.maxpool.logit.conv.weight.grad is None


def test_no_torchvision_import_at_package_import() -> None:
    code = "import sys, lip_cuda, lip_cuda.models, lip_cuda.nn; assert 'torchvision' not in sys.modules"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_missing_torchvision_names_the_extra(monkeypatch) -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes ``import torchvision`` fail
    for build in (lambda: lip_resnet_fpn_backbone(50), fasterrcnn_lip_resnet50_fpn, retinanet_lip_resnet50_fpn):
        with pytest.raises(ImportError, match=r"lip_cuda\[detection\]"):
            build()


def test_docstring_examples(tv, seed) -> None:
    import doctest

    import lip_cuda.detection as mod

    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 3 and result.failed == 0
