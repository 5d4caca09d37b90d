// CPU kernels: one instruction set's build of them, and which one runs a
// call. The kernels are in the headers this file includes, one a layout:
//
// float32, float16 and bfloat16 run in float lanes (lip_cpu_math.h), all
// window math through lip_window.h's WindowStep (shared with the CUDA
// kernels). Forward, where windows overlap, takes WindowStep's tile form:
// one max per channel over a strip of kStripRows output rows, each input's
// exp(l - max) once per strip, window sums of those, and a window's own max
// where the strip's is too far above it; elsewhere each window's own max.
// Backward is a gather over the outputs covering each input, each relative
// to the reference forward saved for it (docs/kernels.md).
// - channels_last (lip_cpu_channels_last.h): channels are contiguous, so lanes are kLanes channels of
//   one pixel, loaded straight from the tensors; parallel over (image,
//   strip, group of lane blocks) forward, input rows backward.
// - contiguous NCHW, "rows" (lip_cpu_planes_rows.h): lanes are kLanes outputs along one row of one
//   plane (forward) or kLanes inputs of one stride phase of a plane, laid
//   out flat so that they run across its rows (backward). A stride-sW row
//   is split into sW phases (the columns congruent to r mod sW, converted
//   to float), so that every window tap becomes a plain vector load at a
//   fixed offset; the scratch is a few rows per task whatever the plane
//   size or C. Parallel over (plane, strip of rows).
// - contiguous NCHW, "blocks" (lip_cpu_planes_blocks.h): for planes with many channels, lanes are
//   kLanes channels: a group of planes (one lane block or more) is
//   transposed into a lane-minor float buffer [rows][W][channel], computed
//   there as channels_last is, and transposed back; whole planes where they
//   fit in a few hundred KiB, else bands of rows, so the scratch is bounded
//   whatever the plane size.
// - contiguous NCHW, "halving" (lip_cpu_planes_halving.h; kernel 3, stride 2, padding 1 on
//   even planes, by default in the AVX-512 build up to 64 wide): lanes
//   along one stride phase of a plane laid out flat, two 7-wide phase rows
//   a vector at 14 x 14; input rows split into phases by lane permutes in
//   registers.
// - contiguous NCHW, "gather" (lip_cpu_planes_gather.h; backward only, planes 56 to 512 wide that
//   blocks does not take): lanes are kLanes inputs of a row as they lie in
//   memory; each output row is spread under the input columns by lane
//   permutes, and covering outputs that share a reference share one exp.
//
// x and the logit may differ in dtype (float32 logits with float16/bfloat16
// x); a logit shared across channels (broadcast) fills all lanes with one
// value. lip_cpu_tile.h holds the forward's tile form, which every layout
// shares, and lip_cpu_common.h what else the kernels share.
//
// Instruction sets: this file is compiled once per ISA (LIP_CPU_ISA: 0 the
// baseline, 1 AVX2, 2 AVX-512; lip2d_cpu_avx2.cpp and lip2d_cpu_avx512.cpp
// include it) and lip2d_{forward,backward}_cpu (lip2d_cpu_launch.cpp) pick
// one at run time from the CPU's capability as torch reports it, lowered by
// LIP_CUDA_CPU_ISA. The ISA
// is switched on with "#pragma GCC target" after the torch headers, not with
// -m flags for the whole file: inline functions of the torch headers then
// stay baseline code in every translation unit, so the linker cannot keep an
// AVX-512 copy of one and call it on an AVX2 machine; the kernels live in a
// per-ISA namespace for the same reason.
//
// float64 runs the generic CUDA kernels' own per-thread code through the CPU
// emulation (lip2d_emulate.cpp), so every float64 test checks that code; so
// do the geometries whose scratch the SIMD kernels cannot bound
// (simd_kernels_take: windows spanning most of a large plane, huge strides).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdlib>
#include <initializer_list>
#include <limits>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "lip_kernels.h"

#ifndef LIP_CPU_ISA
#define LIP_CPU_ISA 0
#endif

#if LIP_CPU_ISA != 0
#if !(defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__))
#error "the AVX2 and AVX-512 builds of the CPU kernels need GCC on x86-64"
#endif
#include <immintrin.h>
#endif

