"""Kernel benchmark: fused LIP (``lip_cuda.lip2d``) against the pure-PyTorch reference.

Times three implementations of LIP pooling (k=3, s=2, p=1) on the seven
LIP layers of LIP-ResNet-50:

* ``fused``     - ``lip_cuda.lip2d`` (the extension's kernels),
* ``reference`` - ``lip_cuda.lip2d_reference``:
  ``avg_pool2d(x * exp(l)) / avg_pool2d(exp(l))`` in eager PyTorch,
* ``compiled``  - ``torch.compile(lip2d_reference)`` (on the GPU by default,
  ``--no-compile`` skips it; on the CPU only with ``--compile``, since
  compiling there takes tens of seconds per case). Each case gets a fresh
  ``torch.compile(..., dynamic=False)`` after ``torch._dynamo.reset()``, with
  ``torch._functorch.config.donated_buffer = False`` so that its backward can
  run with ``retain_graph=True`` (donation only saves memory in backward).

It runs on the GPU when one is visible and on the CPU otherwise, and prints
one table: forward, backward and forward+backward medians, the fused
kernel's speedup over each baseline, achieved bandwidth (GPU) and the
extra peak memory of forward+backward (GPU).

Shapes (per image C x H x W; batch 64 on the GPU, 2 on the CPU):

    stem 64x112x112   s2a 128x56x56   s2b 256x56x56   s3a 256x28x28
    s3b 512x28x28     s4a 512x14x14   s4b 1024x14x14
    large 32x256x256  (GPU default only: 512 MiB per fp32 input at batch 64)

Inputs: ``x = randn``, ``logit = 12 * sigmoid(randn)`` (the paper's gate
range [0, 12]; float16 reference overflows there: exp(12) = 162754 > 65504,
and the table marks such outputs ``NaN/inf``).

Method:

* Several input sets (x, logit, upstream grad) per case, each freshly drawn,
  whose total exceeds the cache (2 x L2 on the GPU, 64 MiB on the CPU);
  timed calls rotate through them so small shapes are not served from cache.
* GPU: CUDA events around every call, read after one final synchronize;
  CPU: ``time.perf_counter``. Warm-up first, then repetitions to fill a time
  budget; medians are reported.
* forward: the training forward (inputs require grad, so what backward
  needs is saved); its graph is dropped after each call.
* backward: one graph per input set is built once up front; each timed call
  is ``torch.autograd.grad(y, (x, logit), grad, retain_graph=True)``, i.e.
  autograd backward alone, returning fresh dx and dlogit (no accumulation).
* fwd+bwd: forward then ``torch.autograd.grad`` without retained graph.
* GB/s (GPU): (2.5 + 4.75) * numel * elem_size bytes / fwd+bwd time, the
  fused kernels' byte count from DESIGN.md, used for every impl so the
  figures compare like for like; %copy divides by a device-to-device copy
  bandwidth measured in the same run.
* extra MiB (GPU): ``max_memory_allocated`` during one fwd+bwd minus the
  memory allocated before it (so it includes y and the two gradients).
  Not available on the CPU; reported as n/a / null, never estimated.

Examples::

    python benchmarks/bench_lip.py
    python benchmarks/bench_lip.py --shapes stem,s4b --dtypes float16 --json out.json
    python benchmarks/bench_lip.py --compile --plot speedup.png      # CPU, with torch.compile
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

from timing import (  # noqa: E402
    CpuContention,
    Measurement,
    TimingConfig,
    cache_bytes,
    copy_bandwidth_gbps,
    device_name,
    extra_peak_bytes,
    git_commit,
    measure,
    synchronize,
)

KERNEL_SIZE, STRIDE, PADDING = 3, 2, 1

#: Per-image (C, H, W) of the LIP layers of LIP-ResNet-50, in network order.
LAYERS: dict[str, tuple[int, int, int]] = {
    "stem": (64, 112, 112),
    "s2a": (128, 56, 56),
    "s2b": (256, 56, 56),
    "s3a": (256, 28, 28),
    "s3b": (512, 28, 28),
    "s4a": (512, 14, 14),
    "s4b": (1024, 14, 14),
}
#: Bandwidth-bound shape: 64 x 32 x 256 x 256 = 2^27 elements, 512 MiB in fp32.
LARGE: dict[str, tuple[int, int, int]] = {"large": (32, 256, 256)}
#: Tiny shape for smoke tests (odd H, W to exercise the padded edge windows).
TINY: dict[str, tuple[int, int, int]] = {"tiny": (4, 9, 11)}
ALL_SHAPES = {**LAYERS, **LARGE, **TINY}

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
LAYOUTS = ("contiguous", "channels_last")
IMPLS = ("fused", "reference", "compiled")
BASELINES = ("reference", "compiled")

#: DESIGN.md byte model per input element, in units of elem_size.
FWD_BYTES_PER_ELEM = 2.5
BWD_BYTES_PER_ELEM = 4.75

DEFAULT_BATCH = {"cuda": 64, "cpu": 2}
MAX_INPUT_SETS = 32
NAN_MARK = "NaN/inf"
#: CPU runs during which other processes used at least this share of all CPUs get a warning.
BUSY_FRACTION = 0.05

LipFn = Callable[..., torch.Tensor]


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Case:
    """One benchmarked configuration: a layer's shape, a dtype and a memory layout."""

    layer: str
    shape: tuple[int, int, int, int]
    dtype: str
    layout: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def elem_size(self) -> int:
        return torch.empty((), dtype=DTYPES[self.dtype]).element_size()

    def label(self) -> str:
        return f"{self.layer} {shape_str(self.shape)} {self.dtype} {self.layout}"


