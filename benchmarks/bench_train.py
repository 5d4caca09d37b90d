#!/usr/bin/env python
"""One LIP-ResNet-50 training step: fused LIP op against the reference formula.

Both variants are the same network with the same initial weights and the
same batch; only the LIP op differs (``lip_cuda.functional.lip2d`` against
``lip_cuda.reference.lip2d_reference``, switched with
``lip_cuda.nn.set_lip_backend``). A step is ``zero_grad`` + forward +
cross-entropy + backward + SGD (momentum) step; with ``--dtype`` float16 or
bfloat16 the forward runs under ``torch.autocast`` (float16 also uses a
``GradScaler``, as AMP training would).

Reported per variant: median step time over ``--steps`` timed steps after
``--warmup`` untimed ones, images/s (batch / median), peak memory, and the
first/last loss (to show both variants actually train; a non-finite loss is
flagged, which is what the reference does in float16 once logits pass ~11).

Peak memory:

* GPU: ``torch.cuda.max_memory_allocated`` over warm-up and timed steps, both
  absolute and as the extra beyond what was allocated before the first step
  (weights + batch).
* CPU: there are no allocator statistics, so each variant runs in its own
  child process and reports its maximum resident set size
  (``resource.getrusage(...).ru_maxrss``): absolute, and the growth over the
  RSS just before the first step. RSS includes allocator slack, so treat the
  CPU figures as rough. ``--no-isolate`` runs both variants in this process;
  then the RSS of the second one is not meaningful and is reported as null.

Timing uses ``benchmarks/timing.py`` (CUDA events around every step on the
GPU, ``time.perf_counter`` on the CPU), like the kernel benchmark.

Examples::

    python benchmarks/bench_train.py                              # CPU: batch 2, 112x112
    python benchmarks/bench_train.py --dtype bfloat16 --channels-last --json out.json
    python benchmarks/bench_train.py --batch 128 --compile        # GPU
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# Benchmark the checkout this script lives in, and share timing.py's helpers.
for _p in (str(REPO), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from timing import device_name, git_commit, synchronize, time_calls_ms  # noqa: E402

from lip_cuda.models import lip_resnet50  # noqa: E402
from lip_cuda.nn import lip_logit_convs, set_lip_backend  # noqa: E402

VARIANTS = ("fused", "reference")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MiB = 2**20


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--batch", type=int, default=None, help="default 64 on GPU, 2 on CPU")
    p.add_argument("--size", type=int, default=None, help="input resolution; default 224 on GPU, 112 on CPU")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="float32, or a half type via torch.autocast")
    p.add_argument("--channels-last", action="store_true", help="model and input in channels_last")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (both variants)")
    p.add_argument("--steps", type=int, default=None, help="timed steps; default 20 on GPU, 20 on CPU")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first; default 5 on GPU, 3 on CPU")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=None, help="default: fresh random")
    p.add_argument("--variants", default="fused,reference", help="comma-separated subset of fused,reference")
    p.add_argument("--no-isolate", action="store_true",
                   help="CPU: run the variants in this process (no per-variant peak RSS)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    # Internal: a child process running one variant writes its result here.
    p.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = args.device.type == "cuda"
    args.batch = args.batch or (64 if gpu else 2)
    args.size = args.size or (224 if gpu else 112)
    args.steps = args.steps if args.steps is not None else 20
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 3)
    if args.seed is None:
        args.seed = int.from_bytes(os.urandom(4), "little")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = set(args.variants) - set(VARIANTS)
    if bad or not args.variants:
        p.error(f"--variants: expected a subset of {','.join(VARIANTS)}, got {sorted(bad)}")
    if args.steps < 1:
        p.error("--steps must be >= 1")
    return args


def make_model_and_data(args: argparse.Namespace) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Initial weights and one batch, a function of ``args.seed`` only, so
    separate processes build identical ones."""
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    model = lip_resnet50(num_classes=args.num_classes)
    # The LIP heads start at zero (every LIP = average pooling); give them
    # small random weights so the logits vary as in a network being trained.
    with torch.no_grad():
        for conv in lip_logit_convs(model):
            conv.weight.normal_(0.0, 0.05, generator=gen)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen)
    y = torch.randint(0, args.num_classes, (args.batch,), generator=gen)
    return model.state_dict(), x, y


