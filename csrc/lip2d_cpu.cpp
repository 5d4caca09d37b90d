// CPU kernels.
//
// float32, float16 and bfloat16 run in float lanes (lip_cpu_math.h): each
// step of a window handles kLanes channels of one pixel at once, exp and log
// included. Per window: the max first, then the sums of exp(l - max);
// backward is a gather over the outputs covering each input pixel. The
// window geometry is lip_window.h's, shared with the CUDA kernels.
// - channels_last: channels are contiguous, so lanes load straight from the
//   tensors; parallel over output (forward) or input (backward) rows.
// - contiguous NCHW: a block of kLanes channel planes of one image is first
//   transposed into a lane-minor float buffer [H][W][lane], computed there,
//   and transposed back; parallel over (image, channel block).
//
// float64 runs the per-element functions of lip_window.h, the very code the
// CUDA kernels run, one output (or input) element per loop iteration.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <memory>
#include <type_traits>

#include "lip_cpu_lanes_io.h"
#include "lip_cpu_math.h"
#include "lip_kernels.h"

namespace lip_cuda {
namespace {

using cpu_math::exp_lanes;
using cpu_math::kLanes;
using cpu_math::Lanes;
using cpu_math::load;
using cpu_math::load_lanes;
using cpu_math::log_lanes;
using cpu_math::max_lanes;
using cpu_math::splat;
using cpu_math::store;
using cpu_math::store_lanes;

// Elements per task of the float64 element loops.
constexpr int64_t kGrainSize = 4096;

// The window softmax of one output over all lanes. logit_at(h, w) and
// x_at(h, w) load the lanes of input pixel (h, w).
template <typename LogitAt, typename XAt>
inline void window_softmax(int64_t h0, int64_t h1, int64_t w0, int64_t w1, LogitAt logit_at,
                           XAt x_at, Lanes& y, Lanes& lse) {
  Lanes m = splat(-std::numeric_limits<float>::infinity());
  for (int64_t h = h0; h < h1; ++h) {
    for (int64_t w = w0; w < w1; ++w) {
      m = max_lanes(m, logit_at(h, w));  // NaN: skipped here, poisons the sums
    }
  }
  Lanes sum = splat(0.0f);
  Lanes weighted = splat(0.0f);
  for (int64_t h = h0; h < h1; ++h) {
    for (int64_t w = w0; w < w1; ++w) {
      const Lanes e = exp_lanes(logit_at(h, w) - m);
      sum += e;
      weighted += e * x_at(h, w);
    }
  }
  y = weighted / sum;
  lse = m + log_lanes(sum);
}

// Both gradients of one input pixel over all lanes: outputs (oh0..oh1) x
// (ow0..ow1) cover it; output_at(oh, ow, g, y, lse) loads their lanes.
template <typename OutputAt>
inline void gather_grads(int64_t oh0, int64_t oh1, int64_t ow0, int64_t ow1, Lanes xi, Lanes li,
                         OutputAt output_at, Lanes& dx, Lanes& dl) {
  dx = splat(0.0f);
  dl = splat(0.0f);
  for (int64_t oh = oh0; oh <= oh1; ++oh) {
    for (int64_t ow = ow0; ow <= ow1; ++ow) {
      Lanes g, y, lse;
      output_at(oh, ow, g, y, lse);
      const Lanes gp = g * exp_lanes(li - lse);
      dx += gp;
      dl += gp * (xi - y);
    }
  }
}

// ---- channels_last: lanes straight from the tensors ------------------------

template <typename scalar_t>
void forward_channels_last(const at::Tensor& x, const at::Tensor& logit, const LipGeometry& g,
                           const at::Tensor& out, const at::Tensor& lse) {
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const scalar_t* l_ptr = logit.const_data_ptr<scalar_t>();
  scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
  float* lse_ptr = lse.mutable_data_ptr<float>();
  at::parallel_for(0, g.N * g.OH, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / g.OH;
      const int64_t oh = row % g.OH;
      int64_t h0, h1;
      window_range(oh, g.kH, g.sH, g.pH, g.H, h0, h1);
      for (int64_t ow = 0; ow < g.OW; ++ow) {
        int64_t w0, w1;
        window_range(ow, g.kW, g.sW, g.pW, g.W, w0, w1);
        for (int64_t c0 = 0; c0 < g.C; c0 += kLanes) {
          const int64_t count = std::min<int64_t>(kLanes, g.C - c0);
          const auto pixel = [&](int64_t h, int64_t w) { return ((n * g.H + h) * g.W + w) * g.C + c0; };
          Lanes y, lse_lanes;
          window_softmax(
              h0, h1, w0, w1, [&](int64_t h, int64_t w) { return load_lanes(l_ptr + pixel(h, w), count); },
              [&](int64_t h, int64_t w) { return load_lanes(x_ptr + pixel(h, w), count); }, y,
              lse_lanes);
          const int64_t o = ((n * g.OH + oh) * g.OW + ow) * g.C + c0;
          store_lanes(out_ptr + o, y, count);
          store_lanes(lse_ptr + o, lse_lanes, count);
        }
      }
    }
  });
}

