"""Tests for lip_cuda.nn: SoftGate, LIP2d and the LIP logit modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lip_cuda.functional import lip2d
from lip_cuda.nn import (
    BottleneckLIP,
    BottleneckShared,
    LIP2d,
    SimplifiedLIP,
    SoftGate,
    TransitionLIP,
    lip_logit_convs,
    set_lip_backend,
)
from lip_cuda.reference import lip2d_reference

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _formula(x: torch.Tensor, logit: torch.Tensor, k=3, s=2, p=1, ceil_mode=False) -> torch.Tensor:
    """The paper's formula, written out here so the tests do not trust any
    implementation under test."""
    w = logit.exp()
    return F.avg_pool2d(x * w, k, s, p, ceil_mode=ceil_mode) / F.avg_pool2d(w, k, s, p, ceil_mode=ceil_mode)


def _randomize_(module: torch.nn.Module, scale: float = 0.5) -> None:
    """Non-zero random weights everywhere (incl. the zero-initialised LIP
    convs and the norms' affine parameters), so outputs depend on them."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bn.weight") or name.endswith("bn1.weight") or name.endswith("bn2.weight"):
                p.copy_(1.0 + scale * torch.randn_like(p))
            else:
                p.copy_(scale * torch.randn_like(p))


# --------------------------------------------------------------------- SoftGate


def test_softgate_values(seed) -> None:
    x = torch.randn(4, 5, 6) * 5
    y = SoftGate()(x)
    torch.testing.assert_close(y, 12.0 * torch.sigmoid(x))
    assert y.min() >= 0 and y.max() <= 12
    # Spot values that do not depend on torch.sigmoid.
    pts = torch.tensor([0.0, 2.0, -3.0])
    expected = torch.tensor([6.0, 12 / (1 + torch.e ** -2), 12 / (1 + torch.e ** 3)])
    torch.testing.assert_close(SoftGate()(pts), expected)


def test_softgate_coeff(seed) -> None:
    x = torch.randn(3, 7)
    torch.testing.assert_close(SoftGate(coeff=3.5)(x), 3.5 * torch.sigmoid(x))
    assert "coeff=3.5" in repr(SoftGate(3.5))


# ------------------------------------------------------------------------ LIP2d


@pytest.mark.parametrize(
    "k,s,p,ceil_mode,shape",
    [
        (3, 2, 1, False, (2, 3, 9, 8)),
        (3, 2, 1, True, (1, 4, 10, 7)),
        (2, 2, 0, False, (2, 2, 8, 8)),
        (5, 3, 2, True, (1, 3, 11, 13)),
    ],
)
def test_lip2d_module_matches_functional(k, s, p, ceil_mode, shape, seed) -> None:
    x = torch.randn(shape, dtype=torch.float64)
    logit = 3 * torch.randn(shape, dtype=torch.float64)
    mod = LIP2d(k, s, p, ceil_mode)
    y = mod(x, logit)
    torch.testing.assert_close(y, lip2d(x, logit, k, s, p, ceil_mode), rtol=0, atol=0)
    torch.testing.assert_close(y, _formula(x, logit, k, s, p, ceil_mode))
    ref_mod = LIP2d(k, s, p, ceil_mode, use_reference=True)
    torch.testing.assert_close(ref_mod(x, logit), lip2d_reference(x, logit, k, s, p, ceil_mode), rtol=0, atol=0)
    torch.testing.assert_close(ref_mod(x, logit), y)


def test_lip2d_module_gradients_match_reference(seed) -> None:
    x = torch.randn(2, 3, 12, 10, dtype=torch.float64, requires_grad=True)
    logit = (2 * torch.randn(2, 3, 12, 10, dtype=torch.float64)).requires_grad_()
    g = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    grads = []
    for use_ref in (False, True):
        y = LIP2d(3, 2, 1, use_reference=use_ref)(x, logit)
        grads.append(torch.autograd.grad(y, (x, logit), g))
    for a, b in zip(*grads):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b)


def test_lip2d_mixed_dtypes(seed) -> None:
    """The fused op returns x's dtype (the logits only weigh); the reference
    formula promotes. Both hold the same values."""
    x = torch.randn(2, 3, 8, 8)
    logit = 4 * torch.randn(2, 3, 8, 8, dtype=torch.float64)
    want = _formula(x.double(), logit)
    y = LIP2d(3, 2, 1)(x, logit)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    y_ref = LIP2d(3, 2, 1, use_reference=True)(x, logit)
    assert y_ref.dtype == torch.float64
    torch.testing.assert_close(y_ref, want)


