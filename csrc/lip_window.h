// Window geometry and the stable window-softmax step of LIP: the one source
// of this math for every kernel (CPU SIMD lanes, CPU float64 elements, the
// generic and fast CUDA kernels and their CPU emulation).
//
// LIP(x, l)_o = sum_{i in W(o)} exp(l_i) x_i / sum_{i in W(o)} exp(l_i):
// avg_pool2d's divisor appears in numerator and denominator and cancels, so
// only the window clipped to the real input matters. Each window is a
// softmax relative to its own max logit m_o (docs/kernels.md):
//   S_o = sum exp(l_i - m_o),  y_o = sum exp(l_i - m_o) x_i / S_o.
// Forward saves m_o and 1 / S_o, not lse_o = m_o + log S_o: l_i - m_o is
// exact-ish for two logits of one window at any offset, where l_i - lse_o
// rounds away the gradient once |lse_o| is large (1e7 in float32).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LIP_HOST_DEVICE __host__ __device__ __forceinline__
#else
// Inlined by force on the host too, as __forceinline__ does on the device:
// the CPU kernels call these from per-ISA code (#pragma GCC target) while
// they are compiled for the baseline ISA, and GCC, left to choose, kept
// WindowStep::fallback_key out of line there (its SIMD calls cannot be
// inlined into baseline code), which took the float32 channels_last
// forward 1.2-1.3x as long.
#define LIP_HOST_DEVICE __attribute__((always_inline)) inline
#endif

// Fully unrolled loops over compile-time trip counts (window taps, lanes).
#if defined(__CUDACC__) || defined(__HIPCC__)
#define LIP_UNROLL _Pragma("unroll")
#else
#define LIP_UNROLL _Pragma("GCC unroll 16")
#endif