#if LIP_CPU_ISA == 3
#define LIP_CPU_NS cpu_avx512bf16
#define LIP_CPU_ISA_NAME "avx512bf16"
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c,bmi,bmi2,popcnt")
#elif LIP_CPU_ISA == 2
#define LIP_CPU_NS cpu_avx512
#define LIP_CPU_ISA_NAME "avx512"
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,popcnt")
#elif LIP_CPU_ISA == 1
#define LIP_CPU_NS cpu_avx2
#define LIP_CPU_ISA_NAME "avx2"
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,popcnt")
#else
#define LIP_CPU_NS cpu_default
#define LIP_CPU_ISA_NAME "default"
#endif

#include "lip_cpu_channels_last.h"
#include "lip_cpu_planes_blocks.h"
#include "lip_cpu_planes_gather.h"
#include "lip_cpu_planes_halving.h"
#include "lip_cpu_planes_rows.h"

namespace lip_cuda {
namespace LIP_CPU_NS {
namespace {

// The contiguous kernel that tests and benchmarks ask for with
// LIP_CUDA_CPU_PLANES (rows, blocks, gather or halving), or "" for the default.
std::string forced_planes_kernel() {
  const char* env = std::getenv("LIP_CUDA_CPU_PLANES");
  return env ? env : "";
}

// ---- kernel choice ------------------------------------------------------

// Which of the five kernels runs a call (float lanes; float64 never gets
// here), and its name for _lip2d_last_kernel.
enum class CpuKernel { ChannelsLast, PlanesBlocks, PlanesRows, PlanesGather, PlanesHalving };

// The blocks kernels by default only for planes up to kMaxBlockPixels,
// and only where they fill more lanes than rows would. Measured (AVX-512,
// one thread, batch 2, float32 forward+backward, ms, blocks vs rows):
// 128x56x56 3.2 vs 3.8, 64x112x112 5.8 vs 5.9, so the bigger planes stayed
// on rows. On AVX2 the blocks forward takes bigger planes too, in bands of
// rows: measured on the Zen 1 VM (2 threads, float32, op calls, ms, blocks
// vs rows) 2x64x112x112 2.55-2.59 vs 3.26-3.79, 1x8x224x224 0.63-0.72 vs
// 0.76-0.90, 1x32x112x112 0.62-0.83 vs 0.81-0.97; the gather backward
// stays faster there than the blocks one (4.03-4.08 vs 4.48-4.92,
// 1.02-1.19 vs 1.44-1.51, 1.01-1.21 vs 1.15-1.46).
// The AVX-512 blocks forward takes them too since a Zen 4 VM measured it
// (2 threads, in one process against rows round by round, ms): float32
// 2x64x112x112 1.033 -> 0.881, 1x32x112x112 0.275 -> 0.229, 1x64x96x96
// 0.408 -> 0.362, bfloat16 alike; but on a tie of lane fill 1x16x512x512
// 2.42 -> 2.99 and 2x16x160x160 even, so there ties stay on rows.
constexpr int64_t kMaxBlockPixels = 64 * 64;
constexpr bool kForwardBlocksAnySize = LIP_CPU_ISA >= 1;
constexpr bool kForwardBlocksOnTie = LIP_CPU_ISA == 1;
// A blocks task's scratch, at most (its smallest band: one strip, or kH
// input rows): planes with longer rows take the rows kernels, forced or not.
constexpr int64_t kMaxBlockScratchBytes = int64_t(4) << 20;

bool use_blocks(const LipGeometry& g, bool forward, ElementBytes e) {
  const std::string forced = forced_planes_kernel();
  if (forced == "rows") return false;
  // the rows kernels always work
  const BlockTasks t = block_tasks(g, forward, e);
  if (block_scratch_floats(g, t, forward) * int64_t(sizeof(float)) > kMaxBlockScratchBytes) return false;
  if (forced == "blocks") return true;
  if (g.H * g.W > kMaxBlockPixels && !(forward && kForwardBlocksAnySize)) return false;
  const auto fill = [](int64_t n) {
    return static_cast<double>(n) / static_cast<double>(round_up(n, kLanes));
  };
  // (the AVX2 forward takes blocks on a tie: the stem's 64 channels and 56
  // outputs a row fill all lanes either way, and blocks was the faster)
  return forward && kForwardBlocksOnTie ? fill(g.C) >= fill(g.OW) : fill(g.C) > fill(g.OW);
}

CpuKernel cpu_kernel_for(const CallGeometry& cg, ElementBytes e) {
  if (cg.channels_last) return CpuKernel::ChannelsLast;
  const std::string planes = forced_planes_kernel();
  if (planes == "halving" ? halving_works(cg.g)
                          : planes.empty() && halving_by_default(cg.g, e.x == int64_t(sizeof(float)))) {
    return CpuKernel::PlanesHalving;
  }
  return use_blocks(cg.g, true, e) ? CpuKernel::PlanesBlocks : CpuKernel::PlanesRows;
}

ElementBytes element_bytes(const at::Tensor& x, const at::Tensor& logit) {
  return {static_cast<int64_t>(x.element_size()), static_cast<int64_t>(logit.element_size())};
}

// The backward's kernel: the halving one where it is the default (or where
// LIP_CUDA_CPU_PLANES=halving asks for it) and it takes the geometry, else
// the gather one likewise, else the forward's. Fills gc only for gather:
// its tables cost host time per column.
CpuKernel cpu_backward_kernel_for(const CallGeometry& cg, ElementBytes e, GatherColumns& gc) {
  if (cg.channels_last) return CpuKernel::ChannelsLast;
  const std::string planes = forced_planes_kernel();
  if (planes == "halving" ? halving_works(cg.g)
                          : planes.empty() && halving_by_default(cg.g, e.x == int64_t(sizeof(float)))) {
    return CpuKernel::PlanesHalving;
  }
  const CpuKernel kernel = use_blocks(cg.g, false, e) ? CpuKernel::PlanesBlocks : CpuKernel::PlanesRows;
  if (planes == "rows" || planes == "blocks") return kernel;
  const bool by_default = kernel == CpuKernel::PlanesRows ? gather_by_default(cg.g)
                                                          : gather_before_blocks(cg.g, e.x == int64_t(sizeof(float)));
  if (planes != "gather" && !by_default) return kernel;
  gc = gather_columns(cg.g);
  return gather_works(cg.g, gc) ? CpuKernel::PlanesGather : kernel;
}

const char* cpu_kernel_name(CpuKernel kernel) {
  switch (kernel) {
    case CpuKernel::ChannelsLast: return "cpu_" LIP_CPU_ISA_NAME "_channels_last";
    case CpuKernel::PlanesBlocks: return "cpu_" LIP_CPU_ISA_NAME "_planes_blocks";
    case CpuKernel::PlanesGather: return "cpu_" LIP_CPU_ISA_NAME "_planes_gather";
    case CpuKernel::PlanesHalving: return "cpu_" LIP_CPU_ISA_NAME "_planes_halving";
    default: return "cpu_" LIP_CPU_ISA_NAME "_planes_rows";
  }
}

}  // namespace

const char* run(const ForwardTensors& t, const CallGeometry& cg, bool stream) {
  const CpuKernel kernel = cpu_kernel_for(cg, element_bytes(t.x, t.logit));
  dispatch_dtypes(t.x.scalar_type(), t.logit.scalar_type(), [&](auto x_tag, auto l_tag) {
    using x_t = decltype(x_tag);
    using l_t = decltype(l_tag);
    if constexpr (!std::is_same_v<x_t, double>) {
      switch (kernel) {
        case CpuKernel::ChannelsLast: forward_channels_last<x_t, l_t>(t, cg, stream); break;
        case CpuKernel::PlanesBlocks: forward_planes<x_t, l_t>(t, cg, stream); break;
        case CpuKernel::PlanesHalving: forward_halving<x_t, l_t>(t, cg, stream); break;
        default: forward_rows<x_t, l_t>(t, cg, stream); break;
      }
    }
  });
  return cpu_kernel_name(kernel);
}

const char* run(const BackwardTensors& t, const CallGeometry& cg, bool stream) {
  GatherColumns gc;
  const CpuKernel kernel = cpu_backward_kernel_for(cg, element_bytes(t.x, t.logit), gc);
  dispatch_dtypes(t.x.scalar_type(), t.logit.scalar_type(), [&](auto x_tag, auto l_tag) {
    using x_t = decltype(x_tag);
    using l_t = decltype(l_tag);
    if constexpr (!std::is_same_v<x_t, double>) {
      switch (kernel) {
        case CpuKernel::ChannelsLast: backward_channels_last<x_t, l_t>(t, cg, stream); break;
        case CpuKernel::PlanesBlocks: backward_planes<x_t, l_t>(t, cg, stream); break;
        case CpuKernel::PlanesGather: backward_gather<x_t, l_t>(t, cg, gc, stream); break;
        case CpuKernel::PlanesHalving: backward_halving<x_t, l_t>(t, cg, stream); break;
        default: backward_rows<x_t, l_t>(t, cg, stream); break;
      }
    }
  });
  return cpu_kernel_name(kernel);
}

}  // namespace LIP_CPU_NS
}  // namespace lip_cuda

#if LIP_CPU_ISA != 0
#pragma GCC pop_options
#endif
