// The CUDA kernels' per-thread code, as host/device functions of the thread's
// (block, thread) index. nvcc wraps each in a __global__ entry point
// (lip2d_cuda.cu); the CPU emulation (lip2d_emulate.cpp) calls the very same
// functions in a loop over the launch grid, so CI runs the CUDA index math,
// vector loads and window math without a GPU. Nothing here uses shared
// memory or warp shuffles: each thread owns its outputs (forward) or inputs
// (backward), and neighbouring threads share overlapping window taps through
// the L1 cache.
//
// Two families:
// - generic: any geometry; one thread per output (forward) or input
//   (backward) element, linear in the memory format; int32 or int64 offsets.
// - fast: compile-time square kernel K, stride S, padding P (the geometries
//   networks use); no index division in the tap loops, unrolled taps, the
//   logits of a window loaded once into registers. channels_last threads own
//   a vector of V channels (8- or 16-byte loads of x); contiguous threads
//   own one output (forward) or an S x S block of inputs (backward, so the
//   block's covering outputs are loaded once). Offsets are int64 at the
//   plane/row base.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstring>

#include "lip_window.h"

namespace lip_cuda {

// The launch-grid coordinates of one thread (CUDA's blockIdx.x/y,
// threadIdx.x/y and blockDim.x/y). Blocks have kFastThreads threads; only
// the plane kernels choose their shape (block_dim_x x block_dim_y), the
// others use x alone.
struct ThreadIndex {
  int64_t block_x;
  int32_t block_y;
  int32_t thread_x;
  int32_t thread_y;
  int32_t block_dim_x;
  int32_t block_dim_y;
};

template <typename x_t, typename l_t, typename acc_t>
struct ForwardArgs {
  const x_t* x;
  const l_t* logit;
  x_t* out;
  acc_t* window_max;
  acc_t* inv_weight_sum;
  LipGeometry g;
  LogitStrides ls;
};

// grad_logit is x-shaped (dense in x's format) even when the logit is
// broadcast: the host reduces it to the logit's shape.
template <typename x_t, typename l_t, typename acc_t>
struct BackwardArgs {
  const x_t* grad_out;
  const x_t* x;
  const l_t* logit;
  const x_t* out;
  const acc_t* window_max;
  const acc_t* inv_weight_sum;
  x_t* grad_x;
  l_t* grad_logit;
  LipGeometry g;
  LogitStrides ls;
};

// ---- V consecutive elements as one load/store -----------------------------

template <typename T, int V>
struct alignas(sizeof(T) * V) Packed {
  T v[V];
};

// Loads p[0..V) into acc; p must be aligned to V * sizeof(T) (checked by
// the host before it picks a vector kernel).
template <int V, typename T, typename acc_t>
LIP_HOST_DEVICE void load_vec(const T* p, acc_t (&acc)[V]) {
  Packed<T, V> pk;
#if defined(__CUDA_ARCH__)
  pk = *reinterpret_cast<const Packed<T, V>*>(p);
#else
  std::memcpy(&pk, p, sizeof(pk));
#endif
LIP_UNROLL
  for (int j = 0; j < V; ++j) acc[j] = static_cast<acc_t>(pk.v[j]);
}

template <int V, typename T, typename acc_t>
LIP_HOST_DEVICE void store_vec(T* p, const acc_t (&acc)[V]) {
  Packed<T, V> pk;
LIP_UNROLL
  for (int j = 0; j < V; ++j) pk.v[j] = static_cast<T>(acc[j]);
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<Packed<T, V>*>(p) = pk;
#else
  std::memcpy(p, &pk, sizeof(pk));
#endif
}

// ---- generic: any geometry, one element per thread -------------------------

constexpr int kGenericThreads = 128;

template <bool ChannelsLast, typename x_t, typename l_t, typename acc_t, typename index_t>
struct GenericForward {
  using Args = ForwardArgs<x_t, l_t, acc_t>;
  using Step = WindowStep<ScalarMath<acc_t>>;

