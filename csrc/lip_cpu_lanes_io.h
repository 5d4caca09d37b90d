// Loading kLanes elements of a tensor's dtype into float lanes and storing
// them back, vectorised: float32 is a plain vector move, bfloat16 a 16-bit
// shift (stores round to nearest even, as c10 does; with AVX512-BF16 in
// one instruction), float16 the F16C
// conversion instructions where the target has them. A partial count
// (the last channels of a row) goes through a zero-padded lane array.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if LIP_CPU_ISA >= 1
#include <immintrin.h>
#endif

#include "lip_cpu_math.h"

namespace lip_cuda {
namespace LIP_CPU_NS {
namespace cpu_math {

typedef uint16_t LaneHalves __attribute__((vector_size(kLanes * sizeof(uint16_t))));
typedef uint32_t LaneWords __attribute__((vector_size(kLanes * sizeof(uint32_t))));

inline Lanes load_full(const float* p) { return load(p); }
inline void store_full(float* p, Lanes v) { store(p, v); }

inline Lanes load_full(const c10::BFloat16* p) {
  LaneHalves h;
  std::memcpy(&h, p, sizeof(h));
  const LaneWords w = __builtin_convertvector(h, LaneWords) << 16;
  Lanes v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
}

inline void store_full(c10::BFloat16* p, Lanes v) {
#if LIP_CPU_ISA == 3
  // VCVTNEPS2BF16 rounds to nearest even with c10's integer arithmetic,
  // but reads denormal inputs as 0 and keeps NaN payloads: vectors holding
  // either (rare) take the integer path below, so every build stores the
  // same bits. One instruction instead of eight: the bfloat16 backward
  // measured 12-15% of its time in this rounding.
  const __m512 f = reinterpret_cast<__m512>(v);
  constexpr int kQuietNan = 0x01, kDenormal = 0x20, kSignalingNan = 0x80;
  if (_mm512_fpclass_ps_mask(f, kQuietNan | kDenormal | kSignalingNan) == 0) {
    const __m256bh h = _mm512_cvtneps_pbh(f);
    std::memcpy(p, &h, sizeof(h));
    return;
  }
#endif
  LaneWords bits;
  std::memcpy(&bits, &v, sizeof(bits));
  LaneWords rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  LaneInts nan_mask = v != v;
  LaneWords nan_bits;
  std::memcpy(&nan_bits, &nan_mask, sizeof(nan_bits));
  rounded = (nan_bits & 0x7fc0u) | (~nan_bits & rounded);
  const LaneHalves h = __builtin_convertvector(rounded, LaneHalves);
  std::memcpy(p, &h, sizeof(h));
}

#if LIP_CPU_ISA >= 1  // F16C: every AVX2 and AVX-512 CPU has it
inline Lanes load_full(const c10::Half* p) {
#if LIP_CPU_ISA >= 2
  // The masked forms with a zero source: GCC's plain ones start from an
  // "undefined" register and then warn that it may be used uninitialised.
  return reinterpret_cast<Lanes>(_mm512_mask_cvtph_ps(
      _mm512_setzero_ps(), 0xFFFF, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#else
  return reinterpret_cast<Lanes>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#endif
}

inline void store_full(c10::Half* p, Lanes v) {
#if LIP_CPU_ISA >= 2
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_mask_cvtps_ph(_mm256_setzero_si256(), 0xFFFF,
                                           reinterpret_cast<__m512>(v), _MM_FROUND_TO_NEAREST_INT));
#else
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph(reinterpret_cast<__m256>(v), _MM_FROUND_TO_NEAREST_INT));
#endif
}
#else
inline Lanes load_full(const c10::Half* p) {
  float f[kLanes];
  for (int c = 0; c < kLanes; ++c) f[c] = static_cast<float>(p[c]);
  return load(f);
}

inline void store_full(c10::Half* p, Lanes v) {
  float f[kLanes];
  store(f, v);
  for (int c = 0; c < kLanes; ++c) p[c] = static_cast<c10::Half>(f[c]);
}
#endif

// The first `count` (<= kLanes) elements; the rest of the lanes read 0.
template <typename T>
inline Lanes load_lanes(const T* p, int64_t count) {
  if (count == kLanes) {
    return load_full(p);
  }
  float f[kLanes] = {};
  for (int64_t c = 0; c < count; ++c) f[c] = static_cast<float>(p[c]);
  return load(f);
}

template <typename T>
inline void store_lanes(T* p, Lanes v, int64_t count) {
  if (count == kLanes) {
    store_full(p, v);
    return;
  }
  float f[kLanes];
  store(f, v);
  for (int64_t c = 0; c < count; ++c) p[c] = static_cast<T>(f[c]);
}

}  // namespace cpu_math
}  // namespace LIP_CPU_NS
}  // namespace lip_cuda