template <typename scalar_t>
void backward_channels_last(const at::Tensor& grad_out, const at::Tensor& x,
                            const at::Tensor& logit, const at::Tensor& out, const at::Tensor& lse,
                            const LipGeometry& g, const at::Tensor& grad_x,
                            const at::Tensor& grad_logit) {
  const scalar_t* g_ptr = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const scalar_t* l_ptr = logit.const_data_ptr<scalar_t>();
  const scalar_t* y_ptr = out.const_data_ptr<scalar_t>();
  const float* lse_ptr = lse.const_data_ptr<float>();
  scalar_t* gx_ptr = grad_x.mutable_data_ptr<scalar_t>();
  scalar_t* gl_ptr = grad_logit.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, g.N * g.H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / g.H;
      const int64_t h = row % g.H;
      int64_t oh0, oh1;
      covering_outputs(h, g.kH, g.sH, g.pH, g.OH, oh0, oh1);
      for (int64_t w = 0; w < g.W; ++w) {
        int64_t ow0, ow1;
        covering_outputs(w, g.kW, g.sW, g.pW, g.OW, ow0, ow1);
        for (int64_t c0 = 0; c0 < g.C; c0 += kLanes) {
          const int64_t count = std::min<int64_t>(kLanes, g.C - c0);
          const int64_t i = ((n * g.H + h) * g.W + w) * g.C + c0;
          Lanes dx, dl;
          gather_grads(
              oh0, oh1, ow0, ow1, load_lanes(x_ptr + i, count), load_lanes(l_ptr + i, count),
              [&](int64_t oh, int64_t ow, Lanes& go, Lanes& y, Lanes& lse_lanes) {
                const int64_t o = ((n * g.OH + oh) * g.OW + ow) * g.C + c0;
                go = load_lanes(g_ptr + o, count);
                y = load_lanes(y_ptr + o, count);
                lse_lanes = load_lanes(lse_ptr + o, count);
              },
              dx, dl);
          store_lanes(gx_ptr + i, dx, count);
          store_lanes(gl_ptr + i, dl, count);
        }
      }
    }
  });
}

// ---- contiguous NCHW: channel blocks transposed into lane-minor buffers -----

struct ChannelBlock {
  int64_t n, c0, lanes;  // image, first channel, channels in use (<= kLanes)
};

// Copies planes [c0, c0 + lanes) of image n of an NCHW tensor with planes of
// `pixels` elements into dst[pixel][kLanes] as float; unused lanes read 0.
template <typename src_t>
void pack_planes(const src_t* src, const ChannelBlock& b, int64_t C, int64_t pixels, float* dst) {
  for (int64_t c = 0; c < kLanes; ++c) {
    if (c < b.lanes) {
      const src_t* plane = src + (b.n * C + b.c0 + c) * pixels;
      for (int64_t px = 0; px < pixels; ++px) dst[px * kLanes + c] = static_cast<float>(plane[px]);
    } else {
      for (int64_t px = 0; px < pixels; ++px) dst[px * kLanes + c] = 0.0f;
    }
  }
}

