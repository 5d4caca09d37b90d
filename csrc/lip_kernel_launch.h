// Which CUDA kernel runs a call, and on what launch grid: host code shared by
// the real launcher (lip2d_cuda.cu, a Launcher that does <<<grid, block>>>)
// and the CPU emulation (lip2d_emulate.cpp, a Launcher that loops over the
// grid), so both pick the same kernel for the same call.
//
// Variants (LIP_CUDA_KERNELS, read at each call):
//   generic  any geometry; one thread per element
//   fast     (the default since the H200 run of benchmarks/results/
//            gpu_h200_9b2e83d passed every CUDA test and sanitizer with it)
//            kernel/stride/padding 3/2/1, 2/2/0 or 3/1/1 (square) take the
//            compile-time kernels of lip_kernel_threads.h; anything else, or
//            a channels_last call whose channels or pointers do not allow
//            channel vectors (fast_vector_width), falls back to generic.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#include "lip_kernel_threads.h"
#include "lip_kernels.h"

namespace lip_cuda {

enum class KernelVariant { Generic, Fast };

inline KernelVariant kernel_variant_from_env() {
  const char* value = std::getenv("LIP_CUDA_KERNELS");
  if (value == nullptr || value[0] == '\0' || std::strcmp(value, "fast") == 0) {
    return KernelVariant::Fast;
  }
  TORCH_CHECK(std::strcmp(value, "generic") == 0,
              "lip2d: LIP_CUDA_KERNELS must be 'generic' or 'fast', but it is '", value, "'");
  return KernelVariant::Generic;
}

struct LaunchShape {
  int64_t grid_x;
  int32_t grid_y;
  int32_t block_x;
  int32_t block_y;
};

// The fast kernels' geometries, or 0.
enum class FastGeometry { None, K3S2P1, K2S2P0, K3S1P1 };

inline FastGeometry fast_geometry(const LipGeometry& g) {
  if (g.kH != g.kW || g.sH != g.sW || g.pH != g.pW) return FastGeometry::None;
  if (g.kH == 3 && g.sH == 2 && g.pH == 1) return FastGeometry::K3S2P1;
  if (g.kH == 2 && g.sH == 2 && g.pH == 0) return FastGeometry::K2S2P0;
  if (g.kH == 3 && g.sH == 1 && g.pH == 1) return FastGeometry::K3S1P1;
  return FastGeometry::None;
}

// Calls fn(std::integral_constant K, S, P) for a fast geometry.
template <typename Fn>
void with_fast_geometry(FastGeometry fg, Fn&& fn) {
  using std::integral_constant;
  switch (fg) {
    case FastGeometry::K3S2P1:
      fn(integral_constant<int, 3>{}, integral_constant<int, 2>{}, integral_constant<int, 1>{});
      break;
    case FastGeometry::K2S2P0:
      fn(integral_constant<int, 2>{}, integral_constant<int, 2>{}, integral_constant<int, 0>{});
      break;
    case FastGeometry::K3S1P1:
      fn(integral_constant<int, 3>{}, integral_constant<int, 1>{}, integral_constant<int, 1>{});
      break;
    case FastGeometry::None:
      break;
  }
}

constexpr int64_t kMaxGridX = std::numeric_limits<int32_t>::max();
constexpr int64_t kMaxGridY = 65535;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool aligned_to(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

// Channels per thread of a channels_last fast kernel. Backward: a 16-byte
// vector of x. Forward: at most 4, since a forward thread holds its window's
// K * K logits per channel in registers: with 8 (bfloat16/float16, 16 bytes)
// ptxas -v (sm_90) gave 126 registers a thread, a quarter of the SM's warps,
// and the H200 run measured the bfloat16 forward slower than float32's
// (0.254 vs 0.228 ms at the stem layer) although it moves half the bytes.
template <typename x_t>
constexpr int fast_vector_width() {
  return static_cast<int>(16 / sizeof(x_t));
}

template <typename x_t>
constexpr int fast_forward_vector_width() {
  return fast_vector_width<x_t>() < 4 ? fast_vector_width<x_t>() : 4;
}

// 32-bit offsets when every tensor of the call has fewer than 2^31 elements
// and the window arithmetic of lip_window.h stays below 2^31 too: a window's
// start o s - p plus k, and covering_outputs' i + p + s, are at most
// in + 2p + s + k along each dimension (a stride near 2^31 on a small
// input overflowed them, silently wrong gradients).
inline bool fits_int32(const LipGeometry& g) {
  const int64_t limit = std::numeric_limits<int32_t>::max();
  return g.N * g.C * g.H * g.W <= limit && g.N * g.C * g.OH * g.OW <= limit &&
         g.H + 2 * g.pH + g.sH + g.kH <= limit && g.W + 2 * g.pW + g.sW + g.kW <= limit;
}

template <typename x_t, typename l_t, typename acc_t, int V>
bool channels_last_vectorizable(const LipGeometry& g, const LogitStrides& ls, const x_t* x,
                                const l_t* logit, const void* out_like_x, const acc_t* stats_a,
                                const acc_t* stats_b) {
  return g.C % V == 0 && aligned_to(x, sizeof(x_t) * V) && aligned_to(out_like_x, sizeof(x_t) * V) &&
         (ls.c == 0 || aligned_to(logit, sizeof(l_t) * V)) && aligned_to(stats_a, sizeof(acc_t) * V) &&
         aligned_to(stats_b, sizeof(acc_t) * V);
}

// Grid of a fast channels_last kernel over `rows` rows of `cols` pixels.
inline bool channels_last_shape(int64_t rows, int64_t cols, int64_t vectors, LaunchShape& shape) {
  const int64_t blocks_y = ceil_div(cols * vectors, kFastThreads);
  if (rows > kMaxGridX || blocks_y > kMaxGridY) return false;
  shape = {rows, static_cast<int32_t>(blocks_y), kFastThreads, 1};
  return true;
}

// Grid of a fast plane (NCHW) kernel over `rows` plane rows of `cols` columns.
inline bool planes_shape(const LipGeometry& g, int64_t rows, int64_t cols, LaunchShape& shape) {
  const int32_t width = cols > 16 ? 32 : (cols > 8 ? 16 : 8);
  const int32_t height = kFastThreads / width;
  const int64_t blocks_x = ceil_div(rows, height);
  const int64_t blocks_y = ceil_div(cols, width);
  if (blocks_x > kMaxGridX || blocks_y > kMaxGridY || g.H * g.W > kMaxGridX) return false;
  shape = {blocks_x, static_cast<int32_t>(blocks_y), width, height};
  return true;
}

inline LaunchShape generic_shape(int64_t numel) {
  const int64_t blocks = ceil_div(numel, kGenericThreads);
  TORCH_CHECK(blocks <= kMaxGridX, "lip2d: a tensor of ", numel,
              " elements is too large for one CUDA launch");
  return {blocks, 1, kGenericThreads, 1};
}

// The generic kernel (GenericForward or GenericBackward) over `threads`
// elements, with 64-bit offsets where 32 bits do not reach (or when forced).
template <template <bool, typename, typename, typename, typename> class Generic, typename Launcher,
          template <typename, typename, typename> class ArgsT, typename x_t, typename l_t,
          typename acc_t>
const char* launch_generic(Launcher& launcher, const ArgsT<x_t, l_t, acc_t>& a, int64_t threads,
                           bool channels_last, bool force_int64) {
  const LaunchShape shape = generic_shape(threads);
  if (force_int64 || !fits_int32(a.g)) {
    channels_last ? launcher.template launch<Generic<true, x_t, l_t, acc_t, int64_t>>(shape, a)
                  : launcher.template launch<Generic<false, x_t, l_t, acc_t, int64_t>>(shape, a);
    return "generic_int64";
  }
  channels_last ? launcher.template launch<Generic<true, x_t, l_t, acc_t, int32_t>>(shape, a)
                : launcher.template launch<Generic<false, x_t, l_t, acc_t, int32_t>>(shape, a);
  return "generic_int32";
}

// Runs the forward of one call through `launcher`. Returns the name of the
// kernel it picked (for tests and benchmarks).
template <typename Launcher, typename x_t, typename l_t, typename acc_t>
const char* dispatch_forward(Launcher& launcher, const ForwardArgs<x_t, l_t, acc_t>& a,
                             bool channels_last, KernelVariant variant, bool force_int64) {
  const LipGeometry& g = a.g;
  const FastGeometry fg = fast_geometry(g);
  if (variant == KernelVariant::Fast && fg != FastGeometry::None) {
    constexpr int V = fast_forward_vector_width<x_t>();
    LaunchShape shape{};
    bool launched = false;
    if (channels_last) {
      if (channels_last_vectorizable<x_t, l_t, acc_t, V>(g, a.ls, a.x, a.logit, a.out, a.window_max,
                                                         a.inv_weight_sum) &&
          channels_last_shape(g.N * g.OH, g.OW, g.C / V, shape)) {
        with_fast_geometry(fg, [&](auto k, auto s, auto p) {
          constexpr int K = decltype(k)::value, S = decltype(s)::value, P = decltype(p)::value;
          launcher.template launch<FastForwardChannelsLast<K, S, P, V, x_t, l_t, acc_t>>(shape, a);
        });
        launched = true;
      }
    } else if (planes_shape(g, g.N * g.C * g.OH, g.OW, shape)) {
      with_fast_geometry(fg, [&](auto k, auto s, auto p) {
        constexpr int K = decltype(k)::value, S = decltype(s)::value, P = decltype(p)::value;
        launcher.template launch<FastForwardPlanes<K, S, P, x_t, l_t, acc_t>>(shape, a);
      });
      launched = true;
    }
    if (launched) return channels_last ? "fast_channels_last" : "fast_planes";
  }
  return launch_generic<GenericForward>(launcher, a, g.N * g.C * g.OH * g.OW, channels_last,
                                       force_int64);
}

template <typename Launcher, typename x_t, typename l_t, typename acc_t>
const char* dispatch_backward(Launcher& launcher, const BackwardArgs<x_t, l_t, acc_t>& a,
                              bool channels_last, KernelVariant variant, bool force_int64) {
  const LipGeometry& g = a.g;
  const FastGeometry fg = fast_geometry(g);
  if (variant == KernelVariant::Fast && fg != FastGeometry::None) {
    constexpr int V = fast_vector_width<x_t>();
    LaunchShape shape{};
    bool launched = false;
    if (channels_last) {
      if (channels_last_vectorizable<x_t, l_t, acc_t, V>(g, a.ls, a.x, a.logit, a.grad_out,
                                                         a.window_max, a.inv_weight_sum) &&
          aligned_to(a.out, sizeof(x_t) * V) && aligned_to(a.grad_x, sizeof(x_t) * V) &&
          aligned_to(a.grad_logit, sizeof(l_t) * V) &&
          channels_last_shape(g.N * g.H, g.W, g.C / V, shape)) {
        with_fast_geometry(fg, [&](auto k, auto s, auto p) {
          constexpr int K = decltype(k)::value, S = decltype(s)::value, P = decltype(p)::value;
          launcher.template launch<FastBackwardChannelsLast<K, S, P, V, x_t, l_t, acc_t>>(shape, a);
        });
        launched = true;
      }
    } else {
      with_fast_geometry(fg, [&](auto k, auto s, auto p) {
        constexpr int K = decltype(k)::value, S = decltype(s)::value, P = decltype(p)::value;
        using Kernel = FastBackwardPlanes<K, S, P, x_t, l_t, acc_t>;
        // one thread per S x S block of inputs
        if (planes_shape(g, g.N * g.C * Kernel::blocks(g.H), Kernel::blocks(g.W), shape)) {
          launcher.template launch<Kernel>(shape, a);
          launched = true;
        }
      });
    }
    if (launched) return channels_last ? "fast_channels_last" : "fast_planes";
  }
  return launch_generic<GenericBackward>(launcher, a, g.N * g.C * g.H * g.W, channels_last,
                                        force_int64);
}

// The typed dispatch of one call through `launcher`, shared by the CUDA
// launcher and the emulation; returns the kernel's name.
template <typename Launcher>
const char* launch_forward(Launcher& launcher, const ForwardTensors& t, const CallGeometry& cg,
                           KernelVariant variant, bool force_int64) {
  const char* name = "";
  dispatch_dtypes(t.x.scalar_type(), t.logit.scalar_type(), [&](auto x_tag, auto l_tag) {
    using x_t = decltype(x_tag);
    using l_t = decltype(l_tag);
    name = dispatch_forward(launcher, forward_args<x_t, l_t>(t, cg), cg.channels_last, variant,
                            force_int64);
  });
  return name;
}

template <typename Launcher>
const char* launch_backward(Launcher& launcher, const BackwardTensors& t, const CallGeometry& cg,
                            KernelVariant variant, bool force_int64) {
  const char* name = "";
  dispatch_dtypes(t.x.scalar_type(), t.logit.scalar_type(), [&](auto x_tag, auto l_tag) {
    using x_t = decltype(x_tag);
    using l_t = decltype(l_tag);
    name = dispatch_backward(launcher, backward_args<x_t, l_t>(t, cg), cg.channels_last, variant,
                             force_int64);
  });
  return name;
}

}  // namespace lip_cuda
