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
// x and the logit may differ in dtype (float32 logits with float16/bfloat16
// x); a logit shared across channels (broadcast) fills all lanes with one
// value.
//
// float64 runs the generic CUDA kernels' own per-thread code through the CPU
// emulation (lip2d_emulate.cpp), so every float64 test checks that code.
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

using cpu_math::kLanes;
using cpu_math::Lanes;
using cpu_math::load;
using cpu_math::load_lanes;
using cpu_math::splat;
using cpu_math::store;
using cpu_math::store_lanes;
using Step = WindowStep<cpu_math::LaneMath>;

// The window softmax of one output over all lanes. logit_at(h, w) and
// x_at(h, w) load the lanes of input pixel (h, w).
template <typename LogitAt, typename XAt>
inline void window_softmax(int64_t h0, int64_t h1, int64_t w0, int64_t w1, LogitAt logit_at,
                           XAt x_at, Lanes& y, Lanes& m, Lanes& inv_weight_sum) {
  m = splat(-std::numeric_limits<float>::infinity());
  for (int64_t h = h0; h < h1; ++h) {
    for (int64_t w = w0; w < w1; ++w) {
      Step::max_tap(m, logit_at(h, w));
    }
  }
  m = Step::reference_max(m);
  Lanes sum = splat(0.0f);
  Lanes weighted = splat(0.0f);
  for (int64_t h = h0; h < h1; ++h) {
    for (int64_t w = w0; w < w1; ++w) {
      Step::add_tap(logit_at(h, w), x_at(h, w), m, sum, weighted);
    }
  }
  Step::finish(sum, weighted, y, inv_weight_sum);
}

// Both gradients of one input pixel over all lanes: outputs (oh0..oh1) x
// (ow0..ow1) cover it; output_at(oh, ow, g, y, m, inv) loads their lanes.
template <typename OutputAt>
inline void gather_grads(int64_t oh0, int64_t oh1, int64_t ow0, int64_t ow1, Lanes xi, Lanes li,
                         OutputAt output_at, Lanes& dx, Lanes& dl) {
  dx = splat(0.0f);
  dl = splat(0.0f);
  for (int64_t oh = oh0; oh <= oh1; ++oh) {
    for (int64_t ow = ow0; ow <= ow1; ++ow) {
      Lanes g, y, m, inv;
      output_at(oh, ow, g, y, m, inv);
      Step::grad_tap(li, xi, g, y, m, inv, dx, dl);
    }
  }
}

// The logit lanes of channels [c0, c0 + count) at element offset `pixel`
// (which already holds n * ls.n + pixel * ls.pixel): one value for all lanes
// when the logit is shared across channels.
template <typename l_t>
inline Lanes load_logit_lanes(const l_t* logit, const LogitStrides& ls, int64_t pixel, int64_t c0,
                              int64_t count) {
  return ls.c == 0 ? splat(static_cast<float>(logit[pixel])) : load_lanes(logit + pixel + c0, count);
}

// ---- channels_last: lanes straight from the tensors ------------------------

template <typename x_t, typename l_t>
void forward_channels_last(const ForwardTensors& t, const CallGeometry& cg) {
  const LipGeometry& g = cg.g;
  const LogitStrides& ls = cg.ls;
  const x_t* x_ptr = t.x.const_data_ptr<x_t>();
  const l_t* l_ptr = t.logit.const_data_ptr<l_t>();
  x_t* out_ptr = t.out.mutable_data_ptr<x_t>();
  float* max_ptr = t.window_max.mutable_data_ptr<float>();
  float* inv_ptr = t.inv_weight_sum.mutable_data_ptr<float>();
  at::parallel_for(0, g.N * g.OH, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / g.OH;
      const int64_t oh = row % g.OH;
      int64_t h0, h1;
      window_range<int64_t>(oh, g.kH, g.sH, g.pH, g.H, h0, h1);
      for (int64_t ow = 0; ow < g.OW; ++ow) {
        int64_t w0, w1;
        window_range<int64_t>(ow, g.kW, g.sW, g.pW, g.W, w0, w1);
        for (int64_t c0 = 0; c0 < g.C; c0 += kLanes) {
          const int64_t count = std::min<int64_t>(kLanes, g.C - c0);
          const auto pixel = [&](int64_t h, int64_t w) { return (n * g.H + h) * g.W + w; };
          Lanes y, m, inv;
          window_softmax(
              h0, h1, w0, w1,
              [&](int64_t h, int64_t w) {
                return load_logit_lanes(l_ptr, ls, n * ls.n + (h * g.W + w) * ls.pixel, c0, count);
              },
              [&](int64_t h, int64_t w) { return load_lanes(x_ptr + pixel(h, w) * g.C + c0, count); },
              y, m, inv);
          const int64_t o = ((n * g.OH + oh) * g.OW + ow) * g.C + c0;
          store_lanes(out_ptr + o, y, count);
          store_lanes(max_ptr + o, m, count);
          store_lanes(inv_ptr + o, inv, count);
        }
      }
    }
  });
}

