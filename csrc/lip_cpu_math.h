// Lane vectors for the CPU kernels: one SIMD register of floats as a
// GCC/Clang vector extension type, as wide as the instruction set the
// including translation unit is compiled for (LIP_CPU_ISA, see
// lip2d_cpu.cpp): 16 lanes for AVX-512, 8 for AVX2, 4 for the baseline
// (SSE2 or NEON). Wider types than the target has get their comparisons
// scalarised, hence native width. exp is written on it because libm's is an
// opaque scalar call. Only the ranges the kernels use are covered; NaN
// propagates.
//
// Everything here lives in the per-ISA namespace LIP_CPU_NS, so that the
// translation units built for different ISAs never share (and never let the
// linker merge) a function compiled with different instructions.
#pragma once

#include <cstdint>
#include <cstring>

#include "lip_window.h"  // LIP_UNROLL

#if LIP_CPU_ISA >= 1
#include <immintrin.h>
#endif

#if !defined(LIP_CPU_ISA) || !defined(LIP_CPU_NS)
#error "define LIP_CPU_ISA (0 default, 1 AVX2, 2 AVX-512, 3 AVX-512 with BF16) and LIP_CPU_NS before including"
#endif

namespace lip_cuda {
namespace LIP_CPU_NS {
namespace cpu_math {

#if LIP_CPU_ISA >= 2
constexpr int kLanes = 16;
#elif LIP_CPU_ISA == 1
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t LaneInts __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline Lanes splat(float v) { return Lanes{} + v; }

inline Lanes load(const float* p) {
  Lanes v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store(float* p, Lanes v) { std::memcpy(p, &v, sizeof(v)); }

// mask ? a : b, lane by lane, as bit operations: GCC scalarises the vector
// ?: on targets without a blend instruction.
inline Lanes select(LaneInts mask, Lanes a, Lanes b) {
#if LIP_CPU_ISA >= 1
  // AVX2 and AVX-512 have blends: one masked move (or a zeroing masked op)
  // instead of the two or three bit operations GCC keeps below.
  return mask ? a : b;
#endif
  LaneInts a_bits, b_bits;
  std::memcpy(&a_bits, &a, sizeof(a));
  std::memcpy(&b_bits, &b, sizeof(b));
  const LaneInts bits = (mask & a_bits) | (~mask & b_bits);
  Lanes out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// 0 where mask is set, else v: select(mask, splat(0.0f), v). On AVX2 an
// AND-NOT (VANDNPS) instead of the blend GCC emits there: a blend is two
// micro-ops on the two pipes that Zen 1 also needs for every FMA, a logic
// operation runs on any of its four (the float32 exp alone, four vectors
// at a time in a loop in L1: 22.5 -> 21.2 cycles a vector with this and
// max_lanes' clamp in exp_lanes; 21.6 with the integer VPANDN that GCC
// makes of plain bit operations). Elsewhere the select: a zero-masked move
// on AVX-512, bit operations on the baseline.
inline Lanes zero_where(LaneInts mask, Lanes v) {
#if LIP_CPU_ISA == 1
  return reinterpret_cast<Lanes>(
      _mm256_andnot_ps(reinterpret_cast<__m256>(mask), reinterpret_cast<__m256>(v)));
#else
  return select(mask, splat(0.0f), v);
#endif
}

// All-ones in the lanes l with lo <= l < hi, zero elsewhere.
inline LaneInts lanes_between(int32_t lo, int32_t hi) {
  LaneInts index;
  for (int l = 0; l < kLanes; ++l) index[l] = l;
  return (index >= lo) & (index < hi);
}

// Whether every lane of a comparison result is set: one mask test. A
// memcmp of the lanes (inlined, but through memory) measured the contiguous
// float32 stem forward 0.67 ms against 0.62 ms (any_below, once an output).
inline bool all_set(LaneInts mask) {
#if LIP_CPU_ISA >= 2
  return _mm512_movepi32_mask(reinterpret_cast<__m512i>(mask)) == 0xFFFF;
#elif LIP_CPU_ISA == 1
  return _mm256_movemask_ps(reinterpret_cast<__m256>(mask)) == 0xFF;
#else
  int32_t all = -1;
  for (int l = 0; l < kLanes; ++l) all &= mask[l];
  return all == -1;
#endif
}

// max(a, b) that ignores NaN in b (a is the running max, so a NaN logit
// does not become the max; its exp poisons the sums instead).
// MAXPS(b, a) is exactly b > a ? b : a (NaN and equal zeros give its second
// operand): one instruction instead of a compare and a blend.
inline Lanes max_lanes(Lanes a, Lanes b) {
#if LIP_CPU_ISA >= 2
  // the zero-masked form: the plain one starts from an "undefined" register
  // that GCC then warns may be used uninitialised
  return reinterpret_cast<Lanes>(
      _mm512_maskz_max_ps(0xFFFF, reinterpret_cast<__m512>(b), reinterpret_cast<__m512>(a)));
#elif LIP_CPU_ISA == 1
  return reinterpret_cast<Lanes>(_mm256_max_ps(reinterpret_cast<__m256>(b), reinterpret_cast<__m256>(a)));
#else
  return select(b > a, b, a);
#endif
}

// exp(v) for v <= 0 (a logit minus its window max), as the window step
// needs it: exactly 0 below the normal float range and at -inf, so a masked
// or negligible tap has no weight at all (not ~1e-38, which a huge x would
// still see). Cody-Waite reduction v = n ln2 + r, |r| <= ln2 / 2, then a
// degree-6 Taylor polynomial (ln2 in a high and a low part, the high one
// exact in n * hi): relative error about 1.2e-7, one float ulp. NaN
// propagates.
//
// N independent vectors at once, each step for all of them before the
// next: an exp is a chain of about 15 dependent instructions, and written
// one vector after another GCC kept each chain whole, so that a core with
// a small scheduler (Zen 1, AVX2) waited on FMA latency: timer samples of
// the float32 forward's weight pass piled up on the polynomial's last
// FMAs, at about 34 cycles a vector (docs/kernels.md, "An AVX2 CPU").
template <int N>
[[gnu::always_inline]] inline void exp_lanes(const Lanes* v_in, Lanes* out) {
  const float kLowest = -87.3f;  // exp(kLowest) is about FLT_MIN, still normal
  const float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  LaneInts underflow[N];
  Lanes v[N], n[N], r[N], p[N];
  LIP_UNROLL
  for (int i = 0; i < N; ++i) {
    v[i] = v_in[i];
    underflow[i] = v[i] < kLowest;  // NaN fails the compare and propagates
  }
#if LIP_CPU_ISA >= 2
  // AVX-512: VSCALEFPS multiplies by 2^n, exactly as the integer form below
  // does for every n it keeps (n >= -126), and takes any n, so v needs no
  // clamping: four instructions fewer, the same bits.
  LIP_UNROLL
  for (int i = 0; i < N; ++i) n[i] = (v[i] * 1.44269504088896341f + kRound) - kRound;
#else
  Lanes scale[N];
  LIP_UNROLL
  for (int i = 0; i < N; ++i) {
    v[i] = max_lanes(v[i], splat(kLowest));  // the clamp; NaN stays NaN
    const Lanes t = v[i] * 1.44269504088896341f + kRound;
    n[i] = t - kRound;
    LaneInts n_int;
    std::memcpy(&n_int, &t, sizeof(n_int));
    int32_t round_bits;
    std::memcpy(&round_bits, &kRound, sizeof(round_bits));
    n_int = ((n_int - round_bits) + 127) << 23;  // 2^n as float bits
    std::memcpy(&scale[i], &n_int, sizeof(scale[i]));
  }
#endif
  LIP_UNROLL
  for (int i = 0; i < N; ++i) r[i] = v[i] - n[i] * 0.693145751953125f;
  LIP_UNROLL
  for (int i = 0; i < N; ++i) r[i] = r[i] - n[i] * 1.428606765330187e-06f;
  // Horner, one coefficient for all N vectors at a time
  const float kTaylor[] = {1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f};
  LIP_UNROLL
  for (int i = 0; i < N; ++i) p[i] = splat(1.0f / 720.0f);
  LIP_UNROLL
  for (float c : kTaylor) {
    LIP_UNROLL
    for (int i = 0; i < N; ++i) p[i] = p[i] * r[i] + c;
  }
  LIP_UNROLL
  for (int i = 0; i < N; ++i) {
#if LIP_CPU_ISA >= 2
    const Lanes scaled = reinterpret_cast<Lanes>(_mm512_maskz_scalef_ps(
        0xFFFF, reinterpret_cast<__m512>(p[i]), reinterpret_cast<__m512>(n[i])));
#else
    const Lanes scaled = p[i] * scale[i];
#endif
    out[i] = zero_where(underflow[i], scaled);
  }
}

inline Lanes exp_lanes(Lanes v) {
  Lanes out;
  exp_lanes<1>(&v, &out);
  return out;
}

// The value operations of lip_window.h's WindowStep on float lanes (the
// scalar versions are ScalarMath there).
struct LaneMath {
  using value = Lanes;
  static Lanes splat(float v) { return cpu_math::splat(v); }
  static Lanes max(Lanes a, Lanes b) { return max_lanes(a, b); }
  static Lanes exp_nonpositive(Lanes v) { return exp_lanes(v); }
  static Lanes zero_where_zero(Lanes a, Lanes b) { return zero_where(a == splat(0.0f), b); }
  static Lanes finite_or_zero(Lanes m) { return zero_where(m == splat(-__builtin_inff()), m); }
  static Lanes reciprocal_or_zero(Lanes s) { return zero_where(s == splat(0.0f), 1.0f / s); }
  static Lanes quotient_or_zero(Lanes a, Lanes s) { return zero_where(s == splat(0.0f), a / s); }
  static bool any_below(Lanes a, Lanes bound) { return !all_set(!(a < bound)); }
  static Lanes select_below(Lanes a, Lanes bound, Lanes if_below, Lanes otherwise) {
    return select(a < bound, if_below, otherwise);
  }
  static Lanes select_small(Lanes a, Lanes bound, Lanes if_zero, Lanes if_tiny, Lanes otherwise) {
    return select((a < bound) & (-a < bound), select(a == splat(0.0f), if_zero, if_tiny), otherwise);
  }
};

// N lane vectors as one value of lip_window.h's WindowStep
// (WindowStep<PackMath<N>>): each operation runs on all N before the next,
// so that the N independent chains of a step (N exps, say) interleave
// instead of following one another (see exp_lanes). The same operations
// in the same order per vector as LaneMath: the same bits.
template <int N>
struct LanePack {
  Lanes v[N];
  Lanes& operator[](int i) { return v[i]; }
  const Lanes& operator[](int i) const { return v[i]; }
};

#define LIP_PACK_OPERATOR(op)                                               \
  template <int N>                                                          \
  inline LanePack<N> operator op(const LanePack<N>& a, const LanePack<N>& b) { \
    LanePack<N> out;                                                        \
    LIP_UNROLL                                                              \
    for (int i = 0; i < N; ++i) out[i] = a[i] op b[i];                      \
    return out;                                                             \
  }
LIP_PACK_OPERATOR(+)
LIP_PACK_OPERATOR(-)
LIP_PACK_OPERATOR(*)
#undef LIP_PACK_OPERATOR
template <int N>
inline LanePack<N>& operator+=(LanePack<N>& a, const LanePack<N>& b) {
  return a = a + b;
}

// The operations of LaneMath that the tile weights and the gradient taps
// use (WindowStep::tile_weight, add_weight, grad_tap, grad_weight_tap).
// Not inlined by force: WindowStep is compiled for the baseline ISA, and
// GCC refuses to force an AVX2 function into it; the kernels that use
// packs are marked flatten instead, which inlines all of it into them
// (left to GCC, even a pack's += and exp stayed calls).
template <int N>
struct PackMath {
  using value = LanePack<N>;
  static value splat(float v) {
    value out;
    LIP_UNROLL
    for (int i = 0; i < N; ++i) out[i] = cpu_math::splat(v);
    return out;
  }
  static value exp_nonpositive(const value& v) {
    value out;
    exp_lanes<N>(v.v, out.v);
    return out;
  }
  static value zero_where_zero(const value& a, const value& b) {
    value out;
    LIP_UNROLL
    for (int i = 0; i < N; ++i) out[i] = LaneMath::zero_where_zero(a[i], b[i]);
    return out;
  }
};

}  // namespace cpu_math
}  // namespace LIP_CPU_NS
}  // namespace lip_cuda
