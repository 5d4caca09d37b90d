// CPU kernels.
//
// float32, float16 and bfloat16 run on blocks of kLanes channels of one
// image: the block is converted to float in a lane-minor buffer [H][W][lane]
// (from either memory format), so that every window step is a loop over
// lanes that the compiler vectorises, exp and log included
// (lip_cpu_math.h). Per window: max first, then the sums of exp(l - max);
// backward is a gather over the covering outputs of each input pixel. The
// window geometry is lip_window.h's, shared with the CUDA kernels.
//
// float64 runs the per-element functions of lip_window.h, the very code the
// CUDA kernels run, one output (or input) element per loop iteration.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <memory>

#include "lip_cpu_math.h"
#include "lip_kernels.h"

namespace lip_cuda {
namespace {

using cpu_math::exp_lanes;
using cpu_math::kLanes;
using cpu_math::Lanes;
using cpu_math::load;
using cpu_math::log_lanes;
using cpu_math::max_lanes;
using cpu_math::splat;
using cpu_math::store;

// Elements per task of the float64 element loops.
constexpr int64_t kGrainSize = 4096;

struct ChannelBlock {
  int64_t n, c0, lanes;  // image, first channel, channels in use (<= kLanes)
};

// Copies channels [c0, c0 + lanes) of image n of a dense (N, C, rows, cols)
// tensor into dst[rows][cols][kLanes] as float; unused lanes get `fill`.
template <bool ChannelsLast, typename src_t>
void pack_block(const src_t* src, const ChannelBlock& b, int64_t C, int64_t rows, int64_t cols,
                float fill, float* dst) {
  const int64_t pixels = rows * cols;
  if (ChannelsLast) {
    const src_t* base = src + b.n * pixels * C + b.c0;
    // A full block gets a fixed trip count: the compiler then emits vector
    // moves instead of a memcpy call per pixel.
    if (b.lanes == kLanes) {
      for (int64_t px = 0; px < pixels; ++px) {
        for (int64_t c = 0; c < kLanes; ++c) dst[px * kLanes + c] = static_cast<float>(base[px * C + c]);
      }
      return;
    }
    for (int64_t px = 0; px < pixels; ++px) {
      const src_t* s = base + px * C;
      float* d = dst + px * kLanes;
      for (int64_t c = 0; c < b.lanes; ++c) d[c] = static_cast<float>(s[c]);
      for (int64_t c = b.lanes; c < kLanes; ++c) d[c] = fill;
    }
  } else {
    for (int64_t c = 0; c < kLanes; ++c) {
      if (c < b.lanes) {
        const src_t* s = src + (b.n * C + b.c0 + c) * pixels;
        for (int64_t px = 0; px < pixels; ++px) dst[px * kLanes + c] = static_cast<float>(s[px]);
      } else {
        for (int64_t px = 0; px < pixels; ++px) dst[px * kLanes + c] = fill;
      }
    }
  }
}

// The inverse of pack_block: writes the used lanes of src[rows][cols][kLanes]
// to channels [c0, c0 + lanes) of image n of a dense tensor.
template <bool ChannelsLast, typename dst_t>
void unpack_block(const float* src, const ChannelBlock& b, int64_t C, int64_t rows, int64_t cols,
                  dst_t* dst) {
  const int64_t pixels = rows * cols;
  if (ChannelsLast) {
    dst_t* base = dst + b.n * pixels * C + b.c0;
    if (b.lanes == kLanes) {  // fixed trip count, as in pack_block
      for (int64_t px = 0; px < pixels; ++px) {
        for (int64_t c = 0; c < kLanes; ++c) base[px * C + c] = static_cast<dst_t>(src[px * kLanes + c]);
      }
      return;
    }
    for (int64_t px = 0; px < pixels; ++px) {
      for (int64_t c = 0; c < b.lanes; ++c) base[px * C + c] = static_cast<dst_t>(src[px * kLanes + c]);
    }
  } else {
    for (int64_t c = 0; c < b.lanes; ++c) {
      dst_t* d = dst + (b.n * C + b.c0 + c) * pixels;
      for (int64_t px = 0; px < pixels; ++px) d[px] = static_cast<dst_t>(src[px * kLanes + c]);
    }
  }
}

// Runs fn(block, scratch) over every (image, channel block) in parallel.
// Each task allocates its scratch of `scratch_floats` once, uninitialised,
// and reuses it for all its blocks: a fresh zero-filled buffer per block
// cost more in page faults than the arithmetic.
template <typename Fn>
void for_each_block(const LipGeometry& g, int64_t scratch_floats, Fn&& fn) {
  const int64_t blocks_per_image = (g.C + kLanes - 1) / kLanes;
  at::parallel_for(0, g.N * blocks_per_image, 1, [&](int64_t begin, int64_t end) {
    std::unique_ptr<float[]> scratch(new float[scratch_floats]);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / blocks_per_image;
      const int64_t c0 = (i % blocks_per_image) * kLanes;
      fn(ChannelBlock{n, c0, std::min<int64_t>(kLanes, g.C - c0)}, scratch.get());
    }
  });
}

template <bool ChannelsLast, typename scalar_t>
void forward_blocks(const at::Tensor& x, const at::Tensor& logit, const LipGeometry& g,
                    const at::Tensor& out, const at::Tensor& lse) {
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const scalar_t* l_ptr = logit.const_data_ptr<scalar_t>();
  scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
  float* lse_ptr = lse.mutable_data_ptr<float>();
  const int64_t plane = g.H * g.W * kLanes;
  const int64_t out_plane = g.OH * g.OW * kLanes;
  for_each_block(g, 2 * plane + 2 * out_plane, [&](const ChannelBlock& b, float* scratch) {
    float* xb = scratch;
    float* lb = xb + plane;
    float* yb = lb + plane;
    float* lseb = yb + out_plane;
    pack_block<ChannelsLast>(x_ptr, b, g.C, g.H, g.W, 0.0f, xb);
    pack_block<ChannelsLast>(l_ptr, b, g.C, g.H, g.W, 0.0f, lb);
    for (int64_t oh = 0; oh < g.OH; ++oh) {
      int64_t h0, h1;
      window_range(oh, g.kH, g.sH, g.pH, g.H, h0, h1);
      for (int64_t ow = 0; ow < g.OW; ++ow) {
        int64_t w0, w1;
        window_range(ow, g.kW, g.sW, g.pW, g.W, w0, w1);
        Lanes m = splat(-std::numeric_limits<float>::infinity());
        for (int64_t h = h0; h < h1; ++h) {
          for (int64_t w = w0; w < w1; ++w) {
            m = max_lanes(m, load(lb + (h * g.W + w) * kLanes));
          }
        }
        Lanes s = splat(0.0f);
        Lanes a = splat(0.0f);
        for (int64_t h = h0; h < h1; ++h) {
          for (int64_t w = w0; w < w1; ++w) {
            const Lanes e = exp_lanes(load(lb + (h * g.W + w) * kLanes) - m);
            s += e;
            a += e * load(xb + (h * g.W + w) * kLanes);
          }
        }
        store(yb + (oh * g.OW + ow) * kLanes, a / s);
        store(lseb + (oh * g.OW + ow) * kLanes, m + log_lanes(s));
      }
    }
    unpack_block<ChannelsLast>(yb, b, g.C, g.OH, g.OW, out_ptr);
    unpack_block<ChannelsLast>(lseb, b, g.C, g.OH, g.OW, lse_ptr);
  });
}

template <bool ChannelsLast, typename scalar_t>
void backward_blocks(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& logit,
                     const at::Tensor& out, const at::Tensor& lse, const LipGeometry& g,
                     const at::Tensor& grad_x, const at::Tensor& grad_logit) {
  const scalar_t* g_ptr = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const scalar_t* l_ptr = logit.const_data_ptr<scalar_t>();
  const scalar_t* y_ptr = out.const_data_ptr<scalar_t>();
  const float* lse_ptr = lse.const_data_ptr<float>();
  scalar_t* gx_ptr = grad_x.mutable_data_ptr<scalar_t>();
  scalar_t* gl_ptr = grad_logit.mutable_data_ptr<scalar_t>();
  const int64_t in_plane = g.H * g.W * kLanes;
  const int64_t out_plane = g.OH * g.OW * kLanes;
  for_each_block(g, 4 * in_plane + 3 * out_plane, [&](const ChannelBlock& b, float* scratch) {
    float* xb = scratch;
    float* lb = xb + in_plane;
    float* dxb = lb + in_plane;
    float* dlb = dxb + in_plane;
    float* gb = dlb + in_plane;
    float* yb = gb + out_plane;
    float* lseb = yb + out_plane;
    pack_block<ChannelsLast>(x_ptr, b, g.C, g.H, g.W, 0.0f, xb);
    pack_block<ChannelsLast>(l_ptr, b, g.C, g.H, g.W, 0.0f, lb);
    pack_block<ChannelsLast>(g_ptr, b, g.C, g.OH, g.OW, 0.0f, gb);
    pack_block<ChannelsLast>(y_ptr, b, g.C, g.OH, g.OW, 0.0f, yb);
    pack_block<ChannelsLast>(lse_ptr, b, g.C, g.OH, g.OW, 0.0f, lseb);
    for (int64_t h = 0; h < g.H; ++h) {
      int64_t oh0, oh1;
      covering_outputs(h, g.kH, g.sH, g.pH, g.OH, oh0, oh1);
      for (int64_t w = 0; w < g.W; ++w) {
        int64_t ow0, ow1;
        covering_outputs(w, g.kW, g.sW, g.pW, g.OW, ow0, ow1);
        const Lanes xi = load(xb + (h * g.W + w) * kLanes);
        const Lanes li = load(lb + (h * g.W + w) * kLanes);
        Lanes dx = splat(0.0f);
        Lanes dl = splat(0.0f);
        for (int64_t oh = oh0; oh <= oh1; ++oh) {
          for (int64_t ow = ow0; ow <= ow1; ++ow) {
            const int64_t o = (oh * g.OW + ow) * kLanes;
            const Lanes gp = load(gb + o) * exp_lanes(li - load(lseb + o));
            dx += gp;
            dl += gp * (xi - load(yb + o));
          }
        }
        store(dxb + (h * g.W + w) * kLanes, dx);
        store(dlb + (h * g.W + w) * kLanes, dl);
      }
    }
    unpack_block<ChannelsLast>(dxb, b, g.C, g.H, g.W, gx_ptr);
    unpack_block<ChannelsLast>(dlb, b, g.C, g.H, g.W, gl_ptr);
  });
}

template <bool ChannelsLast>
void forward_elements_f64(const at::Tensor& x, const at::Tensor& logit, const LipGeometry& g,
                          const at::Tensor& out, const at::Tensor& lse) {
  const double* x_ptr = x.const_data_ptr<double>();
  const double* l_ptr = logit.const_data_ptr<double>();
  double* out_ptr = out.mutable_data_ptr<double>();
  double* lse_ptr = lse.mutable_data_ptr<double>();
  at::parallel_for(0, out.numel(), kGrainSize, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      lip_forward_element<ChannelsLast, double, double, int64_t>(o, g, x_ptr, l_ptr, out_ptr,
                                                                 lse_ptr);
    }
  });
}