  static LIP_HOST_DEVICE void run(const ThreadIndex& t, const Args& a) {
    const int64_t linear = t.block_x * kGenericThreads + t.thread_x;
    const LipGeometry& g = a.g;
    if (linear >= g.N * g.C * g.OH * g.OW) return;
    const index_t o = static_cast<index_t>(linear);
    const index_t C = g.C, H = g.H, W = g.W;
    index_t n, c, oh, ow;
    dense_coords<ChannelsLast, index_t>(o, C, g.OH, g.OW, n, c, oh, ow);
    index_t h0, h1, w0, w1;
    window_range<index_t>(oh, g.kH, g.sH, g.pH, H, h0, h1);
    window_range<index_t>(ow, g.kW, g.sW, g.pW, W, w0, w1);
    const l_t* logit = a.logit + (n * static_cast<index_t>(a.ls.n) + c * static_cast<index_t>(a.ls.c));
    const index_t lpix = static_cast<index_t>(a.ls.pixel);
    acc_t m = -INFINITY;
    for (index_t h = h0; h < h1; ++h) {
      for (index_t w = w0; w < w1; ++w) {
        Step::max_tap(m, static_cast<acc_t>(logit[(h * W + w) * lpix]));
      }
    }
    m = Step::reference_max(m);
    acc_t sum = 0, weighted = 0;
    for (index_t h = h0; h < h1; ++h) {
      for (index_t w = w0; w < w1; ++w) {
        Step::add_tap(static_cast<acc_t>(logit[(h * W + w) * lpix]),
                      static_cast<acc_t>(a.x[dense_offset<ChannelsLast, index_t>(n, c, h, w, C, H, W)]),
                      m, sum, weighted);
      }
    }
    acc_t y, inv;
    Step::finish(sum, weighted, y, inv);
    a.out[o] = static_cast<x_t>(y);
    a.window_max[o] = m;
    a.inv_weight_sum[o] = inv;
  }
};

template <bool ChannelsLast, typename x_t, typename l_t, typename acc_t, typename index_t>
struct GenericBackward {
  using Args = BackwardArgs<x_t, l_t, acc_t>;
  using Step = WindowStep<ScalarMath<acc_t>>;

  static LIP_HOST_DEVICE void run(const ThreadIndex& t, const Args& a) {
    const int64_t linear = t.block_x * kGenericThreads + t.thread_x;
    const LipGeometry& g = a.g;
    if (linear >= g.N * g.C * g.H * g.W) return;
    const index_t i = static_cast<index_t>(linear);
    const index_t C = g.C, OH = g.OH, OW = g.OW;
    index_t n, c, h, w;
    dense_coords<ChannelsLast, index_t>(i, C, g.H, g.W, n, c, h, w);
    index_t oh0, oh1, ow0, ow1;
    covering_outputs<index_t>(h, g.kH, g.sH, g.pH, OH, oh0, oh1);
    covering_outputs<index_t>(w, g.kW, g.sW, g.pW, OW, ow0, ow1);
    const index_t li = n * static_cast<index_t>(a.ls.n) + c * static_cast<index_t>(a.ls.c) +
                       (h * static_cast<index_t>(g.W) + w) * static_cast<index_t>(a.ls.pixel);
    const acc_t l = static_cast<acc_t>(a.logit[li]);
    const acc_t xi = static_cast<acc_t>(a.x[i]);
    acc_t dx = 0, dl = 0;
    for (index_t oh = oh0; oh <= oh1; ++oh) {
      for (index_t ow = ow0; ow <= ow1; ++ow) {
        const index_t o = dense_offset<ChannelsLast, index_t>(n, c, oh, ow, C, OH, OW);
        Step::grad_tap(l, xi, static_cast<acc_t>(a.grad_out[o]), static_cast<acc_t>(a.out[o]),
                       a.window_max[o], a.inv_weight_sum[o], dx, dl);
      }
    }
    a.grad_x[i] = static_cast<x_t>(dx);
    a.grad_logit[i] = static_cast<l_t>(dl);
  }
};

// ---- fast: compile-time K, S, P --------------------------------------------

constexpr int kFastThreads = 128;

// Loads V logits of channels [c0, c0 + V) at one pixel: a vector when the
// logit has channels, one value for all lanes when it is shared across them.
template <int V, bool PerChannel, typename l_t, typename acc_t>
LIP_HOST_DEVICE void load_logit_lanes(const l_t* pixel, acc_t (&out)[V]) {
  if constexpr (PerChannel) {
    load_vec<V>(pixel, out);
  } else {
    const acc_t v = static_cast<acc_t>(*pixel);
LIP_UNROLL
    for (int j = 0; j < V; ++j) out[j] = v;
  }
}

template <int V, typename l_t, typename acc_t>
LIP_HOST_DEVICE void load_logit_lanes(const l_t* pixel, bool per_channel, acc_t (&out)[V]) {
  per_channel ? load_logit_lanes<V, true>(pixel, out) : load_logit_lanes<V, false>(pixel, out);
}

// Where a window tap loads from: the nearest pixel of the image, a legal
// address whether or not the tap is inside, so the load needs no branch.
LIP_HOST_DEVICE int32_t clamp_to(int32_t i, int32_t size) { return i < 0 ? 0 : (i >= size ? size - 1 : i); }

LIP_HOST_DEVICE bool tap_inside(int32_t h, int32_t w, int32_t H, int32_t W) {
  return h >= 0 && h < H && w >= 0 && w < W;
}

// channels_last forward. Grid: x = output rows (n * OH + oh), y * 128 +
// thread_x = (ow, channel vector) of that row, channel vector fastest so a
// warp reads contiguous vectors. The host checks C % V == 0 and the
// pointers' alignment.
//
// Every tap's logit and x are loaded before any is used: a tap outside the
// image loads the clamped pixel and gets the logit -inf, a weight of exactly
// 0 whatever that x (bitwise the outputs of skipping it). The earlier form,
// a branch per tap with its load used inside, waited for one load at a time
// (ncu: as slow in bfloat16 as in float32 with 58% of the bytes). On an
// H200 this form took the bfloat16 forward from 0.202-0.219 to 0.133-0.135
// ms at stem and s2b, float32's from 0.209-0.214 to 0.201-0.209
// (benchmarks/results/gpu_h200_4ab1a87_forward_ab). The same change made
// the contiguous forward (FastForwardPlanes, scalar loads that ptxas
// already predicated instead of branching) 5-12% slower, so that one keeps
// its branches.
template <int K, int S, int P, int V, typename x_t, typename l_t, typename acc_t>
struct FastForwardChannelsLast {
  using Args = ForwardArgs<x_t, l_t, acc_t>;
  using Step = WindowStep<ScalarMath<acc_t>>;

