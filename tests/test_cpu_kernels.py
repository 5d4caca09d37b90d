"""The CPU kernels' own layouts and builds, and the pooling-argument errors.

- contiguous (NCHW) input runs the "rows" kernels (lanes along W) or, for
  small planes with many channels, the "blocks" kernels (lanes across
  channels): both against the float64 oracle, in every dtype, including
  tall and wide single-channel planes, masking and poisoned columns that no
  window covers;
- the rows backward (flat stride-phase planes, tasks of a few phase rows)
  on random geometries equals channels_last bitwise, with the inputs that no
  window covers poisoned;
- the scratch memory of a large single-channel plane stays a few times the
  tensor sizes (measured in a fresh process);
- every instruction set build this CPU can run (LIP_CUDA_CPU_ISA) gives the
  oracle's results;
- streaming (non-temporal) stores of the outputs write the bits of plain
  stores, in every kernel and ISA build;
- pooling arguments that are not ints say what was expected.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lip_oracle import oracle_with_grads

import lip_cuda

ops = torch.ops.lip_cuda
ROOT = Path(__file__).resolve().parents[1]

# forward, gradient tolerance relative to the largest oracle magnitude
TOLERANCE = {torch.float32: (1e-5, 2e-5), torch.bfloat16: (2e-2, 4e-2), torch.float16: (4e-3, 8e-3)}
DTYPES = list(TOLERANCE)


def dtype_id(v):
    return str(v).replace("torch.", "")


def fused_with_grads(x, logit, grad_out, k, s, p, ceil):
    x = x.detach().requires_grad_()
    logit = logit.detach().requires_grad_()
    y = lip_cuda.lip2d(x, logit, k, s, p, ceil)
    kernel = ops._lip2d_last_kernel()
    gx, gl = torch.autograd.grad(y, (x, logit), grad_out)
    return (y, gx, gl), kernel


def assert_matches_oracle(got, want, dtype):
    """Each of out, grad_x, grad_logit within tol of the oracle, relative to
    each element and to the problem's scale (the largest of the three): a
    tensor that is exactly 0 in float64 (grad_logit where every window holds
    one input) gets float32's rounding of x - y, not exactness."""
    fwd_tol, grad_tol = TOLERANCE[dtype]
    scale = max((w.abs().max().item() for w in want if w.numel()), default=0.0)
    for g, w, tol in zip(got, want, (fwd_tol, grad_tol, grad_tol)):
        assert g.shape == w.shape
        torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol * scale)


def random_inputs(shape, dtype, layout, logit_shape=None, logit_high=6.0):
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    logit = (torch.rand(logit_shape or shape, dtype=torch.float64) * logit_high).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
        logit = logit.to(memory_format=torch.channels_last)
    return x, logit