@dataclass
class Record:
    """One JSON result row: a case timed with one implementation."""

    layer: str
    shape: list[int]
    dtype: str
    layout: str
    impl: str
    forward_ms: Optional[float] = None
    backward_ms: Optional[float] = None
    fwd_bwd_ms: Optional[float] = None
    fwd_bwd_gbps: Optional[float] = None
    copy_fraction: Optional[float] = None
    extra_peak_bytes: Optional[int] = None
    finite: Optional[bool] = None
    nonfinite_output_fraction: Optional[float] = None
    input_sets: int = 0
    reps: dict[str, int] = field(default_factory=dict)
    p20_p80_ms: dict[str, list[float]] = field(default_factory=dict)
    error: Optional[str] = None


@dataclass
class InputSet:
    """Inputs for one call: x and logit (leaves requiring grad) and the upstream grad."""

    x: torch.Tensor
    logit: torch.Tensor
    grad: torch.Tensor


# --------------------------------------------------------------------------- CLI


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line options (see the module docstring for the method)."""
    p = argparse.ArgumentParser(
        description="Benchmark fused LIP pooling (lip_cuda.lip2d) against the PyTorch "
        "reference and torch.compile(reference), on the GPU if visible, else the CPU.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="shapes (per image C x H x W; 'tiny' is a smoke-test shape):\n  "
        + ", ".join(f"{k}={c}x{h}x{w}" for k, (c, h, w) in LAYERS.items())
        + "\n  " + ", ".join(f"{k}={c}x{h}x{w}" for k, (c, h, w) in LARGE.items())
        + "\n  default: all LIP-ResNet-50 layers, plus 'large' on the GPU\n"
        "method (details in this file's docstring):\n"
        "  medians of CUDA-event (GPU) or perf_counter (CPU) per-call times after warm-up;\n"
        "  calls rotate over fresh random input sets larger than the cache;\n"
        "  backward = autograd.grad(retain_graph=True) on graphs built before timing;\n"
        "  GB/s = (2.5 + 4.75) * numel * elem_size / fwd+bwd time, for every impl (GPU only)",
    )
    p.add_argument("--shapes", type=str, default=None,
                   help="comma list of shape names (default: the 7 layers, + large on GPU)")
    p.add_argument("--batch", type=int, default=None,
                   help="batch size for every shape (default: 64 on GPU, 2 on CPU)")
    p.add_argument("--dtypes", type=str, default="float32,bfloat16,float16",
                   help="comma list of float32, bfloat16, float16 (aliases fp32, bf16, fp16)")
    p.add_argument("--layouts", type=str, default=",".join(LAYOUTS),
                   help="comma list of contiguous, channels_last")
    p.add_argument("--impls", type=str, default="fused,reference",
                   help="comma list of fused, reference (compiled is added by --compile)")
    compile_group = p.add_mutually_exclusive_group()
    compile_group.add_argument("--compile", dest="compile", action="store_true", default=None,
                               help="also time torch.compile(lip2d_reference) (default on GPU)")
    compile_group.add_argument("--no-compile", dest="compile", action="store_false",
                               help="skip torch.compile (default on CPU: compiling is slow there)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="where to run (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before each measurement")
    p.add_argument("--min-reps", type=int, default=None, help="minimum timed calls per measurement")
    p.add_argument("--max-reps", type=int, default=None, help="maximum timed calls per measurement")
    p.add_argument("--budget-ms", type=float, default=None,
                   help="time budget per measurement; reps = budget / estimated call time")
    p.add_argument("--rotate-mib", type=float, default=None,
                   help="total MiB of input sets to rotate through (default: 2 x L2 on GPU, 64 on CPU)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write results as JSON")
    p.add_argument("--plot", type=Path, default=None, metavar="PATH",
                   help="write a PNG of fused speedups (needs matplotlib; skipped if absent)")
    return p.parse_args(argv)


def split_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def choose_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU visible")
    return torch.device(name)


def choose_shapes(arg: Optional[str], device: torch.device) -> list[str]:
    if arg is None:
        return list(LAYERS) + (list(LARGE) if device.type == "cuda" else [])
    names = split_list(arg)
    unknown = [n for n in names if n not in ALL_SHAPES]
    if unknown:
        raise SystemExit(f"--shapes: unknown {unknown}; choose from {list(ALL_SHAPES)}")
    return names


def choose_dtypes(arg: str) -> list[str]:
    names = [DTYPE_ALIASES.get(n, n) for n in split_list(arg)]
    unknown = [n for n in names if n not in DTYPES]
    if unknown:
        raise SystemExit(f"--dtypes: unknown {unknown}; choose from {list(DTYPES)}")
    return names


def choose_layouts(arg: str) -> list[str]:
    names = split_list(arg)
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        raise SystemExit(f"--layouts: unknown {unknown}; choose from {list(LAYOUTS)}")
    return names


def choose_impls(arg: str, compile_flag: Optional[bool], device: torch.device) -> list[str]:
    names = split_list(arg)
    unknown = [n for n in names if n not in IMPLS]
    if unknown:
        raise SystemExit(f"--impls: unknown {unknown}; choose from {list(IMPLS)}")
    want_compile = (device.type == "cuda") if compile_flag is None else compile_flag
    if want_compile and "compiled" not in names:
        names.append("compiled")
    if compile_flag is False and "compiled" in names:
        names.remove("compiled")
    return [n for n in IMPLS if n in names]


def timing_config(args: argparse.Namespace, device: torch.device) -> TimingConfig:
    base = TimingConfig.default_for(device)
    return TimingConfig(
        warmup=base.warmup if args.warmup is None else args.warmup,
        min_reps=base.min_reps if args.min_reps is None else args.min_reps,
        max_reps=base.max_reps if args.max_reps is None else args.max_reps,
        budget_ms=base.budget_ms if args.budget_ms is None else args.budget_ms,
    )


def build_cases(shapes: list[str], batch: int, dtypes: list[str], layouts: list[str]) -> list[Case]:
    return [
        Case(name, (batch, *ALL_SHAPES[name]), dt, lay)
        for name in shapes for dt in dtypes for lay in layouts
    ]


def import_lip_cuda() -> Any:
    """Import the installed lip_cuda, else the in-tree (built in place) package."""
    try:
        import lip_cuda
    except ImportError:
        sys.path.insert(1, str(REPO_ROOT))
        import lip_cuda
    return lip_cuda


# --------------------------------------------------------------------------- inputs


def output_hw(h: int, w: int) -> tuple[int, int]:
    """avg_pool2d output size for k=3, s=2, p=1, ceil_mode=False."""
    return tuple((n + 2 * PADDING - KERNEL_SIZE) // STRIDE + 1 for n in (h, w))  # type: ignore[return-value]


def to_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return t.contiguous(memory_format=fmt)


def make_input_set(case: Case, device: torch.device) -> InputSet:
    """Fresh random inputs: x ~ randn, logit = 12 * sigmoid(randn), grad ~ randn."""
    n, c, h, w = case.shape
    dtype = DTYPES[case.dtype]

    def draw(shape: tuple[int, ...], fn: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> torch.Tensor:
        t = fn(torch.randn(shape, device=device, dtype=torch.float32)).to(dtype)
        return to_layout(t, case.layout)

    x = draw(case.shape).requires_grad_()
    logit = draw(case.shape, lambda t: 12 * torch.sigmoid(t)).requires_grad_()
    grad = draw((n, c, *output_hw(h, w)))
    return InputSet(x, logit, grad)


def input_set_bytes(case: Case) -> int:
    n, c, h, w = case.shape
    oh, ow = output_hw(h, w)
    return (2 * case.numel + n * c * oh * ow) * case.elem_size


def count_input_sets(case: Case, rotate_bytes: int) -> int:
    """Enough sets to exceed ``rotate_bytes`` in total (at least 2, at most MAX_INPUT_SETS)."""
    return max(2, min(MAX_INPUT_SETS, math.ceil(rotate_bytes / input_set_bytes(case))))


# --------------------------------------------------------------------------- implementations


def make_impl(name: str, lip_cuda: Any) -> LipFn:
    """The callable for ``name``; 'compiled' gets a fresh torch.compile per case."""
    if name == "fused":
        return lip_cuda.lip2d
    if name == "reference":
        return lip_cuda.lip2d_reference
    # Fresh dynamo state per case: static shapes, and no recompile-limit fallback to eager
    # after many (shape, dtype, layout) variants of the same function.
    torch._dynamo.reset()
    # The backward timing calls backward with retain_graph=True, which a compiled backward
    # refuses when it was compiled to donate (reuse) its saved buffers. Donation only saves
    # memory inside backward; turning it off may raise compiled's extra peak memory a little.
    if hasattr(torch._functorch.config, "donated_buffer"):
        torch._functorch.config.donated_buffer = False
    return torch.compile(lip_cuda.lip2d_reference, dynamic=False)


def forward(fn: LipFn, s: InputSet) -> torch.Tensor:
    return fn(s.x, s.logit, KERNEL_SIZE, STRIDE, PADDING, False)


def forward_backward(fn: LipFn, s: InputSet) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y = forward(fn, s)
    dx, dlogit = torch.autograd.grad(y, (s.x, s.logit), s.grad)
    return y, dx, dlogit


def backward_only(y: torch.Tensor, s: InputSet) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(y, (s.x, s.logit), s.grad, retain_graph=True)


# --------------------------------------------------------------------------- measuring


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def nonfinite_fraction(t: torch.Tensor) -> float:
    return float((~torch.isfinite(t)).float().mean())


def time_forward(fn: LipFn, sets: list[InputSet], device: torch.device, cfg: TimingConfig) -> Measurement:
    return measure([lambda s=s: forward(fn, s) for s in sets], device, cfg)


def time_forward_backward(fn: LipFn, sets: list[InputSet], device: torch.device, cfg: TimingConfig) -> Measurement:
    return measure([lambda s=s: forward_backward(fn, s) for s in sets], device, cfg)


def time_backward(fn: LipFn, sets: list[InputSet], device: torch.device, cfg: TimingConfig) -> Measurement:
    """Backward alone: one retained graph per input set, built before timing."""
    outputs = [forward(fn, s) for s in sets]
    synchronize(device)
    result = measure([lambda y=y, s=s: backward_only(y, s) for y, s in zip(outputs, sets)], device, cfg)
    del outputs
    return result


def gbps(case: Case, ms: Optional[float]) -> Optional[float]:
    """DESIGN.md byte model (fused fwd 2.5 + bwd 4.75 N b) over the measured fwd+bwd time."""
    if ms is None or ms <= 0:
        return None
    return (FWD_BYTES_PER_ELEM + BWD_BYTES_PER_ELEM) * case.numel * case.elem_size / (ms * 1e-3) / 1e9


def measure_impl(case: Case, impl: str, fn: LipFn, sets: list[InputSet], device: torch.device,
                 cfg: TimingConfig, copy_gbps: Optional[float]) -> Record:
    """Time one implementation on one case; errors are recorded, not raised."""
    rec = Record(case.layer, list(case.shape), case.dtype, case.layout, impl, input_sets=len(sets))
    try:
        forward_backward(fn, sets[0])  # prime: compile, autotune, lazy init
        peak, (y, dx, dlogit) = extra_peak_bytes(lambda: forward_backward(fn, sets[0]), device)
        rec.extra_peak_bytes = peak
        rec.finite = all_finite((y, dx, dlogit))
        rec.nonfinite_output_fraction = nonfinite_fraction(y)
        del y, dx, dlogit
        fwd = time_forward(fn, sets, device, cfg)
        fb = time_forward_backward(fn, sets, device, cfg)
        bwd = time_backward(fn, sets, device, cfg)
    except Exception as exc:  # keep a long GPU run going; the error is shown and recorded
        rec.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        print(f"    ERROR {case.label()} {impl}: {rec.error}", file=sys.stderr, flush=True)
        return rec
    rec.forward_ms, rec.backward_ms, rec.fwd_bwd_ms = fwd.median_ms, bwd.median_ms, fb.median_ms
    passes = {"forward": fwd, "backward": bwd, "fwd_bwd": fb}
    rec.reps = {k: m.reps for k, m in passes.items()}
    rec.p20_p80_ms = {k: [m.p20_ms, m.p80_ms] for k, m in passes.items()}
    if device.type == "cuda":
        rec.fwd_bwd_gbps = gbps(case, fb.median_ms)
        if copy_gbps and rec.fwd_bwd_gbps is not None:
            rec.copy_fraction = rec.fwd_bwd_gbps / copy_gbps
    return rec


def run_case(case: Case, impls: list[str], lip_cuda: Any, device: torch.device, cfg: TimingConfig,
             rotate_bytes: int, copy_gbps: Optional[float], seed: int) -> list[Record]:
    """All implementations on one case, on the same input sets."""
    torch.manual_seed(seed)
    sets = [make_input_set(case, device) for _ in range(count_input_sets(case, rotate_bytes))]
    records = [measure_impl(case, name, make_impl(name, lip_cuda), sets, device, cfg, copy_gbps)
               for name in impls]
    del sets
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return records


def progress_line(i: int, total: int, case: Case, records: list[Record], seconds: float) -> str:
    parts = []
    for r in records:
        t = "ERROR" if r.error else f"{r.fwd_bwd_ms:.3f} ms"
        mark = f" {NAN_MARK}" if r.finite is False else ""
        parts.append(f"{r.impl} {t}{mark}")
    return (f"[{i:>{len(str(total))}}/{total}] {case.label()} ({records[0].input_sets} input sets): "
            f"fwd+bwd {', '.join(parts)}  ({seconds:.1f} s)")


# --------------------------------------------------------------------------- speedups


def speedups(records: list[Record]) -> list[dict[str, Any]]:
    """Fused speedup (baseline time / fused time) per case and baseline."""
    by_case: dict[tuple, dict[str, Record]] = {}
    for r in records:
        by_case.setdefault((r.layer, tuple(r.shape), r.dtype, r.layout), {})[r.impl] = r
    out = []
    for (layer, shape, dtype, layout), impls in by_case.items():
        fused = impls.get("fused")
        for base in BASELINES:
            b = impls.get(base)
            if fused is None or b is None or fused.error or b.error:
                continue
            out.append({
                "layer": layer, "shape": list(shape), "dtype": dtype, "layout": layout, "baseline": base,
                "forward": ratio(b.forward_ms, fused.forward_ms),
                "backward": ratio(b.backward_ms, fused.backward_ms),
                "fwd_bwd": ratio(b.fwd_bwd_ms, fused.fwd_bwd_ms),
            })
    return out


def ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    return None if num is None or not den else num / den


def geomean(values: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


# --------------------------------------------------------------------------- report


def shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


def fmt(value: Optional[float], spec: str, missing: str) -> str:
    return missing if value is None else format(value, spec)


TABLE_COLUMNS = ("layer", "shape", "dtype", "layout", "impl", "fwd ms", "bwd ms", "f+b ms", "+-%",
                 "GB/s", "%copy", "extra MiB", "output", "spd fwd", "spd bwd", "spd f+b")


def table_rows(records: list[Record], device: torch.device) -> list[list[str]]:
    na = "n/a"  # CPU: no bandwidth model / allocator stats (explained in the footer)
    spd = {(s["layer"], tuple(s["shape"]), s["dtype"], s["layout"], s["baseline"]): s
           for s in speedups(records)}
    rows = []
    for r in records:
        s = spd.get((r.layer, tuple(r.shape), r.dtype, r.layout, r.impl))
        err = "ERROR" if r.error else "-"
        gpu_only = device.type == "cuda"
        rows.append([
            r.layer, shape_str(r.shape), r.dtype, r.layout, r.impl,
            fmt(r.forward_ms, ".3f", err), fmt(r.backward_ms, ".3f", err), fmt(r.fwd_bwd_ms, ".3f", err),
            fmt(spread_percent(r, "fwd_bwd"), ".0f", "-"),
            fmt(r.fwd_bwd_gbps, ".0f", "-") if gpu_only else na,
            fmt(None if r.copy_fraction is None else 100 * r.copy_fraction, ".0f", "-") if gpu_only else na,
            fmt(None if r.extra_peak_bytes is None else r.extra_peak_bytes / 2**20, ".1f", "-")
            if gpu_only else na,
            "ERROR" if r.error else ("ok" if r.finite else NAN_MARK),
            *(speedup_cell(s, k) for k in ("forward", "backward", "fwd_bwd")),
        ])
    return rows


def spread_percent(r: Record, key: str) -> Optional[float]:
    """Half the 20-80 percentile range of a pass, in percent of its median."""
    median = getattr(r, f"{key}_ms")
    if key not in r.p20_p80_ms or not median:
        return None
    p20, p80 = r.p20_p80_ms[key]
    return 100 * (p80 - p20) / (2 * median)


def speedup_cell(s: Optional[dict[str, Any]], key: str) -> str:
    """'2.31x' on baseline rows; blank on fused rows (s is None)."""
    if s is None:
        return ""
    return fmt(s[key], ".2f", "-") + ("x" if s[key] is not None else "")


def render_table(header: Sequence[str], rows: list[list[str]], separate_on: int = 0) -> str:
    """Fixed-width table; text columns left-aligned, numbers right-aligned; a rule between groups."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    numeric = [i >= 5 for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    prev = None
    for r in rows:
        if prev is not None and r[separate_on] != prev:
            out.append("")
        prev = r[separate_on]
        out.append(line(r))
    return "\n".join(out)