template <bool ChannelsLast>
void backward_elements_f64(const at::Tensor& grad_out, const at::Tensor& x,
                           const at::Tensor& logit, const at::Tensor& out, const at::Tensor& lse,
                           const LipGeometry& g, const at::Tensor& grad_x,
                           const at::Tensor& grad_logit) {
  const double* g_ptr = grad_out.const_data_ptr<double>();
  const double* x_ptr = x.const_data_ptr<double>();
  const double* l_ptr = logit.const_data_ptr<double>();
  const double* out_ptr = out.const_data_ptr<double>();
  const double* lse_ptr = lse.const_data_ptr<double>();
  double* gx_ptr = grad_x.mutable_data_ptr<double>();
  double* gl_ptr = grad_logit.mutable_data_ptr<double>();
  at::parallel_for(0, x.numel(), kGrainSize, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      lip_backward_element<ChannelsLast, double, double, int64_t>(
          i, g, g_ptr, x_ptr, l_ptr, out_ptr, lse_ptr, gx_ptr, gl_ptr);
    }
  });
}

}  // namespace

void lip2d_forward_cpu(const at::Tensor& x, const at::Tensor& logit, const LipGeometry& geom,
                       bool channels_last, const at::Tensor& out, const at::Tensor& lse) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lip2d_forward_cpu", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      channels_last ? forward_elements_f64<true>(x, logit, geom, out, lse)
                    : forward_elements_f64<false>(x, logit, geom, out, lse);
    } else {
      channels_last ? forward_blocks<true, scalar_t>(x, logit, geom, out, lse)
                    : forward_blocks<false, scalar_t>(x, logit, geom, out, lse);
    }
  });
}

void lip2d_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& logit,
                        const at::Tensor& out, const at::Tensor& lse, const LipGeometry& geom,
                        bool channels_last, const at::Tensor& grad_x,
                        const at::Tensor& grad_logit) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lip2d_backward_cpu", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      channels_last
          ? backward_elements_f64<true>(grad_out, x, logit, out, lse, geom, grad_x, grad_logit)
          : backward_elements_f64<false>(grad_out, x, logit, out, lse, geom, grad_x, grad_logit);
    } else {
      channels_last ? backward_blocks<true, scalar_t>(grad_out, x, logit, out, lse, geom, grad_x,
                                                      grad_logit)
                    : backward_blocks<false, scalar_t>(grad_out, x, logit, out, lse, geom,
                                                       grad_x, grad_logit);
    }
  });
}

}  // namespace lip_cuda
