"""Smoke test for benchmarks/bench_train.py: its main path on the CPU at a
tiny size, one step, checking the JSON it writes."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_report(report: dict, path: Path, *, batch: int, size: int, dtype: str) -> dict:
    on_disk = json.loads(path.read_text())
    assert on_disk == json.loads(json.dumps(report))
    for key in ("device", "device_type", "torch", "commit", "python", "threads", "timestamp", "config", "results", "ratio"):
        assert key in on_disk, key
    assert on_disk["device_type"] == "cpu" and on_disk["device"]
    assert on_disk["torch"] == torch.__version__
    assert on_disk["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", on_disk["commit"])
    cfg = on_disk["config"]
    assert (cfg["batch"], cfg["size"], cfg["dtype"], cfg["steps"]) == (batch, size, dtype, 1)
    assert set(on_disk["results"]) == {"fused", "reference"}
    for name, res in on_disk["results"].items():
        assert res["variant"] == name
        assert res["step_ms_median"] > 0 and len(res["step_ms_all"]) == 1
        assert math.isclose(res["images_per_s"], batch / (res["step_ms_median"] / 1e3), rel_tol=1e-9)
        assert res["loss_finite"] and res["loss_first"] > 0
    ratio = on_disk["ratio"]
    assert ratio["same_initial_weights"] is True
    assert ratio["step_time_reference_over_fused"] > 0
    return on_disk


def test_bench_train_cpu_isolated(bench, tmp_path: Path, capsys) -> None:
    out = tmp_path / "train.json"
    report = bench.main(["--device", "cpu", "--batch", "2", "--size", "64", "--steps", "1",
                         "--warmup", "0", "--num-classes", "10", "--json", str(out)])
    data = _check_report(report, out, batch=2, size=64, dtype="float32")
    assert data["config"]["isolated_processes"] is True
    for res in data["results"].values():
        # Each variant ran in its own process: a real, positive RSS figure.
        assert res["peak_mem_mib"] > 0 and res["peak_extra_mem_mib"] >= 0
    # Same seed in both processes: identical first losses.
    assert data["results"]["fused"]["loss_first"] == pytest.approx(data["results"]["reference"]["loss_first"], rel=1e-5)
    printed = capsys.readouterr().out
    assert "fused" in printed and "reference / fused" in printed


def test_bench_train_cpu_in_process_autocast(bench, tmp_path: Path) -> None:
    out = tmp_path / "train_bf16.json"
    report = bench.main(["--device", "cpu", "--batch", "2", "--size", "64", "--steps", "1", "--warmup", "0",
                         "--dtype", "bfloat16", "--channels-last", "--no-isolate", "--num-classes", "10",
                         "--json", str(out)])
    data = _check_report(report, out, batch=2, size=64, dtype="bfloat16")
    assert data["config"]["isolated_processes"] is False and data["config"]["channels_last"] is True
    # Only the first variant in a shared process gets an honest RSS figure.
    assert data["results"]["fused"]["peak_mem_mib"] > 0
    assert data["results"]["reference"]["peak_mem_mib"] is None


def test_bench_train_rejects_bad_variants(bench) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--variants", "fused,nope"])