def summary_lines(records: list[Record]) -> list[str]:
    """Per baseline, dtype and layout: geomean, min and max fused fwd+bwd speedup, and how often fused is slower."""
    lines = []
    spd = [s for s in speedups(records) if s["fwd_bwd"] is not None]
    for base in BASELINES:
        for dtype in DTYPES:
            for layout in LAYOUTS:
                vals = [s for s in spd if (s["baseline"], s["dtype"], s["layout"]) == (base, dtype, layout)]
                if vals:
                    lines.append(summary_line(base, dtype, layout, vals))
    return lines


def summary_line(base: str, dtype: str, layout: str, vals: list[dict[str, Any]]) -> str:
    lo = min(vals, key=lambda s: s["fwd_bwd"])
    hi = max(vals, key=lambda s: s["fwd_bwd"])
    slower = sum(s["fwd_bwd"] < 1.0 for s in vals)
    return (f"fused vs {base:<9} {dtype:<8} {layout:<13}: fwd+bwd speedup geomean "
            f"{geomean([s['fwd_bwd'] for s in vals]):.2f}x, min {lo['fwd_bwd']:.2f}x ({lo['layer']}), "
            f"max {hi['fwd_bwd']:.2f}x ({hi['layer']}); fused slower in {slower}/{len(vals)}")


