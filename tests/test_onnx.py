"""ONNX export of lip2d (lip_cuda/onnx.py): export, run in ONNX Runtime, compare with lip2d.

Needs the ``onnx`` extra (onnx, onnxscript, onnxruntime); CI installs it.
Export runs on the CPU (the translation is device-independent).
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import lip_cuda  # noqa: E402
import lip_cuda.onnx as lip_onnx  # noqa: E402
from lip_cuda.nn import SimplifiedLIP  # noqa: E402

STANDARD_DOMAINS = {"", "ai.onnx"}


class Pool(torch.nn.Module):
    def __init__(self, *pool_args) -> None:
        super().__init__()
        self.pool_args = pool_args

    def forward(self, x: torch.Tensor, logit: torch.Tensor) -> torch.Tensor:
        return lip_cuda.lip2d(x, logit, *self.pool_args)


class RawOp(torch.nn.Module):
    """All outputs of the operator, to check the auxiliary ones too."""

    def forward(self, x: torch.Tensor, logit: torch.Tensor):
        return torch.ops.lip_cuda.lip2d_forward(x, logit, [3, 3], [2, 2], [1, 1], True)


def assert_same_operator_outputs(got, want) -> None:
    """(out, reference, inv_weight_sum) of the exported graph and of the
    operator. The graph's reference is each window's max logit; the CPU
    operator's may be the max over a strip of windows (its tile form), with
    1 / weight sum relative to that reference. What backward uses from the
    pair, the window's log-sum-exp reference - log(inv_weight_sum), must
    agree, and so must which windows have no weight (inv 0)."""
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    weighted = want[2] > 0
    assert torch.equal(got[2] > 0, weighted)
    lse_got = (got[1].double() - got[2].double().log())[weighted]
    lse_want = (want[1].double() - want[2].double().log())[weighted]
    torch.testing.assert_close(lse_got, lse_want, rtol=1e-5, atol=1e-5)


def run_onnx(model_proto, *inputs: torch.Tensor):
    for node in model_proto.graph.node:
        assert node.domain in STANDARD_DOMAINS, f"non-standard op {node.domain}::{node.op_type}"
    assert not model_proto.functions, "the graph must not need custom functions"
    sess = ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return [torch.from_numpy(a) for a in sess.run(None, {n: t.numpy() for n, t in zip(names, inputs)})]


def float64_oracle(x: torch.Tensor, logit: torch.Tensor, k, s, p, ceil_mode) -> torch.Tensor:
    """Softmax over each window of the unpadded input, in float64 (independent of both)."""
    x, logit = x.double(), logit.double()
    pool = torch.nn.functional.max_pool2d(logit, k, s, p, ceil_mode=ceil_mode)  # output shape
    oh, ow = pool.shape[-2:]
    kh, kw = (k, k) if isinstance(k, int) else k
    sh, sw = (kh, kw) if s is None else ((s, s) if isinstance(s, int) else s)
    ph, pw = (p, p) if isinstance(p, int) else p
    out = torch.empty(*x.shape[:2], oh, ow, dtype=torch.float64)
    H, W = x.shape[-2:]
    for i in range(oh):
        for j in range(ow):
            h0, w0 = i * sh - ph, j * sw - pw
            hs, ws = slice(max(h0, 0), min(h0 + kh, H)), slice(max(w0, 0), min(w0 + kw, W))
            lw, xw = logit[..., hs, ws].flatten(2), x[..., hs, ws].flatten(2)
            out[..., i, j] = (torch.softmax(lw, -1) * xw).sum(-1)
    return out


GEOMETRIES = [  # kernel_size, stride, padding, ceil_mode, (H, W)
    (3, 2, 1, False, (9, 8)),
    (3, 2, 1, True, (10, 7)),
    (2, None, 0, False, (7, 7)),
    (5, 3, 2, True, (11, 13)),
    ((3, 2), (2, 1), (1, 0), True, (8, 6)),
    ((1, 3), (1, 2), (0, 1), False, (5, 7)),  # kW > kH: the right padding is W's own
    ((2, 3), (2, 2), (1, 1), True, (7, 8)),
]


@pytest.mark.parametrize("k,s,p,ceil_mode,hw", GEOMETRIES)
def test_export_matches_lip2d(k, s, p, ceil_mode, hw, seed) -> None:
    x = torch.randn(2, 3, *hw)
    logit = 12 * torch.sigmoid(torch.randn(2, 3, *hw))
    program = lip_onnx.export(Pool(k, s, p, ceil_mode).eval(), (x, logit))
    (y,) = run_onnx(program.model_proto, x, logit)
    want = lip_cuda.lip2d(x, logit, k, s, p, ceil_mode)
    assert y.shape == want.shape
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y.double(), float64_oracle(x, logit, k, s, p, ceil_mode), rtol=1e-5, atol=1e-6)


def test_large_logits_stay_finite(seed) -> None:
    # Logits up to 200: exp(200) overflows float32, so the paper's formula
    # gives inf/inf = NaN; windows whose logits are ~150 apart also test that
    # nothing underflows to 0/0.
    x = torch.randn(2, 4, 11, 10)
    logit = 200 * torch.rand(2, 4, 11, 10)
    logit[:, :2] -= 150 * (torch.rand(2, 2, 11, 10) > 0.5)
    assert not torch.isfinite(lip_cuda.lip2d_reference(x, logit)).all()
    program = lip_onnx.export(Pool(3, 2, 1, True).eval(), (x, logit))
    (y,) = run_onnx(program.model_proto, x, logit)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, lip_cuda.lip2d(x, logit, 3, 2, 1, True), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y.double(), float64_oracle(x, logit, 3, 2, 1, True), rtol=1e-5, atol=1e-6)


def test_masked_positions_and_huge_x_as_the_kernels(seed) -> None:
    """A -inf logit removes its position whatever its x (inf, NaN), and x
    near float32's max gives a finite mean: the graph agrees with lip2d."""
    x = torch.randn(2, 4, 11, 10)
    logit = 4 * torch.rand(2, 4, 11, 10)
    masked = torch.rand(2, 4, 11, 10) < 0.3
    logit[masked] = -float("inf")
    x[masked & (torch.rand(2, 4, 11, 10) < 0.5)] = float("inf")
    x[masked & (torch.rand(2, 4, 11, 10) < 0.3)] = float("nan")
    x[:, 2:] = torch.where(masked[:, 2:], x[:, 2:], 3e38 * torch.rand(2, 2, 11, 10).add(0.5).clamp(max=1.1))
    program = lip_onnx.export(Pool(3, 2, 1, False).eval(), (x, logit))
    (y,) = run_onnx(program.model_proto, x, logit)
    want = lip_cuda.lip2d(x, logit, 3, 2, 1, False)
    assert torch.isfinite(want).all() and torch.isfinite(y).all()
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("x_dtype,l_dtype", [(torch.float32, torch.float32), (torch.float32, torch.float64),
                                             (torch.float64, torch.float32)], ids=str)
