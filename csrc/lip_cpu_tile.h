// The tile form over strips of output rows, which the forward kernels of
// every layout share: one max logit per channel over a strip, each
// input's weight once per strip, window sums of those weights, and the
// fallback to a window's own max (docs/kernels.md, "One exp per input").
#pragma once

#include "lip_cpu_common.h"

namespace lip_cuda {
namespace LIP_CPU_NS {
namespace {

// Output rows per strip. The outputs of a strip weigh their taps relative to
// one max logit per channel, over the input rows their windows hold
// (WindowStep's tile form), so an input row's exps are computed once per
// strip holding it: ((kStripRows - 1) sH + kH) / (kStripRows sH) exps per
// input, 1.125 at k3 s2, where window maxima need 2.25. A constant (not the
// thread count's or the layout's choice), so that every layout takes the
// same references and gives bitwise the same results.
constexpr int64_t kStripRows = 4;

struct Strip {
  int64_t oh0, oh1;  // outputs [oh0, oh1)
  int64_t h0, h1;    // the input rows of their windows, [h0, h1)
};

// Whether windows overlap, so that the tile form saves exps. Where they do
// not (kernel <= stride: each input in at most one window) every output
// takes its own window max, which also keeps a 1x1 window's y exactly x.
inline bool tile_form_pays(const LipGeometry& g) { return g.kH > g.sH || g.kW > g.sW; }

inline int64_t strip_count(const LipGeometry& g) { return (g.OH + kStripRows - 1) / kStripRows; }

inline Strip strip_at(const LipGeometry& g, int64_t s) {
  Strip st;
  st.oh0 = s * kStripRows;
  st.oh1 = std::min(g.OH, st.oh0 + kStripRows);
  int64_t unused;
  window_range<int64_t>(st.oh0, g.kH, g.sH, g.pH, g.H, st.h0, unused);
  window_range<int64_t>(st.oh1 - 1, g.kH, g.sH, g.pH, g.H, unused, st.h1);
  return st;
}

// Lane blocks (neighbouring channel groups of kLanes) forward_strip takes
// at once: their pixels are consecutive memory in channels_last, which the
// hardware prefetchers follow where a lone 64-byte block per pixel is not.
constexpr int kMaxStripBlocks = 4;

// Bytes a channels_last forward task may keep in flight (its strip's inputs
// and weight ring; see forward_channels_last).
constexpr int64_t kStripBudgetBytes = 192 * 1024;

// Input rows of one strip, at most.
inline int64_t strip_rows(const LipGeometry& g) {
  return std::min(g.H, (kStripRows - 1) * g.sH + g.kH);
}

// Input rows forward_strip keeps weights for: those of one window.
inline int64_t ring_rows(const LipGeometry& g) { return std::min(g.kH, g.H); }

// Scratch floats of forward_strip for `blocks` lane blocks.
inline int64_t strip_scratch_floats(const LipGeometry& g, int64_t blocks) {
  return 2 * ring_rows(g) * g.W * blocks * kLanes;
}

// Weight sums of U windows of kh x kw taps, from the weights e and e x of
// their rows (row a at e_rows[a] + offset, ex_rows[a] + offset), pixels
// `pixel` floats apart and the windows' first taps `step` pixels apart:
// row-major tap order, as window_softmax adds them; the U independent chains
// hide the add latency.
template <int U>
inline void tile_sums(const float* const* e_rows, const float* const* ex_rows, int64_t offset,
                      int64_t kh, int64_t kw, int64_t pixel, int64_t step, Lanes* sum,
                      Lanes* weighted) {
  LIP_UNROLL
  for (int u = 0; u < U; ++u) {
    sum[u] = splat(0.0f);
    weighted[u] = splat(0.0f);
  }
  for (int64_t a = 0; a < kh; ++a) {
    const float* e = e_rows[a] + offset;
    const float* ex = ex_rows[a] + offset;
    for (int64_t b = 0; b < kw; ++b) {
      LIP_UNROLL
      for (int u = 0; u < U; ++u) {
        const int64_t at = (b + u * step) * pixel;
        Step::add_weight(load(e + at), load(ex + at), sum[u], weighted[u]);
      }
    }
  }
}

// Lane vectors whose exps the kernels compute at once, interleaved
// (PackStep): pixels of a row in forward_strip's weight pass, lane blocks
// of a pixel in the channels_last and blocks backward. On AVX2 (16
// registers; on Zen 1 each 256-bit operation is two) one exp after another
// left the core waiting on each exp's chain of dependent FMAs; four at a
// time took the float32 channels_last forward of 2 x 512 x 14 x 14 from
// 0.72-0.76 to 0.61-0.69 ms and the backward from 1.06-1.10 to 0.80-0.81 ms
// (one thread; docs/kernels.md, "An AVX2 CPU"). The AVX-512 build keeps
// one vector at a time: packs of four measured slower on a Zen 4 VM (the
// channels_last forward at 2 x 1024 x 14 x 14 0.150 -> 0.163-0.168 ms),
// whose scheduler overlaps the chains anyway. The baseline build was not
// measured.
constexpr int kWeightPack = LIP_CPU_ISA == 1 ? 4 : 1;
constexpr int kGradPack = LIP_CPU_ISA == 1 ? 4 : 1;
// Whether grads_unrolled computes one exp for covering outputs that share a
// reference. On the Zen 1 AVX2 VM, where the backward is bound by its
// arithmetic, it made it 8-17% faster (docs/kernels.md); on the AVX-512 VM
// (Zen 5), bound by memory, the same idea measured no faster at most layers
// and slower at the stem, so the other builds keep one exp per output.
constexpr bool kShareTapExps = LIP_CPU_ISA == 1;

// How far ahead forward_strip's first pass fetches logits.
constexpr int64_t kPrefetchPixels = 8;

// Windows per tile_sums call where whole windows sit side by side.
constexpr int kWindowsAtOnce = 4;

// Where forward_strip reads and writes lane block b (< blocks <=
// kMaxStripBlocks) of a strip: input pixel (h, w) at element offset
// (h - h_origin) row + w pixel + b kLanes of x and the logit (whose lanes
// hold one value when it is shared across channels), output (oh, ow) at
// (oh - oh_origin) out_row + ow out_pixel + b kLanes of out, reference and
// inv (the origins: the first rows a blocks task holds). The last block has
// last_count lanes in use. Held by value, so that the strides stay in
// registers in the loops.
template <typename x_t, typename l_t, typename o_t>
struct StripData {
  const x_t* x;
  const l_t* logit;
  int64_t x_row, x_pixel, l_row, l_pixel;
  bool logit_shared;
  int64_t blocks, last_count;
  o_t* out;
  float* reference;
  float* inv;
  int64_t out_row, out_pixel;
  int64_t h_origin = 0, oh_origin = 0;
  // The next strip this thread takes (same strides; its first input row at
  // x_next / logit_next, next_rows rows), fetched into the cache while this
  // one computes; next_rows 0 if none.
  const x_t* x_next = nullptr;
  const l_t* logit_next = nullptr;
  int64_t next_rows = 0;
  // The blocks forward's queue of its next task's planes, stepped
  // queue_lines lines after each output (nullptr: none).
  PrefetchQueue* queue = nullptr;
  int queue_lines = 0;