def test_lip2d_repr_and_backend_switch() -> None:
    m = torch.nn.Sequential(SimplifiedLIP(4), LIP2d(2, 2, 0))
    assert all(not mod.use_reference for mod in m.modules() if isinstance(mod, LIP2d))
    set_lip_backend(m, True)
    assert all(mod.use_reference for mod in m.modules() if isinstance(mod, LIP2d))
    assert "use_reference=True" in repr(m)
    set_lip_backend(m, False)
    assert all(not mod.use_reference for mod in m.modules() if isinstance(mod, LIP2d))


def test_lip2d_has_no_parameters() -> None:
    assert list(LIP2d(3, 2, 1).parameters()) == [] and LIP2d(2).state_dict() == {}


def test_lip2d_takes_avgpool2d_arguments_and_defaults() -> None:
    import inspect

    want = inspect.signature(torch.nn.AvgPool2d.__init__).parameters
    got = inspect.signature(LIP2d.__init__).parameters
    assert list(got)[: len(want)] == list(want)
    for name, param in want.items():
        assert got[name].default == param.default, name
    assert got["use_reference"].kind is inspect.Parameter.KEYWORD_ONLY
    with pytest.raises(TypeError):
        LIP2d()  # kernel_size is required, as in AvgPool2d
    for args in [(2,), (3, 2, 1), (3, None, 1), ((2, 3), (1, 2), (1, 0))]:
        assert repr(LIP2d(*args)) == repr(torch.nn.AvgPool2d(*args)).replace("AvgPool2d", "LIP2d"), args
    assert LIP2d(4).stride == 4 and LIP2d(4).padding == 0 and not LIP2d(4).ceil_mode


def test_lip2d_forward_is_documented() -> None:
    doc = LIP2d.forward.__doc__ or ""
    assert "logit" in doc and "Returns" in doc and "(N, C, H_out, W_out)" in doc


GEOMETRIES = [  # (kernel_size, stride, padding, ceil_mode, (H, W))
    (2, None, 0, False, (15, 15)),
    (3, None, 1, False, (16, 13)),
    (3, 2, 1, False, (15, 15)),
    (3, 2, 1, True, (14, 9)),
    (3, 2, 0, True, (10, 11)),
    ((2, 3), (1, 2), (1, 0), False, (7, 12)),
    (5, 3, 2, True, (11, 13)),
    (4, 1, 2, False, (6, 5)),
    (1, 1, 0, False, (5, 4)),
]


@pytest.mark.parametrize("k,s,p,ceil_mode,hw", GEOMETRIES)
def test_lip2d_output_shape_is_avgpool2d_shape(k, s, p, ceil_mode, hw, seed) -> None:
    x = torch.randn(2, 3, *hw)
    logit = 4 * torch.randn(2, 3, *hw)
    want = torch.nn.AvgPool2d(k, s, p, ceil_mode)(x).shape
    for use_ref in (False, True):
        assert LIP2d(k, s, p, ceil_mode, use_reference=use_ref)(x, logit).shape == want


@pytest.mark.parametrize("k,s,p,ceil_mode,hw", GEOMETRIES)
def test_lip2d_with_constant_logits_is_average_pooling(k, s, p, ceil_mode, hw, seed) -> None:
    x = torch.randn(2, 3, *hw, dtype=torch.float64)
    logit = torch.full_like(x, float(torch.empty(()).uniform_(-20, 20)))
    y = LIP2d(k, s, p, ceil_mode)(x, logit)
    # Padded positions carry no weight: count_include_pad=False, and where no
    # padding is involved plain AvgPool2d (which then equals it).
    torch.testing.assert_close(y, torch.nn.AvgPool2d(k, s, p, ceil_mode, count_include_pad=False)(x))
    if p == 0 and not ceil_mode:
        torch.testing.assert_close(y, torch.nn.AvgPool2d(k, s, p)(x))


# ---------------------------------------------------------------- SimplifiedLIP


def test_simplified_lip_names_and_shapes() -> None:
    sd = SimplifiedLIP(16).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {
        "logit.conv.weight": (16, 16, 3, 3),
        "logit.bn.weight": (16,),
        "logit.bn.bias": (16,),
    }