def contention_lines(meta: dict[str, Any]) -> list[str]:
    """How much other processes used the CPUs during the run, with a warning when it matters."""
    c = meta.get("cpu_contention") or {}
    lines = []
    if c.get("other_cpu_s") is not None:
        lines.append(f"other processes during the run: {c['other_cpu_s']:.1f} CPU-s over {c['wall_s']:.1f} s wall "
                     f"on {os.cpu_count()} CPUs ({100 * c['other_cpu_fraction']:.0f}% of the machine), "
                     f"steal {c['steal_s']:.1f} s")
    if (c.get("other_cpu_fraction") or 0) >= BUSY_FRACTION:
        lines.append("WARNING: other processes competed for the CPUs during the run: "
                     "these CPU timings are unreliable.")
    return lines


def report_text(meta: dict[str, Any], records: list[Record], device: torch.device) -> str:
    head = [
        f"LIP pooling benchmark (k={KERNEL_SIZE}, s={STRIDE}, p={PADDING}; x ~ randn, logit = 12*sigmoid(randn))",
        f"device: {meta['device']} ({device.type}) | torch {meta['torch']} | cuda {meta['cuda']} | "
        f"threads {meta['num_threads']} | load avg {fmt(meta['load_avg_1min_at_start'], '.2f', 'n/a')} "
        f"| commit {meta['commit']}",
        f"timing: {meta['timing']}",
        "copy bandwidth: " + (f"{meta['copy_gbps']:.0f} GB/s (device-to-device copy_, 2 x bytes)"
                              if meta["copy_gbps"] else "n/a on CPU (not measured)"),
        "",
    ]
    if device.type == "cpu":
        head[-1:-1] = contention_lines(meta)
    foot = [
        "",
        "ms: medians; +-% = half the 20-80 percentile range of fwd+bwd times, relative to the median. "
        "spd = this impl's time / fused time (>1: fused faster), on baseline rows.",
        f"output: ok = forward output and both gradients finite; {NAN_MARK} = some are NaN or inf "
        "(float16 reference: exp(12) = 162754 > 65504 overflows).",
    ]
    if device.type == "cuda":
        foot.append(f"GB/s = {FWD_BYTES_PER_ELEM + BWD_BYTES_PER_ELEM} * numel * elem_size / fwd+bwd time "
                    "(fused byte model, same for every impl); %copy = GB/s / copy bandwidth; "
                    "extra MiB = peak allocated during one fwd+bwd beyond memory allocated before it "
                    "(includes y, dx, dlogit).")
    else:
        foot.append("GB/s, %copy, extra MiB: n/a on CPU (bandwidth model and allocator peak stats are "
                    "GPU-only; JSON has null, nothing is estimated).")
    errors = [r for r in records if r.error]
    foot += [f"ERROR {r.layer} {r.dtype} {r.layout} {r.impl}: {r.error}" for r in errors]
    summary = summary_lines(records)
    body = render_table(TABLE_COLUMNS, table_rows(records, device))
    return "\n".join(head + [body] + foot + ([""] + summary if summary else []))