namespace lip_cuda {

// Pooling arguments and sizes of one call. Sizes are int64 so that the
// products below never overflow; the kernels pick the offset type.
struct LipGeometry {
  int64_t N, C, H, W;    // input
  int64_t OH, OW;        // output
  int64_t kH, kW, sH, sW, pH, pW;
};

// Element strides of the logit tensor, which may be shared across the
// batch and/or the channels (broadcast: stride 0). The logit is dense in
// the same memory format as x, so a pixel (h, w) is at (h * W + w) * pixel.
struct LogitStrides {
  int64_t n, c, pixel;
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
template <typename index_t>
LIP_HOST_DEVICE void window_range(index_t o, index_t k, index_t s, index_t p, index_t in,
                                  index_t& begin, index_t& end) {
  const index_t start = o * s - p;
  begin = start > 0 ? start : 0;
  end = start + k < in ? start + k : in;
}

// [first, last] of the outputs whose windows hold input index i: the
// backward gather visits exactly these, at most ceil(k / s) of them.
template <typename index_t>
LIP_HOST_DEVICE void covering_outputs(index_t i, index_t k, index_t s, index_t p, index_t out,
                                      index_t& first, index_t& last) {
  // o * s - p <= i  and  i < o * s - p + k
  const index_t lo = i + p - k + 1;
  first = lo <= 0 ? 0 : (lo + s - 1) / s;
  const index_t hi = (i + p) / s;  // i + p >= 0
  last = hi < out - 1 ? hi : out - 1;
}

// ---- value math: scalars (CPU and CUDA); SIMD lanes bring their own ------

// exp(v) for v <= 0 (a logit minus its window max), exactly 0 at -inf and
// below the float range. float on the GPU is one ex2.approx (a MUFU op)
// after folding log2(e) in; subtracting before scaling keeps the argument
// exact at any logit offset. The host (CPU emulation) uses exp2f of the same
// product, so both round the same argument.
LIP_HOST_DEVICE float exp_nonpositive(float v) {
  const float t = v * 1.4426950408889634f;
#if defined(__CUDA_ARCH__)
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(t));
  return r;
#else
  return std::exp2(t);
#endif
}

LIP_HOST_DEVICE double exp_nonpositive(double v) { return ::exp(v); }

// Operations the window step needs on a value type, for float and double;
// lip_cpu_math.h defines the same for SIMD lanes of floats.
template <typename T>
struct ScalarMath {
  using value = T;
  static LIP_HOST_DEVICE T splat(T v) { return v; }
  // max(a, b) that skips a NaN b: a NaN logit does not become the max; its
  // exp poisons the window's sums instead.
  static LIP_HOST_DEVICE T max(T a, T b) { return b > a ? b : a; }
  static LIP_HOST_DEVICE T exp_nonpositive(T v) { return lip_cuda::exp_nonpositive(v); }
  // a == 0 ? 0 : b, with NaN in a kept as NaN
  static LIP_HOST_DEVICE T zero_where_zero(T a, T b) { return a == T(0) ? T(0) : b; }
  // m == -inf ? 0 : m
  static LIP_HOST_DEVICE T finite_or_zero(T m) { return m == -INFINITY ? T(0) : m; }
  static LIP_HOST_DEVICE T reciprocal_or_zero(T s) { return s == T(0) ? T(0) : T(1) / s; }
  static LIP_HOST_DEVICE T quotient_or_zero(T a, T s) { return s == T(0) ? T(0) : a / s; }
  static LIP_HOST_DEVICE bool any_below(T a, T bound) { return a < bound; }
  // |a| < bound ? (a == 0 ? if_zero : if_tiny) : otherwise
  static LIP_HOST_DEVICE T select_small(T a, T bound, T if_zero, T if_tiny, T otherwise) {
    return a < bound && -a < bound ? (a == T(0) ? if_zero : if_tiny) : otherwise;
  }
  // a < bound ? if_below : otherwise
  static LIP_HOST_DEVICE T select_below(T a, T bound, T if_below, T otherwise) {
    return a < bound ? if_below : otherwise;
  }
};

// exp(-20) (float): the weight sum relative to a tile's max below which a
// window is recomputed relative to its own max (WindowStep, tile form).
constexpr float kTileMinWeightSum = 2.0611537e-9f;

// The weighted sums hold e x * kSumScale, and finish scales y back. A power
// of two, so in the normal range it changes no bit of y; what it changes is
// where the sum overflows: unscaled, a window's sum of e x passed the type's
// max once |x| passed max / window size (3.8e37 in float for 3 x 3), though
// the mean it divides into cannot; scaled, windows of up to 16 taps (4 x 4)
// stay finite for any finite x, larger ones up to max * 16 / taps. The
// products leave the normal range 4 binades earlier instead (|e x| below
// about 2e-37 in float); float16 x, summed in float, gets near neither.
constexpr float kSumScale = 1.0f / 16.0f;

// A weighted sum below this (2^-100) in magnitude may hold subnormal,
// rounded terms (a term loses precision below 2^-126, and 25 of them add at
// most 25 half-ulps of 2^-149). In the tile form, weights relative to a max
// far above the window's (down to kTileMinWeightSum) times an x below about
// 1e-28 cost y up to all its digits that way (x = 1e-35 came out 32% off,
// 1e-37 as 0); such windows are recomputed relative to their own max
// (WindowStep::fallback_key).
constexpr float kMinPreciseWeighted = 7.8886091e-31f;

// A weighted sum of exactly 0 is exact where x is 0 throughout the window
// (common after a ReLU), so it falls back only where the weight sum is
// below this (2^-20): there all its terms may have rounded to 0 from an x
// of up to 9 * 2^-146 / 2^-20, about 1e-37 (less than 10 times the
// smallest normal float), so the tile's 0 is never further off than that.
constexpr float kZeroWeightedMaxSum = 9.5367432e-7f;

// ---- the stable window step, written once --------------------------------
//
// A kernel visits the taps of a window twice: first max_tap over all of
// them, then, with m = reference_max(that max), add_tap over all of them,
// then finish. Backward calls grad_tap for every (input, covering output).
//
// Masking: a logit of -inf has weight exactly 0 and no effect whatever its
// x (even inf or NaN). A window whose logits are all -inf has no weight: its
// output is 0, as are its gradients (the reference formula gives 0/0 there).
// A NaN logit makes its windows NaN; +inf logits give NaN like the reference.
template <typename Math>
struct WindowStep {
  using V = typename Math::value;

  static LIP_HOST_DEVICE void max_tap(V& m, V logit) { m = Math::max(m, logit); }

  // The max used as the softmax reference: finite for a fully masked window,
  // so that -inf - m stays -inf instead of NaN.
  static LIP_HOST_DEVICE V reference_max(V m) { return Math::finite_or_zero(m); }

  static LIP_HOST_DEVICE void add_tap(V logit, V x, V m, V& weight_sum, V& weighted_sum) {
    const V e = Math::exp_nonpositive(logit - m);
    weight_sum += e;
    weighted_sum += weighted_term(e, x);
  }

  // One tap's term of the weighted sum, e x kSumScale: exactly 0 where the
  // weight is (a masked tap, whatever its x, even inf or NaN).
  static LIP_HOST_DEVICE V weighted_term(V e, V x) {
    return Math::zero_where_zero(e, e * (x * Math::splat(kSumScale)));
  }

  // y = weighted / S, and 1 / S for backward; both 0 for a fully masked window.
  static LIP_HOST_DEVICE void finish(V weight_sum, V weighted_sum, V& y, V& inv_weight_sum) {
    y = Math::quotient_or_zero(weighted_sum, weight_sum) * Math::splat(1.0f / kSumScale);
    inv_weight_sum = Math::reciprocal_or_zero(weight_sum);
  }

