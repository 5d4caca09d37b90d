"""Tests for LIP-DenseNet-BC (lip_cuda.models.lip_densenet*) and its
transition pooling module, lip_cuda.nn.TransitionLIP.

The structure and names are those of the authors' implementation
(github.com/sebgao/LIP, imagenet/lip_densenet.py): a torchvision-style
DenseNet-BC whose stem max pool is a SimplifiedLIP (keys logit.conv1 /
logit.bn1) and whose transitions pool with a Bottleneck-128 LIP over 2x2
windows, stride 2, no padding. The 121-layer model with 1000 classes has
8,690,920 parameters.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lip_cuda.models import (
    LIPDenseNet,
    convert_reference_state_dict,
    lip_densenet121,
    lip_densenet161,
    lip_densenet169,
    lip_densenet201,
)
from lip_cuda.nn import LIP2d, SimplifiedLIP, TransitionLIP, lip_logit_convs, set_lip_backend

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# (builder, growth rate, stem channels, dense layers per block)
VARIANTS = [
    (lip_densenet121, 32, 64, (6, 12, 24, 16)),
    (lip_densenet169, 32, 64, (6, 12, 32, 32)),
    (lip_densenet201, 32, 64, (6, 12, 48, 32)),
    (lip_densenet161, 48, 96, (6, 12, 36, 24)),
]


def _n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _formula(x: torch.Tensor, logit: torch.Tensor, k: int, s: int, p: int) -> torch.Tensor:
    """The paper's formula, written out so the tests trust no implementation."""
    w = logit.exp()
    return F.avg_pool2d(x * w, k, s, p) / F.avg_pool2d(w, k, s, p)


def _transition_channels(growth: int, stem: int, blocks) -> list[int]:
    """Output channels of the three transitions (each halves its input)."""
    c, out = stem, []
    for n in blocks[:-1]:
        c = (c + n * growth) // 2
        out.append(c)
    return out


def _lip_param_count(growth: int, stem: int, blocks, width: int = 128) -> int:
    """Parameters LIP adds to a DenseNet-BC, counted from the paper's layer
    list: the stem's conv3x3 + IN, and per transition with C channels
    conv1x1 (C->w) + IN + conv3x3 (w->w) + IN + conv1x1 (w->C) + IN."""
    n = stem * stem * 9 + 2 * stem
    for c in _transition_channels(growth, stem, blocks):
        n += c * width + 2 * width + width * width * 9 + 2 * width + width * c + 2 * c
    return n


@pytest.fixture(scope="module")
def d121() -> LIPDenseNet:
    torch.manual_seed(0)
    return lip_densenet121()


# ----------------------------------------------------------- structure / names


def test_parameter_count_121(d121) -> None:
    assert _n_params(d121) == 8_690_920
    # Only the classifier depends on the number of classes (1024 features).
    assert _n_params(d121) - _n_params(lip_densenet121(num_classes=10)) == 1025 * 990


@pytest.mark.parametrize("builder,growth,stem,blocks", VARIANTS, ids=[v[0].__name__ for v in VARIANTS])
def test_lip_adds_exactly_its_logit_modules_to_densenet(builder, growth, stem, blocks) -> None:
    """Every variant is torchvision's DenseNet-BC plus the LIP logit modules
    (the pools themselves have no parameters)."""
    torchvision = pytest.importorskip("torchvision")
    plain = getattr(torchvision.models, builder.__name__.replace("lip_", ""))()
    lip = builder()
    assert _n_params(lip) - _n_params(plain) == _lip_param_count(growth, stem, blocks)
    # Same names outside the LIP modules, which add only ``*.pool.*`` keys.
    lip_keys, plain_keys = set(lip.state_dict()), set(plain.state_dict())
    assert plain_keys <= lip_keys
    assert all(".pool0." in k or ".pool." in k for k in lip_keys - plain_keys)


def test_state_dict_lip_keys_match_reference(d121) -> None:
    sd = d121.state_dict()
    lip = {k: tuple(v.shape) for k, v in sd.items() if "pool" in k}
    want = {
        "features.pool0.logit.conv1.weight": (64, 64, 3, 3),
        "features.pool0.logit.bn1.weight": (64,),
        "features.pool0.logit.bn1.bias": (64,),
    }
    for i, c in enumerate(_transition_channels(32, 64, (6, 12, 24, 16)), start=1):
        p = f"features.transition{i}.pool.logit."
        want.update(
            {
                p + "conv1.weight": (128, c, 1, 1),
                p + "bn1.weight": (128,),
                p + "bn1.bias": (128,),
                p + "conv2.weight": (128, 128, 3, 3),
                p + "bn2.weight": (128,),
                p + "bn2.bias": (128,),
                p + "conv3.weight": (c, 128, 1, 1),
                p + "bn3.weight": (c,),
                p + "bn3.bias": (c,),
            }
        )
    assert lip == want
    assert tuple(sd["classifier.weight"].shape) == (1000, 1024)
    assert tuple(sd["features.norm5.weight"].shape) == (1024,)
    assert "features.denseblock4.denselayer16.conv2.weight" in sd


