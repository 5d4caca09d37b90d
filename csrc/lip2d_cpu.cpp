// CPU kernels.
//
// float32, float16 and bfloat16 run in float lanes (lip_cpu_math.h), all
// window math through lip_window.h's WindowStep (shared with the CUDA
// kernels). Forward, where windows overlap, takes WindowStep's tile form:
// one max per channel over a strip of kStripRows output rows, each input's
// exp(l - max) once per strip, window sums of those, and a window's own max
// where the strip's is too far above it; elsewhere each window's own max.
// Backward is a gather over the outputs covering each input, each relative
// to the reference forward saved for it (docs/kernels.md).
// - channels_last: channels are contiguous, so lanes are kLanes channels of
//   one pixel, loaded straight from the tensors; parallel over (image,
//   strip, group of lane blocks) forward, input rows backward.
// - contiguous NCHW, "rows": lanes are kLanes outputs along one row of one
//   plane (forward) or kLanes inputs of one stride phase of a plane, laid
//   out flat so that they run across its rows (backward). A stride-sW row
//   is split into sW phases (the columns congruent to r mod sW, converted
//   to float), so that every window tap becomes a plain vector load at a
//   fixed offset; the scratch is a few rows per task whatever the plane
//   size or C. Parallel over (plane, strip of rows).
// - contiguous NCHW, "blocks": for planes with many channels, lanes are
//   kLanes channels: a group of planes (one lane block or more) is
//   transposed into a lane-minor float buffer [rows][W][channel], computed
//   there as channels_last is, and transposed back; whole planes where they
//   fit in a few hundred KiB, else bands of rows, so the scratch is bounded
//   whatever the plane size.
// - contiguous NCHW, "gather" (backward only, planes 56 to 512 wide that
//   blocks does not take): lanes are kLanes inputs of a row as they lie in
//   memory; each output row is spread under the input columns by lane
//   permutes, and covering outputs that share a reference share one exp.
//
// x and the logit may differ in dtype (float32 logits with float16/bfloat16
// x); a logit shared across channels (broadcast) fills all lanes with one
// value.
//
// Instruction sets: this file is compiled once per ISA (LIP_CPU_ISA: 0 the
// baseline, 1 AVX2, 2 AVX-512; lip2d_cpu_avx2.cpp and lip2d_cpu_avx512.cpp
// include it) and lip2d_{forward,backward}_cpu pick one at run time from the
// CPU's capability as torch reports it, lowered by LIP_CUDA_CPU_ISA. The ISA
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
#include <ATen/Version.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <fstream>
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

#include "lip_cpu_lanes_io.h"
#include "lip_cpu_math.h"

namespace lip_cuda {
namespace LIP_CPU_NS {
namespace {

using cpu_math::kLanes;
using cpu_math::LaneInts;
using cpu_math::Lanes;
using cpu_math::load_full;
using cpu_math::store_full;
using cpu_math::load;
using cpu_math::load_lanes;
using cpu_math::splat;
using cpu_math::store;
using cpu_math::store_lanes;
using Step = WindowStep<cpu_math::LaneMath>;
// Step on P lane vectors at once, their chains interleaved: the same bits.
template <int P>
using PackStep = WindowStep<cpu_math::PackMath<P>>;
using ScalarStep = WindowStep<ScalarMath<float>>;

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

inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// The typed data pointers of a backward call: grad_out, x, logit, out,
// window_max, inv_weight_sum, grad_x, grad_logit.
template <typename x_t, typename l_t>
std::tuple<const x_t*, const x_t*, const l_t*, const x_t*, const float*, const float*, x_t*, l_t*>
backward_pointers(const BackwardTensors& t) {
  return {t.grad_out.const_data_ptr<x_t>(), t.x.const_data_ptr<x_t>(), t.logit.const_data_ptr<l_t>(),
          t.out.const_data_ptr<x_t>(), t.window_max.const_data_ptr<float>(),
          t.inv_weight_sum.const_data_ptr<float>(), t.grad_x.mutable_data_ptr<x_t>(),
          t.grad_logit.mutable_data_ptr<l_t>()};
}

// ---- the tile form over strips of output rows (every layout) --------------

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
// (one thread; docs/kernels.md, "An AVX2 CPU"). The AVX-512 and baseline
// builds keep one vector at a time: no machine here could measure them.
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
  // forward up to 20% (512x28x28).
  template <bool Stream>
  void emit(int64_t oh, int64_t ow, int64_t b, Lanes y, Lanes m, Lanes inverse) const {
    const int64_t o = (oh - oh_origin) * out_row + ow * out_pixel + b * kLanes;
    store_lanes(out + o, y, count(b), Stream);
    store_lanes(reference + o, m, count(b), Stream);
    store_lanes(inv + o, inverse, count(b), Stream);
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

// ---- channels_last: lanes straight from the tensors ------------------------

// Whether streaming stores pay for these outputs, written in whole vectors
// from multiples of `unit` elements: only where every such vector covers
// whole cache lines. A streamed line next to plainly stored ones measured
// slower than no streaming at all (1024x14x14 blocks backward at batch
// 16, whose 784-byte planes are not line-aligned: 1.78 -> 1.99 ms).
bool whole_lines(std::initializer_list<const at::Tensor*> outputs, int64_t unit) {
  for (const at::Tensor* t : outputs) {
    if (reinterpret_cast<uintptr_t>(t->const_data_ptr()) % 64 != 0 ||
        unit * static_cast<int64_t>(t->element_size()) % 64 != 0) {
      return false;
    }
  }
  return true;
}

template <typename x_t, typename l_t>
void forward_channels_last(const ForwardTensors& t, const CallGeometry& cg, bool stream) {
  const LipGeometry& g = cg.g;
  stream = stream && whole_lines({&t.out, &t.window_max, &t.inv_weight_sum}, g.C);
  const LogitStrides& ls = cg.ls;
  const x_t* x_ptr = t.x.const_data_ptr<x_t>();
  const l_t* l_ptr = t.logit.const_data_ptr<l_t>();
  x_t* out_ptr = t.out.mutable_data_ptr<x_t>();
  float* max_ptr = t.window_max.mutable_data_ptr<float>();
  float* inv_ptr = t.inv_weight_sum.mutable_data_ptr<float>();
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
// (interleaved kGradPack at a time; flattened, see PackMath).
template <int NOH, int NOW, int NB, typename x_t, typename l_t>
[[gnu::flatten]] inline void grads_unrolled(const x_t* xi, const l_t* li, const x_t* go,
                                            const x_t* yo, const float* mo, const float* invo,
                                            int64_t o_row, int64_t o_col, x_t* gx, l_t* gl,
                                            bool stream) {
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
      store_full(gx + b * kLanes, dx[q][i], stream);
      store_full(gl + b * kLanes, dl[q][i], stream);
    }
  }
}

// grads_unrolled for an input covered by noh x now outputs, each 1 or 2.
// Inlined by force: called once per pixel, and out of line (GCC's choice
// for its two callers) it made both backward kernels 3-12% slower.
template <int NB, typename x_t, typename l_t>
[[gnu::always_inline]] inline void grads_covered(int64_t noh, int64_t now, const x_t* xi,
                                                 const l_t* li, const x_t* go, const x_t* yo,
                                                 const float* mo, const float* invo, int64_t o_row,
                                                 int64_t o_col, x_t* gx, l_t* gl, bool stream) {
  switch ((noh - 1) * 2 + (now - 1)) {
    case 0: grads_unrolled<1, 1, NB>(xi, li, go, yo, mo, invo, o_row, o_col, gx, gl, stream); break;
    case 1: grads_unrolled<1, 2, NB>(xi, li, go, yo, mo, invo, o_row, o_col, gx, gl, stream); break;
    case 2: grads_unrolled<2, 1, NB>(xi, li, go, yo, mo, invo, o_row, o_col, gx, gl, stream); break;
    default: grads_unrolled<2, 2, NB>(xi, li, go, yo, mo, invo, o_row, o_col, gx, gl, stream); break;
  }
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

// Fetches the cache lines of [p, p + bytes) into the cache.
inline void prefetch_range(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t byte = 0; byte < bytes; byte += 64) __builtin_prefetch(c + byte);
}

// The same for lines about to be written.
inline void prefetch_range_for_write(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t byte = 0; byte < bytes; byte += 64) __builtin_prefetch(c + byte, 1);
}

// Element `ahead_bytes` past p, for prefetches that run ahead of a stream
// (prefetching past an allocation's end is harmless: it never faults).
template <typename T>
inline const T* bytes_ahead(const T* p, int64_t ahead_bytes) {
  return reinterpret_cast<const T*>(reinterpret_cast<const char*>(p) + ahead_bytes);
}

// Byte ranges fetched a few cache lines at a time, so that a task's loads
// of the next task's data overlap its own arithmetic instead of being
// issued in one burst.
class PrefetchQueue {
 public:
  // write: the lines will be written (fetched for ownership). planes:
  // `planes` ranges of `bytes`, `stride` bytes apart.
  void add(const void* p, int64_t bytes, bool write = false, int64_t planes = 1, int64_t stride = 0) {
    if (count_ < kMaxRanges && bytes > 0 && planes > 0) {
      ranges_[count_++] = {static_cast<const char*>(p), bytes, planes, stride, write};
    }
  }
  void step(int lines) {
    for (; lines > 0 && at_ < count_; --lines) {
      const Range& r = ranges_[at_];
      if (r.write) {
        __builtin_prefetch(r.p + plane_ * r.stride + offset_, 1);
      } else {
        __builtin_prefetch(r.p + plane_ * r.stride + offset_);
      }
      offset_ += 64;
      if (offset_ >= r.bytes) {
        offset_ = 0;
        if (++plane_ == r.planes) {
          ++at_;
          plane_ = 0;
        }
      }
    }
  }
  int64_t bytes() const {
    int64_t total = 0;
    for (int i = 0; i < count_; ++i) total += ranges_[i].bytes * ranges_[i].planes;
    return total;
  }
  int64_t lines_left() const {
    int64_t lines = 0;
    for (int i = at_; i < count_; ++i) lines += (ranges_[i].bytes + 63) / 64 * ranges_[i].planes;
    if (at_ < count_) lines -= plane_ * ((ranges_[at_].bytes + 63) / 64) + offset_ / 64;
    return lines;
  }
  void clear() { count_ = at_ = 0, plane_ = offset_ = 0; }

 private:
  static constexpr int kMaxRanges = 8;
  struct Range {
    const char* p;
    int64_t bytes, planes, stride;
    bool write;
  };
  Range ranges_[kMaxRanges];
  int count_ = 0, at_ = 0;
  int64_t plane_ = 0, offset_ = 0;
};

template <typename x_t, typename l_t>
void backward_channels_last(const BackwardTensors& t, const CallGeometry& cg, bool stream) {
  const LipGeometry& g = cg.g;
  stream = stream && whole_lines({&t.grad_x, &t.grad_logit}, g.C);
  const LogitStrides& ls = cg.ls;
  const auto [g_ptr, x_ptr, l_ptr, y_ptr, max_ptr, inv_ptr, gx_ptr, gl_ptr] =
      backward_pointers<x_t, l_t>(t);
  const int64_t ahead = backward_prefetch_pixels(g.C * int64_t(sizeof(x_t)));
  at::parallel_for(0, g.N * g.H, 1, [&](int64_t begin, int64_t end) {
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
        for (int64_t c0 = 0; c0 < g.C;) {
          const int64_t count = std::min<int64_t>(kLanes, g.C - c0);
          const int64_t i = ((n * g.H + h) * g.W + w) * g.C + c0;
          if (unrolled && count == kLanes) {
            const int64_t blocks = c0 + kBlocks * kLanes <= g.C ? kBlocks : 1;
            const x_t* xi = x_ptr + i;
            const l_t* li = l_ptr + n * ls.n + (h * g.W + w) * ls.pixel + c0;
            // by pixel index, so that the next row's first pixels are fetched
            // while this row ends: stopping at the row's end left 4 of every
            // 14 pixels unfetched (float32, 2 threads, out of cache: 14x14
            // layers 5-10% faster; in cache 3% slower)
            if ((h * g.W + w) + ahead < g.H * g.W) {
              prefetch_range(xi + ahead * g.C, blocks * kLanes * int64_t(sizeof(x_t)));
              prefetch_range(li + ahead * ls.pixel, blocks * kLanes * int64_t(sizeof(l_t)));
            }
            const int64_t o = ((n * g.OH + oh0) * g.OW + ow0) * g.C + c0;
            const int64_t o_row = g.OW * g.C;
            const int64_t o_col = g.C;
            if (blocks == kBlocks) {
              grads_covered<kBlocks>(noh, now, xi, li, g_ptr + o, y_ptr + o, max_ptr + o, inv_ptr + o,
                                     o_row, o_col, gx_ptr + i, gl_ptr + i, stream);
            } else {
              grads_covered<1>(noh, now, xi, li, g_ptr + o, y_ptr + o, max_ptr + o, inv_ptr + o, o_row,
                               o_col, gx_ptr + i, gl_ptr + i, stream);
            }
            c0 += blocks * kLanes;
            continue;
          }
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
          store_lanes(gx_ptr + i, dx, count, stream);
          store_lanes(gl_ptr + i, dl, count, stream);
          c0 += kLanes;
        }
      }
    }
    if (stream) cpu_math::stream_fence();
  });
}

