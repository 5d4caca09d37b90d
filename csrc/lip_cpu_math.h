// Lane vectors for the CPU kernels: one native SIMD register of floats as a
// GCC/Clang vector extension type (16 lanes with AVX-512, 8 with AVX, 4 with
// SSE or NEON). Wider types than the target has get their comparisons
// scalarised, hence native width. exp and log are written on it because
// libm's are opaque scalar calls. Only the ranges the kernels use are
// covered; NaN propagates.
#pragma once

#include <cstdint>
#include <cstring>

namespace lip_cuda {
namespace cpu_math {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
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
  LaneInts a_bits, b_bits;
  std::memcpy(&a_bits, &a, sizeof(a));
  std::memcpy(&b_bits, &b, sizeof(b));
  const LaneInts bits = (mask & a_bits) | (~mask & b_bits);
  Lanes out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// max(a, b) that ignores NaN in b (a is the running max, so a NaN logit
// does not become the max; its exp poisons the sums instead).
inline Lanes max_lanes(Lanes a, Lanes b) { return select(b > a, b, a); }

// exp(v) for v <= ~88 (softmax arguments are <= 0). Below -87 it returns
// ~1e-38 instead of a denormal or 0, a weight no float sum can see.
// Cody-Waite reduction v = n ln2 + r, |r| <= ln2 / 2, then a degree-6
// Taylor polynomial: relative error about 1.2e-7, one float ulp.
inline Lanes exp_lanes(Lanes v) {
  v = select(v < -87.0f, splat(-87.0f), v);  // NaN fails the compare and propagates
  const float kRound = 12582912.0f;      // 1.5 * 2^23: adding it rounds to an integer
  const Lanes t = v * 1.44269504088896341f + kRound;
  const Lanes n = t - kRound;
  LaneInts n_int;
  std::memcpy(&n_int, &t, sizeof(n_int));
  int32_t round_bits;
  std::memcpy(&round_bits, &kRound, sizeof(round_bits));
  n_int = ((n_int - round_bits) + 127) << 23;  // 2^n as float bits
  Lanes scale;
  std::memcpy(&scale, &n_int, sizeof(scale));
  Lanes r = v - n * 0.693145751953125f;  // ln2 high part, exact in n * hi
  r = r - n * 1.428606765330187e-06f;    // ln2 low part
  Lanes p = splat(1.0f / 720.0f);
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * scale;
}

// log(v) for v >= 1 (a window's weight sum relative to its max: the max
// contributes exactly 1). v = 2^e * m with m in [1, 2); log m = 2 atanh(z),
// z = (m - 1) / (m + 1) <= 1/3, by its odd series to z^11: error < 2e-7.
inline Lanes log_lanes(Lanes v) {
  LaneInts bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const Lanes e = __builtin_convertvector((bits >> 23) - 127, Lanes);
  const LaneInts m_bits = (bits & 0x007fffff) | 0x3f800000;
  Lanes m;
  std::memcpy(&m, &m_bits, sizeof(m));
  const Lanes z = (m - 1.0f) / (m + 1.0f);
  const Lanes z2 = z * z;
  Lanes s = splat(1.0f / 11.0f);
  s = s * z2 + 1.0f / 9.0f;
  s = s * z2 + 1.0f / 7.0f;
  s = s * z2 + 1.0f / 5.0f;
  s = s * z2 + 1.0f / 3.0f;
  s = s * z2 + 1.0f;
  // (v - v) is 0, or NaN when v is NaN, whose bits would read as a number
  return e * 0.693147180559945309f + 2.0f * z * s + (v - v);
}

}  // namespace cpu_math
}  // namespace lip_cuda
