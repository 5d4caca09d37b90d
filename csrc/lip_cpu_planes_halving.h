// Contiguous NCHW, "halving": kernel 3, stride 2, padding 1 on planes of
// even height and width (LIP-ResNet's pooling), up to kHalvingMaxWidth
// wide. Lanes run along one stride phase of a plane laid out flat with a
// row pitch P: kLanes / 2 where a phase row fits (two 7-wide phase rows a
// vector at 14 x 14), else a multiple of kLanes, with one spare column at
// least, so that the tap past a row's end reads an exact zero. Each input
// row is split into its two column phases by lane permutes in registers,
// and every (input, covering output) pair of a phase is a load at a fixed
// offset, or with pitch kLanes / 2 a lane shift in registers (a vector
// holds two output rows: no scratch at all). No transposes (the blocks
// kernels' cost) and no per-row bookkeeping (the gather backward's).
#pragma once

#include "lip_cpu_tile.h"

namespace lip_cuda {
namespace LIP_CPU_NS {
namespace {

// The planes it takes, at most: a task's scratch (the backward's four
// output arrays of (H / 2 + 3) x P floats) stays within 72 KiB.
constexpr int64_t kHalvingMaxHeight = 128;
constexpr int64_t kHalvingMaxPitch = 4 * kLanes;
constexpr int64_t kHalvingMaxWidth = 2 * (kHalvingMaxPitch - 1);

inline int64_t halving_pitch(int64_t OW) {
  return OW < kLanes / 2 ? kLanes / 2 : (OW + kLanes) / kLanes * kLanes;
}

// Whether the halving kernels take this geometry.
inline bool halving_works(const LipGeometry& g) {
  return kLanes >= 8 && g.kH == 3 && g.kW == 3 && g.sH == 2 && g.sW == 2 && g.pH == 1 && g.pW == 1 &&
         g.H % 2 == 0 && g.W % 2 == 0 && g.OH == g.H / 2 && g.OW == g.W / 2 && g.W <= kHalvingMaxWidth &&
         g.H <= kHalvingMaxHeight;
}

// Where the halving kernels are the default, both directions: in the
// AVX-512 build, on planes up to 64 wide; for float32 x, and for 16-bit x
// where the phase rows fill a vector (28 wide and more). Measured on the
// Zen 4 VM (2 threads, inputs out of cache, calls through autograd in one
// process round by round, batch 2, ms, channels_last / halving / the
// kernel otherwise taken):
//   float32 backward: 512x14x14 0.146 / 0.193 / 0.227, 1024x14x14 0.273 /
//   0.351 / 0.382, 512x28x28 0.558 / 0.627 / 0.869, 128x56x56 0.476 /
//   0.673 / 0.749 (gather), 256x56x56 1.169 / 1.306 / 1.436 (gather);
//   float32 forward: 512x14x14 0.129 / 0.154 / 0.189, 1024x14x14 0.211 /
//   0.235 / 0.301, 512x28x28 0.378 / 0.362 / 0.477, 128x56x56 0.400 /
//   0.366 / 0.485, 256x56x56 0.757 / 0.699 / 0.949;
//   bfloat16: forward 128x56x56 0.301 / 0.333 / 0.392; backward 128x56x56
//   0.431 / 0.607 / 0.760, 256x28x28 0.221 / 0.296 / 0.338.
// At 14 x 14 with 16-bit x blocks stays the default: the backward was
// even with it (512x14x14 0.212 against 0.204 through the phase scratch,
// 0.194 against 0.196 with two output rows a vector in registers), and the
// forward with two rows a vector was 6-13% slower than blocks in 6 of 7
// alternating runs, 3% faster in the other (512x14x14 0.164 against
// 0.150, 1024x14x14 0.245 against 0.216). At 64x112x112 float32 both directions were slower than
// the kernels otherwise taken (forward 1.025 against 0.983, backward 1.716
// against 1.416), so wider planes keep them. The AVX2 build (8 lanes) was
// slower than blocks at 14 x 14 (float32 backward 0.279 against 0.240,
// bfloat16 forward 0.307 against 0.168) and keeps them too.
constexpr int64_t kHalvingDefaultMaxWidth = 64;

inline bool halving_by_default(const LipGeometry& g, bool float32_x) {
  return LIP_CPU_ISA >= 2 && halving_works(g) && g.W <= kHalvingDefaultMaxWidth &&
         (float32_x || g.OW >= kLanes / 2);
}

// A plane's flat phase layout: phase row r of phase (ph, pw) holds the
// inputs (2 r + ph, 2 c + pw), c < OW, at r * pitch + c, and lane vector
// k of a phase the flat places [k kLanes, (k + 1) kLanes). Each vector's
// lanes come from two input vectors (a, b): with pitch kLanes / 2, rows
// 2 r + ph and 2 r + 2 + ph; else 2 kLanes consecutive columns of row
// 2 r + ph.
struct HalvingLayout {
  int64_t H, W, OH, OW, pitch, vectors;

