"""benchmarks/count_instructions.py: its reading of callgrind's dumps.

Running it needs valgrind and minutes (docs/kernels.md, "Instructions per
element"); what is tested here is the part that turns a dump into counts:
self costs by object and function, with callgrind's name compression, and
without the inclusive cost of calls counted twice.
"""

import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import count_instructions  # noqa: E402


def test_read_dump_counts_self_costs_by_object_and_function(tmp_path):
    rng = random.Random()
    a1, a2, b1, inclusive = (rng.randrange(1, 10**9) for _ in range(4))
    lines = [
        "# callgrind format",
        "version: 1",
        "desc: Trigger: dump case3:backward:200704",
        "positions: line",
        "events: Ir",
        "ob=(1) /lib/_C.cpython-311-x86_64-linux-gnu.so",
        "fl=(1) /src/kernel.h",
        "fn=(1) void kernel<float>(int)",
        f"10 {a1}",
        "+2 1",  # relative line numbers, as callgrind compresses them
        "cob=(2) /lib/libtorch_cpu.so",
        "cfn=(2) at::native::avg_pool2d",
        "calls=1 0",
        f"12 {inclusive}",  # the callee's inclusive cost: not the caller's own
        f"* {a2}",
        "ob=(2)",  # a name given before, by number only
        "fn=(2)",
        f"5 {b1}",
    ]
    path = tmp_path / "cg.1.1"
    path.write_text("\n".join(lines) + "\n")

    trigger, by_object, by_function = count_instructions.read_dump(str(path))

    assert trigger == "dump case3:backward:200704"
    assert by_object == {
        "/lib/_C.cpython-311-x86_64-linux-gnu.so": a1 + 1 + a2,
        "/lib/libtorch_cpu.so": b1,
    }
    assert by_function[("/lib/_C.cpython-311-x86_64-linux-gnu.so", "void kernel<float>(int)")] == a1 + 1 + a2
    assert by_function[("/lib/libtorch_cpu.so", "at::native::avg_pool2d")] == b1


def test_short_function_drops_arguments_and_namespaces():
    name = ("void lip_cuda::cpu_avx2::(anonymous namespace)::forward_strip<false, float, float, float>"
            "(lip_cuda::LipGeometry const&, lip_cuda::cpu_avx2::(anonymous namespace)::Strip const&)")
    assert count_instructions.short_function(name) == "forward_strip"
