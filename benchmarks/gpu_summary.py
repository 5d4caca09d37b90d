"""Summary of a benchmarks/gpu_check.sh run: results.json and summary.txt.

Reads the step records, logs and JSON files that gpu_check.sh left in its
work folder and writes, into the output folder, results.json (everything
measured, with the device and the commit) and summary.txt (tests, sanitizer
verdicts, the speedup table against eager and torch.compile, the training
step), which it also prints. Exit status 1 when a test failed, a sanitizer
reported errors, or the build failed.

    python benchmarks/gpu_summary.py WORK_DIR OUT_DIR [--mode gpu|cpu]
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]


def read_steps(work: Path) -> Dict[str, Dict[str, Any]]:
    steps: Dict[str, Dict[str, Any]] = {}
    path = work / "steps"
    if path.exists():
        for line in path.read_text().splitlines():
            name, rc, seconds = line.split()
            steps[name] = {"exit": None if rc == "skipped" else int(rc), "seconds": int(seconds),
                           "skipped": rc == "skipped", "timed_out": rc in ("124", "137")}
    return steps


def log_of(work: Path, name: str) -> str:
    path = work / f"{name}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def pytest_counts(text: str) -> Optional[Dict[str, int]]:
    """passed/failed/skipped/errors from pytest's closing line."""
    lines = [l for l in text.splitlines() if re.search(r"\d+ (passed|failed|error)", l)]
    if not lines:
        return None
    counts = {key: 0 for key in ("passed", "failed", "skipped", "errors")}
    for number, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", lines[-1]):
        key = "errors" if word.startswith("error") else word
        if key in counts:
            counts[key] = int(number)
    return counts


_NCU_SCALE = {"byte": 1e-6, "Kbyte": 1e-3, "Mbyte": 1.0, "Gbyte": 1e3,
              "ns": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3, "nsecond": 1e-3}


def ncu_kernels(text: str) -> List[Dict[str, Any]]:
    """One row per kernel of the ncu step's report: the kernel's template
    arguments, time (us), DRAM MB read and written, GB/s over its time and
    ncu's DRAM throughput as a % of peak."""
    rows = []
    for block in re.split(r"\n  (?=\S.*lip_kernel_entry<)", "\n" + text)[1:]:
        name = re.search(r"lip_kernel_entry<(\w+)<([^>]*)>", block)
        metrics = {m.group(1): float(m.group(3).replace(",", "")) * _NCU_SCALE.get(m.group(2), float("nan"))
                   for m in re.finditer(r"^\s+([a-z_]+__\S+)\s+(\S+)\s+([\d.,]+)\s*$", block, re.M)}
        pct = re.search(r"dram__throughput\.avg\.pct_of_peak_sustained_elapsed\s+%\s+([\d.]+)", block)
        if name is None or "gpu__time_duration.sum" not in metrics:
            continue
        us = metrics["gpu__time_duration.sum"]
        read, write = metrics.get("dram__bytes_read.sum"), metrics.get("dram__bytes_write.sum")
        args = name.group(2).replace("c10::BFloat16", "bf16").replace("c10::Half", "half")
        rows.append({"kernel": f"{name.group(1)}<{', '.join(a.strip() for a in args.split(','))}>", "us": us,
                     "read_mb": read, "write_mb": write,
                     "gbps": (read + write) / us * 1e3 if read is not None and write is not None and us else None,
                     "dram_pct_of_peak": float(pct.group(1)) if pct else None})
    return rows