// ---- contiguous NCHW, rows: lanes along W ----------------------------------

// Outputs per forward task: enough work to amortise a task, small enough
// that a big plane still splits across threads.
constexpr int64_t kTaskElements = 16384;

// The taps k of one dimension that fall inside the input for some output
// (a kernel wider than the padded input is clipped to it): [first, last].
inline void clipped_taps(int64_t k, int64_t s, int64_t p, int64_t in, int64_t out, int64_t& first,
                         int64_t& last) {
  first = std::max<int64_t>(0, p - (out - 1) * s);
  last = std::min<int64_t>(k - 1, in - 1 + p);
}

// Lane permutations for stride 2: the even and odd elements of two
// vectors, and the inverse interleave (its first and second halves).
inline LaneInts even_odd_mask(int odd) {
  LaneInts mask;
  for (int l = 0; l < kLanes; ++l) mask[l] = 2 * l + odd;
  return mask;
}

inline LaneInts interleave_mask(int half) {
  LaneInts mask;
  for (int l = 0; l < kLanes; ++l) mask[l] = (l % 2) * kLanes + half * (kLanes / 2) + l / 2;
  return mask;
}

// Phase r of a row holds the columns r, r + s, r + 2s, ...: element j of
// phase r is column (j + first) * s + r. Writes `length` floats per phase
// (phase r at dst + r * stride, stride = length by default); columns
// outside [0, W) read `pad`. With `overrun`, the last vector of each phase
// is written whole (up to kLanes - 1 pad floats past `length`), for callers
// that write rows in ascending order into a buffer with kLanes of slack.
template <typename T>
void split_phases(const T* row, int64_t W, int64_t s, int64_t first, int64_t length, float pad,
                  float* dst, int64_t stride = -1, bool overrun = false) {
  if (stride < 0) stride = length;
  int64_t done = 0;  // elements of every phase already written from the front
  const int64_t lo = std::min(std::max<int64_t>(-first, 0), length);
  for (int64_t r = 0; r < s; ++r) {
    for (int64_t j = 0; j < lo; ++j) dst[r * stride + j] = pad;
  }
  if (s <= 2) {
    // whole vectors of s * kLanes columns, all inside the row
    const int64_t groups = std::max<int64_t>(0, std::min(W / s - (lo + first), length - lo));
    const T* src = row + s * (lo + first);
    int64_t j = 0;
    if (s == 1) {
      for (; j + kLanes <= groups; j += kLanes) store(dst + lo + j, load_full(src + j));
    } else {
      const LaneInts even = even_odd_mask(0), odd = even_odd_mask(1);
      for (; j + kLanes <= groups; j += kLanes) {
        const Lanes a = load_full(src + 2 * j), b = load_full(src + 2 * j + kLanes);
        store(dst + lo + j, __builtin_shuffle(a, b, even));
        store(dst + stride + lo + j, __builtin_shuffle(a, b, odd));
      }
    }
    // then whole vectors that run past the row's end: the columns left
    // (avail, possibly none) loaded once, the rest of the lanes `pad`
    // (element by element, this tail was 60% of split_phases's time)
    LaneInts index;
    for (int l = 0; l < kLanes; ++l) index[l] = l;
    for (; lo + j + (overrun ? 1 : kLanes) <= length; j += kLanes) {
      const int64_t column = s * (lo + first + j);
      const int32_t avail =
          static_cast<int32_t>(std::min<int64_t>(std::max<int64_t>(W - column, 0), s * kLanes));
      const Lanes a = avail > 0 ? load_lanes(row + column, std::min<int64_t>(avail, kLanes)) : splat(pad);
      if (s == 1) {
        store(dst + lo + j, cpu_math::select(index < avail, a, splat(pad)));
      } else {
        const Lanes b = avail > kLanes ? load_lanes(row + column + kLanes, avail - kLanes) : splat(pad);
        const LaneInts even = even_odd_mask(0), odd = even_odd_mask(1);
        // phase 0 lane i holds column 2i, phase 1 lane i column 2i + 1
        store(dst + lo + j, cpu_math::select(2 * index < avail, __builtin_shuffle(a, b, even), splat(pad)));
        store(dst + stride + lo + j,
              cpu_math::select(2 * index + 1 < avail, __builtin_shuffle(a, b, odd), splat(pad)));
      }
    }
    done = lo + j;
  } else {
    done = lo;
  }
  for (int64_t r = 0; r < s; ++r) {
    float* d = dst + r * stride;
    for (int64_t j = done; j < length; ++j) {
      const int64_t column = (j + first) * s + r;  // >= 0 from lo on
      d[j] = column < W ? static_cast<float>(row[column]) : pad;
    }
  }
}

// Inverse of split_phases (first = 0) for the columns in [0, W), phase r
// read at src + r * stride. For s <= 2 every phase is read in whole
// vectors, the last one possibly past the row's end (the caller's buffer
// holds it).
template <typename T>
void merge_phases(const float* src, int64_t W, int64_t s, int64_t stride, T* row, bool stream) {
  int64_t done = 0;  // columns written
  if (s == 1) {
    for (; done < W; done += kLanes) {
      store_lanes(row + done, load(src + done), std::min<int64_t>(kLanes, W - done), stream);
    }
  } else if (s == 2) {
    const LaneInts first_half = interleave_mask(0), second_half = interleave_mask(1);
    for (int64_t j = 0; 2 * j < W; j += kLanes) {
      const Lanes even = load(src + j), odd = load(src + stride + j);
      const int64_t left = W - 2 * j;
      store_lanes(row + 2 * j, __builtin_shuffle(even, odd, first_half), std::min<int64_t>(kLanes, left),
                  stream);
      if (left > kLanes) {
        store_lanes(row + 2 * j + kLanes, __builtin_shuffle(even, odd, second_half),
                    std::min<int64_t>(kLanes, left - kLanes), stream);
      }
    }
    done = W;
  }
  for (int64_t r = 0; r < s; ++r) {
    int64_t j = done > r ? (done - r + s - 1) / s : 0;
    for (int64_t column = j * s + r; column < W; column += s, ++j) {
      row[column] = static_cast<T>(src[r * stride + j]);
    }
  }
}

template <typename x_t, typename l_t>
void forward_rows(const ForwardTensors& t, const CallGeometry& cg, bool stream) {
  const LipGeometry& g = cg.g;
  stream = stream && whole_lines({&t.out, &t.window_max, &t.inv_weight_sum}, g.OW);
  const LogitStrides& ls = cg.ls;
  const x_t* x_ptr = t.x.const_data_ptr<x_t>();
  const l_t* l_ptr = t.logit.const_data_ptr<l_t>();
  x_t* out_ptr = t.out.mutable_data_ptr<x_t>();
  float* max_ptr = t.window_max.mutable_data_ptr<float>();
  float* inv_ptr = t.inv_weight_sum.mutable_data_ptr<float>();
  // Tap kw of output ow reads column ow * sW - pW + kw = (ow + q) * sW + r:
  // element ow + q of phase r. Phases start at q_min, so that every tap of
  // every (padded) lane chunk is inside the row buffer.
  int64_t kw_first, kw_last;
  clipped_taps(g.kW, g.sW, g.pW, g.W, g.OW, kw_first, kw_last);
  const int64_t q_min = floor_div(kw_first - g.pW, g.sW);
  const int64_t q_max = floor_div(kw_last - g.pW, g.sW);
  // whole pairs of lane chunks (see chunks below) stay inside the row
  const int64_t length = round_up(g.OW, 2 * kLanes) + q_max - q_min;
  const int64_t row_floats = g.sW * length;
  std::vector<int64_t> tap;  // the offset of each tap in a row's phases
  for (int64_t kw = kw_first; kw <= kw_last; ++kw) {
    const int64_t q = floor_div(kw - g.pW, g.sW);
    tap.push_back((kw - g.pW - q * g.sW) * length + q - q_min);
  }
  const int64_t taps = static_cast<int64_t>(tap.size());
  const int64_t ring_size = std::min(g.kH, g.H);  // input rows of one window, at most
  // output rows per task: whole strips of the tile form
  const int64_t task_rows =
      round_up(std::min(std::max<int64_t>(kTaskElements / g.OW, 1), g.OH), kStripRows);
  const int64_t tasks_per_plane = (g.OH + task_rows - 1) / task_rows;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const bool tile = tile_form_pays(g);  // else all sums 0: window maxima throughout
  at::parallel_for(0, g.N * g.C * tasks_per_plane, 1, [&](int64_t begin, int64_t end) {
    // A ring of the last kH input rows, split into phases: x, logit, and
    // their tile-form weights e and e x relative to the strip's max.
    std::unique_ptr<float[]> scratch(new float[4 * ring_size * row_floats]);
    const auto slot_data = [&](int64_t slot, int64_t array) {
      return scratch.get() + (4 * slot + array) * row_floats;
    };
    // the (input row, strip) each slot holds
    std::vector<int64_t> ring_row(ring_size, -1), ring_strip(ring_size, -1);
    // the input row whose x and logit phases each slot holds: split only
    // where a window needs its own max (or without the tile form)
    std::vector<int64_t> split(ring_size, -1);
    // one row's weights before the split
    std::unique_ptr<float[]> row_weights(new float[2 * round_up(g.W, kLanes)]);
    float* const e_row = row_weights.get();
    float* const ex_row = e_row + round_up(g.W, kLanes);
    int64_t ring_plane = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t plane = task / tasks_per_plane;
      const int64_t n = plane / g.C;
      const int64_t c = plane % g.C;
      if (plane != ring_plane) {
        std::fill(ring_row.begin(), ring_row.end(), -1);
        std::fill(split.begin(), split.end(), -1);
        ring_plane = plane;
      }
      const x_t* x_plane = x_ptr + plane * g.H * g.W;
      const l_t* l_plane = l_ptr + n * ls.n + c * ls.c;
      const auto split_row = [&](int64_t h) {
        const int64_t slot = h % ring_size;
        if (split[slot] != h) {
          // padding columns: logit -inf (no weight), x 0
          split_phases(x_plane + h * g.W, g.W, g.sW, q_min, length, 0.0f, slot_data(slot, 0));
          split_phases(l_plane + h * g.W, g.W, g.sW, q_min, length, neg_inf, slot_data(slot, 1));
          split[slot] = h;
        }
      };
      const int64_t oh_begin = (task % tasks_per_plane) * task_rows;
      const int64_t oh_end = std::min(g.OH, oh_begin + task_rows);
      Strip st{};
      Lanes tile_max = splat(0.0f);
      for (int64_t oh = oh_begin; oh < oh_end; ++oh) {
        const int64_t s = oh / kStripRows;
        if (tile && (oh == oh_begin || oh == s * kStripRows)) {
          // the strip's max logit, as max_tap takes it in the other layouts
          st = strip_at(g, s);
          // two chains, so that MAXPS's latency is not the loop's pace
          Lanes m_lanes = splat(neg_inf), m_odd = splat(neg_inf);
          float m = neg_inf;
          for (int64_t h = st.h0; h < st.h1; ++h) {
            const l_t* lr = l_plane + h * g.W;
            int64_t w = 0;
            for (; w + 2 * kLanes <= g.W; w += 2 * kLanes) {
              Step::max_tap(m_lanes, load_full(lr + w));
              Step::max_tap(m_odd, load_full(lr + w + kLanes));
            }
            for (; w + kLanes <= g.W; w += kLanes) Step::max_tap(m_lanes, load_full(lr + w));
            for (; w < g.W; ++w) ScalarStep::max_tap(m, static_cast<float>(lr[w]));
          }
          Step::max_tap(m_lanes, m_odd);
          for (int l = 0; l < kLanes; ++l) ScalarStep::max_tap(m, m_lanes[l]);
          tile_max = splat(ScalarStep::reference_max(m));
        }
        int64_t h0, h1;
        window_range<int64_t>(oh, g.kH, g.sH, g.pH, g.H, h0, h1);
        for (int64_t h = h0; h < h1; ++h) {
          const int64_t slot = h % ring_size;
          if (!tile) {
            split_row(h);
          } else if (ring_row[slot] != h || ring_strip[slot] != s) {
            // the weights of the row as it lies in memory, then split like
            // x (padding columns weigh 0)
            const x_t* xs = x_plane + h * g.W;
            const l_t* ls_row = l_plane + h * g.W;
            int64_t w = 0;
            const bool ahead = h + 2 < g.H;
            for (; w + kLanes <= g.W; w += kLanes) {
              if (ahead) {
                // the rows two ahead (the next output row's at stride 2)
                __builtin_prefetch(xs + 2 * g.W + w);
                __builtin_prefetch(ls_row + 2 * g.W + w);
              }
              Lanes ev, exv;
              Step::tile_weight(load_full(ls_row + w), load_full(xs + w), tile_max, ev, exv);
              store(e_row + w, ev);
              store(ex_row + w, exv);
            }
            if (w < g.W) {
              Lanes ev, exv;
              Step::tile_weight(load_lanes(ls_row + w, g.W - w), load_lanes(xs + w, g.W - w),
                                tile_max, ev, exv);
              store(e_row + w, ev);
              store(ex_row + w, exv);
            }
            split_phases(e_row, g.W, g.sW, q_min, length, 0.0f, slot_data(slot, 2));
            split_phases(ex_row, g.W, g.sW, q_min, length, 0.0f, slot_data(slot, 3));
            ring_row[slot] = h;
            ring_strip[slot] = s;
          }
        }
        const int64_t o_row = plane * g.OH * g.OW + oh * g.OW;
        // U lane chunks at once: independent sums hide the add latency
        // (each output still adds its taps in the same order)
        const auto chunks = [&](int64_t j0, auto unroll) {
          constexpr int U = decltype(unroll)::value;
          Lanes sum[U], weighted[U];
          LIP_UNROLL
          for (int u = 0; u < U; ++u) {
            sum[u] = splat(0.0f);
            weighted[u] = splat(0.0f);
          }
          for (int64_t h = h0; h < (tile ? h1 : h0); ++h) {
            const float* er = slot_data(h % ring_size, 2) + j0;
            const float* exr = slot_data(h % ring_size, 3) + j0;
            for (int64_t k = 0; k < taps; ++k) {
              LIP_UNROLL
              for (int u = 0; u < U; ++u) {
                const int64_t at = tap[k] + u * kLanes;
                Step::add_weight(load(er + at), load(exr + at), sum[u], weighted[u]);
              }
            }
          }
          LIP_UNROLL
          for (int u = 0; u < U; ++u) {
            const int64_t j = j0 + u * kLanes;
            const int64_t count = std::min<int64_t>(kLanes, g.OW - j);
            Lanes y, inv, reference = tile_max;
            Step::finish(sum[u], weighted[u], y, inv);
            const Lanes key = Step::fallback_key(sum[u], weighted[u]);
            // lanes past the row's end (no output) must not ask for the window max
            const Lanes check =
                count < kLanes
                    ? cpu_math::select(cpu_math::lanes_between(0, static_cast<int32_t>(count)), key,
                                       splat(1.0f))
                    : key;
            if (Step::needs_window_max(tile ? check : key)) {
              for (int64_t h = h0; h < h1; ++h) split_row(h);
              // window maxima, as window_softmax takes them
              Lanes m = splat(neg_inf);
              for (int64_t h = h0; h < h1; ++h) {
                const float* lr = slot_data(h % ring_size, 1) + j0 + u * kLanes;
                for (int64_t k = 0; k < taps; ++k) Step::max_tap(m, load(lr + tap[k]));
              }
              m = Step::reference_max(m);
              Lanes s_w = splat(0.0f), weighted_w = splat(0.0f), y_w, inv_w;
              for (int64_t h = h0; h < h1; ++h) {
                const float* xr = slot_data(h % ring_size, 0) + j0 + u * kLanes;
                const float* lr = slot_data(h % ring_size, 1) + j0 + u * kLanes;
                for (int64_t k = 0; k < taps; ++k) {
                  Step::add_tap(load(lr + tap[k]), load(xr + tap[k]), m, s_w, weighted_w);
                }
              }
              Step::finish(s_w, weighted_w, y_w, inv_w);
              Step::use_window_max(key, y_w, m, inv_w, y, reference, inv);
            }
            store_lanes(out_ptr + o_row + j, y, count, stream);
            store_lanes(max_ptr + o_row + j, reference, count, stream);
            store_lanes(inv_ptr + o_row + j, inv, count, stream);
          }
        };
        int64_t j0 = 0;
        for (; j0 + kLanes < g.OW; j0 += 2 * kLanes) chunks(j0, std::integral_constant<int, 2>{});
        if (j0 < g.OW) chunks(j0, std::integral_constant<int, 1>{});
      }
    }
    if (stream) cpu_math::stream_fence();
  });
}

