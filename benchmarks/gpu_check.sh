#!/usr/bin/env bash
# Everything a GPU session needs, in one command:
#
#   bash benchmarks/gpu_check.sh OUTDIR              # on a CUDA machine (9 minutes at most)
#   bash benchmarks/gpu_check.sh --quick OUTDIR      # fast variant only, about 4 minutes at most (see below)
#   bash benchmarks/gpu_check.sh --cpu-smoke OUTDIR  # the same steps, tiny, on the CPU (tests the script)
#
# --quick is for a second GPU run in a session that has spent most of its
# device time: build, the CUDA tests under the fast variant, the benchmark
# of fast against eager (no torch.compile, no generic), the training step
# with fast, and memcheck. Compare its figures with a full run's compile
# column only on the same GPU model.
#
# GPU steps, each under its own time limit and all under one deadline, in
# order of what matters most when time runs short:
#   1. build the extension in place for the visible GPU only (no venv, no downloads)
#   2. the CUDA tests (every test whose id names cuda), once per kernel variant
#   3. the kernel benchmark: batch 64, float32 and bfloat16, both layouts, fused
#      (generic and fast) and the eager reference
#   4. the LIP-ResNet-50 training step, bfloat16 channels_last and float32
#   5. compute-sanitizer memcheck, racecheck, initcheck, synccheck over
#      benchmarks/gpu_workload.py (every kernel, dtype pair, layout, variant)
#   6. ncu: DRAM bytes and time of each lip2d kernel at the s2b layer
#   7. torch.compile of the reference, one dtype/layout at a time (the last
#      one or two are cut when the machine is slow to build)
# OUTDIR gets gpu_check.log (every step's output), results.json (everything
# measured, with the device) and summary.txt, which is also printed.
# A tool that is missing or refuses the device is reported, not fatal. No
# visible GPU stops the run at once (verdict FAILED); a failed benchmark or
# training step (not a timeout) fails the verdict too. Killed by TERM, it
# still writes the summary of the steps done.
set -uo pipefail

MODE=gpu
QUICK=0
while [ "${1:-}" = "--cpu-smoke" ] || [ "${1:-}" = "--quick" ]; do
  [ "$1" = "--cpu-smoke" ] && MODE=cpu
  [ "$1" = "--quick" ] && QUICK=1
  shift
done
VARIANTS=(generic fast)
[ "$QUICK" = 1 ] && VARIANTS=(fast)
OUT=${1:?usage: bash benchmarks/gpu_check.sh [--cpu-smoke] [--quick] OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
WORK=$(mktemp -d)
LOG="$OUT/gpu_check.log"
: > "$LOG"
# --quick's budget is about 4 minutes, the full run's 9 (a03eee0: 545 s got every step but the last two)
DEADLINE=$(( $(date +%s) + ${GPU_CHECK_SECONDS:-$([ "$QUICK" = 1 ] && echo 240 || echo 540)} ))

# finish [RC]: summary of the steps done into OUTDIR, then exit with RC
# (default: the summary's verdict)
finish() {
  trap - TERM INT HUP
  "$PY" benchmarks/gpu_summary.py "$WORK" "$OUT" --mode "$MODE" --variants "${VARIANTS[*]}"
  local rc=$?
  rm -rf "$WORK"
  exit "${1:-$rc}"
}
# Killed from outside (a device tool's own time limit sends TERM): write the
# summary of the steps done so far before going.
trap 'echo "=== interrupted: summary of the steps done" | tee -a "$LOG"; finish 1' TERM INT HUP

# step NAME LIMIT CMD...: runs CMD with a time limit (cut to the deadline),
# output to $WORK/NAME.log and the combined log; records "NAME rc seconds".
step() {
  local name=$1 limit=$2
  shift 2
  local left=$(( DEADLINE - $(date +%s) ))
  if [ "$left" -lt 15 ]; then
    echo "$name skipped 0" >> "$WORK/steps"
    echo "=== $name: skipped, out of time" >> "$LOG"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local start rc
  start=$(date +%s)
  # into the combined log as it runs, so a step cut off keeps its output
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$WORK/$name.log" >> "$LOG"
  rc=${PIPESTATUS[0]}
  echo "$name $rc $(( $(date +%s) - start ))" >> "$WORK/steps"
  echo "    -> exit $rc after $(( $(date +%s) - start ))s" | tee -a "$LOG"
  return 0
}

step env 60 "$PY" -c "
import platform, torch
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', platform.python_version())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print('device', p.name, 'capability', p.major, p.minor, 'memory', p.total_memory)
"

if [ "$MODE" = gpu ]; then
  # no visible GPU (or a CPU-only torch): every later step would fail or
  # skip, so stop now with a failed verdict instead of spending the session
  step gpu_visible 60 "$PY" -c "
import sys, torch
if not (torch.version.cuda and torch.cuda.is_available()):
    sys.exit('no CUDA GPU visible to torch %s (torch.version.cuda %s): nothing to check' % (torch.__version__, torch.version.cuda))
"
  [ "$(awk '$1 == "gpu_visible" {print $2}' "$WORK/steps")" = 0 ] || finish 1
  ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)
  # setup.py finds the toolkit (CUDA_HOME, nvcc on PATH, /usr/local/cuda)
  step build 300 env TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" \
    "$PY" setup.py build_ext --inplace
  step import 60 "$PY" -c "import lip_cuda; assert lip_cuda.built_with_cuda(), 'CUDA kernels not built'; print('lip_cuda with CUDA kernels')"
  TEST_SEL=(-k cuda tests)
  BENCH_ARGS=(--device cuda --batch 64 --dtypes float32,bfloat16 --layouts contiguous,channels_last)
  COMPILED_CASES=("float32 channels_last" "bfloat16 channels_last" "float32 contiguous" "bfloat16 contiguous")
  TRAIN_ARGS=(--device cuda)