def test_auxiliary_outputs_match_the_operator(x_dtype, l_dtype, seed) -> None:
    """Including their dtype, which is x's (float32 for float32 x whatever the logit's)."""
    x, logit = torch.randn(1, 3, 9, 10).to(x_dtype), (30 * torch.randn(1, 3, 9, 10)).to(l_dtype)
    program = lip_onnx.export(RawOp().eval(), (x, logit))
    assert_same_operator_outputs(run_onnx(program.model_proto, x, logit), RawOp()(x, logit))


@pytest.mark.parametrize("logit_shape", [(2, 1, 9, 10), (1, 3, 9, 10)], ids=str)
def test_shared_and_float32_logits(logit_shape, seed) -> None:
    """A logit shared across the channels or the batch, as the operator reads it."""
    x = torch.randn(2, 3, 9, 10)
    logit = 12 * torch.rand(logit_shape)
    program = lip_onnx.export(Pool(3, 2, 1).eval(), (x, logit))
    (y,) = run_onnx(program.model_proto, x, logit)
    torch.testing.assert_close(y, lip_cuda.lip2d(x, logit), rtol=1e-5, atol=1e-6)
    want = float64_oracle(x, logit.expand_as(x), 3, 2, 1, False)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-6)
    got = run_onnx(lip_onnx.export(RawOp().eval(), (x, logit)).model_proto, x, logit)
    assert_same_operator_outputs(got, RawOp()(x, logit))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_other_dtypes(dtype, seed) -> None:
    x = torch.randn(1, 3, 9, 9, dtype=dtype)
    logit = (12 * torch.rand(1, 3, 9, 9)).to(dtype)  # float16: the reference overflows at 12
    program = lip_onnx.export(Pool(3, 2, 1).eval(), (x, logit))
    (y,) = run_onnx(program.model_proto, x, logit)
    assert y.dtype == dtype
    tol = {"rtol": 1e-3, "atol": 1e-3} if dtype == torch.float16 else {"rtol": 1e-10, "atol": 1e-12}
    torch.testing.assert_close(y, lip_cuda.lip2d(x, logit), **tol)