// Backward's view of one dimension split into stride phases: input
// i = a * s + r (phase r, element a) is covered by the outputs o = a - q,
// through tap r + p + q * s, for q in [q_lo[r], q_hi[r]] (those o in
// [0, out) only; the kernel checks that with padding).
struct PhaseTaps {
  std::vector<int64_t> q_lo, q_hi;
  int64_t q_lo_all = 0, q_hi_all = 0;  // over all phases, and 0
  int64_t elements = 0;                // elements of the longest phase

  PhaseTaps(int64_t k, int64_t s, int64_t p, int64_t in, int64_t out) : q_lo(s), q_hi(s) {
    int64_t first, last;
    clipped_taps(k, s, p, in, out, first, last);
    for (int64_t r = 0; r < s; ++r) {
      q_lo[r] = -floor_div(r + p - first, s);  // ceil((first - r - p) / s)
      q_hi[r] = floor_div(last - r - p, s);
      if (q_lo[r] <= q_hi[r]) {
        q_lo_all = std::min(q_lo_all, q_lo[r]);
        q_hi_all = std::max(q_hi_all, q_hi[r]);
      }
    }
    elements = (in + s - 1) / s;
  }
};

// Flat positions per phase plane per backward task: the task's scratch
// (x and the logit of sH x sW phase planes, four output arrays) then stays
// in the L1 and L2 caches.
constexpr int64_t kPhaseTaskFloats = 512;

// Contiguous backward. Each plane is split into its sH x sW stride phases,
// and each phase plane is laid out flat with a row pitch P: one lane vector
// is kLanes consecutive inputs of a phase plane, running across its rows,
// so that small planes fill whole vectors (a 14-wide row is 7 inputs per
// phase). The outputs' four arrays are laid out flat with the same pitch
// and padding around them, so that every (input, covering output) pair of
// a phase is a vector load at one fixed offset. Padding outputs have grad 0,
// 1 / sum 0 and reference +inf, so that their terms are exactly +0 and add
// nothing to any sum; inputs that no window covers get logit 0, so that
// theirs stay 0 too whatever their logit (inf, NaN). The terms are added
// in ascending (oh, ow) order, as in the other layouts: bitwise equal
// gradients.
template <typename x_t, typename l_t>
void backward_rows(const BackwardTensors& t, const CallGeometry& cg, bool stream) {
  const LipGeometry& g = cg.g;
  stream = stream && whole_lines({&t.grad_x, &t.grad_logit}, g.W);
  const LogitStrides& ls = cg.ls;
  const auto [g_ptr, x_ptr, l_ptr, y_ptr, max_ptr, inv_ptr, gx_ptr, gl_ptr] =
      backward_pointers<x_t, l_t>(t);
  const PhaseTaps rows(g.kH, g.sH, g.pH, g.H, g.OH), cols(g.kW, g.sW, g.pW, g.W, g.OW);
  // Output column ow sits at left + ow of its row; an input lane of column
  // element b reads ow = b - q at left + b - q, in [0, P) for every b of
  // the phase, so that it never reads a neighbouring row.
  const int64_t left = cols.q_hi_all;
  const int64_t pitch = left + std::max(g.OW, cols.elements - cols.q_lo_all);
  const int64_t task_rows = std::min(rows.elements, std::max<int64_t>(1, kPhaseTaskFloats / pitch));
  const int64_t tasks_per_plane = (rows.elements + task_rows - 1) / task_rows;
  const int64_t out_rows = task_rows + rows.q_hi_all - rows.q_lo_all;
  // whole pairs of vectors, then one vector of slack for split_phases'
  // overrun and for the garbage lanes' reads below an output row
  const int64_t in_floats = round_up(task_rows * pitch, 2 * kLanes) + kLanes;
  const int64_t out_floats = out_rows * pitch + pitch + 3 * kLanes;
  const int64_t phases = g.sH * g.sW;
  // the inputs no window covers: their logit is read as 0 (see above)
  std::vector<char> row_covered(g.H);
  for (int64_t h = 0; h < g.H; ++h) {
    int64_t o0, o1;
    covering_outputs<int64_t>(h, g.kH, g.sH, g.pH, g.OH, o0, o1);
    row_covered[h] = o0 <= o1;
  }
  std::vector<int64_t> uncovered_cols;
  for (int64_t w = 0; w < g.W; ++w) {
    int64_t o0, o1;
    covering_outputs<int64_t>(w, g.kW, g.sW, g.pW, g.OW, o0, o1);
    if (o0 > o1) uncovered_cols.push_back(w);
  }
  // per phase (rh, rw): the offsets from an input's flat position to its
  // covering outputs', oh and then ow ascending
  std::vector<std::vector<int64_t>> taps(phases);
  for (int64_t rh = 0; rh < g.sH; ++rh) {
    for (int64_t rw = 0; rw < g.sW; ++rw) {
      for (int64_t qh = rows.q_hi[rh]; qh >= rows.q_lo[rh]; --qh) {
        for (int64_t qw = cols.q_hi[rw]; qw >= cols.q_lo[rw]; --qw) {
          taps[rh * g.sW + rw].push_back((rows.q_hi_all - qh) * pitch + left - qw);
        }
      }
    }
  }
  const float inf = std::numeric_limits<float>::infinity();
  at::parallel_for(0, g.N * g.C * tasks_per_plane, 1, [&](int64_t begin, int64_t end) {
    // x and the logit of every phase plane (dx and dlogit replace them),
    // then the outputs' grad, y, reference and 1 / sum
    std::unique_ptr<float[]> scratch(new float[2 * phases * in_floats + 4 * out_floats]);
    float* const xb = scratch.get();
    float* const lb = xb + phases * in_floats;
    float* const ob = lb + phases * in_floats;
    PrefetchQueue next;
    const auto queue_task = [&](int64_t task, PrefetchQueue& q) {
      const int64_t plane = task / tasks_per_plane;
      const int64_t a0 = (task % tasks_per_plane) * task_rows;
      const int64_t h0 = a0 * g.sH, h1 = std::min(g.H, (a0 + task_rows) * g.sH);
      q.add(x_ptr + plane * g.H * g.W + h0 * g.W, (h1 - h0) * g.W * int64_t(sizeof(x_t)));
      q.add(l_ptr + (plane / g.C) * ls.n + (plane % g.C) * ls.c + h0 * g.W, (h1 - h0) * g.W * int64_t(sizeof(l_t)));
      if (!stream) {  // streamed lines must not be cached first
        q.add(gx_ptr + plane * g.H * g.W + h0 * g.W, (h1 - h0) * g.W * int64_t(sizeof(x_t)), true);
        q.add(gl_ptr + plane * g.H * g.W + h0 * g.W, (h1 - h0) * g.W * int64_t(sizeof(l_t)), true);
      }
      const int64_t oh0 = std::max<int64_t>(0, a0 - rows.q_hi_all);
      const int64_t oh1 = std::min(g.OH, a0 + task_rows - rows.q_lo_all);
      const int64_t o = plane * g.OH * g.OW + oh0 * g.OW, o_count = std::max<int64_t>(0, oh1 - oh0) * g.OW;
      q.add(g_ptr + o, o_count * int64_t(sizeof(x_t)));
      q.add(y_ptr + o, o_count * int64_t(sizeof(x_t)));
      q.add(max_ptr + o, o_count * int64_t(sizeof(float)));
      q.add(inv_ptr + o, o_count * int64_t(sizeof(float)));
    };
    for (int64_t task = begin; task < end; ++task) {
      const int64_t plane = task / tasks_per_plane;
      const int64_t n = plane / g.C;
      const int64_t c = plane % g.C;
      const int64_t a0 = (task % tasks_per_plane) * task_rows;
      const int64_t a1 = std::min(rows.elements, a0 + task_rows);
      const x_t* x_plane = x_ptr + plane * g.H * g.W;
      const l_t* l_plane = l_ptr + n * ls.n + c * ls.c;
      // output rows oh0 + i, i < out_rows, padding where oh is outside [0, OH)
      const int64_t oh0 = a0 - rows.q_hi_all;
      const int64_t o_plane = plane * g.OH * g.OW;
      // one output array's rows into the flat layout, `pad` around them
      const auto lay_out = [&](const auto* src, float pad, float* dst) {
        for (int64_t i = 0; i < out_rows; ++i) {
          const int64_t oh = oh0 + i;
          float* d = dst + i * pitch;
          if (oh < 0 || oh >= g.OH) {
            std::fill(d, d + pitch, pad);
          } else {
            split_phases(src + o_plane + oh * g.OW, g.OW, 1, -left, pitch, pad, d, pitch, true);
          }
        }
        std::fill(dst + out_rows * pitch, dst + out_floats, pad);
      };
      lay_out(g_ptr, 0.0f, ob);
      lay_out(y_ptr, 0.0f, ob + out_floats);
      lay_out(max_ptr, inf, ob + 2 * out_floats);
      lay_out(inv_ptr, 0.0f, ob + 3 * out_floats);
      // the task's input rows in memory order, each into its row phase
      const int64_t h_begin = a0 * g.sH, h_end = std::min(g.H, a1 * g.sH);
      for (int64_t h = h_begin; h < a1 * g.sH; ++h) {
        float* const x_rh = xb + (h % g.sH) * g.sW * in_floats;
        float* const l_rh = lb + (h % g.sH) * g.sW * in_floats;
        const int64_t at = (h / g.sH - a0) * pitch;
        if (h >= g.H) {
          for (int64_t rw = 0; rw < g.sW; ++rw) {
            std::fill_n(x_rh + rw * in_floats + at, pitch, 0.0f);
            std::fill_n(l_rh + rw * in_floats + at, pitch, 0.0f);
          }
          continue;
        }
        split_phases(x_plane + h * g.W, g.W, g.sW, 0, pitch, 0.0f, x_rh + at, in_floats, true);
        split_phases(l_plane + h * g.W, g.W, g.sW, 0, pitch, 0.0f, l_rh + at, in_floats, true);
        if (!row_covered[h]) {
          for (int64_t rw = 0; rw < g.sW; ++rw) std::fill_n(l_rh + rw * in_floats + at, pitch, 0.0f);
        } else {
          for (const int64_t w : uncovered_cols) l_rh[(w % g.sW) * in_floats + at + w / g.sW] = 0.0f;
        }
      }
      const int64_t filled = (a1 - a0) * pitch;
      // the next task's data, spread over this task's vector steps
      next.clear();
      if (task + 1 < end) queue_task(task + 1, next);
      const int64_t steps = phases * ((filled + 2 * kLanes - 1) / (2 * kLanes));
      const int lines_per_step = static_cast<int>(std::max<int64_t>(1, (next.lines_left() + steps - 1) / steps));
      for (int64_t phase = 0; phase < phases; ++phase) {
        float* const xr = xb + phase * in_floats;
        float* const lr = lb + phase * in_floats;
        std::fill(xr + filled, xr + in_floats, 0.0f);
        std::fill(lr + filled, lr + in_floats, 0.0f);
        const std::vector<int64_t>& offsets = taps[phase];
        const int64_t count = static_cast<int64_t>(offsets.size());
        for (int64_t f = 0; f < filled; f += 2 * kLanes) {
          next.step(lines_per_step);
          constexpr int U = 2;  // independent chains hide the add latency
          Lanes xi[U], li[U], dx[U], dl[U];
          LIP_UNROLL
          for (int u = 0; u < U; ++u) {
            xi[u] = load(xr + f + u * kLanes);
            li[u] = load(lr + f + u * kLanes);
            dx[u] = splat(0.0f);
            dl[u] = splat(0.0f);
          }
          for (int64_t k = 0; k < count; ++k) {
            const float* o = ob + f + offsets[k];
            LIP_UNROLL
            for (int u = 0; u < U; ++u) {
              const float* ou = o + u * kLanes;
              Step::grad_tap(li[u], xi[u], load(ou), load(ou + out_floats), load(ou + 2 * out_floats),
                             load(ou + 3 * out_floats), dx[u], dl[u]);
            }
          }
          LIP_UNROLL
          for (int u = 0; u < U; ++u) {
            store(xr + f + u * kLanes, dx[u]);
            store(lr + f + u * kLanes, dl[u]);
          }
        }
      }
      for (int64_t h = h_begin; h < h_end; ++h) {
        const int64_t i_row = plane * g.H * g.W + h * g.W;
        const int64_t at = (h % g.sH) * g.sW * in_floats + (h / g.sH - a0) * pitch;
        merge_phases(xb + at, g.W, g.sW, in_floats, gx_ptr + i_row, stream);
        merge_phases(lb + at, g.W, g.sW, in_floats, gl_ptr + i_row, stream);
      }
    }
    if (stream) cpu_math::stream_fence();
  });
}

