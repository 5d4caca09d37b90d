"""The CUDA kernels' own code, run on the CPU thread by thread.

torch.ops.lip_cuda._lip2d_{forward,backward}_emulated pick the kernel and
launch grid exactly as the CUDA launcher does (csrc/lip_kernel_launch.h) and
call each thread's function (csrc/lip_kernel_threads.h) in a loop over the
grid. So these tests check the CUDA index math, vector loads, fallbacks and
window math in every dtype pair, layout, variant and offset width, on a
machine without a GPU, against the independent float64 oracle.

Where a GPU is visible, every test also runs the real CUDA kernels
(backend "cuda", LIP_CUDA_KERNELS set to the variant), so the same cases
check the device code; 64-bit offsets cannot be forced there
(test_lip2d.py::test_cuda_over_2_31_elements_index_correctly covers them).
"""
import random

import os

import pytest
import torch
from lip_oracle import oracle_with_grads

import lip_cuda  # noqa: F401  (registers the operators)

ops = torch.ops.lip_cuda
BACKENDS = ["emulated"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param

# (x dtype, logit dtype): the pairs with kernels of their own
DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.float32),
]
# forward, gradient tolerance relative to the largest oracle magnitude
TOLERANCE = {torch.float64: (1e-12, 1e-12), torch.float32: (2e-6, 5e-6),
             torch.float16: (2e-3, 4e-3), torch.bfloat16: (1e-2, 2e-2)}

FAST_GEOMETRIES = [(3, 2, 1), (2, 2, 0), (3, 1, 1)]
# channels per 16-byte vector of x in the fast channels_last kernels
VECTOR = {torch.float32: 4, torch.float64: 2, torch.float16: 8, torch.bfloat16: 8}
# the channels_last forward holds at most 4 channels a thread (registers)
FORWARD_VECTOR = {dtype: min(v, 4) for dtype, v in VECTOR.items()}


def pair_id(pair):
    return "-".join(str(d).replace("torch.", "") for d in pair)


def make_case(shape, pair, layout, logit_shape=None, logit_high=12.0):
    x_dtype, l_dtype = pair
    x = torch.randn(shape, dtype=torch.float64).to(x_dtype)
    lshape = logit_shape or shape
    logit = (torch.rand(lshape, dtype=torch.float64) * logit_high - 2).to(l_dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        logit = logit.contiguous(memory_format=torch.channels_last)
    return x, logit


def poison(numel, dtype, device="cpu"):
    block = torch.full((numel * 2 + 64,), float("nan"), dtype=dtype, device=device)
    del block


def run_emulated(x, logit, grad_out, k, s, p, ceil, variant, force_int64, backend="emulated"):
    """Forward then backward through the emulated (or, backend "cuda", the
    real) CUDA kernels; results on the CPU, with the kernels' names."""
    args = ([k, k] if isinstance(k, int) else list(k), [s, s] if isinstance(s, int) else list(s),
            [p, p] if isinstance(p, int) else list(p), ceil)
    if backend == "cuda":
        assert not force_int64
        previous = os.environ.get("LIP_CUDA_KERNELS")
        os.environ["LIP_CUDA_KERNELS"] = variant
        try:
            x, logit, grad_out = x.cuda(), logit.cuda(), grad_out.cuda()
            poison(x.numel(), x.dtype, "cuda")
            out, wmax, inv = ops.lip2d_forward(x, logit, *args)
            forward_kernel = ops._lip2d_last_kernel()
            poison(x.numel(), x.dtype, "cuda")
            gx, gl = ops.lip2d_backward(grad_out, x, logit, out, wmax, inv, *args)
            backward_kernel = ops._lip2d_last_kernel()
        finally:
            if previous is None:
                del os.environ["LIP_CUDA_KERNELS"]
            else:
                os.environ["LIP_CUDA_KERNELS"] = previous
        return out.cpu(), gx.cpu(), gl.cpu(), forward_kernel, backward_kernel
    poison(x.numel(), x.dtype)
    out, wmax, inv = ops._lip2d_forward_emulated(x, logit, *args, variant, force_int64)
    forward_kernel = ops._lip2d_last_kernel()
    poison(x.numel(), x.dtype)
    gx, gl = ops._lip2d_backward_emulated(grad_out, x, logit, out, wmax, inv, *args, variant, force_int64)
    backward_kernel = ops._lip2d_last_kernel()
    return out, gx, gl, forward_kernel, backward_kernel


def check_against_oracle(x, logit, grad_out, out, gx, gl, k, s, p, ceil):
    expanded = logit.expand_as(x)
    y_ref, gx_ref, gl_ref = oracle_with_grads(x, expanded, grad_out, k, s, p, ceil)
    gl_ref = gl_ref.sum_to_size(logit.shape)
    fwd_tol, grad_tol = TOLERANCE[x.dtype]
    assert out.dtype == x.dtype and gx.dtype == x.dtype and gl.dtype == logit.dtype
    assert gl.shape == logit.shape
    # grad_logit uses the output as stored (x's dtype): its rounding moves
    # g * p * (x - y) by up to |g| |y| eps, whatever the size of grad_logit
    gl_scale = max(gl_ref.abs().max().item(), grad_out.abs().max().item() * x.abs().max().item())
    for got, want, tol, scale in ((out, y_ref, fwd_tol, y_ref.abs().max().item()),
                                  (gx, gx_ref, grad_tol, gx_ref.abs().max().item()),
                                  (gl, gl_ref, grad_tol, gl_scale)):
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * scale)