else
  step import 60 "$PY" -c "import lip_cuda; print('lip_cuda, CUDA kernels:', lip_cuda.built_with_cuda())"
  # the emulated CUDA kernels stand in for the GPU tests
  TEST_SEL=(tests/test_kernels_emulated.py -k "float32-float32 and k3s2p1")
  BENCH_ARGS=(--device cpu --shapes s4b --batch 1 --dtypes float32 --layouts contiguous,channels_last
              --budget-ms 20 --max-reps 5)
  COMPILED_CASES=("float32 channels_last")  # torch.compile on the CPU takes minutes a layer
  TRAIN_ARGS=(--device cpu --batch 2 --size 64 --steps 2 --warmup 1)
fi

for variant in "${VARIANTS[@]}"; do
  step "tests_$variant" 200 env LIP_CUDA_KERNELS=$variant "$PY" -m pytest -q -p no:cacheprovider "${TEST_SEL[@]}"
done

# fused (both variants) and eager first: seconds; torch.compile of the
# reference later, one dtype/layout at a time, since compiling every case
# takes minutes and a timeout should cost only what it cut.
if [ "$QUICK" = 1 ]; then
  step bench_fast 150 env LIP_CUDA_KERNELS=fast "$PY" benchmarks/bench_lip.py "${BENCH_ARGS[@]}" \
    --impls fused,reference --no-compile --json "$WORK/bench_fast.json"
else
  step bench_generic 150 env LIP_CUDA_KERNELS=generic "$PY" benchmarks/bench_lip.py "${BENCH_ARGS[@]}" \
    --impls fused,reference --no-compile --json "$WORK/bench_generic.json"
  step bench_fast 100 env LIP_CUDA_KERNELS=fast "$PY" benchmarks/bench_lip.py "${BENCH_ARGS[@]}" \
    --impls fused --no-compile --json "$WORK/bench_fast.json"
fi

for variant in $([ "$QUICK" = 1 ] && echo fast || echo fast generic); do
  step "train_bf16_cl_$variant" 90 env LIP_CUDA_KERNELS=$variant "$PY" benchmarks/bench_train.py \
    "${TRAIN_ARGS[@]}" --dtype bfloat16 --channels-last --json "$WORK/train_bf16_cl_$variant.json"
done
step train_fp32_fast 90 env LIP_CUDA_KERNELS=fast "$PY" benchmarks/bench_train.py "${TRAIN_ARGS[@]}" \
  --dtype float32 --json "$WORK/train_fp32_fast.json"

if [ "$MODE" = gpu ]; then
  if command -v compute-sanitizer > /dev/null; then
    for tool in $([ "$QUICK" = 1 ] && echo memcheck || echo memcheck racecheck initcheck synccheck); do
      step "sanitizer_$tool" 100 compute-sanitizer --tool "$tool" --error-exitcode 99 \
        "$PY" benchmarks/gpu_workload.py
    done
  else
    echo "compute-sanitizer: not found" >> "$WORK/sanitizer_missing"
  fi
else
  step workload 120 "$PY" benchmarks/gpu_workload.py --device cpu
fi

# ncu before torch.compile: about 20 s (a03eee0's run), and the full run's
# deadline cut it when it came last. Clocks left as they are (no locking to
# base clocks), so its times compare with the benchmark's.
if [ "$MODE" = gpu ] && [ "$QUICK" = 0 ] && command -v ncu > /dev/null; then
  step ncu 60 ncu --clock-control none --kernel-name regex:lip_kernel_entry --metrics \
    gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed \
    "$PY" benchmarks/gpu_workload.py --ncu
fi

[ "$QUICK" = 1 ] && COMPILED_CASES=()
for case in "${COMPILED_CASES[@]}"; do
  read -r dtype layout <<< "$case"
  step "bench_compiled_${dtype}_${layout}" 150 "$PY" benchmarks/bench_lip.py "${BENCH_ARGS[@]}" \
    --dtypes "$dtype" --layouts "$layout" --impls compiled --compile \
    --json "$WORK/bench_compiled_${dtype}_${layout}.json"
done

finish
