"""setup.py's CUDA toolkit detection (cuda_toolkit.py), on fake toolkit directories.

A fake toolkit is a temporary directory with bin/nvcc and, when it should be
usable, a libcudart.so* in lib64/ or targets/<arch>/lib/. The last tests run
setup.py itself with a fake CUDA_HOME and check that it stops before
compiling with one line that says what to set.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cuda_toolkit import ToolkitError, build_plan, cudart_dir, find_toolkit, problem  # noqa: E402


def fake_toolkit(root: Path, cudart: Optional[str] = "lib64/libcudart.so", nvcc: bool = True) -> Path:
    """A directory shaped like a CUDA toolkit; ``cudart`` is the libcudart path inside it (None: none)."""
    root.mkdir(parents=True)
    if nvcc:
        (root / "bin").mkdir()
        (root / "bin" / "nvcc").write_text("#!/bin/sh\n")
        (root / "bin" / "nvcc").chmod(0o755)
    (root / "lib64").mkdir()
    (root / "lib64" / "libcublas.so").write_text("")  # another library must not count
    if cudart:
        (root / cudart).parent.mkdir(parents=True, exist_ok=True)
        (root / cudart).write_text("")
    return root


def no_nvcc(_: str) -> None:
    return None


@pytest.mark.parametrize("cudart", ["lib64/libcudart.so", "lib64/libcudart.so.13",
                                    "targets/x86_64-linux/lib/libcudart.so.12", "lib/libcudart.so"])
def test_cuda_home_with_cudart_is_used(tmp_path: Path, cudart: str) -> None:
    home = fake_toolkit(tmp_path / "cuda", cudart)
    tk = find_toolkit({"CUDA_HOME": str(home)}, no_nvcc, default_dirs=())
    assert tk.home == str(home)
    assert tk.lib_dir == str((home / cudart).parent)
    assert cudart_dir(str(home)) == tk.lib_dir and problem(str(home)) is None


def test_cuda_home_without_cudart_stops_with_one_line(tmp_path: Path) -> None:
    bad = fake_toolkit(tmp_path / "local", cudart=None)
    good = fake_toolkit(tmp_path / "cuda")
    # An explicit CUDA_HOME is never silently replaced, even when a good toolkit exists.
    with pytest.raises(ToolkitError) as info:
        find_toolkit({"CUDA_HOME": str(bad)}, no_nvcc, default_dirs=(str(good),))
    msg = str(info.value)
    assert "\n" not in msg and f"CUDA_HOME={bad}" in msg and "libcudart" in msg
    assert "LIP_CUDA_FORCE_CPU=1" in msg


def test_cuda_home_without_nvcc_is_unusable(tmp_path: Path) -> None:
    home = fake_toolkit(tmp_path / "cuda", nvcc=False)
    with pytest.raises(ToolkitError, match="bin/nvcc"):
        find_toolkit({"CUDA_HOME": str(home)}, no_nvcc, default_dirs=())


def test_nvcc_wrapper_dir_is_skipped_for_the_default(tmp_path: Path) -> None:
    # This machine's layout: /usr/local/bin/nvcc is a wrapper, /usr/local has no
    # libcudart, and /usr/local/cuda is the real toolkit.
    local = fake_toolkit(tmp_path / "usr_local", cudart=None)
    real = fake_toolkit(tmp_path / "cuda-13.0", "targets/x86_64-linux/lib/libcudart.so.13")
    link = tmp_path / "cuda"
    link.symlink_to(real)
    which = lambda name: str(local / "bin" / name)  # noqa: E731
    tk = find_toolkit({}, which, default_dirs=(str(link),))
    assert Path(tk.home).resolve() == real.resolve()


def test_nvcc_on_path_is_followed_through_symlinks(tmp_path: Path) -> None:
    real = fake_toolkit(tmp_path / "toolkit")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "nvcc").symlink_to(real / "bin" / "nvcc")
    tk = find_toolkit({}, lambda name: str(bindir / name), default_dirs=())
    assert tk.home == str(real)


def test_nothing_usable_names_what_was_tried(tmp_path: Path) -> None:
    a = fake_toolkit(tmp_path / "a", cudart=None)
    with pytest.raises(ToolkitError) as info:
        find_toolkit({}, no_nvcc, default_dirs=(str(a), str(tmp_path / "missing")))
    msg = str(info.value)
    assert "\n" not in msg and str(a) in msg and "missing" in msg and "set CUDA_HOME" in msg


def test_build_plan_cpu_cases(tmp_path: Path) -> None:
    good = fake_toolkit(tmp_path / "cuda")
    bad = fake_toolkit(tmp_path / "bad", cudart=None)
    # CPU build of torch: CPU build, whatever CUDA_HOME says.
    assert build_plan(None, {"CUDA_HOME": str(bad)}, no_nvcc, ()) is None
    # Forced CPU: no toolkit needed.
    assert build_plan("13.0", {"LIP_CUDA_FORCE_CPU": "1", "CUDA_HOME": str(bad)}, no_nvcc, ()) is None
    # CUDA torch: the toolkit, or an error; never a silent CPU build.
    assert build_plan("13.0", {"CUDA_HOME": str(good)}, no_nvcc, ()).home == str(good)
    assert build_plan("13.0", {"LIP_CUDA_FORCE_CPU": "0"}, no_nvcc, (str(good),)).home == str(good)
    with pytest.raises(ToolkitError):
        build_plan("13.0", {}, no_nvcc, (str(bad),))


def run_setup(env_extra: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH", "LIP_CUDA_FORCE_CPU")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "setup.py", "--version"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(torch.version.cuda is None, reason="a CPU build of torch always builds CPU-only")
def test_setup_py_stops_before_compiling(tmp_path: Path) -> None:
    bad = fake_toolkit(tmp_path / "local", cudart=None)
    proc = run_setup({"CUDA_HOME": str(bad)})
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() if l.startswith("lip_cuda setup:")]
    assert len(lines) == 1 and "libcudart" in lines[0] and "LIP_CUDA_FORCE_CPU=1" in lines[0], proc.stderr
    # Forcing the CPU build gets past the check with the same bad CUDA_HOME.
    forced = run_setup({"CUDA_HOME": str(bad), "LIP_CUDA_FORCE_CPU": "1"})
    assert forced.returncode == 0 and forced.stdout.strip().endswith("0.1.0"), forced.stderr


@pytest.mark.parametrize("version", ["2.6.0+cu124", "2.4.1", "1.13.1+cpu"])
def test_setup_py_refuses_a_torch_too_old_for_the_autograd_node(version: str) -> None:
    """Before 2.7 the extension's autograd node does not compile (CI compiles
    against 2.7's headers): setup.py says which torch it needs instead."""
    script = ("import sys, runpy, torch; torch.__version__ = sys.argv[1]; "
              "sys.argv = ['setup.py', '--version']; runpy.run_path('setup.py', run_name='__main__')")
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    env["LIP_CUDA_FORCE_CPU"] = "1"
    proc = subprocess.run([sys.executable, "-c", script, version], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "lip_cuda needs torch >= 2.7" in proc.stderr and version in proc.stderr, proc.stderr