CASES = [
    # (geometry, layout, variant, force_int64)
    (g, layout, variant, force)
    for g in FAST_GEOMETRIES
    for layout in ("contiguous", "channels_last")
    for variant, force in (("generic", False), ("generic", True), ("fast", False))
]


def case_id(c):
    backend, ((k, s, p), layout, variant, force) = c
    return f"{backend}-k{k}s{s}p{p}-{layout}-{variant}{'-int64' if force else ''}"


@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("backend_case", [(b, c) for b in BACKENDS for c in CASES if not (b == "cuda" and c[3])],
                         ids=case_id)
def test_emulated_kernels_match_oracle(backend_case, pair, seed):
    backend, case = backend_case
    (k, s, p), layout, variant, force_int64 = case
    rng = random.Random(seed)
    ceil = rng.random() < 0.5
    # odd sizes; channels a multiple of the vector width, so fast runs
    c = 2 * VECTOR[pair[0]]
    shape = (2, c, rng.randint(5, 12), rng.randint(5, 12))
    x, logit = make_case(shape, pair, layout)
    out_shape = torch.nn.functional.avg_pool2d(x.double(), k, s, p, ceil_mode=ceil).shape
    grad_out = torch.randn(out_shape, dtype=torch.float64).to(pair[0])
    out, gx, gl, fk, bk = run_emulated(x, logit, grad_out, k, s, p, ceil, variant, force_int64, backend)
    if variant == "fast":
        expected = "fast_channels_last" if layout == "channels_last" else "fast_planes"
    else:
        expected = "generic_int64" if force_int64 else "generic_int32"
    assert (fk, bk) == (expected, expected)
    check_against_oracle(x, logit, grad_out, out, gx, gl, k, s, p, ceil)


@pytest.mark.parametrize("pair", [DTYPE_PAIRS[0], DTYPE_PAIRS[3], DTYPE_PAIRS[5]], ids=pair_id)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("logit_n,logit_c", [(1, 1), (2, 1), (1, 16)])
@pytest.mark.parametrize("variant", ["generic", "fast"])
def test_emulated_shared_logits(variant, logit_n, logit_c, layout, pair, backend, seed):
    """A logit shared across the batch and/or the channels is read in place
    (stride 0 in the kernels) and its gradient is reduced to its shape."""
    shape = (2, 16, 9, 10)
    x, logit = make_case(shape, pair, layout, logit_shape=(logit_n, logit_c, 9, 10))
    grad_out = torch.randn(2, 16, 5, 5, dtype=torch.float64).to(pair[0])
    out, gx, gl, fk, _ = run_emulated(x, logit, grad_out, 3, 2, 1, False, variant, False, backend)
    assert fk.startswith(variant)
    check_against_oracle(x, logit, grad_out, out, gx, gl, 3, 2, 1, False)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("variant", ["generic", "fast"])
