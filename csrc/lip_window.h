// Window geometry and the stable window-softmax step of LIP, shared by the
// CPU and CUDA kernels so that the CPU tests exercise the same index math.
//
// LIP(x, l)_o = sum_{i in W(o)} exp(l_i) x_i / sum_{i in W(o)} exp(l_i):
// avg_pool2d's divisor appears in numerator and denominator and cancels, so
// only the window clipped to the real input matters. Everything here is a
// softmax over that window, computed relative to the window max.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LIP_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LIP_HOST_DEVICE inline
#endif

namespace lip_cuda {

// Pooling arguments and sizes of one call. Sizes are int64 so that the
// products below never overflow; the kernels pick the offset type.
struct LipGeometry {
  int64_t N, C, H, W;    // input
  int64_t OH, OW;        // output
  int64_t kH, kW, sH, sW, pH, pW;
};

// Output length along one dimension, exactly as avg_pool2d computes it
// (ATen's pooling_output_shape with dilation 1): with ceil_mode the last
// window must start inside the input or its left padding.
inline int64_t pooled_size(int64_t in, int64_t k, int64_t s, int64_t p, bool ceil_mode) {
  const int64_t num = in + 2 * p - k + (ceil_mode ? s - 1 : 0);
  // floor division; num may be negative when the kernel exceeds the input
  int64_t out = (num >= 0 ? num / s : -((-num + s - 1) / s)) + 1;
  if (ceil_mode && out > 0 && (out - 1) * s >= in + p) {
    --out;
  }
  return out;
}

// [begin, end) of the input rows (or columns) seen by output o, clipped to
// the input. Never empty while padding <= kernel / 2.
LIP_HOST_DEVICE void window_range(int64_t o, int64_t k, int64_t s, int64_t p, int64_t in,
                                  int64_t& begin, int64_t& end) {
  const int64_t start = o * s - p;
  begin = start > 0 ? start : 0;
  end = start + k < in ? start + k : in;
}

// [first, last] of the outputs whose windows hold input index i: the
// backward gather visits exactly these, at most ceil(k / s) of them.
LIP_HOST_DEVICE void covering_outputs(int64_t i, int64_t k, int64_t s, int64_t p, int64_t out,
                                      int64_t& first, int64_t& last) {
  // o * s - p <= i  and  i < o * s - p + k
  const int64_t lo = i + p - k + 1;
  first = lo <= 0 ? 0 : (lo + s - 1) / s;
  const int64_t hi = (i + p) / s;  // i + p >= 0
  last = hi < out - 1 ? hi : out - 1;
}

template <typename acc_t>
LIP_HOST_DEVICE acc_t lip_exp(acc_t v) {
  return ::exp(v);
}

template <typename acc_t>
LIP_HOST_DEVICE acc_t lip_log(acc_t v) {
  return ::log(v);
}

#if defined(__CUDACC__) || defined(__HIPCC__)
template <>
LIP_HOST_DEVICE float lip_exp<float>(float v) {
  return ::expf(v);
}
template <>
LIP_HOST_DEVICE float lip_log<float>(float v) {
  return ::logf(v);
}
#endif

// Running softmax-weighted mean over one window with an online max. Each
// step costs one exp: either of the new logit (it is not the max) or of the
// rescale factor for the old sums (it is the new max).
template <typename acc_t>
struct OnlineWindowSoftmax {
  acc_t max_logit;
  acc_t weight_sum;  // sum exp(l - max_logit)
  acc_t value_sum;   // sum exp(l - max_logit) * x

  LIP_HOST_DEVICE OnlineWindowSoftmax()
      : max_logit(-INFINITY), weight_sum(0), value_sum(0) {}

  LIP_HOST_DEVICE void add(acc_t logit, acc_t x) {
    if (logit == -INFINITY) {
      return;  // zero weight; -inf - -inf would make the sums NaN
    }
    if (logit > max_logit) {
      // first element: exp(-inf) = 0 clears the empty sums
      const acc_t scale = lip_exp<acc_t>(max_logit - logit);
      weight_sum = weight_sum * scale + acc_t(1);
      value_sum = value_sum * scale + x;
      max_logit = logit;
    } else {
      const acc_t e = lip_exp<acc_t>(logit - max_logit);
      weight_sum += e;
      value_sum += e * x;
    }
  }

  LIP_HOST_DEVICE acc_t mean() const { return value_sum / weight_sum; }