template <typename x_t, typename l_t>
void backward_channels_last(const BackwardTensors& t, const CallGeometry& cg) {
  const LipGeometry& g = cg.g;
  const LogitStrides& ls = cg.ls;
  const x_t* g_ptr = t.grad_out.const_data_ptr<x_t>();
  const x_t* x_ptr = t.x.const_data_ptr<x_t>();
  const l_t* l_ptr = t.logit.const_data_ptr<l_t>();
  const x_t* y_ptr = t.out.const_data_ptr<x_t>();
  const float* max_ptr = t.window_max.const_data_ptr<float>();
  const float* inv_ptr = t.inv_weight_sum.const_data_ptr<float>();
  x_t* gx_ptr = t.grad_x.mutable_data_ptr<x_t>();
  l_t* gl_ptr = t.grad_logit.mutable_data_ptr<l_t>();
  at::parallel_for(0, g.N * g.H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / g.H;
      const int64_t h = row % g.H;
      int64_t oh0, oh1;
      covering_outputs<int64_t>(h, g.kH, g.sH, g.pH, g.OH, oh0, oh1);
      for (int64_t w = 0; w < g.W; ++w) {
        int64_t ow0, ow1;
        covering_outputs<int64_t>(w, g.kW, g.sW, g.pW, g.OW, ow0, ow1);
        for (int64_t c0 = 0; c0 < g.C; c0 += kLanes) {
          const int64_t count = std::min<int64_t>(kLanes, g.C - c0);
          const int64_t i = ((n * g.H + h) * g.W + w) * g.C + c0;
          Lanes dx, dl;
          gather_grads(
              oh0, oh1, ow0, ow1, load_lanes(x_ptr + i, count),
              load_logit_lanes(l_ptr, ls, n * ls.n + (h * g.W + w) * ls.pixel, c0, count),
              [&](int64_t oh, int64_t ow, Lanes& go, Lanes& y, Lanes& m, Lanes& inv) {
                const int64_t o = ((n * g.OH + oh) * g.OW + ow) * g.C + c0;
                go = load_lanes(g_ptr + o, count);
                y = load_lanes(y_ptr + o, count);
                m = load_lanes(max_ptr + o, count);
                inv = load_lanes(inv_ptr + o, count);
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

// Copies planes [c0, c0 + lanes) of image n, at element offsets
// n * n_stride + c * c_stride, `pixels` elements each, into
// dst[pixel][kLanes] as float; unused lanes read 0. c_stride 0 (a logit
// shared across channels) copies one plane into every lane.
template <typename src_t>
void pack_planes(const src_t* src, int64_t n_stride, int64_t c_stride, const ChannelBlock& b,
                 int64_t pixels, float* dst) {
  for (int64_t c = 0; c < kLanes; ++c) {
    if (c < b.lanes) {
      const src_t* plane = src + b.n * n_stride + (b.c0 + c) * c_stride;
      for (int64_t px = 0; px < pixels; ++px) dst[px * kLanes + c] = static_cast<float>(plane[px]);
    } else {
      for (int64_t px = 0; px < pixels; ++px) dst[px * kLanes + c] = 0.0f;
    }
  }
}

// The inverse of pack_planes for the lanes in use, into a dense NCHW tensor.
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

template <typename x_t, typename l_t>
void forward_planes(const ForwardTensors& t, const CallGeometry& cg) {
  const LipGeometry& g = cg.g;
  const x_t* x_ptr = t.x.const_data_ptr<x_t>();
  const l_t* l_ptr = t.logit.const_data_ptr<l_t>();
  x_t* out_ptr = t.out.mutable_data_ptr<x_t>();
  float* max_ptr = t.window_max.mutable_data_ptr<float>();
  float* inv_ptr = t.inv_weight_sum.mutable_data_ptr<float>();
  const int64_t in_pixels = g.H * g.W;
  const int64_t out_pixels = g.OH * g.OW;
  const int64_t scratch = (2 * in_pixels + 3 * out_pixels) * kLanes;
  for_each_block(g, scratch, [&](const ChannelBlock& b, float* buffer) {
    float* xb = buffer;
    float* lb = xb + in_pixels * kLanes;
    float* yb = lb + in_pixels * kLanes;
    float* maxb = yb + out_pixels * kLanes;
    float* invb = maxb + out_pixels * kLanes;
    pack_planes(x_ptr, g.C * in_pixels, in_pixels, b, in_pixels, xb);
    pack_planes(l_ptr, cg.ls.n, cg.ls.c, b, in_pixels, lb);
    for (int64_t oh = 0; oh < g.OH; ++oh) {
      int64_t h0, h1;
      window_range<int64_t>(oh, g.kH, g.sH, g.pH, g.H, h0, h1);
      for (int64_t ow = 0; ow < g.OW; ++ow) {
        int64_t w0, w1;
        window_range<int64_t>(ow, g.kW, g.sW, g.pW, g.W, w0, w1);
        Lanes y, m, inv;
        window_softmax(
            h0, h1, w0, w1, [&](int64_t h, int64_t w) { return load(lb + (h * g.W + w) * kLanes); },
            [&](int64_t h, int64_t w) { return load(xb + (h * g.W + w) * kLanes); }, y, m, inv);
        const int64_t o = (oh * g.OW + ow) * kLanes;
        store(yb + o, y);
        store(maxb + o, m);
        store(invb + o, inv);
      }
    }
    unpack_planes(yb, b, g.C, out_pixels, out_ptr);
    unpack_planes(maxb, b, g.C, out_pixels, max_ptr);
    unpack_planes(invb, b, g.C, out_pixels, inv_ptr);
  });
}

template <typename x_t, typename l_t>
void backward_planes(const BackwardTensors& t, const CallGeometry& cg) {
  const LipGeometry& g = cg.g;
  const x_t* g_ptr = t.grad_out.const_data_ptr<x_t>();
  const x_t* x_ptr = t.x.const_data_ptr<x_t>();
  const l_t* l_ptr = t.logit.const_data_ptr<l_t>();
  const x_t* y_ptr = t.out.const_data_ptr<x_t>();
  const float* max_ptr = t.window_max.const_data_ptr<float>();
  const float* inv_ptr = t.inv_weight_sum.const_data_ptr<float>();
  x_t* gx_ptr = t.grad_x.mutable_data_ptr<x_t>();
  l_t* gl_ptr = t.grad_logit.mutable_data_ptr<l_t>();
  const int64_t in_pixels = g.H * g.W;
  const int64_t out_pixels = g.OH * g.OW;
  const int64_t scratch = (4 * in_pixels + 4 * out_pixels) * kLanes;
  for_each_block(g, scratch, [&](const ChannelBlock& b, float* buffer) {
    float* xb = buffer;
    float* lb = xb + in_pixels * kLanes;
    float* dxb = lb + in_pixels * kLanes;
    float* dlb = dxb + in_pixels * kLanes;
    float* gb = dlb + in_pixels * kLanes;
    float* yb = gb + out_pixels * kLanes;
    float* maxb = yb + out_pixels * kLanes;
    float* invb = maxb + out_pixels * kLanes;
    const int64_t x_n = g.C * in_pixels, o_n = g.C * out_pixels;
    pack_planes(x_ptr, x_n, in_pixels, b, in_pixels, xb);
    pack_planes(l_ptr, cg.ls.n, cg.ls.c, b, in_pixels, lb);
    pack_planes(g_ptr, o_n, out_pixels, b, out_pixels, gb);
    pack_planes(y_ptr, o_n, out_pixels, b, out_pixels, yb);
    pack_planes(max_ptr, o_n, out_pixels, b, out_pixels, maxb);
    pack_planes(inv_ptr, o_n, out_pixels, b, out_pixels, invb);
    for (int64_t h = 0; h < g.H; ++h) {
      int64_t oh0, oh1;
      covering_outputs<int64_t>(h, g.kH, g.sH, g.pH, g.OH, oh0, oh1);
      for (int64_t w = 0; w < g.W; ++w) {
        int64_t ow0, ow1;
        covering_outputs<int64_t>(w, g.kW, g.sW, g.pW, g.OW, ow0, ow1);
        const int64_t i = (h * g.W + w) * kLanes;
        Lanes dx, dl;
        gather_grads(
            oh0, oh1, ow0, ow1, load(xb + i), load(lb + i),
            [&](int64_t oh, int64_t ow, Lanes& go, Lanes& y, Lanes& m, Lanes& inv) {
              const int64_t o = (oh * g.OW + ow) * kLanes;
              go = load(gb + o);
              y = load(yb + o);
              m = load(maxb + o);
              inv = load(invb + o);
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

}  // namespace

const char* lip2d_forward_cpu(const ForwardTensors& t, const CallGeometry& cg) {
  if (t.x.scalar_type() == at::kDouble) {
    return lip2d_forward_emulated(t, cg, "generic", false);
  }
  dispatch_dtypes(t.x.scalar_type(), t.logit.scalar_type(), [&](auto x_tag, auto l_tag) {
                    using x_t = decltype(x_tag);
                    using l_t = decltype(l_tag);
                    if constexpr (!std::is_same_v<x_t, double>) {
                      cg.channels_last ? forward_channels_last<x_t, l_t>(t, cg)
                                       : forward_planes<x_t, l_t>(t, cg);
                    }
                  });
  return cg.channels_last ? "cpu_lanes_channels_last" : "cpu_lanes_planes";
}

const char* lip2d_backward_cpu(const BackwardTensors& t, const CallGeometry& cg) {
  if (t.x.scalar_type() == at::kDouble) {
    return lip2d_backward_emulated(t, cg, "generic", false);
  }
  dispatch_dtypes(t.x.scalar_type(), t.logit.scalar_type(), [&](auto x_tag, auto l_tag) {
                    using x_t = decltype(x_tag);
                    using l_t = decltype(l_tag);
                    if constexpr (!std::is_same_v<x_t, double>) {
                      cg.channels_last ? backward_channels_last<x_t, l_t>(t, cg)
                                       : backward_planes<x_t, l_t>(t, cg);
                    }
                  });
  return cg.channels_last ? "cpu_lanes_channels_last" : "cpu_lanes_planes";
}

}  // namespace lip_cuda