  int64_t count(int64_t b) const { return b + 1 < blocks ? kLanes : last_count; }
  const x_t* x_row_at(int64_t h) const { return x + (h - h_origin) * x_row; }
  const l_t* logit_row_at(int64_t h) const { return logit + (h - h_origin) * l_row; }
  Lanes x_at(int64_t h, int64_t w, int64_t b) const {
    return load_lanes(x_row_at(h) + w * x_pixel + b * kLanes, count(b));
  }
  Lanes logit_at(int64_t h, int64_t w, int64_t b) const {
    const l_t* p = logit_row_at(h) + w * l_pixel;
    return logit_shared ? splat(static_cast<float>(*p)) : load_lanes(p + b * kLanes, count(b));
  }
  // Stream: the outputs stream past the cache (stream_bits); a template
  // argument, as a run-time flag here cost the float32 channels_last
  // forward up to 20% (512x28x28). Only where every output pixel's lanes
  // are whole cache lines (channels_last's whole_lines), so its vectors
  // are aligned and stream without an alignment check.
  template <bool Stream>
  void emit(int64_t oh, int64_t ow, int64_t b, Lanes y, Lanes m, Lanes inverse) const {
    const int64_t o = (oh - oh_origin) * out_row + ow * out_pixel + b * kLanes;
    store_lanes(out + o, y, count(b), Stream, Stream);
    store_lanes(reference + o, m, count(b), Stream, Stream);
    store_lanes(inv + o, inverse, count(b), Stream, Stream);
  }
};

// The running tile max of NB full lane blocks over input row h of a strip,
// in registers: two chains (even and odd pixels), so that the loop runs at
// the loads' pace, not at MAXPS's latency (with a runtime block count the
// maxima lived on the stack, and 37% of the float32 stem's forward waited
// on that store-to-load chain). max is exact, so the split changes no
// result (a NaN logit never becomes a max, whatever the order).
template <int NB, typename x_t, typename l_t, typename o_t>
inline void strip_row_max(const LipGeometry& g, const StripData<x_t, l_t, o_t>& d, int64_t h,
                          Lanes* tile_max) {
  const l_t* lp = d.logit_row_at(h);
  const x_t* xp = d.x_row_at(h);
  Lanes m0[NB], m1[NB];
  LIP_UNROLL
  for (int b = 0; b < NB; ++b) {
    m0[b] = tile_max[b];
    m1[b] = splat(-std::numeric_limits<float>::infinity());
  }
  // Pixels are C elements apart, a stride the hardware prefetchers follow
  // late: fetch the logits ahead, and x for the weight pass that follows
  // (measured on the AVX-512 VM with inputs out of cache: forward 1.3-1.45x
  // faster on three LIP-ResNet layers).
  const auto visit = [&](int64_t w, Lanes* m) {
    const l_t* l = lp + w * d.l_pixel;
    const x_t* x = xp + w * d.x_pixel;
    LIP_UNROLL
    for (int b = 0; b < NB; ++b) {
      __builtin_prefetch(l + kPrefetchPixels * d.l_pixel + b * kLanes);
      __builtin_prefetch(x + b * kLanes);
    }
    LIP_UNROLL
    for (int b = 0; b < NB; ++b) Step::max_tap(m[b], load_full(l + b * kLanes));
  };
  int64_t w = 0;
  for (; w + 2 <= g.W; w += 2) {
    visit(w, m0);
    visit(w + 1, m1);
  }
  if (w < g.W) visit(w, m0);
  LIP_UNROLL
  for (int b = 0; b < NB; ++b) {
    Step::max_tap(m0[b], m1[b]);
    tile_max[b] = m0[b];
  }
}

// forward_strip's bookkeeping of its weight ring, one element per window
// row: on the stack up to 8 rows. The blocks kernels call forward_strip
// once per strip of 16 channels, and three heap vectors a call cost their
// forward 5-7% (one thread, in cache, 256x28x28 and 512x14x14).
// (c10::SmallVector does the same, but GCC 12 warns that its inline
// storage "may be used uninitialized".)
template <typename T>
class RingArray {
 public:
  RingArray(int64_t n, T value) {
    if (n > kOnStack) {
      heap_.assign(n, value);
      data_ = heap_.data();
    } else {
      std::fill(stack_, stack_ + n, value);
    }
  }
  RingArray(const RingArray&) = delete;
  RingArray& operator=(const RingArray&) = delete;
  T& operator[](int64_t i) { return data_[i]; }
  T* data() { return data_; }

