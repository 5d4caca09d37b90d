// The channels_last kernels: lanes are kLanes channels of one pixel,
// loaded straight from the tensors. Their unrolled gather of a pixel's
// covering outputs (grads_covered) also serves the blocks backward.
#pragma once

#include "lip_cpu_tile.h"

namespace lip_cuda {
namespace LIP_CPU_NS {
namespace {

template <typename x_t, typename l_t>
void forward_channels_last(const ForwardTensors& t, const CallGeometry& cg, bool stream) {
  const LipGeometry& g = cg.g;
  stream = stream && whole_lines({&t.out, &t.window_max, &t.inv_weight_sum}, g.C);
  const LogitStrides& ls = cg.ls;
  const auto [x_ptr, l_ptr, out_ptr, max_ptr, inv_ptr] = forward_pointers<x_t, l_t>(t);
  const int64_t strips = strip_count(g);
  // Lane blocks per task: as many as keep a strip's inputs and its weight
  // ring within about a fifth of a 1 MiB L2, with room for the next strip
  // fetched ahead (4 blocks of the float32 64x112x112 stem would hold about
  // 0.7 MiB; the 28x28 and 14x14 layers take all 4).
  const int64_t block_bytes =
      (strip_rows(g) * (sizeof(x_t) + sizeof(l_t)) + 2 * ring_rows(g) * sizeof(float)) * g.W * kLanes;
  const int64_t group_blocks =
      std::max<int64_t>(1, std::min<int64_t>(kMaxStripBlocks, kStripBudgetBytes / block_bytes));
  const int64_t group_channels = group_blocks * kLanes;
  const int64_t groups = (g.C + group_channels - 1) / group_channels;
  // tasks: (image, strip, group of lane blocks), the group fastest
  at::parallel_for(0, g.N * strips * groups, 1, [&](int64_t begin, int64_t end) {
    std::unique_ptr<float[]> scratch(new float[strip_scratch_floats(g, kMaxStripBlocks)]);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c0 = (task % groups) * group_channels;
      const int64_t s = (task / groups) % strips;
      const int64_t n = task / (groups * strips);
      const int64_t channels = std::min<int64_t>(group_channels, g.C - c0);
      const int64_t blocks = (channels + kLanes - 1) / kLanes;
      StripData<x_t, l_t, x_t> d;
      d.x = x_ptr + n * g.H * g.W * g.C + c0;
      d.logit = l_ptr + n * ls.n + (ls.c == 0 ? 0 : c0);
      d.x_row = g.W * g.C;
      d.x_pixel = g.C;
      d.l_row = g.W * ls.pixel;
      d.l_pixel = ls.pixel;
      d.logit_shared = ls.c == 0;
      d.blocks = blocks;
      d.last_count = channels - (blocks - 1) * kLanes;
      if (task + 1 < end) {
        // the next task's strip: the next group, or group 0 of the next strip
        const int64_t c_next = ((task + 1) % groups) * group_channels;
        const int64_t s_next = ((task + 1) / groups) % strips;
        const int64_t n_next = (task + 1) / (groups * strips);
        const Strip next = strip_at(g, s_next);
        d.x_next = x_ptr + ((n_next * g.H + next.h0) * g.W) * g.C + c_next;
        d.logit_next = l_ptr + n_next * ls.n + next.h0 * g.W * ls.pixel + (ls.c == 0 ? 0 : c_next);
        d.next_rows = next.h1 - next.h0;
      }
      const int64_t o = n * g.OH * g.OW * g.C + c0;
      d.out = out_ptr + o;
      d.reference = max_ptr + o;
      d.inv = inv_ptr + o;
      d.out_row = g.OW * g.C;
      d.out_pixel = g.C;
      if (stream) {
        forward_strip<true>(g, strip_at(g, s), d, scratch.get());
      } else {
        forward_strip(g, strip_at(g, s), d, scratch.get());
      }
    }
    if (stream) cpu_math::stream_fence();
  });
}

// Both gradients of NB neighbouring lane blocks of one input pixel over its
// NOH x NOW covering outputs, unrolled: the grad_tap order of gather_grads
// (bitwise equal), with the NB blocks' independent chains overlapping
// (interleaved kGradPack at a time; flattened, see PackMath). Stream: the
// gradients stream past the cache (stream_bits); a template argument, as a
// run-time flag put a branch before every store, and GCC then computed the
// bfloat16 blocks one after another between them instead of interleaved.
//
// `groups` such runs of NB blocks side by side (the channels of a
// channels_last pixel), each NB * kLanes elements on from the last: one call
// a pixel. With a call per group of 4 blocks (out of line, GCC's choice),
// the calls and the loop around them took 12-14% of the AVX2 backward's
// samples at 1024 channels; one call a pixel made the float32 channels_last
// backward 7-15% faster on Zen 1 (docs/kernels.md). fetch_x, fetch_l: where
// each group's x and logit lie for a pixel fetched ahead (element offsets;
// fetch_x 0: none).
template <bool Stream, int NOH, int NOW, int NB, typename x_t, typename l_t>
[[gnu::flatten]] inline void grads_unrolled(int64_t groups, int64_t fetch_x, int64_t fetch_l,
                                            const x_t* xi, const l_t* li, const x_t* go,
                                            const x_t* yo, const float* mo, const float* invo,
                                            int64_t o_row, int64_t o_col, x_t* gx, l_t* gl) {
  constexpr int64_t kStep = NB * kLanes;
  for (int64_t group = 0; group < groups; ++group, xi += kStep, li += kStep, go += kStep, yo += kStep,
               mo += kStep, invo += kStep, gx += kStep, gl += kStep) {
    if (fetch_x != 0) {
      prefetch_range(xi + fetch_x, kStep * int64_t(sizeof(x_t)));
      prefetch_range(li + fetch_l, kStep * int64_t(sizeof(l_t)));
    }
    // packs of P blocks, each step of a tap interleaved over the pack
    constexpr int P = NB < kGradPack ? NB : kGradPack;
    static_assert(NB % P == 0, "whole packs");
    using V = typename PackStep<P>::V;
    V xv[NB / P], lv[NB / P], dx[NB / P], dl[NB / P];
    LIP_UNROLL
    for (int q = 0; q < NB / P; ++q) {
      LIP_UNROLL
      for (int i = 0; i < P; ++i) {
        const int b = q * P + i;
        xv[q][i] = load_full(xi + b * kLanes);
        lv[q][i] = load_full(li + b * kLanes);
        dx[q][i] = splat(0.0f);
        dl[q][i] = splat(0.0f);
      }
    }
    // Where every covering output weighs its taps relative to the same
    // reference (all outputs of one tile-form strip, in every lane and block),
    // exp(l_i - m_o) is one exp for all of them: the same bits as one each.
    // Not for a lone block, whose interleaved exps below measured as fast;
    // AVX2 only (kShareTapExps).
    bool shared = false;
    if constexpr (kShareTapExps && NOH * NOW > 1 && NB > 1) {
      cpu_math::LaneInts same = cpu_math::LaneInts{} == 0;
      LIP_UNROLL
      for (int t = 1; t < NOH * NOW; ++t) {
        const int64_t off = (t / NOW) * o_row + (t % NOW) * o_col;
        LIP_UNROLL
        for (int b = 0; b < NB; ++b) same &= load(mo + off + b * kLanes) == load(mo + b * kLanes);
      }
      shared = cpu_math::all_set(same);
    }
    // every (covering output, pack) in grad_tap's order, its four values loaded
    const auto for_each_tap = [&](auto&& tap) {
      LIP_UNROLL
      for (int a = 0; a < NOH; ++a) {
        LIP_UNROLL
        for (int c = 0; c < NOW; ++c) {
          LIP_UNROLL
          for (int q = 0; q < NB / P; ++q) {
            V gv, yv, mv, iv;
            LIP_UNROLL
            for (int i = 0; i < P; ++i) {
              const int64_t off = a * o_row + c * o_col + (q * P + i) * kLanes;
              gv[i] = load_full(go + off);
              yv[i] = load_full(yo + off);
              mv[i] = load(mo + off);
              iv[i] = load(invo + off);
            }
            tap(q, gv, yv, mv, iv);
          }
        }
      }
    };
    if (shared) {
      V e[NB / P];
      LIP_UNROLL
      for (int q = 0; q < NB / P; ++q) {
        V mv;
        LIP_UNROLL
        for (int i = 0; i < P; ++i) mv[i] = load(mo + (q * P + i) * kLanes);
        e[q] = PackStep<P>::tap_weight(lv[q], mv);
      }
      for_each_tap([&](int q, const V& gv, const V& yv, const V&, const V& iv) {
        PackStep<P>::grad_weight_tap(e[q], xv[q], gv, yv, iv, dx[q], dl[q]);
      });
    } else if constexpr (P == 1 && kGradPack > 1 && NOH * NOW > 1) {
      // one lane block: its covering outputs' exps interleaved instead, all
      // of them first, then the taps in grad_tap's order (the same bits)
      constexpr int T = NOH * NOW;
      typename PackStep<T>::V logits, refs;
      LIP_UNROLL
      for (int t = 0; t < T; ++t) {
        logits[t] = lv[0][0];
        refs[t] = load(mo + (t / NOW) * o_row + (t % NOW) * o_col);
      }
      const auto e = PackStep<T>::tap_weight(logits, refs);
      LIP_UNROLL
      for (int t = 0; t < T; ++t) {
        const int64_t off = (t / NOW) * o_row + (t % NOW) * o_col;
        Step::grad_weight_tap(e[t], xv[0][0], load_full(go + off), load_full(yo + off),
                              load(invo + off), dx[0][0], dl[0][0]);
      }
    } else {
      for_each_tap([&](int q, const V& gv, const V& yv, const V& mv, const V& iv) {
        PackStep<P>::grad_tap(lv[q], xv[q], gv, yv, mv, iv, dx[q], dl[q]);
      });
    }
    LIP_UNROLL
    for (int q = 0; q < NB / P; ++q) {
      LIP_UNROLL
      for (int i = 0; i < P; ++i) {
        const int b = q * P + i;
        // (streamed only where every pixel's channels are whole cache lines:
        // the vectors are aligned)
        store_full(gx + b * kLanes, dx[q][i], Stream, /*aligned=*/true);
        store_full(gl + b * kLanes, dl[q][i], Stream, /*aligned=*/true);
      }
    }
  }
}

// grads_unrolled for an input covered by noh x now outputs, each 1 or 2.
// Inlined by force: called once per pixel, and out of line (GCC's choice
// for its two callers) it made both backward kernels 3-12% slower.
template <int NB, bool Stream = false, typename x_t, typename l_t>
[[gnu::always_inline]] inline void grads_covered(int64_t noh, int64_t now, const x_t* xi,
                                                 const l_t* li, const x_t* go, const x_t* yo,
                                                 const float* mo, const float* invo, int64_t o_row,
                                                 int64_t o_col, x_t* gx, l_t* gl, int64_t groups = 1,
                                                 int64_t fetch_x = 0, int64_t fetch_l = 0) {
#define LIP_GRADS_UNROLLED(a, c) \
  grads_unrolled<Stream, a, c, NB>(groups, fetch_x, fetch_l, xi, li, go, yo, mo, invo, o_row, o_col, gx, gl)
  switch ((noh - 1) * 2 + (now - 1)) {
    case 0: LIP_GRADS_UNROLLED(1, 1); break;
    case 1: LIP_GRADS_UNROLLED(1, 2); break;
    case 2: LIP_GRADS_UNROLLED(2, 1); break;
    default: LIP_GRADS_UNROLLED(2, 2); break;
  }
#undef LIP_GRADS_UNROLLED
}

// Lane blocks per unrolled backward step: 4 independent chains (measured
// 5-10% faster than 2 on AVX-512 for C >= 64; the rest take one at a time).
constexpr int kBlocks = 4;
// How many pixels (of pixel_bytes) ahead the channels_last backward fetches
// x and the logit: at least 4 and 2 KiB. The hardware prefetchers alone
// left it waiting on memory; measured on the AVX-512 VM, float32, 2
// threads, inputs out of cache: 1.3-1.45x faster (stem 0.72 -> 0.52 ms,
// s3b 0.45 -> 0.31 ms, s4b 0.20 -> 0.15 ms), 8 pixels best at 64 channels,
// 4 at 512 and 1024; fetching the covering outputs' statistics or the
// gradients' lines too gained nothing.
inline int64_t backward_prefetch_pixels(int64_t pixel_bytes) {
  pixel_bytes = std::max<int64_t>(1, pixel_bytes);
  return std::max<int64_t>(4, (2048 + pixel_bytes - 1) / pixel_bytes);
}

template <typename x_t, typename l_t>
void backward_channels_last(const BackwardTensors& t, const CallGeometry& cg, bool stream) {
  const LipGeometry& g = cg.g;
  stream = stream && whole_lines({&t.grad_x, &t.grad_logit}, g.C);
  const LogitStrides& ls = cg.ls;
  const auto [g_ptr, x_ptr, l_ptr, y_ptr, max_ptr, inv_ptr, gx_ptr, gl_ptr] =
      backward_pointers<x_t, l_t>(t);
  const int64_t ahead = backward_prefetch_pixels(g.C * int64_t(sizeof(x_t)));
  // rows [begin, end), their gradients streamed (Stream) or not
  const auto rows = [&](auto streamed, int64_t begin, int64_t end) {
    constexpr bool Stream = decltype(streamed)::value;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / g.H;
      const int64_t h = row % g.H;
      int64_t oh0, oh1;
      covering_outputs<int64_t>(h, g.kH, g.sH, g.pH, g.OH, oh0, oh1);
      for (int64_t w = 0; w < g.W; ++w) {
        int64_t ow0, ow1;
        covering_outputs<int64_t>(w, g.kW, g.sW, g.pW, g.OW, ow0, ow1);
        const int64_t noh = oh1 - oh0 + 1, now = ow1 - ow0 + 1;
        const bool unrolled = noh >= 1 && noh <= 2 && now >= 1 && now <= 2 && ls.c != 0;
        const int64_t pixel = (n * g.H + h) * g.W + w;
        int64_t c0 = 0;
        if (unrolled) {
          // the full lane blocks: groups of kBlocks in one call, then one at
          // a time
          const x_t* xi = x_ptr + pixel * g.C;
          const l_t* li = l_ptr + n * ls.n + (h * g.W + w) * ls.pixel;
          // by pixel index, so that the next row's first pixels are fetched
          // while this row ends: stopping at the row's end left 4 of every
          // 14 pixels unfetched (float32, 2 threads, out of cache: 14x14
          // layers 5-10% faster; in cache 3% slower)
          const bool fetch = (h * g.W + w) + ahead < g.H * g.W;
          const int64_t fetch_x = fetch ? ahead * g.C : 0, fetch_l = ahead * ls.pixel;
          const int64_t o = ((n * g.OH + oh0) * g.OW + ow0) * g.C;
          const int64_t o_row = g.OW * g.C;
          const int64_t o_col = g.C;
          const int64_t groups = g.C / (kBlocks * kLanes);
          if (groups > 0) {
            grads_covered<kBlocks, Stream>(noh, now, xi, li, g_ptr + o, y_ptr + o, max_ptr + o, inv_ptr + o,
                                           o_row, o_col, gx_ptr + pixel * g.C, gl_ptr + pixel * g.C, groups,
                                           fetch_x, fetch_l);
            c0 = groups * kBlocks * kLanes;
          }
          for (; c0 + kLanes <= g.C; c0 += kLanes) {
            grads_covered<1, Stream>(noh, now, xi + c0, li + c0, g_ptr + o + c0, y_ptr + o + c0,
                                     max_ptr + o + c0, inv_ptr + o + c0, o_row, o_col,
                                     gx_ptr + pixel * g.C + c0, gl_ptr + pixel * g.C + c0, 1, fetch_x,
                                     fetch_l);
          }
        }
        for (; c0 < g.C; c0 += kLanes) {
          const int64_t count = std::min<int64_t>(kLanes, g.C - c0);
          const int64_t i = pixel * g.C + c0;
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
          store_lanes(gx_ptr + i, dx, count, Stream);
          store_lanes(gl_ptr + i, dl, count, Stream);
        }
      }
    }
  };
  at::parallel_for(0, g.N * g.H, 1, [&](int64_t begin, int64_t end) {
    if (stream) {
      rows(std::true_type(), begin, end);
      cpu_math::stream_fence();
    } else {
      rows(std::false_type(), begin, end);
    }
  });
}

}  // namespace
}  // namespace LIP_CPU_NS
}  // namespace lip_cuda