def test_pooling_geometry() -> None:
    """Stem LIP: 3x3 window, stride 2, pad 1; transitions: 2x2, stride 2, no
    padding (floor on odd sizes), checked on the module settings and on the
    feature-map sizes of an odd-sized input."""
    torch.manual_seed(1)
    m = LIPDenseNet(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16, width=8, num_classes=5)
    assert isinstance(m.features.pool0, SimplifiedLIP)
    pool0 = m.features.pool0.pool
    assert (pool0.kernel_size, pool0.stride, pool0.padding) == (3, 2, 1)
    for i in (1, 2, 3):
        t = getattr(m.features, f"transition{i}").pool
        assert isinstance(t, TransitionLIP)
        assert (t.pool.kernel_size, t.pool.stride, t.pool.padding, t.pool.ceil_mode) == (2, 2, 0, False)
    assert sum(isinstance(x, LIP2d) for x in m.modules()) == 4
    assert not any(isinstance(x, (torch.nn.MaxPool2d, torch.nn.AvgPool2d)) for x in m.modules())

    sizes = {}
    for name in ("pool0", "transition1", "transition2", "transition3"):
        getattr(m.features, name).register_forward_hook(
            lambda mod, inp, out, name=name: sizes.__setitem__(name, tuple(out.shape[-2:]))
        )
    h, w = 75, 101
    m(torch.randn(2, 3, h, w))
    h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1  # conv0: 7x7, stride 2, pad 3
    h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1  # pool0: 3x3, stride 2, pad 1
    assert sizes["pool0"] == (h, w)
    for i in (1, 2, 3):
        h, w = h // 2, w // 2
        assert sizes[f"transition{i}"] == (h, w)


# ------------------------------------------------------------- TransitionLIP


def test_transition_lip_names_init_and_formula(seed) -> None:
    m = TransitionLIP(12, width=8)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == {
        "logit.conv1.weight": (8, 12, 1, 1),
        "logit.bn1.weight": (8,),
        "logit.bn1.bias": (8,),
        "logit.conv2.weight": (8, 8, 3, 3),
        "logit.bn2.weight": (8,),
        "logit.bn2.bias": (8,),
        "logit.conv3.weight": (12, 8, 1, 1),
        "logit.bn3.weight": (12,),
        "logit.bn3.bias": (12,),
    }
    assert TransitionLIP(8).logit.conv1.out_channels == 128  # paper default
    assert lip_logit_convs(m) == [m.logit.conv3]
    x = torch.randn(2, 12, 11, 14)
    # Zero last conv: constant logits, plain 2x2 average pooling.
    assert torch.count_nonzero(m.logit.conv3.weight) == 0
    torch.testing.assert_close(m(x), F.avg_pool2d(x, 2, 2), rtol=1e-5, atol=1e-6)

    m = m.double()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_((1.0 if "bn" in name and name.endswith("weight") else 0.0) + 0.5 * torch.randn_like(p))
    x = x.double()
    lg = m.logit

    def inorm(t, bn):
        return F.instance_norm(t, weight=bn.weight, bias=bn.bias)

    t = F.relu(inorm(F.conv2d(x, lg.conv1.weight), lg.bn1))
    t = F.relu(inorm(F.conv2d(t, lg.conv2.weight, padding=1), lg.bn2))
    logit = 12 * torch.sigmoid(inorm(F.conv2d(t, lg.conv3.weight), lg.bn3))
    y = m(x)
    assert y.shape == (2, 12, 5, 7)
    torch.testing.assert_close(y, _formula(x, logit, 2, 2, 0))
    assert (y - F.avg_pool2d(x, 2, 2)).abs().max() > 1e-2


def test_transition_lip_fused_matches_reference_with_grads(seed) -> None:
    m = TransitionLIP(10, width=6).double()
    with torch.no_grad():
        m.logit.conv3.weight.normal_(0.0, 0.5)
    ref = set_lip_backend(copy.deepcopy(m), True)
    x = torch.randn(2, 10, 9, 12, dtype=torch.float64)
    g = torch.randn(2, 10, 4, 6, dtype=torch.float64)
    outs = []
    for mod in (m, ref):
        xx = x.clone().requires_grad_()
        y = mod(xx)
        y.backward(g)
        outs.append((y.detach(), xx.grad, mod.logit.conv1.weight.grad, mod.logit.conv3.weight.grad))
    for a, b in zip(*outs):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b)


TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=4e-3, atol=4e-3),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
def test_transition_geometry_op_every_dtype_and_layout(dtype, layout, seed) -> None:
    """The op as the transitions call it (2x2, stride 2, no padding), odd
    sizes included, against the formula in float64 on the same rounded
    inputs: values and both gradients."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x64 = torch.randn(2, 24, 11, 14, dtype=torch.float64)
    logit64 = 12 * torch.rand(2, 24, 11, 14, dtype=torch.float64)  # the gate's range
    x = x64.to(dtype).contiguous(memory_format=fmt).requires_grad_()
    logit = logit64.to(dtype).contiguous(memory_format=fmt).requires_grad_()
    y = LIP2d(kernel_size=2, stride=2, padding=0)(x, logit)
    assert y.shape == (2, 24, 5, 7) and y.dtype == dtype and y.is_contiguous(memory_format=fmt)
    g = torch.randn(y.shape, dtype=torch.float64)
    y.backward(g.to(dtype))

    xr = x.detach().double().requires_grad_()
    lr = logit.detach().double().requires_grad_()
    want = _formula(xr, lr, 2, 2, 0)
    want.backward(g.to(dtype).double())
    torch.testing.assert_close(y.double(), want, **TOL[dtype])
    torch.testing.assert_close(x.grad.double(), xr.grad, **TOL[dtype])
    torch.testing.assert_close(logit.grad.double(), lr.grad, **TOL[dtype])
    # The last row and column of the odd-sized input are outside every window.
    assert x.grad[..., 10, :].abs().max() == 0 and x.grad[..., :10, :].abs().max() > 0


# ------------------------------------------------------------ whole network


def test_forward_shapes(d121, seed) -> None:
    d121.eval()
    with torch.no_grad():
        assert d121(torch.randn(2, 3, 64, 80)).shape == (2, 1000)
        assert d121.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 1024, 2, 2)


def test_fused_and_reference_models_agree_float64(seed) -> None:
    fused = lip_densenet121(num_classes=10).double().train()
    ref = set_lip_backend(copy.deepcopy(fused), True)
    assert all(m.use_reference for m in ref.modules() if isinstance(m, LIP2d))
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    target = torch.randint(0, 10, (2,))
    results = []
    for model in (fused, ref):
        xx = x.clone().requires_grad_()
        out = model(xx)
        F.cross_entropy(out, target).backward()
        results.append([out.detach(), xx.grad] + [c.weight.grad for c in lip_logit_convs(model)])
    assert len(results[0]) == 2 + 4
    for a, b in zip(*results):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)
    # The LIPs matter: pooling the transitions by plain averaging changes the output.
    with torch.no_grad():
        for c in lip_logit_convs(fused):
            c.weight.zero_()
        assert (fused(x) - results[0][0]).abs().max() > 1e-4


def test_gradients_reach_every_lip_logit_module(d121, seed) -> None:
    d121.train().zero_grad(set_to_none=True)
    x = torch.randn(2, 3, 64, 64)
    F.cross_entropy(d121(x), torch.randint(0, 1000, (2,))).backward()
    lip_modules = [m for m in d121.modules() if isinstance(m, (SimplifiedLIP, TransitionLIP))]
    assert len(lip_modules) == 4
    for m in lip_modules:
        for name, p in m.named_parameters():
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name


def test_sgd_steps_reduce_loss() -> None:
    torch.manual_seed(3)
    model = LIPDenseNet(growth_rate=12, block_config=(3, 3, 3, 3), num_init_features=24, width=16, num_classes=5)
    model.train()
    x = torch.randn(4, 3, 64, 64)
    target = torch.tensor([0, 2, 3, 4])
    lip_before = [c.weight.detach().clone() for c in lip_logit_convs(model)]
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
    assert all((c.weight - w).abs().max() > 0 for c, w in zip(lip_logit_convs(model), lip_before))


def test_checkpoint_with_dataparallel_prefix_loads_strict(d121, seed) -> None:
    """A training checkpoint as the authors' script saves it: state dict of a
    DataParallel model under "state_dict"."""
    with torch.no_grad():
        for p in d121.parameters():
            p.add_(0.01 * torch.randn_like(p))
        for name, b in d121.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 2.0)
    ckpt = {"epoch": 90, "state_dict": {"module." + k: v.clone() for k, v in d121.state_dict().items()}}
    fresh = lip_densenet121()
    result = fresh.load_state_dict(convert_reference_state_dict(ckpt), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(1, 3, 64, 64)
    d121.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), d121(x), rtol=0, atol=0)


@requires_cuda
def test_cuda_fused_matches_cpu_reference(seed) -> None:
    model = LIPDenseNet(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16, width=8, num_classes=5)
    model = model.double().train()
    ref = set_lip_backend(copy.deepcopy(model), True)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    want = ref(x)
    got = model.cuda()(x.cuda()).cpu()
    torch.testing.assert_close(got, want)


def test_docstring_examples(seed) -> None:
    import doctest

    import lip_cuda.models_densenet as mod

    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 2 and result.failed == 0
