// Contiguous NCHW, "halving": kernel 3, stride 2, padding 1 on planes of
// even height and width under 2 kLanes (LIP-ResNet's pooling at 14 x
// 14 and 28 x 28). Lanes run along one stride phase of a plane laid out
// flat with a row pitch P of kLanes / 2 or kLanes (one spare column at
// least, so that the tap past a row's end reads an exact zero), so that a 7-wide phase
// row shares a vector with the next one; each input row is split into its
// two column phases by lane permutes in registers, and every (input,
// covering output) pair of a phase is a load at a fixed offset. No
// transposes (the blocks kernels' cost) and no per-row bookkeeping (the
// gather backward's).
#pragma once

#include "lip_cpu_tile.h"

namespace lip_cuda {
namespace LIP_CPU_NS {
namespace {

// Planes up to this many rows: a task's scratch (four output arrays of
// (H / 2 + 3) x kLanes floats) stays a few KiB on the stack.
constexpr int64_t kHalvingMaxHeight = 64;
constexpr int64_t kHalvingScratchFloats = (kHalvingMaxHeight / 2 + 3) * kLanes + kLanes;

// Whether the halving kernels take this geometry.
inline bool halving_works(const LipGeometry& g) {
  return kLanes >= 8 && g.kH == 3 && g.kW == 3 && g.sH == 2 && g.sW == 2 && g.pH == 1 && g.pW == 1 &&
         g.H % 2 == 0 && g.W % 2 == 0 && g.OH == g.H / 2 && g.OW == g.W / 2 && g.OW < kLanes &&
         g.H <= kHalvingMaxHeight;
}

// Where the halving backward is the default: in the AVX-512 build, for
// float32 x, and for 16-bit x on planes whose phase rows fill a vector each
// (28 x 28). Measured on the Zen 4 VM (2 threads, inputs out of cache, op
// calls through autograd in one process round by round, backward ms,
// channels_last / halving / blocks): float32 2x512x28x28 0.558 / 0.627 /
// 0.869, 2x512x14x14 0.146 / 0.193 / 0.227, 2x1024x14x14 0.273 / 0.351 /
// 0.382; bfloat16 2x256x28x28 0.221 / 0.296 / 0.338, 2x512x28x28 0.418 /
// 0.563 / 0.684, but 2x512x14x14 0.129 / 0.196 / 0.189 and 2x1024x14x14
// 0.222 / 0.347 / 0.331. The AVX2 build (8 lanes: 14 x 14 planes only) was
// slower than blocks there: float32 2x512x14x14 0.279 against 0.240.
inline bool halving_by_default(const LipGeometry& g, bool float32_x) {
  return LIP_CPU_ISA >= 2 && halving_works(g) && (float32_x || g.OW >= kLanes / 2);
}

inline bool halving_forward_by_default(const LipGeometry& g) {
  return LIP_CPU_ISA >= 2 && halving_works(g);
}

// A plane's flat phase layout: phase row r of phase (ph, pw) holds the
// inputs (2 r + ph, 2 c + pw), c < OW, at r * pitch + c; a vector holds
// `rows` phase rows. Input row pairs: with pitch kLanes / 2 a vector's two
// halves are rows 2 r + ph and 2 r + 2 + ph; with pitch kLanes they are
// the first kLanes columns of row 2 r + ph and the rest.
struct HalvingLayout {
  int64_t H, W, OH, OW, pitch, rows, vectors;
  // the taps of a phase vector read rows + 1 scratch rows: kLanes floats
  // and uniform_tail more (lanes past it set in uniform_tail_lanes)
  int64_t uniform_tail;
  LaneInts uniform_tail_lanes;