 private:
  static constexpr int64_t kOnStack = 8;
  T stack_[kOnStack];
  std::vector<T> heap_;
  T* data_ = stack_;
};

// One strip in the tile form: outputs [st.oh0, st.oh1) x [0, OW) of the
// lane blocks of d. scratch holds strip_scratch_floats(g, d.blocks) floats:
// a ring of the weights of the last window rows, each input row's computed
// once per strip. Flattened, so that the weight pass's PackStep calls are
// all inlined (see PackMath).
template <bool Stream = false, typename x_t, typename l_t, typename o_t>
[[gnu::flatten]] void forward_strip(const LipGeometry& g, const Strip& st,
                                    const StripData<x_t, l_t, o_t> d, float* scratch) {
  const int64_t blocks = d.blocks;
  const bool full = d.last_count == kLanes && !d.logit_shared;
  // Without the tile form every window sum below is 0 and every output
  // takes the window-max path.
  const bool tile = tile_form_pays(g);
  Lanes tile_max[kMaxStripBlocks];
  for (int64_t b = 0; b < blocks; ++b) tile_max[b] = splat(-std::numeric_limits<float>::infinity());
  if (tile) {
    for (int64_t h = st.h0; h < st.h1; ++h) {
      if (full) {
        switch (blocks) {
          case 1: strip_row_max<1>(g, d, h, tile_max); break;
          case 2: strip_row_max<2>(g, d, h, tile_max); break;
          case 3: strip_row_max<3>(g, d, h, tile_max); break;
          default: strip_row_max<kMaxStripBlocks>(g, d, h, tile_max); break;
        }
      } else {
        for (int64_t w = 0; w < g.W; ++w) {
          for (int64_t b = 0; b < blocks; ++b) Step::max_tap(tile_max[b], d.logit_at(h, w, b));
        }
      }
    }
  }
  for (int64_t b = 0; b < blocks; ++b) tile_max[b] = Step::reference_max(tile_max[b]);
  const int64_t pixel = blocks * kLanes;  // floats per pixel in the ring
  const int64_t row = g.W * pixel;
  const int64_t ring = ring_rows(g);
  float* const e_ring = scratch;
  float* const ex_ring = scratch + ring * row;
  RingArray<int64_t> ring_row(ring, -1);  // the input row each slot holds
  RingArray<const float*> e_rows(ring, nullptr), ex_rows(ring, nullptr);  // the current window's rows
  // outputs [ow_lo, ow_hi) have unclipped windows along W
  const int64_t ow_lo = std::min(g.OW, (g.pW + g.sW - 1) / g.sW);
  const int64_t ow_hi = std::max(ow_lo, std::min(g.OW, floor_div(g.W + g.pW - g.kW, g.sW) + 1));
  for (int64_t oh = st.oh0; oh < st.oh1; ++oh) {
    int64_t h0, h1;
    window_range<int64_t>(oh, g.kH, g.sH, g.pH, g.H, h0, h1);
    for (int64_t h = h0; h < h1; ++h) {
      const int64_t slot = h % ring;
      float* e = e_ring + slot * row;
      float* ex = ex_ring + slot * row;
      e_rows[h - h0] = e;
      ex_rows[h - h0] = ex;
      if (ring_row[slot] == h || !tile) continue;
      ring_row[slot] = h;
      if (full) {
        const x_t* xp = d.x_row_at(h);
        const l_t* lp = d.logit_row_at(h);
        // the next strip's row, into L2 (a strip is tens of KiB): its
        // first pass then overlaps no memory latency with compute
        const int64_t next_row = h - st.h0 < d.next_rows ? h - st.h0 : -1;
        const x_t* xn = d.x_next + (next_row < 0 ? 0 : next_row * d.x_row);
        const l_t* ln = d.logit_next + (next_row < 0 ? 0 : next_row * d.l_row);
        // kWeightPack pixels at a time, their exps interleaved (PackMath)
        const auto weights = [&](auto pixels, int64_t w) {
          constexpr int P = decltype(pixels)::value;
          if (next_row >= 0) {
            LIP_UNROLL
            for (int i = 0; i < P; ++i) {
              for (int64_t b = 0; b < blocks; ++b) {
                __builtin_prefetch(xn + (w + i) * d.x_pixel + b * kLanes, 0, 2);
                __builtin_prefetch(ln + (w + i) * d.l_pixel + b * kLanes, 0, 2);
              }
            }
          }
          for (int64_t b = 0; b < blocks; ++b) {
            typename PackStep<P>::V l, x, m, ev, exv;
            LIP_UNROLL
            for (int i = 0; i < P; ++i) {
              l[i] = load_full(lp + (w + i) * d.l_pixel + b * kLanes);
              x[i] = load_full(xp + (w + i) * d.x_pixel + b * kLanes);
              m[i] = tile_max[b];
            }
            PackStep<P>::tile_weight(l, x, m, ev, exv);
            LIP_UNROLL
            for (int i = 0; i < P; ++i) {
              store(e + (w + i) * pixel + b * kLanes, ev[i]);
              store(ex + (w + i) * pixel + b * kLanes, exv[i]);
            }
          }
        };
        int64_t w = 0;
        for (; w + kWeightPack <= g.W; w += kWeightPack) {
          weights(std::integral_constant<int, kWeightPack>(), w);
        }
        if (kWeightPack > 2 && w + 2 <= g.W) {
          weights(std::integral_constant<int, 2>(), w);
          w += 2;
        }
        for (; w < g.W; ++w) weights(std::integral_constant<int, 1>(), w);
      } else {
        for (int64_t w = 0; w < g.W; ++w) {
          for (int64_t b = 0; b < blocks; ++b, e += kLanes, ex += kLanes) {
            Lanes ev, exv;
            Step::tile_weight(d.logit_at(h, w, b), d.x_at(h, w, b), tile_max[b], ev, exv);
            store(e, ev);
            store(ex, exv);
          }
        }
      }
    }
    for (int64_t b = 0; b < blocks; ++b) {
      // Lanes past the channels load x = 0 and logit 0 (or a shared
      // logit's value): no key of theirs changes a stored lane (a window-max
      // result is taken lane by lane, and they are not stored); they ask for
      // the window max only with a shared logit whose window sum is tiny.
      // inlined by force: with the fallback key GCC kept it out of line in
      // the baseline and AVX2 builds (the AVX-512 ones inline it anyway)
      const auto finish = [&](int64_t ow, int64_t w0, int64_t w1, Lanes sum,
                              Lanes weighted) __attribute__((always_inline)) {
        Lanes y, inv, reference = tile_max[b];
        Step::finish(sum, weighted, y, inv);
        const Lanes key = Step::fallback_key(sum, weighted);
        if (Step::needs_window_max(key)) {
          Lanes y_w, m_w, inv_w;
          window_softmax(
              h0, h1, w0, w1, [&](int64_t h, int64_t w) { return d.logit_at(h, w, b); },
              [&](int64_t h, int64_t w) { return d.x_at(h, w, b); }, y_w, m_w, inv_w);
          Step::use_window_max(key, y_w, m_w, inv_w, y, reference, inv);
        }
        d.template emit<Stream>(oh, ow, b, y, reference, inv);
        if (d.queue != nullptr) d.queue->step(d.queue_lines);
      };
      for (int64_t ow = 0; ow < g.OW;) {
        int64_t w0, w1;
        window_range<int64_t>(ow, g.kW, g.sW, g.pW, g.W, w0, w1);
        const int64_t offset = w0 * pixel + b * kLanes;
        if (!tile) {
          finish(ow, w0, w1, splat(0.0f), splat(0.0f));
          ++ow;
        } else if (ow >= ow_lo && ow + kWindowsAtOnce <= ow_hi) {
          Lanes sum[kWindowsAtOnce], weighted[kWindowsAtOnce];
          tile_sums<kWindowsAtOnce>(e_rows.data(), ex_rows.data(), offset, h1 - h0, g.kW, pixel,
                                    g.sW, sum, weighted);
          LIP_UNROLL
          for (int u = 0; u < kWindowsAtOnce; ++u) {
            finish(ow + u, w0 + u * g.sW, w1 + u * g.sW, sum[u], weighted[u]);
          }
          ow += kWindowsAtOnce;
        } else {
          Lanes sum, weighted;
          tile_sums<1>(e_rows.data(), ex_rows.data(), offset, h1 - h0, w1 - w0, pixel, g.sW, &sum,
                       &weighted);
          finish(ow, w0, w1, sum, weighted);
          ++ow;
        }
      }
    }
  }
}

}  // namespace
}  // namespace LIP_CPU_NS
}  // namespace lip_cuda