def metadata(device: torch.device, copy_gbps: Optional[float], cfg: TimingConfig, batch: int,
             rotate_bytes: int) -> dict[str, Any]:
    clock = "CUDA events per call" if device.type == "cuda" else "time.perf_counter wall-clock per call"
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "commit": git_commit(REPO_ROOT),
        "copy_gbps": copy_gbps,
        "num_threads": torch.get_num_threads(),
        "load_avg_1min_at_start": load_average(),
        "batch": batch,
        "kernel_size": KERNEL_SIZE, "stride": STRIDE, "padding": PADDING,
        "bytes_per_elem_model": {"forward": FWD_BYTES_PER_ELEM, "backward": BWD_BYTES_PER_ELEM},
        "timing": (f"{clock}, median of {cfg.min_reps}-{cfg.max_reps} reps filling {cfg.budget_ms:g} ms "
                   f"after {cfg.warmup} warm-up; inputs rotate over >= {rotate_bytes / 2**20:.0f} MiB of sets; "
                   "backward = autograd.grad with retain_graph=True on graphs built once"),
    }


def load_average() -> Optional[float]:
    """1-minute load average (other processes skew CPU timings), or None where unavailable."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def write_json(path: Path, meta: dict[str, Any], records: list[Record]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {**meta, "results": [asdict(r) for r in records], "speedups": speedups(records)}
    path.write_text(json.dumps(doc, indent=2) + "\n")


def write_plot(path: Path, records: list[Record]) -> None:
    """Bar chart of fused fwd+bwd speedup per layer and dtype (one panel per baseline x layout)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--plot: matplotlib is not installed; skipped {path}", flush=True)
        return
    spd = [s for s in speedups(records) if s["fwd_bwd"] is not None]
    if not spd:
        print("--plot: no speedups to plot", flush=True)
        return
    bases = [b for b in BASELINES if any(s["baseline"] == b for s in spd)]
    layouts = [l for l in LAYOUTS if any(s["layout"] == l for s in spd)]
    layers = list(dict.fromkeys(s["layer"] for s in spd))
    dtypes = [d for d in DTYPES if any(s["dtype"] == d for s in spd)]
    fig, axes = plt.subplots(len(bases), len(layouts), squeeze=False,
                             figsize=(max(6, 1.1 * len(layers)) * len(layouts), 3.5 * len(bases)))
    width = 0.8 / len(dtypes)
    for i, base in enumerate(bases):
        for j, layout in enumerate(layouts):
            ax = axes[i][j]
            for k, dtype in enumerate(dtypes):
                vals = {s["layer"]: s["fwd_bwd"] for s in spd
                        if s["baseline"] == base and s["layout"] == layout and s["dtype"] == dtype}
                xs = [n + (k - (len(dtypes) - 1) / 2) * width for n in range(len(layers))]
                ax.bar(xs, [vals.get(layer, 0.0) for layer in layers], width, label=dtype)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xticks(range(len(layers)), layers)
            ax.set_ylabel("speedup (x)")
            ax.set_title(f"fused vs {base}, fwd+bwd, {layout}")
            ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}", flush=True)