  static LIP_HOST_DEVICE void run(const ThreadIndex& t, const Args& a) {
    // one body per logit form, so that no branch splits the loads
    if (a.ls.c != 0) {
      run_with<true>(t, a);
    } else {
      run_with<false>(t, a);
    }
  }

  template <bool PerChannel>
  static LIP_HOST_DEVICE void run_with(const ThreadIndex& t, const Args& a) {
    const LipGeometry& g = a.g;
    const int32_t C = static_cast<int32_t>(g.C), H = static_cast<int32_t>(g.H),
                  W = static_cast<int32_t>(g.W), OH = static_cast<int32_t>(g.OH),
                  OW = static_cast<int32_t>(g.OW);
    const int32_t vectors = C / V;
    const int32_t j = t.block_y * kFastThreads + t.thread_x;
    if (j >= OW * vectors) return;
    const int32_t ow = j / vectors;
    const int32_t c0 = (j - ow * vectors) * V;
    const int32_t row = static_cast<int32_t>(t.block_x);  // < N * OH < 2^31 (host-checked)
    const int32_t n = row / OH;
    const int32_t oh = row - n * OH;
    const int32_t h_start = oh * S - P, w_start = ow * S - P;
    const x_t* x_img = a.x + static_cast<int64_t>(n) * H * W * C + c0;
    const l_t* l_img = a.logit + n * a.ls.n + c0 * a.ls.c;

    acc_t lv[K][K][V], xv[K][K][V];
LIP_UNROLL
    for (int kh = 0; kh < K; ++kh) {
      const int64_t h_row = static_cast<int64_t>(clamp_to(h_start + kh, H)) * W;
LIP_UNROLL
      for (int kw = 0; kw < K; ++kw) {
        const int64_t pixel = h_row + clamp_to(w_start + kw, W);
        load_logit_lanes<V, PerChannel>(l_img + pixel * a.ls.pixel, lv[kh][kw]);
        load_vec<V>(x_img + pixel * C, xv[kh][kw]);
      }
    }
    acc_t m[V];
LIP_UNROLL
    for (int v = 0; v < V; ++v) m[v] = -INFINITY;
LIP_UNROLL
    for (int kh = 0; kh < K; ++kh) {
LIP_UNROLL
      for (int kw = 0; kw < K; ++kw) {
        const bool inside = tap_inside(h_start + kh, w_start + kw, H, W);
LIP_UNROLL
        for (int v = 0; v < V; ++v) {
          if (!inside) lv[kh][kw][v] = -INFINITY;
          Step::max_tap(m[v], lv[kh][kw][v]);
        }
      }
    }
    acc_t sum[V], weighted[V];
LIP_UNROLL
    for (int v = 0; v < V; ++v) {
      m[v] = Step::reference_max(m[v]);
      sum[v] = 0;
      weighted[v] = 0;
    }
LIP_UNROLL
    for (int kh = 0; kh < K; ++kh) {
LIP_UNROLL
      for (int kw = 0; kw < K; ++kw) {
LIP_UNROLL
        for (int v = 0; v < V; ++v) Step::add_tap(lv[kh][kw][v], xv[kh][kw][v], m[v], sum[v], weighted[v]);
      }
    }
    acc_t y[V], inv[V];
LIP_UNROLL
    for (int v = 0; v < V; ++v) Step::finish(sum[v], weighted[v], y[v], inv[v]);
    const int64_t o = (static_cast<int64_t>(row) * OW + ow) * C + c0;
    store_vec<V>(a.out + o, y);
    store_vec<V>(a.window_max + o, m);
    store_vec<V>(a.inv_weight_sum + o, inv);
  }
};

// The covering outputs of input index i along one dimension for a
// compile-time geometry: [first, last], at most ceil(K / S) of them.
template <int K, int S, int P>
LIP_HOST_DEVICE void fast_covering(int32_t i, int32_t out, int32_t& first, int32_t& last) {
  const int32_t lo = i + P - K + 1;
  first = lo <= 0 ? 0 : (lo + S - 1) / S;
  const int32_t hi = (i + P) / S;
  last = hi < out - 1 ? hi : out - 1;
}

// channels_last backward: grid x = input rows (n * H + h), y * 128 +
// thread_x = (w, channel vector).
template <int K, int S, int P, int V, typename x_t, typename l_t, typename acc_t>
struct FastBackwardChannelsLast {
  using Args = BackwardArgs<x_t, l_t, acc_t>;
  using Step = WindowStep<ScalarMath<acc_t>>;
  static constexpr int kCover = (K + S - 1) / S;