  explicit HalvingLayout(const LipGeometry& g)
      : H(g.H), W(g.W), OH(g.OH), OW(g.OW), pitch(halving_pitch(g.OW)),
        vectors((g.OH * pitch + kLanes - 1) / kLanes) {}
  // vectors a phase row (1 with pitch kLanes / 2: it shares one)
  int64_t row_vectors() const { return std::max<int64_t>(1, pitch / kLanes); }
  // the scratch rows that vectors' taps read: the output rows and the
  // padding below them
  int64_t scratch_rows() const { return (vectors * kLanes + pitch - 1) / pitch + 2; }
  int64_t scratch_floats() const { return scratch_rows() * pitch + kLanes; }
  // where the two inputs (a, b) of phase vector k of row phase ph lie
  // within the plane (element offset) and how many columns each holds
  void halves(int64_t ph, int64_t k, int64_t& a_at, int64_t& a_count, int64_t& b_at,
              int64_t& b_count) const {
    if (pitch < kLanes) {
      const int64_t h = 4 * k + ph;
      a_at = h * W, a_count = W;
      b_at = (h + 2) * W, b_count = h + 2 < H ? W : 0;
    } else {
      const int64_t r = k / row_vectors(), col = 2 * (k % row_vectors()) * kLanes;
      a_at = (2 * r + ph) * W + col, a_count = std::clamp<int64_t>(W - col, 0, kLanes);
      b_at = a_at + kLanes, b_count = std::clamp<int64_t>(W - col - kLanes, 0, kLanes);
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

// One covering output's tap, as a phase vector sees it: the output's
// reference, 1 / sum, grad and y in the vector's lanes.
struct OutputTap {
  Lanes ref, inv, grad, y;
};

// One phase vector's gradients over its covering outputs: tap_at(t) gives
// tap t (ascending (oh, ow) order). Taps that share the first's reference
// (all of a tile-form strip's) share its exp; a second reference (a strip
// boundary, a window-max fallback) gets one exp for all taps that hold it.
// The terms are grad_weight_tap's in the order of the other layouts:
// bitwise their gradients.
template <bool Uniform, int Taps, typename TapAt>
[[gnu::always_inline]] inline void halving_taps(const TapAt& tap_at, Lanes x, Lanes l, Lanes& dx, Lanes& dl) {
  dx = splat(0.0f);
  dl = splat(0.0f);
  const Lanes r0 = tap_at(0).ref;
  const Lanes e0 = Step::tap_weight(l, r0);
  Lanes r_other = r0, e_other = e0;
  LIP_UNROLL
  for (int t = 0; t < Taps; ++t) {
    const OutputTap o = tap_at(t);
    Lanes e = e0;
    if (!Uniform && t > 0) {
      if (!cpu_math::all_set(o.ref == r0)) {
        // (the lanes where ref is r0 get e0's bits again: exp is lane-wise)
        if (!cpu_math::all_set(o.ref == r_other)) {
          r_other = o.ref;
          e_other = Step::tap_weight(l, o.ref);
        }
        e = e_other;
      }
    }
    Step::grad_weight_tap(e, x, o.grad, o.y, o.inv, dx, dl);
  }
}

// The taps at scratch offsets `offsets` of flat output arrays.
template <int Taps>
struct ScratchTaps {
  static constexpr int kTaps = Taps;
  const float *ref, *inv, *grad, *y;
  const int64_t (&offsets)[Taps];
  [[gnu::always_inline]] OutputTap operator()(int t) const {
    const int64_t o = offsets[t];
    return {load_full(ref + o), load_full(inv + o), load_full(grad + o), load_full(y + o)};
  }
};

// The taps of a vector holding two output rows (pitch kLanes / 2) at
// offsets 0, 1, P and P + 1: lane shifts of its pair and the next,
// computed once for the pair's four phase vectors.
template <int Taps>
struct PairTaps {
  static constexpr int kTaps = Taps;
  const OutputTap* shifted;  // [0]: the pair itself; [1], [2], [3]: by 1, P, P + 1
  const int (&which)[Taps];
  [[gnu::always_inline]] OutputTap operator()(int t) const { return shifted[which[t]]; }
};

// How many planes ahead a task fetches (float32, 2 threads, inputs out of
// cache, ms, backward: 2 x 512 x 28 x 28 0.86 with no software prefetch,
// 0.65 two planes ahead through a PrefetchQueue, 0.94 with each plane's
// lines fetched in one burst). Planes with two output rows a vector fetch
// nothing: their whole plane is a few lines per stream, which the hardware
// prefetchers follow (2 x 512 x 14 x 14: 0.222 ms with the queue, 0.183
// without; 2 x 1024 x 14 x 14: 0.405 and 0.325).
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
  TORCH_INTERNAL_ASSERT(halving_works(g));
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
    const int64_t P = L.pitch, RV = L.row_vectors(), floats = L.scratch_floats();
    // (two output rows a vector need none: they shift in registers)
    std::unique_ptr<Lanes[]> buffer(P < kLanes ? nullptr : new Lanes[(4 * floats + kLanes - 1) / kLanes]);
    float* const s_ref = reinterpret_cast<float*>(buffer.get());
    float *const s_inv = s_ref + floats, *const s_g = s_inv + floats, *const s_y = s_g + floats;
    // per vector j of an output row: its lanes' columns clamped to the
    // row's last (the reference is repeated past the row's end)
    LaneInts clamp[kHalvingMaxPitch / kLanes];
    for (int64_t j = 0; j < RV; ++j) {
      for (int l = 0; l < kLanes; ++l) {
        clamp[j][l] = static_cast<int32_t>(std::clamp<int64_t>(L.OW - 1 - j * kLanes, 0, l));
      }
    }
    const PhaseMasks masks;
    const int tap_p1[1] = {0}, tap_p2c[2] = {0, 1}, tap_p2r[2] = {0, 2}, tap_p4[4] = {0, 1, 2, 3};
    const int64_t tap1[1] = {0}, tap2c[2] = {0, 1}, tap2r[2] = {0, P}, tap4[4] = {0, 1, P, P + 1};
    // pitch kLanes / 2: lane maps from two output rows as they lie (OW
    // each, one run of memory) to the pitch. The reference repeats the
    // row's last column past its end; the others read lane kLanes - 1 there,
    // which is 0 (at most 2 OW < kLanes lanes are loaded). And the shifts
    // of a pair and the next by 1, P and P + 1 places.
    LaneInts ref_two, ref_one, zero_two, zero_one, shift[3];
    for (int l = 0; l < kLanes; ++l) {
      const int32_t half = kLanes / 2, row = l / half, col = l % half;
      const int32_t ow = static_cast<int32_t>(std::min<int64_t>(L.OW, half));
      ref_two[l] = row * ow + std::min(col, ow - 1);
      ref_one[l] = std::min(col, ow - 1);
      zero_two[l] = col < ow ? row * ow + col : kLanes - 1;
      zero_one[l] = row == 0 && col < ow ? col : kLanes - 1;
      shift[0][l] = l + 1, shift[1][l] = l + half, shift[2][l] = l + half + 1;
    }
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / C, c = plane % C;
      const int64_t o_plane = plane * plane_out;
      // a later plane's inputs, outputs and gradients, a few lines per
      // phase vector: its eight short streams are too many for the hardware
      // prefetchers
      PrefetchQueue next;
      const int64_t ahead = plane + kHalvingAheadPlanes;
      if (P >= kLanes && ahead < end) {
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
      const x_t* xq = xp + plane * plane_in;
      const l_t* lq = lp + n * lstr.n + c * lstr.c;
      x_t* gxq = gxp + plane * plane_in;
      l_t* glq = glp + plane * plane_in;
      // Phase vector k of row phase ph, split into even and odd columns:
      // their gradients over the taps of even_taps and odd_taps (accessors
      // as halving_taps takes them), merged back into rows and stored.
      const auto phase_gradients = [&](int64_t ph, int64_t k, bool uniform, const auto& even_taps,
                                       const auto& odd_taps) __attribute__((always_inline)) {
        int64_t a_at, a_count, b_at, b_count;
        L.halves(ph, k, a_at, a_count, b_at, b_count);
        next.step(lines_per_vector);  // (nothing queued with two output rows a vector)
        Lanes xe, xo, le, lo;
        masks.split(load_lanes(xq + a_at, a_count), load_lanes(xq + b_at, b_count), xe, xo);
        masks.split(load_lanes(lq + a_at, a_count), load_lanes(lq + b_at, b_count), le, lo);
        constexpr int kEven = std::decay_t<decltype(even_taps)>::kTaps;
        constexpr int kOdd = std::decay_t<decltype(odd_taps)>::kTaps;
        Lanes dxe, dle, dxo, dlo;
        if (uniform) {
          halving_taps<true, kEven>(even_taps, xe, le, dxe, dle);
          halving_taps<true, kOdd>(odd_taps, xo, lo, dxo, dlo);
        } else {
          halving_taps<false, kEven>(even_taps, xe, le, dxe, dle);
          halving_taps<false, kOdd>(odd_taps, xo, lo, dxo, dlo);
        }
        Lanes a, b;
        masks.merge(dxe, dxo, a, b);
        store_lanes(gxq + a_at, a, a_count, streamed);
        if (b_count > 0) store_lanes(gxq + b_at, b, b_count, streamed);
        masks.merge(dle, dlo, a, b);
        store_lanes(glq + a_at, a, a_count, streamed);
        if (b_count > 0) store_lanes(glq + b_at, b, b_count, streamed);
      };
      if (P < kLanes) {
        // two output rows a vector: no scratch. A pair is loaded as it lies
        // and spread to the pitch; the taps at 1, P and P + 1 are lane
        // shifts of it and the next pair. The same lanes as the scratch
        // below holds (rows past the last repeat its reference).
        const auto pair = [&](int64_t r0) __attribute__((always_inline)) {
          OutputTap v;
          const int64_t base = std::min(r0, L.OH - 1);
          const bool both = r0 + 1 < L.OH;
          const int64_t o = o_plane + base * L.OW, count = (both ? 2 : 1) * L.OW;
          v.ref = __builtin_shuffle(load_lanes(mp + o, count), both ? ref_two : ref_one);
          if (r0 < L.OH) {
            const LaneInts z = both ? zero_two : zero_one;
            v.inv = __builtin_shuffle(load_lanes(ip + o, count), z);
            v.grad = __builtin_shuffle(load_lanes(gp + o, count), z);
            v.y = __builtin_shuffle(load_lanes(yp + o, count), z);
          } else {
            v.inv = v.grad = v.y = splat(0.0f);
          }
          return v;
        };
        OutputTap following = pair(0);
        for (int64_t k = 0; k < L.vectors; ++k) {
          OutputTap taps[4];
          taps[0] = following;
          following = pair(2 * k + 2);
          for (int i = 0; i < 3; ++i) {
            taps[i + 1] = {__builtin_shuffle(taps[0].ref, following.ref, shift[i]),
                           __builtin_shuffle(taps[0].inv, following.inv, shift[i]),
                           __builtin_shuffle(taps[0].grad, following.grad, shift[i]),
                           __builtin_shuffle(taps[0].y, following.y, shift[i])};
          }
          const Lanes first_ref = __builtin_shuffle(taps[0].ref, LaneInts{});
          const bool uniform = cpu_math::all_set((taps[0].ref == first_ref) & (taps[1].ref == first_ref) &
                                                 (taps[2].ref == first_ref) & (taps[3].ref == first_ref));
          phase_gradients(0, k, uniform, PairTaps<1>{taps, tap_p1}, PairTaps<2>{taps, tap_p2c});
          phase_gradients(1, k, uniform, PairTaps<2>{taps, tap_p2r}, PairTaps<4>{taps, tap_p4});
        }
        continue;
      }
      Lanes last_ref[kHalvingMaxPitch / kLanes];
      for (int64_t oh = 0; oh < L.OH; ++oh) {
        const int64_t o = o_plane + oh * L.OW;
        for (int64_t j = 0; j < RV; ++j) {
          const int64_t col = j * kLanes, count = std::clamp<int64_t>(L.OW - col, 0, kLanes);
          const int64_t at = oh * P + col;
          last_ref[j] = count > 0 ? __builtin_shuffle(load_lanes(mp + o + col, count), clamp[j])
                                  : splat(mp[o + L.OW - 1]);
          store_full(s_ref + at, last_ref[j]);
          store_full(s_inv + at, load_lanes(ip + o + col, count));
          store_full(s_g + at, load_lanes(gp + o + col, count));
          store_full(s_y + at, load_lanes(yp + o + col, count));
        }
      }
      for (int64_t r = L.OH; r < L.scratch_rows(); ++r) {
        for (int64_t j = 0; j < RV; ++j) {
          const int64_t at = r * P + j * kLanes;
          store_full(s_ref + at, last_ref[j]);
          store_full(s_inv + at, splat(0.0f));
          store_full(s_g + at, splat(0.0f));
          store_full(s_y + at, splat(0.0f));
        }
      }
      for (int64_t ph = 0; ph < 2; ++ph) {
        for (int64_t k = 0; k < L.vectors; ++k) {
          const int64_t at = k * kLanes;
          const float *r = s_ref + at, *iv = s_inv + at, *go = s_g + at, *yo = s_y + at;
          // whether all the taps' references are one (a tile-form strip's):
          // then they all take the first one's exp, with no compare per tap
          const Lanes first_ref = splat(r[0]);
          const bool uniform = cpu_math::all_set((load_full(r) == first_ref) & (load_full(r + 1) == first_ref) &
                                                 (load_full(r + P) == first_ref) &
                                                 (load_full(r + P + 1) == first_ref));
          if (ph == 0) {
            phase_gradients(0, k, uniform, ScratchTaps<1>{r, iv, go, yo, tap1}, ScratchTaps<2>{r, iv, go, yo, tap2c});
          } else {
            phase_gradients(1, k, uniform, ScratchTaps<2>{r, iv, go, yo, tap2r}, ScratchTaps<4>{r, iv, go, yo, tap4});
          }
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
// max logit) and split into four phase arrays with the backward's layout;
// the odd row phase starts at the padding row above the plane (h = -1:
// weight 0) when the strip is the first, and the tap left of a row's first
// column reads the spare place that ends the row above (or the zeros
// before the array): weight 0. A vector of outputs (the strip's, flat at
// the pitch) then sums its nine taps as loads at fixed offsets, in the
// row-major order of the other layouts; a padding tap adds an exact +0 (a
// weight sum is never -0), so y and the statistics are bitwise theirs.
// With pitch kLanes / 2 the same taps come from registers: a vector's five
// input rows are weighed there, and each pair of them (rows h - 1 and
// h + 1, h and h + 2, h + 1 and h + 3) gives a tap row's three column taps
// by one two-source lane permute each (2 x 512 x 14 x 14, float32, 2
// threads, out of cache: 0.129 ms against 0.143 through the phase arrays;
// 2 x 1024 x 14 x 14: 0.235 against 0.271).

// The upper half of a vector in its lower half (the second output row of a
// vector with pitch kLanes / 2).
inline LaneInts upper_half_mask() {
  LaneInts mask;
  for (int l = 0; l < kLanes; ++l) mask[l] = (l + kLanes / 2) % kLanes;
  return mask;
}

// floats of one phase array: zeros before it (the tap left of its first
// place), a strip's phase rows (kStripRows + 1) and one more for the last
// vector's reads past them
constexpr int64_t kHalvingLead = kLanes;
// (with pitch kLanes / 2 a vector's two output rows lie in one strip)
static_assert(kStripRows % 2 == 0, "strips of whole output row pairs");
constexpr int64_t kHalvingPhaseFloats = kHalvingLead + (kStripRows + 2) * kHalvingMaxPitch + kLanes;

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
    const int64_t P = L.pitch, RV = L.row_vectors();
    const float inf = std::numeric_limits<float>::infinity();
    // [row phase][column phase]: weights and weighted terms
    // (unused with pitch kLanes / 2, which weighs its rows in registers)
    const bool paired = P < kLanes;
    alignas(64) float e_phase[2][2][kHalvingPhaseFloats], ex_phase[2][2][kHalvingPhaseFloats];
    if (!paired) {
      std::memset(e_phase, 0, sizeof(e_phase));
      std::memset(ex_phase, 0, sizeof(ex_phase));
    }
    const PhaseMasks masks;
    const LaneInts upper = upper_half_mask();
    // per input vector i of a row: its lanes inside the row, and their count
    LaneInts in_lanes[2 * kHalvingMaxPitch / kLanes];
    int64_t in_count[2 * kHalvingMaxPitch / kLanes];
    for (int64_t i = 0; i < 2 * RV; ++i) {
      in_count[i] = std::clamp<int64_t>(L.W - i * kLanes, 0, kLanes);
      in_lanes[i] = cpu_math::lanes_between(0, static_cast<int32_t>(in_count[i]));
    }
    // the lanes that are outputs (ow < OW): with pitch kLanes / 2 of a
    // vector's first row or of both; else of output vector j of a row
    LaneInts out_lanes[kHalvingMaxPitch / kLanes + 1];
    if (P < kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        out_lanes[0][l] = l < P && l < L.OW ? -1 : 0;
        out_lanes[1][l] = l % P < L.OW ? -1 : 0;
      }
    } else {
      for (int64_t j = 0; j < RV; ++j) {
        out_lanes[j] = cpu_math::lanes_between(0, static_cast<int32_t>(std::clamp<int64_t>(L.OW - j * kLanes, 0, kLanes)));
      }
    }
    // lane rotations by kLanes / 2, kLanes / 4, ..., 1
    constexpr int kRotations = __builtin_ctz(kLanes);
    LaneInts rotate[kRotations];
    for (int i = 0; i < kRotations; ++i) {
      for (int l = 0; l < kLanes; ++l) rotate[i][l] = (l + (kLanes >> (i + 1))) % kLanes;
    }
    const auto phase = [&](float (&a)[2][2][kHalvingPhaseFloats], int rph, int cph) {
      return &a[rph][cph][kHalvingLead];
    };
    // pitch kLanes / 2: the lanes of two input rows (a, b) that a vector of
    // outputs takes as its left, middle and right column taps; the left
    // tap of column 0 reads lane kLanes - 1 of its row, which holds 0
    LaneInts column_tap[3];
    for (int l = 0; l < kLanes; ++l) {
      const int32_t half = kLanes / 2, row = (l / half) * kLanes, col = l % half;
      column_tap[0][l] = row + (col == 0 ? kLanes - 1 : 2 * col - 1);
      column_tap[1][l] = row + 2 * col;
      column_tap[2][l] = row + 2 * col + 1;
    }
    // input vector i of row h: its weights and weighted terms against the
    // strip's reference, 0 past the row's end (logit -inf there)
    const auto weigh = [&](const x_t* xq, const l_t* lq, Lanes reference, int64_t h, int64_t i, Lanes& e,
                           Lanes& ex) __attribute__((always_inline)) {
      const int64_t at = h * L.W + i * kLanes;
      const Lanes l = cpu_math::select(in_lanes[i], load_lanes(lq + at, in_count[i]), splat(-inf));
      Step::tile_weight(l, load_lanes(xq + at, in_count[i]), reference, e, ex);
    };
    // a whole row (pitch kLanes / 2: one vector), 0 outside the strip's
    // input rows
    const auto weigh_row = [&](const x_t* xq, const l_t* lq, const Strip& st, Lanes reference, int64_t h, Lanes& e,
                               Lanes& ex) __attribute__((always_inline)) {
      if (h < st.h0 || h >= st.h1) {
        e = ex = splat(0.0f);
      } else {
        weigh(xq, lq, reference, h, 0, e, ex);
      }
    };
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
        // (pitch kLanes / 2 weighs its rows in registers, below)
        if (!paired) {
          // odd phase row r holds input row 2 (oh0 + r) - 1, even row r
          // input row 2 (oh0 + r); the padding row above the plane weighs 0
          if (st.oh0 == 0) {
            for (int pw = 0; pw < 2; ++pw) {
              for (int64_t j = 0; j < RV; ++j) {
                store_full(phase(e_phase, 1, pw) + j * kLanes, splat(0.0f));
                store_full(phase(ex_phase, 1, pw) + j * kLanes, splat(0.0f));
              }
            }
          }
          for (int64_t h = st.h0; h < st.h1; ++h) {
            const int64_t ph = h & 1, r = (h + ph) / 2 - st.oh0;
            for (int64_t j = 0; j < RV; ++j) {
              Lanes ea, exa, eb, exb, even, odd;
              weigh(xq, lq, reference, h, 2 * j, ea, exa);
              weigh(xq, lq, reference, h, 2 * j + 1, eb, exb);
              const int64_t at = r * P + j * kLanes;
              masks.split(ea, eb, even, odd);
              store_full(phase(e_phase, ph, 0) + at, even);
              store_full(phase(e_phase, ph, 1) + at, odd);
              masks.split(exa, exb, even, odd);
              store_full(phase(ex_phase, ph, 0) + at, even);
              store_full(phase(ex_phase, ph, 1) + at, odd);
            }
          }
        }
        // output vectors: the strip's outputs flat at the pitch
        const int64_t vectors = ((st.oh1 - st.oh0) * P + kLanes - 1) / kLanes;
        Lanes carry_e, carry_ex;
        for (int64_t v = 0; v < vectors; ++v) {
          const int64_t at = v * kLanes;
          Lanes sum = splat(0.0f), weighted = splat(0.0f);
          if (paired) {
            // two output rows a vector: the input rows (h - 1 .. h + 3) of
            // its windows weighed in registers (row h + 3 is the next
            // vector's h - 1), each pair of the vector's rows split into its
            // column phases by lane permutes, the left odd one shifted by a
            // lane (lane kLanes - 1 of a row holds 0: W <= kLanes - 2)
            const int64_t h = 2 * (st.oh0 + 2 * v);
            Lanes e[5], ex[5];
            if (v == 0) weigh_row(xq, lq, st, reference, h - 1, e[0], ex[0]);
            else e[0] = carry_e, ex[0] = carry_ex;
            for (int i = 1; i < 5; ++i) weigh_row(xq, lq, st, reference, h - 1 + i, e[i], ex[i]);
            carry_e = e[4], carry_ex = ex[4];
            // kh 0: rows (h - 1, h + 1); kh 1: (h, h + 2); kh 2: (h + 1, h + 3)
            for (int kh = 0; kh < 3; ++kh) {
              const Lanes ea = e[kh], eb = e[kh + 2], exa = ex[kh], exb = ex[kh + 2];
              for (int kw = 0; kw < 3; ++kw) {
                Step::add_weight(__builtin_shuffle(ea, eb, column_tap[kw]), __builtin_shuffle(exa, exb, column_tap[kw]),
                                 sum, weighted);
              }
            }
          } else {
            const auto tap = [&](int rph, int64_t dr, int cph, int64_t dc) __attribute__((always_inline)) {
              const int64_t o = at + dr * P + dc;
              Step::add_weight(load_full(phase(e_phase, rph, cph) + o), load_full(phase(ex_phase, rph, cph) + o),
                               sum, weighted);
            };
            // kh 0: the odd row above; kh 1: the even row; kh 2: the odd row
            // below. kw 0: the odd column left; kw 1: the even one; kw 2: the
            // odd one right.
            tap(1, 0, 1, -1), tap(1, 0, 0, 0), tap(1, 0, 1, 0);
            tap(0, 0, 1, -1), tap(0, 0, 0, 0), tap(0, 0, 1, 0);
            tap(1, 1, 1, -1), tap(1, 1, 0, 0), tap(1, 1, 1, 0);
          }
          Lanes y, inv, ref = reference;
          Step::finish(sum, weighted, y, inv);
          // where this vector's outputs lie
          int64_t oh, col, rows = 1;
          LaneInts valid;
          if (P < kLanes) {
            oh = st.oh0 + 2 * v, col = 0, rows = std::min<int64_t>(2, st.oh1 - oh);
            valid = out_lanes[rows - 1];
          } else {
            oh = st.oh0 + v / RV, col = (v % RV) * kLanes;
            valid = out_lanes[v % RV];
          }
          const Lanes key = cpu_math::select(valid, Step::fallback_key(sum, weighted), splat(1.0f));
          if (Step::needs_window_max(key)) {
            // the windows far below the strip's max, each from its own max,
            // with every lane of a vector on the one window (the other
            // layouts' arithmetic, lane by lane): rare
            float keys[kLanes], ys[kLanes], refs[kLanes], invs[kLanes];
            store(keys, key), store(ys, y), store(refs, ref), store(invs, inv);
            for (int l = 0; l < kLanes; ++l) {
              if (!(keys[l] < kTileMinWeightSum)) continue;
              const int64_t woh = oh + (P < kLanes ? l / P : 0), wow = col + (P < kLanes ? l % P : l);
              int64_t h0, h1, w0, w1;
              window_range<int64_t>(woh, G.kH, G.sH, G.pH, G.H, h0, h1);
              window_range<int64_t>(wow, G.kW, G.sW, G.pW, G.W, w0, w1);
              Lanes y_w, m_w, inv_w;
              window_softmax(
                  h0, h1, w0, w1, [&](int64_t h, int64_t w) { return splat(static_cast<float>(lq[h * L.W + w])); },
                  [&](int64_t h, int64_t w) { return splat(static_cast<float>(xq[h * L.W + w])); }, y_w, m_w,
                  inv_w);
              ys[l] = y_w[0], refs[l] = m_w[0], invs[l] = inv_w[0];
            }
            y = load(ys), ref = load(refs), inv = load(invs);
          }
          const int64_t o = o_plane + oh * L.OW + col;
          const int64_t count = std::min<int64_t>(kLanes, L.OW - col);
          store_lanes(yp + o, y, count);
          store_lanes(mp + o, ref, count);
          store_lanes(ip + o, inv, count);
          if (rows == 2) {
            store_lanes(yp + o + L.OW, __builtin_shuffle(y, upper), L.OW);
            store_lanes(mp + o + L.OW, __builtin_shuffle(ref, upper), L.OW);
            store_lanes(ip + o + L.OW, __builtin_shuffle(inv, upper), L.OW);
          }
        }
      }
    }
  });
}

}  // namespace
}  // namespace LIP_CPU_NS
}  // namespace lip_cuda
