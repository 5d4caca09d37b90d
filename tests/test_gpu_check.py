"""benchmarks/gpu_check.sh --cpu-smoke: the GPU session's one command, run
here at tiny sizes on the CPU so the script itself is tested in CI."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_smoke(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-smoke", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    # the device tool returns at most 8 files, flat
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.log", "results.json", "summary.txt"]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["verdict"] == "ok"
    failed = {name: s for name, s in results["steps"].items() if s["exit"] != 0}
    assert not failed, failed
    for variant in ("generic", "fast"):
        counts = results["tests"][variant]
        assert counts["passed"] > 0 and counts["failed"] == 0 and counts["errors"] == 0
    rows = results["speedups"]
    assert {(r["layer"], r["layout"]) for r in rows} == {("s4b", "contiguous"), ("s4b", "channels_last")}
    for r in rows:
        assert r["reference_ms"] > 0 and r["fused_generic_ms"] > 0 and r["fused_fast_ms"] > 0
    # torch.compile of the reference runs as a step of its own (one case here)
    (cl,) = [r for r in rows if r["layout"] == "channels_last"]
    assert cl["compiled_ms"] > 0 and cl["fast_vs_compiled"] == cl["compiled_ms"] / cl["fused_fast_ms"]
    assert set(results["train"]) == {"train_bf16_cl_fast", "train_bf16_cl_generic", "train_fp32_fast"}
    for data in results["train"].values():
        assert data["results"]["fused"]["step_ms_median"] > 0
    assert results["workload"] and "0 mismatches" in results["workload"][0]
    summary = (tmp_path / "summary.txt").read_text()
    assert summary.rstrip().endswith("verdict: ok") and summary in proc.stdout


def test_gpu_check_cpu_smoke_quick(tmp_path):
    """--quick (a second GPU run on little device time): the fast variant
    alone, benchmarked against eager, without torch.compile."""
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-smoke", "--quick", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["verdict"] == "ok"
    assert list(results["tests"]) == ["fast"] and results["tests"]["fast"]["passed"] > 0
    assert not [name for name in results["steps"] if "generic" in name or "compiled" in name]
    rows = results["speedups"]
    assert rows and all(r["reference_ms"] > 0 and r["fused_fast_ms"] > 0 and "fused_generic_ms" not in r
                        for r in rows)
    assert set(results["train"]) == {"train_bf16_cl_fast", "train_fp32_fast"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a visible GPU")
def test_gpu_check_without_gpu_fails_at_once(tmp_path):
    """On a machine with no visible GPU the GPU run stops after its first
    check, with a failed verdict: it used to build, skip every CUDA test,
    fail every benchmark and still say 'verdict: ok'."""
    env = dict(os.environ, PYTHON=sys.executable)
    start = time.monotonic()
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-4000:]
    assert time.monotonic() - start < 120
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["verdict"] == "failed" and results["steps"]["gpu_visible"]["exit"] != 0
    assert "build" not in results["steps"]
    assert "no CUDA GPU visible" in (tmp_path / "gpu_check.log").read_text()
    assert (tmp_path / "summary.txt").read_text().rstrip().endswith("verdict: FAILED")


def test_gpu_check_killed_still_writes_its_summary(tmp_path):
    """TERM from outside (a device tool's time limit) still leaves the
    summary and the log of the steps done in OUTDIR."""
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.Popen(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-smoke", str(tmp_path)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    log = tmp_path / "gpu_check.log"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and "=== tests_" not in (log.read_text() if log.exists() else ""):
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out[-3000:]
    assert "interrupted" in log.read_text()
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["steps"]["env"]["exit"] == 0 and "import" in results["steps"]
    assert (tmp_path / "summary.txt").exists()


def test_sanitizer_verdicts():
    """Each compute-sanitizer tool's last line, as the H200 run printed it,
    gives a verdict; racecheck's summary line differs from the others'."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_summary
    finally:
        sys.path.pop(0)
    step = {"skipped": False, "exit": 0}
    ok = "gpu_workload: 336 forward+backward calls on cuda, 0 mismatches\n"
    race_clean = ok + "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n"
    race_bad = ok + "========= RACECHECK SUMMARY: 3 hazards displayed (2 errors, 1 warnings)\n"
    assert gpu_summary.sanitizer_verdict(race_clean, step)["verdict"] == "clean"
    assert gpu_summary.sanitizer_verdict(race_bad, step) == {"verdict": "ERRORS", "errors": 2,
                                                              "workload_ok": True, "exit": 0}
    assert gpu_summary.sanitizer_verdict(ok + "========= ERROR SUMMARY: 0 errors\n", step)["verdict"] == "clean"
    assert gpu_summary.sanitizer_verdict("========= ERROR SUMMARY: 1 error\n", step)["verdict"] == "ERRORS"
    assert gpu_summary.sanitizer_verdict("Device not supported\n", step)["verdict"] == "unavailable"
    assert gpu_summary.sanitizer_verdict("", None)["verdict"] == "not run"



def _ncu_block(kernel: str, us: float, read_mb: float, write_mb: float, pct: float) -> str:
    """One kernel's section of an ncu --metrics report, as the H200 run
    printed it, with the time in ms and the reads in Gbyte when large."""
    time = ("ms", f"{us / 1e3:.4f}") if us >= 1000 else ("us", f"{us:.2f}")
    read = ("Gbyte", f"{read_mb / 1e3:.4f}") if read_mb >= 1000 else ("Mbyte", f"{read_mb:.2f}")
    return (f"  void (anonymous namespace)::lip_kernel_entry<{kernel}, ForwardArgs<float, float, float>>(T2) "
            "(100352, 1, 1)x(128, 1, 1), Context 1, Stream 7, Device 0, CC 9.0\n"
            "    Section: Command line profiler metrics\n"
            "    -------------------------------------------------- ----------- ------------\n"
            "    Metric Name                                        Metric Unit Metric Value\n"
            "    -------------------------------------------------- ----------- ------------\n"
            f"    dram__bytes_read.sum                                     {read[0]:>5} {read[1]:>12}\n"
            f"    dram__bytes_write.sum                                    Mbyte {write_mb:>12.2f}\n"
            f"    dram__throughput.avg.pct_of_peak_sustained_elapsed           % {pct:>12.2f}\n"
            f"    gpu__time_duration.sum                                  {time[0]:>6} {time[1]:>12}\n"
            "    -------------------------------------------------- ----------- ------------\n\n")


def test_ncu_report_is_tabulated():
    """gpu_summary turns the ncu step's report into one row per kernel:
    random figures in both units ncu uses come back, in us and MB; the
    committed H200 report gives a complete row for each of its kernels."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_summary
    finally:
        sys.path.pop(0)
    rng = random.Random()
    cases = [(f"FastForwardPlanes<3, 2, 1, float, float, float{'' if i == 0 else ', ' + str(i)}>",
              rng.uniform(10, 3000), rng.uniform(50, 3000), rng.uniform(10, 900), rng.uniform(5, 95))
             for i in range(4)]
    text = "==PROF== Connected to process 2614\n" + "".join(_ncu_block(*c) for c in cases)
    rows = gpu_summary.ncu_kernels(text)
    assert len(rows) == len(cases)
    for row, (kernel, us, read_mb, write_mb, pct) in zip(rows, cases):
        assert row["kernel"] == kernel
        assert row["us"] == pytest.approx(us, rel=1e-3) and row["read_mb"] == pytest.approx(read_mb, rel=1e-3)
        assert row["write_mb"] == pytest.approx(write_mb, abs=0.01)
        assert row["dram_pct_of_peak"] == pytest.approx(pct, abs=0.01)
        assert row["gbps"] == pytest.approx((read_mb + write_mb) / us * 1e3, rel=2e-3)
    committed = (ROOT / "benchmarks/results/gpu_h200_a03eee0/ncu.txt").read_text()
    rows = gpu_summary.ncu_kernels(committed)
    assert len(rows) == committed.count("gpu__time_duration.sum") > 0
    assert all(None not in row.values() for row in rows)


TARGETS = {  # the fast-kernels issue's targets, as gpu_summary.target_lines words them
    "eager": (">= 3x eager", 3.0), "compile": (">= 1.0x torch.compile", 1.0),
    "copy": (">= 80% of copy bandwidth", 0.8), "train": (">= 1.15x LIP-ResNet-50 training step", 1.15),
}


@pytest.mark.parametrize("target", list(TARGETS))
def test_targets_met_at_their_limit_and_missed_below_it(target):
    """A worst case exactly at a target's limit meets it, one just below
    misses it: the worst of several cases (not the best) decides."""
    import random

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_summary
    finally:
        sys.path.pop(0)
    label, limit = TARGETS[target]

    def verdict(worst):
        values = [worst] + [limit * random.uniform(1.01, 3) for _ in range(3)]
        random.shuffle(values)
        rows, train = [], {}
        for i, v in enumerate(values):
            row = {"layer": "large", "dtype": "float32", "layout": f"l{i}",
                   "fast_vs_reference": 2 * TARGETS["eager"][1], "fast_vs_compiled": 2 * TARGETS["compile"][1],
                   "fused_fast_copy_fraction": 1.0}
            key = {"eager": "fast_vs_reference", "compile": "fast_vs_compiled", "copy": "fused_fast_copy_fraction"}
            if target in key:
                row[key[target]] = v
            rows.append(row)
            f_ms = 2.0 ** random.randint(0, 6)  # a power of two: reference / fused is the ratio exactly
            ratio = v if target == "train" else 2 * TARGETS["train"][1]
            train[f"train_{i}_fast"] = {"results": {"fused": {"step_ms_median": f_ms},
                                                    "reference": {"step_ms_median": ratio * f_ms}}}
        lines = gpu_summary.target_lines(rows, train)
        (line,) = [l for l in lines if l.startswith(label)]
        assert all(": met (worst" in l for l in lines if l != line), lines
        return line

    assert ": met (worst" in verdict(limit)
    assert ": MISSED (worst" in verdict(limit * (1 - 1e-9))
