"""Smoke tests for benchmarks/bench_lip.py.

The CPU test runs the real command line on the tiny smoke-test shape for all
three dtypes and both layouts (a few seconds) and checks that the printed
table and the JSON carry every field the benchmark promises, and that they
agree with each other. The CUDA tests (skipped without a GPU) do the same on
the GPU, where bandwidth, copy bandwidth and peak memory must be present.
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_lip.py"
sys.path.insert(0, str(SCRIPT.parent))

import bench_lip  # noqa: E402
from timing import TimingConfig, measure, time_calls_ms  # noqa: E402

DTYPES = ("float32", "bfloat16", "float16")
LAYOUTS = ("contiguous", "channels_last")
TOP_LEVEL = ("device", "torch", "cuda", "commit", "copy_gbps", "num_threads", "results")
RECORD_FIELDS = ("layer", "shape", "dtype", "layout", "impl", "forward_ms", "backward_ms",
                 "fwd_bwd_ms", "fwd_bwd_gbps", "extra_peak_bytes", "finite")
TIME_FIELDS = ("forward_ms", "backward_ms", "fwd_bwd_ms")
TINY_ARGS = ["--shapes", "tiny", "--batch", "2", "--dtypes", ",".join(DTYPES), "--layouts", ",".join(LAYOUTS),
             "--warmup", "1", "--min-reps", "2", "--max-reps", "3", "--budget-ms", "1", "--rotate-mib", "0.01"]


def run_bench(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict[str, Any]]:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), *TINY_ARGS, *extra, "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, f"bench_lip failed:\nSTDOUT\n{proc.stdout}\nSTDERR\n{proc.stderr}"
    return proc, json.loads(out.read_text())


def table_rows(stdout: str) -> list[list[str]]:
    """Rows of the printed table (split on whitespace), header excluded."""
    lines = stdout.splitlines()
    start = next(i for i, l in enumerate(lines) if l.split()[:5] == ["layer", "shape", "dtype", "layout", "impl"])
    assert set(lines[start + 1].replace(" ", "")) == {"-"}, "rule under the header"
    rows = []
    for line in lines[start + 2:]:
        if not line.strip():
            continue
        if line.startswith("ms:"):  # first footer line
            break
        rows.append(line.split())
    return rows


def check_common(proc: subprocess.CompletedProcess, doc: dict[str, Any], impls: tuple[str, ...],
                 dtypes: tuple[str, ...] = DTYPES, layouts: tuple[str, ...] = LAYOUTS) -> None:
    """Fields, cases and table/JSON agreement shared by the CPU and GPU runs."""
    n_cases = len(dtypes) * len(layouts)
    assert len([l for l in proc.stderr.splitlines() if l.startswith("[")]) == n_cases, proc.stderr

    for key in TOP_LEVEL:
        assert key in doc, f"JSON lacks top-level {key!r}"
    assert isinstance(doc["device"], str) and doc["device"]
    assert doc["torch"] == torch.__version__
    assert doc["cuda"] == torch.version.cuda
    assert doc["commit"] is None or len(doc["commit"]) == 40
    assert isinstance(doc["num_threads"], int) and doc["num_threads"] >= 1

    results = doc["results"]
    for r in results:
        for key in RECORD_FIELDS:
            assert key in r, f"record lacks {key!r}: {r}"
        assert r.get("error") is None, r
        assert r["layer"] == "tiny" and r["shape"] == [2, *bench_lip.TINY["tiny"]]
        for key in TIME_FIELDS:
            assert isinstance(r[key], float) and r[key] > 0 and math.isfinite(r[key]), (key, r)
        assert isinstance(r["finite"], bool)
    got = sorted((r["dtype"], r["layout"], r["impl"]) for r in results)
    assert got == sorted(itertools.product(dtypes, layouts, impls)), got

    rows = table_rows(proc.stdout)
    assert len(rows) == len(results)
    by_key = {(r["dtype"], r["layout"], r["impl"]): r for r in results}
    for row in rows:
        layer, shape, dtype, layout, impl, fwd, bwd, fb, noise, gbps, pct, extra, output, *spd = row
        rec = by_key[(dtype, layout, impl)]
        assert (layer, shape) == ("tiny", "x".join(map(str, rec["shape"])))
        for cell, key in ((fwd, "forward_ms"), (bwd, "backward_ms"), (fb, "fwd_bwd_ms")):
            assert cell == f"{rec[key]:.3f}", (row, rec)
        assert float(noise) >= 0, row
        assert output == ("ok" if rec["finite"] else bench_lip.NAN_MARK), (row, rec)
        if impl == "fused":
            assert spd == [], row
        else:
            assert len(spd) == 3 and all(s.endswith("x") and float(s[:-1]) > 0 for s in spd), row
            assert float(spd[2][:-1]) == pytest.approx(rec["fwd_bwd_ms"] / by_key[(dtype, layout, "fused")]
                                                       ["fwd_bwd_ms"], rel=0.01, abs=0.006)

    # float16 reference with logits in [0, 12] overflows (exp(12) > 65504): it must be flagged, not hidden.
    if "float16" in dtypes:
        assert any(not r["finite"] for r in results if r["impl"] == "reference" and r["dtype"] == "float16")
    assert all(r["finite"] for r in results if r["impl"] == "fused"), "fused must stay finite"


def test_cpu_table_and_json(tmp_path: Path) -> None:
    proc, doc = run_bench(tmp_path, "--device", "cpu", "--threads", "1")
    check_common(proc, doc, impls=("fused", "reference"))
    assert doc["copy_gbps"] is None and doc["cuda"] == torch.version.cuda and doc["num_threads"] == 1
    for r in doc["results"]:
        assert r["fwd_bwd_gbps"] is None and r["extra_peak_bytes"] is None, r
    for row in table_rows(proc.stdout):
        assert row[9:12] == ["n/a", "n/a", "n/a"], row
    assert "n/a on CPU" in proc.stdout
    assert "threads 1" in proc.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_table_and_json(tmp_path: Path) -> None:
    proc, doc = run_bench(tmp_path, "--device", "cuda", "--no-compile")
    check_common(proc, doc, impls=("fused", "reference"))
    assert doc["copy_gbps"] > 0 and doc["device"] == torch.cuda.get_device_name()
    for r in doc["results"]:
        assert r["fwd_bwd_gbps"] > 0 and r["extra_peak_bytes"] > 0, r
    for row in table_rows(proc.stdout):
        assert float(row[9]) > 0 and float(row[10]) >= 0 and float(row[11]) >= 0, row


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_compiled(tmp_path: Path) -> None:
    proc, doc = run_bench(tmp_path, "--device", "cuda", "--dtypes", "float32", "--layouts", "channels_last")
    check_common(proc, doc, impls=("fused", "reference", "compiled"), dtypes=("float32",),
                 layouts=("channels_last",))


def test_byte_model_and_input_rotation() -> None:
    case = bench_lip.Case("x", (1, 1, 1000, 1000), "float32", "contiguous")
    assert bench_lip.gbps(case, 1.0) == pytest.approx((2.5 + 4.75) * 4e6 / 1e-3 / 1e9)
    assert bench_lip.gbps(case, None) is None
    sets = bench_lip.count_input_sets(case, 100 * 2**20)
    assert sets >= 2 and sets * bench_lip.input_set_bytes(case) >= 100 * 2**20


def test_inputs_are_random_in_layout() -> None:
    case = bench_lip.Case("tiny", (2, 4, 9, 11), "bfloat16", "channels_last")
    s = bench_lip.make_input_set(case, torch.device("cpu"))
    assert s.x.dtype == s.logit.dtype == s.grad.dtype == torch.bfloat16
    assert s.grad.shape == (2, 4, 5, 6)
    for t in (s.x, s.logit, s.grad):
        assert t.is_contiguous(memory_format=torch.channels_last) and t.float().std() > 0
    assert s.x.requires_grad and s.logit.requires_grad and not s.grad.requires_grad
    assert 0 <= s.logit.min() and s.logit.max() <= 12


def test_impl_selection() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert bench_lip.choose_impls("fused,reference", None, cpu) == ["fused", "reference"]
    assert bench_lip.choose_impls("fused,reference", True, cpu) == ["fused", "reference", "compiled"]
    assert bench_lip.choose_impls("fused,reference", None, cuda) == ["fused", "reference", "compiled"]
    assert bench_lip.choose_impls("fused,reference", False, cuda) == ["fused", "reference"]
    with pytest.raises(SystemExit):
        bench_lip.choose_shapes("stem,nope", cpu)
    assert "large" not in bench_lip.choose_shapes(None, cpu)
    assert "large" in bench_lip.choose_shapes(None, cuda)


def test_timing_rotates_and_counts() -> None:
    calls: list[int] = []
    fns = [lambda i=i: calls.append(i) for i in range(3)]
    times = time_calls_ms(fns, 7, torch.device("cpu"))
    assert len(times) == 7 and all(t >= 0 for t in times)
    assert calls == [0, 1, 2, 0, 1, 2, 0]
    m = measure(fns, torch.device("cpu"), TimingConfig(warmup=2, min_reps=4, max_reps=5, budget_ms=1e9))
    assert m.reps == 5 and m.median_ms >= 0
