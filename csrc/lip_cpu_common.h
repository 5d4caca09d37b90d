// What every CPU kernel shares: the lane types and window steps it calls,
// one window and one input pixel over all lanes, the typed pointers of a
// backward call, software prefetch, and when streaming stores pay. Part
// of the per-ISA kernels: see lip2d_cpu.cpp.
#pragma once

// Like every lip_cpu_ header, included by lip2d_cpu.cpp once per instruction
// set, after the torch and standard headers and its "#pragma GCC target":
// no system header here, whose inline functions would then be compiled for
// that instruction set (lip_cpu_math.h checks LIP_CPU_ISA and LIP_CPU_NS).
#include "lip_kernels.h"
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

// The typed data pointers of a forward call: x, logit, out, window_max,
// inv_weight_sum.
template <typename x_t, typename l_t>
std::tuple<const x_t*, const l_t*, x_t*, float*, float*> forward_pointers(const ForwardTensors& t) {
  return {t.x.const_data_ptr<x_t>(), t.logit.const_data_ptr<l_t>(), t.out.mutable_data_ptr<x_t>(),
          t.window_max.mutable_data_ptr<float>(), t.inv_weight_sum.mutable_data_ptr<float>()};
}

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
// issued in one burst. Lines to be read go to the L2 only (PREFETCHT1): the
// L1 holds the current task's working set, which a next task of 14 x 14
// planes (34 KiB in float32) evicted from a 32 KiB L1 when fetched with
// PREFETCHT0. On the Zen 4 VM (float32, 2 threads, inputs out of cache) the
// blocks forward at 1024 x 14 x 14 took 0.300 -> 0.235 ms, its backward
// 0.459 -> 0.420, the rows backward of 1 x 1 x 2048 x 2048 4.67 -> 3.83 ms
// (docs/kernels.md, "The next task into the L2").
class PrefetchQueue {
 public:
  // write: the lines will be written (fetched for ownership). planes:
  // `planes` ranges of `bytes`, `stride` bytes apart.
  void add(const void* p, int64_t bytes, bool write = false, int64_t planes = 1, int64_t stride = 0) {
    if (count_ < kMaxRanges && bytes > 0 && planes > 0) {
      ranges_[count_++] = {static_cast<const char*>(p), bytes, planes, stride, write};
      if (count_ == 1) start_plane();
    }
  }
  // The next `lines` lines. The position is a pointer and its plane's end,
  // so that a line costs a compare and an add: computed from the range's
  // fields line by line it took 17 instructions a line, 5 per element of
  // the blocks backward at 512 x 14 x 14 (callgrind; docs/kernels.md,
  // "Instructions per element").
  void step(int lines) {
    while (lines > 0 && at_ < count_) {
      const char* p = line_;
      const char* const end = end_;
      if (ranges_[at_].write) {
        for (; lines > 0 && p < end; --lines, p += 64) __builtin_prefetch(p, 1);
      } else {
        for (; lines > 0 && p < end; --lines, p += 64) __builtin_prefetch(p, 0, 2);
      }
      line_ = p;
      if (p >= end) next_plane();
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
    if (at_ < count_) lines -= plane_ * ((ranges_[at_].bytes + 63) / 64) + (line_ - (end_ - ranges_[at_].bytes)) / 64;
    return lines;
  }
  void clear() { count_ = at_ = 0, plane_ = 0, line_ = end_ = nullptr; }

 private:
  static constexpr int kMaxRanges = 8;
  struct Range {
    const char* p;
    int64_t bytes, planes, stride;
    bool write;
  };
  // line_ and end_ at the start and end of plane plane_ of range at_
  void start_plane() {
    const Range& r = ranges_[at_];
    line_ = r.p + plane_ * r.stride;
    end_ = line_ + r.bytes;
  }
  void next_plane() {
    if (++plane_ == ranges_[at_].planes) {
      ++at_;
      plane_ = 0;
    }
    if (at_ < count_) start_plane();
  }
  Range ranges_[kMaxRanges];
  int count_ = 0, at_ = 0;
  int64_t plane_ = 0;
  const char* line_ = nullptr;
  const char* end_ = nullptr;
};

}  // namespace
}  // namespace LIP_CPU_NS
}  // namespace lip_cuda
