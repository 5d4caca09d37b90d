"""Build lip_cuda's extension at install time.

CUDA + CPU kernels when torch is a CUDA build; the CUDA toolkit is found by
cuda_toolkit.py (CUDA_HOME, nvcc on PATH, /usr/local/cuda: the first with
bin/nvcc and libcudart), and the build stops with one line saying what to set
when there is none. CPU kernels only when torch is a CPU build or
LIP_CUDA_FORCE_CPU=1. Install with:  pip install --no-build-isolation -e .
(add -v to see the compiler lines while it builds).
"""
import os
import re
import platform
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parent
CSRC = "csrc"
sys.path.insert(0, str(ROOT))
from cuda_toolkit import Toolkit, ToolkitError, build_plan  # noqa: E402

#: Optional dependencies: pip install -e .[plot], .[onnx], .[test]
EXTRAS = {
    "plot": ["matplotlib"],
    "onnx": ["onnx", "onnxscript", "onnxruntime"],
    "test": ["pytest", "numpy"],
    # the detection backbones and detectors (lip_cuda.detection) build on torchvision
    "detection": ["torchvision"],
    # ImageFolder, transforms and the ResNet-50 baseline of lip_cuda.train
    "train": ["torchvision"],
}


def cuda_toolkit() -> "Toolkit | None":
    """The toolkit for a CUDA build, None for a CPU build; exits with one line when CUDA has no toolkit."""
    import torch

    try:
        toolkit = build_plan(torch.version.cuda)
    except ToolkitError as error:
        sys.exit(f"lip_cuda setup: {error}")
    if toolkit is not None:
        # torch's cpp_extension made its own guess at import; build with ours.
        os.environ["CUDA_HOME"] = toolkit.home
        cpp_extension.CUDA_HOME = toolkit.home
    return toolkit


def default_cuda_arch_list() -> None:
    # Without a visible GPU torch would build for every arch it knows; a
    # short list keeps the build minutes down: Ampere (sm_80) and Hopper
    # (sm_90), plus PTX for newer cards to JIT from.
    import torch

    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"


def cpu_isa_sources() -> list:
    # The CPU kernels are built for the baseline ISA (lip2d_cpu.cpp) and, on
    # x86-64 with GCC, again for AVX2, AVX-512 and AVX-512 with AVX512-BF16 (the same source, switched
    # by "#pragma GCC target"); the extension picks one at run time. No
    # -march flag, so the build runs on any x86-64 CPU whatever built it.
    if platform.machine() not in ("x86_64", "AMD64") or os.environ.get("LIP_CUDA_CPU_ISAS", "1") == "0":
        return []
    compiler = os.environ.get("CXX", "c++")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    except OSError:
        return []
    if "clang" in version.lower() or "Free Software Foundation" not in version:
        return []
    sources = [f"{CSRC}/lip2d_cpu_avx2.cpp", f"{CSRC}/lip2d_cpu_avx512.cpp"]
    # the AVX512-BF16 build needs GCC 12 (its run-time CPU check names the flag)
    major = re.search(r"\) (\d+)\.", version)
    if major is not None and int(major.group(1)) >= 12:
        sources.append(f"{CSRC}/lip2d_cpu_avx512bf16.cpp")
    return sources


def openmp_flags() -> list:
    # at::parallel_for is inline: with torch's OpenMP backend it only runs in
    # parallel if the extension itself is compiled with OpenMP.
    import torch

    return ["-fopenmp"] if torch.backends.openmp.is_available() else []


# The oldest torch whose C++ autograd API the extension's autograd node
# compiles against (compiled autograd's CompiledNodeArgs / IValuePacker
# forms); CI compiles the sources against this version's headers too.
MIN_TORCH = (2, 7)


def check_torch_version() -> None:
    import torch

    found = tuple(int(part) for part in re.findall(r"\d+", torch.__version__)[:2])
    if found < MIN_TORCH:
        raise RuntimeError(
            f"lip_cuda needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]} to build (its autograd node uses "
            f"that C++ API), but torch {torch.__version__} is installed: pip install -U torch")


def extension():
    check_torch_version()
    isa_sources = cpu_isa_sources()
    sources = [f"{CSRC}/{name}" for name in (
        "module.cpp", "lip2d.cpp", "lip2d_autograd.cpp", "lip2d_cpu.cpp", "lip2d_cpu_launch.cpp",
        "lip2d_emulate.cpp")]
    sources += isa_sources
    macros = [("LIP_CPU_ISA_BUILDS", None)] if isa_sources else []
    if any(name.endswith("avx512bf16.cpp") for name in isa_sources):
        macros.append(("LIP_CPU_AVX512BF16_BUILD", None))
    # -Wno-psabi: the CPU kernels pass 64-byte lane vectors between inline functions
    cxx_flags = ["-O3", "-Wno-psabi"] + openmp_flags()
    toolkit = cuda_toolkit()
    if toolkit is not None:
        default_cuda_arch_list()
        return cpp_extension.CUDAExtension(
            "lip_cuda._C",
            sources + [f"{CSRC}/lip2d_cuda.cu"],
            define_macros=[("WITH_CUDA", None)] + macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
            library_dirs=[toolkit.lib_dir],
            extra_link_args=openmp_flags(),
        )
    return cpp_extension.CppExtension(
        "lip_cuda._C",
        sources,
        define_macros=macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=openmp_flags(),
    )


setup(
    name="lip_cuda",
    version="0.1.0",
    description="Fused CUDA/CPU kernels for LIP (Local Importance-based Pooling)",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["lip_cuda", "lip_cuda.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    python_requires=">=3.9",
    install_requires=[f"torch>={MIN_TORCH[0]}.{MIN_TORCH[1]}"],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["lip-train = lip_cuda.train:cli"]},
)
