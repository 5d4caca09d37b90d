"""Report of a benchmark results file: table, summary and plot, from the JSON alone.

``bench_lip.py`` measures and writes the JSON (and prints this report at the
end of a run); this module turns any such JSON into the text table, the
per-dtype/layout summary and a PNG, so a committed results file can be
re-reported or re-plotted without re-measuring. It also plots the
training-step JSON of ``bench_train.py``.

Reliability: a row is *unreliable* when its fwd+bwd times spread by more
than ``SPREAD_LIMIT`` (half the 20-80 percentile range over the median) or
when its fwd+bwd median is far from its forward + backward medians (ratio
outside ``CONSISTENT_RANGE``): both mean the machine did something else
while it was timed. ``bench_lip.py`` re-measures such rows; what stays
unreliable is marked in the table (``timing`` column, ``?`` on speedups)
and left out of the summary's geomean/min/max, which says so. See
docs/benchmarking.md.

Examples::

    python benchmarks/report.py benchmarks/results/cpu_xeon.json
    python benchmarks/report.py benchmarks/results/cpu_xeon.json --plot benchmarks/results/cpu_xeon.png
    python benchmarks/report.py benchmarks/results/train_cpu.json --plot benchmarks/results/train_cpu.png
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

DTYPES = ("float32", "bfloat16", "float16")
LAYOUTS = ("contiguous", "channels_last")
BASELINES = ("reference", "compiled", "converted")
NAN_MARK = "NaN/inf"
#: Half the 20-80 percentile range of fwd+bwd times over their median above which a row is noisy.
SPREAD_LIMIT = 0.15
#: fwd+bwd / (forward + backward) outside this range: the three passes disagree.
CONSISTENT_RANGE = (0.75, 1.33)
#: CPU runs during which other processes used at least this share of all CPUs get a warning.
BUSY_FRACTION = 0.05

Doc = dict[str, Any]
Row = dict[str, Any]


# --------------------------------------------------------------------------- reliability


def spread(row: Row, key: str = "fwd_bwd") -> Optional[float]:
    """Half the 20-80 percentile range of a pass over its median (0.05 = +-5%), or None."""
    median = row.get(f"{key}_ms")
    p = (row.get("p20_p80_ms") or {}).get(key)
    if not median or not p:
        return None
    return (p[1] - p[0]) / (2 * median)


def consistency(row: Row) -> Optional[float]:
    """fwd+bwd median over forward + backward medians (about 1 when the passes agree)."""
    f, b, fb = row.get("forward_ms"), row.get("backward_ms"), row.get("fwd_bwd_ms")
    if not f or not b or not fb:
        return None
    return fb / (f + b)


def unreliable_reasons(row: Row) -> list[str]:
    """Why a row's timings cannot be trusted ([] when they can); computed from the row alone."""
    if row.get("error"):
        return []
    reasons = []
    s = spread(row)
    if s is not None and s > SPREAD_LIMIT:
        reasons.append("noisy")
    c = consistency(row)
    if c is not None and not CONSISTENT_RANGE[0] <= c <= CONSISTENT_RANGE[1]:
        reasons.append("f+b!=f,b")
    return reasons


# --------------------------------------------------------------------------- speedups


def case_key(row: Row) -> tuple:
    return (row["layer"], tuple(row["shape"]), row["dtype"], row["layout"])


def speedups(rows: list[Row]) -> list[dict[str, Any]]:
    """Fused speedup (baseline time / fused time) per case and baseline; ``reliable`` when both rows are."""
    by_case: dict[tuple, dict[str, Row]] = {}
    for r in rows:
        by_case.setdefault(case_key(r), {})[r["impl"]] = r
    out = []
    for (layer, shape, dtype, layout), impls in by_case.items():
        fused = impls.get("fused")
        for base in BASELINES:
            b = impls.get(base)
            if fused is None or b is None or fused.get("error") or b.get("error"):
                continue
            out.append({
                "layer": layer, "shape": list(shape), "dtype": dtype, "layout": layout, "baseline": base,
                "forward": ratio(b.get("forward_ms"), fused.get("forward_ms")),
                "backward": ratio(b.get("backward_ms"), fused.get("backward_ms")),
                "fwd_bwd": ratio(b.get("fwd_bwd_ms"), fused.get("fwd_bwd_ms")),
                "reliable": not unreliable_reasons(fused) and not unreliable_reasons(b),
            })
    return out


def ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    return None if num is None or not den else num / den


def geomean(values: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


# --------------------------------------------------------------------------- table


def shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


def fmt(value: Optional[float], spec: str, missing: str) -> str:
    return missing if value is None else format(value, spec)


TABLE_COLUMNS = ("layer", "shape", "dtype", "layout", "impl", "fwd ms", "bwd ms", "f+b ms", "+-%", "timing",
                 "GB/s", "%copy", "extra MiB", "output", "spd fwd", "spd bwd", "spd f+b")


def is_gpu(doc: Doc) -> bool:
    if "device_type" in doc:
        return doc["device_type"] == "cuda"
    return doc.get("copy_gbps") is not None or any(r.get("fwd_bwd_gbps") is not None for r in doc["results"])


def table_rows(doc: Doc) -> list[list[str]]:
    rows, gpu, na = doc["results"], is_gpu(doc), "n/a"
    spd = {(s["layer"], tuple(s["shape"]), s["dtype"], s["layout"], s["baseline"]): s for s in speedups(rows)}
    out = []
    for r in rows:
        s = spd.get((*case_key(r), r["impl"]))
        err = "ERROR" if r.get("error") else "-"
        reasons = unreliable_reasons(r)
        extra = r.get("extra_peak_bytes")
        out.append([
            r["layer"], shape_str(r["shape"]), r["dtype"], r["layout"], r["impl"],
            fmt(r.get("forward_ms"), ".3f", err), fmt(r.get("backward_ms"), ".3f", err),
            fmt(r.get("fwd_bwd_ms"), ".3f", err),
            fmt(None if spread(r) is None else 100 * spread(r), ".0f", "-"),
            ",".join(reasons) if reasons else ("-" if r.get("error") else "ok"),
            fmt(r.get("fwd_bwd_gbps"), ".0f", "-") if gpu else na,
            fmt(None if r.get("copy_fraction") is None else 100 * r["copy_fraction"], ".0f", "-") if gpu else na,
            fmt(None if extra is None else extra / 2**20, ".1f", "-") if gpu else na,
            "ERROR" if r.get("error") else ("ok" if r.get("finite") else NAN_MARK),
            *(speedup_cell(s, k) for k in ("forward", "backward", "fwd_bwd")),
        ])
    return out


def speedup_cell(s: Optional[dict[str, Any]], key: str) -> str:
    """'2.31x' on baseline rows ('2.31x?' when either row is unreliable); blank on fused rows."""
    if s is None:
        return ""
    if s[key] is None:
        return "-"
    return f"{s[key]:.2f}x" + ("" if s["reliable"] else "?")


def render_table(header: Sequence[str], rows: list[list[str]], separate_on: int = 0) -> str:
    """Fixed-width table; text columns left-aligned, numbers right-aligned; a rule between groups."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    text = {0, 1, 2, 3, 4, 9}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i in text else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    prev = None
    for r in rows:
        if prev is not None and r[separate_on] != prev:
            out.append("")
        prev = r[separate_on]
        out.append(line(r))
    return "\n".join(out)


# --------------------------------------------------------------------------- summary


def summary_lines(doc: Doc) -> list[str]:
    """Per baseline, dtype and layout: fwd+bwd speedup geomean/min/max over the reliable layers."""
    lines = []
    spd = [s for s in speedups(doc["results"]) if s["fwd_bwd"] is not None]
    for base in BASELINES:
        for dtype in DTYPES:
            for layout in LAYOUTS:
                vals = [s for s in spd if (s["baseline"], s["dtype"], s["layout"]) == (base, dtype, layout)]
                if vals:
                    lines.append(summary_line(base, dtype, layout, vals))
    return lines


def summary_line(base: str, dtype: str, layout: str, vals: list[dict[str, Any]]) -> str:
    good = [s for s in vals if s["reliable"]]
    bad = [s for s in vals if not s["reliable"]]
    head = f"fused vs {base:<9} {dtype:<8} {layout:<13}: "
    left_out = ("; unreliable, left out: " + ", ".join(f"{s['layer']} ({s['fwd_bwd']:.2f}x)" for s in bad)
                if bad else "")
    if not good:
        return head + f"no reliable layer{left_out}"
    lo = min(good, key=lambda s: s["fwd_bwd"])
    hi = max(good, key=lambda s: s["fwd_bwd"])
    slower = sum(s["fwd_bwd"] < 1.0 for s in good)
    return (head + f"fwd+bwd speedup geomean {geomean([s['fwd_bwd'] for s in good]):.2f}x, "
            f"min {lo['fwd_bwd']:.2f}x ({lo['layer']}), max {hi['fwd_bwd']:.2f}x ({hi['layer']}) "
            f"over {len(good)}/{len(vals)} layers; fused slower in {slower}/{len(good)}{left_out}")


def contention_lines(doc: Doc) -> list[str]:
    """How much other processes used the CPUs during the run, with a warning when it matters."""
    c = doc.get("cpu_contention") or {}
    lines = []
    if c.get("other_cpu_s") is not None:
        cpus = doc.get("cpu_count")
        on = f" on {cpus} CPUs" if cpus else ""
        lines.append(f"other processes during the run: {c['other_cpu_s']:.1f} CPU-s over {c['wall_s']:.1f} s wall"
                     f"{on} ({100 * c['other_cpu_fraction']:.0f}% of the machine), steal {c['steal_s']:.1f} s")
    if (c.get("other_cpu_fraction") or 0) >= BUSY_FRACTION:
        lines.append("WARNING: other processes competed for the CPUs during the run: "
                     "these CPU timings are unreliable.")
    return lines


def report_text(doc: Doc) -> str:
    """The whole text report of a bench_lip JSON document."""
    rows, gpu = doc["results"], is_gpu(doc)
    k, s, p = doc.get("kernel_size", 3), doc.get("stride", 2), doc.get("padding", 1)
    model = doc.get("bytes_per_elem_model") or {}
    head = [
        f"LIP pooling benchmark (k={k}, s={s}, p={p}; x ~ randn, logit = 12*sigmoid(randn))",
        f"device: {doc['device']} ({'cuda' if gpu else 'cpu'}) | torch {doc['torch']} | cuda {doc['cuda']} | "
        f"threads {doc['num_threads']} | batch {doc.get('batch', '?')} | kernels {doc.get('kernels', 'default')} "
        f"| load avg {fmt(doc.get('load_avg_1min_at_start'), '.2f', 'n/a')} | commit {doc['commit']}",
        f"timing: {doc['timing']}",
        "copy bandwidth: " + (f"{doc['copy_gbps']:.0f} GB/s (device-to-device copy_, 2 x bytes)"
                              if doc.get("copy_gbps") else "n/a on CPU (not measured)"),
    ]
    if not gpu:
        head += contention_lines(doc)
    head.append("")
    foot = [
        "",
        "ms: medians; +-% = half the 20-80 percentile range of fwd+bwd times, relative to the median. "
        "spd = this impl's time / fused time (>1: fused faster), on baseline rows.",
        f"timing: ok, or unreliable: noisy = +-% over {100 * SPREAD_LIMIT:.0f}; f+b!=f,b = fwd+bwd median outside "
        f"{CONSISTENT_RANGE[0]}-{CONSISTENT_RANGE[1]} x (fwd + bwd medians); '?' marks speedups that use such a row "
        "(left out of the summary). "
        + ("Such rows were re-measured ('attempts' in the JSON)." if any("attempts" in r for r in rows)
           else "(This file predates re-measuring: its rows were measured once.)"),
        f"output: ok = forward output and both gradients finite; {NAN_MARK} = some are NaN or inf "
        "(float16 reference: exp(12) = 162754 > 65504 overflows).",
    ]
    if gpu:
        total = model.get("forward", 2.5) + model.get("backward", 4.75)
        foot.append(f"GB/s = {total} * numel * elem_size / fwd+bwd time (fused byte model, docs/benchmarking.md, "
                    "same for every impl); %copy = GB/s / copy bandwidth; extra MiB = peak allocated during one "
                    "fwd+bwd beyond memory allocated before it (includes y, dx, dlogit).")
    else:
        foot.append("GB/s, %copy, extra MiB: n/a on CPU (bandwidth model and allocator peak stats are "
                    "GPU-only; JSON has null, nothing is estimated).")
    foot += [f"ERROR {r['layer']} {r['dtype']} {r['layout']} {r['impl']}: {r['error']}" for r in rows if r.get("error")]
    summary = summary_lines(doc)
    body = render_table(TABLE_COLUMNS, table_rows(doc))
    return "\n".join(head + [body] + foot + ([""] + summary if summary else []))


# --------------------------------------------------------------------------- plots


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_title(doc: Doc, what: str) -> str:
    dev = "GPU" if is_gpu(doc) else "CPU"
    batch = doc.get("batch") or (doc.get("config") or {}).get("batch")
    threads = doc.get("num_threads") or doc.get("threads")
    extra = f", {threads} threads" if threads and dev == "CPU" else ""
    return f"{what}\n{doc['device']} ({dev}{extra}), batch {batch}, torch {doc['torch']}"


def write_plot(path: Path, doc: Doc) -> bool:
    """PNG of a results JSON: bench_lip speedups, or a bench_train step-time chart. False without matplotlib."""
    plt = _pyplot()
    if plt is None:
        print(f"--plot: matplotlib is not installed (pip install -e .[plot]); skipped {path}", flush=True)
        return False
    fig = plot_train(plt, doc) if doc.get("benchmark") == "bench_train" else plot_speedups(plt, doc)
    if fig is None:
        print("--plot: nothing to plot", flush=True)
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}", flush=True)
    return True


def plot_speedups(plt, doc: Doc):
    """Bars of fused fwd+bwd speedup per layer, one colour per dtype, one panel per baseline x layout.

    Unreliable speedups are hatched and faded; the legend sits outside the panels.
    """
    spd = [s for s in speedups(doc["results"]) if s["fwd_bwd"] is not None]
    if not spd:
        return None
    bases = [b for b in BASELINES if any(s["baseline"] == b for s in spd)]
    layouts = [l for l in LAYOUTS if any(s["layout"] == l for s in spd)]
    layers = list(dict.fromkeys(s["layer"] for s in spd))
    dtypes = [d for d in DTYPES if any(s["dtype"] == d for s in spd)]
    fig, axes = plt.subplots(len(bases), len(layouts), squeeze=False, layout="constrained",
                             figsize=(max(5.5, 1.0 * len(layers)) * len(layouts) + 1.6, 3.4 * len(bases) + 0.8))
    width = 0.8 / len(dtypes)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    top = max(s["fwd_bwd"] for s in spd)
    for i, base in enumerate(bases):
        for j, layout in enumerate(layouts):
            ax = axes[i][j]
            for k, dtype in enumerate(dtypes):
                vals = {s["layer"]: s for s in spd
                        if s["baseline"] == base and s["layout"] == layout and s["dtype"] == dtype}
                for n, layer in enumerate(layers):
                    s = vals.get(layer)
                    if s is None:
                        continue
                    x = n + (k - (len(dtypes) - 1) / 2) * width
                    ax.bar(x, s["fwd_bwd"], width, color=colors[k % len(colors)],
                           alpha=1.0 if s["reliable"] else 0.35, hatch=None if s["reliable"] else "//",
                           edgecolor="black" if not s["reliable"] else None, linewidth=0.5)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xticks(range(len(layers)), layers)
            ax.set_ylim(0, top * 1.08)
            ax.set_ylabel("speedup (x), >1: fused faster")
            ax.set_title(f"fused vs {base}, {layout}", fontsize="medium")
    from matplotlib.patches import Patch

    handles = [Patch(color=colors[k % len(colors)], label=d) for k, d in enumerate(dtypes)]
    if not all(s["reliable"] for s in spd):
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="unreliable timing"))
    fig.legend(handles=handles, loc="outside right upper", fontsize="small", title="dtype")
    fig.suptitle(plot_title(doc, "LIP fwd+bwd speedup of the fused op (median times)"), fontsize="medium")
    return fig


def plot_train(plt, doc: Doc):
    """Median training-step time per variant, with its 20-80 percentile range, and the ratio."""
    res = doc.get("results") or {}
    variants = [v for v in ("fused", "reference") if v in res]
    if not variants:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.8), layout="constrained")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for n, v in enumerate(variants):
        times = res[v].get("step_ms_all") or [res[v]["step_ms_median"]]
        med = res[v]["step_ms_median"]
        lo, hi = (statistics.quantiles(times, n=5, method="inclusive")[::3] if len(times) > 1 else (med, med))
        ax.bar(n, med, 0.6, color=colors[n], yerr=[[med - lo], [hi - med]], capsize=6)
        ax.text(n, med / 2, f"{med:.0f} ms", ha="center", color="white", fontsize="medium")
    ax.set_xticks(range(len(variants)), variants)
    ax.set_ylabel("step time (ms), median, bar: 20-80%")
    cfg = doc.get("config") or {}
    what = (f"{doc.get('model', 'LIP-ResNet')} SGD step, {cfg.get('size', '?')}px, {cfg.get('dtype', '?')}"
            + (", channels_last" if cfg.get("channels_last") else ""))
    if len(variants) == 2:
        r = res["reference"]["step_ms_median"] / res["fused"]["step_ms_median"]
        what += f": reference / fused = {r:.2f}x"
    fig.suptitle(plot_title(doc, what), fontsize="medium")
    return fig


# --------------------------------------------------------------------------- CLI


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Print the report of a bench_lip.py JSON file; --plot writes its PNG "
                                "(bench_train.py JSON files: plot only).")
    p.add_argument("json", type=Path, help="results file written by bench_lip.py --json (or bench_train.py --json)")
    p.add_argument("--plot", type=Path, default=None, metavar="PATH", help="write a PNG (needs matplotlib)")
    args = p.parse_args(argv)
    doc = json.loads(args.json.read_text())
    if "results" not in doc and isinstance(doc.get("bench"), dict):
        # gpu_check.sh's results.json: its kernel benchmark runs, by variant
        runs = {name: run for name, run in doc["bench"].items() if isinstance(run, dict) and "results" in run}
        if not runs:
            print(f"{args.json}: a gpu_check results file without kernel benchmark rows", file=sys.stderr)
            return 1
        for name, run in runs.items():
            print(f"== gpu_check benchmark run '{name}'", flush=True)
            print(report_text(run), flush=True)
        if args.plot:
            write_plot(args.plot, runs.get("fast") or next(iter(runs.values())))
        return 0
    if "results" not in doc and doc.get("benchmark") != "bench_train":
        print(f"{args.json}: not a bench_lip.py, bench_train.py or gpu_check.sh results file", file=sys.stderr)
        return 1
    if doc.get("benchmark") != "bench_train":
        print(report_text(doc), flush=True)
    if args.plot:
        write_plot(args.plot, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
