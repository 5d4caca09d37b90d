#!/usr/bin/env bash
# Compiles the extension's C++ and CUDA sources against another torch's
# headers (by default 2.11.0, the torch of the GPU machines this project is
# lent), without installing that torch:
#
#   bash .ci/check_torch_headers.sh [TORCH_VERSION]
#
# Why: the GPU check builds the extension there, with that machine's torch,
# and a build error spends a scarce GPU session on nothing. It happened once:
# torch 2.11 holds autograd nodes by std::shared_ptr, 2.14 (CI's) by
# c10::intrusive_ptr, and the written-out autograd nodes built only on 2.14.
# The C++ sources are checked with -fsyntax-only (templates are instantiated,
# no code is made); the CUDA source is compiled for sm_90 with the device
# optimisers off, since only its host side sees torch's headers. Needs the
# network (one torch wheel, about 530 MB, of which only include/ is
# unpacked), g++ and nvcc.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=${1:-2.11.0}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

"$PY" -m pip download -q --no-deps --only-binary=:all: --no-cache-dir "torch==$VERSION" -d "$WORK" \
  --python-version "$("$PY" -c 'import sys; print("%d%d" % sys.version_info[:2])')"
unzip -q "$WORK"/torch-*.whl 'torch/include/*' -d "$WORK"
PYINC=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
INCLUDES=(-I"$WORK/torch/include" -I"$WORK/torch/include/torch/csrc/api/include" -I"$PYINC" -Icsrc)
# the macros setup.py defines for a CUDA build with the per-ISA CPU kernels
DEFINES=(-DWITH_CUDA -DLIP_CPU_ISA_BUILDS -DLIP_CPU_AVX512BF16_BUILD
         -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C)
# torch builds extensions as C++17 up to 2.12 and C++20 from 2.13 on
STD=c++17
case "$VERSION" in 2.[0-9].*|2.1[0-2].*) ;; *) STD=c++20 ;; esac

echo "checking csrc against torch $VERSION's headers ($STD)"
failed=0
for source in csrc/*.cpp; do
  if ! "${CXX:-g++}" -std=$STD -fsyntax-only -fopenmp -Wno-psabi "${INCLUDES[@]}" "${DEFINES[@]}" "$source"; then
    echo "FAILED: $source against torch $VERSION" >&2
    failed=1
  fi
done
if command -v nvcc > /dev/null; then
  if ! nvcc -c csrc/lip2d_cuda.cu -o "$WORK/lip2d_cuda.o" -std=$STD -arch=sm_90 -Xcicc -O0 -Xptxas -O0 \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
      -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr "${INCLUDES[@]}" "${DEFINES[@]}"; then
    echo "FAILED: csrc/lip2d_cuda.cu against torch $VERSION" >&2
    failed=1
  fi
else
  echo "nvcc not found: csrc/lip2d_cuda.cu not checked" >&2
fi
[ "$failed" = 0 ] && echo "csrc builds against torch $VERSION's headers"
exit "$failed"
