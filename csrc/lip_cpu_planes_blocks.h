// Contiguous NCHW, "blocks": a group of planes transposed into a
// lane-minor buffer [rows][W][channel], computed there as channels_last
// is, and transposed back, in bands of rows so that the scratch is
// bounded whatever the plane size.
#pragma once

#include "lip_cpu_channels_last.h"
#include "lip_cpu_planes_rows.h"

namespace lip_cuda {
namespace LIP_CPU_NS {
namespace {

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
// backward, where block_tasks does not take more. On AVX2 the backward
// takes four, so that a pixel's work is four lane vectors as in
// channels_last (packs of four exps, kGradPack): measured on the Zen 1 VM
// (float32 contiguous, op calls, 2 threads, inputs out of cache, three
// alternating runs, ms, one block vs four) 2x128x56x56 3.10-3.49 vs
// 2.36-2.53, 2x512x28x28 2.82-2.84 vs 2.65-2.73, 2x512x14x14 0.66-0.76 vs
// 0.49-0.56. Its forward stays at one (four: 2x128x56x56 1.45-1.59 vs
// 1.36-1.44 ms).
constexpr int64_t kForwardGroupBlocks = 1;
constexpr int64_t kBackwardGroupBlocks = LIP_CPU_ISA == 1 ? 4 : 1;
// The AVX-512 builds group up to kMaxGroupBlocks lane blocks where a task
// is whole planes that fit in the L2 together with the next task's
// prefetched rows (block_tasks): each pixel's or output's bookkeeping then
// serves more lanes. A group's bigger task had cost more than that saved
// where it left no room for the next task's prefetch: on the Zen 4 VM
// (float32 backward, 2 threads, inputs out of cache, in one process round
// by round, ms, one block -> two) 2x512x28x28 0.737 -> 0.855 with the
// prefetch dropped for its size, 0.678 with it; bfloat16 0.740 -> 0.653;
// four blocks of 28 x 28 planes (1.1-1.6 MiB with the next task's rows)
// 0.814-0.954 (docs/kernels.md, "Groups of lane blocks").
constexpr bool kGroupsByCache = LIP_CPU_ISA >= 2;
constexpr int64_t kMaxGroupBlocks = 4;
constexpr int64_t kMaxBackwardGroupBlocks = kGroupsByCache ? kMaxGroupBlocks : kBackwardGroupBlocks;
// The forward's weight ring (read by every window, so best kept in the L1)
// at most this big for a group: two blocks of 14 x 14 planes (10.5 KiB),
// not two of 28 x 28 (21 KiB), which measured 1-3% slower than one.
constexpr int64_t kForwardGroupRingBytes = 16 * 1024;
static_assert(kForwardGroupBlocks <= kMaxStripBlocks && kMaxGroupBlocks <= kMaxStripBlocks,
              "forward_strip takes the group's blocks");
static_assert(kMaxBackwardGroupBlocks <= 4, "backward_planes unrolls up to 4 blocks");

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
  bool fetch_next = false;         // a task fetches the next one's rows (block_tasks)
};

BlockTasks block_tasks_of(const LipGeometry& g, bool forward, int64_t group_blocks) {
  BlockTasks t;
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

// A task's scratch floats: forward, x and the logit in, three output
// arrays and the weight ring; backward, x and the logit (then both
// gradients) and four output arrays.
inline int64_t block_scratch_floats(const LipGeometry& g, const BlockTasks& t, bool forward) {
  return forward ? band_scratch_floats(g, t, forward_band, 2, 3) + strip_scratch_floats(g, t.group_channels / kLanes)
                 : band_scratch_floats(g, t, backward_band, 2, 4);
}

// Bytes of one element of a call's x and of its logit; y and grad_out
// are x's type, the window statistics float.
struct ElementBytes {
  int64_t x, logit;
};

// Whether a task of t, while it computes, fetches the rows of the next
// (a PrefetchQueue stepped through the task, into the L2): where the task
// is whole planes (the next band of the same planes continues the rows
// the hardware prefetchers already follow; fetching it cost up to 11% of
// the backward at 56x56 on the Zen 4 VM) and its scratch and the next
// task's rows fit in the L2 together (at 128x56x56 a block's 1 MiB
// outgrew it: backward 0.65 -> 0.70 ms). Measured with float32, 2
// threads, inputs out of cache: backward 0.51 -> 0.31 ms at 1024x14x14
// and 0.78 -> 0.62 ms at 512x28x28 when first built; forward 0.488 ->
// 0.432 ms at 512x28x28 on the Zen 4 VM (docs/kernels.md, "The next task
// into the L2").
inline bool fetch_next_task(const LipGeometry& g, const BlockTasks& t, bool forward, ElementBytes e) {
  if (t.bands != 1) return false;
  const int64_t in = g.H * g.W, out = g.OH * g.OW;
  // forward: x and the logit in, y and the two statistics out; backward:
  // x, the logit, grad_out, y and the statistics in, both gradients out
  const int64_t next = forward ? in * (e.x + e.logit) + out * (e.x + 8)
                               : 2 * in * (e.x + e.logit) + out * (2 * e.x + 8);
  const int64_t bytes = block_scratch_floats(g, t, forward) * int64_t(sizeof(float)) + next * t.group_channels;
  return bytes <= cpu_l2_cache_bytes();
}

// How the blocks kernels split a call (see kGroupsByCache).
BlockTasks block_tasks(const LipGeometry& g, bool forward, ElementBytes e) {
  if (kGroupsByCache) {
    const int64_t blocks = (g.C + kLanes - 1) / kLanes;
    for (int64_t group = kMaxGroupBlocks; group > 1; group /= 2) {
      const int64_t used = std::min(group, blocks);
      if (used <= 1) break;
      if (forward && strip_scratch_floats(g, used) * int64_t(sizeof(float)) > kForwardGroupRingBytes) continue;
      BlockTasks t = block_tasks_of(g, forward, used);
      if (fetch_next_task(g, t, forward, e)) {
        t.fetch_next = true;
        return t;
      }
    }
  }
  BlockTasks t = block_tasks_of(g, forward, forward ? kForwardGroupBlocks : kBackwardGroupBlocks);
  t.fetch_next = fetch_next_task(g, t, forward, e);
  return t;
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
  const ElementBytes e{int64_t(sizeof(x_t)), int64_t(sizeof(l_t))};
  const BlockTasks tasks = block_tasks(g, true, e);
  stream = stream && tasks.bands == 1 && whole_line_vectors<x_t>() &&
           whole_lines({&t.out, &t.window_max, &t.inv_weight_sum}, g.OH * g.OW);
  const auto [x_ptr, l_ptr, out_ptr, max_ptr, inv_ptr] = forward_pointers<x_t, l_t>(t);
  const int64_t out_pixels = g.OH * g.OW;
  const int64_t scratch = block_scratch_floats(g, tasks, true);
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
    if (next_block != nullptr && tasks.fetch_next) {
      const ChannelBlock& nb = *next_block;
      const BandRows nr = forward_band(g, tasks, next_band);
      const int64_t n_out = (nr.oh1 - nr.oh0) * g.OW;
      queue_band_inputs(next, g, x_ptr, l_ptr, cg.ls, nb, nr);
      if (!stream) {  // streamed lines must not be cached first
        queue_block(next, out_ptr, nb, g.C, out_pixels, nr.oh0 * g.OW, n_out, true);
        queue_block(next, max_ptr, nb, g.C, out_pixels, nr.oh0 * g.OW, n_out, true);
        queue_block(next, inv_ptr, nb, g.C, out_pixels, nr.oh0 * g.OW, n_out, true);
      }
    }
    const int64_t s0 = band * tasks.band, s1 = std::min(strip_count(g), s0 + tasks.band);
    // a few lines after each output: a strip's share at once (hundreds of
    // lines) waited on the cache's miss buffers (10% of the forward's
    // timer samples at 1024x14x14 on the Zen 4 VM)
    const int64_t outputs = out_count * b.blocks();
    const int lines_per_output = static_cast<int>((next.lines_left() + outputs - 1) / outputs);
    for (int64_t s = s0; s < s1; ++s) {
      StripData<float, float, float> d;
      d.queue = lines_per_output > 0 ? &next : nullptr;  // none: nothing to step per output
      d.queue_lines = lines_per_output;
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
  const ElementBytes e{int64_t(sizeof(x_t)), int64_t(sizeof(l_t))};
  const BlockTasks tasks = block_tasks(g, false, e);
  stream = stream && tasks.bands == 1 && whole_line_vectors<x_t, l_t>() &&
           whole_lines({&t.grad_x, &t.grad_logit}, g.H * g.W);
  const auto [g_ptr, x_ptr, l_ptr, y_ptr, max_ptr, inv_ptr, gx_ptr, gl_ptr] =
      backward_pointers<x_t, l_t>(t);
  const int64_t in_pixels = g.H * g.W;
  const int64_t out_pixels = g.OH * g.OW;
  // dx and dlogit replace x and the logit in the scratch (each pixel reads
  // only its own): at 128x56x56 the scratch is then 0.6 MiB, not 1 MiB,
  // and stays in the L2 cache
  const int64_t scratch = block_scratch_floats(g, tasks, false);
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
    if (next_block != nullptr && tasks.fetch_next) {
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
                                                   o_row, width, xb + i, lb + i);
          };
          switch (b.blocks()) {
            case 1: covered(std::integral_constant<int, 1>()); break;
            // (the builds with groups of one block instantiate only that)
            case 2: covered(std::integral_constant<int, std::min<int>(2, kMaxBackwardGroupBlocks)>()); break;
            case 3: covered(std::integral_constant<int, std::min<int>(3, kMaxBackwardGroupBlocks)>()); break;
            default: covered(std::integral_constant<int, kMaxBackwardGroupBlocks>()); break;
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

}  // namespace
}  // namespace LIP_CPU_NS
}  // namespace lip_cuda