  static LIP_HOST_DEVICE void run(const ThreadIndex& t, const Args& a) {
    const LipGeometry& g = a.g;
    const int32_t C = static_cast<int32_t>(g.C), H = static_cast<int32_t>(g.H),
                  W = static_cast<int32_t>(g.W), OH = static_cast<int32_t>(g.OH),
                  OW = static_cast<int32_t>(g.OW);
    const int32_t vectors = C / V;
    const int32_t j = t.block_y * kFastThreads + t.thread_x;
    if (j >= W * vectors) return;
    const int32_t w = j / vectors;
    const int32_t c0 = (j - w * vectors) * V;
    const int32_t row = static_cast<int32_t>(t.block_x);
    const int32_t n = row / H;
    const int32_t h = row - n * H;
    const int64_t i = (static_cast<int64_t>(row) * W + w) * C + c0;

    acc_t xi[V], li[V];
    load_vec<V>(a.x + i, xi);
    load_logit_lanes<V>(a.logit + n * a.ls.n + c0 * a.ls.c + (static_cast<int64_t>(h) * W + w) * a.ls.pixel,
                        a.ls.c != 0, li);
    int32_t oh0, oh1, ow0, ow1;
    fast_covering<K, S, P>(h, OH, oh0, oh1);
    fast_covering<K, S, P>(w, OW, ow0, ow1);
    acc_t dx[V], dl[V];
LIP_UNROLL
    for (int v = 0; v < V; ++v) {
      dx[v] = 0;
      dl[v] = 0;
    }
LIP_UNROLL
    for (int dh = 0; dh < kCover; ++dh) {
LIP_UNROLL
      for (int dw = 0; dw < kCover; ++dw) {
        const int32_t oh = oh0 + dh, ow = ow0 + dw;
        if (oh <= oh1 && ow <= ow1) {
          const int64_t o = ((static_cast<int64_t>(n) * OH + oh) * OW + ow) * C + c0;
          acc_t go[V], y[V], m[V], inv[V];
          load_vec<V>(a.grad_out + o, go);
          load_vec<V>(a.out + o, y);
          load_vec<V>(a.window_max + o, m);
          load_vec<V>(a.inv_weight_sum + o, inv);
LIP_UNROLL
          for (int v = 0; v < V; ++v) Step::grad_tap(li[v], xi[v], go[v], y[v], m[v], inv[v], dx[v], dl[v]);
        }
      }
    }
    store_vec<V>(a.grad_x + i, dx);
    store_vec<V>(a.grad_logit + i, dl);
  }
};

// Contiguous (NCHW) plans: blocks of block_dim_x columns x block_dim_y
// plane rows (128 threads); grid x over rows, y over columns. The host picks
// the width (8, 16 or 32) that the row's columns fill best: the deep
// LIP-ResNet layers have 7 output columns, and 32-wide blocks left 25 of 32
// threads idle there. The row comes from blockDim.y, not 128 / blockDim.x:
// that runtime division coincided with a 20% slower contiguous forward in
// the second H200 run. No other division but one by the plane height (and
// one by C when the logit is broadcast).
LIP_HOST_DEVICE int64_t plane_row(const ThreadIndex& t) { return t.block_x * t.block_dim_y + t.thread_y; }

LIP_HOST_DEVICE int32_t plane_col(const ThreadIndex& t) { return t.block_y * t.block_dim_x + t.thread_x; }

// The (n, c) plane of a plane index, for a logit shared across n or c.
LIP_HOST_DEVICE int64_t logit_plane_offset(int64_t plane, int64_t C, const LogitStrides& ls) {
  const int64_t n = plane / C;
  return n * ls.n + (plane - n * C) * ls.c;
}

template <int K, int S, int P, typename x_t, typename l_t, typename acc_t>
struct FastForwardPlanes {
  using Args = ForwardArgs<x_t, l_t, acc_t>;
  using Step = WindowStep<ScalarMath<acc_t>>;

