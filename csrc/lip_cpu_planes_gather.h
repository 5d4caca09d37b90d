// Contiguous NCHW, "gather" (backward only): lanes are kLanes inputs of a
// row as they lie in memory; each output row is spread under the input
// columns by lane permutes, and covering outputs that share a reference
// share one exp.
#pragma once

#include "lip_cpu_planes_rows.h"

namespace lip_cuda {
namespace LIP_CPU_NS {
namespace {

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

// Whether the gather backward also takes, from the blocks kernels, the
// planes gather_by_default names: in the AVX-512 build, for float32 x. On
// a Zen 4 VM (2 threads, inputs out of cache, the two kernels switched in
// one process round by round, 25 rounds, medians, backward ms, blocks ->
// gather) float32 2x128x56x56 0.849 -> 0.706 and 2x256x56x56 1.834 ->
// 1.372, bfloat16 0.745 -> 0.730 and 1.548 -> 1.460; the AVX-512 VM of the
// measurements above had float32 even or 9-18% faster at 256 channels and
// bfloat16 slower. 28 x 28 planes stay on blocks (float32 even, bfloat16
// 8% slower with gather). The AVX2 build was not measured this way.
bool gather_before_blocks(const LipGeometry& g, bool float32_x) {
  return LIP_CPU_ISA >= 2 && float32_x && gather_by_default(g);
}

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

}  // namespace
}  // namespace LIP_CPU_NS
}  // namespace lip_cuda