# (shape, kernel, stride, padding, ceil_mode, the contiguous kernel expected)
PLANES = [
    ((1, 1, 301, 9), 3, 2, 1, False, "rows"),              # tall, one channel
    ((1, 1, 6, 777), 3, 2, 1, True, "rows"),               # wide, one channel
    ((2, 1, 37, 130), (5, 3), (3, 2), (2, 1), True, "rows"),
    ((1, 2, 41, 67), (2, 4), (1, 3), (1, 2), False, "rows"),
    ((2, 3, 19, 50), (1, 5), (2, 1), (0, 2), False, "rows"),
    ((1, 1, 9, 200), (3, 7), (2, 4), (1, 3), True, "rows"),  # stride 4 with padding 3
    ((2, 40, 12, 11), 3, 2, 1, False, "blocks"),           # small planes, many channels
    ((2, 40, 12, 12), 3, 2, 1, False, "halving"),          # k3 s2 p1 on an even plane (AVX-512)
    ((2, 40, 12, 30), 3, 2, 1, False, "halving"),          # (16-bit x too: 15 outputs a row)
    ((1, 24, 9, 13), (2, 3), (2, 3), (1, 1), True, "blocks"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", PLANES, ids=lambda c: "x".join(map(str, c[0])) + f"-{c[5]}")
def test_planes_match_oracle(case, layout, dtype, seed):
    shape, k, s, p, ceil, path = case
    x, logit = random_inputs(shape, dtype, layout)
    out_shape = torch.nn.functional.avg_pool2d(torch.empty(1, 1, *shape[2:]), k, s, p, ceil).shape
    grad_out = torch.randn(shape[0], shape[1], *out_shape[2:], dtype=torch.float64).to(dtype)
    got, kernel = fused_with_grads(x, logit, grad_out, k, s, p, ceil)
    want = oracle_with_grads(x, logit, grad_out, k, s, p, ceil)
    assert_matches_oracle(got, want, dtype)
    # one channel: channels_last is also contiguous, and runs as such
    if path == "halving" and (not kernel.startswith("cpu_avx512") or (dtype.itemsize == 2 and shape[3] < 16)):
        path = "blocks"  # the halving kernels' default is the AVX-512 build's, 16-bit x from 8 outputs a row
    expected = f"planes_{path}" if x.is_contiguous() else "channels_last"
    assert kernel.startswith("cpu_") and kernel.endswith(expected), kernel


# (shape, kernel, stride, padding, ceil_mode): windows overlapping in both
# dimensions, in one only, not at all, wide kernels, ceil_mode, a last strip
# of one output row
LAYOUT_GEOMETRIES = [
    ((2, 37, 13, 21), 3, 2, 1, False),
    ((1, 21, 17, 30), (5, 3), (2, 3), (2, 1), True),
    ((2, 18, 9, 40), (1, 4), (1, 2), (0, 2), False),
    ((1, 19, 16, 16), 2, 2, 0, True),
    ((1, 17, 33, 12), (7, 2), (3, 1), (3, 1), False),
    # wide enough rows that the blocks kernels split the planes into bands
    # of rows (forward strips, backward input rows) and their channels into
    # a full group and a partial one
    ((1, 37, 23, 200), 3, 2, 1, False),
    ((1, 21, 30, 150), (5, 3), (3, 2), (2, 1), True),
    # small planes, five lane blocks: the AVX-512 blocks kernels take them
    # in groups of two (forward) and four (backward) lane blocks, then a
    # partial group
    ((2, 70, 14, 14), 3, 2, 1, False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", LAYOUT_GEOMETRIES, ids=str)
def test_all_layouts_bitwise_equal(case, dtype, monkeypatch, seed):
    """rows, blocks (forced with LIP_CUDA_CPU_PLANES) and channels_last run
    the same window arithmetic in the same order (the same strip maxima,
    fallback windows and sums in the tile form): bitwise equal results.
    Channels over 16: full lane blocks and a partial one."""
    shape, k, s, p, ceil = case
    x, logit = random_inputs(shape, dtype, "contiguous")
    out_shape = torch.nn.functional.avg_pool2d(x.float(), k, s, p, ceil_mode=ceil).shape
    grad_out = torch.randn(out_shape).to(dtype)
    results = {}
    for planes in ("rows", "blocks"):
        monkeypatch.setenv("LIP_CUDA_CPU_PLANES", planes)
        results[planes], kernel = fused_with_grads(x, logit, grad_out, k, s, p, ceil)
        assert kernel.endswith(f"planes_{planes}")
    monkeypatch.delenv("LIP_CUDA_CPU_PLANES")
    cl = torch.channels_last
    results["channels_last"], kernel = fused_with_grads(
        x.to(memory_format=cl), logit.to(memory_format=cl), grad_out, k, s, p, ceil)
    assert kernel.endswith("channels_last")
    for name in ("blocks", "channels_last"):
        for a, b in zip(results["rows"], results[name]):
            assert torch.equal(a, b), name
    assert_matches_oracle(results["rows"], oracle_with_grads(x, logit, grad_out, k, s, p, ceil), dtype)


# (shape, layout): blocks and channels_last kernels, rows and gather planes
THREAD_CASES = [((2, 40, 28, 28), "channels_last"), ((2, 40, 28, 28), "contiguous"),
                ((1, 3, 150, 131), "contiguous"), ((3, 5, 9, 600), "contiguous")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("case", THREAD_CASES, ids=lambda c: "x".join(map(str, c[0])) + "-" + c[1])
def test_results_do_not_depend_on_the_thread_count(case, dtype, seed):
    """The strips and their references are fixed by the geometry, not by how
    the tasks split across threads: 1, 2 and 5 threads give the same bits,
    forward and backward (a run reproduces on a machine with other cores)."""
    shape, layout = case
    x, logit = random_inputs(shape, dtype, layout, logit_high=12.0)
    grad_out = torch.randn(torch.nn.functional.avg_pool2d(x.float(), 3, 2, 1).shape).to(dtype)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 5):
            torch.set_num_threads(count)
            results.append(fused_with_grads(x, logit, grad_out, 3, 2, 1, False)[0])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
    assert_matches_oracle(results[0], oracle_with_grads(x, logit, grad_out, 3, 2, 1, False), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("channels", [16, 48, 85])
def test_channels_last_unrolled_windows_equal_rows(channels, dtype, monkeypatch, seed):
    """channels_last runs 2..3 x 2..3 windows (forward: full 3x3 ones and
    those clipped at the edges) and inputs covered by at
    most 2x2 outputs (backward) through unrolled paths (one or two lane
    blocks forward, one or four backward, the rest through the general
    loops): bitwise the rows kernel's results, masked (-inf) logits
    included, for 16 (one block), 48 and 85 channels (full blocks of 16 plus
    a partial one at 85)."""
    x, logit = random_inputs((2, channels, 11, 14), dtype, "contiguous")
    logit[0, :, 2:5, 3:6] = -float("inf")  # one output's whole window
    logit[1, ::3, 4, :] = -float("inf")
    grad_out = torch.randn(2, channels, 6, 7).to(dtype)
    monkeypatch.setenv("LIP_CUDA_CPU_PLANES", "rows")
    rows, kernel = fused_with_grads(x, logit, grad_out, 3, 2, 1, False)
    assert kernel.endswith("planes_rows")
    monkeypatch.delenv("LIP_CUDA_CPU_PLANES")
    cl = torch.channels_last
    got, kernel = fused_with_grads(
        x.to(memory_format=cl), logit.to(memory_format=cl), grad_out, 3, 2, 1, False)
    assert kernel.endswith("channels_last")
    for a, b in zip(rows, got):
        assert torch.equal(a, b)
    assert_matches_oracle(got, oracle_with_grads(x, logit, grad_out, 3, 2, 1), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("logit_shape", [(1, 1), (2, 1)], ids=str)
@pytest.mark.parametrize("channels", [16, 48, 85])
def test_channels_last_shared_logit_matches_oracle(channels, logit_shape, dtype, seed):
    """A logit shared across channels in channels_last: its lanes hold one
    value per pixel (not kLanes neighbouring pixels), in the forward's
    strip maxima and weights of whole lane blocks and in the backward's
    unrolled inputs covered by at most 2 x 2 outputs. 16, 48 and 85 channels:
    full lane blocks (one, three, five) and a partial one."""
    shape = (2, channels, 11, 14)
    x, logit = random_inputs(shape, dtype, "channels_last", logit_shape=(*logit_shape, 11, 14))
    grad_out = torch.randn(2, channels, 6, 7).to(dtype)
    got, kernel = fused_with_grads(x, logit, grad_out, 3, 2, 1, False)
    assert kernel.endswith("channels_last"), kernel
    want = oracle_with_grads(x, logit.expand_as(x), grad_out, 3, 2, 1, False)
    dims = tuple(d for d, n in enumerate(logit_shape) if n == 1)
    want = (want[0], want[1], want[2].sum(dim=dims, keepdim=True))
    assert got[2].shape == logit.shape
    assert_matches_oracle(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_rows_shared_logit_matches_oracle(dtype, seed):
    """One logit map for all channels (and images), read without a copy."""
    x, logit = random_inputs((2, 3, 23, 70), dtype, "contiguous", logit_shape=(1, 1, 23, 70))
    grad_out = torch.randn(2, 3, 12, 35).to(dtype)
    got, kernel = fused_with_grads(x, logit, grad_out, 3, 2, 1, False)
    want = oracle_with_grads(x, logit.expand_as(x), grad_out, 3, 2, 1, False)
    # grad_logit of a shared map: the sum over what shares it
    want = (want[0], want[1], want[2].sum(dim=(0, 1), keepdim=True))
    assert got[2].shape == logit.shape
    fwd_tol, grad_tol = TOLERANCE[dtype]
    torch.testing.assert_close(got[0].double(), want[0], rtol=fwd_tol, atol=fwd_tol * want[0].abs().max().item())
    for g, w in zip(got[1:], want[1:]):
        torch.testing.assert_close(g.double(), w, rtol=grad_tol, atol=grad_tol * w.abs().max().item())
    assert kernel.endswith("planes_rows")


def test_rows_masked_and_uncovered_positions_have_no_effect(seed):
    """-inf logits mask their x (even inf/NaN) out; columns that no window
    covers (kernel 2, stride 3) may hold NaN logits and inf x and still get
    zero gradients and change nothing."""
    n, c, h, w = 2, 2, 14, 61
    x, logit = random_inputs((n, c, h, w), torch.float32, "contiguous")
    masked = torch.zeros(n, c, h, w, dtype=torch.bool)
    masked[:, :, 1::2] = torch.rand(n, c, h // 2, w) < 0.4  # odd rows only: no window all masked
    x_poisoned = x.clone()
    x_poisoned[masked] = torch.where(torch.rand(int(masked.sum())) < 0.5, float("inf"), float("nan"))
    logit_poisoned = logit.masked_fill(masked, float("-inf"))
    grad_out = torch.randn(n, c, 7, 31)
    got, kernel = fused_with_grads(x_poisoned, logit_poisoned, grad_out, 3, 2, 1, False)
    assert kernel.endswith("planes_rows")
    want = oracle_with_grads(x.masked_fill(masked, 0.0), logit_poisoned, grad_out, 3, 2, 1, False)
    assert_matches_oracle(got, want, torch.float32)
    assert torch.all(got[1][masked] == 0) and torch.all(got[2][masked] == 0)

    uncovered = torch.zeros(n, c, h, w, dtype=torch.bool)
    uncovered[..., 2::3] = True  # kernel 2, stride 3: columns 2, 5, 8, ... are in no window
    x_poisoned = x.masked_fill(uncovered, float("inf"))
    logit_poisoned = logit.masked_fill(uncovered, float("nan"))
    grad_out = torch.randn(n, c, 5, 20)
    got, kernel = fused_with_grads(x_poisoned, logit_poisoned, grad_out, 2, 3, 0, False)
    assert kernel.endswith("planes_rows")
    want = oracle_with_grads(x, logit, grad_out, 2, 3, 0, False)
    assert_matches_oracle(got, want, torch.float32)
    assert torch.all(got[1][uncovered] == 0) and torch.all(got[2][uncovered] == 0)


@pytest.mark.parametrize("offset", [1e2, 1e4])
@pytest.mark.parametrize("planes", ["rows", "halving"])
def test_large_logits_at_row_edges(offset, planes, monkeypatch, seed):
    """Logits far above exp's range: the edge columns (even W, so the last
    one is in a window only on its left) must not see a padding output, in
    the rows kernels and the halving ones (k3 s2 p1 only; the AVX2 build's
    halving kernels take planes up to 62 wide, so this 64-wide one runs its
    default there)."""
    shape = (1, 3, 16, 64)
    x = torch.randn(shape)
    logit = offset + 4 * torch.randn(shape)
    monkeypatch.setenv("LIP_CUDA_CPU_PLANES", planes)
    for k, s, p in ((3, 2, 1), (4, 3, 2), (5, 1, 2))[:1 if planes == "halving" else 3]:
        out_shape = torch.nn.functional.avg_pool2d(x, k, s, p).shape
        grad_out = torch.randn(out_shape)
        got, kernel = fused_with_grads(x, logit, grad_out, k, s, p, False)
        assert kernel.endswith(f"planes_{planes}") or (planes == "halving" and not kernel.startswith("cpu_avx512"))
        assert_matches_oracle(got, oracle_with_grads(x, logit, grad_out, k, s, p, False), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("width", [21, 37, 38, 53, 70])
def test_rows_windows_clipped_at_the_row_end_see_no_padding(width, dtype, monkeypatch, seed):
    """The rows kernels split each row into stride phases padded past its
    end (x with 0, the logit with -inf), filling whole lane vectors. A
    window that the row's end clips (ceil_mode) must see none of that
    padding, also where all its logits are far below 0 (a padded logit
    of 0 would become its max): windows that do not overlap (no tile form)
    and windows far below their strip's max (the fallback to their own max)
    both read the padded phases."""
    monkeypatch.setenv("LIP_CUDA_CPU_PLANES", "rows")
    for k, s, p in ((2, 2, 0), (3, 3, 1), (3, 2, 1), (2, 3, 1)):
        x, logit = random_inputs((2, 3, 9, width), dtype, "contiguous")
        logit = logit - 50
        # the right edge far below the rest of its strips: fallback windows
        logit[..., -4:] -= 200
        out_shape = torch.nn.functional.avg_pool2d(x.float(), k, s, p, ceil_mode=True).shape
        grad_out = torch.randn(out_shape).to(dtype)
        got, kernel = fused_with_grads(x, logit, grad_out, k, s, p, True)
        assert kernel.endswith("planes_rows")
        assert_matches_oracle(got, oracle_with_grads(x, logit, grad_out, k, s, p, True), dtype)


def covered(size, k, s, p, out):
    """Which input indices of one dimension some window holds."""
    mask = torch.zeros(size, dtype=torch.bool)
    for o in range(out):
        mask[max(0, o * s - p):max(0, min(size, o * s - p + k))] = True
    return mask


def random_geometries(rng, count, max_k, max_h, max_w):
    """count random ((kh, kw), (sh, sw), (ph, pw)), ceil_mode, (h, w) and
    avg_pool2d's output shape: kernels 1..max_k, strides 1-4, any legal
    padding, planes up to max_h x max_w with at least one output."""
    cases = 0
    while cases < count:
        kh, kw = (int(v) for v in rng.integers(1, max_k + 1, 2))
        sh, sw = (int(v) for v in rng.integers(1, 5, 2))
        ph, pw = int(rng.integers(0, kh // 2 + 1)), int(rng.integers(0, kw // 2 + 1))
        h, w = int(rng.integers(1, max_h + 1)), int(rng.integers(1, max_w + 1))
        ceil = bool(rng.integers(0, 2))
        try:
            out_shape = torch.nn.functional.avg_pool2d(torch.empty(1, 1, h, w), (kh, kw), (sh, sw), (ph, pw), ceil).shape
        except RuntimeError:
            continue
        if min(out_shape[2:]) < 1:
            continue
        cases += 1
        yield ((kh, kw), (sh, sw), (ph, pw)), ceil, (h, w), out_shape


def fused_backward_kernel(x, logit, grad_out, k, s, p, ceil):
    """fused_with_grads, and the kernel that ran the backward."""
    got, _ = fused_with_grads(x, logit, grad_out, k, s, p, ceil)
    return got, ops._lip2d_last_kernel()


def uncovered_inputs(h, w, geometry, out_shape):
    """(h, w) mask of the inputs that no window covers."""
    (kh, kw), (sh, sw), (ph, pw) = geometry
    return ~(covered(h, kh, sh, ph, out_shape[2])[:, None] & covered(w, kw, sw, pw, out_shape[3])[None, :])


def assert_equals_channels_last(got, x, logit, grad_out, geometry, ceil, uncovered, case):
    """got (a contiguous kernel's out, grad_x, grad_logit) bitwise the
    channels_last results, and both gradients exactly 0 where uncovered.
    A 1 x 1 plane has the same strides in both formats (the op sees it as
    contiguous and runs its default planes kernel): got is then compared
    with that kernel's results."""
    cl = torch.channels_last
    x_cl = x.to(memory_format=cl)
    want, kernel = fused_backward_kernel(x_cl, logit.to(memory_format=cl), grad_out, *geometry, ceil)
    assert kernel.endswith("channels_last") or (x_cl.is_contiguous() and "_planes_" in kernel), kernel
    for name, a, b in zip(("out", "grad_x", "grad_logit"), got, want):
        # bitwise, NaN where channels_last has NaN (windows holding an inf x)
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=f"{name} {case}")
    assert torch.all(got[1][uncovered.expand_as(x)] == 0) and torch.all(got[2][uncovered.expand_as(x)] == 0), case


def test_rows_backward_random_geometries_equal_channels_last(monkeypatch, seed):
    """The rows backward lays each stride phase of a plane out flat, lanes
    running across its rows, with padded outputs around it, and splits tall
    planes into tasks of a few phase rows. Random geometries (strides 1-4,
    kernels 1-5, any padding, ceil_mode; planes 1 to 260 tall, 1 to 150
    wide, so one task or many) against channels_last bitwise, with the
    inputs that no window covers poisoned (NaN logit, inf x): their
    gradients must be exactly 0 and the rest unchanged."""
    rng = np.random.default_rng(seed)
    for geometry, ceil, (h, w), out_shape in random_geometries(rng, 24, 5, 260, 150):
        x, logit = random_inputs((1, 2, h, w), torch.float32, "contiguous")
        grad_out = torch.randn(1, 2, *out_shape[2:])
        uncovered = uncovered_inputs(h, w, geometry, out_shape)
        x_poisoned = x.masked_fill(uncovered, float("inf"))
        logit_poisoned = logit.masked_fill(uncovered, float("nan"))
        monkeypatch.setenv("LIP_CUDA_CPU_PLANES", "rows")
        got, kernel = fused_backward_kernel(x_poisoned, logit_poisoned, grad_out, *geometry, ceil)
        assert kernel.endswith("planes_rows")
        monkeypatch.delenv("LIP_CUDA_CPU_PLANES")
        assert_equals_channels_last(got, x_poisoned, logit_poisoned, grad_out, geometry, ceil, uncovered,
                                    f"{geometry} ceil={ceil} plane {h}x{w}")
        # the poison changes nothing else (up to the rounding of the strip
        # maxima, which the uncovered logits took part in before)
        assert_matches_oracle(got, oracle_with_grads(x, logit, grad_out, *geometry, ceil), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
def test_gather_backward_random_geometries_equal_channels_last(dtype, monkeypatch, seed):
    """The gather backward (lanes along an input row, each output row spread
    under the input columns by lane permutes, one exp per distinct
    reference) adds grad_tap's terms in the other layouts' order: bitwise
    the channels_last gradients, on random geometries (kernels 1-6, strides
    1-4, any padding, ceil_mode, 1-70 rows, 1-150 columns), with masked
    (-inf) logits, logits up to 30 apart (strips whose windows fall back to
    their own max), float32 logits with half x, and the inputs no window
    covers poisoned (NaN logit, inf x): exactly 0 there. Some cases also
    put an inf x where windows see it: NaN exactly where channels_last has
    it."""
    rng = np.random.default_rng(seed)
    gathered = 0
    baseline = False  # the baseline ISA build (4 lanes) has no gather kernel
    for geometry, ceil, (h, w), out_shape in random_geometries(rng, 30, 6, 70, 150):
        shape = (int(rng.integers(1, 3)), int(rng.integers(2, 5)), h, w)  # C > 1: channels_last differs
        x, logit = random_inputs(shape, dtype, "contiguous", logit_high=float(rng.choice([6.0, 30.0])))
        logit = logit.masked_fill(torch.rand(shape) < 0.1, float("-inf"))
        if dtype != torch.float32 and rng.integers(0, 2):
            logit = logit.float()  # float32 logits with half x, as autocast gives them
        grad_out = torch.randn(shape[0], shape[1], *out_shape[2:]).to(dtype)
        uncovered = uncovered_inputs(h, w, geometry, out_shape)
        if rng.integers(0, 2):
            # a few inf x where windows see them: those outputs are inf or
            # NaN, which must reach no gradient outside their windows
            x = x.masked_fill(torch.rand(shape) < 0.01, float("inf"))
        x = x.masked_fill(uncovered, float("inf"))
        logit = logit.masked_fill(uncovered, float("nan"))
        monkeypatch.setenv("LIP_CUDA_CPU_PLANES", "gather")
        got, kernel = fused_backward_kernel(x, logit, grad_out, *geometry, ceil)
        gathered += kernel.endswith("planes_gather")
        baseline = baseline or kernel.startswith("cpu_default_")
        monkeypatch.delenv("LIP_CUDA_CPU_PLANES")
        assert_equals_channels_last(got, x, logit, grad_out, geometry, ceil, uncovered,
                                    f"{geometry} ceil={ceil} shape {shape}")
    # the geometries it does not take (no overlapping windows, outputs of a
    # lane vector wider than one) run the other kernels; most it takes
    assert gathered >= 10 or baseline, gathered


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
def test_halving_random_planes_equal_channels_last(dtype, monkeypatch, seed):
    """The halving kernels (kernel 3, stride 2, padding 1 on even planes:
    each stride phase laid out flat, two 7-wide phase rows a vector at 14
    wide, input rows split into phases by lane permutes, the padding taps
    and those past a row's end or below the last row reading exact zeros)
    take the strips' maxima and fallback windows of the other layouts and
    add their terms in the same order: bitwise the channels_last results,
    on random even planes 2 to 128 tall and 2 to 126 wide (half of them
    up to 14 wide: two phase rows a vector, the backward's output rows
    shifted in registers; or one to four vectors a phase row; one strip or
    many), with
    masked (-inf) logits, logits up to
    60 apart (windows that fall back to their own max, strips with other
    references), logits shared across images or channels, float32 logits
    with half x, and some inf x."""
    rng = np.random.default_rng(seed)
    geometry = ((3, 3), (2, 2), (1, 1))
    halved = 0
    for i in range(40):
        # every other plane up to 14 wide: two output rows a vector
        h, w = 2 * int(rng.integers(1, 65)), 2 * int(rng.integers(1, 8 if i % 2 else 64))
        shape = (int(rng.integers(1, 3)), int(rng.integers(2, 5)), h, w)
        logit_shape = [shape, (1, shape[1], h, w), (shape[0], 1, h, w)][int(rng.integers(0, 3))]
        x, logit = random_inputs(shape, dtype, "contiguous", logit_shape=logit_shape,
                                 logit_high=float(rng.choice([6.0, 30.0, 60.0])))
        logit = logit.masked_fill(torch.rand(logit_shape) < 0.1, float("-inf"))
        if dtype != torch.float32 and rng.integers(0, 2):
            logit = logit.float()  # float32 logits with half x, as autocast gives them
        if rng.integers(0, 3) == 0:
            x = x.masked_fill(torch.rand(shape) < 0.01, float("inf"))
        grad_out = torch.randn(shape[0], shape[1], h // 2, w // 2).to(dtype)
        monkeypatch.setenv("LIP_CUDA_CPU_PLANES", "halving")
        got, forward_kernel = fused_with_grads(x, logit, grad_out, *geometry, False)
        kernel = ops._lip2d_last_kernel()
        monkeypatch.delenv("LIP_CUDA_CPU_PLANES")
        # both directions halving, or neither
        assert forward_kernel.endswith("planes_halving") == kernel.endswith("planes_halving"), (forward_kernel, kernel)
        halved += kernel.endswith("planes_halving")
        cl = torch.channels_last
        want, cl_kernel = fused_backward_kernel(x.to(memory_format=cl), logit.contiguous(memory_format=cl),
                                                grad_out, *geometry, False)
        assert cl_kernel.endswith("channels_last") or shape[1] == 1, cl_kernel
        for name, a, b in zip(("out", "grad_x", "grad_logit"), got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True,
                                       msg=f"{name} shape {shape} logit {logit_shape} {logit.dtype} {kernel}")
    # the AVX2 build (8 lanes) takes planes up to 62 wide; the baseline
    # build (4 lanes) none
    if kernel.startswith("cpu_avx512"):
        assert halved == 40, halved
    elif kernel.startswith("cpu_avx2"):
        assert halved >= 5, halved


@pytest.mark.parametrize("geometry", [
    ((19, 3), (2, 2), (9, 1)),
    ((13, 5), (1, 2), (6, 2)),
], ids=str)
def test_gather_backward_tall_windows_equal_channels_last(geometry, monkeypatch, seed):
    """Inputs covered by 10-13 output rows (tall windows): the gather
    backward's covering rows are counted at run time, bitwise the
    channels_last gradients."""
    shape = (2, 3, 60, 90)
    x, logit = random_inputs(shape, torch.float32, "contiguous", logit_high=12.0)
    out_shape = torch.nn.functional.avg_pool2d(x, *geometry).shape
    grad_out = torch.randn(out_shape)
    monkeypatch.setenv("LIP_CUDA_CPU_PLANES", "gather")
    got, kernel = fused_backward_kernel(x, logit, grad_out, *geometry, False)
    assert kernel.endswith("planes_gather") or kernel.startswith("cpu_default_"), kernel  # AVX2+
    monkeypatch.delenv("LIP_CUDA_CPU_PLANES")
    uncovered = uncovered_inputs(60, 90, geometry, out_shape)
    assert_equals_channels_last(got, x, logit, grad_out, geometry, False, uncovered, str(geometry))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("logit_shape", [(1, 1), (2, 1), (1, 3)], ids=str)
def test_gather_shared_logit_matches_oracle(dtype, logit_shape, seed):
    """A plane 56 to 512 wide runs the gather backward by default; logits shared across images and/or channels are
    read in place and their gradient summed over what shares them."""
    shape, k, s, p = (2, 3, 70, 100), 3, 2, 1
    x, logit = random_inputs(shape, dtype, "contiguous", logit_shape=(*logit_shape, 70, 100))
    grad_out = torch.randn(2, 3, 35, 50).to(dtype)
    got, kernel = fused_backward_kernel(x, logit, grad_out, k, s, p, False)
    assert kernel.endswith("planes_gather") or kernel.startswith("cpu_default_"), kernel  # AVX2+
    want = oracle_with_grads(x, logit.expand_as(x), grad_out, k, s, p, False)
    dims = tuple(d for d, n in enumerate(logit_shape) if n == 1)
    want = (want[0], want[1], want[2].sum(dim=dims, keepdim=True))
    assert got[2].shape == logit.shape
    assert_matches_oracle(got, want, dtype)


@pytest.mark.parametrize("shape,dtype,avx2_kernel,avx512_kernel", [
    ((2, 3, 70, 112), torch.float32, "planes_gather", "planes_gather"),
    ((2, 20, 56, 56), torch.float32, "planes_gather", "planes_halving"),
    ((2, 64, 56, 56), torch.float32, "planes_blocks", "planes_halving"),
    ((2, 64, 56, 56), torch.bfloat16, "planes_blocks", "planes_halving"),
    ((2, 64, 56, 57), torch.float32, "planes_blocks", "planes_gather"),  # odd width: no halving
    ((2, 32, 14, 14), torch.float32, "planes_blocks", "planes_halving"),
    ((2, 32, 14, 14), torch.bfloat16, "planes_blocks", "planes_blocks"),
    ((2, 64, 28, 28), torch.float32, "planes_blocks", "planes_halving"),
    ((2, 64, 28, 28), torch.bfloat16, "planes_blocks", "planes_halving"),
    ((2, 32, 14, 13), torch.float32, "planes_blocks", "planes_blocks"),  # odd width: no halving
    ((2, 32, 30, 34), torch.float32, "planes_blocks", "planes_halving"),  # 17 outputs a row: pitch 32
    ((2, 8, 66, 66), torch.float32, "planes_gather", "planes_gather"),  # wider than 64: no halving
    ((1, 2, 40, 1100), torch.float32, "planes_rows", "planes_rows"),
], ids=str)
def test_default_backward_kernels(shape, dtype, avx2_kernel, avx512_kernel, monkeypatch, seed):
    """Which contiguous backward runs by default: blocks for planes up to
    64 x 64 with many channels (which fill its lanes), else gather for
    planes 56 to 512 wide, else rows; the AVX-512 build's gather also takes
    those 56 to 64 wide from blocks for float32 x, and its halving kernel
    takes kernel 3, stride 2, padding 1 on even planes up to 64 wide (float32
    x; 16-bit x from 28 wide, where the phase rows fill a vector)
    (docs/kernels.md has the measurements)."""
    monkeypatch.delenv("LIP_CUDA_CPU_PLANES", raising=False)
    x, logit = random_inputs(shape, dtype, "contiguous")
    grad_out = torch.randn(torch.nn.functional.avg_pool2d(x, 3, 2, 1).shape, dtype=dtype)
    got, name = fused_backward_kernel(x, logit, grad_out, 3, 2, 1, False)
    # the rules above are the AVX2 / AVX-512 builds' (the baseline build has
    # 4 lanes and no gather kernel)
    if name.startswith("cpu_avx2_"):
        assert name.endswith(avx2_kernel), name
    elif name.startswith("cpu_avx512"):
        assert name.endswith(avx512_kernel), name
    assert_matches_oracle(got, oracle_with_grads(x, logit, grad_out, 3, 2, 1, False), dtype)


@pytest.mark.parametrize("shape,dtype,avx2_kernel,kernel", [
    ((2, 64, 112, 112), torch.float32, "planes_blocks", "planes_blocks"),  # blocks in bands of rows
    ((1, 16, 160, 160), torch.float32, "planes_blocks", "planes_rows"),    # a tie of lane fill
    ((2, 64, 28, 28), torch.float32, "planes_blocks", "planes_halving"),
    ((2, 64, 28, 28), torch.bfloat16, "planes_blocks", "planes_halving"),
    ((2, 64, 14, 14), torch.float32, "planes_blocks", "planes_halving"),
    ((2, 64, 14, 14), torch.bfloat16, "planes_blocks", "planes_blocks"),
    ((2, 64, 28, 27), torch.float32, "planes_blocks", "planes_blocks"),    # odd width: no halving
    ((1, 2, 40, 1100), torch.float32, "planes_rows", "planes_rows"),
    ((1, 8, 9, 30000), torch.float32, "planes_rows", "planes_rows"),     # one band's scratch too big for blocks
], ids=str)
def test_default_forward_kernels(shape, dtype, avx2_kernel, kernel, monkeypatch, seed):
    """Which contiguous forward runs by default: blocks for planes with
    many channels (bigger planes in bands of rows, unless one band's scratch
    would exceed its bound); on a tie of lane fill with rows, blocks in the
    AVX2 build and rows in the AVX-512 one; in the AVX-512 build, the
    halving kernel for kernel 3, stride 2, padding 1 on even planes up to
    64 wide (float32 x; 16-bit x from 28 wide, as the backward)
    (docs/kernels.md has the measurements)."""
    monkeypatch.delenv("LIP_CUDA_CPU_PLANES", raising=False)
    x, logit = random_inputs(shape, dtype, "contiguous")
    grad_out = torch.randn(torch.nn.functional.avg_pool2d(x, 3, 2, 1).shape, dtype=dtype)
    got, name = fused_with_grads(x, logit, grad_out, 3, 2, 1, False)
    if not name.startswith("cpu_default_"):  # (the baseline build: 4 lanes)
        assert name.endswith(avx2_kernel if name.startswith("cpu_avx2_") else kernel), name
    assert_matches_oracle(got, oracle_with_grads(x, logit, grad_out, 3, 2, 1, False), dtype)


CPU_LAYOUTS = [("contiguous", "rows"), ("contiguous", "blocks"), ("channels_last", None)]


def run_layout(x, logit, grad_out, k, s, p, layout, planes, monkeypatch):
    """fused_with_grads in one CPU layout (planes forces rows or blocks)."""
    if planes is None:
        monkeypatch.delenv("LIP_CUDA_CPU_PLANES", raising=False)
    else:
        monkeypatch.setenv("LIP_CUDA_CPU_PLANES", planes)
    if layout == "channels_last":
        x, logit = (t.to(memory_format=torch.channels_last) for t in (x, logit))
    got, kernel = fused_with_grads(x, logit, grad_out, k, s, p, False)
    assert kernel.endswith(planes or "channels_last"), kernel
    return got


@pytest.mark.parametrize("layout,planes", CPU_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_tile_form_windows_far_below_the_strip_max(layout, planes, dtype, monkeypatch, seed):
    """The CPU forward weighs a strip's taps relative to the strip's max
    logit (one exp per input); a window whose own max is far below it is
    recomputed relative to its own max. Here each 2x2 block of outputs has
    its logits shifted by its own offset, from 0 down to -400 (beyond
    exp's float range), across the fallback threshold (exp(-20)) and
    within every strip: every window must still give the oracle's
    results, as the window-max form does."""
    shape = (2, 19, 24, 26)
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    offsets = torch.tensor([0.0, -12.0, -19.0, -21.0, -25.0, -45.0, -70.0, -90.0, -150.0, -400.0],
                           dtype=torch.float64)
    # one offset per 4x4 input block, drawn per (image, channel)
    pick = torch.randint(len(offsets), (2, 19, 6, 7))
    shift = offsets[pick].repeat_interleave(4, 2).repeat_interleave(4, 3)[:, :, :24, :26]
    logit = (torch.rand(shape, dtype=torch.float64) * 3 + shift).to(dtype)
    grad_out = torch.randn(2, 19, 12, 13).to(dtype)
    got = run_layout(x, logit, grad_out, 3, 2, 1, layout, planes, monkeypatch)
    assert_matches_oracle(got, oracle_with_grads(x, logit, grad_out, 3, 2, 1), dtype)
    # and where the whole strip sits far below zero
    got = run_layout(x, logit - 300, grad_out, 3, 2, 1, layout, planes, monkeypatch)
    assert_matches_oracle(got, oracle_with_grads(x, logit - 300, grad_out, 3, 2, 1), dtype)


@pytest.mark.parametrize("layout,planes", CPU_LAYOUTS)
def test_tile_form_references_are_strip_maxima(layout, planes, monkeypatch, seed):
    """For logits within a few units of each other the forward's saved
    reference (the op's window_max output) is, per channel, the max logit
    over the input rows of the output's strip of 4 rows: the tile form is
    what runs, not only its fallback. With kernel <= stride (no window
    overlap, nothing to save) every output keeps its own window max."""
    if planes is None:
        monkeypatch.delenv("LIP_CUDA_CPU_PLANES", raising=False)
    else:
        monkeypatch.setenv("LIP_CUDA_CPU_PLANES", planes)
    x = torch.randn(2, 21, 23, 18)
    logit = torch.rand(2, 21, 23, 18) * 5
    if layout == "channels_last":
        x, logit = (t.to(memory_format=torch.channels_last) for t in (x, logit))
    _, reference, _ = ops.lip2d_forward(x, logit, [3, 3], [2, 2], [1, 1], False)
    assert reference.shape == (2, 21, 12, 9)
    for strip in range(3):
        oh0, oh1 = 4 * strip, min(12, 4 * strip + 4)
        h0, h1 = max(2 * oh0 - 1, 0), min(2 * (oh1 - 1) + 2, 23)
        want = logit[:, :, h0:h1, :].amax(dim=(2, 3), keepdim=True)
        assert torch.equal(reference[:, :, oh0:oh1], want.expand(2, 21, oh1 - oh0, 9))
    _, reference, _ = ops.lip2d_forward(x, logit, [2, 2], [2, 2], [0, 0], False)
    assert torch.equal(reference, torch.nn.functional.max_pool2d(logit, 2, 2))


_MEMORY_SCRIPT = r"""
import json, resource, sys, torch, lip_cuda
torch.set_num_threads(2)
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
dtype = getattr(torch, sys.argv[1])
w = torch.randn(1, 1, 64, 64, requires_grad=True)
lip_cuda.lip2d(w, w).sum().backward()  # load code pages and threads first
x = torch.randn(1, 1, 2048, 2048).to(dtype).requires_grad_()
logit = torch.rand(1, 1, 2048, 2048).to(dtype).requires_grad_()
base = peak()
y = lip_cuda.lip2d(x, logit)
forward = peak() - base
kernel = torch.ops.lip_cuda._lip2d_last_kernel()
gx, gl = torch.autograd.grad(y, (x, logit), torch.ones_like(y))
print(json.dumps({"forward": forward, "total": peak() - base, "bytes": x.nbytes, "kernel": kernel,
                  "finite": bool(torch.isfinite(gx).all() and torch.isfinite(gl).all())}))
"""


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_large_single_channel_plane_memory_is_bounded(dtype):
    """1x1x2048x2048: peak RSS growth of forward+backward in a fresh process.
    The outputs alone are about 3.3x x's bytes (out, window max, 1 / sum,
    grad_out, grad_x, grad_logit); the old whole-plane scratch of 16 lanes
    took over 80x."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, dtype], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    assert stats["kernel"].endswith("planes_rows")
    assert stats["finite"]
    assert stats["forward"] < 2 * stats["bytes"], stats
    assert stats["total"] < 5 * stats["bytes"], stats


# ---- instruction sets --------------------------------------------------------

# the per-ISA builds (lip2d_cpu_avx2.cpp, ...) exist on x86-64 Linux only
needs_isa_builds = pytest.mark.skipif(
    sys.platform != "linux" or os.uname().machine != "x86_64",
    reason="the per-ISA builds exist on x86-64 only")


def runnable_isas():
    """The ISA builds this CPU can run, as torch reports its capability."""
    capability = torch.backends.cpu.get_cpu_capability()
    isas = ["default"]
    if capability in ("AVX2", "AVX512"):
        isas.append("avx2")
    if capability == "AVX512":
        isas.append("avx512")
        if cpu_has_avx512_bf16():
            isas.append("avx512bf16")
    return isas


def cpu_has_avx512_bf16():
    """The CPU has AVX512-BF16 and this build has the kernels for it (GCC 12
    or newer builds them; the probe is a tiny call)."""
    try:
        if " avx512_bf16" not in Path("/proc/cpuinfo").read_text():
            return False
    except OSError:
        return False
    previous = os.environ.get("LIP_CUDA_CPU_ISA")
    os.environ["LIP_CUDA_CPU_ISA"] = "avx512bf16"
    try:
        lip_cuda.lip2d(torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4))
        return ops._lip2d_last_kernel().startswith("cpu_avx512bf16_")
    finally:
        if previous is None:
            del os.environ["LIP_CUDA_CPU_ISA"]
        else:
            os.environ["LIP_CUDA_CPU_ISA"] = previous


ISA_CASES = [  # shape, layout, dtype: one per kernel layout and lane conversion
    ((2, 3, 33, 70), "contiguous", torch.float32),
    ((2, 40, 10, 10), "contiguous", torch.float32),
    ((2, 21, 15, 17), "channels_last", torch.float32),
    ((1, 2, 29, 45), "contiguous", torch.bfloat16),
    ((2, 19, 13, 11), "channels_last", torch.float16),
    ((1, 3, 21, 64), "contiguous", torch.float16),  # the gather backward (AVX2, AVX-512)
]


def run_isa_cases(seed_value):
    torch.manual_seed(seed_value)
    results = []
    for shape, layout, dtype in ISA_CASES:
        x, logit = random_inputs(shape, dtype, layout)
        out_shape = torch.nn.functional.avg_pool2d(torch.empty(shape), 3, 2, 1).shape
        grad_out = torch.randn(out_shape).to(dtype)
        got, kernel = fused_with_grads(x, logit, grad_out, 3, 2, 1, False)
        results.append((x, logit, grad_out, got, kernel))
    return results


@needs_isa_builds
def test_every_isa_build_matches_oracle(monkeypatch, seed):
    first = None
    for isa in runnable_isas():
        monkeypatch.setenv("LIP_CUDA_CPU_ISA", isa)
        results = run_isa_cases(seed)
        for (shape, layout, dtype), (x, logit, grad_out, got, kernel) in zip(ISA_CASES, results):
            assert kernel.startswith(f"cpu_{isa}_"), (isa, kernel)
            assert_matches_oracle(got, oracle_with_grads(x, logit, grad_out, 3, 2, 1, False), dtype)
        if first is None:
            first = results
            continue
        # the same arithmetic, rounded alike up to FMA contraction
        for (_, _, dtype), a, b in zip(ISA_CASES, first, results):
            tol = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
            for u, v in zip(a[3], b[3]):
                torch.testing.assert_close(u.float(), v.float(), rtol=tol, atol=tol * v.abs().max().item())


@needs_isa_builds
def test_every_isa_build_exp_is_accurate(monkeypatch, seed):
    """The SIMD exp (Cody-Waite reduction and a degree-6 polynomial, about
    one float ulp) as the outputs see it: windows of two taps, x = [0, 1] at
    logits [0, -t], give y = e / (1 + e) with e = exp(-t), relative to y as
    accurate as e itself; t random in [0, 80) spans every reduced argument
    and scale of the normal range. Each element of out, grad_x and
    grad_logit within 1e-6 (8 ulps) of the float64 oracle, relative to
    itself, in every layout and ISA build (the tolerance of the other tests,
    relative to the largest element, would not see an exp 100 ulps off)."""
    channels, windows = 17, 300
    t = torch.rand(1, channels, 1, windows, dtype=torch.float64) * 80
    x = torch.zeros(1, channels, 1, 2 * windows, dtype=torch.float64)
    x[..., 1::2] = 1
    logit = torch.zeros(1, channels, 1, 2 * windows, dtype=torch.float64)
    logit[..., 1::2] = -t
    x, logit = x.float(), logit.float()
    grad_out = torch.randn(1, channels, 1, windows)
    want = oracle_with_grads(x, logit, grad_out, (1, 2), (1, 2), 0)
    for isa in runnable_isas():
        monkeypatch.setenv("LIP_CUDA_CPU_ISA", isa)
        for layout, planes in CPU_LAYOUTS:
            got = run_layout(x, logit, grad_out, (1, 2), (1, 2), 0, layout, planes, monkeypatch)
            for name, g, w in zip(("out", "grad_x", "grad_logit"), got, want):
                torch.testing.assert_close(g.double(), w, rtol=1e-6, atol=0, msg=f"{name} {isa} {layout} {planes}")


# (x far above 1, a logit beyond exp's normal float range) per dtype
NEGLIGIBLE_X = {torch.float32: 3e38, torch.bfloat16: 3e38, torch.float16: 6e4}


@needs_isa_builds
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("far", [-88.0, -95.0, -102.0])
def test_every_isa_build_gives_negligible_logits_no_weight(far, dtype, monkeypatch):
    """Each build's exp of a logit minus its reference is exactly 0 below
    float's normal range (about -87.3), not a subnormal (which a huge x
    would still see) nor, where 2^n is built from exponent bits (baseline
    and AVX2 builds), a garbage scale: just past that bound, a tap with a
    huge x weighs nothing, in every layout and ISA build. Windows (1, 2):
    [1, big] at logits [0, far], [1, inf] at [0, -inf], then fully masked;
    17 channels: full lane blocks and a partial one."""
    x = torch.ones(1, 17, 1, 6, dtype=torch.float64)
    logit = torch.zeros(1, 17, 1, 6, dtype=torch.float64)
    x[..., 1], logit[..., 1] = NEGLIGIBLE_X[dtype], far
    x[..., 3], logit[..., 3] = float("inf"), -float("inf")
    x[..., 4], logit[..., 4:] = float("nan"), -float("inf")
    x, logit = x.to(dtype), logit.to(dtype)
    want_y = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64).expand(1, 17, 1, 3)
    want_gx = torch.tensor([1.0, 0, 1, 0, 0, 0], dtype=torch.float64).expand(1, 17, 1, 6)
    for isa in runnable_isas():
        monkeypatch.setenv("LIP_CUDA_CPU_ISA", isa)
        for layout, planes in CPU_LAYOUTS:
            got = run_layout(x, logit, torch.ones(1, 17, 1, 3).to(dtype), (1, 2), (1, 2), 0, layout, planes,
                             monkeypatch)
            assert torch.equal(got[0].double(), want_y), (isa, layout, planes)
            assert torch.equal(got[1].double(), want_gx), (isa, layout, planes)
            assert torch.equal(got[2].double(), torch.zeros(1, 17, 1, 6, dtype=torch.float64)), (isa, layout, planes)


@needs_isa_builds
@pytest.mark.parametrize("planes", ["channels_last", "blocks", "rows", "gather"])
def test_every_isa_build_converts_bfloat16_as_torch(planes, monkeypatch, seed):
    """Each ISA build's bfloat16 loads and stores (their own vector code:
    unpacks and byte shuffles on AVX2) give torch's bits: round to nearest
    even, ties included, and NaN as 0x7fc0, as c10's scalar conversion
    stores it (torch's vectorised one stores 0xffff). Equal logits make
    every weight exactly 1, so with 1 x 3 windows at stride 2 an output is
    the float ((x1 + x2) + x3) / 3 and an odd column's x gradient (one
    covering output) the float product grad_out * float(1/3): the kernels'
    final rounding to bfloat16 is the only one the two sides can differ by."""
    torch.manual_seed(seed)
    layout = "channels_last" if planes == "channels_last" else "contiguous"
    if planes != "channels_last":
        monkeypatch.setenv("LIP_CUDA_CPU_PLANES", planes)
    shape = (2, 19, 5, 61)  # full lane vectors and a partial one in every ISA
    x = (torch.randn(shape) * torch.exp2(torch.randint(-3, 4, shape).float())).bfloat16()
    x[1, 4, 2, 6] = float("nan")  # in two windows
    logit = torch.full(shape, 0.75, dtype=torch.bfloat16)
    if layout == "channels_last":
        x, logit = (t.to(memory_format=torch.channels_last) for t in (x, logit))
    xf = x.float()
    exact_y = ((xf[..., 0:60:2] + xf[..., 1:61:2]) + xf[..., 2:61:2]) / 3
    want_y = exact_y.bfloat16()
    assert (want_y.float() != exact_y).float().mean() > 0.5  # roundings, up and down
    assert ((exact_y.view(torch.int32) & 0xFFFF) == 0x8000).sum() > 20  # and exact ties (about 4%)
    grad_out = (torch.randn(2, 19, 5, 30) * 1e38).bfloat16()
    grad_out[0, 7, 1, 2] = float("nan")
    if layout == "channels_last":
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    want_gx = (grad_out.float() * (torch.tensor(1.0) / 3)).bfloat16()
    kernel_name = planes if planes == "channels_last" else "planes_" + planes
    for isa in runnable_isas():
        monkeypatch.setenv("LIP_CUDA_CPU_ISA", isa)
        y, window_max, inv = ops.lip2d_forward(x, logit, [1, 3], [1, 2], [0, 0], False)
        assert ops._lip2d_last_kernel().startswith(f"cpu_{isa}_"), isa
        assert_same_bfloat16_bits(y, want_y, isa)
        gx = ops.lip2d_backward(grad_out, x, logit, y, window_max, inv, [1, 3], [1, 2], [0, 0], False)[0]
        if not (planes == "gather" and isa == "default"):  # (no gather kernel in 4 lanes)
            assert ops._lip2d_last_kernel() == f"cpu_{isa}_{kernel_name}"
        assert_same_bfloat16_bits(gx[..., 1::2], want_gx, isa)
        assert torch.isnan(y).sum() == 2 and torch.isnan(gx[..., 1::2]).sum() == 1


def assert_same_bfloat16_bits(got, want, isa):
    got, want = got.contiguous().view(torch.int16), want.contiguous().view(torch.int16)
    nan = torch.isnan(want.view(torch.bfloat16))
    assert torch.equal(got[~nan], want[~nan]), isa
    assert bool((got[nan] == 0x7fc0).all()), isa


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_avx512bf16_build_stores_the_bits_of_the_avx512_build(layout, monkeypatch, seed):
    """The AVX512-BF16 build rounds float to bfloat16 with VCVTNEPS2BF16,
    which reads denormals as 0 and keeps NaN payloads where c10 (and the
    other builds) keep denormals and store one NaN: vectors holding those
    take the integer rounding. Outputs and both gradients must be bitwise
    those of the AVX-512 build, for ordinary values, denormal results,
    NaN, values that round up to inf, and masked (-inf) logits."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512" or not cpu_has_avx512_bf16():
        pytest.skip("needs a CPU with AVX512-BF16")
    shape = (2, 37, 11, 14)
    x = torch.randn(shape, dtype=torch.float64)
    x[0, :5] *= 1e-39  # outputs and gradients in bfloat16's denormal range
    x[1, 3, 4, 5] = float("nan")
    x[1, 7] = 3.3e38 + 1e36 * torch.rand(11, 14)  # near bfloat16's max
    logit = torch.rand(shape, dtype=torch.float64) * 6
    logit[0, 9, 2:6, 3:8] = -float("inf")
    # the one unmasked input of its two covering windows: its x gradient, the
    # sum of their two upstream gradients (3.399e38 in float), rounds up to inf
    logit[1, 8] = -float("inf")
    logit[1, 8, 3, 4] = 0.0
    x, logit = x.to(torch.bfloat16), logit.to(torch.bfloat16)
    grad_out = torch.randn(2, 37, 6, 7).to(torch.bfloat16)
    grad_out[0, 11] *= 1e-38
    grad_out[1, 8] = 1.7e38
    if layout == "channels_last":
        x, logit = (t.to(memory_format=torch.channels_last) for t in (x, logit))
    results = {}
    for isa in ("avx512", "avx512bf16"):
        monkeypatch.setenv("LIP_CUDA_CPU_ISA", isa)
        results[isa], kernel = fused_with_grads(x, logit, grad_out, 3, 2, 1, False)
        assert kernel.startswith(f"cpu_{isa}_")
    denormal = 0
    for a, b in zip(results["avx512"], results["avx512bf16"]):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
        denormal += int(((a != 0) & (a.float().abs() < torch.finfo(torch.float32).tiny)).sum())
    assert denormal > 0  # the denormal path ran
    assert any(torch.isnan(t).any() for t in results["avx512"])
    assert any(torch.isinf(t).any() for t in results["avx512"])


def test_isa_forced_at_process_start(tmp_path, seed):
    """LIP_CUDA_CPU_ISA=default in a fresh process runs the baseline build
    (the one a machine without AVX2 would run) with the same results."""
    x, logit = random_inputs((2, 5, 31, 40), torch.float32, "contiguous")
    torch.save((x, logit), tmp_path / "inputs.pt")
    script = (
        "import sys, torch, lip_cuda\n"
        "x, l = torch.load(sys.argv[1])\n"
        "y = lip_cuda.lip2d(x, l)\n"
        "torch.save((y, torch.ops.lip_cuda._lip2d_last_kernel()), sys.argv[2])\n"
    )
    env = dict(os.environ, LIP_CUDA_CPU_ISA="default",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "inputs.pt"),
                             str(tmp_path / "out.pt")], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    y, kernel = torch.load(tmp_path / "out.pt")
    assert kernel == "cpu_default_planes_rows"
    torch.testing.assert_close(y, lip_cuda.lip2d(x, logit), rtol=2e-6, atol=2e-6)


def test_only_the_isa_namespaces_use_avx():
    """The build must run on any x86-64 CPU: outside the cpu_avx2 and
    cpu_avx512 namespaces (which run only after the capability check), the
    extension holds no VEX/EVEX (AVX) instruction; -march flags or an ISA
    pragma leaking into shared inline code would put them there."""
    if os.uname().machine != "x86_64":
        pytest.skip("x86-64 only")
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("needs objdump (binutils)")
    library = lip_cuda._extension._C.__file__
    listing = subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", library], capture_output=True,
                             text=True, check=True).stdout
    function, offenders, avx512_in_namespace = "", {}, 0
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            function = header.group(1)
            continue
        if "\t" not in line:
            continue
        instruction = line.split("\t")[-1]
        uses_avx = re.match(r"v[a-z0-9]+\s", instruction) is not None or re.search(r"%[yz]mm", instruction)
        if not uses_avx:
            continue
        if "cpu_avx2" in function or "cpu_avx512" in function:
            avx512_in_namespace += "%zmm" in instruction and "cpu_avx512" in function
        else:
            offenders[function] = offenders.get(function, 0) + 1
    assert not offenders, list(offenders.items())[:5]
    assert avx512_in_namespace > 0  # the AVX-512 build is there


def test_unknown_isa_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("LIP_CUDA_CPU_ISA", "avx9000")
    x = torch.randn(1, 2, 8, 8)
    with pytest.raises(RuntimeError, match=r"LIP_CUDA_CPU_ISA to be 'default', 'avx2', 'avx512' or 'avx512bf16'"):
        lip_cuda.lip2d(x, x)


# ---- streaming stores -----------------------------------------------------------

# (kernel, shape, kernel_size, stride, padding, ceil_mode): each kernel where
# every whole output vector covers whole cache lines (so that its outputs
# stream when asked: all dtypes in channels_last and rows, float32 in
# blocks), with partial lane blocks and partial row vectors beside them; and
# one where nothing is line-aligned (the flag must change nothing there)
STREAM_CASES = [
    ("channels_last", (2, 32, 15, 17), 3, 2, 1, False),
    ("channels_last", (1, 64, 9, 8), (2, 3), (2, 1), (1, 1), True),
    ("blocks", (2, 40, 16, 16), 3, 2, 1, False),
    ("rows", (1, 3, 37, 64), 3, 2, 1, False),
    ("rows", (2, 2, 20, 128), (3, 5), (1, 2), (1, 2), True),
    ("blocks", (1, 19, 13, 11), 3, 2, 1, True),
]


def free_nan_memory(nbytes):
    """Frees NaN-filled memory of about the outputs' size, so that the next
    allocations likely reuse it: an element a kernel fails to write then
    reads NaN instead of a previous call's value."""
    poison = torch.full((max(1, nbytes // 4),), float("nan"))
    del poison


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", STREAM_CASES, ids=lambda c: c[0] + "-" + "x".join(map(str, c[1])))
def test_streaming_stores_write_the_bits_of_plain_stores(case, dtype, monkeypatch, seed):
    """LIP_CUDA_CPU_STREAM_STORES=1 makes every kernel store its outputs
    with non-temporal stores where whole vectors cover whole cache lines
    (calls bigger than the last-level cache do so by default): the outputs
    and gradients must be bitwise those of plain stores, in every ISA build
    this CPU runs, and match the oracle. The streaming call runs first, on
    memory that held NaN, so that an element it did not write shows."""
    kernel_name, shape, k, s, p, ceil = case
    x, logit = random_inputs(shape, dtype, "channels_last" if kernel_name == "channels_last" else "contiguous")
    if kernel_name != "channels_last":
        monkeypatch.setenv("LIP_CUDA_CPU_PLANES", kernel_name)
    out_shape = torch.nn.functional.avg_pool2d(torch.empty(shape), k, s, p, ceil).shape
    grad_out = torch.randn(out_shape).to(dtype)
    want = oracle_with_grads(x, logit, grad_out, k, s, p, ceil)
    for isa in runnable_isas():
        monkeypatch.setenv("LIP_CUDA_CPU_ISA", isa)
        results = {}
        for stream in ("1", "0"):
            monkeypatch.setenv("LIP_CUDA_CPU_STREAM_STORES", stream)
            free_nan_memory(8 * x.numel() * x.element_size())
            results[stream], kernel = fused_with_grads(x, logit, grad_out, k, s, p, ceil)
            assert kernel == f"cpu_{isa}_" + ("channels_last" if kernel_name == "channels_last"
                                               else f"planes_{kernel_name}")
        for a, b in zip(results["1"], results["0"]):
            assert torch.equal(a, b), isa
        assert_matches_oracle(results["1"], want, dtype)


def test_bad_stream_stores_setting_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("LIP_CUDA_CPU_STREAM_STORES", "yes")
    x = torch.randn(1, 2, 8, 8)
    with pytest.raises(RuntimeError, match=r"LIP_CUDA_CPU_STREAM_STORES to be '0', '1' or unset"):
        lip_cuda.lip2d(x, x)


# ---- pooling arguments ---------------------------------------------------------

BAD_ARGUMENTS = [
    ("float kernel", dict(kernel_size=3.0), TypeError, r"kernel_size to be an int or a pair of ints, but got float 3.0"),
    ("float in pair", dict(padding=(1, 0.5)), TypeError, r"padding to be an int or a pair of ints, but got float 0.5 in \(1, 0.5\)"),
    ("0-d tensor", dict(kernel_size=torch.tensor(3)), TypeError, r"kernel_size to be an int or a pair of ints, but got a tensor"),
    ("bool", dict(stride=True), TypeError, r"stride to be an int or a pair of ints, but got bool"),
    ("string", dict(stride="2"), TypeError, r"stride to be an int or a pair of ints, but got str"),
    ("2**63", dict(stride=2**63), ValueError, r"stride to hold values that fit in a 64-bit integer, but got 9223372036854775808"),
    ("-2**63-1", dict(padding=(0, -2**63 - 1)), ValueError, r"padding to hold values that fit in a 64-bit integer"),
    ("numpy array", dict(kernel_size=np.array([3, 3])), TypeError,
     r"kernel_size to be an int or a pair of ints, but got ndarray array\(\[3, 3\]\)"),
    ("ceil_mode None", dict(ceil_mode=None), TypeError, r"ceil_mode to be a bool \(True or False\), but got NoneType None"),
    ("ceil_mode int", dict(ceil_mode=1), TypeError, r"ceil_mode to be a bool \(True or False\), but got int 1"),
    ("ceil_mode numpy", dict(ceil_mode=np.True_), TypeError, r"ceil_mode to be a bool \(True or False\), but got numpy.bool"),
]


@pytest.mark.parametrize("case", BAD_ARGUMENTS, ids=lambda c: c[0])
@pytest.mark.parametrize("fn", [lip_cuda.lip2d, lip_cuda.lip2d_reference], ids=["fused", "reference"])
def test_bad_pooling_arguments_say_what_was_expected(fn, case):
    _, kwargs, error, message = case
    x = torch.randn(1, 2, 8, 8)
    with pytest.raises(error, match=message):
        fn(x, torch.rand(1, 2, 8, 8), **kwargs)


def test_integer_like_pooling_arguments_are_accepted(seed):
    x, logit = torch.randn(1, 2, 9, 9), torch.rand(1, 2, 9, 9)
    want = lip_cuda.lip2d(x, logit, 3, 2, 1)
    torch.testing.assert_close(lip_cuda.lip2d(x, logit, np.int64(3), [np.int32(2)], (1,)), want,
                               rtol=0, atol=0)