  // One covering output o of input i: p = exp(l_i - m_o) / S_o,
  // dx_i += g_o p,  dl_i += g_o p (x_i - y_o).
  static LIP_HOST_DEVICE void grad_tap(V logit, V x, V grad_out, V y, V m, V inv_weight_sum,
                                       V& dx, V& dl) {
    grad_weight_tap(tap_weight(logit, m), x, grad_out, y, inv_weight_sum, dx, dl);
  }

  // A tap's weight relative to a reference, exp(l_i - m_o), as grad_tap
  // takes it (a kernel may compute several first, then grad_weight_tap).
  static LIP_HOST_DEVICE V tap_weight(V logit, V m) { return Math::exp_nonpositive(logit - m); }

  // grad_tap with its weight e = exp(l_i - m_o) given: a kernel that sees
  // several covering outputs share a reference computes e once for them.
  //
  // g p (x - y) is formed as (2 g p) ((x / 2) - (y / 2)): scalings by powers
  // of two, so in the normal range the same bits as g p (x - y), but the
  // difference of an x and a y of opposite signs near the type's max no
  // longer overflows (it gave -inf for a finite gradient, and NaN where
  // g = 0). A term whose g p is 0 (a masked tap, or no gradient from that
  // output) adds exactly 0, whatever x is (inf, NaN).
  static LIP_HOST_DEVICE void grad_weight_tap(V e, V x, V grad_out, V y, V inv_weight_sum, V& dx,
                                              V& dl) {
    const V p = e * inv_weight_sum;
    const V gp = grad_out * p;
    dx += gp;
    const V half = Math::splat(0.5f);
    dl += Math::zero_where_zero(gp, (gp + gp) * (x * half - y * half));
  }

  // ---- the tile form: one exp per input (docs/kernels.md) ----------------
  //
  // The outputs of a tile (the CPU kernels: a strip of output rows of one
  // plane) weigh their taps relative to one reference M, the tile's max
  // logit, instead of each window's own max. Each input's weight
  // exp(l_i - M) is then computed once per tile and summed by every window
  // holding it: the same terms as add_tap's, in the same order, when
  // M = m_o. A window whose own max is far below M (weight sum below
  // kTileMinWeightSum, about exp(-20), or 0 when fully masked) loses
  // precision that way and is recomputed relative to its own max.

  static LIP_HOST_DEVICE void tile_weight(V logit, V x, V tile_max, V& e, V& ex) {
    e = Math::exp_nonpositive(logit - tile_max);
    ex = weighted_term(e, x);
  }

  static LIP_HOST_DEVICE void add_weight(V e, V ex, V& weight_sum, V& weighted_sum) {
    weight_sum += e;
    weighted_sum += ex;
  }

  // A tile-form window's fallback key: below kTileMinWeightSum where the
  // window needs its own max. That is its weight sum, or 0 where its
  // weighted sum may have lost digits to subnormal terms and its own max
  // would give it larger weights: nonzero but below kMinPreciseWeighted
  // with a weight sum below 1 (its max below the tile's), or exactly 0 with
  // a weight sum below kZeroWeightedMaxSum.
  static LIP_HOST_DEVICE V fallback_key(V weight_sum, V weighted_sum) {
    const V zero = Math::splat(0.0f);
    return Math::select_small(
        weighted_sum, Math::splat(kMinPreciseWeighted),
        Math::select_below(weight_sum, Math::splat(kZeroWeightedMaxSum), zero, weight_sum),
        Math::select_below(weight_sum, Math::splat(1.0f), zero, weight_sum), weight_sum);
  }

  // Whether some window (lane) of fallback keys needs its own max.
  static LIP_HOST_DEVICE bool needs_window_max(V key) {
    return Math::any_below(key, Math::splat(kTileMinWeightSum));
  }

  // Takes the window-max results (y_w, m_w, inv_w, from max_tap / add_tap /
  // finish) for the windows whose fallback key asks; the others keep the
  // tile's.
  static LIP_HOST_DEVICE void use_window_max(V key, V y_w, V m_w, V inv_w, V& y, V& reference,
                                             V& inv_weight_sum) {
    const V bound = Math::splat(kTileMinWeightSum);
    y = Math::select_below(key, bound, y_w, y);
    reference = Math::select_below(key, bound, m_w, reference);
    inv_weight_sum = Math::select_below(key, bound, inv_w, inv_weight_sum);
  }
};

// ---- dense offsets ---------------------------------------------------------

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

}  // namespace lip_cuda