// The contiguous kernel that tests and benchmarks ask for with
// LIP_CUDA_CPU_PLANES (rows, blocks or gather), or "" for the default.
std::string forced_planes_kernel() {
  const char* env = std::getenv("LIP_CUDA_CPU_PLANES");
  return env ? env : "";
}

// ---- contiguous NCHW, blocks: channel groups in lane-minor buffers ---------

// A blocks task's channels: image n, channels [c0, c0 + lanes) in use, in
// blocks() lane blocks (the last one possibly part full).
struct ChannelBlock {
  int64_t n, c0, lanes;
  int64_t blocks() const { return (lanes + kLanes - 1) / kLanes; }
};

// Transposes the kLanes x kLanes tile held in r[0..kLanes) in place: log2
// kLanes stages, each swapping b x b blocks between rows i and i + b.
inline void transpose_tile(Lanes* r) {
#if LIP_CPU_ISA >= 2
  // AVX-512: in-lane unpacks, then 128-bit lane shuffles, 64 three-operand
  // shuffles. The generic form below compiles to 64 two-source permutes
  // (VPERMT2PS, which overwrite an operand: a register copy each); this
  // form measured the blocks backward 1.3x faster at 512x28x28 (float32,
  // 2 threads: 0.63 -> 0.46 ms; forward 0.38 -> 0.30 ms).
  // (the zero-masked forms with a full mask: the plain ones start from an
  // "undefined" register, which GCC then warns may be used uninitialised)
  const __mmask16 all = 0xFFFF;
  const __mmask8 all_pd = 0xFF;
  __m512 t[16], u[16], w[16];
  LIP_UNROLL
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_maskz_unpacklo_ps(all, reinterpret_cast<__m512>(r[i]), reinterpret_cast<__m512>(r[i + 1]));
    t[i + 1] = _mm512_maskz_unpackhi_ps(all, reinterpret_cast<__m512>(r[i]), reinterpret_cast<__m512>(r[i + 1]));
  }
  // u[4g + j], 128-bit lane q: rows 4g..4g+3 of column 4q + j
  LIP_UNROLL
  for (int g = 0; g < 16; g += 4) {
    const __m512d t0 = _mm512_castps_pd(t[g]), t1 = _mm512_castps_pd(t[g + 1]);
    const __m512d t2 = _mm512_castps_pd(t[g + 2]), t3 = _mm512_castps_pd(t[g + 3]);
    u[g] = _mm512_castpd_ps(_mm512_maskz_unpacklo_pd(all_pd, t0, t2));
    u[g + 1] = _mm512_castpd_ps(_mm512_maskz_unpackhi_pd(all_pd, t0, t2));
    u[g + 2] = _mm512_castpd_ps(_mm512_maskz_unpacklo_pd(all_pd, t1, t3));
    u[g + 3] = _mm512_castpd_ps(_mm512_maskz_unpackhi_pd(all_pd, t1, t3));
  }
  LIP_UNROLL
  for (int j = 0; j < 4; ++j) {
    w[4 * j] = _mm512_maskz_shuffle_f32x4(all, u[j], u[4 + j], 0x88);
    w[4 * j + 1] = _mm512_maskz_shuffle_f32x4(all, u[j], u[4 + j], 0xDD);
    w[4 * j + 2] = _mm512_maskz_shuffle_f32x4(all, u[8 + j], u[12 + j], 0x88);
    w[4 * j + 3] = _mm512_maskz_shuffle_f32x4(all, u[8 + j], u[12 + j], 0xDD);
  }
  LIP_UNROLL
  for (int j = 0; j < 4; ++j) {
    r[j] = reinterpret_cast<Lanes>(_mm512_maskz_shuffle_f32x4(all, w[4 * j], w[4 * j + 2], 0x88));
    r[8 + j] = reinterpret_cast<Lanes>(_mm512_maskz_shuffle_f32x4(all, w[4 * j], w[4 * j + 2], 0xDD));
    r[4 + j] = reinterpret_cast<Lanes>(_mm512_maskz_shuffle_f32x4(all, w[4 * j + 1], w[4 * j + 3], 0x88));
    r[12 + j] = reinterpret_cast<Lanes>(_mm512_maskz_shuffle_f32x4(all, w[4 * j + 1], w[4 * j + 3], 0xDD));
  }
#elif LIP_CPU_ISA == 1
  // AVX2: the 128-bit halves exchanged first (one insert, or an extract and
  // an insert), then 4 x 4 transposes within each half. The generic form
  // below compiled to two-source permutes whose index vectors GCC built at
  // run time, element by element.
  __m256 t[8];
  LIP_UNROLL
  for (int i = 0; i < 4; ++i) {
    const __m256 a = reinterpret_cast<__m256>(r[i]), b = reinterpret_cast<__m256>(r[i + 4]);
    t[i] = _mm256_insertf128_ps(a, _mm256_castps256_ps128(b), 1);    // a.lo | b.lo
    t[i + 4] = _mm256_insertf128_ps(b, _mm256_extractf128_ps(a, 1), 0);  // a.hi | b.hi
  }
  // t[g..g+3]: rows 0-3 (low half) and 4-7 (high half) of columns g..g+3
  LIP_UNROLL
  for (int g = 0; g < 8; g += 4) {
    const __m256 lo01 = _mm256_unpacklo_ps(t[g], t[g + 1]), hi01 = _mm256_unpackhi_ps(t[g], t[g + 1]);
    const __m256 lo23 = _mm256_unpacklo_ps(t[g + 2], t[g + 3]), hi23 = _mm256_unpackhi_ps(t[g + 2], t[g + 3]);
    r[g] = reinterpret_cast<Lanes>(_mm256_shuffle_ps(lo01, lo23, 0x44));
    r[g + 1] = reinterpret_cast<Lanes>(_mm256_shuffle_ps(lo01, lo23, 0xEE));
    r[g + 2] = reinterpret_cast<Lanes>(_mm256_shuffle_ps(hi01, hi23, 0x44));
    r[g + 3] = reinterpret_cast<Lanes>(_mm256_shuffle_ps(hi01, hi23, 0xEE));
  }
#else
  LIP_UNROLL
  for (int b = kLanes / 2; b >= 1; b /= 2) {
    LaneInts low, high;
    for (int l = 0; l < kLanes; ++l) {
      low[l] = (l & b) ? kLanes + l - b : l;
      high[l] = (l & b) ? kLanes + l : l + b;
    }
    LIP_UNROLL
    for (int i = 0; i < kLanes; ++i) {
      if ((i & b) == 0) {
        const Lanes u = r[i], v = r[i + b];
        r[i] = __builtin_shuffle(u, v, low);
        r[i + b] = __builtin_shuffle(u, v, high);
      }
    }
  }
#endif
}

// Copies `pixels` elements from element `first` of planes [c0, c0 + lanes)
// of image n (plane c at n * n_stride + c * c_stride) into
// dst[pixel][b.blocks() * kLanes] as float; unused lanes hold copies of the
// last channel (finite work that is never stored). c_stride 0 (a logit
// shared across channels) copies one plane into every lane. Whole tiles of
// kLanes pixels go through lane transposes in registers.
template <typename src_t>
void pack_planes(const src_t* src, int64_t n_stride, int64_t c_stride, const ChannelBlock& b,
                 int64_t first, int64_t pixels, float* dst) {
  const int64_t width = b.blocks() * kLanes;
  for (int64_t j = 0; j < b.blocks(); ++j) {
    const src_t* plane[kLanes];
    for (int64_t c = 0; c < kLanes; ++c) {
      plane[c] = src + b.n * n_stride + (b.c0 + std::min(j * kLanes + c, b.lanes - 1)) * c_stride + first;
    }
    float* d = dst + j * kLanes;
    int64_t px = 0;
    for (; px + kLanes <= pixels; px += kLanes) {
      Lanes r[kLanes];
      LIP_UNROLL
      for (int c = 0; c < kLanes; ++c) {
        // kLanes short interleaved streams: too many for the hardware prefetcher
        __builtin_prefetch(plane[c] + px + 4 * kLanes);
        r[c] = load_full(plane[c] + px);
      }
      transpose_tile(r);
      LIP_UNROLL
      for (int i = 0; i < kLanes; ++i) store(d + (px + i) * width, r[i]);
    }
    for (; px < pixels; ++px) {
      for (int64_t c = 0; c < kLanes; ++c) d[px * width + c] = static_cast<float>(plane[c][px]);
    }
  }
}

// The inverse of pack_planes for the lanes in use, into a dense NCHW tensor
// of C planes of plane_pixels (Stream: whole tiles stream past the cache,
// see stream_bits).
template <bool Stream, typename dst_t>
void unpack_tiles(const float* src, const ChannelBlock& b, int64_t C, int64_t plane_pixels,
                  int64_t first, int64_t pixels, dst_t* dst) {
  const int64_t width = b.blocks() * kLanes;
  for (int64_t j = 0; j < b.blocks(); ++j) {
    const int64_t lanes = std::min<int64_t>(kLanes, b.lanes - j * kLanes);
    dst_t* const planes = dst + (b.n * C + b.c0 + j * kLanes) * plane_pixels + first;
    const float* s = src + j * kLanes;
    int64_t px = 0;
    for (; px + kLanes <= pixels; px += kLanes) {
      Lanes r[kLanes];
      LIP_UNROLL
      for (int i = 0; i < kLanes; ++i) r[i] = load(s + (px + i) * width);
      transpose_tile(r);
      LIP_UNROLL
      for (int c = 0; c < kLanes; ++c) {
        if (c < lanes) store_full(planes + c * plane_pixels + px, r[c], Stream);
      }
    }
    for (int64_t c = 0; c < lanes; ++c) {
      for (int64_t q = px; q < pixels; ++q) planes[c * plane_pixels + q] = static_cast<dst_t>(s[q * width + c]);
    }
  }
}