  static LIP_HOST_DEVICE void run(const ThreadIndex& t, const Args& a) {
    const LipGeometry& g = a.g;
    const int64_t row = plane_row(t);  // plane * OH + oh
    const int32_t ow = plane_col(t);
    const int32_t H = static_cast<int32_t>(g.H), W = static_cast<int32_t>(g.W),
                  OH = static_cast<int32_t>(g.OH), OW = static_cast<int32_t>(g.OW);
    if (row >= g.N * g.C * OH || ow >= OW) return;
    const int64_t plane = row / OH;
    const int32_t oh = static_cast<int32_t>(row - plane * OH);
    const x_t* x_plane = a.x + plane * H * W;
    // a full logit (ls.c == H * W, ls.n == C * H * W) is indexed like x
    const l_t* l_plane =
        a.logit + (a.ls.c == static_cast<int64_t>(H) * W && a.ls.n == g.C * a.ls.c
                       ? plane * H * W
                       : logit_plane_offset(plane, g.C, a.ls));
    const int32_t h_start = oh * S - P, w_start = ow * S - P;

    acc_t lv[K][K];
    bool inside[K][K];
    acc_t m = -INFINITY;
LIP_UNROLL
    for (int kh = 0; kh < K; ++kh) {
LIP_UNROLL
      for (int kw = 0; kw < K; ++kw) {
        const int32_t h = h_start + kh, w = w_start + kw;
        inside[kh][kw] = h >= 0 && h < H && w >= 0 && w < W;
        if (inside[kh][kw]) {
          lv[kh][kw] = static_cast<acc_t>(l_plane[h * W + w]);
          Step::max_tap(m, lv[kh][kw]);
        } else {
          lv[kh][kw] = -INFINITY;  // never read; quiets the compiler
        }
      }
    }
    m = Step::reference_max(m);
    acc_t sum = 0, weighted = 0;
LIP_UNROLL
    for (int kh = 0; kh < K; ++kh) {
LIP_UNROLL
      for (int kw = 0; kw < K; ++kw) {
        if (inside[kh][kw]) {
          Step::add_tap(lv[kh][kw], static_cast<acc_t>(x_plane[(h_start + kh) * W + w_start + kw]), m,
                        sum, weighted);
        }
      }
    }
    acc_t y, inv;
    Step::finish(sum, weighted, y, inv);
    const int64_t o = row * OW + ow;
    a.out[o] = static_cast<x_t>(y);
    a.window_max[o] = m;
    a.inv_weight_sum[o] = inv;
  }
};

// Contiguous backward: each thread owns an S x S block of inputs (rows
// S * hb.., columns S * wb..), loads the block's covering outputs once
// (kBlockCover^2 of them: 2 x 2 at k3 s2) and then runs each input's taps
// from registers. At S = 2 that is 4 output loads per array for 4 inputs
// where one thread per input needed 9.
template <int K, int S, int P, typename x_t, typename l_t, typename acc_t>
struct FastBackwardPlanes {
  using Args = BackwardArgs<x_t, l_t, acc_t>;
  using Step = WindowStep<ScalarMath<acc_t>>;
  // outputs along one dimension that cover S consecutive inputs
  static constexpr int kBlockCover = (K + S - 2) / S + 1;

