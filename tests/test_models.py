"""Tests for lip_cuda.models (LIP-ResNet).

The expected parameter counts and state-dict layout are those of the authors'
implementation (github.com/sebgao/LIP, imagenet/lip_resnet.py), whose
published ImageNet checkpoints must load with strict=True.
"""

from __future__ import annotations

import copy
import hashlib

import pytest
import torch
import torch.nn.functional as F

from lip_cuda.models import (
    LIPBottleneck,
    LIPResNet,
    convert_reference_state_dict,
    lip_resnet50,
    lip_resnet101,
    lip_resnet152,
)
from lip_cuda.nn import BottleneckLIP, SimplifiedLIP, lip_logit_convs, set_lip_backend

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _layout_digest(m: torch.nn.Module) -> str:
    """sha256 over the sorted ``key:shape`` lines of the state dict."""
    lines = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in sorted(m.state_dict().items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def _randomize_lip_and_residuals_(model: torch.nn.Module, scale: float = 0.3) -> None:
    """Give the zero-initialised weights (LIP head convs, last BN of every
    block) random non-zero values so every LIP matters for the output."""
    with torch.no_grad():
        for conv in lip_logit_convs(model):
            conv.weight.normal_(0.0, scale)
        for m in model.modules():
            if isinstance(m, LIPBottleneck):
                m.bn3.weight.uniform_(0.2, 1.0)


def _lip_ref(x: torch.Tensor, logit: torch.Tensor) -> torch.Tensor:
    w = logit.exp()
    return F.avg_pool2d(x * w, 3, 2, 1) / F.avg_pool2d(w, 3, 2, 1)


@pytest.fixture(scope="module")
def r50() -> LIPResNet:
    torch.manual_seed(0)
    return lip_resnet50()


# ----------------------------------------------------------- structure / names


def test_parameter_counts_match_paper_models(r50) -> None:
    assert _n_params(r50) == 23_864_232
    assert _n_params(lip_resnet101()) == 42_856_360
    # = 101's count + (torchvision resnet152 - resnet101), the blocks added.
    assert _n_params(lip_resnet152()) == 58_500_008


def test_num_classes_changes_only_fc(r50) -> None:
    m = lip_resnet50(num_classes=10)
    assert _n_params(r50) - _n_params(m) == 2049 * 990
    assert m.fc.out_features == 10


def test_state_dict_layout_matches_reference(r50) -> None:
    sd = r50.state_dict()
    assert len(sd) == 359
    # Digest of the reference implementation's sorted (key, shape) list.
    assert _layout_digest(r50) == "b78d5fe2e069fa54611a851044972a4047844c94071a6ce57afe05ae60410186"
    spot = {
        "conv1.weight": (64, 3, 7, 7),
        "bn1.running_var": (64,),
        "maxpool.logit.conv.weight": (64, 64, 3, 3),
        "maxpool.logit.bn.weight": (64,),
        "maxpool.logit.bn.bias": (64,),
        "layer1.0.downsample.conv.weight": (256, 64, 1, 1),
        "layer1.0.downsample.bn.running_mean": (256,),
        "layer1.0.conv2.weight": (64, 64, 3, 3),
        "layer2.0.bottleneck_shared.logit.conv1.weight": (128, 256, 1, 1),
        "layer2.0.bottleneck_shared.logit.bn1.weight": (128,),
        "layer2.0.bottleneck_shared.logit.conv2.weight": (128, 128, 3, 3),
        "layer2.0.bottleneck_shared.logit.bn2.bias": (128,),
        "layer2.0.conv2.0.postprocessing.conv.weight": (128, 128, 1, 1),
        "layer2.0.conv2.0.postprocessing.bn.weight": (128,),
        "layer2.0.conv2.1.weight": (128, 128, 1, 1),
        "layer2.0.downsample.lip.postprocessing.conv.weight": (256, 128, 1, 1),
        "layer2.0.downsample.lip.postprocessing.bn.bias": (256,),
        "layer2.0.downsample.conv.weight": (512, 256, 1, 1),
        "layer2.0.downsample.bn.num_batches_tracked": (),
        "layer3.0.conv2.0.postprocessing.conv.weight": (256, 128, 1, 1),
        "layer3.0.downsample.lip.postprocessing.conv.weight": (512, 128, 1, 1),
        "layer3.5.conv3.weight": (1024, 256, 1, 1),
        "layer4.0.bottleneck_shared.logit.conv1.weight": (128, 1024, 1, 1),
        "layer4.0.conv2.0.postprocessing.conv.weight": (512, 128, 1, 1),
        "layer4.0.downsample.lip.postprocessing.conv.weight": (1024, 128, 1, 1),
        "layer4.2.bn3.weight": (2048,),
        "fc.weight": (1000, 2048),
        "fc.bias": (1000,),
    }
    for k, shape in spot.items():
        assert k in sd, k
        assert tuple(sd[k].shape) == shape, k
    # Only the first block of stages 2-4 has LIP; InstanceNorms keep no stats.
    assert not any(k.startswith(("layer1.1.bottleneck", "layer2.1.bottleneck", "layer3.1.downsample")) for k in sd)
    assert not any("running" in k for k in sd if "postprocessing" in k or "logit" in k)


def test_layouts_of_101_and_152() -> None:
    assert _layout_digest(lip_resnet101()) == "fa2091c0cf00f450a765bc9ef5f28dba9a2188cff8a0c5d16273cd67cb000815"
    m = lip_resnet152()
    assert [len(getattr(m, f"layer{i}")) for i in range(1, 5)] == [3, 8, 36, 3]
    assert _layout_digest(m) == "0cc30439ed292413683ea44d4bacad1e2ab62dbd7c64482e01fd4d76cdfba05b"


def test_init_zeroes_lip_heads_and_last_bn(r50) -> None:
    convs = lip_logit_convs(r50)
    assert len(convs) == 1 + 2 * 3  # stem + (conv2, downsample) in stages 2-4
    assert all(torch.count_nonzero(c.weight) == 0 for c in convs)
    blocks = [m for m in r50.modules() if isinstance(m, LIPBottleneck)]
    assert len(blocks) == 16
    assert all(torch.count_nonzero(b.bn3.weight) == 0 for b in blocks)
    # Everything else is initialised normally (kaiming convs, trunks too).
    assert r50.layer2[0].bottleneck_shared.logit.conv2.weight.std() > 0
    assert r50.layer2[0].conv2[1].weight.std() > 0
    assert r50.conv1.weight.std() > 0 and r50.fc.weight.std() > 0


def test_load_checkpoint_with_dataparallel_prefix(r50, seed) -> None:
    src = lip_resnet50()
    _randomize_lip_and_residuals_(src)
    ckpt = {"epoch": 90, "state_dict": {"module." + k: v for k, v in src.state_dict().items()}}
    dst = lip_resnet50()
    dst.load_state_dict(convert_reference_state_dict(ckpt), strict=True)
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k
    assert torch.count_nonzero(dst.maxpool.logit.conv.weight) > 0


# ---------------------------------------------------------------- behaviour


def test_forward_224(r50, seed) -> None:
    r50.eval()
    with torch.no_grad():
        y = r50(torch.randn(1, 3, 224, 224))
    assert y.shape == (1, 1000)
    assert torch.isfinite(y).all() and y.abs().max() > 0


def test_downsampling_is_lip_everywhere() -> None:
    """No strided conv or max pool is left; feature maps halve five times."""
    m = lip_resnet50(num_classes=10)
    strided = [n for n, c in m.named_modules() if isinstance(c, torch.nn.Conv2d) and c.stride != (1, 1)]
    assert strided == ["conv1"]
    assert not any(isinstance(c, torch.nn.MaxPool2d) for c in m.modules())
    assert isinstance(m.maxpool, SimplifiedLIP)
    m.eval()
    with torch.no_grad():
        assert m.forward_features(torch.randn(1, 3, 96, 96)).shape == (1, 2048, 3, 3)


def test_fused_and_reference_models_agree_float64(seed) -> None:
    fused = lip_resnet50(num_classes=10).double()
    _randomize_lip_and_residuals_(fused)
    ref = set_lip_backend(copy.deepcopy(fused), True)
    assert all(m.pool.use_reference for m in ref.modules() if isinstance(m, (SimplifiedLIP, BottleneckLIP)))
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    target = torch.randint(0, 10, (2,))
    results = []
    for model in (fused, ref):
        model.train()
        xx = x.clone().requires_grad_()
        out = model(xx)
        F.cross_entropy(out, target).backward()
        lip_grad = model.layer3[0].downsample.lip.postprocessing.conv.weight.grad
        results.append((out.detach(), xx.grad, lip_grad, model.maxpool.logit.conv.weight.grad))
    for a, b in zip(*results):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)
    # The LIPs matter: zeroing the logit heads changes the output.
    with torch.no_grad():
        for c in lip_logit_convs(fused):
            c.weight.zero_()
        assert (fused(x) - results[0][0]).abs().max() > 1e-4