template <typename dst_t>
void unpack_planes(const float* src, const ChannelBlock& b, int64_t C, int64_t plane_pixels, int64_t first,
                   int64_t pixels, dst_t* dst, bool stream) {
  if (stream) {
    unpack_tiles<true>(src, b, C, plane_pixels, first, pixels, dst);
  } else {
    unpack_tiles<false>(src, b, C, plane_pixels, first, pixels, dst);
  }
}

// The blocks kernels fetch the next task's rows while they compute the
// current one, where those are at most this many bytes: measured (float32,
// 2 threads, inputs out of cache) backward 0.51 -> 0.31 ms at 1024x14x14
// and 0.78 -> 0.62 ms at 512x28x28, but 0.65 -> 0.70 ms at 128x56x56,
// whose 1 MiB per block (with the block's own scratch) outgrows the L2.
constexpr int64_t kBlockPrefetchBytes = 384 * 1024;

// Queues elements [first, first + pixels) of task b's planes of a dense
// NCHW tensor (C planes of plane_pixels): one range where they are whole
// planes, side by side.
template <typename T>
void queue_block(PrefetchQueue& q, const T* data, const ChannelBlock& b, int64_t C, int64_t plane_pixels,
                 int64_t first, int64_t pixels, bool write = false) {
  const T* p = data + (b.n * C + b.c0) * plane_pixels + first;
  const int64_t bytes = pixels * int64_t(sizeof(T));
  if (pixels == plane_pixels) {
    q.add(p, b.lanes * bytes, write);
  } else {
    q.add(p, bytes, write, b.lanes, plane_pixels * int64_t(sizeof(T)));
  }
}

// The same for the logit (one plane, where all channels share it).
template <typename l_t>
void queue_block_logit(PrefetchQueue& q, const l_t* logit, const LogitStrides& ls, const ChannelBlock& b,
                       int64_t plane_pixels, int64_t first, int64_t pixels) {
  const l_t* p = logit + b.n * ls.n + b.c0 * ls.c + first;
  const int64_t bytes = pixels * int64_t(sizeof(l_t));
  if (ls.c == 0) {
    q.add(p, bytes);
  } else if (pixels == plane_pixels) {
    q.add(p, b.lanes * bytes);
  } else {
    q.add(p, bytes, false, b.lanes, ls.c * int64_t(sizeof(l_t)));
  }
}

// Lane blocks per channel group of the blocks kernels, forward and
// backward. On AVX2 the backward takes four, so that a pixel's work is four
// lane vectors as in channels_last (packs of four exps, kGradPack):
// measured on the Zen 1 VM (float32 contiguous, op calls, 2 threads, inputs
// out of cache, three alternating runs, ms, one block vs four) 2x128x56x56
// 3.10-3.49 vs 2.36-2.53, 2x512x28x28 2.82-2.84 vs 2.65-2.73, 2x512x14x14
// 0.66-0.76 vs 0.49-0.56. Its forward stays at one (four: 2x128x56x56
// 1.45-1.59 vs 1.36-1.44 ms), as do both directions of the AVX-512 and
// baseline builds, as they were tuned: no machine here could measure them.
constexpr int64_t kForwardGroupBlocks = 1;
constexpr int64_t kBackwardGroupBlocks = LIP_CPU_ISA == 1 ? 4 : 1;
static_assert(kForwardGroupBlocks <= kMaxStripBlocks, "forward_strip takes the group's blocks");
static_assert(kBackwardGroupBlocks <= 4, "backward_planes unrolls up to 4 blocks");

// Scratch a blocks task aims for: a band of rows of its group's planes,
// lane-minor (whole planes where they fit, as the small planes of most
// LIP-ResNet layers do), so that it stays in the L2 cache whatever the
// plane size. 256 and 768 KiB measured within noise of this on the Zen 1
// VM (its L2: 512 KiB a core).
constexpr int64_t kForwardScratchBytes = 384 * 1024;
constexpr int64_t kBackwardScratchBytes = 384 * 1024;

// How the blocks kernels split a call: groups of channels, and bands of
// each group's planes, `band` strips of outputs (forward) or `band` input
// rows (backward) each.
struct BlockTasks {
  int64_t group_channels, groups;  // per image
  int64_t band, bands;             // per plane
};

BlockTasks block_tasks(const LipGeometry& g, bool forward) {
  BlockTasks t;
  const int64_t group_blocks = forward ? kForwardGroupBlocks : kBackwardGroupBlocks;
  t.group_channels = std::min<int64_t>(group_blocks, (g.C + kLanes - 1) / kLanes) * kLanes;
  t.groups = (g.C + t.group_channels - 1) / t.group_channels;
  const int64_t pixel_bytes = t.group_channels * int64_t(sizeof(float));
  if (forward) {
    // a strip's new input rows (x, logit) and its outputs (y, reference, 1 / sum)
    const int64_t strip_bytes = (kStripRows * g.sH * g.W * 2 + kStripRows * g.OW * 3) * pixel_bytes;
    t.band = std::max<int64_t>(1, std::min(strip_count(g), kForwardScratchBytes / strip_bytes));
    t.bands = (strip_count(g) + t.band - 1) / t.band;
  } else {
    // an input row (x, logit) and its share of the output rows' four arrays
    const int64_t row_bytes = (2 * g.W + (4 * g.OW + g.sH - 1) / g.sH) * pixel_bytes;
    t.band = std::max<int64_t>(std::min(g.H, std::max(g.kH, g.sH)),
                               std::min(g.H, kBackwardScratchBytes / row_bytes));
    t.bands = (g.H + t.band - 1) / t.band;
  }
  return t;
}

// The rows of band i: input rows [h0, h1), output rows [oh0, oh1).
struct BandRows {
  int64_t h0, h1, oh0, oh1;
};

BandRows forward_band(const LipGeometry& g, const BlockTasks& t, int64_t i) {
  const int64_t s0 = i * t.band, s1 = std::min(strip_count(g), s0 + t.band);
  const Strip first = strip_at(g, s0), last = strip_at(g, s1 - 1);
  return {first.h0, last.h1, first.oh0, last.oh1};
}

// (oh0 >= oh1 where no output covers the band's rows)
BandRows backward_band(const LipGeometry& g, const BlockTasks& t, int64_t i) {
  BandRows r;
  r.h0 = i * t.band;
  r.h1 = std::min(g.H, r.h0 + t.band);
  int64_t unused, last;
  covering_outputs<int64_t>(r.h0, g.kH, g.sH, g.pH, g.OH, r.oh0, unused);
  covering_outputs<int64_t>(r.h1 - 1, g.kH, g.sH, g.pH, g.OH, unused, last);
  r.oh1 = std::max(r.oh0, last + 1);
  return r;
}

// The most scratch floats a task of t needs: input rows x in_arrays and
// output rows x out_arrays, group_channels floats a pixel. Bands between
// the first and the last repeat with the first row's phase mod sH, so
// sH + 1 of them are all the sizes there are.
template <typename Band>
int64_t band_scratch_floats(const LipGeometry& g, const BlockTasks& t, Band band, int64_t in_arrays,
                            int64_t out_arrays) {
  int64_t most = 0;
  for (int64_t i = 0; i < t.bands; i = (i < g.sH + 1 || i + 1 == t.bands) ? i + 1 : t.bands - 1) {
    const BandRows r = band(g, t, i);
    most = std::max(most, (r.h1 - r.h0) * g.W * in_arrays + (r.oh1 - r.oh0) * g.OW * out_arrays);
  }
  return most * t.group_channels;
}

// Task b's band of rows and its lane-minor arrays in the task's scratch:
// in_arrays arrays of the band's input rows, then arrays of its output rows.
struct BandBuffers {
  BandRows rows;
  int64_t width, in_count, out_count;  // floats a pixel; input and output pixels
  float* scratch;
  int64_t in_arrays;
  float* in(int64_t k) const { return scratch + k * in_count * width; }
  float* out(int64_t k) const { return in(in_arrays) + k * out_count * width; }
};

inline BandBuffers band_buffers(const LipGeometry& g, const BandRows& r, const ChannelBlock& b,
                                int64_t in_arrays, float* scratch) {
  return {r, b.blocks() * kLanes, (r.h1 - r.h0) * g.W, (r.oh1 - r.oh0) * g.OW, scratch, in_arrays};
}

// Queues the input rows (x and the logit) of task b's band r.
template <typename x_t, typename l_t>
void queue_band_inputs(PrefetchQueue& q, const LipGeometry& g, const x_t* x, const l_t* logit,
                       const LogitStrides& ls, const ChannelBlock& b, const BandRows& r) {
  const int64_t first = r.h0 * g.W, count = (r.h1 - r.h0) * g.W;
  queue_block(q, x, b, g.C, g.H * g.W, first, count);
  queue_block_logit(q, logit, ls, b, g.H * g.W, first, count);
}

// Transposes the input rows (x and the logit) of task b's band into its
// first two lane-minor buffers.
template <typename x_t, typename l_t>
void pack_band_inputs(const LipGeometry& g, const x_t* x, const l_t* logit, const LogitStrides& ls,
                      const ChannelBlock& b, const BandBuffers& bb) {
  const int64_t first = bb.rows.h0 * g.W;
  pack_planes(x, g.C * g.H * g.W, g.H * g.W, b, first, bb.in_count, bb.in(0));
  pack_planes(logit, ls.n, ls.c, b, first, bb.in_count, bb.in(1));
}

// Runs fn(block, band, next, next_band, scratch) over every (image, channel
// group, band) in parallel; next is the task the same thread runs next
// (nullptr if none). Each thread allocates its scratch of `scratch_floats`
// once, uninitialised, and reuses it for all its tasks: a fresh zero-filled
// buffer per task cost more in page faults than the arithmetic. stream: fn
// streams its outputs (each thread then ends with stream_fence).
//
// The blocks kernels stream only where every output vector is a whole line
// (float32 outputs, 16 lanes) and a task's planes are whole: a tile's kLanes
// stores go to kLanes planes, so half lines would wait in kLanes
// write-combining buffers for their other halves (the bfloat16 512x28x28
// forward at batch 16 measured 1.84 -> 2.01 ms streamed).
template <typename Fn>
void for_each_block(const LipGeometry& g, const BlockTasks& t, int64_t scratch_floats, bool stream, Fn&& fn) {
  const auto task_at = [&](int64_t i, ChannelBlock& b, int64_t& band) {
    band = i % t.bands;
    const int64_t group = (i / t.bands) % t.groups;
    b.n = i / (t.bands * t.groups);
    b.c0 = group * t.group_channels;
    b.lanes = std::min(t.group_channels, g.C - b.c0);
  };
  at::parallel_for(0, g.N * t.groups * t.bands, 1, [&](int64_t begin, int64_t end) {
    std::unique_ptr<float[]> scratch(new float[scratch_floats]);
    for (int64_t i = begin; i < end; ++i) {
      ChannelBlock b, next{};
      int64_t band = 0, next_band = 0;
      task_at(i, b, band);
      if (i + 1 < end) task_at(i + 1, next, next_band);
      fn(b, band, i + 1 < end ? &next : nullptr, next_band, scratch.get());
    }
    if (stream) cpu_math::stream_fence();
  });
}

template <typename... T>
constexpr bool whole_line_vectors() {
  return ((kLanes * sizeof(T) == 64) && ...);
}

