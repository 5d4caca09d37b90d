"""A short run of every lip2d kernel, for compute-sanitizer and ncu.

Calls forward and backward of both kernel variants (LIP_CUDA_KERNELS
generic and fast) for every (x, logit) dtype pair with kernels of its own,
both layouts, a logit shared across channels, and geometries covering
kernel 1..5, stride 1..3, ceil_mode, odd sizes and channel counts that leave
a partial 16-byte vector (the fast channels_last kernels fall back there).
Each result is checked against the tests' independent float64 oracle (a
softmax over unfolded windows), so a kernel that the sanitizer lets through
but computes wrong still fails.

    python benchmarks/gpu_workload.py                 # on the GPU (under compute-sanitizer)
    python benchmarks/gpu_workload.py --device cpu    # the same calls, CUDA kernels emulated
    python benchmarks/gpu_workload.py --ncu           # one s2b-sized call per variant/dtype/layout
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import lip_cuda  # noqa: E402
from lip_oracle import oracle_with_grads  # noqa: E402

DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.float64, torch.float64),
               (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
               (torch.float16, torch.float32), (torch.bfloat16, torch.float32)]
# (kernel, stride, padding, ceil_mode, H, W, C)
GEOMETRIES = [(3, 2, 1, False, 13, 11, 16), (3, 2, 1, True, 8, 7, 12), (2, 2, 0, False, 9, 10, 16),
              (3, 1, 1, True, 7, 9, 8), (1, 1, 0, False, 5, 6, 3), (5, 3, 2, True, 13, 8, 16),
              ((4, 2), (1, 3), (2, 1), True, 11, 9, 5)]
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def emulated(x, logit, grad_out, k, s, p, ceil, variant):
    ops = torch.ops.lip_cuda
    pair = lambda v: list(v) if isinstance(v, tuple) else [v, v]  # noqa: E731
    args = (pair(k), pair(s), pair(p), ceil)
    out, wmax, inv = ops._lip2d_forward_emulated(x, logit, *args, variant, False)
    gx, gl = ops._lip2d_backward_emulated(grad_out, x, logit, out, wmax, inv, *args, variant, False)
    return out, gx, gl


def fused(x, logit, grad_out, k, s, p, ceil, variant):
    os.environ["LIP_CUDA_KERNELS"] = variant
    x, logit = x.detach().requires_grad_(), logit.detach().requires_grad_()
    out = lip_cuda.lip2d(x, logit, k, s, p, ceil)
    gx, gl = torch.autograd.grad(out, (x, logit), grad_out)
    return out, gx, gl


def check_all(device: str) -> int:
    run = fused if device == "cuda" else emulated
    calls = failures = 0
    gen = torch.Generator().manual_seed(0)
    for variant in ("generic", "fast"):
        for x_dtype, l_dtype in DTYPE_PAIRS:
            for layout in ("contiguous", "channels_last"):
                for k, s, p, ceil, h, w, c in GEOMETRIES:
                    for shared in (False, True):
                        x64 = torch.randn(2, c, h, w, generator=gen, dtype=torch.float64)
                        l64 = torch.rand(2, 1 if shared else c, h, w, generator=gen, dtype=torch.float64) * 12
                        out_shape = torch.nn.functional.avg_pool2d(x64, k, s, p, ceil_mode=ceil).shape
                        g64 = torch.randn(out_shape, generator=gen, dtype=torch.float64)
                        # the oracle on the values the kernels actually see
                        xr, lr, gr = (t.to(d).double() for t, d in ((x64, x_dtype), (l64, l_dtype), (g64, x_dtype)))
                        ref, gx64, gl64 = oracle_with_grads(xr, lr.expand_as(xr), gr, k, s, p, ceil)
                        gl64 = gl64.sum_to_size(l64.shape)
                        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
                        x = x64.to(x_dtype).contiguous(memory_format=fmt).to(device)
                        logit = l64.to(l_dtype).contiguous(memory_format=fmt).to(device)
                        out, gx, gl = run(x, logit, g64.to(x_dtype).to(device), k, s, p, ceil, variant)
                        calls += 1
                        tol = TOL[x_dtype]
                        for got, want in ((out, ref), (gx, gx64), (gl, gl64)):
                            err = (got.detach().double().cpu() - want.detach()).abs().max().item()
                            if not err <= tol * max(1.0, want.abs().max().item()):
                                failures += 1
                                print(f"MISMATCH {variant} {x_dtype}/{l_dtype} {layout} k{k} s{s} p{p} "
                                      f"ceil={ceil} {h}x{w} C{c} shared={shared}: max error {err:.3g}")
                                break
    print(f"gpu_workload: {calls} forward+backward calls on {device}, {failures} mismatches")
    return 1 if failures else 0


def ncu_calls() -> int:
    """One forward+backward at the s2b layer (batch 64) per variant, dtype, layout."""
    for variant in ("generic", "fast"):
        for dtype in (torch.float32, torch.bfloat16):
            for fmt in (torch.contiguous_format, torch.channels_last):
                x = torch.randn(64, 256, 56, 56, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
                logit = (12 * torch.sigmoid(torch.randn_like(x))).contiguous(memory_format=fmt)
                fused(x, logit, torch.randn(64, 256, 28, 28, device="cuda", dtype=dtype), 3, 2, 1, False, variant)
    torch.cuda.synchronize()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ncu", action="store_true", help="the s2b-sized calls for an ncu profile")
    args = ap.parse_args()
    if args.ncu:
        return ncu_calls()
    return check_all(args.device)


if __name__ == "__main__":
    sys.exit(main())