// The inverse of pack_planes for the lanes in use.
template <typename dst_t>
void unpack_planes(const float* src, const ChannelBlock& b, int64_t C, int64_t pixels, dst_t* dst) {
  for (int64_t c = 0; c < b.lanes; ++c) {
    dst_t* plane = dst + (b.n * C + b.c0 + c) * pixels;
    for (int64_t px = 0; px < pixels; ++px) plane[px] = static_cast<dst_t>(src[px * kLanes + c]);
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

template <typename scalar_t>
void forward_planes(const at::Tensor& x, const at::Tensor& logit, const LipGeometry& g,
                    const at::Tensor& out, const at::Tensor& lse) {
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const scalar_t* l_ptr = logit.const_data_ptr<scalar_t>();
  scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
  float* lse_ptr = lse.mutable_data_ptr<float>();
  const int64_t in_pixels = g.H * g.W;
  const int64_t out_pixels = g.OH * g.OW;
  const int64_t scratch = (2 * in_pixels + 2 * out_pixels) * kLanes;
  for_each_block(g, scratch, [&](const ChannelBlock& b, float* buffer) {
    float* xb = buffer;
    float* lb = xb + in_pixels * kLanes;
    float* yb = lb + in_pixels * kLanes;
    float* lseb = yb + out_pixels * kLanes;
    pack_planes(x_ptr, b, g.C, in_pixels, xb);
    pack_planes(l_ptr, b, g.C, in_pixels, lb);
    for (int64_t oh = 0; oh < g.OH; ++oh) {
      int64_t h0, h1;
      window_range(oh, g.kH, g.sH, g.pH, g.H, h0, h1);
      for (int64_t ow = 0; ow < g.OW; ++ow) {
        int64_t w0, w1;
        window_range(ow, g.kW, g.sW, g.pW, g.W, w0, w1);
        Lanes y, lse_lanes;
        window_softmax(
            h0, h1, w0, w1, [&](int64_t h, int64_t w) { return load(lb + (h * g.W + w) * kLanes); },
            [&](int64_t h, int64_t w) { return load(xb + (h * g.W + w) * kLanes); }, y, lse_lanes);
        store(yb + (oh * g.OW + ow) * kLanes, y);
        store(lseb + (oh * g.OW + ow) * kLanes, lse_lanes);
      }
    }
    unpack_planes(yb, b, g.C, out_pixels, out_ptr);
    unpack_planes(lseb, b, g.C, out_pixels, lse_ptr);
  });
}

template <typename scalar_t>
void backward_planes(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& logit,
                     const at::Tensor& out, const at::Tensor& lse, const LipGeometry& g,
                     const at::Tensor& grad_x, const at::Tensor& grad_logit) {
  const scalar_t* g_ptr = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const scalar_t* l_ptr = logit.const_data_ptr<scalar_t>();
  const scalar_t* y_ptr = out.const_data_ptr<scalar_t>();
  const float* lse_ptr = lse.const_data_ptr<float>();
  scalar_t* gx_ptr = grad_x.mutable_data_ptr<scalar_t>();
  scalar_t* gl_ptr = grad_logit.mutable_data_ptr<scalar_t>();
  const int64_t in_pixels = g.H * g.W;
  const int64_t out_pixels = g.OH * g.OW;
  const int64_t scratch = (4 * in_pixels + 3 * out_pixels) * kLanes;
  for_each_block(g, scratch, [&](const ChannelBlock& b, float* buffer) {
    float* xb = buffer;
    float* lb = xb + in_pixels * kLanes;
    float* dxb = lb + in_pixels * kLanes;
    float* dlb = dxb + in_pixels * kLanes;
    float* gb = dlb + in_pixels * kLanes;
    float* yb = gb + out_pixels * kLanes;
    float* lseb = yb + out_pixels * kLanes;
    pack_planes(x_ptr, b, g.C, in_pixels, xb);
    pack_planes(l_ptr, b, g.C, in_pixels, lb);
    pack_planes(g_ptr, b, g.C, out_pixels, gb);
    pack_planes(y_ptr, b, g.C, out_pixels, yb);
    pack_planes(lse_ptr, b, g.C, out_pixels, lseb);
    for (int64_t h = 0; h < g.H; ++h) {
      int64_t oh0, oh1;
      covering_outputs(h, g.kH, g.sH, g.pH, g.OH, oh0, oh1);
      for (int64_t w = 0; w < g.W; ++w) {
        int64_t ow0, ow1;
        covering_outputs(w, g.kW, g.sW, g.pW, g.OW, ow0, ow1);
        const int64_t i = (h * g.W + w) * kLanes;
        Lanes dx, dl;
        gather_grads(
            oh0, oh1, ow0, ow1, load(xb + i), load(lb + i),
            [&](int64_t oh, int64_t ow, Lanes& go, Lanes& y, Lanes& lse_lanes) {
              const int64_t o = (oh * g.OW + ow) * kLanes;
              go = load(gb + o);
              y = load(yb + o);
              lse_lanes = load(lseb + o);
            },
            dx, dl);
        store(dxb + i, dx);
        store(dlb + i, dl);
      }
    }
    unpack_planes(dxb, b, g.C, in_pixels, gx_ptr);
    unpack_planes(dlb, b, g.C, in_pixels, gl_ptr);
  });
}

// ---- float64: the shared element functions ---------------------------------

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
      channels_last ? forward_channels_last<scalar_t>(x, logit, geom, out, lse)
                    : forward_planes<scalar_t>(x, logit, geom, out, lse);
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
      channels_last ? backward_channels_last<scalar_t>(grad_out, x, logit, out, lse, geom,
                                                       grad_x, grad_logit)
                    : backward_planes<scalar_t>(grad_out, x, logit, out, lse, geom, grad_x,
                                                grad_logit);
    }
  });
}

}  // namespace lip_cuda