template <typename x_t, typename l_t>
void forward_planes(const ForwardTensors& t, const CallGeometry& cg, bool stream) {
  const LipGeometry& g = cg.g;
  const BlockTasks tasks = block_tasks(g, true);
  stream = stream && tasks.bands == 1 && whole_line_vectors<x_t>() &&
           whole_lines({&t.out, &t.window_max, &t.inv_weight_sum}, g.OH * g.OW);
  const x_t* x_ptr = t.x.const_data_ptr<x_t>();
  const l_t* l_ptr = t.logit.const_data_ptr<l_t>();
  x_t* out_ptr = t.out.mutable_data_ptr<x_t>();
  float* max_ptr = t.window_max.mutable_data_ptr<float>();
  float* inv_ptr = t.inv_weight_sum.mutable_data_ptr<float>();
  const int64_t out_pixels = g.OH * g.OW;
  const int64_t ring_floats = strip_scratch_floats(g, tasks.group_channels / kLanes);
  const int64_t scratch = band_scratch_floats(g, tasks, forward_band, 2, 3) + ring_floats;
  for_each_block(g, tasks, scratch, stream,
                 [&](const ChannelBlock& b, int64_t band, const ChannelBlock* next_block, int64_t next_band,
                     float* buffer) {
    const BandBuffers bb = band_buffers(g, forward_band(g, tasks, band), b, 2, buffer);
    const BandRows& r = bb.rows;
    const int64_t width = bb.width, out_count = bb.out_count;
    float *xb = bb.in(0), *lb = bb.in(1);
    float *yb = bb.out(0), *maxb = bb.out(1), *invb = bb.out(2), *ring = bb.out(3);
    pack_band_inputs(g, x_ptr, l_ptr, cg.ls, b, bb);
    // the next task's rows, spread over this task's strips
    PrefetchQueue next;
    if (next_block != nullptr) {
      const ChannelBlock& nb = *next_block;
      const BandRows nr = forward_band(g, tasks, next_band);
      const int64_t n_out = (nr.oh1 - nr.oh0) * g.OW;
      queue_band_inputs(next, g, x_ptr, l_ptr, cg.ls, nb, nr);
      if (!stream) {  // streamed lines must not be cached first
        queue_block(next, out_ptr, nb, g.C, out_pixels, nr.oh0 * g.OW, n_out, true);
        queue_block(next, max_ptr, nb, g.C, out_pixels, nr.oh0 * g.OW, n_out, true);
        queue_block(next, inv_ptr, nb, g.C, out_pixels, nr.oh0 * g.OW, n_out, true);
      }
      if (next.bytes() > kBlockPrefetchBytes) next.clear();
    }
    const int64_t s0 = band * tasks.band, s1 = std::min(strip_count(g), s0 + tasks.band);
    const int lines_per_strip = static_cast<int>((next.lines_left() + (s1 - s0) - 1) / (s1 - s0));
    for (int64_t s = s0; s < s1; ++s) {
      next.step(lines_per_strip);
      StripData<float, float, float> d;
      d.x = xb;
      d.logit = lb;
      d.h_origin = r.h0;
      d.x_row = d.l_row = g.W * width;
      d.x_pixel = d.l_pixel = width;
      d.logit_shared = false;  // pack_planes copied it into every lane
      d.blocks = b.blocks();
      d.last_count = kLanes;   // the lanes past C hold copies of the last channel
      d.out = yb;
      d.reference = maxb;
      d.inv = invb;
      d.oh_origin = r.oh0;
      d.out_row = g.OW * width;
      d.out_pixel = width;
      forward_strip(g, strip_at(g, s), d, ring);
    }
    unpack_planes(yb, b, g.C, out_pixels, r.oh0 * g.OW, out_count, out_ptr, stream);
    unpack_planes(maxb, b, g.C, out_pixels, r.oh0 * g.OW, out_count, max_ptr, stream);
    unpack_planes(invb, b, g.C, out_pixels, r.oh0 * g.OW, out_count, inv_ptr, stream);
  });
}

template <typename x_t, typename l_t>
void backward_planes(const BackwardTensors& t, const CallGeometry& cg, bool stream) {
  const LipGeometry& g = cg.g;
  const BlockTasks tasks = block_tasks(g, false);
  stream = stream && tasks.bands == 1 && whole_line_vectors<x_t, l_t>() &&
           whole_lines({&t.grad_x, &t.grad_logit}, g.H * g.W);
  const auto [g_ptr, x_ptr, l_ptr, y_ptr, max_ptr, inv_ptr, gx_ptr, gl_ptr] =
      backward_pointers<x_t, l_t>(t);
  const int64_t in_pixels = g.H * g.W;
  const int64_t out_pixels = g.OH * g.OW;
  // dx and dlogit replace x and the logit in the scratch (each pixel reads
  // only its own): at 128x56x56 the scratch is then 0.6 MiB, not 1 MiB,
  // and stays in the L2 cache
  const int64_t scratch = band_scratch_floats(g, tasks, backward_band, 2, 4);
  for_each_block(g, tasks, scratch, stream,
                 [&](const ChannelBlock& b, int64_t band, const ChannelBlock* next_block, int64_t next_band,
                     float* buffer) {
    const BandBuffers bb = band_buffers(g, backward_band(g, tasks, band), b, 2, buffer);
    const BandRows& r = bb.rows;
    const int64_t width = bb.width, in_count = bb.in_count, out_count = bb.out_count;
    float *xb = bb.in(0), *lb = bb.in(1);
    float *gb = bb.out(0), *yb = bb.out(1), *maxb = bb.out(2), *invb = bb.out(3);
    const int64_t o_n = g.C * out_pixels, o_first = r.oh0 * g.OW;
    pack_band_inputs(g, x_ptr, l_ptr, cg.ls, b, bb);
    pack_planes(g_ptr, o_n, out_pixels, b, o_first, out_count, gb);
    pack_planes(y_ptr, o_n, out_pixels, b, o_first, out_count, yb);
    pack_planes(max_ptr, o_n, out_pixels, b, o_first, out_count, maxb);
    pack_planes(inv_ptr, o_n, out_pixels, b, o_first, out_count, invb);
    // the next task's rows, spread over this task's pixels
    PrefetchQueue next;
    if (next_block != nullptr) {
      const ChannelBlock& nb = *next_block;
      const BandRows nr = backward_band(g, tasks, next_band);
      const int64_t n_in = (nr.h1 - nr.h0) * g.W, n_out = (nr.oh1 - nr.oh0) * g.OW;
      const int64_t n_first = nr.h0 * g.W, n_o_first = nr.oh0 * g.OW;
      queue_band_inputs(next, g, x_ptr, l_ptr, cg.ls, nb, nr);
      queue_block(next, g_ptr, nb, g.C, out_pixels, n_o_first, n_out);
      queue_block(next, y_ptr, nb, g.C, out_pixels, n_o_first, n_out);
      queue_block(next, max_ptr, nb, g.C, out_pixels, n_o_first, n_out);
      queue_block(next, inv_ptr, nb, g.C, out_pixels, n_o_first, n_out);
      if (!stream) {  // streamed lines must not be cached first
        queue_block(next, gx_ptr, nb, g.C, in_pixels, n_first, n_in, true);
        queue_block(next, gl_ptr, nb, g.C, in_pixels, n_first, n_in, true);
      }
      if (next.bytes() > kBlockPrefetchBytes) next.clear();
    }
    const int lines_per_pixel = static_cast<int>((next.lines_left() + in_count - 1) / in_count);
    const int64_t o_row = g.OW * width;
    for (int64_t h = r.h0; h < r.h1; ++h) {
      int64_t oh0, oh1;
      covering_outputs<int64_t>(h, g.kH, g.sH, g.pH, g.OH, oh0, oh1);
      for (int64_t w = 0; w < g.W; ++w) {
        int64_t ow0, ow1;
        covering_outputs<int64_t>(w, g.kW, g.sW, g.pW, g.OW, ow0, ow1);
        const int64_t i = ((h - r.h0) * g.W + w) * width;
        next.step(lines_per_pixel);
        const int64_t noh = oh1 - oh0 + 1, now = ow1 - ow0 + 1;
        if (noh >= 1 && noh <= 2 && now >= 1 && now <= 2) {
          // unrolled as in channels_last (the same sums in the same order):
          // float32, 2 threads, out of cache, 6 alternating runs: 56x56
          // planes 6-9% faster (0.494 -> 0.450 ms at 128 channels), 28x28
          // and 14x14 within 2%
          const int64_t o = ((oh0 - r.oh0) * g.OW + ow0) * width;
          const auto covered = [&](auto blocks) {
            grads_covered<decltype(blocks)::value>(noh, now, xb + i, lb + i, gb + o, yb + o, maxb + o, invb + o,
                                                   o_row, width, xb + i, lb + i, false);
          };
          switch (b.blocks()) {
            case 1: covered(std::integral_constant<int, 1>()); break;
            // (the builds with groups of one block instantiate only that)
            case 2: covered(std::integral_constant<int, std::min<int>(2, kBackwardGroupBlocks)>()); break;
            case 3: covered(std::integral_constant<int, std::min<int>(3, kBackwardGroupBlocks)>()); break;
            default: covered(std::integral_constant<int, kBackwardGroupBlocks>()); break;
          }
          continue;
        }
        for (int64_t j = 0; j < b.blocks(); ++j) {
          Lanes dx, dl;
          gather_grads(
              oh0, oh1, ow0, ow1, load(xb + i + j * kLanes), load(lb + i + j * kLanes),
              [&](int64_t oh, int64_t ow, Lanes& go, Lanes& y, Lanes& m, Lanes& inv) {
                const int64_t o = ((oh - r.oh0) * g.OW + ow) * width + j * kLanes;
                go = load(gb + o);
                y = load(yb + o);
                m = load(maxb + o);
                inv = load(invb + o);
              },
              dx, dl);
          store(xb + i + j * kLanes, dx);
          store(lb + i + j * kLanes, dl);
        }
      }
    }
    unpack_planes(xb, b, g.C, in_pixels, r.h0 * g.W, in_count, gx_ptr, stream);
    unpack_planes(lb, b, g.C, in_pixels, r.h0 * g.W, in_count, gl_ptr, stream);
  });
}

// ---- contiguous NCHW, gather backward: lanes along a row ----------------

// Where each lane vector of an input row finds its covering outputs along
// W. Slot j of column w is output ow_first(w) + j (the covering outputs in
// ascending order); the outputs a vector's lanes need are read as one lane
// vector of their output row from `base`, and a lane permute (`index`)
// puts each slot's output under its input.
struct GatherColumns {
  int64_t vectors = 0;           // lane vectors per input row
  int64_t slots = 0;             // covering outputs of a column, at most
  std::vector<int64_t> base;     // per vector: its first output column
  std::vector<int64_t> outs;     // per vector: output columns read from base
  // kLanes int32 each (std::vector of vector types loses their alignment)
  std::vector<int32_t> index;    // per (vector, slot): output column - base
  std::vector<int32_t> valid;    // per (vector, slot): the slot exists (-1)
  std::vector<int32_t> covered;  // per vector: some output covers the column
  bool fits = true;              // every slot's output within one lane vector

  static LaneInts at(const std::vector<int32_t>& lanes, int64_t i) {
    LaneInts v;
    std::memcpy(&v, lanes.data() + i * kLanes, sizeof(v));
    return v;
  }
};

GatherColumns gather_columns(const LipGeometry& g) {
  GatherColumns gc;
  gc.vectors = (g.W + kLanes - 1) / kLanes;
  std::vector<int64_t> first(g.W), last(g.W);  // each column's covering outputs
  for (int64_t w = 0; w < g.W; ++w) {
    covering_outputs<int64_t>(w, g.kW, g.sW, g.pW, g.OW, first[w], last[w]);
    gc.slots = std::max(gc.slots, last[w] - first[w] + 1);
  }
  for (int64_t v = 0; v < gc.vectors; ++v) {
    int64_t base = g.OW;
    for (int64_t w = v * kLanes; w < std::min(g.W, (v + 1) * kLanes); ++w) {
      if (first[w] <= last[w]) base = std::min(base, first[w]);
    }
    if (base == g.OW) base = 0;  // no lane is covered
    gc.base.push_back(base);
    gc.outs.push_back(std::max<int64_t>(0, std::min<int64_t>(kLanes, g.OW - base)));
    LaneInts covered{};
    for (int64_t j = 0; j < gc.slots; ++j) {
      LaneInts index{}, valid{};
      for (int l = 0; l < kLanes; ++l) {
        const int64_t w = v * kLanes + l;
        if (w >= g.W || first[w] + j > last[w]) continue;
        if (first[w] + j - base >= kLanes) gc.fits = false;
        index[l] = static_cast<int32_t>(std::min<int64_t>(first[w] + j - base, kLanes - 1));
        valid[l] = -1;
        covered[l] = -1;
      }
      gc.index.insert(gc.index.end(), &index[0], &index[0] + kLanes);
      gc.valid.insert(gc.valid.end(), &valid[0], &valid[0] + kLanes);
    }
    gc.covered.insert(gc.covered.end(), &covered[0], &covered[0] + kLanes);
  }
  return gc;
}

// Whether the gather backward takes this geometry: where windows overlap
// (the tile form, whose strips share references), and each lane vector's
// outputs lie within one lane vector of their row. The permutes need AVX2 or
// AVX-512.
bool gather_works(const LipGeometry& g, const GatherColumns& gc) {
  return kLanes >= 8 && tile_form_pays(g) && gc.fits && gc.slots >= 1;
}

// Where it is the default, among the planes the blocks kernels do not
// take: those 56 to 512 wide. Op calls (float32, 2 threads, inputs out of cache, k3 s2
// p1, backward ms, gather against the kernel otherwise taken, runs of this
// VM that moved 10-30%): 2x64x112x112 0.76-0.83 against rows 0.93-0.98,
// 2x32x96x96 0.27 against 0.35, 4x8x256x256 0.96 against 1.13-1.21; not
// faster at 1024 and 2048 wide (1.96-2.09 and 2.9-3.4 against rows
// 1.74-2.69 and 2.4-3.2). Against the blocks backward, through the
// benchmark (bench_lip.py, two alternating runs): even in float32 at
// 2x128x56x56 (0.58-0.59 against 0.55-0.58) and 2x256x56x56 (1.04-1.12
// against 1.10-1.15), slower in bfloat16 (0.50-0.51 against 0.45; 0.99
// against 0.83-0.87), and slower on the smaller planes (2x512x14x14 0.14
// against 0.12, 28 x 28 0.25-0.58 against 0.22-0.47, 40 x 40, 48 x 48),
// where each lane vector's work (an exp and its two to four covering
// terms, one dependency chain) comes with a row's bookkeeping.
bool gather_by_default(const LipGeometry& g) { return g.W >= 56 && g.W <= 512; }