  // Input blocks of a plane along a dimension of `size` inputs.
  static LIP_HOST_DEVICE int64_t blocks(int64_t size) { return (size + S - 1) / S; }

  static LIP_HOST_DEVICE void run(const ThreadIndex& t, const Args& a) {
    const LipGeometry& g = a.g;
    const int32_t H = static_cast<int32_t>(g.H), W = static_cast<int32_t>(g.W),
                  OH = static_cast<int32_t>(g.OH), OW = static_cast<int32_t>(g.OW);
    const int32_t HB = static_cast<int32_t>(blocks(H)), WB = static_cast<int32_t>(blocks(W));
    const int64_t row = plane_row(t);  // plane * HB + hb
    const int32_t wb = plane_col(t);
    if (row >= g.N * g.C * HB || wb >= WB) return;
    const int64_t plane = row / HB;
    const int32_t h0 = static_cast<int32_t>(row - plane * HB) * S, w0 = wb * S;
    const int32_t h_last = h0 + S - 1 < H ? h0 + S - 1 : H - 1;
    const int32_t w_last = w0 + S - 1 < W ? w0 + S - 1 : W - 1;
    int32_t oh_first, oh_last, ow_first, ow_last, unused;
    fast_covering<K, S, P>(h0, OH, oh_first, unused);
    fast_covering<K, S, P>(h_last, OH, unused, oh_last);
    fast_covering<K, S, P>(w0, OW, ow_first, unused);
    fast_covering<K, S, P>(w_last, OW, unused, ow_last);

    acc_t go[kBlockCover][kBlockCover], y[kBlockCover][kBlockCover], m[kBlockCover][kBlockCover],
        inv[kBlockCover][kBlockCover];
    bool valid[kBlockCover][kBlockCover];
LIP_UNROLL
    for (int dh = 0; dh < kBlockCover; ++dh) {
LIP_UNROLL
      for (int dw = 0; dw < kBlockCover; ++dw) {
        const int32_t oh = oh_first + dh, ow = ow_first + dw;
        valid[dh][dw] = oh <= oh_last && ow <= ow_last;
        if (valid[dh][dw]) {
          const int64_t o = (plane * OH + oh) * OW + ow;
          go[dh][dw] = static_cast<acc_t>(a.grad_out[o]);
          y[dh][dw] = static_cast<acc_t>(a.out[o]);
          m[dh][dw] = a.window_max[o];
          inv[dh][dw] = a.inv_weight_sum[o];
        } else {
          go[dh][dw] = y[dh][dw] = m[dh][dw] = inv[dh][dw] = 0;  // never read; quiets the compiler
        }
      }
    }
    const l_t* l_plane =
        a.logit + (a.ls.c == static_cast<int64_t>(H) * W && a.ls.n == g.C * a.ls.c
                       ? plane * H * W
                       : logit_plane_offset(plane, g.C, a.ls));
    // window start of the first covering output, relative to the block
    const int32_t h_base = h0 - (oh_first * S - P), w_base = w0 - (ow_first * S - P);
LIP_UNROLL
    for (int sh = 0; sh < S; ++sh) {
LIP_UNROLL
      for (int sw = 0; sw < S; ++sw) {
        const int32_t h = h0 + sh, w = w0 + sw;
        if (h >= H || w >= W) continue;
        const int64_t i = (plane * H + h) * W + w;
        const acc_t l = static_cast<acc_t>(l_plane[h * W + w]);
        const acc_t xi = static_cast<acc_t>(a.x[i]);
        acc_t dx = 0, dl = 0;
LIP_UNROLL
        for (int dh = 0; dh < kBlockCover; ++dh) {
          const int32_t th = h_base + sh - dh * S;  // tap row of input h in output row dh's window
LIP_UNROLL
          for (int dw = 0; dw < kBlockCover; ++dw) {
            const int32_t tw = w_base + sw - dw * S;
            if (valid[dh][dw] && th >= 0 && th < K && tw >= 0 && tw < K) {
              Step::grad_tap(l, xi, go[dh][dw], y[dh][dw], m[dh][dw], inv[dh][dw], dx, dl);
            }
          }
        }
        a.grad_x[i] = static_cast<x_t>(dx);
        a.grad_logit[i] = static_cast<l_t>(dl);
      }
    }
  }
};

}  // namespace lip_cuda