def test_sgd_steps_reduce_loss() -> None:
    torch.manual_seed(4)
    model = lip_resnet50(num_classes=10)
    model.train()
    x = torch.randn(4, 3, 64, 64)
    target = torch.tensor([0, 3, 7, 9])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(6):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.1, losses
    # The LIP heads left their zero init: gradients reach them.
    assert all(torch.count_nonzero(c.weight) > 0 for c in lip_logit_convs(model))


def test_stride2_block_wiring_and_gradients(seed) -> None:
    """A stride-2 block written out by hand with the paper's formula: one
    trunk on the block input feeds both LIP heads, and gradients reach the
    trunk through both."""
    from lip_cuda.models import LIPDownsample

    blk = LIPBottleneck(32, 16, stride=2, downsample=LIPDownsample(32, 64, width=8), width=8).double().train()
    _randomize_lip_and_residuals_(blk)
    x = torch.randn(2, 32, 10, 9, dtype=torch.float64)

    def by_hand() -> torch.Tensor:
        t = blk.bottleneck_shared.logit
        shared = F.relu(t.bn1(t.conv1(x)))
        shared = F.relu(t.bn2(t.conv2(shared)))

        def head(lip, feat):
            pp = lip.postprocessing
            return _lip_ref(feat, 12 * torch.sigmoid(pp.bn(pp.conv(shared))))

        out = F.relu(blk.bn1(blk.conv1(x)))
        out = F.relu(blk.bn2(blk.conv2[1](head(blk.conv2[0], out))))
        out = blk.bn3(blk.conv3(out))
        ds = blk.downsample
        return F.relu(out + ds.bn(ds.conv(head(ds.lip, x))))

    params = [blk.bottleneck_shared.logit.conv1.weight, blk.conv2[0].postprocessing.conv.weight,
              blk.downsample.lip.postprocessing.conv.weight]
    g = torch.randn(2, 64, 5, 5, dtype=torch.float64)
    y = blk(x)
    got = torch.autograd.grad(y, params, g)
    y_hand = by_hand()
    want = torch.autograd.grad(y_hand, params, g)
    torch.testing.assert_close(y, y_hand)
    for a, b in zip(got, want):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b)


@requires_cuda
def test_cuda_fused_matches_reference(seed) -> None:
    fused = lip_resnet50(num_classes=10).double()
    _randomize_lip_and_residuals_(fused)
    ref = set_lip_backend(copy.deepcopy(fused), True)
    x = torch.randn(2, 3, 96, 96, dtype=torch.float64)
    fused, ref, xc = fused.cuda().train(), ref.cuda().train(), x.cuda()
    torch.testing.assert_close(fused(xc), ref(xc), rtol=1e-7, atol=1e-10)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_train_step_is_finite(dtype, seed) -> None:
    """The paper's gate reaches logits near 12; exp(12) overflows float16 in
    the unfused formula, the fused op must stay finite."""
    model = lip_resnet50(num_classes=10)
    _randomize_lip_and_residuals_(model, scale=3.0)
    model = model.cuda().train()
    x = torch.randn(4, 3, 96, 96, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        loss = F.cross_entropy(model(x), torch.arange(4, device="cuda"))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_docstring_examples(seed) -> None:
    import doctest

    import lip_cuda.models as mod

    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 4 and result.failed == 0
