// Loading kLanes elements of a tensor's dtype into float lanes and storing
// them back, vectorised: float32 is a plain vector move, bfloat16 a 16-bit
// shift (stores round to nearest even, as c10 does; with AVX512-BF16 in
// one instruction), float16 the F16C
// conversion instructions where the target has them. A partial count
// (the last channels of a pixel, a row's last columns) is a masked load or
// store on AVX-512 (and for float on AVX2), else a zero-padded lane array.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#if LIP_CPU_ISA >= 1
#include <immintrin.h>
#endif

#include "lip_cpu_math.h"

namespace lip_cuda {
namespace LIP_CPU_NS {
namespace cpu_math {

typedef uint16_t LaneHalves __attribute__((vector_size(kLanes * sizeof(uint16_t))));
typedef uint32_t LaneWords __attribute__((vector_size(kLanes * sizeof(uint32_t))));

// Streaming (non-temporal) stores, for the kernels' outputs where a call
// moves more bytes than the last-level cache holds (see stream_outputs in
// lip2d_cpu.cpp): the lines go to memory without first being read for
// ownership (2 of the backward's 7 input-sized transfers otherwise), and
// without evicting what the cache holds. Only aligned whole
// vectors stream; the rest are plain stores. A task that streamed calls
// stream_fence before it ends, so that the stores are visible to the
// thread that joins it. aligned: the caller knows that p is aligned to
// sizeof(Bits), and the check (a branch per store) is left out.
template <typename Bits>
inline bool stream_bits(void* p, const Bits& bits, bool aligned = false) {
#if LIP_CPU_ISA >= 1
  if (aligned || reinterpret_cast<uintptr_t>(p) % sizeof(Bits) == 0) {
#if LIP_CPU_ISA >= 2
    if constexpr (sizeof(Bits) == 64) {
      __m512i v;
      std::memcpy(&v, &bits, sizeof(v));
      _mm512_stream_si512(static_cast<__m512i*>(p), v);
      return true;
    }
#endif
    if constexpr (sizeof(Bits) == 32) {
      __m256i v;
      std::memcpy(&v, &bits, sizeof(v));
      _mm256_stream_si256(static_cast<__m256i*>(p), v);
      return true;
    } else if constexpr (sizeof(Bits) == 16) {
      __m128i v;
      std::memcpy(&v, &bits, sizeof(v));
      _mm_stream_si128(static_cast<__m128i*>(p), v);
      return true;
    }
  }
#else
  (void)p;
  (void)bits;
  (void)aligned;
#endif
  return false;
}

inline void stream_fence() {
#if LIP_CPU_ISA >= 1
  _mm_sfence();
#endif
}

inline Lanes load_full(const float* p) { return load(p); }
inline void store_full(float* p, Lanes v, bool stream = false, bool aligned = false) {
  if (!(stream && stream_bits(p, v, aligned))) store(p, v);
}

#if LIP_CPU_ISA >= 2
// Each bfloat16 widened to 32 bits and shifted into a float's high half:
// one VPMOVZXWD of all 16 and a shift. Of the generic form below GCC made
// two 256-bit widenings, an extract and an insert (on the Zen 4 VM, 15% of
// the timer samples of the bfloat16 channels_last backward at the stem).
// (the zero-masked forms with a full mask: GCC warns that the plain ones'
// "undefined" start register may be used uninitialised)
inline Lanes widen_bfloat16(__m256i h) {
  const __mmask16 all = 0xFFFF;
  return reinterpret_cast<Lanes>(_mm512_maskz_slli_epi32(all, _mm512_maskz_cvtepu16_epi32(all, h), 16));
}
#endif

inline Lanes load_full(const c10::BFloat16* p) {
#if LIP_CPU_ISA >= 2
  return widen_bfloat16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif LIP_CPU_ISA == 1
  // Each bfloat16 interleaved above a zero word is its float: two 128-bit
  // unpacks and an insert, 3 micro-ops on Zen 1 against the 6 (and a
  // shift, which one pipe runs) of the widen-and-shift GCC makes of the
  // generic form; the bfloat16 backward loads 6.5 vectors an input vector.
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i zero = _mm_setzero_si128();
  return reinterpret_cast<Lanes>(
      _mm256_set_m128i(_mm_unpackhi_epi16(zero, h), _mm_unpacklo_epi16(zero, h)));
#else
  LaneHalves h;
  std::memcpy(&h, p, sizeof(h));
  const LaneWords w = __builtin_convertvector(h, LaneWords) << 16;
  Lanes v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
#endif
}

// The bfloat16 bits of v, rounded to nearest even as c10 rounds.
inline LaneHalves bfloat16_bits(Lanes v) {
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
    LaneHalves out;
    std::memcpy(&out, &h, sizeof(out));
    return out;
  }
#endif
#if LIP_CPU_ISA == 1
  // The same integer rounding, its high words gathered by a byte shuffle
  // instead of a second shift, a mask and a pack across the 128-bit halves.
  {
    const __m256i bits = reinterpret_cast<__m256i>(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), odd);
    const __m256i nan = reinterpret_cast<__m256i>(_mm256_cmp_ps(reinterpret_cast<__m256>(v),
                                                                reinterpret_cast<__m256>(v), _CMP_UNORD_Q));
    rounded = _mm256_or_si256(_mm256_andnot_si256(nan, rounded),
                              _mm256_and_si256(nan, _mm256_set1_epi32(0x7fc00000)));
    // bytes 2-3 of each word of a 128-bit half into its low 8 bytes
    const __m256i high_words = _mm256_shuffle_epi8(
        rounded, _mm256_setr_epi8(2, 3, 6, 7, 10, 11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1,
                                  2, 3, 6, 7, 10, 11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1));
    const __m128i h = _mm_unpacklo_epi64(_mm256_castsi256_si128(high_words),
                                         _mm256_extracti128_si256(high_words, 1));
    LaneHalves out;
    std::memcpy(&out, &h, sizeof(out));
    return out;
  }
#endif
  LaneWords bits;
  std::memcpy(&bits, &v, sizeof(bits));
  LaneWords rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  LaneInts nan_mask = v != v;
  LaneWords nan_bits;
  std::memcpy(&nan_bits, &nan_mask, sizeof(nan_bits));
  rounded = (nan_bits & 0x7fc0u) | (~nan_bits & rounded);
  return __builtin_convertvector(rounded, LaneHalves);
}

inline void store_full(c10::BFloat16* p, Lanes v, bool stream = false, bool aligned = false) {
  const LaneHalves h = bfloat16_bits(v);
  if (!(stream && stream_bits(p, h, aligned))) std::memcpy(p, &h, sizeof(h));
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

inline void store_full(c10::Half* p, Lanes v, bool stream = false, bool aligned = false) {
#if LIP_CPU_ISA >= 2
  const __m256i h = _mm512_mask_cvtps_ph(_mm256_setzero_si256(), 0xFFFF, reinterpret_cast<__m512>(v),
                                         _MM_FROUND_TO_NEAREST_INT);
  if (!(stream && stream_bits(p, h, aligned))) _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
#else
  const __m128i h = _mm256_cvtps_ph(reinterpret_cast<__m256>(v), _MM_FROUND_TO_NEAREST_INT);
  if (!(stream && stream_bits(p, h, aligned))) _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
#endif
}
#else
inline Lanes load_full(const c10::Half* p) {
  float f[kLanes];
  for (int c = 0; c < kLanes; ++c) f[c] = static_cast<float>(p[c]);
  return load(f);
}

inline void store_full(c10::Half* p, Lanes v, bool = false, bool = false) {
  float f[kLanes];
  store(f, v);
  for (int c = 0; c < kLanes; ++c) p[c] = static_cast<c10::Half>(f[c]);
}
#endif

#if LIP_CPU_ISA >= 2
// 16-bit elements in a 256-bit register, to float lanes and back, rounded
// as the full loads and stores above round (the pointer picks the type).
// The partial loads and stores use them in registers: through a lane
// array on the stack they cost a store and a reload each.
inline Lanes widen_words(const c10::BFloat16*, __m256i h) { return widen_bfloat16(h); }
inline Lanes widen_words(const c10::Half*, __m256i h) {
  return reinterpret_cast<Lanes>(_mm512_mask_cvtph_ps(_mm512_setzero_ps(), 0xFFFF, h));
}
inline __m256i narrow_words(const c10::BFloat16*, Lanes v) {
  const LaneHalves h = bfloat16_bits(v);
  __m256i out;
  std::memcpy(&out, &h, sizeof(out));
  return out;
}
inline __m256i narrow_words(const c10::Half*, Lanes v) {
  return _mm512_mask_cvtps_ph(_mm256_setzero_si256(), 0xFFFF, reinterpret_cast<__m512>(v), _MM_FROUND_TO_NEAREST_INT);
}
#endif

// The first `count` (<= kLanes) elements; the rest of the lanes read 0.
// Masked loads and stores where the ISA has them: a vector load of a lane
// array just written element by element waits for the failed store
// forwarding, which made it most of the contiguous backward's row
// splitting on 14-wide rows (7 inputs per stride phase).
template <typename T>
inline Lanes load_lanes(const T* p, int64_t count) {
  if (count == kLanes) {
    return load_full(p);
  }
#if LIP_CPU_ISA >= 2
  const __mmask16 mask = static_cast<__mmask16>((1u << count) - 1u);
  if constexpr (std::is_same_v<T, float>) {
    return reinterpret_cast<Lanes>(_mm512_maskz_loadu_ps(mask, p));
  } else {
    static_assert(sizeof(T) == 2, "16-bit element types");
    return widen_words(p, _mm256_maskz_loadu_epi16(mask, p));
  }
#else
#if LIP_CPU_ISA == 1
  if constexpr (std::is_same_v<T, float>) {
    return reinterpret_cast<Lanes>(
        _mm256_maskload_ps(p, reinterpret_cast<__m256i>(lanes_between(0, static_cast<int32_t>(count)))));
  }
#endif
  float f[kLanes] = {};
  for (int64_t c = 0; c < count; ++c) f[c] = static_cast<float>(p[c]);
  return load(f);
#endif
}

// stream: whole vectors may stream (see stream_bits); partial ones never do.
// aligned: as stream_bits takes it.
template <typename T>
inline void store_lanes(T* p, Lanes v, int64_t count, bool stream = false, bool aligned = false) {
  if (count == kLanes) {
    store_full(p, v, stream, aligned);
    return;
  }
#if LIP_CPU_ISA >= 2
  const __mmask16 mask = static_cast<__mmask16>((1u << count) - 1u);
  if constexpr (std::is_same_v<T, float>) {
    _mm512_mask_storeu_ps(p, mask, reinterpret_cast<__m512>(v));
  } else {
    static_assert(sizeof(T) == 2, "16-bit element types");
    _mm256_mask_storeu_epi16(p, mask, narrow_words(p, v));  // the same rounding as a full store
  }
#else
#if LIP_CPU_ISA == 1
  if constexpr (std::is_same_v<T, float>) {
    _mm256_maskstore_ps(p, reinterpret_cast<__m256i>(lanes_between(0, static_cast<int32_t>(count))),
                        reinterpret_cast<__m256>(v));
    return;
  }
#endif
  float f[kLanes];
  store(f, v);
  for (int64_t c = 0; c < count; ++c) p[c] = static_cast<T>(f[c]);
#endif
}

}  // namespace cpu_math
}  // namespace LIP_CPU_NS
}  // namespace lip_cuda
