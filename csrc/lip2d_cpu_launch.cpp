// The CPU side of the operator below validation: which instruction set's
// kernels run a call (the CPU's, as torch reports it, lowered by
// LIP_CUDA_CPU_ISA), whether they stream their outputs past the cache, and
// which geometries go to the per-output code instead (float64, and those
// whose scratch the SIMD kernels cannot bound). The kernels themselves are
// lip2d_cpu.cpp, compiled once per instruction set.
#include <ATen/Version.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <fstream>
#include <initializer_list>
#include <string>

#include "lip_kernels.h"

namespace lip_cuda {

// The entry points of one instruction set's build of lip2d_cpu.cpp: run
// a forward or a backward call, return the kernel's name.
#define LIP_CPU_KERNELS_OF(isa_namespace)                                  \
  namespace isa_namespace {                                                \
  const char* run(const ForwardTensors& t, const CallGeometry& cg, bool stream);  \
  const char* run(const BackwardTensors& t, const CallGeometry& cg, bool stream); \
  }
LIP_CPU_KERNELS_OF(cpu_default)
#if defined(LIP_CPU_ISA_BUILDS)
LIP_CPU_KERNELS_OF(cpu_avx2)
LIP_CPU_KERNELS_OF(cpu_avx512)
#endif
#if defined(LIP_CPU_AVX512BF16_BUILD)
LIP_CPU_KERNELS_OF(cpu_avx512bf16)
#endif
#undef LIP_CPU_KERNELS_OF

namespace {

// What this CPU runs, as torch sees it (which honours ATEN_CPU_CAPABILITY):
// 0 baseline, 1 AVX2, 2 AVX-512, 3 AVX-512 with AVX512-BF16 (which torch's
// capability does not name: asked of the CPU). Always 0 without the
// per-ISA builds.
int cpu_isa_level() {
#if defined(LIP_CPU_ISA_BUILDS)
  static const int level = [] {
    const std::string capability = at::get_cpu_capability();
    if (capability.find("AVX512") != std::string::npos) {
#if defined(LIP_CPU_AVX512BF16_BUILD)
      if (__builtin_cpu_supports("avx512bf16")) return 3;
#endif
      return 2;
    }
    if (capability.find("AVX2") != std::string::npos) return 1;
    return 0;
  }();
  return level;
#else
  return 0;
#endif
}

// The ISA the kernels run in: the CPU's, or lower if LIP_CUDA_CPU_ISA asks
// (read at every call, so that tests can switch it).
int isa_to_run() {
  const char* env = std::getenv("LIP_CUDA_CPU_ISA");
  int wanted = 3;
  if (env != nullptr && *env != '\0') {
    std::string value(env);
    for (char& ch : value) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    if (value == "default") {
      wanted = 0;
    } else if (value == "avx2") {
      wanted = 1;
    } else if (value == "avx512") {
      wanted = 2;
    } else if (value == "avx512bf16") {
      wanted = 3;
    } else {
      TORCH_CHECK(false, "lip2d: expected the environment variable LIP_CUDA_CPU_ISA to be "
                  "'default', 'avx2', 'avx512' or 'avx512bf16' (or unset), but it is '", env, "'");
    }
  }
  return std::min(wanted, cpu_isa_level());
}

// The sizes of cpu0's L2 and last-level caches as Linux reports them in
// sysfs (0 where it does not).
struct CacheSizes {
  int64_t l2 = 0, last = 0;
};

const CacheSizes& cache_sizes() {
  static const CacheSizes sizes = [] {
    CacheSizes found;
    int64_t last_level = 0;
    for (int index = 0; index < 8; ++index) {
      const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
      std::ifstream level_file(dir + "level"), size_file(dir + "size"), type_file(dir + "type");
      int64_t level = 0, size = 0;
      std::string unit, type;
      if (!(level_file >> level) || !(size_file >> size) || size <= 0) continue;
      size_file >> unit;  // "32768K" reads as 32768 then "K"
      type_file >> type;
      const int64_t scale = unit == "K" ? 1024 : unit == "M" ? 1024 * 1024 : unit == "G" ? 1024 * 1024 * 1024 : 1;
      if (level == 2 && type != "Instruction") found.l2 = size * scale;
      if (level > last_level) last_level = level, found.last = size * scale;
    }
    return found;
  }();
  return sizes;
}

// The last-level cache's size (the largest cache level of cpu0), else 32 MiB.
int64_t last_level_cache_bytes() {
  return cache_sizes().last > 0 ? cache_sizes().last : int64_t(32) << 20;
}

// Whether a call's kernels stream their outputs past the cache
// (cpu_math::stream_bits). Where the tensors a call reads and writes
// outgrow the last-level cache, its outputs would be evicted before the
// next layer reads them, and streaming saves their read for ownership: at
// batch 8-16, float32 channels_last, forward 3-26% and backward 5-21%
// faster by layer (docs/kernels.md). Not where an output is 32 MiB or
// more: glibc's malloc maps such blocks afresh at every allocation, the
// kernel's page faults leave the zeroed lines in the cache, and streaming
// over cached lines measured slower (the 8 x 64 x 112 x 112 stem: forward
// 1.58 -> 1.78 ms). LIP_CUDA_CPU_STREAM_STORES=1 or 0 forces the choice
// (read at every call, for tests and benchmarks).
bool stream_outputs(std::initializer_list<const at::Tensor*> inputs,
                    std::initializer_list<const at::Tensor*> outputs) {
  if (const char* env = std::getenv("LIP_CUDA_CPU_STREAM_STORES")) {
    const std::string value(env);
    if (value == "1") return true;
    if (value == "0") return false;
    TORCH_CHECK(value.empty(), "lip2d: expected the environment variable LIP_CUDA_CPU_STREAM_STORES to "
                "be '0', '1' or unset, but it is '", env, "'");
  }
  constexpr int64_t kFreshlyMappedBytes = int64_t(32) << 20;  // glibc's largest mmap threshold
  int64_t bytes = 0;
  for (const at::Tensor* t : inputs) bytes += static_cast<int64_t>(t->nbytes());
  for (const at::Tensor* t : outputs) {
    if (static_cast<int64_t>(t->nbytes()) >= kFreshlyMappedBytes) return false;
    bytes += static_cast<int64_t>(t->nbytes());
  }
  return bytes > last_level_cache_bytes();
}

// Whether the SIMD kernels take a geometry. Their scratch per thread grows
// with the rows one window spans times the row width (the weight rings of
// the tile form, 16 lanes wide in channels_last), with the stride (the
// rows layout's phases) and with sH x sW (its backward's phase planes): a
// global window over a 2048 x 2048 plane took gigabytes, and a stride of
// 2^24 failed to allocate. Past these bounds (windows as wide as a large
// plane, strides in the hundreds) the per-output code of the generic CUDA
// kernels runs instead, which keeps no scratch: the same results to
// rounding, in both layouts alike. Every LIP-ResNet layer is far inside.
bool simd_kernels_take(const LipGeometry& g) {
  constexpr int64_t kMaxRingPixels = int64_t(1) << 19;  // 64 MiB of float32 rings, 16 lanes x 2
  constexpr int64_t kMaxPhases = 4096;
  // the rows layout's ring: sW phases of at least 2 x 16 lanes (sW < 2^31, checked)
  const int64_t ring_pixels = std::min(g.kH, g.H) * std::max(g.W, g.sW * 32);
  return ring_pixels <= kMaxRingPixels && g.sH <= kMaxPhases && g.sW <= kMaxPhases &&
         g.sH * g.sW <= kMaxPhases;
}

// Runs the call in the kernels of instruction set `isa`.
template <typename Tensors>
const char* run_in_isa(int isa, const Tensors& t, const CallGeometry& cg, bool stream) {
  switch (isa) {
#if defined(LIP_CPU_AVX512BF16_BUILD)
    case 3:
      return cpu_avx512bf16::run(t, cg, stream);
#endif
#if defined(LIP_CPU_ISA_BUILDS)
    case 2:
      return cpu_avx512::run(t, cg, stream);
    case 1:
      return cpu_avx2::run(t, cg, stream);
#endif
    default:
      return cpu_default::run(t, cg, stream);
  }
}

}  // namespace

int64_t cpu_l2_cache_bytes() {
  return cache_sizes().l2 > 0 ? cache_sizes().l2 : int64_t(512) << 10;
}

const char* lip2d_forward_cpu(const ForwardTensors& t, const CallGeometry& cg) {
  if (t.x.scalar_type() == at::kDouble || !simd_kernels_take(cg.g)) {
    return lip2d_forward_emulated(t, cg, "generic", false);
  }
  const int isa = isa_to_run();
  // the baseline build has no streaming stores (see stream_bits); the
  // setting is checked whatever the build
  const bool stream = stream_outputs({&t.x, &t.logit}, {&t.out, &t.window_max, &t.inv_weight_sum}) && isa > 0;
  return run_in_isa(isa, t, cg, stream);
}

const char* lip2d_backward_cpu(const BackwardTensors& t, const CallGeometry& cg) {
  if (t.x.scalar_type() == at::kDouble || !simd_kernels_take(cg.g)) {
    return lip2d_backward_emulated(t, cg, "generic", false);
  }
  const int isa = isa_to_run();
  const bool stream = stream_outputs({&t.grad_out, &t.x, &t.logit, &t.out, &t.window_max, &t.inv_weight_sum},
                                     {&t.grad_x, &t.grad_logit}) &&
                      isa > 0;  // as in lip2d_forward_cpu
  return run_in_isa(isa, t, cg, stream);
}

}  // namespace lip_cuda
