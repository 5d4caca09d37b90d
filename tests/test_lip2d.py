"""lip_cuda.lip2d against an independent float64 window-softmax oracle."""
import functools
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES
from lip_oracle import oracle_with_grads, window_softmax_lip

import lip_cuda

LAYOUTS = ["contiguous", "channels_last"]


def random_geometries(count: int, seed: int = 2019):
    """Kernel 1..5, stride 1..3, padding up to k // 2, ceil_mode, odd sizes."""
    rng = random.Random(seed)
    cases = []
    while len(cases) < count:
        k = (rng.randint(1, 5), rng.randint(1, 5))
        s = (rng.randint(1, 3), rng.randint(1, 3))
        p = (rng.randint(0, k[0] // 2), rng.randint(0, k[1] // 2))
        ceil = rng.random() < 0.5
        h, w = rng.randint(1, 13), rng.randint(1, 13)
        if h + 2 * p[0] < k[0] or w + 2 * p[1] < k[1]:
            continue
        cases.append((k, s, p, ceil, h, w))
    # the paper's layer, and square/odd classics
    cases += [((3, 3), (2, 2), (1, 1), False, 9, 11), ((3, 3), (2, 2), (1, 1), True, 7, 7),
              ((2, 2), (1, 1), (1, 1), False, 5, 6), ((5, 5), (3, 3), (2, 2), True, 13, 8),
              ((2, 2), (2, 2), (0, 0), False, 9, 11), ((3, 3), (1, 1), (1, 1), True, 8, 7)]
    return cases


GEOMETRIES = random_geometries(48)


def geometry_id(case):
    k, s, p, ceil, h, w = case
    return f"k{k[0]}x{k[1]}-s{s[0]}x{s[1]}-p{p[0]}x{p[1]}-{'ceil' if ceil else 'floor'}-{h}x{w}"


def make_inputs(shape, dtype, device, layout="contiguous", logit_high=4.0):
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    logit = (torch.rand(shape, dtype=torch.float64) * logit_high).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
        logit = logit.to(memory_format=torch.channels_last)
    return x.to(device), logit.to(device)


def poison_allocator(numel: int, dtype: torch.dtype, device: str) -> None:
    """Free a NaN-filled block so that outputs allocated next likely reuse it:
    an element the kernel forgets to write then shows up as NaN."""
    block = torch.full((numel * 2 + 64,), float("nan"), dtype=dtype, device=device)
    del block


def run_fused(x, logit, grad_out, k, s, p, ceil):
    x = x.detach().requires_grad_()
    logit = logit.detach().requires_grad_()
    poison_allocator(x.numel(), x.dtype, x.device.type)
    y = lip_cuda.lip2d(x, logit, k, s, p, ceil)
    gx, gl = torch.autograd.grad(y, (x, logit), grad_out)
    return y, gx, gl


# float64 runs lip_window.h's element functions (the CUDA kernels' code) on
# the CPU; float32 runs the CPU's SIMD channel-block kernels. 21 channels
# leave a partial channel block.
PRECISE = [(torch.float64, "contiguous", 1e-10), (torch.float64, "channels_last", 1e-10),
           (torch.float32, "contiguous", 2e-5), (torch.float32, "channels_last", 2e-5)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,layout,tol", PRECISE, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("case", GEOMETRIES, ids=geometry_id)
def test_matches_oracle(case, dtype, layout, tol, device, seed):
    k, s, p, ceil, h, w = case
    x, logit = make_inputs((2, 21, h, w), dtype, device, layout)
    out_shape = F.avg_pool2d(x.float(), k, s, p, ceil_mode=ceil).shape
    grad_out = torch.randn(out_shape, dtype=torch.float64).to(dtype).to(device)
    y_ref, gx_ref, gl_ref = oracle_with_grads(x.cpu(), logit.cpu(), grad_out.cpu(), k, s, p, ceil)
    y, gx, gl = run_fused(x, logit, grad_out, k, s, p, ceil)
    assert y.shape == out_shape and y.dtype == dtype
    for got, want in ((y, y_ref), (gx, gx_ref), (gl, gl_ref)):
        torch.testing.assert_close(got.cpu().double(), want, rtol=tol,
                                   atol=tol * want.abs().max().item())
    # and the paper's formula, finite at these logits, agrees too
    torch.testing.assert_close(y, lip_cuda.lip2d_reference(x, logit, k, s, p, ceil),
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", GEOMETRIES[:6] + GEOMETRIES[-4:], ids=geometry_id)
def test_gradcheck(case, device, seed):
    k, s, p, ceil, h, w = case
    x, logit = make_inputs((1, 2, h, w), torch.float64, device)
    x.requires_grad_()
    logit.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: lip_cuda.lip2d(a, b, k, s, p, ceil), (x, logit))


# Logit ranges where exp() of the reference overflows in that dtype, so the
# paper's formula returns NaN and only the stable form can be right.
OVERFLOWING_LOGITS = {torch.float16: 30.0, torch.bfloat16: 200.0, torch.float32: 200.0,
                      torch.float64: 1500.0}
# (forward, gradient) tolerance relative to the largest reference magnitude
TOLERANCE = {torch.float16: (4e-3, 8e-3), torch.bfloat16: (2e-2, 4e-2),
             torch.float32: (1e-5, 1e-5), torch.float64: (1e-10, 1e-10)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("case", [GEOMETRIES[-4], GEOMETRIES[-1], GEOMETRIES[3]], ids=geometry_id)
def test_dtypes_stable_where_reference_overflows(case, dtype, layout, device, seed):
    k, s, p, ceil, h, w = case
    x, logit = make_inputs((2, 37, h, w), dtype, device, layout, OVERFLOWING_LOGITS[dtype])
    reference = lip_cuda.lip2d_reference(x, logit, k, s, p, ceil)
    assert not torch.isfinite(reference).all(), "the case must make the reference overflow"

    grad_out = torch.randn(reference.shape, dtype=torch.float64).to(dtype).to(device)
    y, gx, gl = run_fused(x, logit, grad_out, k, s, p, ceil)
    y_ref, gx_ref, gl_ref = oracle_with_grads(x.cpu(), logit.cpu(), grad_out.cpu(), k, s, p, ceil)
    assert y.dtype == dtype and gx.dtype == dtype and gl.dtype == dtype
    assert torch.isfinite(y).all() and torch.isfinite(gx).all() and torch.isfinite(gl).all()
    fwd_tol, grad_tol = TOLERANCE[dtype]
    for got, want, tol in ((y, y_ref, fwd_tol), (gx, gx_ref, grad_tol), (gl, gl_ref, grad_tol)):
        scale = want.abs().max().item()
        torch.testing.assert_close(got.cpu().double(), want, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_paper_gate_in_half_precision(dtype, layout, device, seed):
    """The paper's gate 12 * sigmoid(.) in half precision: the reference has
    NaN in float16, the fused op is finite and matches float64. 35 channels:
    full SIMD channel blocks (vector dtype conversions) and a partial one."""
    x = torch.randn(4, 35, 28, 28, device=device).to(dtype)
    logit = (12 * torch.sigmoid(3 * torch.randn(4, 35, 28, 28, device=device))).to(dtype)
    if layout == "channels_last":
        x, logit = x.to(memory_format=torch.channels_last), logit.to(memory_format=torch.channels_last)
    y = lip_cuda.lip2d(x, logit)
    want = window_softmax_lip(x.double(), logit.double(), 3, 2, 1)
    if dtype == torch.float16:
        assert torch.isnan(lip_cuda.lip2d_reference(x, logit)).any()
    tol = TOLERANCE[dtype][0]
    torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_channels_last_and_strided_inputs(dtype, device, seed):
    x, logit = make_inputs((3, 6, 15, 12), dtype, device)
    grad_out = torch.randn(3, 6, 8, 6, device=device).to(dtype)
    y, gx, gl = run_fused(x, logit, grad_out, 3, 2, 1, False)

    x_cl, l_cl = x.to(memory_format=torch.channels_last), logit.to(memory_format=torch.channels_last)
    y_cl, gx_cl, gl_cl = run_fused(x_cl, l_cl, grad_out, 3, 2, 1, False)
    assert y_cl.is_contiguous(memory_format=torch.channels_last) and not y_cl.is_contiguous()
    assert y.is_contiguous()
    # same arithmetic in the same order: bitwise equal across layouts
    for a, b in ((y, y_cl), (gx, gx_cl), (gl, gl_cl)):
        assert torch.equal(a, b)

    # views that are dense in neither format: transposed and sliced
    big_x = torch.randn(3, 6, 30, 12, device=device).to(dtype)
    big_l = torch.rand(3, 6, 30, 12, device=device).to(dtype) * 4
    xs, ls = big_x[:, :, ::2], big_l[:, :, ::2]
    assert not xs.is_contiguous()
    y_s, gx_s, gl_s = run_fused(xs, ls, grad_out, 3, 2, 1, False)
    y_d, gx_d, gl_d = run_fused(xs.contiguous(), ls.contiguous(), grad_out, 3, 2, 1, False)
    for a, b in ((y_s, y_d), (gx_s, gx_d), (gl_s, gl_d)):
        assert torch.equal(a, b)
    xt, lt = x.transpose(2, 3), logit.transpose(2, 3)
    want = window_softmax_lip(xt.double(), lt.double(), 3, 2, 1)
    tol = TOLERANCE[dtype][0]
    torch.testing.assert_close(lip_cuda.lip2d(xt, lt).double(), want, rtol=tol,
                               atol=tol * want.abs().max().item())


# Geometries at the edges of what the op takes: strides near 2^31 (the
# window arithmetic o s - p + k past 32 bits gave wrong gradients), strides
# far beyond the input (the SIMD kernels' scratch grew with them until it
# failed to allocate), and a window spanning a whole large plane.
EXTREME_GEOMETRIES = [
    ((3, 3), (2**31 - 6, 2**31 - 6), (1, 1), False, (2, 3, 8, 7)),
    ((1, 2), (2**31 - 6, 3), (0, 1), True, (2, 3, 8, 7)),
    ((3, 3), (4096, 4096), (1, 1), True, (2, 3, 64, 64)),
    ((5, 3), (2**24, 2), (2, 1), False, (1, 17, 9, 10)),
    ((720, 730), (1, 1), (0, 0), False, (1, 2, 720, 730)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", EXTREME_GEOMETRIES, ids=lambda c: f"k{c[0]}-s{c[1]}-p{c[2]}")
def test_extreme_strides_and_windows_match_oracle(case, dtype, layout, device, seed):
    k, s, p, ceil, shape = case
    x, logit = make_inputs(shape, dtype, device, layout)
    out_shape = F.avg_pool2d(torch.empty(1, 1, *shape[2:]), k, s, p, ceil_mode=ceil).shape[2:]
    grad_out = torch.randn(shape[:2] + out_shape, dtype=torch.float64).to(dtype).to(device)
    y_ref, gx_ref, gl_ref = oracle_with_grads(x.cpu(), logit.cpu(), grad_out.cpu(), k, s, p, ceil)
    y, gx, gl = run_fused(x, logit, grad_out, k, s, p, ceil)
    # float32 sums of 525600 taps round by about sqrt(taps) ulps, not one
    taps = min(k[0], shape[2]) * min(k[1], shape[3])
    tol = {torch.float64: 1e-10, torch.float32: 2e-5 * max(1.0, taps**0.5 / 64),
           torch.bfloat16: 2e-2}[dtype]
    # a window mean of 525600 random values nearly cancels: its rounding
    # error scales with x, not with the mean
    x_scale = x.abs().max().item()
    for got, want, scale in ((y, y_ref, x_scale), (gx, gx_ref, gx_ref.abs().max().item())):
        torch.testing.assert_close(got.cpu().double(), want, rtol=tol, atol=tol * scale)
    # The logit gradient g p (x - y) takes y as stored, in the output dtype:
    # its rounding (up to |y| eps / 2) moves each covering output's term by
    # up to |g| |y| eps / 2. Where few windows make max |gl| small (a 1 x 3
    # output here), that bound, not the gradients' scale, sets the error.
    covers = -(-k[0] // s[0]) * -(-k[1] // s[1])
    eps = torch.finfo(dtype).eps
    y_rounding = covers * eps * grad_out.abs().max().item() * y_ref.abs().max().item()
    torch.testing.assert_close(gl.cpu().double(), gl_ref, rtol=tol,
                               atol=tol * gl_ref.abs().max().item() + y_rounding)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_windows_over_large_planes_run_without_scratch(layout):
    """A window spanning most of a large plane, or a stride in the
    thousands, runs the per-output generic code (no scratch) in both
    layouts; a LIP-ResNet layer runs the SIMD kernels."""
    ops = torch.ops.lip_cuda
    for shape, k, s, p, simd in (((1, 2, 720, 730), (720, 730), 1, 0, False),
                                 ((1, 2, 64, 64), 3, 4096, 1, False),
                                 ((1, 2, 600, 600), 600, 1, 0, True),
                                 ((2, 64, 56, 56), 3, 2, 1, True)):
        x, logit = make_inputs(shape, torch.float32, "cpu", layout)
        kernel = [k, k] if isinstance(k, int) else list(k)
        ops.lip2d_forward(x, logit, kernel, [s, s], [p, p], False)
        assert ops._lip2d_last_kernel().startswith("cpu_") == simd, (shape, k, s, ops._lip2d_last_kernel())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_empty_batch(layout, device):
    x, logit = make_inputs((0, 4, 9, 9), torch.float32, device, layout)
    x.requires_grad_()
    logit.requires_grad_()
    y = lip_cuda.lip2d(x, logit)
    assert y.shape == (0, 4, 5, 5)
    y.sum().backward()
    assert x.grad.shape == x.shape and logit.grad.shape == logit.shape


MIXED_PAIRS = [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
               (torch.float32, torch.float64), (torch.float64, torch.float32),
               (torch.float16, torch.bfloat16), (torch.float32, torch.float16)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("pair", MIXED_PAIRS, ids=lambda p: f"{p[0]}-{p[1]}".replace("torch.", ""))
def test_mixed_dtypes(pair, layout, device, seed):
    """x and logit in different dtypes: the output and grad_x in x's dtype,
    grad_logit in the logit's, values as the float64 oracle gives them."""
    x_dtype, l_dtype = pair
    x, _ = make_inputs((2, 19, 9, 8), x_dtype, device, layout)
    _, logit = make_inputs((2, 19, 9, 8), l_dtype, device, layout, logit_high=12)
    grad_out = torch.randn(2, 19, 5, 4, dtype=torch.float64).to(x_dtype).to(device)
    y, gx, gl = run_fused(x, logit, grad_out, 3, 2, 1, False)
    assert (y.dtype, gx.dtype, gl.dtype) == (x_dtype, x_dtype, l_dtype)
    y_ref, gx_ref, gl_ref = oracle_with_grads(x.cpu(), logit.cpu(), grad_out.cpu(), 3, 2, 1)
    narrow = x_dtype if torch.finfo(x_dtype).eps > torch.finfo(l_dtype).eps else l_dtype
    fwd_tol, grad_tol = TOLERANCE[narrow]
    for got, want, tol in ((y, y_ref, fwd_tol), (gx, gx_ref, grad_tol), (gl, gl_ref, grad_tol)):
        torch.testing.assert_close(got.cpu().double(), want, rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("pair", MIXED_PAIRS, ids=lambda p: f"{p[0]}-{p[1]}".replace("torch.", ""))
def test_mixed_dtypes_backward_operator(pair, layout, device, seed):
    """The registered lip2d_backward itself, without autograd (which casts a
    gradient to its input's dtype, hiding a wrong one): grad_x in x's dtype,
    grad_logit in the logit's (as the fake kernel says), also where the
    kernels read the logit in another dtype, with the oracle's values."""
    x_dtype, l_dtype = pair
    x, _ = make_inputs((2, 19, 9, 8), x_dtype, device, layout)
    _, logit = make_inputs((2, 19, 9, 8), l_dtype, device, layout, logit_high=12)
    args = ([3, 3], [2, 2], [1, 1], False)
    out, window_max, inv_weight_sum = torch.ops.lip_cuda.lip2d_forward(x, logit, *args)
    grad_out = torch.randn(out.shape, dtype=torch.float64).to(x_dtype).to(device)
    gx, gl = torch.ops.lip_cuda.lip2d_backward(grad_out, x, logit, out, window_max, inv_weight_sum, *args)
    assert (gx.dtype, gl.dtype) == (x_dtype, l_dtype)
    assert gx.shape == x.shape and gl.shape == logit.shape
    _, gx_ref, gl_ref = oracle_with_grads(x.cpu(), logit.cpu(), grad_out.cpu(), 3, 2, 1)
    narrow = x_dtype if torch.finfo(x_dtype).eps > torch.finfo(l_dtype).eps else l_dtype
    tol = TOLERANCE[narrow][1]
    for got, want in ((gx, gx_ref), (gl, gl_ref)):
        torch.testing.assert_close(got.cpu().double(), want, rtol=tol, atol=tol * want.abs().max().item())


LOGIT_SHAPES = [(2, 1, 9, 10), (1, 6, 9, 10), (1, 1, 9, 10), (6, 9, 10), (9, 10), (2, 6, 1, 10), (1,),
                (2, 6, 9, 1), (1, 1, 9, 1)]  # the last two: broadcast over W alone


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("logit_shape", LOGIT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_broadcast_logits(logit_shape, dtype, layout, device, seed):
    """Logits broadcastable to x (one map shared by all channels, one per
    channel shared by the batch, ...): forward and both gradients against
    the oracle on the expanded logit, grad_logit summed to the logit's shape."""
    x, _ = make_inputs((2, 6, 9, 10), dtype, device, layout)
    logit = (torch.rand(logit_shape, dtype=torch.float64) * 12).to(dtype).to(device)
    if layout == "channels_last" and logit.dim() == 4:
        logit = logit.contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(2, 6, 5, 5, dtype=torch.float64).to(dtype).to(device)
    y, gx, gl = run_fused(x, logit, grad_out, 3, 2, 1, False)
    assert gl.shape == logit.shape and gl.dtype == dtype
    expanded = logit.expand(x.shape).cpu()
    y_ref, gx_ref, gl_ref = oracle_with_grads(x.cpu(), expanded, grad_out.cpu(), 3, 2, 1)
    gl_ref = gl_ref.sum_to_size(logit.shape)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    # a logit shared by all elements has a gradient that sums to ~0: scale by 1
    for got, want in ((y, y_ref), (gx, gx_ref), (gl, gl_ref)):
        torch.testing.assert_close(got.cpu().double(), want, rtol=tol,
                                   atol=tol * max(want.abs().max().item(), 1.0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("logit_shape", [(5, 11, 12), (1, 11, 12)], ids=str)
def test_unbatched_input(logit_shape, device, seed):
    x, _ = make_inputs((5, 11, 12), torch.float64, device)
    logit = (torch.rand(logit_shape, dtype=torch.float64) * 8).to(device)
    grad_out = torch.randn(5, 6, 6, dtype=torch.float64, device=device)
    y, gx, gl = run_fused(x, logit, grad_out, 3, 2, 1, False)
    assert y.shape == (5, 6, 6) and gx.shape == x.shape and gl.shape == logit.shape
    y_ref, gx_ref, gl_ref = oracle_with_grads(x[None].cpu(), logit.expand_as(x)[None].cpu(),
                                              grad_out[None].cpu(), 3, 2, 1)
    torch.testing.assert_close(y.cpu(), y_ref[0])
    torch.testing.assert_close(gx.cpu(), gx_ref[0])
    torch.testing.assert_close(gl.cpu(), gl_ref[0].sum_to_size(logit.shape))


# Tolerance of a combined call, by dtype (see its use).
COMBINED_TOL = {torch.float64: 1e-9, torch.float32: 5e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def random_combined_call(rng: random.Random, device: str):
    """One call drawing every interface feature at once: geometry (stride
    None included), ceil_mode, empty batch, unbatched x, a broadcast logit of
    another dtype, -inf masks, contiguous / channels_last / strided /
    transposed storage, x magnitudes from 1e-3 to 1e2 and logit offsets
    up to 300."""
    kh, kw = rng.randint(1, 5), rng.randint(1, 5)
    stride = None if rng.random() < 0.1 else (rng.randint(1, 4), rng.randint(1, 4))
    pad = (rng.randint(0, kh // 2), rng.randint(0, kw // 2))
    ceil = rng.random() < 0.4
    h, w = rng.randint(max(1, kh - 2 * pad[0]), 20), rng.randint(max(1, kw - 2 * pad[1]), 20)
    n, c = rng.choice([0, 1, 2, 3]), rng.choice([1, 3, 8, 9, 17, 21, 33, 65])
    unbatched = rng.random() < 0.2
    x_dtype = rng.choice(list(COMBINED_TOL))
    l_dtype = rng.choice([x_dtype, torch.float32, rng.choice(list(COMBINED_TOL))])
    x_shape = (c, h, w) if unbatched else (n, c, h, w)
    l_shape = rng.choice([x_shape, x_shape[-2:], (1,) * (len(x_shape) - 2) + (h, w)]
                         + ([] if unbatched else [(1, c, h, w), (n, 1, h, w), (n, c, 1, w)]))
    x = (torch.randn(x_shape, dtype=torch.float64) * 10 ** rng.uniform(-3, 2)).to(x_dtype)
    # large offsets except for a float64 logit with narrower x, which the
    # kernels round (test_float64_logit_with_float32_x_rounds_as_documented)
    narrowed = l_dtype == torch.float64 and x_dtype != torch.float64
    offsets = [0.0, 5.0] + ([] if narrowed else [300.0, -50.0])
    logit = torch.randn(l_shape, dtype=torch.float64) * rng.choice([0.1, 1.0, 3.0, 12.0]) + rng.choice(offsets)
    if rng.random() < 0.3:
        logit = logit.masked_fill(torch.rand(l_shape) < 0.3, float("-inf"))
    logit = logit.to(l_dtype)

    def store(t: torch.Tensor, how: str) -> torch.Tensor:
        if how == "channels_last" and t.dim() == 4:
            return t.contiguous(memory_format=torch.channels_last)
        if how == "strided":  # every other element of a wider tensor
            wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
            wide[..., ::2] = t
            return wide[..., ::2]
        if how == "transposed":
            return t.transpose(-1, -2).contiguous().transpose(-1, -2)
        return t

    storage = ["contiguous", "channels_last", "strided", "transposed"]
    x = store(x, rng.choice(storage)).to(device)
    logit = store(logit, rng.choice(storage)).to(device)
    return x, logit, (kh, kw), stride, pad, ceil


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("draw", range(24))
def test_random_combined_calls_match_oracle(draw, device, seed):
    """The interface features together, as users mix them: forward and both
    gradients against the oracle on the expanded logit. A window whose logits
    are all -inf gives 0 and no gradient (the oracle: NaN)."""
    rng = random.Random(seed * 1000 + draw)
    x, logit, k, s, p, ceil = random_combined_call(rng, device)
    print(f"x {tuple(x.shape)} {x.dtype} stride {x.stride()}, logit {tuple(logit.shape)} {logit.dtype} "
          f"stride {logit.stride()}, k {k} s {s} p {p} ceil_mode {ceil}")
    unbatched = x.dim() == 3
    out_shape = F.avg_pool2d(torch.empty((1,) + x.shape[-3:]), k, s, p, ceil_mode=ceil).shape
    out_shape = out_shape[1:] if unbatched else (x.shape[0],) + out_shape[1:]
    grad_out = torch.randn(out_shape, dtype=torch.float64).to(x.dtype).to(device)
    y, gx, gl = run_fused(x, logit, grad_out, k, s, p, ceil)
    assert y.shape == out_shape and y.dtype == x.dtype
    assert gx.shape == x.shape and gx.dtype == x.dtype
    assert gl.shape == logit.shape and gl.dtype == logit.dtype
    batch = (lambda t: t[None]) if unbatched else (lambda t: t)
    refs = oracle_with_grads(batch(x.cpu()), batch(logit.cpu().expand(x.shape)), batch(grad_out.cpu()),
                             k, s if s is not None else k, p, ceil)
    y_ref, gx_ref, gl_ref = (t[0] if unbatched else t for t in refs)
    gl_ref = gl_ref.sum_to_size(logit.shape)
    y_ref, gx_ref, gl_ref = (torch.nan_to_num(t, nan=0.0) for t in (y_ref, gx_ref, gl_ref))
    # the kernels compute in x's dtype (float32 for half x), a logit of another
    # dtype converted to it; y and grad_x round to x's dtype, grad_logit to
    # the logit's
    tol_x = COMBINED_TOL[x.dtype]
    tol_l = max(tol_x, COMBINED_TOL[logit.dtype])
    # grad_logit is a sum of g w (x - y): its rounding scales with |x| |g|
    gl_scale = x.abs().max().item() * grad_out.abs().max().item() if x.numel() else 0.0
    for name, got, want, scale, tol in (("y", y, y_ref, 0.0, tol_x), ("grad_x", gx, gx_ref, 0.0, tol_x),
                                        ("grad_logit", gl, gl_ref, gl_scale, tol_l)):
        if want.numel():
            scale = max(scale, want.abs().max().item())
        torch.testing.assert_close(got.cpu().double(), want, rtol=tol, atol=tol * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offset", [1e2, 1e4])
def test_float64_logit_with_float32_x_rounds_as_documented(offset, device, seed):
    """A float64 logit with float32 x is converted to float32: each logit
    rounds by up to |logit| 2^-24, so y is off from the float64 oracle by up
    to about |logit| 1.2e-7 of its scale (lip2d's docstring, the README)."""
    x = torch.randn(2, 5, 11, 12, dtype=torch.float64).float().to(device)
    logit = (torch.randn(2, 5, 11, 12, dtype=torch.float64) * 3 + offset).to(device)
    y = lip_cuda.lip2d(x, logit)
    y_ref = window_softmax_lip(x.cpu().double(), logit.cpu(), 3, 2, 1)
    bound = logit.abs().max().item() * 1.2e-7 * x.abs().max().item()
    err = (y.cpu().double() - y_ref).abs().max().item()
    assert err <= bound, (err, bound)
    # and the rounding is what it costs: the same logit given as float32
    y32 = lip_cuda.lip2d(x, logit.float())
    assert torch.equal(y, y32)


# (largest x, a logit far enough below 0 that x * exp(logit) is < 1e-30)
MASK_X = {torch.float32: (3e38, -200.0), torch.bfloat16: (3e38, -200.0), torch.float16: (6e4, -200.0),
          torch.float64: (1e308, -800.0)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", list(MASK_X), ids=str)
def test_masked_and_negligible_logits_have_no_weight(dtype, layout, device):
    """A -inf logit, or one far below its window's max, weighs exactly 0
    whatever its x (huge, inf, NaN); a window with only -inf logits gives 0
    and zero gradients. 17 channels: full SIMD blocks and a partial one."""
    big, far = MASK_X[dtype]
    x = torch.ones(1, 17, 1, 6, dtype=torch.float64)
    logit = torch.zeros(1, 17, 1, 6, dtype=torch.float64)
    x[..., 1], logit[..., 1] = big, far             # window 0: [1, big] at logits [0, far]
    x[..., 3], logit[..., 3] = float("inf"), -float("inf")  # window 1: [1, inf] at [0, -inf]
    x[..., 4], logit[..., 4:] = float("nan"), -float("inf")  # window 2: fully masked, NaN x
    x, logit = x.to(dtype), logit.to(dtype)
    if layout == "channels_last":
        x, logit = x.contiguous(memory_format=torch.channels_last), logit.contiguous(memory_format=torch.channels_last)
    x, logit = x.to(device).requires_grad_(), logit.to(device).requires_grad_()
    y = lip_cuda.lip2d(x, logit, (1, 2), (1, 2), 0)
    want = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64).expand(1, 17, 1, 3)
    assert torch.equal(y.detach().cpu().double(), want)
    gx, gl = torch.autograd.grad(y, (x, logit), torch.ones_like(y))
    assert torch.equal(gx.cpu().double(), torch.tensor([1.0, 0, 1, 0, 0, 0], dtype=torch.float64).expand(1, 17, 1, 6))
    assert torch.equal(gl.cpu().double(), torch.zeros(1, 17, 1, 6, dtype=torch.float64))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("scale", [1e-28, 1e-33, 1e-35, 1e-37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_tiny_x_keeps_its_digits(dtype, scale, layout, device, seed):
    """x far below 1 with windows whose logits lie far below their strip's
    max: the CPU tile form's products e x / 16 went subnormal (x = 1e-35
    came out 32% off, 1e-37 as 0), where the reference stays exact."""
    shape = (2, 17, 12, 11)
    x = (scale * (torch.rand(shape, dtype=torch.float64) + 0.5) * torch.sign(torch.randn(shape))).to(dtype)
    logit = torch.randn(shape, dtype=torch.float64)
    logit[:, :, ::4] += 19.5  # one high row per strip of windows
    logit = logit.to(dtype)
    if layout == "channels_last":
        x, logit = x.contiguous(memory_format=torch.channels_last), logit.contiguous(memory_format=torch.channels_last)
    x, logit = x.to(device), logit.to(device)
    grad_out = torch.randn(2, 17, 6, 6, dtype=torch.float64).to(dtype).to(device)
    y_ref, gx_ref, gl_ref = oracle_with_grads(x.cpu(), logit.cpu(), grad_out.cpu(), 3, 2, 1)
    y, gx, gl = run_fused(x, logit, grad_out, 3, 2, 1, False)
    tol = TOLERANCE[dtype][0] if dtype != torch.float32 else 2e-5
    for got, want in ((y, y_ref), (gx, gx_ref), (gl, gl_ref)):
        torch.testing.assert_close(got.cpu().double(), want, rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype,offsets,tol", [
    (torch.float32, (1e2, 1e4, 1e6, 1e7), 2e-5),
    (torch.float64, (1e2, 1e8, 1e14, 1e16), 1e-10),
], ids=["float32", "float64"])
def test_gradients_accurate_at_large_logit_offsets(dtype, offsets, tol, layout, device, seed):
    """Softmax is shift-invariant, so logits offset + l must give the
    gradients of l: the saved statistics are relative to the window max, so
    backward is as exact as forward at any offset."""
    x, _ = make_inputs((2, 19, 9, 11), dtype, device, layout)
    grad_out = torch.randn(2, 19, 5, 6, dtype=torch.float64).to(dtype).to(device)
    for offset in offsets:
        logit = (offset + torch.randn(x.shape, dtype=torch.float64) * 3).to(dtype)
        shifted = logit.double() - offset  # exact: both near offset
        y, gx, gl = run_fused(x, logit.to(device).contiguous(memory_format=x_format(x)), grad_out, 3, 2, 1, False)
        y_ref, gx_ref, gl_ref = oracle_with_grads(x.cpu(), shifted, grad_out.cpu(), 3, 2, 1)
        for got, want in ((y, y_ref), (gx, gx_ref), (gl, gl_ref)):
            torch.testing.assert_close(got.cpu().double(), want, rtol=tol, atol=tol * want.abs().max().item(),
                                       msg=lambda m: f"offset {offset}: {m}")
    # two tied logits at 1e8 share the weight equally
    x2 = torch.tensor([[[[3.0, 5.0]]]], dtype=dtype, device=device, requires_grad=True)
    l2 = torch.full((1, 1, 1, 2), 1e8, dtype=dtype, device=device, requires_grad=True)
    y2 = lip_cuda.lip2d(x2, l2, (1, 2), (1, 2), 0)
    gx2, gl2 = torch.autograd.grad(y2, (x2, l2), torch.ones_like(y2))
    assert y2.item() == 4.0
    assert gx2.flatten().tolist() == [0.5, 0.5]
    assert gl2.flatten().tolist() == [-0.5, 0.5]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype,scale", [
    (torch.float32, 3e38), (torch.bfloat16, 3e38), (torch.float64, 1e308),
], ids=["float32", "bfloat16", "float64"])
@pytest.mark.parametrize("case", [GEOMETRIES[-6], GEOMETRIES[-4], GEOMETRIES[-1]], ids=geometry_id)
def test_x_near_the_dtype_max_stays_finite(case, dtype, scale, layout, device, seed):
    """A window's sum of exp(l - m) x overflowed once |x| passed the type's
    max / window size (as avg_pool2d's sum does), though the mean cannot:
    windows of up to 16 taps now stay finite for any finite x. x of one sign,
    so that x - y (in the logit gradient) stays in range too."""
    k, s, p, ceil, h, w = case
    x = (scale * (0.5 + 0.5 * torch.rand(2, 21, h, w, dtype=torch.float64))).to(dtype)
    logit = (torch.rand(x.shape, dtype=torch.float64) * 4).to(dtype)
    if layout == "channels_last":
        x, logit = (t.to(memory_format=torch.channels_last) for t in (x, logit))
    oh, ow = F.avg_pool2d(torch.empty(1, 1, h, w), k, s, p, ceil_mode=ceil).shape[-2:]
    # |grad| < 1: the oracle's float64 products g x stay in range at 1e308
    grad_out = (torch.rand(2, 21, oh, ow, dtype=torch.float64) - 0.5).to(dtype)
    y, gx, gl = run_fused(x.to(device), logit.to(device), grad_out.to(device), k, s, p, ceil)
    fwd_tol, grad_tol = TOLERANCE[dtype]
    want = oracle_with_grads(x, logit, grad_out, k, s, p, ceil)
    for got, ref, tol in zip((y, gx, gl), want, (fwd_tol, grad_tol, grad_tol)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.cpu().double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kernel", [3, 4])
def test_x_at_the_dtype_max_with_equal_weights_stays_finite(kernel, dtype, layout, device, seed):
    """The bound the weighted sums keep: windows of up to 16 taps stay
    finite for any finite x, also where every tap weighs about as much as
    the window's max (logits within 1e-3 of each other) and x is within
    10% of the dtype's max, so that the sum of the window's e x is near
    taps * max. 3 x 3 and 4 x 4 windows, stride 1 (one output per input)."""
    top = torch.finfo(dtype).max
    x = (top * (0.9 + 0.1 * torch.rand(2, 21, 9, 10, dtype=torch.float64))).to(dtype)
    logit = (4 * torch.rand(()) + 1e-3 * torch.rand(x.shape, dtype=torch.float64)).to(dtype)
    if layout == "channels_last":
        x, logit = (t.to(memory_format=torch.channels_last) for t in (x, logit))
    k, s, p = kernel, 1, kernel // 2
    oh, ow = F.avg_pool2d(torch.empty(1, 1, 9, 10), k, s, p).shape[-2:]
    grad_out = (torch.rand(2, 21, oh, ow, dtype=torch.float64) - 0.5).to(dtype)
    y, gx, gl = run_fused(x.to(device), logit.to(device), grad_out.to(device), k, s, p, False)
    fwd_tol, grad_tol = TOLERANCE[dtype]
    want = oracle_with_grads(x, logit, grad_out, k, s, p, False)
    # grad_logit's terms g w (x - y) cancel (x within 10% of each other):
    # the saved y's rounding (|g| w |y| eps per term, w summing to about 1
    # over an input's windows) is measured against the terms, not their sum
    term_scale = grad_out.abs().max().item() * x.abs().max().item()
    scales = (want[0].abs().max().item(), want[1].abs().max().item(), term_scale)
    for got, ref, tol, scale in zip((y, gx, gl), want, (fwd_tol, grad_tol, grad_tol), scales):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.cpu().double(), ref, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype,scale", [
    (torch.float32, 3e38), (torch.bfloat16, 3e38), (torch.float64, 1e308),
], ids=["float32", "bfloat16", "float64"])
@pytest.mark.parametrize("case", [GEOMETRIES[-6], GEOMETRIES[-2]], ids=geometry_id)
def test_logit_gradient_finite_for_x_of_both_signs_near_the_max(case, dtype, scale, layout, device, seed):
    """x - y of opposite signs near the type's max overflowed in the logit
    gradient (-inf for a finite gradient, NaN where grad_out is 0)."""
    k, s, p, ceil, h, w = case
    shape = (2, 21, h, w)
    sign = torch.where(torch.rand(shape) < 0.5, -1.0, 1.0).double()
    x = (scale * sign * (0.5 + 0.5 * torch.rand(shape, dtype=torch.float64))).to(dtype)
    logit = (torch.rand(shape, dtype=torch.float64) * 4).to(dtype)
    if layout == "channels_last":
        x, logit = (t.to(memory_format=torch.channels_last) for t in (x, logit))
    oh, ow = F.avg_pool2d(torch.empty(1, 1, h, w), k, s, p, ceil_mode=ceil).shape[-2:]
    grad_out = torch.rand(2, 21, oh, ow, dtype=torch.float64) - 0.5
    grad_out[torch.rand(grad_out.shape) < 0.3] = 0.0
    grad_out = grad_out.to(dtype)
    y, gx, gl = run_fused(x.to(device), logit.to(device), grad_out.to(device), k, s, p, ceil)
    _, gx_ref, gl_ref = oracle_with_grads(x, logit, grad_out, k, s, p, ceil)
    assert torch.isfinite(gl).all() and torch.isfinite(gx).all()
    fwd_tol, grad_tol = TOLERANCE[dtype]
    # the logit gradient uses y as stored: its rounding moves g p (x - y)
    # by up to |g| |y| eps
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(gx.cpu().double(), gx_ref, rtol=grad_tol, atol=grad_tol * gx_ref.abs().max().item())
    gl_atol = grad_tol * gl_ref.abs().max().item() + 2 * eps * 0.5 * scale
    torch.testing.assert_close(gl.cpu().double(), gl_ref, rtol=grad_tol, atol=gl_atol)


def x_format(x):
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() else torch.contiguous_format


@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_deterministic(device, seed):
    x, logit = make_inputs((4, 32, 33, 31), torch.float32, device, logit_high=12)
    grad_out = torch.randn(4, 32, 17, 16, device=device)
    first = run_fused(x, logit, grad_out, 3, 2, 1, False)
    second = run_fused(x, logit, grad_out, 3, 2, 1, False)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_autocast_cpu_bfloat16(seed):
    x, logit = make_inputs((2, 4, 10, 10), torch.float32, "cpu")
    conv = torch.nn.Conv2d(4, 4, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = conv(x)
        y = lip_cuda.lip2d(feats, conv(logit))
    assert feats.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    want = window_softmax_lip(feats.double(), conv(logit).to(torch.bfloat16).double(), 3, 2, 1)
    torch.testing.assert_close(y.double(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_output_gradient_in_another_dtype(dtype, layout, device, seed):
    """A float32 gradient of a half output (torch.autograd.grad's
    grad_outputs, a float32 loss under autocast) is taken in the output's
    dtype: both gradients in the inputs' dtype, with the oracle's values."""
    x, logit = make_inputs((2, 5, 11, 9), dtype, device, layout)
    grad_out = torch.randn(2, 5, 6, 5, dtype=torch.float64).float().to(device)
    _, gx, gl = run_fused(x, logit, grad_out, 3, 2, 1, False)
    assert (gx.dtype, gl.dtype) == (dtype, dtype)
    _, gx_ref, gl_ref = oracle_with_grads(x.cpu(), logit.cpu(), grad_out.cpu(), 3, 2, 1)
    tol = TOLERANCE[dtype][1]
    for got, want in ((gx, gx_ref), (gl, gl_ref)):
        torch.testing.assert_close(got.cpu().double(), want, rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck(dtype, layout, device, seed):
    x, logit = make_inputs((2, 3, 9, 7), dtype, device, layout)
    args = ([3, 3], [2, 2], [1, 1], True)
    torch.library.opcheck(torch.ops.lip_cuda.lip2d_forward.default,
                          (x.requires_grad_(), logit.requires_grad_(), *args))
    out, wmax, inv = torch.ops.lip_cuda.lip2d_forward(x.detach(), logit.detach(), *args)
    grad_out = torch.randn_like(out)
    torch.library.opcheck(torch.ops.lip_cuda.lip2d_backward.default,
                          (grad_out, x.detach(), logit.detach(), out, wmax, inv, *args))
    # a logit shared across the channels, and a float32 logit with half x
    shared = logit[:, :1].detach().contiguous(memory_format=torch.channels_last if layout == "channels_last"
                                                else torch.contiguous_format)
    torch.library.opcheck(torch.ops.lip_cuda.lip2d_forward.default, (x.detach(), shared.requires_grad_(), *args))
    out, wmax, inv = torch.ops.lip_cuda.lip2d_forward(x.detach(), shared.detach(), *args)
    torch.library.opcheck(torch.ops.lip_cuda.lip2d_backward.default,
                          (grad_out, x.detach(), shared.detach(), out, wmax, inv, *args))
    half_x = x.detach().to(torch.bfloat16)
    torch.library.opcheck(torch.ops.lip_cuda.lip2d_forward.default, (half_x, logit.detach().float(), *args))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_torch_compile_fullgraph(layout, device, seed):
    def block(x, logit):
        return lip_cuda.lip2d(x * 2.0, torch.sigmoid(logit) * 12, 3, 2, 1).square().sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager", dynamic=False)
    for shape in ((2, 3, 12, 10), (1, 4, 9, 9)):
        x, logit = make_inputs(shape, torch.float32, device, layout)
        grads_eager = torch.autograd.grad(block(x.requires_grad_(), logit.requires_grad_()), (x, logit))
        grads_compiled = torch.autograd.grad(compiled(x, logit), (x, logit))
        for a, b in zip(grads_eager, grads_compiled):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_inductor(device, seed):
    def loss(a, b):
        return (lip_cuda.lip2d(a, b) * 3).sum()

    compiled = torch.compile(loss, fullgraph=True)
    x, logit = make_inputs((2, 3, 12, 10), torch.float32, device)
    x.requires_grad_()
    logit.requires_grad_()
    torch.testing.assert_close(compiled(x, logit), loss(x, logit))
    grads_compiled = torch.autograd.grad(compiled(x, logit), (x, logit))
    grads_eager = torch.autograd.grad(loss(x, logit), (x, logit))
    for a, b in zip(grads_eager, grads_compiled):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_autograd_of_an_eager_forward(device, seed):
    """A forward run eagerly and its backward compiled by compiled autograd:
    the engine hands lip2d's C++ autograd node to the compiler, whose
    checks of a C++ node once failed an internal assert on it (outputs
    marked non-differentiable). The gradients are the oracle's."""
    enable = getattr(torch._dynamo.compiled_autograd, "_enable", None)
    if enable is None:
        pytest.skip("this torch has no torch._dynamo.compiled_autograd._enable")
    x, logit = make_inputs((2, 3, 11, 9), torch.float32, device)
    x.requires_grad_()
    logit.requires_grad_()
    grad_out = torch.randn(2, 3, 6, 5, dtype=torch.float64).float().to(device)
    loss = (lip_cuda.lip2d(x, logit, 3, 2, 1) * grad_out).sum()
    with enable(functools.partial(torch.compile, backend="aot_eager")):
        loss.backward()
    _, gx_ref, gl_ref = oracle_with_grads(x.detach().cpu(), logit.detach().cpu(), grad_out.cpu(), 3, 2, 1)
    tol = TOLERANCE[torch.float32][1]
    for got, want in ((x.grad, gx_ref), (logit.grad, gl_ref)):
        torch.testing.assert_close(got.cpu().double(), want, rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_functorch_grad_vjp_and_per_sample_gradients(layout, device, seed):
    """torch.func's reverse-mode transforms run lip2d's autograd node (a C++
    torch::autograd::Function was refused by them outright): grad and vjp
    give the oracle's gradients, and vmap(grad) of one sample's loss, the
    per-sample gradients, gives them too (the samples are independent)."""
    x, logit = make_inputs((3, 2, 9, 7), torch.float64, device, layout)
    grad_out = torch.randn(3, 2, 5, 4, dtype=torch.float64).to(device)
    _, gx_ref, gl_ref = oracle_with_grads(x.cpu(), logit.cpu(), grad_out.cpu(), 3, 2, 1)
    tol = TOLERANCE[torch.float64][1]

    def check(gx, gl):
        for got, want in ((gx, gx_ref), (gl, gl_ref)):
            torch.testing.assert_close(got.cpu(), want, rtol=tol, atol=tol * want.abs().max().item())

    loss = lambda a, b, g: (lip_cuda.lip2d(a, b, 3, 2, 1) * g).sum()  # noqa: E731
    check(*torch.func.grad(loss, argnums=(0, 1))(x, logit, grad_out))
    _, pullback = torch.func.vjp(lambda a, b: lip_cuda.lip2d(a, b, 3, 2, 1), x, logit)
    check(*pullback(grad_out))
    one_sample = lambda a, b, g: loss(a[None], b[None], g[None])  # noqa: E731
    check(*torch.vmap(torch.func.grad(one_sample, argnums=(0, 1)))(x, logit, grad_out))


@pytest.mark.parametrize("device", DEVICES)
def test_statistics_are_not_differentiable(device, seed):
    """Of the forward operator's outputs only out carries a gradient: the
    window statistics come back detached (not marked non-differentiable,
    see lip2d_autograd.cpp), so nothing can backpropagate through them."""
    x, logit = make_inputs((1, 2, 7, 6), torch.float32, device)
    out, window_max, inv_weight_sum = torch.ops.lip_cuda.lip2d_forward(
        x.requires_grad_(), logit.requires_grad_(), [3, 3], [2, 2], [1, 1], False)
    assert out.requires_grad and out.grad_fn is not None
    for stat in (window_max, inv_weight_sum):
        assert not stat.requires_grad and stat.grad_fn is None


def test_double_backward_raises(seed):
    x, logit = make_inputs((1, 2, 6, 6), torch.float64, "cpu")
    x.requires_grad_()
    logit.requires_grad_()
    (gx,) = torch.autograd.grad(lip_cuda.lip2d(x, logit).sum(), (x,), create_graph=True)
    with pytest.raises(Exception, match="double backward"):
        gx.sum().backward()


class _DropGradient(torch.autograd.Function):
    """y -> 0 whose backward passes no gradient on (None)."""

    @staticmethod
    def forward(ctx, y):
        return y.sum() * 0

    @staticmethod
    def backward(ctx, grad):
        return None


def test_undefined_output_gradient_gives_no_gradient(seed):
    """The backward gets no zero-filled gradient (none is materialized):
    when nothing flows back into the output, lip2d adds nothing to x's
    gradient and gives the logit none."""
    x, logit = make_inputs((1, 2, 6, 6), torch.float32, "cpu")
    x.requires_grad_()
    logit.requires_grad_()
    loss = _DropGradient.apply(lip_cuda.lip2d(x, logit)) + (2 * x).sum()
    gx, gl = torch.autograd.grad(loss, (x, logit), allow_unused=True)
    assert gl is None
    torch.testing.assert_close(gx, torch.full_like(x, 2.0), rtol=0, atol=0)


def test_built_with_cuda_matches_torch():
    if torch.cuda.is_available():
        assert lip_cuda.built_with_cuda()
    assert isinstance(lip_cuda.built_with_cuda(), bool)


def _bad_calls():
    x = torch.randn(2, 3, 8, 8)
    l = torch.randn(2, 3, 8, 8)
    ops = torch.ops.lip_cuda
    return [
        ("rank", lambda: lip_cuda.lip2d(x[0, 0], l[0, 0]), ValueError, r"x to be a 4-D \(N, C, H, W\) or 3-D"),
        ("shapes", lambda: lip_cuda.lip2d(x, l[:, :2]), ValueError, r"logit to be broadcastable to x's shape"),
        ("op shapes", lambda: ops.lip2d_forward(x, l[:, :2], [3, 3], [2, 2], [1, 1], False), RuntimeError,
         r"logit to have the same shape as x, \[2, 3, 8, 8\], or size 1 in N and/or C"),
        ("op rank", lambda: ops.lip2d_forward(x[0], l[0], [3, 3], [2, 2], [1, 1], False), RuntimeError,
         r"x to be a 4-D \(N, C, H, W\) tensor"),
        ("int x", lambda: lip_cuda.lip2d(x.long(), l), TypeError, r"x to have a floating-point dtype"),
        ("int logit", lambda: lip_cuda.lip2d(x, l.int()), TypeError, r"logit to have a floating-point dtype"),
        ("float8 x", lambda: lip_cuda.lip2d(x.to(torch.float8_e5m2), l), TypeError, r"x to have a floating-point dtype"),
        ("unbatched no channels", lambda: lip_cuda.lip2d(x[0, :0], l[0, :0]), ValueError, r"has shape \(0, 8, 8\)"),
        ("devices", lambda: lip_cuda.lip2d(x, l.to("meta")), ValueError, r"same device"),
        ("padding", lambda: lip_cuda.lip2d(x, l, 3, 2, 2), RuntimeError, r"padding .* at most half the kernel"),
        ("padding pair", lambda: lip_cuda.lip2d(x, l, (4, 2), 2, (2, 2)), RuntimeError, r"at most half"),
        ("neg padding", lambda: lip_cuda.lip2d(x, l, 3, 2, -1), RuntimeError, r"padding to be non-negative"),
        ("zero stride", lambda: lip_cuda.lip2d(x, l, 3, 0, 1), RuntimeError, r"stride to be positive"),
        ("neg stride", lambda: lip_cuda.lip2d(x, l, 3, (2, -1), 1), RuntimeError, r"stride to be positive"),
        ("zero kernel", lambda: lip_cuda.lip2d(x, l, 0, 1, 0), RuntimeError, r"kernel_size to be positive"),
        ("kernel too big", lambda: lip_cuda.lip2d(x, l, 11, 1, 1), RuntimeError, r"output would be empty"),
        ("kernel huge", lambda: lip_cuda.lip2d(x, l, 2**63 - 1, 1, 2**62 - 1), RuntimeError,
         r"kernel_size and stride to be at most 2147483647"),
        ("kernel triple", lambda: lip_cuda.lip2d(x, l, (3, 3, 3)), ValueError, r"kernel_size to be an int or a pair"),
        ("no channels", lambda: lip_cuda.lip2d(x[:, :0], l[:, :0]), ValueError, r"C, H and W of x to be non-zero"),
        ("op int logit", lambda: ops.lip2d_forward(x, l.int(), [3, 3], [2, 2], [1, 1], False),
         RuntimeError, r"logit to have a floating-point dtype"),
        ("op list", lambda: ops.lip2d_forward(x, l, [3, 3, 3], [2, 2], [1, 1], False),
         RuntimeError, r"kernel_size"),
        ("grad shape", lambda: ops.lip2d_backward(torch.randn(2, 3, 5, 4), x, l, *ops.lip2d_forward(
            x, l, [3, 3], [2, 2], [1, 1], False), [3, 3], [2, 2], [1, 1], False),
         RuntimeError, r"grad_out of shape \[2, 3, 4, 4\]"),
        ("stats dtype", lambda: ops.lip2d_backward(torch.randn(2, 3, 4, 4), x, l, torch.randn(2, 3, 4, 4),
                                                   torch.randn(2, 3, 4, 4).double(), torch.randn(2, 3, 4, 4),
                                                   [3, 3], [2, 2], [1, 1], False),
         RuntimeError, r"window_max of dtype Float"),
    ]


@pytest.mark.parametrize("case", _bad_calls(), ids=lambda c: c[0])
def test_bad_input_raises_clear_error(case):
    _, call, error, message = case
    with pytest.raises(error, match=message):
        call()


def _bad_op_calls():
    """Bad calls of the registered operators: (name, make arguments, message)."""
    geometry = ([3, 3], [2, 2], [1, 1], False)

    def forward(x_shape=(2, 3, 8, 8), l_shape=None, x_dtype=torch.float32, l_dtype=torch.float32,
                kernel=(3, 3), stride=(2, 2), padding=(1, 1), l_device="cpu"):
        return ("forward", (torch.randn(x_shape).to(x_dtype),
                            torch.randn(l_shape or x_shape).to(l_dtype).to(l_device),
                            list(kernel), list(stride), list(padding), False))

    def backward(grad_shape=(2, 3, 4, 4), stats_dtype=torch.float32, grad_device="cpu"):
        x = torch.randn(2, 3, 8, 8)
        return ("backward", (torch.randn(grad_shape).to(grad_device), x, torch.randn(2, 3, 8, 8),
                             torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4).to(stats_dtype),
                             torch.rand(2, 3, 4, 4), *geometry))

    return [
        ("zero kernel", lambda: forward(kernel=(0, 0)), r"kernel_size to be positive"),
        ("zero stride", lambda: forward(stride=(2, 0)), r"stride to be positive"),
        ("short list", lambda: forward(kernel=(3,)), r"kernel_size to hold 2 values"),
        ("big padding", lambda: forward(padding=(2, 1)), r"padding .* at most half the kernel"),
        ("neg padding", lambda: forward(padding=(-1, 1)), r"padding to be non-negative"),
        ("no channels", lambda: forward(x_shape=(2, 0, 8, 8)), r"C, H and W of x to be non-zero"),
        # padding gives these a window (and an output) although x has no rows or columns
        ("no rows", lambda: forward(x_shape=(2, 3, 0, 8), kernel=(2, 2), stride=(1, 1), padding=(1, 1)),
         r"C, H and W of x to be non-zero"),
        ("no columns", lambda: forward(x_shape=(2, 3, 8, 0), kernel=(2, 2), stride=(1, 1), padding=(1, 1)),
         r"C, H and W of x to be non-zero"),
        ("empty height", lambda: forward(kernel=(9, 3), stride=(1, 1), padding=(0, 1)), r"output would be empty"),
        ("empty width", lambda: forward(kernel=(3, 9), stride=(1, 1), padding=(1, 0)), r"output would be empty"),
        ("zero kernel height", lambda: forward(kernel=(0, 3)), r"kernel_size to be positive"),
        ("zero kernel width", lambda: forward(kernel=(3, 0), padding=(1, 0)), r"kernel_size to be positive"),
        ("int x", lambda: forward(x_dtype=torch.int32), r"x to have a floating-point dtype"),
        ("float8 logit", lambda: forward(l_dtype=torch.float8_e4m3fn), r"logit to have a floating-point dtype"),
        ("logit shape", lambda: forward(l_shape=(2, 2, 8, 8)), r"logit to have the same shape as x"),
        ("logit on meta", lambda: forward(l_device="meta"), r"logit on the same device as x"),
        ("logit height", lambda: forward(l_shape=(2, 3, 7, 8)), r"logit to have the same shape as x"),
        ("logit width", lambda: forward(l_shape=(2, 3, 8, 9)), r"logit to have the same shape as x"),
        ("zero kernel width", lambda: forward(kernel=(3, 0), padding=(1, 0)), r"kernel_size to be positive"),
        ("zero stride height", lambda: forward(stride=(0, 2)), r"stride to be positive"),
        ("big padding width", lambda: forward(kernel=(3, 1), padding=(1, 1)), r"padding .* at most half the kernel"),
        ("empty width", lambda: forward(x_shape=(2, 3, 8, 4), kernel=(3, 5), padding=(1, 0)),
         r"output would be empty"),
        ("grad shape", lambda: backward(grad_shape=(2, 3, 4, 5)), r"grad_out of shape \[2, 3, 4, 4\]"),
        ("stats dtype", lambda: backward(stats_dtype=torch.float64), r"window_max of dtype"),
        ("grad on meta", lambda: backward(grad_device="meta"), r"grad_out on the same device as x"),
    ]


@pytest.mark.parametrize("case", _bad_op_calls(), ids=lambda c: c[0])
def test_fake_kernels_check_arguments_as_the_operator_does(case):
    """Traced (FakeTensor) and meta calls fail where eager calls fail, with
    the same message: they neither trace to a result nor allocate garbage.
    A meta tensor among CPU ones dispatches to the fake kernel."""
    _, make, message = case
    which, args = make()
    op = getattr(torch.ops.lip_cuda, f"lip2d_{which}")
    on_meta = any(isinstance(a, torch.Tensor) and a.device.type == "meta" for a in args)
    if not on_meta:
        with pytest.raises(RuntimeError, match=message):
            op(*args)
        with torch._subclasses.FakeTensorMode() as mode:
            fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            with pytest.raises(RuntimeError, match=message):
                op(*fake_args)
    with pytest.raises(RuntimeError, match=message):
        op(*[a.to("meta") if isinstance(a, torch.Tensor) and not on_meta else a for a in args])


def test_forward_mode_ad_raises(seed):
    """No forward-AD formula: jvp must fail loudly, not return zeros."""
    x, logit = make_inputs((1, 2, 6, 5), torch.float64, "cpu")
    with pytest.raises(RuntimeError, match="forward-mode AD"):
        torch.func.jvp(lambda v: lip_cuda.lip2d(v, logit), (x,), (torch.randn_like(x),))
    with pytest.raises(RuntimeError, match="forward-mode AD"):
        torch.func.jacfwd(lambda v: lip_cuda.lip2d(v, logit))(logit)
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level(), pytest.raises(RuntimeError, match="forward-mode AD"):
        lip_cuda.lip2d(x, fwAD.make_dual(logit, torch.randn_like(logit)))


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda_only
def test_cuda_devices_differ():
    x = torch.randn(1, 2, 6, 6, device="cuda")
    with pytest.raises(ValueError, match="same device"):
        lip_cuda.lip2d(x, x.cpu())
    with pytest.raises(RuntimeError, match="logit on the same device as x"):
        torch.ops.lip_cuda.lip2d_forward(x, x.cpu(), [3, 3], [2, 2], [1, 1], False)


@cuda_only
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_graph_capture(layout, seed):
    """No host syncs: forward and backward capture into one CUDA graph."""
    x, logit = make_inputs((8, 16, 32, 32), torch.float32, "cuda", layout, 12)
    x.requires_grad_()
    logit.requires_grad_()
    grad_out = torch.randn(8, 16, 16, 16, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the graph
        for _ in range(2):
            torch.autograd.grad(lip_cuda.lip2d(x, logit), (x, logit), grad_out)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = lip_cuda.lip2d(x, logit)
        gx, gl = torch.autograd.grad(y, (x, logit), grad_out)
    with torch.no_grad():
        x.copy_(torch.randn_like(x))
        logit.copy_(torch.rand_like(logit) * 12)
    graph.replay()
    torch.cuda.synchronize()
    y_ref, gx_ref, gl_ref = oracle_with_grads(x.cpu(), logit.cpu(), grad_out.cpu(), 3, 2, 1)
    for got, want in ((y, y_ref), (gx, gx_ref), (gl, gl_ref)):
        torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=1e-5)


@cuda_only
def test_cuda_over_2_31_elements_index_correctly(seed):
    """x of more than 2^31 elements takes the 64-bit offsets; its last channel
    (offsets past 2^31) must equal the same channel run alone (32-bit)."""
    shape = (1, 8, 16384, 16400)  # 2,149,580,800 elements
    free, _ = torch.cuda.mem_get_info()
    if free < 30 * 2**30:
        pytest.skip("needs about 30 GiB of free GPU memory")
    x = torch.randn(shape, device="cuda", dtype=torch.float16)
    logit = torch.rand(shape, device="cuda", dtype=torch.float16) * 12
    assert x.numel() > 2**31
    x.requires_grad_()
    logit.requires_grad_()
    y = lip_cuda.lip2d(x, logit)
    grad_out = torch.randn_like(y)
    gx, gl = torch.autograd.grad(y, (x, logit), grad_out)
    x_last, l_last = x[:, -1:].detach().clone(), logit[:, -1:].detach().clone()
    y_last, gx_last, gl_last = run_fused(x_last, l_last, grad_out[:, -1:].contiguous(), 3, 2, 1, False)
    assert torch.equal(y[:, -1:], y_last)
    assert torch.equal(gx[:, -1:], gx_last)
    assert torch.equal(gl[:, -1:], gl_last)


# --------------------------------------------------------------------------- found by mutation testing


def _one_dim_geometries():
    """Every (kernel, stride, padding, size) of one dimension with kernel 1..4,
    stride 1..3, padding up to kernel // 2 and size 1..8 that avg_pool2d takes:
    ceil_mode's dropped last window, a 1x1 input with padding, etc."""
    return [(k, s, p, n) for k in range(1, 5) for s in range(1, 4) for p in range(k // 2 + 1)
            for n in range(1, 9) if n + 2 * p >= k]


@pytest.fixture
def one_thread():
    """Thousands of calls on tiny tensors: one intra-op thread is faster, and
    immune to spinning OpenMP threads on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _assert_same_meta(fake, real, what):
    assert fake.shape == real.shape and fake.dtype == real.dtype, (what, fake.shape, real.shape)
    significant = [i for i, size in enumerate(real.shape) if size > 1]
    assert [fake.stride(i) for i in significant] == [real.stride(i) for i in significant], \
        (what, fake.stride(), real.stride())


@pytest.mark.parametrize("ceil", [False, True], ids=["floor", "ceil"])
@pytest.mark.parametrize("pairing", ["square", "random"])
def test_fake_kernels_give_the_eager_output_metadata(pairing, ceil, seed, one_thread):
    """Traced shapes are the eager ones: the fake kernels' outputs (forward and
    backward) have the shape, dtype and strides the operator returns, and the
    output is avg_pool2d's shape, for every small geometry of H, with W the
    same geometry ("square") or another one drawn at random ("random"), in a
    layout drawn at random."""
    rng = random.Random(seed)
    dims = _one_dim_geometries()
    mode = torch._subclasses.FakeTensorMode()
    for kh, sh, ph, h in dims:
        kw, sw, pw, w = (kh, sh, ph, h) if pairing == "square" else rng.choice(dims)
        k, s, p = [kh, kw], [sh, sw], [ph, pw]
        x, logit = make_inputs((2, 3, h, w), torch.float32, "cpu", rng.choice(LAYOUTS))
        want_shape = F.avg_pool2d(torch.empty(1, 1, h, w), k, s, p, ceil_mode=ceil).shape[-2:]
        real = torch.ops.lip_cuda.lip2d_forward(x, logit, k, s, p, ceil)
        assert real[0].shape == (2, 3, *want_shape), (k, s, p, ceil, h, w)
        grad_out = torch.randn_like(real[0])
        real_back = torch.ops.lip_cuda.lip2d_backward(grad_out, x, logit, *real, k, s, p, ceil)
        with mode:
            fx, fl, fg = (mode.from_tensor(t) for t in (x, logit, grad_out))
            fake = torch.ops.lip_cuda.lip2d_forward(fx, fl, k, s, p, ceil)
            fake_back = torch.ops.lip_cuda.lip2d_backward(fg, fx, fl, *fake, k, s, p, ceil)
        for name, f, r in zip(("out", "window_max", "inv_weight_sum", "grad_x", "grad_logit"),
                              (*fake, *fake_back), (*real, *real_back)):
            _assert_same_meta(f, r, (name, k, s, p, ceil, h, w))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("pair", MIXED_PAIRS, ids=lambda p: f"{p[0]}-{p[1]}".replace("torch.", ""))
def test_opcheck_mixed_dtypes(pair, layout, seed, one_thread):
    """Both operators with x and logit in different dtypes (autocast gives a
    float32 logit with half x): the fake kernels agree with the operators on
    every output's dtype and accept what the forward returned."""
    x_dtype, l_dtype = pair
    x, _ = make_inputs((2, 3, 9, 7), x_dtype, "cpu", layout)
    _, logit = make_inputs((2, 3, 9, 7), l_dtype, "cpu", layout)
    args = ([3, 3], [2, 2], [1, 1], True)
    torch.library.opcheck(torch.ops.lip_cuda.lip2d_forward.default, (x, logit, *args))
    out, wmax, inv = torch.ops.lip_cuda.lip2d_forward(x, logit, *args)
    grad_out = torch.randn(out.shape, dtype=torch.float64).to(x_dtype)
    torch.library.opcheck(torch.ops.lip_cuda.lip2d_backward.default,
                          (grad_out, x, logit, out, wmax, inv, *args))


# unbatched (C, H, W) inputs whose C, or output H or W, is 1
UNBATCHED_SHAPES = [(1, 7, 6), (3, 2, 2), (1, 1, 1), (4, 1, 9), (2, 9, 2)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", UNBATCHED_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_unbatched_input_keeps_size_one_dims(shape, device, seed):
    """The unbatched output is the batched one without its batch dim only:
    a channel count or an output size of 1 stays."""
    x, logit = make_inputs(shape, torch.float64, device, logit_high=8)
    out_shape = F.avg_pool2d(x[None].cpu(), 3, 2, 1).shape[1:]
    grad_out = torch.randn(out_shape, dtype=torch.float64, device=device)
    y, gx, gl = run_fused(x, logit, grad_out, 3, 2, 1, False)
    y_ref, gx_ref, gl_ref = oracle_with_grads(x[None].cpu(), logit[None].cpu(), grad_out[None].cpu(), 3, 2, 1)
    assert y.shape == out_shape and gx.shape == x.shape and gl.shape == logit.shape
    torch.testing.assert_close(y.cpu(), y_ref[0])
    torch.testing.assert_close(gx.cpu(), gx_ref[0])
    torch.testing.assert_close(gl.cpu(), gl_ref[0])
