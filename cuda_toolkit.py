"""Find a CUDA toolkit that can build and link lip_cuda's CUDA kernels.

setup.py uses this instead of torch's own guess: torch takes the first of
CUDA_HOME, the directory above ``nvcc`` on PATH, or /usr/local/cuda, even
when that directory cannot link (for example ``/usr/local`` when
``/usr/local/bin/nvcc`` is a wrapper script), and the build then dies at the
link step on ``cannot find -lcudart`` after a minute of compiling.

A directory is usable when it has ``bin/nvcc`` and a ``libcudart.so*`` in
``lib64``, ``lib`` or ``targets/*/lib``. Kept free of torch so that it can be
tested with fake toolkit directories (tests/test_setup_detection.py).
"""
from __future__ import annotations

import glob
import os
import shutil
from dataclasses import dataclass
from typing import Callable, List, Mapping, Optional, Sequence

#: Where toolkits usually live when nothing says otherwise.
DEFAULT_CUDA_DIRS = ("/usr/local/cuda",)


@dataclass(frozen=True)
class Toolkit:
    """A usable toolkit: its root (what CUDA_HOME should be) and the directory holding libcudart."""

    home: str
    lib_dir: str


class ToolkitError(RuntimeError):
    """No usable toolkit, or CUDA_HOME names an unusable one; the message says what to set."""


def cudart_dir(home: str) -> Optional[str]:
    """The directory under ``home`` that holds libcudart.so*, or None.

    Example:
        >>> cudart_dir("/usr/local/cuda")      # doctest: +SKIP
        '/usr/local/cuda/lib64'
    """
    candidates = [os.path.join(home, "lib64"), os.path.join(home, "lib")]
    candidates += sorted(glob.glob(os.path.join(home, "targets", "*", "lib")))
    for d in candidates:
        if glob.glob(os.path.join(d, "libcudart.so*")):
            return d
    return None


def problem(home: str) -> Optional[str]:
    """Why ``home`` cannot build the CUDA kernels, or None when it can."""
    if not os.path.isdir(home):
        return f"{home} is not a directory"
    if not os.path.isfile(os.path.join(home, "bin", "nvcc")):
        return f"{home} has no bin/nvcc"
    if cudart_dir(home) is None:
        return f"{home} has no lib64/libcudart.so (nor lib/ or targets/*/lib/)"
    return None


def find_toolkit(
    environ: Mapping[str, str] = os.environ,
    which: Callable[[str], Optional[str]] = shutil.which,
    default_dirs: Sequence[str] = DEFAULT_CUDA_DIRS,
) -> Toolkit:
    """The CUDA toolkit to build with.

    Order: ``CUDA_HOME`` (or ``CUDA_PATH``) when set, which must then be
    usable; else the first usable of the directory above ``nvcc`` on PATH
    (symlinks resolved) and ``default_dirs``.

    Raises:
        ToolkitError: with one line saying what to set.

    Example:
        >>> find_toolkit().home                # doctest: +SKIP
        '/usr/local/cuda'
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = environ.get(var)
        if home:
            why = problem(home)
            if why is not None:
                raise ToolkitError(
                    f"{var}={home} cannot build the CUDA kernels ({why}): set CUDA_HOME to a CUDA "
                    "toolkit with bin/nvcc and lib64/libcudart.so, or LIP_CUDA_FORCE_CPU=1 for a CPU-only build"
                )
            return Toolkit(os.path.abspath(home), cudart_dir(home))  # type: ignore[arg-type]
    tried: List[str] = []
    nvcc = which("nvcc")
    guesses = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    for home in guesses + list(default_dirs):
        why = problem(home)
        if why is None:
            return Toolkit(os.path.abspath(home), cudart_dir(home))  # type: ignore[arg-type]
        tried.append(why)
    raise ToolkitError(
        "torch is a CUDA build but no usable CUDA toolkit was found (" + "; ".join(tried) + "): "
        "set CUDA_HOME to a toolkit with bin/nvcc and lib64/libcudart.so (e.g. /usr/local/cuda), "
        "or LIP_CUDA_FORCE_CPU=1 for a CPU-only build"
    )


def build_plan(
    torch_cuda_version: Optional[str],
    environ: Mapping[str, str] = os.environ,
    which: Callable[[str], Optional[str]] = shutil.which,
    default_dirs: Sequence[str] = DEFAULT_CUDA_DIRS,
) -> Optional[Toolkit]:
    """What setup.py builds: a Toolkit for a CUDA + CPU build, None for CPU only.

    CPU only when ``LIP_CUDA_FORCE_CPU=1`` or torch is a CPU build
    (``torch_cuda_version`` is ``torch.version.cuda``); otherwise the toolkit
    from :func:`find_toolkit`, whose ToolkitError stops the build before any
    compiling.

    Example:
        >>> build_plan(None) is None           # a CPU build of torch
        True
    """
    if environ.get("LIP_CUDA_FORCE_CPU", "0") == "1" or torch_cuda_version is None:
        return None
    return find_toolkit(environ, which, default_dirs)