# --------------------------------------------------------------------------- main


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    device = choose_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = choose_shapes(args.shapes, device)
    dtypes, layouts = choose_dtypes(args.dtypes), choose_layouts(args.layouts)
    impls = choose_impls(args.impls, args.compile, device)
    batch = args.batch or DEFAULT_BATCH[device.type]
    cfg = timing_config(args, device)
    rotate_bytes = int(args.rotate_mib * 2**20) if args.rotate_mib else cache_bytes(device)
    lip_cuda = import_lip_cuda()

    copy_gbps = copy_bandwidth_gbps(device)
    meta = metadata(device, copy_gbps, cfg, batch, rotate_bytes)
    cases = build_cases(shapes, batch, dtypes, layouts)
    print(f"{len(cases)} cases x {impls} on {meta['device']} ({device.type}, "
          f"{meta['num_threads']} threads)", file=sys.stderr, flush=True)

    contention = CpuContention()
    records: list[Record] = []
    for i, case in enumerate(cases, 1):
        t0 = time.perf_counter()
        recs = run_case(case, impls, lip_cuda, device, cfg, rotate_bytes, copy_gbps, args.seed + i)
        records += recs
        print(progress_line(i, len(cases), case, recs, time.perf_counter() - t0), file=sys.stderr, flush=True)

    meta["cpu_contention"] = contention.report()
    print(report_text(meta, records, device), flush=True)
    if args.json:
        write_json(args.json, meta, records)
        print(f"wrote {args.json}", flush=True)
    if args.plot:
        write_plot(args.plot, records)
    return 1 if any(r.error for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