def test_simplified_lip_starts_as_average_pooling(seed) -> None:
    m = SimplifiedLIP(8)
    assert torch.count_nonzero(m.logit.conv.weight) == 0
    x = torch.randn(2, 8, 15, 12)
    y = m(x)
    # Constant logits: padded positions carry no weight, i.e. the divisor is
    # the number of real positions in the window (count_include_pad=False).
    expected = F.avg_pool2d(x, 3, 2, 1, count_include_pad=False)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    # ... which differs from count_include_pad=True on the border, so the
    # comparison above can tell the two apart.
    assert (y - F.avg_pool2d(x, 3, 2, 1)).abs().max() > 1e-3


def test_simplified_lip_random_weights_follow_formula(seed) -> None:
    m = SimplifiedLIP(6).double()
    _randomize_(m)
    x = torch.randn(2, 6, 14, 14, dtype=torch.float64)
    logit = 12 * torch.sigmoid(
        F.instance_norm(
            F.conv2d(x, m.logit.conv.weight, padding=1), weight=m.logit.bn.weight, bias=m.logit.bn.bias
        )
    )
    expected = _formula(x, logit)
    y = m(x)
    torch.testing.assert_close(y, expected)
    # Not average pooling any more.
    assert (y - F.avg_pool2d(x, 3, 2, 1, count_include_pad=False)).abs().max() > 1e-2
    # Fused and reference backends agree, values and gradients.
    m_ref = set_lip_backend(SimplifiedLIP(6).double(), True)
    m_ref.load_state_dict(m.state_dict())
    xg = x.clone().requires_grad_()
    xr = x.clone().requires_grad_()
    g = torch.randn_like(y)
    m(xg).backward(g)
    m_ref(xr).backward(g)
    torch.testing.assert_close(xg.grad, xr.grad)
    torch.testing.assert_close(m.logit.conv.weight.grad, m_ref.logit.conv.weight.grad)
    assert m.logit.conv.weight.grad.abs().max() > 0


# ----------------------------------------------------- BottleneckShared / LIP


def test_bottleneck_shared_names_shapes_output(seed) -> None:
    m = BottleneckShared(24, width=16)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == {
        "logit.conv1.weight": (16, 24, 1, 1),
        "logit.bn1.weight": (16,),
        "logit.bn1.bias": (16,),
        "logit.conv2.weight": (16, 16, 3, 3),
        "logit.bn2.weight": (16,),
        "logit.bn2.bias": (16,),
    }
    assert BottleneckShared(8).logit.conv1.out_channels == 128  # paper default
    x = torch.randn(2, 24, 10, 9)
    y = m(x)
    assert y.shape == (2, 16, 10, 9)
    assert y.min() >= 0 and y.max() > 0  # ends in a ReLU


def test_bottleneck_lip_names_init_and_formula(seed) -> None:
    m = BottleneckLIP(32, width=16)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == {
        "postprocessing.conv.weight": (32, 16, 1, 1),
        "postprocessing.bn.weight": (32,),
        "postprocessing.bn.bias": (32,),
    }
    assert lip_logit_convs(m) == [m.postprocessing.conv]
    x = torch.randn(2, 32, 11, 12)
    shared = torch.randn(2, 16, 11, 12).relu()
    # Zero head conv: plain average pooling whatever ``shared`` is.
    torch.testing.assert_close(m(x, shared), F.avg_pool2d(x, 3, 2, 1, count_include_pad=False), rtol=1e-5, atol=1e-6)

    m = m.double()
    _randomize_(m)
    x, shared = x.double(), shared.double()
    pp = m.postprocessing
    logit = 12 * torch.sigmoid(F.instance_norm(F.conv2d(shared, pp.conv.weight), weight=pp.bn.weight, bias=pp.bn.bias))
    y = m(x, shared)
    assert y.shape == (2, 32, 6, 6)
    torch.testing.assert_close(y, _formula(x, logit))
    assert (y - F.avg_pool2d(x, 3, 2, 1, count_include_pad=False)).abs().max() > 1e-2