# ceil_mode geometries whose output-size rule the dynamic graph computes:
# (3, 1, 1): stride + padding < kernel; (2, 2, 1): the last window of odd
# sizes starts on the right padding and is dropped.
@pytest.mark.parametrize("k,s,p", [(3, 2, 1), (3, 1, 1), (2, 2, 1)], ids=str)
def test_dynamic_shapes(k, s, p, seed) -> None:
    x, logit = torch.randn(2, 3, 12, 10), torch.randn(2, 3, 12, 10)
    n, h, w = (torch.export.Dim(name, min=2, max=64) for name in ("n", "h", "w"))
    dims = {0: n, 2: h, 3: w}
    program = lip_onnx.export(Pool(k, s, p, True).eval(), (x, logit), dynamic_shapes=({**dims}, {**dims}))
    for shape in [(2, 3, 12, 10), (3, 3, 17, 9), (4, 3, 8, 21)]:
        x, logit = torch.randn(shape), 5 * torch.randn(shape)
        (y,) = run_onnx(program.model_proto, x, logit)
        torch.testing.assert_close(y, lip_cuda.lip2d(x, logit, k, s, p, True), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(y.double(), float64_oracle(x, logit, k, s, p, True), rtol=1e-5, atol=1e-6)


def test_plain_torch_onnx_export_after_import(tmp_path: Path, seed) -> None:
    # lip_cuda.onnx registers its translation on import, so the plain call works too.
    assert lip_onnx.REGISTERED
    model = SimplifiedLIP(4).eval()
    with torch.no_grad():
        model.logit.conv.weight.normal_(0, 0.5)  # non-constant logits (the conv starts at zero)
    x = torch.randn(1, 4, 15, 14)
    path = tmp_path / "lip.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True)
    (y,) = run_onnx(onnx.load(str(path)), x)
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-5)
    assert math.isfinite(float(y.abs().sum()))


def test_translation_table_is_public() -> None:
    table = lip_onnx.custom_translation_table()
    assert table == {torch.ops.lip_cuda.lip2d_forward.default: lip_onnx.lip2d_forward_onnx}


def test_a_given_translation_of_lip2d_takes_precedence(seed) -> None:
    """export() merges its table with the caller's custom_translation_table;
    the caller's own translation of lip2d_forward is the one used."""
    from onnxscript import opset18 as op

    def doubled(x, logit, kernel_size, stride, padding, ceil_mode=False):
        out, *aux = lip_onnx.lip2d_forward_onnx(x, logit, kernel_size, stride, padding, ceil_mode)
        return (op.Add(out, out), *aux)

    x, logit = torch.randn(2, 3, 9, 8), 12 * torch.rand(2, 3, 9, 8)
    program = lip_onnx.export(Pool(3, 2, 1).eval(), (x, logit),
                              custom_translation_table={lip_onnx.LIP2D_FORWARD: doubled})
    (y,) = run_onnx(program.model_proto, x, logit)
    torch.testing.assert_close(y.double(), 2 * float64_oracle(x, logit, 3, 2, 1, False), rtol=1e-5, atol=1e-6)