def sanitizer_verdict(text: str, step: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    if step is None:
        return {"verdict": "not run"}
    if step["skipped"]:
        return {"verdict": "skipped (out of time)"}
    # memcheck/initcheck/synccheck end with "ERROR SUMMARY: N errors",
    # racecheck with "RACECHECK SUMMARY: N hazards displayed (E errors, W warnings)"
    match = re.search(r"ERROR SUMMARY: (\d+) error", text) or re.search(
        r"RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) error", text)
    if match is None:
        tail = " | ".join(text.strip().splitlines()[-3:])
        return {"verdict": "unavailable", "detail": tail[-300:], "exit": step["exit"]}
    errors = int(match.group(1))
    workload_ok = "0 mismatches" in text
    return {"verdict": "clean" if errors == 0 and workload_ok else "ERRORS", "errors": errors,
            "workload_ok": workload_ok, "exit": step["exit"]}


def load_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def speedup_table(runs: Dict[str, Optional[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """One row per (layer, dtype, layout): fwd+bwd medians and the fused
    variants' speedups over eager and torch.compile of the reference.
    runs: bench JSONs by name; a fused row counts as fused_<name> (the kernel
    variant the run used), other impls by their own name."""
    times: Dict[tuple, Dict[str, Any]] = {}
    for name, data in runs.items():
        for rec in (data or {}).get("results", []):
            if rec.get("error") or rec.get("fwd_bwd_ms") is None:
                continue
            key = (rec["layer"], rec["dtype"], rec["layout"])
            impl = rec["impl"] if rec["impl"] != "fused" else f"fused_{name}"
            row = times.setdefault(key, {"layer": key[0], "dtype": key[1], "layout": key[2]})
            row[f"{impl}_ms"] = rec["fwd_bwd_ms"]
            if rec["impl"] == "fused":
                row[f"{impl}_copy_fraction"] = rec.get("copy_fraction")
            if rec.get("unreliable"):
                row.setdefault("unreliable", []).append(impl)
    for row in times.values():
        for variant in ("generic", "fast"):
            fused = row.get(f"fused_{variant}_ms")
            for base in ("reference", "compiled"):
                if fused and row.get(f"{base}_ms"):
                    row[f"{variant}_vs_{base}"] = row[f"{base}_ms"] / fused
    return list(times.values())


def target_lines(rows: List[Dict[str, Any]], train: Dict[str, Any]) -> List[str]:
    """Each target with the worst measured case: met, MISSED, or not measured."""
    def verdict(name: str, values: List[tuple], limit: float) -> str:
        if not values:
            return f"{name}: not measured"
        worst = min(values)
        return f"{name}: {'met' if worst[0] >= limit else 'MISSED'} (worst {worst[0]:.2f} at {worst[1]})"

    def where(r: Dict[str, Any]) -> str:
        return f"{r['layer']} {r['dtype']} {r['layout']}"

    out = [verdict(">= 3x eager, every layer", [(r["fast_vs_reference"], where(r)) for r in rows
                                                 if "fast_vs_reference" in r], 3.0),
           verdict(">= 1.0x torch.compile, every layer", [(r["fast_vs_compiled"], where(r)) for r in rows
                                                          if "fast_vs_compiled" in r], 1.0)]
    largest = [r for r in rows if r["layer"] == "large" and r.get("fused_fast_copy_fraction") is not None]
    out.append(verdict(">= 80% of copy bandwidth, largest layer",
                       [(r["fused_fast_copy_fraction"], where(r)) for r in largest], 0.8))
    ratios = []
    for name, data in train.items():
        res = (data or {}).get("results", {})
        f_ms = res.get("fused", {}).get("step_ms_median")
        r_ms = res.get("reference", {}).get("step_ms_median")
        if name.endswith("_fast") and f_ms and r_ms:
            ratios.append((r_ms / f_ms, name))
    out.append(verdict(">= 1.15x LIP-ResNet-50 training step", ratios, 1.15))
    return out


def fmt(value: Optional[float], spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--mode", choices=("gpu", "cpu"), default="gpu")
    ap.add_argument("--variants", default="generic fast",
                    help="the kernel variants whose tests ran (gpu_check.sh --quick: fast alone)")
    args = ap.parse_args()
    work, out = args.work, args.out
    steps = read_steps(work)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        # The device tool copies the working tree but may carry an older .git
        # (seen: the session's starting commit), so say whether they differ.
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                 capture_output=True, text=True).stdout.splitlines()
        if commit and changed:
            commit += f" plus {len(changed)} changed tracked files (the tree that ran is newer)"
    except OSError:
        commit = None

    results: Dict[str, Any] = {"mode": args.mode, "commit": commit, "steps": steps,
                               "environment": log_of(work, "env").strip().splitlines()}
    results["tests"] = {v: pytest_counts(log_of(work, f"tests_{v}")) for v in args.variants.split()}
    results["sanitizer"] = {tool: sanitizer_verdict(log_of(work, f"sanitizer_{tool}"), steps.get(f"sanitizer_{tool}"))
                            for tool in ("memcheck", "racecheck", "initcheck", "synccheck")}
    if (work / "sanitizer_missing").exists():
        results["sanitizer"] = {tool: {"verdict": "unavailable (compute-sanitizer not found)"}
                                for tool in results["sanitizer"]}
    bench = {p.stem[len("bench_"):]: load_json(p) for p in sorted(work.glob("bench_*.json"))}
    bench.setdefault("generic", None)
    bench.setdefault("fast", None)
    results["bench"] = bench
    results["speedups"] = speedup_table(bench)
    results["train"] = {p.stem: load_json(p) for p in sorted(work.glob("train_*.json"))}
    results["workload"] = log_of(work, "workload").strip().splitlines()[-1:] if args.mode == "cpu" else None
    results["ncu"] = log_of(work, "ncu")[-20000:] or None
    results["ncu_kernels"] = ncu_kernels(log_of(work, "ncu"))

    lines = [f"gpu_check ({args.mode}) at commit {commit}"]
    lines += [f"  {l}" for l in results["environment"]]
    failed = False
    for name, step in steps.items():
        if step["exit"] not in (0, None) and not name.startswith(("sanitizer_", "ncu")):
            lines.append(f"  step {name}: exit {step['exit']}{' (timed out)' if step['timed_out'] else ''}")
            if name in ("gpu_visible", "build", "import") or name.startswith("tests_"):
                failed = True
            # a benchmark or training step that failed (not one cut by its
            # time limit) left no numbers: the run is not ok
            if name.startswith(("bench_", "train_", "workload")) and not step["timed_out"]:
                failed = True
    if steps.get("build", {}).get("exit") not in (0, None):
        lines.append("  BUILD FAILED: see gpu_check.log")
    lines.append("tests (CUDA tests on the GPU; emulated-kernel tests in --cpu-smoke):")
    for variant, counts in results["tests"].items():
        lines.append(f"  {variant}: {counts if counts else 'no result'}")
        if counts is None or counts["failed"] or counts["errors"] or not counts["passed"]:
            failed = True
    lines.append("compute-sanitizer over benchmarks/gpu_workload.py:")
    for tool, verdict in results["sanitizer"].items():
        lines.append(f"  {tool}: {verdict['verdict']}" + (f" ({verdict['errors']} errors)" if "errors" in verdict else "")
                     + (f" [{verdict['detail']}]" if verdict.get("detail") else ""))
        if verdict["verdict"] == "ERRORS":
            failed = True
    if results["workload"]:
        lines.append(f"workload: {results['workload'][0]}")
    device = (bench["generic"] or bench["fast"] or {}).get("device")
    copy = (bench["generic"] or bench["fast"] or {}).get("copy_gbps")
    lines.append(f"kernel benchmark (fwd+bwd medians, ms; speedup of fused over eager / torch.compile) on {device}"
                 + (f", copy {copy:.0f} GB/s" if copy else "") + ":")
    lines.append(f"  {'layer':<6} {'dtype':<9} {'layout':<14} {'eager':>8} {'compile':>8} {'generic':>8} "
                 f"{'x eager':>7} {'x comp':>6} {'fast':>8} {'x eager':>7} {'x comp':>6} {'%copy':>6}")
    for r in results["speedups"]:
        frac = r.get("fused_fast_copy_fraction")
        lines.append(
            f"  {r['layer']:<6} {r['dtype']:<9} {r['layout']:<14} {fmt(r.get('reference_ms'), '8.3f')} "
            f"{fmt(r.get('compiled_ms'), '8.3f')} {fmt(r.get('fused_generic_ms'), '8.3f')} "
            f"{fmt(r.get('generic_vs_reference'), '6.2f', 'x')} {fmt(r.get('generic_vs_compiled'), '5.2f', 'x')} "
            f"{fmt(r.get('fused_fast_ms'), '8.3f')} {fmt(r.get('fast_vs_reference'), '6.2f', 'x')} "
            f"{fmt(r.get('fast_vs_compiled'), '5.2f', 'x')} {fmt(None if frac is None else 100 * frac, '5.0f', '%')}"
            + (f"  unreliable: {','.join(r['unreliable'])}" if r.get("unreliable") else ""))
    lines.append("training step (LIP-ResNet-50, median ms; reference / fused):")
    for name, data in results["train"].items():
        res = (data or {}).get("results", {})
        fused, ref = res.get("fused", {}), res.get("reference", {})
        f_ms, r_ms = fused.get("step_ms_median"), ref.get("step_ms_median")
        ratio = r_ms / f_ms if f_ms and r_ms else None
        lines.append(f"  {name}: fused {fmt(f_ms, '.1f')} ms, reference {fmt(r_ms, '.1f')} ms, "
                     f"ratio {fmt(ratio, '.2f', 'x')}")
    if results["ncu_kernels"]:
        lines.append("ncu, one s2b-sized call per kernel (us, DRAM MB read / written, GB/s, % of DRAM peak):")
        for r in results["ncu_kernels"]:
            lines.append(f"  {r['kernel']:<58} {fmt(r['us'], '8.1f')} {fmt(r['read_mb'], '8.1f')} "
                         f"{fmt(r['write_mb'], '8.1f')} {fmt(r['gbps'], '6.0f')} {fmt(r['dram_pct_of_peak'], '5.1f', '%')}")
    lines.append("targets of the fast-kernels issue (fast variant):")
    for line in target_lines(results["speedups"], results["train"]):
        lines.append(f"  {line}")
    lines.append(f"verdict: {'FAILED' if failed else 'ok'}")

    results["verdict"] = "failed" if failed else "ok"
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    summary = "\n".join(lines) + "\n"
    (out / "summary.txt").write_text(summary)
    print(summary, end="")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
