"""Smoke tests for benchmarks/bench_lip.py (measuring) and benchmarks/report.py (reporting).

The CPU test runs the real command line on the tiny smoke-test shape for all
three dtypes and both layouts (a few seconds) and checks that the printed
table and the JSON carry every field the benchmark promises, that they agree
with each other, and that report.py prints the same table from the JSON.
The CUDA tests (skipped without a GPU) do the same on the GPU, where
bandwidth, copy bandwidth and peak memory must be present. The rest checks
the reliability marks and the re-measuring on synthetic timings.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_lip.py"
sys.path.insert(0, str(SCRIPT.parent))

import bench_lip  # noqa: E402
import report  # noqa: E402
from timing import Measurement, TimingConfig, measure, time_calls_ms  # noqa: E402

DTYPES = ("float32", "bfloat16", "float16")
LAYOUTS = ("contiguous", "channels_last")
TOP_LEVEL = ("device", "device_type", "torch", "cuda", "commit", "copy_gbps", "num_threads", "batch", "kernels",
             "results", "speedups")
RECORD_FIELDS = ("layer", "shape", "dtype", "layout", "impl", "forward_ms", "backward_ms",
                 "fwd_bwd_ms", "fwd_bwd_gbps", "extra_peak_bytes", "finite", "attempts", "unreliable")
TIME_FIELDS = ("forward_ms", "backward_ms", "fwd_bwd_ms")
TINY_ARGS = ["--shapes", "tiny", "--batch", "2", "--dtypes", ",".join(DTYPES), "--layouts", ",".join(LAYOUTS),
             "--warmup", "1", "--min-reps", "2", "--max-reps", "3", "--budget-ms", "1", "--rotate-mib", "0.01"]


def run_bench(tmp_path: Path, *extra: str, env: Optional[dict] = None) -> tuple[subprocess.CompletedProcess, dict[str, Any]]:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), *TINY_ARGS, *extra, "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO,
                          env=None if env is None else {**os.environ, **env})
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
        layer, shape, dtype, layout, impl, fwd, bwd, fb, noise, timing, gbps, pct, extra, output, *spd = row
        rec = by_key[(dtype, layout, impl)]
        assert (layer, shape) == ("tiny", "x".join(map(str, rec["shape"])))
        for cell, key in ((fwd, "forward_ms"), (bwd, "backward_ms"), (fb, "fwd_bwd_ms")):
            assert cell == f"{rec[key]:.3f}", (row, rec)
        assert float(noise) >= 0, row
        assert timing == (",".join(rec["unreliable"]) or "ok"), (row, rec)
        assert rec["unreliable"] == report.unreliable_reasons(rec) and rec["attempts"] >= 1
        assert output == ("ok" if rec["finite"] else bench_lip.NAN_MARK), (row, rec)
        if impl == "fused":
            assert spd == [], row
        else:
            assert len(spd) == 3 and all(s.rstrip("?").endswith("x") and float(s.rstrip("?x")) > 0 for s in spd), row
            assert float(spd[2].rstrip("?x")) == pytest.approx(rec["fwd_bwd_ms"] / by_key[(dtype, layout, "fused")]
                                                       ["fwd_bwd_ms"], rel=0.01, abs=0.006)

    # float16 reference with logits in [0, 12] overflows (exp(12) > 65504): it must be flagged, not hidden.
    if "float16" in dtypes:
        assert any(not r["finite"] for r in results if r["impl"] == "reference" and r["dtype"] == "float16")
    assert all(r["finite"] for r in results if r["impl"] == "fused"), "fused must stay finite"


def test_cpu_table_and_json(tmp_path: Path) -> None:
    proc, doc = run_bench(tmp_path, "--device", "cpu", "--threads", "1", env={"LIP_CUDA_KERNELS": "variant-x"})
    check_common(proc, doc, impls=("fused", "reference"))
    assert doc["copy_gbps"] is None and doc["cuda"] == torch.version.cuda and doc["num_threads"] == 1
    assert doc["device_type"] == "cpu" and doc["batch"] == 2 and doc["kernels"] == "variant-x"
    for r in doc["results"]:
        assert r["fwd_bwd_gbps"] is None and r["extra_peak_bytes"] is None, r
    for row in table_rows(proc.stdout):
        assert row[10:13] == ["n/a", "n/a", "n/a"], row
    assert "n/a on CPU" in proc.stdout
    assert "threads 1" in proc.stdout and "kernels variant-x" in proc.stdout
    # three rounds by default on the CPU; each row is the median one
    assert "3 rounds of the implementations in turn" in proc.stdout
    for r in doc["results"]:
        assert len(r["round_fwd_bwd_ms"]) == 3 and r["fwd_bwd_ms"] == sorted(r["round_fwd_bwd_ms"])[1], r

    # report.py prints the same table from the JSON alone.
    path = tmp_path / "bench.json"
    again = subprocess.run([sys.executable, str(REPO / "benchmarks" / "report.py"), str(path)],
                           capture_output=True, text=True, timeout=120, cwd=REPO)
    assert again.returncode == 0, again.stderr
    assert table_rows(again.stdout) == table_rows(proc.stdout)
    assert [l for l in again.stdout.splitlines() if l.startswith("fused vs")] == \
        [l for l in proc.stdout.splitlines() if l.startswith("fused vs")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_table_and_json(tmp_path: Path) -> None:
    proc, doc = run_bench(tmp_path, "--device", "cuda", "--no-compile")
    check_common(proc, doc, impls=("fused", "reference"))
    assert doc["copy_gbps"] > 0 and doc["device"] == torch.cuda.get_device_name()
    for r in doc["results"]:
        assert r["fwd_bwd_gbps"] > 0 and r["extra_peak_bytes"] > 0, r
    # the table rounds GB/s: a tiny shape's (a few KB in 0.1 ms) prints as 0,
    # so > 0 is checked on the JSON above and only the parse here
    for row in table_rows(proc.stdout):
        assert all(float(value) >= 0 for value in row[10:13]), row


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


def test_cpu_rotation_reaches_64_mib_at_the_small_layers() -> None:
    """docs/benchmarking.md: input sets together larger than 64 MiB on a CPU;
    a cap of 32 sets left s4a bfloat16 at batch 2 at 29 MiB."""
    for name, shape in (("s4a", (2, 512, 14, 14)), ("s3a", (2, 256, 28, 28))):
        for dtype in ("float32", "bfloat16"):
            case = bench_lip.Case(name, shape, dtype, "channels_last")
            sets = bench_lip.count_input_sets(case, 64 * 2**20)
            assert sets * bench_lip.input_set_bytes(case) >= 64 * 2**20, (name, dtype, sets)


def test_bad_retries_and_gpu_check_results_in_report() -> None:
    bad = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_lip.py"), "--retries", "-1"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert bad.returncode == 2 and "--retries: expected an integer >= 0, got -1" in bad.stderr
    # report.py reads gpu_check.sh's results.json (the benchmark runs nested by variant)
    committed = sorted((REPO / "benchmarks" / "results").glob("gpu_*/results.json"))
    assert committed
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "report.py"), str(committed[-1])],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "== gpu_check benchmark run" in proc.stdout and "fused vs reference" in proc.stdout


def test_inputs_are_random_in_layout() -> None:
    case = bench_lip.Case("tiny", (2, 4, 9, 11), "bfloat16", "channels_last")
    s = bench_lip.make_input_set(case, torch.device("cpu"))
    assert s.x.dtype == s.logit.dtype == s.grad.dtype == torch.bfloat16
    assert s.grad.shape == (2, 4, 5, 6)
    for t in (s.x, s.logit, s.grad):
        assert t.is_contiguous(memory_format=torch.channels_last) and t.float().std() > 0
    assert s.x.requires_grad and s.logit.requires_grad and not s.grad.requires_grad
    assert 0 <= s.logit.min() and s.logit.max() <= 12


def test_converted_impl(tmp_path: Path) -> None:
    """'converted' (the fused op through channels_last copies) gives the fused
    op's results bitwise, in x's memory format, and goes through the table,
    the JSON and the summary as a baseline."""
    lip_cuda = bench_lip.import_lip_cuda()
    fn = bench_lip.make_impl("converted", lip_cuda)
    for layout in LAYOUTS:
        x = bench_lip.to_layout(torch.randn(2, 21, 9, 11), layout).requires_grad_()
        logit = bench_lip.to_layout(12 * torch.sigmoid(torch.randn(2, 21, 9, 11)), layout).requires_grad_()
        y = fn(x, logit, 3, 2, 1, False)
        want = lip_cuda.lip2d(x, logit, 3, 2, 1, False)
        assert torch.equal(y, want) and y.stride() == want.stride(), layout
        g = torch.randn_like(y)
        # (the gradients keep the layout autograd's copy backward gives them: channels_last)
        for a, b in zip(torch.autograd.grad(y, (x, logit), g), torch.autograd.grad(want, (x, logit), g)):
            assert torch.equal(a, b), layout
    dtypes = ("float32", "bfloat16")
    proc, doc = run_bench(tmp_path, "--device", "cpu", "--threads", "1", "--impls", "fused,converted",
                          "--dtypes", ",".join(dtypes))
    check_common(proc, doc, impls=("fused", "converted"), dtypes=dtypes)
    assert sum(l.startswith("fused vs converted") for l in proc.stdout.splitlines()) == 4


def test_impl_selection() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert bench_lip.choose_impls("fused,reference", None, cpu) == ["fused", "reference"]
    assert bench_lip.choose_impls("fused,reference", True, cpu) == ["fused", "reference", "compiled"]
    assert bench_lip.choose_impls("fused,reference", None, cuda) == ["fused", "reference", "compiled"]
    assert bench_lip.choose_impls("fused,reference", False, cuda) == ["fused", "reference"]
    assert bench_lip.choose_impls("converted,fused", None, cpu) == ["fused", "converted"]
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


# --------------------------------------------------------------------------- reliability


def fake_row(impl: str, fwd: float, bwd: float, fb: float, spread: float = 0.02, layer: str = "s3a",
             dtype: str = "float32") -> dict[str, Any]:
    p = [fb * (1 - spread), fb * (1 + spread)]
    return {"layer": layer, "shape": [2, 8, 16, 16], "dtype": dtype, "layout": "contiguous", "impl": impl,
            "forward_ms": fwd, "backward_ms": bwd, "fwd_bwd_ms": fb, "finite": True, "error": None,
            "p20_p80_ms": {"forward": [fwd, fwd], "backward": [bwd, bwd], "fwd_bwd": p}}


def test_unreliable_rows_are_marked_and_left_out_of_the_summary() -> None:
    import random

    f = random.uniform(1, 3)
    rows = [fake_row("fused", f, 2 * f, 3 * f, layer="a"), fake_row("reference", 2 * f, 4 * f, 6 * f, layer="a"),
            fake_row("fused", f, 2 * f, 3 * f, layer="b"),
            fake_row("reference", 2 * f, 4 * f, 60 * f, layer="b"),           # fwd+bwd 10x fwd + bwd
            fake_row("fused", f, 2 * f, 3 * f, layer="c"),
            fake_row("reference", 2 * f, 4 * f, 6 * f, spread=0.4, layer="c")]  # +-40%
    assert report.unreliable_reasons(rows[0]) == []
    assert report.unreliable_reasons(rows[3]) == ["f+b!=f,b"]
    assert report.unreliable_reasons(rows[5]) == ["noisy"]
    doc = {"device": "test", "device_type": "cpu", "torch": "x", "cuda": None, "commit": None, "num_threads": 1,
           "timing": "synthetic", "copy_gbps": None, "results": rows}
    text = report.report_text(doc)
    (line,) = [l for l in text.splitlines() if l.startswith("fused vs reference float32")]
    assert "geomean 2.00x" in line and "over 1/3 layers" in line
    assert "unreliable, left out: b (20.00x), c (2.00x)" in line
    cells = {r[0]: r for r in (l.split() for l in text.splitlines()) if r and r[0] in "abc" and r[4] == "reference"}
    assert cells["a"][-1] == "2.00x" and cells["b"][-1] == "20.00x?" and cells["c"][-1] == "2.00x?"
    assert cells["b"][9] == "f+b!=f,b" and cells["c"][9] == "noisy"


def test_unreliable_rows_are_measured_again(monkeypatch: pytest.MonkeyPatch) -> None:
    # Timings that disagree (fwd+bwd 5x fwd + bwd) on the first attempt and agree on the second.
    def m(ms: float) -> Measurement:
        return Measurement(ms, 5, 0.99 * ms, 1.01 * ms)

    attempts = iter([(m(1), m(2), m(15)), (m(1), m(2), m(3.1)), (m(9), m(9), m(99))])
    current: dict[str, Measurement] = {}

    def timer(key: str):
        def fn(*args: Any) -> Measurement:
            if key == "forward":
                current.update(zip(("forward", "backward", "fwd_bwd"), next(attempts)))
            return current[key]
        return fn

    monkeypatch.setattr(bench_lip, "time_forward", timer("forward"))
    monkeypatch.setattr(bench_lip, "time_backward", timer("backward"))
    monkeypatch.setattr(bench_lip, "time_forward_backward", timer("fwd_bwd"))
    case = bench_lip.Case("tiny", (1, 2, 5, 5), "float32", "contiguous")
    sets = [bench_lip.make_input_set(case, torch.device("cpu"))]
    rec = bench_lip.measure_impl(case, "reference", bench_lip.import_lip_cuda().lip2d_reference, sets, torch.device("cpu"),
                                 TimingConfig(1, 1, 1, 1.0), None, retries=2)
    assert rec.attempts == 2 and rec.unreliable == [] and rec.fwd_bwd_ms == 3.1

    attempts = iter([(m(1), m(2), m(15)), (m(1), m(2), m(30)), (m(1), m(2), m(12))])
    rec = bench_lip.measure_impl(case, "reference", bench_lip.import_lip_cuda().lip2d_reference, sets, torch.device("cpu"),
                                 TimingConfig(1, 1, 1, 1.0), None, retries=2)
    # Never consistent: the least bad attempt is kept, and marked.
    assert rec.attempts == 3 and rec.unreliable == ["f+b!=f,b"] and rec.fwd_bwd_ms == 12


def test_implementations_take_turns_and_rows_are_median_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    times = iter([5.0, 1.0, 4.0, 3.0, 9.0, 2.0, 6.0, 7.0])  # fused, reference, fused, ...

    def fake_measure(case: Any, impl: str, *args: Any) -> Any:
        calls.append(impl)
        ms = next(times)
        rec = bench_lip.Record(case.layer, list(case.shape), case.dtype, case.layout, impl,
                               forward_ms=ms / 3, backward_ms=ms / 2, fwd_bwd_ms=ms)
        if impl == "reference" and len(calls) == 6:
            rec.error = "RuntimeError: round 3 failed"
        return rec

    monkeypatch.setattr(bench_lip, "measure_impl", fake_measure)
    case = bench_lip.Case("tiny", (1, 2, 5, 5), "float32", "contiguous")
    fused, ref = bench_lip.run_case(case, ["fused", "reference"], bench_lip.import_lip_cuda(), torch.device("cpu"),
                                    TimingConfig(1, 1, 1, 1.0), 1, None, seed=0, rounds=4)
    assert calls == ["fused", "reference"] * 4
    # fused rounds 5, 4, 9, 6: the lower median of an even count, with its own fwd and bwd
    assert fused.fwd_bwd_ms == 5.0 and fused.forward_ms == 5.0 / 3 and fused.round_fwd_bwd_ms == [5.0, 4.0, 9.0, 6.0]
    assert fused.error is None
    # a failed round makes the row an error: a crash must not hide behind the other rounds
    assert ref.error == "RuntimeError: round 3 failed" and ref.round_fwd_bwd_ms == [1.0, 3.0, 7.0]


def test_plot_from_json(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    for name in ("cpu_xeon.json", "train_cpu.json"):
        out = tmp_path / name.replace(".json", ".png")
        proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "report.py"),
                               str(REPO / "benchmarks" / "results" / name), "--plot", str(out)],
                              capture_output=True, text=True, timeout=120, cwd=REPO)
        assert proc.returncode == 0, proc.stderr
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_committed_results_have_their_plots() -> None:
    for path in (REPO / "benchmarks" / "results").glob("*.json"):
        assert path.with_suffix(".png").exists(), f"no plot for {path.name}: python benchmarks/report.py {path} --plot ..."