def test_emulated_generic_geometries(variant, layout, backend, seed):
    """Geometries without a fast kernel fall back to generic under 'fast'."""
    rng = random.Random(seed)
    for _ in range(6):
        k = (rng.randint(1, 5), rng.randint(1, 5))
        s = (rng.randint(1, 3), rng.randint(1, 3))
        p = (rng.randint(0, k[0] // 2), rng.randint(0, k[1] // 2))
        if (k[0], s[0], p[0]) == (k[1], s[1], p[1]) and (k[0], s[0], p[0]) in FAST_GEOMETRIES:
            continue
        ceil = rng.random() < 0.5
        shape = (2, 5, rng.randint(max(k[0], 3), 11), rng.randint(max(k[1], 3), 11))
        x, logit = make_case(shape, DTYPE_PAIRS[0], layout)
        out_shape = torch.nn.functional.avg_pool2d(x, k, s, p, ceil_mode=ceil).shape
        grad_out = torch.randn(out_shape)
        out, gx, gl, fk, bk = run_emulated(x, logit, grad_out, k, s, p, ceil, variant, False, backend)
        assert fk == bk == "generic_int32"
        check_against_oracle(x, logit, grad_out, out, gx, gl, k, s, p, ceil)


# square geometries one argument (kernel, stride or padding) away from a
# fast kernel's
NEAR_FAST_GEOMETRIES = [(3, 1, 0), (3, 2, 0), (3, 3, 1), (2, 2, 1), (2, 1, 0), (4, 2, 1), (2, 3, 0)]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("geometry", NEAR_FAST_GEOMETRIES, ids=lambda g: "k%ds%dp%d" % g)
def test_emulated_fast_takes_only_its_geometries(geometry, layout, backend, seed):
    """Under 'fast', a geometry that matches a fast kernel's compile-time
    K, S, P in all but one of them runs generic (a fast kernel would read
    the windows of its own geometry), with the oracle's results; 8
    channels, so channels_last could take the vector kernels."""
    k, s, p = geometry
    for ceil in (False, True):
        x, logit = make_case((2, 8, 9, 10), DTYPE_PAIRS[0], layout)
        out_shape = torch.nn.functional.avg_pool2d(x, k, s, p, ceil_mode=ceil).shape
        grad_out = torch.randn(out_shape)
        out, gx, gl, fk, bk = run_emulated(x, logit, grad_out, k, s, p, ceil, "fast", False, backend)
        assert fk == bk == "generic_int32", (fk, bk)
        check_against_oracle(x, logit, grad_out, out, gx, gl, k, s, p, ceil)


@pytest.mark.parametrize("pair", [DTYPE_PAIRS[0], DTYPE_PAIRS[2]], ids=pair_id)
def test_emulated_fast_falls_back_without_vectors(pair, backend, seed):
    """channels_last fast kernels need whole 16-byte channel vectors and
    aligned pointers; otherwise generic runs, and the result is the same."""
    v = VECTOR[pair[0]]
    # channels not a multiple of the vector width
    x, logit = make_case((2, v + 1, 7, 9), pair, "channels_last")
    grad_out = torch.randn(2, v + 1, 4, 5).to(pair[0])
    out, gx, gl, fk, bk = run_emulated(x, logit, grad_out, 3, 2, 1, False, "fast", False, backend)
    assert fk == bk == "generic_int32"
    check_against_oracle(x, logit, grad_out, out, gx, gl, 3, 2, 1, False)
    # a view starting one element into its storage: misaligned
    storage = torch.randn(2 * v * 7 * 9 + 1, dtype=torch.float64).to(pair[0])
    x = storage[1:].view(2, 7, 9, v).permute(0, 3, 1, 2)
    assert x.is_contiguous(memory_format=torch.channels_last) and x.data_ptr() % 16 != 0
    logit = make_case((2, v, 7, 9), pair, "channels_last")[1]
    grad_out = torch.randn(2, v, 4, 5).to(pair[0])
    x_run = x
    if backend == "cuda":  # the same misaligned view, in device memory
        x_run = storage.cuda()[1:].view(2, 7, 9, v).permute(0, 3, 1, 2)
        assert x_run.data_ptr() % 16 != 0
    out, gx, gl, fk, _ = run_emulated(x_run, logit, grad_out, 3, 2, 1, False, "fast", False, backend)
    assert fk == "generic_int32"
    check_against_oracle(x, logit, grad_out, out, gx, gl, 3, 2, 1, False)
    if FORWARD_VECTOR[pair[0]] < v:
        # channels whole vectors for the forward (4 a thread) but not the backward (8)
        c = FORWARD_VECTOR[pair[0]]
        x, logit = make_case((2, c, 7, 9), pair, "channels_last")
        grad_out = torch.randn(2, c, 4, 5).to(pair[0])
        out, gx, gl, fk, bk = run_emulated(x, logit, grad_out, 3, 2, 1, False, "fast", False, backend)
        assert (fk, bk) == ("fast_channels_last", "generic_int32")
        check_against_oracle(x, logit, grad_out, out, gx, gl, 3, 2, 1, False)


@pytest.mark.parametrize("geometry", FAST_GEOMETRIES, ids=lambda g: "k%ds%dp%d" % g)
@pytest.mark.parametrize("ceil", [False, True])
def test_emulated_fast_planes_block_edges(geometry, ceil, backend, seed):
    """The contiguous fast backward owns S x S input blocks: odd and even
    heights and widths (a partial last block), and ceil_mode windows that
    leave inputs covered by no output, must all match the oracle; so must
    the plane kernels at each block width the host picks."""
    k, s, p = geometry
    # widths that pick 8-, 16- and 32-column blocks (up to 16 or 35 columns)
    for h, w in ((7, 9), (8, 10), (9, 6), (2, 3), (5, 33), (3, 70)):
        if h + 2 * p < k or w + 2 * p < k:
            continue
        x, logit = make_case((2, 3, h, w), DTYPE_PAIRS[0], "contiguous")
        out_shape = torch.nn.functional.avg_pool2d(x, k, s, p, ceil_mode=ceil).shape
        grad_out = torch.randn(out_shape)
        out, gx, gl, fk, bk = run_emulated(x, logit, grad_out, k, s, p, ceil, "fast", False, backend)
        assert (fk, bk) == ("fast_planes", "fast_planes")
        check_against_oracle(x, logit, grad_out, out, gx, gl, k, s, p, ceil)


@pytest.mark.parametrize("variant", ["generic", "fast"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_emulated_masking_and_spread(variant, layout, backend, seed):
    """-inf logits (masked, with inf/NaN x behind them), fully masked windows
    and logits spread over hundreds: the kernels' exact window math."""
    x, logit = make_case((2, 8, 9, 11), DTYPE_PAIRS[0], layout, logit_high=400.0)
    mask = torch.rand(x.shape) < 0.3
    mask[0, 0, :4, :4] = True  # whole windows masked
    logit = logit.masked_fill(mask, float("-inf"))
    x_masked = x.masked_fill(mask & (torch.rand(x.shape) < 0.5), float("inf"))
    x_masked = x_masked.masked_fill(mask & (torch.rand(x.shape) < 0.3), float("nan"))
    grad_out = torch.randn(2, 8, 5, 6)
    out, gx, gl, _, _ = run_emulated(x_masked, logit, grad_out, 3, 2, 1, False, variant, False, backend)
    y_ref, gx_ref, gl_ref = oracle_with_grads(x.masked_fill(mask, 0.0), logit, grad_out, 3, 2, 1)
    empty = torch.isnan(y_ref)  # windows with no unmasked logit
    assert empty.any()
    y_ref = y_ref.masked_fill(empty, 0.0)
    gx_ref, gl_ref = gx_ref.nan_to_num(0.0), gl_ref.nan_to_num(0.0)
    torch.testing.assert_close(out.double(), y_ref, rtol=2e-6, atol=2e-6)
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    torch.testing.assert_close(gx.double().masked_fill(mask, 0.0), gx_ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(gx[mask], torch.zeros_like(gx[mask]))
    assert torch.equal(gl[mask], torch.zeros_like(gl[mask]))
    torch.testing.assert_close(gl.double(), gl_ref, rtol=1e-5, atol=1e-5)
