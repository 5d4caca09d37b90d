// Contiguous NCHW, "rows": lanes along W. Forward: kLanes outputs of one
// row of one plane; backward: kLanes inputs of one stride phase of a
// plane, laid out flat so that they run across its rows.
#pragma once

#include "lip_cpu_tile.h"

namespace lip_cuda {
namespace LIP_CPU_NS {
namespace {

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
  const auto [x_ptr, l_ptr, out_ptr, max_ptr, inv_ptr] = forward_pointers<x_t, l_t>(t);
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

}  // namespace
}  // namespace LIP_CPU_NS
}  // namespace lip_cuda