def _rss_bytes() -> Optional[int]:
    """Current resident set size (Linux /proc), else None."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def _max_rss_bytes() -> int:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def run_variant(variant: str, args: argparse.Namespace, rss_valid: bool = True) -> dict[str, Any]:
    """Build the variant, warm up, time ``args.steps`` training steps."""
    device, dtype = args.device, DTYPES[args.dtype]
    state, x, y = make_model_and_data(args)
    model = lip_resnet50(num_classes=args.num_classes)
    model.load_state_dict(state)
    set_lip_backend(model, use_reference=(variant == "reference"))
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=fmt).train()
    x, y = x.to(device=device, memory_format=fmt), y.to(device)
    weight_sum = float(sum(p.detach().double().abs().sum() for p in model.parameters()))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    fwd = torch.compile(model) if args.compile else model
    half = dtype != torch.float32
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    losses: list[torch.Tensor] = []

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        ctx = torch.autocast(device.type, dtype=dtype) if half else contextlib.nullcontext()
        with ctx:
            loss = F.cross_entropy(fwd(x), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        losses.append(loss.detach())  # read after timing: no sync inside

    synchronize(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        mem_before = torch.cuda.memory_allocated(device)
    else:
        mem_before = _rss_bytes()

    time_calls_ms([step], args.warmup, device)
    times = time_calls_ms([step], args.steps, device)
    synchronize(device)

    res: dict[str, Any] = {}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        res["peak_mem_mib"] = peak / MiB
        res["peak_extra_mem_mib"] = (peak - mem_before) / MiB
        res["peak_mem_method"] = "torch.cuda.max_memory_allocated (absolute; extra = over weights+batch)"
    elif rss_valid and mem_before is not None:
        peak = _max_rss_bytes()
        res["peak_mem_mib"] = peak / MiB
        res["peak_extra_mem_mib"] = max(peak - mem_before, 0) / MiB
        res["peak_mem_method"] = (
            "max RSS of a process running only this variant" if args.child_out is not None
            else "max RSS of this process, first variant run in it"
        ) + " (extra = over RSS before step 1)"
    else:
        res["peak_mem_mib"] = res["peak_extra_mem_mib"] = None
        res["peak_mem_method"] = "n/a (shared process; RSS high-water mark is not per variant)"

    loss_vals = [float(v) for v in losses]
    median_ms = statistics.median(times)
    res.update(
        variant=variant,
        step_ms_median=median_ms,
        step_ms_all=times,
        images_per_s=args.batch / (median_ms / 1e3),
        loss_first=loss_vals[0],
        loss_last=loss_vals[-1],
        loss_finite=all(v == v and abs(v) != float("inf") for v in loss_vals),
        initial_weight_abs_sum=weight_sum,
    )
    return res


def _child_argv(args: argparse.Namespace, variant: str, out: Path) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()),
            "--device", str(args.device), "--batch", str(args.batch), "--size", str(args.size),
            "--dtype", args.dtype, "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--num-classes", str(args.num_classes), "--lr", str(args.lr), "--seed", str(args.seed),
            "--variants", variant, "--child-out", str(out)]
    if args.channels_last:
        argv.append("--channels-last")
    if args.compile:
        argv.append("--compile")
    return argv


def _run_isolated(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        proc = subprocess.run(_child_argv(args, variant, out), capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"{variant} child failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return json.loads(out.read_text())


def _fmt_mib(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.0f}"


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None or b == 0 else a / b


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)

    if args.child_out is not None:  # child: one variant, result to a file
        res = run_variant(args.variants[0], args)
        args.child_out.write_text(json.dumps(res))
        return res

    isolate = args.device.type == "cpu" and not args.no_isolate
    results: dict[str, dict[str, Any]] = {}
    for i, variant in enumerate(args.variants):
        if isolate:
            results[variant] = _run_isolated(variant, args)
        else:
            # In one CPU process only the first variant's RSS high-water mark is its own.
            results[variant] = run_variant(variant, args, rss_valid=(i == 0))

    f, r = results.get("fused"), results.get("reference")
    ratio = None
    if f and r:
        ratio = {
            "step_time_reference_over_fused": _ratio(r["step_ms_median"], f["step_ms_median"]),
            "images_per_s_fused_over_reference": _ratio(f["images_per_s"], r["images_per_s"]),
            "peak_mem_reference_over_fused": _ratio(r["peak_mem_mib"], f["peak_mem_mib"]),
            "peak_extra_mem_reference_over_fused": _ratio(r["peak_extra_mem_mib"], f["peak_extra_mem_mib"]),
            "same_initial_weights": f["initial_weight_abs_sum"] == r["initial_weight_abs_sum"],
        }

    report: dict[str, Any] = {
        "benchmark": "bench_train",
        "model": "lip_resnet50",
        "device": device_name(args.device),
        "device_type": args.device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "commit": git_commit(REPO),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": {
            "batch": args.batch, "size": args.size, "dtype": args.dtype,
            "channels_last": args.channels_last, "compile": args.compile,
            "steps": args.steps, "warmup": args.warmup, "num_classes": args.num_classes,
            "lr": args.lr, "optimizer": "SGD(momentum=0.9, weight_decay=1e-4)", "seed": args.seed,
            "isolated_processes": isolate,
        },
        "results": results,
        "ratio": ratio,
    }

    print(f"device: {report['device']} ({args.device.type}, {report['threads']} threads) | "
          f"torch {report['torch']} | commit {report['commit'] or 'unknown'}")
    print(f"LIP-ResNet-50 train step: batch {args.batch}, {args.size}x{args.size}, {args.dtype}, "
          f"channels_last={args.channels_last}, compile={args.compile}, "
          f"{args.steps} timed steps after {args.warmup} warm-up, seed {args.seed}")
    print(f"{'variant':<10} {'step ms':>10} {'images/s':>10} {'peak MiB':>9} {'extra MiB':>10}  loss first -> last")
    for v, res in results.items():
        flag = "" if res["loss_finite"] else "  (non-finite loss!)"
        print(f"{v:<10} {res['step_ms_median']:>10.2f} {res['images_per_s']:>10.2f} "
              f"{_fmt_mib(res['peak_mem_mib']):>9} {_fmt_mib(res['peak_extra_mem_mib']):>10}  "
              f"{res['loss_first']:.4f} -> {res['loss_last']:.4f}{flag}")
    if ratio:
        mem = ratio["peak_extra_mem_reference_over_fused"]
        print(f"reference / fused: step time x{ratio['step_time_reference_over_fused']:.3f}, "
              f"extra memory x{'n/a' if mem is None else f'{mem:.3f}'}"
              f"{'' if ratio['same_initial_weights'] else '  (WARNING: initial weights differ)'}")
    for v, res in results.items():
        print(f"peak memory ({v}): {res['peak_mem_method']}")

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