// Both gradients of one lane vector of an input row over its NR covering
// output rows (d + i row_stride: `slots` entries of reference, 1 / sum,
// grad, y each; uniform[i uniform_stride]: all its slots share the first
// slot's references) and NS slots: grad_weight_tap in ascending (oh, ow)
// order, one exp per distinct reference. NR, NS 0: the counts at run time.
template <int NR, int NS>
[[gnu::always_inline]] inline void gather_vector(const Lanes* d, int64_t row_stride, const char* uniform,
                                                 int64_t uniform_stride, int64_t rows, int64_t slots,
                                                 Lanes xi, Lanes li, Lanes e, Lanes& dx,
                                                 Lanes& dl) {
  // e: the first slot's weight, Step::tap_weight(li, d[0]), computed by the
  // caller for several vectors at once
  const int64_t nr = NR ? NR : rows, ns = NS ? NS : slots;
  dx = splat(0.0f);
  dl = splat(0.0f);
  Lanes reference = d[0];
  LIP_UNROLL
  for (int64_t i = 0; i < nr; ++i, d += row_stride, uniform += uniform_stride) {
    if (i > 0 && !cpu_math::all_set(d[0] == reference)) {
      reference = d[0];
      e = cpu_math::exp_lanes(li - reference);
    }
    const bool shared = *uniform;
    LIP_UNROLL
    for (int64_t j = 0; j < ns; ++j) {
      const Lanes* t = d + 4 * j;
      if (j > 0 && !shared && !cpu_math::all_set(t[0] == reference)) {
        reference = t[0];
        e = Step::tap_weight(li, reference);
      }
      Step::grad_weight_tap(e, xi, t[2], t[3], t[1], dx, dl);
    }
  }
}

// How far ahead of its float32 input rows the gather backward fetches
// (scaled by element size, and by 1/4 for the outputs, which advance at a
// quarter of the inputs' pace at stride 2): with only the hardware
// prefetchers following its eight short streams, it took 0.61 ms at
// 2x512x14x14 with one thread and the inputs out of cache, 0.27 ms with
// this (2 threads: 0.27 -> 0.15 ms); 2, 4, 8 and 16 KiB measured alike.
constexpr int64_t kGatherAheadBytes = 4096;

// Contiguous backward with lanes along an input row, as it lies in memory
// (no transposes, no phase split). Each output row's four arrays are spread
// under the input columns once per task (a lane permute per array and
// slot), and the input rows they cover read them from there. Covering
// outputs with the same reference (all of a tile-form strip's) share one
// exp: an input takes one exp per distinct reference, not one per covering
// output. The terms are grad_tap's (grad_weight_tap), added in ascending
// (oh, ow) order, and an absent slot adds an exact zero (1 / sum and grad 0,
// the reference of the column's first slot, so that its exp is finite):
// bitwise the gradients of the other layouts.
template <typename x_t, typename l_t>
void backward_gather(const BackwardTensors& t, const CallGeometry& cg, const GatherColumns& gc,
                     bool stream) {
  const LipGeometry& g = cg.g;
  stream = stream && whole_lines({&t.grad_x, &t.grad_logit}, g.W);
  const LogitStrides& ls = cg.ls;
  const auto [g_ptr, x_ptr, l_ptr, y_ptr, max_ptr, inv_ptr, gx_ptr, gl_ptr] =
      backward_pointers<x_t, l_t>(t);
  const int64_t slots = gc.slots;
  // per (vector, slot) of an output row: reference, 1 / sum, grad, y
  const int64_t row_lanes = gc.vectors * slots * 4;
  // input rows per task: about kTaskElements inputs (whole planes when
  // small), at least two strides' worth
  const int64_t task_rows = std::min(g.H, std::max<int64_t>(2 * g.sH, kTaskElements / g.W));
  const int64_t tasks_per_plane = (g.H + task_rows - 1) / task_rows;
  std::vector<int64_t> first_row(g.H), last_row(g.H);
  for (int64_t h = 0; h < g.H; ++h) {
    covering_outputs<int64_t>(h, g.kH, g.sH, g.pH, g.OH, first_row[h], last_row[h]);
  }
  // the most output rows one task spreads
  int64_t task_out_rows = 1;
  for (int64_t h0 = 0; h0 < g.H; h0 += task_rows) {
    const int64_t h1 = std::min(g.H, h0 + task_rows) - 1;
    task_out_rows = std::max(task_out_rows, last_row[h1] - first_row[h0] + 1);
  }
  const float inf = std::numeric_limits<float>::infinity();
  const int64_t float_ahead = kGatherAheadBytes;
  const int64_t x_ahead = kGatherAheadBytes * int64_t(sizeof(x_t)) / 4;
  const int64_t l_ahead = kGatherAheadBytes * int64_t(sizeof(l_t)) / 4;
  // flattened, so that the PackStep calls are inlined (see PackMath)
  at::parallel_for(0, g.N * g.C * tasks_per_plane, 1, [&](int64_t begin, int64_t end)
                                                          __attribute__((flatten)) {
    std::unique_ptr<Lanes[]> spread(new Lanes[task_out_rows * row_lanes]);
    std::unique_ptr<char[]> uniform(new char[task_out_rows * gc.vectors]);
    int64_t plane = begin / tasks_per_plane, band = begin % tasks_per_plane;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = plane / g.C, c = plane % g.C;
      const int64_t h_begin = band * task_rows, h_end = std::min(g.H, h_begin + task_rows);
      const int64_t oh_base = first_row[h_begin];
      int64_t spread_end = oh_base;  // output rows [oh_base, spread_end) are spread
      const int64_t o_plane = plane * g.OH * g.OW;
      const x_t* x_plane = x_ptr + plane * g.H * g.W;
      const l_t* l_plane = l_ptr + n * ls.n + c * ls.c;
      for (int64_t h = h_begin; h < h_end; ++h) {
        const int64_t oh0 = first_row[h], oh1 = last_row[h];
        for (; spread_end <= oh1; ++spread_end) {
          Lanes* d = spread.get() + (spread_end - oh_base) * row_lanes;
          char* shared = uniform.get() + (spread_end - oh_base) * gc.vectors;
          const int64_t o = o_plane + spread_end * g.OW;
          // the output rows a few KiB ahead (the next planes' on small
          // ones): 8 short streams are too many for the hardware prefetchers
          prefetch_range(bytes_ahead(g_ptr + o, x_ahead / 4), g.OW * int64_t(sizeof(x_t)));
          prefetch_range(bytes_ahead(y_ptr + o, x_ahead / 4), g.OW * int64_t(sizeof(x_t)));
          prefetch_range(bytes_ahead(max_ptr + o, float_ahead / 4), g.OW * int64_t(sizeof(float)));
          prefetch_range(bytes_ahead(inv_ptr + o, float_ahead / 4), g.OW * int64_t(sizeof(float)));
          for (int64_t v = 0; v < gc.vectors; ++v) {
            const int64_t at = o + gc.base[v], count = gc.outs[v];
            const Lanes go = load_lanes(g_ptr + at, count), y = load_lanes(y_ptr + at, count);
            const Lanes m = load_lanes(max_ptr + at, count), inv = load_lanes(inv_ptr + at, count);
            // uncovered columns: reference +inf, their (discarded) weight 0
            const Lanes m_first = cpu_math::select(
                GatherColumns::at(gc.covered, v), __builtin_shuffle(m, GatherColumns::at(gc.index, v * slots)),
                splat(inf));
            bool same = true;
            for (int64_t j = 0; j < slots; ++j, d += 4) {
              const LaneInts index = GatherColumns::at(gc.index, v * slots + j);
              const LaneInts valid = GatherColumns::at(gc.valid, v * slots + j);
              d[0] = cpu_math::select(valid, __builtin_shuffle(m, index), m_first);
              d[1] = cpu_math::select(valid, __builtin_shuffle(inv, index), splat(0.0f));
              d[2] = cpu_math::select(valid, __builtin_shuffle(go, index), splat(0.0f));
              d[3] = __builtin_shuffle(y, index);
              same = same && cpu_math::all_set(d[0] == m_first);
            }
            shared[v] = same;
          }
        }
        const int64_t rows = oh1 - oh0 + 1;
        const x_t* xr = x_plane + h * g.W;
        const l_t* lr = l_plane + h * g.W;
        x_t* gxr = gx_ptr + plane * g.H * g.W + h * g.W;
        l_t* glr = gl_ptr + plane * g.H * g.W + h * g.W;
        prefetch_range(bytes_ahead(xr, x_ahead), g.W * int64_t(sizeof(x_t)));
        prefetch_range(bytes_ahead(lr, l_ahead), g.W * int64_t(sizeof(l_t)));
        if (!stream) {  // streamed lines must not be cached first
          prefetch_range_for_write(bytes_ahead(gxr, x_ahead), g.W * int64_t(sizeof(x_t)));
          prefetch_range_for_write(bytes_ahead(glr, l_ahead), g.W * int64_t(sizeof(l_t)));
        }
        const Lanes* first = spread.get() + (oh0 - oh_base) * row_lanes;
        const char* first_uniform = uniform.get() + (oh0 - oh_base) * gc.vectors;
        const int shape = rows < 1 ? -1 : (rows <= 2 && slots <= 2) ? int((rows - 1) * 2 + (slots - 1)) : 4;
        // kGradPack vectors at a time: their first weights' exps interleaved
        for (int64_t v0 = 0; v0 < gc.vectors; v0 += kGradPack) {
          typename PackStep<kGradPack>::V xs, ls, refs, es;
          LIP_UNROLL
          for (int k = 0; k < kGradPack; ++k) {
            // past the last vector: the last one again, computed and dropped
            const int64_t v = std::min<int64_t>(v0 + k, gc.vectors - 1), w0 = v * kLanes;
            const int64_t count = std::min<int64_t>(kLanes, g.W - w0);
            xs[k] = load_lanes(xr + w0, count);
            ls[k] = load_lanes(lr + w0, count);
            refs[k] = shape < 0 ? splat(0.0f) : first[v * slots * 4];
          }
          es = PackStep<kGradPack>::tap_weight(ls, refs);
          for (int64_t k = 0; k < kGradPack && v0 + k < gc.vectors; ++k) {
            const int64_t v = v0 + k, w0 = v * kLanes;
            const int64_t count = std::min<int64_t>(kLanes, g.W - w0);
            const Lanes xi = xs[k], li = ls[k], e = es[k];
            const Lanes* d = first + v * slots * 4;
            const char* u = first_uniform + v;
            Lanes dx = splat(0.0f), dl = splat(0.0f);
            switch (shape) {
              case -1: break;  // no output covers the row
              case 0: gather_vector<1, 1>(d, row_lanes, u, gc.vectors, rows, slots, xi, li, e, dx, dl); break;
              case 1: gather_vector<1, 2>(d, row_lanes, u, gc.vectors, rows, slots, xi, li, e, dx, dl); break;
              case 2: gather_vector<2, 1>(d, row_lanes, u, gc.vectors, rows, slots, xi, li, e, dx, dl); break;
              case 3: gather_vector<2, 2>(d, row_lanes, u, gc.vectors, rows, slots, xi, li, e, dx, dl); break;
              default: gather_vector<0, 0>(d, row_lanes, u, gc.vectors, rows, slots, xi, li, e, dx, dl); break;
            }
            // inputs no window covers: 0 whatever their logit (inf, NaN)
            const LaneInts covered = GatherColumns::at(gc.covered, v);
            store_lanes(gxr + w0, cpu_math::select(covered, dx, splat(0.0f)), count, stream);
            store_lanes(glr + w0, cpu_math::select(covered, dl, splat(0.0f)), count, stream);
          }
        }
      }
      if (++band == tasks_per_plane) band = 0, ++plane;
    }
    if (stream) cpu_math::stream_fence();
  });
}

// ---- kernel choice ------------------------------------------------------

// Which of the four kernels runs a call (float lanes; float64 never gets
// here), and its name for _lip2d_last_kernel.
enum class CpuKernel { ChannelsLast, PlanesBlocks, PlanesRows, PlanesGather };

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
constexpr int64_t kMaxBlockPixels = 64 * 64;
constexpr bool kForwardBlocksAnySize = LIP_CPU_ISA == 1;
// A blocks task's scratch, at most (its smallest band: one strip, or kH
// input rows): planes with longer rows take the rows kernels, forced or not.
constexpr int64_t kMaxBlockScratchBytes = int64_t(4) << 20;

