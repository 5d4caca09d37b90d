"""Instructions executed per input element: fused LIP against the reference.

Runs itself under valgrind's callgrind (which counts every instruction a
process executes; this project's CPU VM has no hardware counters), zeroes
the counts before each pass of each case and dumps them after, then reports
the instructions of that pass per input element (x.numel()), split by where
they ran: lip_cuda's extension, ATen (libtorch_cpu, the reference's
kernels), and the rest (the Python interpreter, the dispatcher's Python
side, libc). Counts are exact and do not depend on the machine's load, so
they compare kernels where wall-clock time on a shared VM is noisy; they say
nothing about cycles per instruction, which `bench_lip.py` measures.

    python benchmarks/count_instructions.py --layers s4a,s3b \\
        --dtypes float32,bfloat16 --layouts channels_last,contiguous

Each case runs its passes twice after two warm-up calls, with one thread
(callgrind serialises threads anyway). Startup under callgrind takes about
three minutes (importing torch); each case a few seconds more.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_lip import KERNEL_SIZE, LAYERS, PADDING, STRIDE  # noqa: E402  (the benchmark's layers)

CALLS = 2  # counted calls per pass


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="s4a", help="comma list of " + ",".join(LAYERS))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dtypes", default="float32", help="comma list of float32,bfloat16,float16,float64")
    p.add_argument("--layouts", default="channels_last,contiguous")
    p.add_argument("--impls", default="fused,reference")
    p.add_argument("--keep", metavar="DIR", help="keep callgrind's dumps in DIR (for callgrind_annotate)")
    p.add_argument("--child", metavar="DIR", help=argparse.SUPPRESS)  # the run under callgrind
    return p.parse_args()


def cases(args: argparse.Namespace) -> List[Tuple[str, str, str, str]]:
    return [(impl, dtype, layout, layer)
            for layer in args.layers.split(",") for dtype in args.dtypes.split(",")
            for layout in args.layouts.split(",") for impl in args.impls.split(",")]


def run_child(args: argparse.Namespace) -> None:
    """Under callgrind: each pass between a zero and a named dump."""
    import gc

    import torch

    import lip_cuda

    torch.set_num_threads(1)
    pid = str(os.getpid())

    def control(*flags: str) -> None:
        subprocess.run(["callgrind_control", *flags, pid], check=True, capture_output=True)

    # the collector's passes over every Python object would land in
    # whichever pass they fall on (millions of instructions)
    gc.disable()
    control("--dump=warm-up")  # whatever ran before the first case
    for number, (impl, dtype, layout, layer) in enumerate(cases(args)):
        gen = torch.Generator().manual_seed(number)
        shape = (args.batch, *LAYERS[layer])
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        x = torch.randn(shape, generator=gen).to(getattr(torch, dtype), memory_format=fmt)
        logit = (12 * torch.sigmoid(torch.randn(shape, generator=gen))).to(x.dtype, memory_format=fmt)
        x.requires_grad_()
        logit.requires_grad_()
        f = lip_cuda.lip2d if impl == "fused" else lip_cuda.lip2d_reference
        y = f(x, logit, KERNEL_SIZE, STRIDE, PADDING)
        grad = torch.randn_like(y)
        passes = {
            "forward": lambda: f(x, logit, KERNEL_SIZE, STRIDE, PADDING),
            "backward": lambda: torch.autograd.grad(y, (x, logit), grad, retain_graph=True),
        }
        for name, call in passes.items():
            call()
            call()
            gc.collect()
            control("--zero")
            for _ in range(CALLS):
                call()
            control(f"--dump=case{number}:{name}:{x.numel()}")


def read_dump(path: str) -> Tuple[str, Dict[str, int], Dict[Tuple[str, str], int]]:
    """The dump's trigger and its self cost (instructions) by object and by function."""
    objects: Dict[str, str] = {}
    functions: Dict[str, str] = {}
    obj = fn = ""
    after_call = False
    trigger = ""
    by_object: Dict[str, int] = collections.Counter()
    by_function: Dict[Tuple[str, str], int] = collections.Counter()
    with open(path, errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("desc: Trigger:"):
                trigger = line.split(":", 2)[2].strip()
                continue
            # callgrind compresses names: "ob=(3) /path" first, "ob=(3)" after
            m = re.match(r"(c?ob|c?fn)=\((\d+)\)(?: (.*))?$", line)
            if m:
                table = objects if m.group(1).endswith("ob") else functions
                if m.group(3) is not None:
                    table[m.group(2)] = m.group(3)
                if m.group(1) == "ob":
                    obj = table.get(m.group(2), "?")
                elif m.group(1) == "fn":
                    fn = table.get(m.group(2), "?")
                continue
            if line.startswith("calls="):
                after_call = True  # the next cost line is the callee's, inclusive
                continue
            if line[:1].isdigit() or line[:1] in ("+", "-", "*"):
                parts = line.split()
                if len(parts) >= 2 and not after_call and parts[-1].isdigit():
                    by_object[obj] += int(parts[-1])
                    by_function[(obj, fn)] += int(parts[-1])
                after_call = False
    return trigger, by_object, by_function


def short_function(name: str) -> str:
    name = re.sub(r"\(anonymous namespace\)::", "", name)
    name = re.sub(r"lip_cuda::cpu_\w+::", "", name)
    name = re.sub(r"at::native::", "", name)
    depth = 0
    out = []
    for ch in name:  # drop argument lists and template arguments
        if ch in "(<":
            depth += 1
        if depth == 0:
            out.append(ch)
        if ch in ")>":
            depth -= 1
    return re.sub(r"^(void|float|auto) ", "", "".join(out))[:60]


def report(args: argparse.Namespace, folder: str) -> None:
    labels = {number: case for number, case in enumerate(cases(args))}
    print("instructions per input element (x.numel()), one call, callgrind "
          f"({CALLS} calls per pass, one thread)")
    print(f"{'impl':9s} {'dtype':8s} {'layout':13s} {'layer':5s} {'pass':8s} "
          f"{'lip_cuda':>8s} {'ATen':>8s} {'other':>8s}  top functions (share of the pass)")
    for path in sorted(glob.glob(os.path.join(folder, "cg.*.*")), key=lambda p: int(p.rsplit(".", 1)[1])):
        trigger, by_object, by_function = read_dump(path)
        m = re.search(r"case(\d+):(\w+):(\d+)", trigger)
        if not m:
            continue
        impl, dtype, layout, layer = labels[int(m.group(1))]
        per = CALLS * int(m.group(3))
        total = sum(by_object.values())
        ours = sum(n for o, n in by_object.items() if "lip_cuda" in o or "/_C." in o)
        aten = sum(n for o, n in by_object.items() if "libtorch_cpu" in o)
        top = sorted(by_function.items(), key=lambda kv: -kv[1])[:3]
        tops = ", ".join(f"{short_function(fn)} {100 * n / total:.0f}%" for (o, fn), n in top)
        print(f"{impl:9s} {dtype:8s} {layout:13s} {layer:5s} {m.group(2):8s} "
              f"{ours / per:8.2f} {aten / per:8.2f} {(total - ours - aten) / per:8.2f}  {tops}")


def main() -> None:
    args = parse_args()
    if args.child:
        run_child(args)
        return
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            sys.exit(f"count_instructions.py needs {tool} (valgrind's callgrind) on PATH")
    folder = args.keep or tempfile.mkdtemp(prefix="lip_callgrind_")
    os.makedirs(folder, exist_ok=True)
    child = [sys.executable, os.path.abspath(__file__), "--child", folder, *sys.argv[1:]]
    subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=" + os.path.join(folder, "cg.%p")]
                   + child, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    report(args, folder)
    if not args.keep:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