def test_bottleneck_lip_fused_matches_reference_with_grads(seed) -> None:
    trunk = BottleneckShared(12, width=8).double()
    head = BottleneckLIP(12, width=8).double()
    _randomize_(trunk)
    _randomize_(head)
    head_ref = BottleneckLIP(12, width=8, use_reference=True).double()
    head_ref.load_state_dict(head.state_dict())
    x = torch.randn(2, 12, 13, 10, dtype=torch.float64)
    g = torch.randn(2, 12, 7, 5, dtype=torch.float64)
    outs = []
    for h in (head, head_ref):
        xx = x.clone().requires_grad_()
        y = h(xx, trunk(xx))
        y.backward(g)
        outs.append((y.detach(), xx.grad, h.postprocessing.conv.weight.grad))
    for a, b in zip(*outs):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b)


def test_bottleneck_lip_compiles_across_input_sizes(seed) -> None:
    """torch.compile recompiling for new sizes (dynamic shapes) must work:
    an in-place ReLU after the trunk's InstanceNorm made Inductor fail with
    "cannot determine truth value of Relational" at the second size."""
    trunk, head = BottleneckShared(16, width=8), BottleneckLIP(16, width=8)
    _randomize_(trunk)
    _randomize_(head)

    def block(x):
        return head(x, trunk(x))

    compiled = torch.compile(block)
    for hw in ((20, 22), (17, 19), (24, 26)):
        x = torch.randn(2, 16, *hw, requires_grad=True)
        y = compiled(x)
        (gx,) = torch.autograd.grad(y.square().sum(), x)
        x_ref = x.detach().requires_grad_()
        y_ref = block(x_ref)
        (gx_ref,) = torch.autograd.grad(y_ref.square().sum(), x_ref)
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
        # Inductor reorders the float32 reductions of the norms and convs:
        # gradient differences scale with the gradient (1.26e-5 seen at
        # LIP_TEST_SEED=160380849), so the bound does too
        torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-5 * max(1.0, gx_ref.abs().max().item()))


@requires_cuda
def test_modules_cuda_match_cpu_reference(seed) -> None:
    trunk = BottleneckShared(16, width=8).double()
    head = BottleneckLIP(16, width=8).double()
    simple = SimplifiedLIP(16).double()
    for m in (trunk, head, simple):
        _randomize_(m)
    x = torch.randn(2, 16, 21, 18, dtype=torch.float64)
    want_head = set_lip_backend(BottleneckLIP(16, width=8).double(), True)
    want_head.load_state_dict(head.state_dict())
    want_simple = set_lip_backend(SimplifiedLIP(16).double(), True)
    want_simple.load_state_dict(simple.state_dict())
    ref_h, ref_s = want_head(x, trunk(x)), want_simple(x)
    trunk, head, simple = trunk.cuda(), head.cuda(), simple.cuda()
    xc = x.cuda()
    torch.testing.assert_close(head(xc, trunk(xc)).cpu(), ref_h)
    torch.testing.assert_close(simple(xc).cpu(), ref_s)
    # float32 on the GPU too, against the float64 CPU result.
    torch.testing.assert_close(simple.float()(xc.float()).cpu().double(), ref_s, rtol=1e-4, atol=1e-5)


def test_docstring_examples(seed) -> None:
    import doctest

    import lip_cuda.nn as mod

    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 5 and result.failed == 0


@pytest.mark.parametrize("make", [lambda: SimplifiedLIP(6), lambda: BottleneckLIP(6, width=4),
                                  lambda: TransitionLIP(6, width=4)],
                         ids=["SimplifiedLIP", "BottleneckLIP", "TransitionLIP"])
def test_reset_parameters_zeroes_the_logit_conv_and_resets_every_norm(make, seed) -> None:
    """reset_parameters() after training (here: random weights) brings the
    module back to its start: the logit conv at zero and every
    InstanceNorm's affine parameters as a fresh InstanceNorm2d has them."""
    m = make()
    _randomize_(m)
    norms = [mod for mod in m.modules() if isinstance(mod, torch.nn.InstanceNorm2d)]
    assert norms and all(n.weight.sub(1).abs().max() > 0 and n.bias.abs().max() > 0 for n in norms)
    m.reset_parameters()
    assert torch.count_nonzero(m.logit_conv.weight) == 0
    for n in norms:
        fresh = torch.nn.InstanceNorm2d(n.num_features, affine=True)
        torch.testing.assert_close(n.weight, fresh.weight, rtol=0, atol=0)
        torch.testing.assert_close(n.bias, fresh.bias, rtol=0, atol=0)