bool use_blocks(const LipGeometry& g, bool forward) {
  const std::string forced = forced_planes_kernel();
  if (forced == "rows") return false;
  // the rows kernels always work
  const BlockTasks t = block_tasks(g, forward);
  const int64_t floats = forward ? band_scratch_floats(g, t, forward_band, 2, 3) +
                                       strip_scratch_floats(g, t.group_channels / kLanes)
                                 : band_scratch_floats(g, t, backward_band, 2, 4);
  if (floats * int64_t(sizeof(float)) > kMaxBlockScratchBytes) return false;
  if (forced == "blocks") return true;
  if (g.H * g.W > kMaxBlockPixels && !(forward && kForwardBlocksAnySize)) return false;
  const auto fill = [](int64_t n) {
    return static_cast<double>(n) / static_cast<double>(round_up(n, kLanes));
  };
  // (the AVX2 forward takes blocks on a tie: the stem's 64 channels and 56
  // outputs a row fill all lanes either way, and blocks was the faster)
  return forward && kForwardBlocksAnySize ? fill(g.C) >= fill(g.OW) : fill(g.C) > fill(g.OW);
}

CpuKernel cpu_kernel_for(const CallGeometry& cg) {
  if (cg.channels_last) return CpuKernel::ChannelsLast;
  return use_blocks(cg.g, true) ? CpuKernel::PlanesBlocks : CpuKernel::PlanesRows;
}

// The backward's kernel: the gather one where it is the default (or where
// LIP_CUDA_CPU_PLANES=gather asks for it) and it takes the geometry, else
// the forward's. Fills gc only then: its tables cost host time per column.
CpuKernel cpu_backward_kernel_for(const CallGeometry& cg, GatherColumns& gc) {
  if (cg.channels_last) return CpuKernel::ChannelsLast;
  const CpuKernel kernel = use_blocks(cg.g, false) ? CpuKernel::PlanesBlocks : CpuKernel::PlanesRows;
  const std::string planes = forced_planes_kernel();
  if (planes == "rows" || planes == "blocks") return kernel;
  if (planes != "gather" && !(kernel == CpuKernel::PlanesRows && gather_by_default(cg.g))) return kernel;
  gc = gather_columns(cg.g);
  return gather_works(cg.g, gc) ? CpuKernel::PlanesGather : kernel;
}

const char* cpu_kernel_name(CpuKernel kernel) {
  switch (kernel) {
    case CpuKernel::ChannelsLast: return "cpu_" LIP_CPU_ISA_NAME "_channels_last";
    case CpuKernel::PlanesBlocks: return "cpu_" LIP_CPU_ISA_NAME "_planes_blocks";
    case CpuKernel::PlanesGather: return "cpu_" LIP_CPU_ISA_NAME "_planes_gather";
    default: return "cpu_" LIP_CPU_ISA_NAME "_planes_rows";
  }
}

}  // namespace

const char* forward(const ForwardTensors& t, const CallGeometry& cg, bool stream) {
  const CpuKernel kernel = cpu_kernel_for(cg);
  dispatch_dtypes(t.x.scalar_type(), t.logit.scalar_type(), [&](auto x_tag, auto l_tag) {
    using x_t = decltype(x_tag);
    using l_t = decltype(l_tag);
    if constexpr (!std::is_same_v<x_t, double>) {
      switch (kernel) {
        case CpuKernel::ChannelsLast: forward_channels_last<x_t, l_t>(t, cg, stream); break;
        case CpuKernel::PlanesBlocks: forward_planes<x_t, l_t>(t, cg, stream); break;
        default: forward_rows<x_t, l_t>(t, cg, stream); break;
      }
    }
  });
  return cpu_kernel_name(kernel);
}

const char* backward(const BackwardTensors& t, const CallGeometry& cg, bool stream) {
  GatherColumns gc;
  const CpuKernel kernel = cpu_backward_kernel_for(cg, gc);
  dispatch_dtypes(t.x.scalar_type(), t.logit.scalar_type(), [&](auto x_tag, auto l_tag) {
    using x_t = decltype(x_tag);
    using l_t = decltype(l_tag);
    if constexpr (!std::is_same_v<x_t, double>) {
      switch (kernel) {
        case CpuKernel::ChannelsLast: backward_channels_last<x_t, l_t>(t, cg, stream); break;
        case CpuKernel::PlanesBlocks: backward_planes<x_t, l_t>(t, cg, stream); break;
        case CpuKernel::PlanesGather: backward_gather<x_t, l_t>(t, cg, gc, stream); break;
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
#else

// ---- run-time choice of the instruction set (baseline translation unit) ----

namespace lip_cuda {

#if defined(LIP_CPU_ISA_BUILDS)
namespace cpu_avx2 {
const char* forward(const ForwardTensors& t, const CallGeometry& cg, bool stream);
const char* backward(const BackwardTensors& t, const CallGeometry& cg, bool stream);
}  // namespace cpu_avx2
namespace cpu_avx512 {
const char* forward(const ForwardTensors& t, const CallGeometry& cg, bool stream);
const char* backward(const BackwardTensors& t, const CallGeometry& cg, bool stream);
}  // namespace cpu_avx512
#endif
#if defined(LIP_CPU_AVX512BF16_BUILD)
namespace cpu_avx512bf16 {
const char* forward(const ForwardTensors& t, const CallGeometry& cg, bool stream);
const char* backward(const BackwardTensors& t, const CallGeometry& cg, bool stream);
}  // namespace cpu_avx512bf16
#endif

namespace {

// What this CPU runs, as torch sees it (which honours ATEN_CPU_CAPABILITY):
// 0 baseline, 1 AVX2, 2 AVX-512, 3 AVX-512 with AVX512-BF16 (which torch's
// capability does not name: asked of the CPU). Always 0 without the
// per-ISA builds.
int cpu_isa_level() {
#if defined(LIP_CPU_ISA_BUILDS)
  static const int level = [] {
    const std::string capability = at::get_cpu_capability();
    if (capability.find("AVX512") != std::string::npos) {
#if defined(LIP_CPU_AVX512BF16_BUILD)
      if (__builtin_cpu_supports("avx512bf16")) return 3;
#endif
      return 2;
    }
    if (capability.find("AVX2") != std::string::npos) return 1;
    return 0;
  }();
  return level;
#else
  return 0;
#endif
}

// The ISA the kernels run in: the CPU's, or lower if LIP_CUDA_CPU_ISA asks
// (read at every call, so that tests can switch it).
int isa_to_run() {
  const char* env = std::getenv("LIP_CUDA_CPU_ISA");
  int wanted = 3;
  if (env != nullptr && *env != '\0') {
    std::string value(env);
    for (char& ch : value) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    if (value == "default") {
      wanted = 0;
    } else if (value == "avx2") {
      wanted = 1;
    } else if (value == "avx512") {
      wanted = 2;
    } else if (value == "avx512bf16") {
      wanted = 3;
    } else {
      TORCH_CHECK(false, "lip2d: expected the environment variable LIP_CUDA_CPU_ISA to be "
                  "'default', 'avx2', 'avx512' or 'avx512bf16' (or unset), but it is '", env, "'");
    }
  }
  return std::min(wanted, cpu_isa_level());
}

// The last-level cache's size as Linux reports it (the largest cache level
// of cpu0 in sysfs), else 32 MiB.
int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    int64_t best_level = 0, best_bytes = 32 << 20;
    for (int index = 0; index < 8; ++index) {
      const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
      std::ifstream level_file(dir + "level"), size_file(dir + "size");
      int64_t level = 0, size = 0;
      std::string unit;
      if (!(level_file >> level) || !(size_file >> size)) continue;
      size_file >> unit;  // "32768K" reads as 32768 then "K"
      const int64_t scale = unit == "K" ? 1024 : unit == "M" ? 1024 * 1024 : unit == "G" ? 1024 * 1024 * 1024 : 1;
      if (level > best_level && size > 0) best_level = level, best_bytes = size * scale;
    }
    return best_bytes;
  }();
  return bytes;
}

// Whether a call's kernels stream their outputs past the cache
// (cpu_math::stream_bits). Where the tensors a call reads and writes
// outgrow the last-level cache, its outputs would be evicted before the
// next layer reads them, and streaming saves their read for ownership: at
// batch 8-16, float32 channels_last, forward 3-26% and backward 5-21%
// faster by layer (docs/kernels.md). Not where an output is 32 MiB or
// more: glibc's malloc maps such blocks afresh at every allocation, the
// kernel's page faults leave the zeroed lines in the cache, and streaming
// over cached lines measured slower (the 8 x 64 x 112 x 112 stem: forward
// 1.58 -> 1.78 ms). LIP_CUDA_CPU_STREAM_STORES=1 or 0 forces the choice
// (read at every call, for tests and benchmarks).
bool stream_outputs(std::initializer_list<const at::Tensor*> inputs,
                    std::initializer_list<const at::Tensor*> outputs) {
  if (const char* env = std::getenv("LIP_CUDA_CPU_STREAM_STORES")) {
    const std::string value(env);
    if (value == "1") return true;
    if (value == "0") return false;
    TORCH_CHECK(value.empty(), "lip2d: expected the environment variable LIP_CUDA_CPU_STREAM_STORES to "
                "be '0', '1' or unset, but it is '", env, "'");
  }
  constexpr int64_t kFreshlyMappedBytes = int64_t(32) << 20;  // glibc's largest mmap threshold
  int64_t bytes = 0;
  for (const at::Tensor* t : inputs) bytes += static_cast<int64_t>(t->nbytes());
  for (const at::Tensor* t : outputs) {
    if (static_cast<int64_t>(t->nbytes()) >= kFreshlyMappedBytes) return false;
    bytes += static_cast<int64_t>(t->nbytes());
  }
  return bytes > last_level_cache_bytes();
}

// Whether the SIMD kernels take a geometry. Their scratch per thread grows
// with the rows one window spans times the row width (the weight rings of
// the tile form, 16 lanes wide in channels_last), with the stride (the
// rows layout's phases) and with sH x sW (its backward's phase planes): a
// global window over a 2048 x 2048 plane took gigabytes, and a stride of
// 2^24 failed to allocate. Past these bounds (windows as wide as a large
// plane, strides in the hundreds) the per-output code of the generic CUDA
// kernels runs instead, which keeps no scratch: the same results to
// rounding, in both layouts alike. Every LIP-ResNet layer is far inside.
bool simd_kernels_take(const LipGeometry& g) {
  constexpr int64_t kMaxRingPixels = int64_t(1) << 19;  // 64 MiB of float32 rings, 16 lanes x 2
  constexpr int64_t kMaxPhases = 4096;
  // the rows layout's ring: sW phases of at least 2 x 16 lanes (sW < 2^31, checked)
  const int64_t ring_pixels = std::min(g.kH, g.H) * std::max(g.W, g.sW * 32);
  return ring_pixels <= kMaxRingPixels && g.sH <= kMaxPhases && g.sW <= kMaxPhases &&
         g.sH * g.sW <= kMaxPhases;
}

}  // namespace

const char* lip2d_forward_cpu(const ForwardTensors& t, const CallGeometry& cg) {
  if (t.x.scalar_type() == at::kDouble || !simd_kernels_take(cg.g)) {
    return lip2d_forward_emulated(t, cg, "generic", false);
  }
  const int isa = isa_to_run();
  // the baseline build has no streaming stores (see stream_bits); the
  // setting is checked whatever the build
  const bool stream = stream_outputs({&t.x, &t.logit}, {&t.out, &t.window_max, &t.inv_weight_sum}) && isa > 0;
  switch (isa) {
#if defined(LIP_CPU_AVX512BF16_BUILD)
    case 3:
      return cpu_avx512bf16::forward(t, cg, stream);
#endif
#if defined(LIP_CPU_ISA_BUILDS)
    case 2:
      return cpu_avx512::forward(t, cg, stream);
    case 1:
      return cpu_avx2::forward(t, cg, stream);
#endif
    default:
      return cpu_default::forward(t, cg, stream);
  }
}

const char* lip2d_backward_cpu(const BackwardTensors& t, const CallGeometry& cg) {
  if (t.x.scalar_type() == at::kDouble || !simd_kernels_take(cg.g)) {
    return lip2d_backward_emulated(t, cg, "generic", false);
  }
  const int isa = isa_to_run();
  const bool stream = stream_outputs({&t.grad_out, &t.x, &t.logit, &t.out, &t.window_max, &t.inv_weight_sum},
                                     {&t.grad_x, &t.grad_logit}) &&
                      isa > 0;  // as in lip2d_forward_cpu
  switch (isa) {
#if defined(LIP_CPU_AVX512BF16_BUILD)
    case 3:
      return cpu_avx512bf16::backward(t, cg, stream);
#endif
#if defined(LIP_CPU_ISA_BUILDS)
    case 2:
      return cpu_avx512::backward(t, cg, stream);
    case 1:
      return cpu_avx2::backward(t, cg, stream);
#endif
    default:
      return cpu_default::backward(t, cg, stream);
  }
}

}  // namespace lip_cuda
#endif
