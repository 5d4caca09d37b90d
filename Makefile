# Two commands on a fresh clone:
#   make bench   # set up .venv, build the extension, run the kernel benchmark
#   make test    # set up .venv, build the extension, run the test suite
# Both create (or reuse) the repository's own virtual environment in .venv,
# install torch (the CUDA build where pip gives it, as on CUDA machines) and
# the build tools, and build lip_cuda into it with `pip install -e .`. A
# second run reuses all of it: the packages are installed again only when
# their list below changes, the extension is rebuilt only when setup.py,
# cuda_toolkit.py, pyproject.toml, csrc/ or torch's spec change.
#
# Variables: PYTHON (the interpreter that creates .venv), TORCH and
# TORCHVISION (pip specs), BENCH_ARGS (extra bench_lip.py flags), TESTS
# (what pytest runs, default tests), TEST_ARGS (extra pytest arguments),
# MAX_JOBS (parallel compile jobs, read by torch's build).

PYTHON      ?= python3
TORCH       ?= torch==2.14.1
TORCHVISION ?= torchvision==0.29.1
BENCH_ARGS  ?=
TESTS       ?= tests
TEST_ARGS   ?=

VENV   := .venv
VPY    := $(VENV)/bin/python
PIP    := $(VPY) -m pip --disable-pip-version-check
DEPS   := $(VENV)/.stamp-deps
TDEPS  := $(VENV)/.stamp-test-deps
BUILT  := $(VENV)/.stamp-built

SHELL       := /bin/bash
.SHELLFLAGS := -o pipefail -ec

PKGS      := $(TORCH) numpy ninja pybind11 pytest
TEST_PKGS := $(TORCH) $(TORCHVISION) onnx onnxscript onnxruntime matplotlib

.PHONY: bench test build deps clean FORCE

bench: $(BUILT)
	$(VPY) benchmarks/bench_lip.py $(BENCH_ARGS)

test: $(BUILT) $(TDEPS)
	$(VPY) -m pytest -q $(TESTS) $(TEST_ARGS)

build: $(BUILT)

deps: $(DEPS)

$(VPY):
	$(PYTHON) -m venv $(VENV)

# Package lists as files that change only when the lists do, so that the
# stamps below depend on the lists rather than on every edit of this file.
$(VENV)/.pkgs-%: FORCE | $(VPY)
	@echo '$(if $(filter test,$*),$(TEST_PKGS),$(PKGS))' | cmp -s - $@ \
	  || echo '$(if $(filter test,$*),$(TEST_PKGS),$(PKGS))' > $@

$(DEPS): $(VENV)/.pkgs-base
	$(PIP) install --quiet --upgrade pip setuptools wheel
	$(PIP) install --quiet $(PKGS)
	$(VPY) -c "import torch; print('torch', torch.__version__, '| CUDA build:', torch.version.cuda or 'no (CPU build)')"
	touch $@

# What only the tests need: the ONNX export test, the plot test, torchvision.
$(TDEPS): $(VENV)/.pkgs-test $(DEPS)
	$(PIP) install --quiet $(TEST_PKGS)
	touch $@

# The build prints one line per compiled file (the full log is in .venv/build.log).
$(BUILT): $(DEPS) setup.py cuda_toolkit.py pyproject.toml $(wildcard csrc/*)
	@echo "Building lip_cuda (on 2 cores: about 6 min, with or without the CUDA kernels) ..."
	$(PIP) install --no-build-isolation -v -e . 2>&1 | tee $(VENV)/build.log \
	  | sed -unE -e 's#^ *(\[[0-9]+/[0-9]+\]) .* -c ([^ ]+) -o .*#  \1 compiling \2#p' -e '/^lip_cuda setup:/p' -e '/error:/p'
	$(VPY) -c "import lip_cuda; print('lip_cuda built; CUDA kernels:', lip_cuda.built_with_cuda())"
	touch $@

clean:
	rm -rf build *.egg-info lip_cuda/_C*.so $(BUILT)