  // log sum exp(l) over the window; backward's p_i = exp(l_i - lse)
  LIP_HOST_DEVICE acc_t log_sum_exp() const { return max_logit + lip_log<acc_t>(weight_sum); }
};

// Offsets of dense tensors in either memory format; every tensor of one
// call is made dense in the same format first.
template <bool ChannelsLast, typename index_t>
LIP_HOST_DEVICE index_t dense_offset(index_t n, index_t c, index_t h, index_t w, index_t C,
                                     index_t H, index_t W) {
  return ChannelsLast ? ((n * H + h) * W + w) * C + c : ((n * C + c) * H + h) * W + w;
}

// Inverse of dense_offset: the (n, c, h, w) of linear index i.
template <bool ChannelsLast, typename index_t>
LIP_HOST_DEVICE void dense_coords(index_t i, index_t C, index_t H, index_t W, index_t& n,
                                  index_t& c, index_t& h, index_t& w) {
  if (ChannelsLast) {
    c = i % C;
    i /= C;
    w = i % W;
    i /= W;
    h = i % H;
    n = i / H;
  } else {
    w = i % W;
    i /= W;
    h = i % H;
    i /= H;
    c = i % C;
    n = i / C;
  }
}

// Forward for output element `o` (linear in the memory format): writes the
// pooled value and its log-sum-exp.
template <bool ChannelsLast, typename scalar_t, typename acc_t, typename index_t>
LIP_HOST_DEVICE void lip_forward_element(index_t o, const LipGeometry& g,
                                         const scalar_t* __restrict__ x,
                                         const scalar_t* __restrict__ logit,
                                         scalar_t* __restrict__ out,
                                         acc_t* __restrict__ lse) {
  const index_t C = g.C, H = g.H, W = g.W;
  index_t n, c, oh, ow;
  dense_coords<ChannelsLast, index_t>(o, C, g.OH, g.OW, n, c, oh, ow);
  int64_t h0, h1, w0, w1;
  window_range(oh, g.kH, g.sH, g.pH, g.H, h0, h1);
  window_range(ow, g.kW, g.sW, g.pW, g.W, w0, w1);
  OnlineWindowSoftmax<acc_t> acc;
  for (index_t h = h0; h < h1; ++h) {
    for (index_t w = w0; w < w1; ++w) {
      const index_t i = dense_offset<ChannelsLast, index_t>(n, c, h, w, C, H, W);
      acc.add(static_cast<acc_t>(logit[i]), static_cast<acc_t>(x[i]));
    }
  }
  out[o] = static_cast<scalar_t>(acc.mean());
  lse[o] = acc.log_sum_exp();
}

// Backward for input element `i` (linear in the memory format), a gather
// over the outputs whose windows hold it:
//   dx_i = sum_o g_o p_oi,  dl_i = sum_o g_o p_oi (x_i - y_o),  p_oi = exp(l_i - lse_o)
template <bool ChannelsLast, typename scalar_t, typename acc_t, typename index_t>
LIP_HOST_DEVICE void lip_backward_element(index_t i, const LipGeometry& g,
                                          const scalar_t* __restrict__ grad_out,
                                          const scalar_t* __restrict__ x,
                                          const scalar_t* __restrict__ logit,
                                          const scalar_t* __restrict__ out,
                                          const acc_t* __restrict__ lse,
                                          scalar_t* __restrict__ grad_x,
                                          scalar_t* __restrict__ grad_logit) {
  const index_t C = g.C, OH = g.OH, OW = g.OW;
  index_t n, c, h, w;
  dense_coords<ChannelsLast, index_t>(i, C, g.H, g.W, n, c, h, w);
  int64_t oh0, oh1, ow0, ow1;
  covering_outputs(h, g.kH, g.sH, g.pH, g.OH, oh0, oh1);
  covering_outputs(w, g.kW, g.sW, g.pW, g.OW, ow0, ow1);
  const acc_t xi = static_cast<acc_t>(x[i]);
  const acc_t li = static_cast<acc_t>(logit[i]);
  acc_t dx = 0;
  acc_t dl = 0;
  for (index_t oh = oh0; oh <= oh1; ++oh) {
    for (index_t ow = ow0; ow <= ow1; ++ow) {
      const index_t o = dense_offset<ChannelsLast, index_t>(n, c, oh, ow, C, OH, OW);
      const acc_t gp = static_cast<acc_t>(grad_out[o]) * lip_exp<acc_t>(li - lse[o]);
      dx += gp;
      dl += gp * (xi - static_cast<acc_t>(out[o]));
    }
  }
  grad_x[i] = static_cast<scalar_t>(dx);
  grad_logit[i] = static_cast<scalar_t>(dl);
}

}  // namespace lip_cuda