  explicit HalvingLayout(const LipGeometry& g)
      : H(g.H), W(g.W), OH(g.OH), OW(g.OW), pitch(g.OW < kLanes / 2 ? kLanes / 2 : kLanes),
        rows(kLanes / pitch), vectors((g.OH + rows - 1) / rows), uniform_tail(pitch),
        uniform_tail_lanes(~cpu_math::lanes_between(0, static_cast<int32_t>(pitch))) {}
  // the scratch rows: the output rows and two of padding past the last
  // vector's
  int64_t scratch_floats() const { return (vectors * rows + 2) * pitch + kLanes; }
  // where the two halves (a, b) of phase vector k of row phase ph lie
  // within the plane (element offset) and how many columns each holds
  void halves(int64_t ph, int64_t k, int64_t& a_at, int64_t& a_count, int64_t& b_at,
              int64_t& b_count) const {
    const int64_t h = 2 * k * rows + ph;
    if (rows == 2) {
      a_at = h * W, a_count = W;
      b_at = (h + 2) * W, b_count = h + 2 < H ? W : 0;
    } else {
      a_at = h * W, a_count = std::min<int64_t>(W, kLanes);
      b_at = h * W + kLanes, b_count = W - a_count;
    }
  }
};

// The lane permutes that split two halves' lanes into column phases (even,
// odd) and merge them back; built once per task (GCC computed such masks
// lane by lane at every use: 8% of the forward's time).
struct PhaseMasks {
  LaneInts even = even_odd_mask(0), odd = even_odd_mask(1);
  LaneInts merge_a = interleave_mask(0), merge_b = interleave_mask(1);

  void split(Lanes a, Lanes b, Lanes& e, Lanes& o) const {
    e = __builtin_shuffle(a, b, even);
    o = __builtin_shuffle(a, b, odd);
  }
  void merge(Lanes e, Lanes o, Lanes& a, Lanes& b) const {
    a = __builtin_shuffle(e, o, merge_a);
    b = __builtin_shuffle(e, o, merge_b);
  }
};

// One phase vector's gradients over its covering outputs: taps at the
// scratch offsets `offsets` (ascending (oh, ow) order), each a load of
// reference, 1 / sum, grad and y. Taps that share the first's reference
// (all of a tile-form strip's) share its exp; a second reference (a strip
// boundary, a window-max fallback) gets one exp for all taps that hold
// it. The terms are grad_weight_tap's in the order of the other layouts:
// bitwise their gradients.
template <bool Uniform, int Taps>
[[gnu::always_inline]] inline void halving_taps(const float* ref, const float* inv, const float* go,
                                                const float* y, const int64_t (&offsets)[Taps], Lanes x,
                                                Lanes l, Lanes& dx, Lanes& dl) {
  dx = splat(0.0f);
  dl = splat(0.0f);
  const Lanes r0 = load_full(ref + offsets[0]);
  const Lanes e0 = Step::tap_weight(l, r0);
  Lanes r_other = r0, e_other = e0;
  LIP_UNROLL
  for (int t = 0; t < Taps; ++t) {
    const int64_t o = offsets[t];
    Lanes e = e0;
    if (!Uniform && t > 0) {
      const Lanes r = load_full(ref + o);
      if (!cpu_math::all_set(r == r0)) {
        // (the lanes where r is r0 get e0's bits again: exp is lane-wise)
        if (!cpu_math::all_set(r == r_other)) {
          r_other = r;
          e_other = Step::tap_weight(l, r);
        }
        e = e_other;
      }
    }
    Step::grad_weight_tap(e, x, load_full(go + o), load_full(y + o), load_full(inv + o), dx, dl);
  }
}

// How many planes ahead a task fetches (float32, 2 threads, inputs out of
// cache, ms, backward: 2 x 512 x 28 x 28 0.86 with no software prefetch,
// 0.65 two planes ahead through a PrefetchQueue, 0.94 with each plane's
// lines fetched in one burst; 14 x 14 planes alike within 5%).
constexpr int64_t kHalvingAheadPlanes = 2;

// Backward on the halving layout. A task is a run of whole planes; each
// plane's four output arrays are copied into a flat scratch with the
// phases' pitch (grad, 1 / sum and y 0 past the row ends and below the
// last row, the reference repeated there, so that a tap that has no output
// adds an exact +0 with a finite weight), then every phase vector gathers
// its taps from it.
template <typename x_t, typename l_t>
void backward_halving(const BackwardTensors& t, const CallGeometry& cg, bool stream) {
  const LipGeometry g = cg.g;
  const LogitStrides ls = cg.ls;
  stream = stream && whole_lines({&t.grad_x, &t.grad_logit}, kLanes);
  const auto [g_ptr, x_ptr, l_ptr, y_ptr, max_ptr, inv_ptr, gx_ptr, gl_ptr] =
      backward_pointers<x_t, l_t>(t);
  const HalvingLayout lay(g);
  TORCH_INTERNAL_ASSERT(halving_works(g) && lay.scratch_floats() <= kHalvingScratchFloats);
  at::parallel_for(0, g.N * g.C, 1, [&](int64_t begin, int64_t end) __attribute__((flatten)) {
    // copies: the compiler reloads what the lambda reaches by reference
    // after every intrinsic store, which may alias anything
    const HalvingLayout L = lay;
    const int64_t C = g.C, plane_in = L.H * L.W, plane_out = L.OH * L.OW;
    const LogitStrides lstr = ls;
    const bool streamed = stream;
    const x_t *gp = g_ptr, *xp = x_ptr, *yp = y_ptr;
    const l_t* lp = l_ptr;
    const float *mp = max_ptr, *ip = inv_ptr;
    x_t* gxp = gx_ptr;
    l_t* glp = gl_ptr;
    const int64_t P = L.pitch;
    alignas(64) float scratch[4][kHalvingScratchFloats];
    float *s_ref = scratch[0], *s_inv = scratch[1], *s_g = scratch[2], *s_y = scratch[3];
    LaneInts clamp;
    for (int l = 0; l < kLanes; ++l) clamp[l] = static_cast<int32_t>(std::min<int64_t>(l, L.OW - 1));
    const PhaseMasks masks;
    const int64_t tap1[1] = {0}, tap2c[2] = {0, 1}, tap2r[2] = {0, P}, tap4[4] = {0, 1, P, P + 1};
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / C, c = plane % C;
      const int64_t o_plane = plane * plane_out;
      // a later plane's inputs, outputs and gradients, a few lines per
      // phase vector: its eight short streams are too many for the hardware
      // prefetchers
      PrefetchQueue next;
      const int64_t ahead = plane + kHalvingAheadPlanes;
      if (ahead < end) {
        const int64_t an = ahead / C, ac = ahead % C, ao = ahead * plane_out;
        next.add(xp + ahead * plane_in, plane_in * int64_t(sizeof(x_t)));
        next.add(lp + an * lstr.n + ac * lstr.c, plane_in * int64_t(sizeof(l_t)));
        next.add(gp + ao, plane_out * int64_t(sizeof(x_t)));
        next.add(yp + ao, plane_out * int64_t(sizeof(x_t)));
        next.add(mp + ao, plane_out * int64_t(sizeof(float)));
        next.add(ip + ao, plane_out * int64_t(sizeof(float)));
        if (!streamed) {
          next.add(gxp + ahead * plane_in, plane_in * int64_t(sizeof(x_t)), true);
          next.add(glp + ahead * plane_in, plane_in * int64_t(sizeof(l_t)), true);
        }
      }
      const int lines_per_vector = static_cast<int>((next.lines_left() + 2 * L.vectors - 1) / (2 * L.vectors));
      Lanes last_ref = splat(0.0f);
      for (int64_t oh = 0; oh < L.OH; ++oh) {
        const int64_t o = o_plane + oh * L.OW;
        last_ref = __builtin_shuffle(load_lanes(mp + o, L.OW), clamp);
        store_full(s_ref + oh * P, last_ref);
        store_full(s_inv + oh * P, load_lanes(ip + o, L.OW));
        store_full(s_g + oh * P, load_lanes(gp + o, L.OW));
        store_full(s_y + oh * P, load_lanes(yp + o, L.OW));
      }
      for (int64_t r = L.OH; r < L.vectors * L.rows + 2; ++r) {
        store_full(s_ref + r * P, last_ref);
        store_full(s_inv + r * P, splat(0.0f));
        store_full(s_g + r * P, splat(0.0f));
        store_full(s_y + r * P, splat(0.0f));
      }
      const x_t* xq = xp + plane * plane_in;
      const l_t* lq = lp + n * lstr.n + c * lstr.c;
      x_t* gxq = gxp + plane * plane_in;
      l_t* glq = glp + plane * plane_in;
      for (int64_t ph = 0; ph < 2; ++ph) {
        for (int64_t k = 0; k < L.vectors; ++k) {
          int64_t a_at, a_count, b_at, b_count;
          L.halves(ph, k, a_at, a_count, b_at, b_count);
          next.step(lines_per_vector);
          Lanes xe, xo, le, lo;
          masks.split(load_lanes(xq + a_at, a_count), load_lanes(xq + b_at, b_count), xe, xo);
          masks.split(load_lanes(lq + a_at, a_count), load_lanes(lq + b_at, b_count), le, lo);
          const int64_t at = k * L.rows * P;
          const float *r = s_ref + at, *iv = s_inv + at, *go = s_g + at, *yo = s_y + at;
          // whether all the taps' references are one (a tile-form strip's):
          // then they all take the first one's exp, with no compare per tap
          const float first_ref = r[0];
          const bool uniform = cpu_math::all_set(load_full(r) == splat(first_ref)) &&
                               cpu_math::all_set((load_lanes(r + kLanes, L.uniform_tail) == splat(first_ref)) |
                                                 L.uniform_tail_lanes);
          Lanes dxe, dle, dxo, dlo;
          const auto phases = [&](auto uniform_tag) {
            constexpr bool U = decltype(uniform_tag)::value;
            if (ph == 0) {
              halving_taps<U>(r, iv, go, yo, tap1, xe, le, dxe, dle);
              halving_taps<U>(r, iv, go, yo, tap2c, xo, lo, dxo, dlo);
            } else {
              halving_taps<U>(r, iv, go, yo, tap2r, xe, le, dxe, dle);
              halving_taps<U>(r, iv, go, yo, tap4, xo, lo, dxo, dlo);
            }
          };
          if (uniform) {
            phases(std::true_type());
          } else {
            phases(std::false_type());
          }
          Lanes a, b;
          masks.merge(dxe, dxo, a, b);
          store_lanes(gxq + a_at, a, a_count, streamed);
          if (b_count > 0) store_lanes(gxq + b_at, b, b_count, streamed);
          masks.merge(dle, dlo, a, b);
          store_lanes(glq + a_at, a, a_count, streamed);
          if (b_count > 0) store_lanes(glq + b_at, b, b_count, streamed);
        }
      }
    }
    if (streamed) cpu_math::stream_fence();
  });
}


// ---- forward ----------------------------------------------------------------
//
// A strip's (kStripRows output rows, as every layout takes them) input rows
// are weighed as they lie in memory (one exp each, relative to the strip's
// max logit) and split into four phase arrays with the phases' pitch,
// each column phase shifted by one place so that its first place is the
// padding column (w = -1: weight 0) and each odd row phase starting at the
// padding row above the plane (h = -1: weight 0) when the strip is the
// first. A vector of outputs (rows of the strip at the pitch) then sums its
// nine taps as loads at fixed offsets, in the row-major order of the other
// layouts; a padding tap adds an exact +0 (a weight sum is never -0), so y
// and the statistics are bitwise theirs.

// The lane permutes that split a row of weights into its column phases,
// shifted by one place (place 0 reads lane `zero`, which holds 0): with
// pitch kLanes / 2 one vector [even | odd] of one row, else the even and
// the odd phases of a row's two halves.
inline LaneInts shifted_phase_mask(int odd, int64_t pitch, int zero) {
  LaneInts mask;
  for (int l = 0; l < kLanes; ++l) {
    const int place = static_cast<int>(l % pitch);
    const int phase = pitch == kLanes ? odd : static_cast<int>(l / pitch);
    mask[l] = place == 0 ? zero : 2 * (place - 1) + phase;
  }
  return mask;
}

// The upper half of a vector in its lower half (the second output row of a
// vector with pitch kLanes / 2).
inline LaneInts upper_half_mask() {
  LaneInts mask;
  for (int l = 0; l < kLanes; ++l) mask[l] = (l + kLanes / 2) % kLanes;
  return mask;
}

// floats of one phase array: a strip's phase rows (kStripRows + 1) and one
// more for the last vector's reads past them
constexpr int64_t kHalvingPhaseFloats = (kStripRows + 3) * kLanes;

template <typename x_t, typename l_t>
void forward_halving(const ForwardTensors& t, const CallGeometry& cg, bool stream) {
  const LipGeometry g = cg.g;
  const LogitStrides ls = cg.ls;
  // (its output rows are a quarter of its input rows: plain stores)
  (void)stream;
  const auto [x_ptr, l_ptr, out_ptr, max_ptr, inv_ptr] = forward_pointers<x_t, l_t>(t);
  const HalvingLayout lay(g);
  TORCH_INTERNAL_ASSERT(halving_works(g));
  at::parallel_for(0, g.N * g.C, 1, [&](int64_t begin, int64_t end) __attribute__((flatten)) {
    // copies, as in backward_halving
    const HalvingLayout L = lay;
    const LipGeometry G = g;
    const int64_t C = G.C, plane_in = L.H * L.W, plane_out = L.OH * L.OW;
    const LogitStrides lstr = ls;
    const x_t* xp = x_ptr;
    const l_t* lp = l_ptr;
    x_t* yp = out_ptr;
    float *mp = max_ptr, *ip = inv_ptr;
    const int64_t P = L.pitch;
    const float inf = std::numeric_limits<float>::infinity();
    // [row phase][column phase]: weights and weighted terms
    alignas(64) float e_phase[2][2][kHalvingPhaseFloats], ex_phase[2][2][kHalvingPhaseFloats];
    std::memset(e_phase, 0, sizeof(e_phase));
    std::memset(ex_phase, 0, sizeof(ex_phase));
    const int zero_lane = P == kLanes ? 2 * kLanes - 1 : kLanes - 1;
    const LaneInts split_even = shifted_phase_mask(0, P, zero_lane);
    const LaneInts split_odd = shifted_phase_mask(1, P, zero_lane);
    const LaneInts upper = upper_half_mask();
    const LaneInts a_lanes = cpu_math::lanes_between(0, static_cast<int32_t>(std::min<int64_t>(L.W, kLanes)));
    const LaneInts b_lanes = cpu_math::lanes_between(0, static_cast<int32_t>(std::max<int64_t>(0, L.W - kLanes)));
    const int64_t a_count = std::min<int64_t>(L.W, kLanes), b_count = L.W - a_count;
    // the lanes that are outputs (ow < OW) of a vector's first row, or of both
    LaneInts out_lanes[2];
    for (int l = 0; l < kLanes; ++l) {
      out_lanes[0][l] = l < P && l % P < L.OW ? -1 : 0;
      out_lanes[1][l] = l % P < L.OW ? -1 : 0;
    }
    // lane rotations by kLanes / 2, kLanes / 4, ..., 1
    constexpr int kRotations = __builtin_ctz(kLanes);
    LaneInts rotate[kRotations];
    for (int i = 0; i < kRotations; ++i) {
      for (int l = 0; l < kLanes; ++l) rotate[i][l] = (l + (kLanes >> (i + 1))) % kLanes;
    }
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / C, c = plane % C;
      const x_t* xq = xp + plane * plane_in;
      const l_t* lq = lp + n * lstr.n + c * lstr.c;
      const int64_t o_plane = plane * plane_out;
      for (int64_t s = 0; s < strip_count(G); ++s) {
        const Strip st = strip_at(G, s);
        // the strip's max logit: its input rows are one run of memory
        Lanes m = splat(-inf);
        {
          const l_t* run = lq + st.h0 * L.W;
          const int64_t count = (st.h1 - st.h0) * L.W;
          int64_t i = 0;
          for (; i + kLanes <= count; i += kLanes) Step::max_tap(m, load_full(run + i));
          if (i < count) {
            const LaneInts tail = cpu_math::lanes_between(0, static_cast<int32_t>(count - i));
            Step::max_tap(m, cpu_math::select(tail, load_lanes(run + i, count - i), splat(-inf)));
          }
        }
        // all lanes to the max of all (max is exact: any order gives it)
        for (int i = 0; i < kRotations; ++i) Step::max_tap(m, __builtin_shuffle(m, rotate[i]));
        const Lanes reference = Step::reference_max(m);
        // odd phase row r holds input row 2 (oh0 + r) - 1, even row r input
        // row 2 (oh0 + r); the padding row above the plane weighs 0
        if (st.oh0 == 0) {
          for (int pw = 0; pw < 2; ++pw) {
            store_full(&e_phase[1][pw][0], splat(0.0f));
            store_full(&ex_phase[1][pw][0], splat(0.0f));
          }
        }
        for (int64_t h = st.h0; h < st.h1; ++h) {
          const int64_t ph = h & 1, r = (h + ph) / 2 - st.oh0;
          const Lanes la = cpu_math::select(a_lanes, load_lanes(lq + h * L.W, a_count), splat(-inf));
          const Lanes xa = load_lanes(xq + h * L.W, a_count);
          Lanes ea, exa;
          Step::tile_weight(la, xa, reference, ea, exa);
          if (P == kLanes) {
            const Lanes lb = cpu_math::select(b_lanes, load_lanes(lq + h * L.W + kLanes, b_count), splat(-inf));
            const Lanes xb = load_lanes(xq + h * L.W + kLanes, b_count);
            Lanes eb, exb;
            Step::tile_weight(lb, xb, reference, eb, exb);
            store_full(&e_phase[ph][0][r * P], __builtin_shuffle(ea, eb, split_even));
            store_full(&e_phase[ph][1][r * P], __builtin_shuffle(ea, eb, split_odd));
            store_full(&ex_phase[ph][0][r * P], __builtin_shuffle(exa, exb, split_even));
            store_full(&ex_phase[ph][1][r * P], __builtin_shuffle(exa, exb, split_odd));
          } else {
            // [even | odd] in one vector; each half to its phase row
            const Lanes e2 = __builtin_shuffle(ea, split_even), ex2 = __builtin_shuffle(exa, split_even);
            store_lanes(&e_phase[ph][0][r * P], e2, P);
            store_lanes(&e_phase[ph][1][r * P], __builtin_shuffle(e2, upper), P);
            store_lanes(&ex_phase[ph][0][r * P], ex2, P);
            store_lanes(&ex_phase[ph][1][r * P], __builtin_shuffle(ex2, upper), P);
          }
        }
        // output vectors: rows oh0 + v rows .. of the strip
        for (int64_t v = 0; v * L.rows < st.oh1 - st.oh0; ++v) {
          const int64_t at = v * L.rows * P;
          Lanes sum = splat(0.0f), weighted = splat(0.0f);
          const auto tap = [&](int rph, int64_t dr, int cph, int64_t dc) __attribute__((always_inline)) {
            const int64_t o = at + dr * P + dc;
            Step::add_weight(load_full(&e_phase[rph][cph][o]), load_full(&ex_phase[rph][cph][o]), sum,
                             weighted);
          };
          // kh 0: the odd row above; kh 1: the even row; kh 2: the odd row
          // below. kw alike over the column phases (shifted by one place).
          tap(1, 0, 1, 0), tap(1, 0, 0, 1), tap(1, 0, 1, 1);
          tap(0, 0, 1, 0), tap(0, 0, 0, 1), tap(0, 0, 1, 1);
          tap(1, 1, 1, 0), tap(1, 1, 0, 1), tap(1, 1, 1, 1);
          Lanes y, inv, ref = reference;
          Step::finish(sum, weighted, y, inv);
          const int64_t oh = st.oh0 + v * L.rows;
          const int64_t out_rows = std::min<int64_t>(L.rows, st.oh1 - oh);
          const LaneInts valid = out_lanes[out_rows - 1];
          const Lanes key = cpu_math::select(valid, Step::fallback_key(sum, weighted), splat(1.0f));
          if (Step::needs_window_max(key)) {
            // the windows far below the strip's max, each from its own max,
            // with every lane of a vector on the one window (the other
            // layouts' arithmetic, lane by lane): rare
            float keys[kLanes], ys[kLanes], refs[kLanes], invs[kLanes];
            store(keys, key), store(ys, y), store(refs, ref), store(invs, inv);
            for (int l = 0; l < kLanes; ++l) {
              if (!(keys[l] < kTileMinWeightSum)) continue;
              const int64_t woh = oh + l / P, wow = l % P;
              int64_t h0, h1, w0, w1;
              window_range<int64_t>(woh, 3, 2, 1, L.H, h0, h1);
              window_range<int64_t>(wow, 3, 2, 1, L.W, w0, w1);
              Lanes y_w, m_w, inv_w;
              window_softmax(
                  h0, h1, w0, w1, [&](int64_t h, int64_t w) { return splat(static_cast<float>(lq[h * L.W + w])); },
                  [&](int64_t h, int64_t w) { return splat(static_cast<float>(xq[h * L.W + w])); }, y_w, m_w,
                  inv_w);
              ys[l] = y_w[0], refs[l] = m_w[0], invs[l] = inv_w[0];
            }
            y = load(ys), ref = load(refs), inv = load(invs);
          }
          const int64_t o = o_plane + oh * L.OW;
          store_lanes(yp + o, y, L.OW, false);
          store_lanes(mp + o, ref, L.OW, false);
          store_lanes(ip + o, inv, L.OW, false);
          if (out_rows == 2) {
            store_lanes(yp + o + L.OW, __builtin_shuffle(y, upper), L.OW, false);
            store_lanes(mp + o + L.OW, __builtin_shuffle(ref, upper), L.OW, false);
            store_lanes(ip + o + L.OW, __builtin_shuffle(inv, upper), L.OW, false);
          }
        }
      }
    }
  });
}

}  // namespace
}  // namespace LIP_CPU_NS
}  // namespace lip_cuda
