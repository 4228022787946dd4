// Products with float32 sums over packed weights: bfloat16 through AVX512_BF16's dot-product
// instruction (vdpbf16ps) or AMX's tile product (tdpbf16ps), and float32 through AVX-512 or AVX2
// FMA (the 3x3 convolutions, whose nine taps it sums in registers). The interface shared by the
// primitive (native.cpp) and the kernels (gemm_avx512bf16.cpp, gemm_amx.cpp, gemm_avx512f32.cpp,
// gemm_avx2f32.cpp, each compiled with its -m flags, used only where the CPU has the instructions).
//
// One kernel serves linear layers and convolutions. With T taps at row offsets off[t],
//   out[b, m, o] = bias[o] + sum_t sum_c x[b, m + off[t], c] w[o, t, c]
// a linear layer is T = 1, off = {0}; a 3x3 convolution with stride 1 and padding 1 is T = 9 over
// the padded input flattened to rows of W + 2 pixels, off[t] = dy (W + 2) + dx (see ops.conv3x3).
#pragma once

#include <cstdint>

namespace sd_native {

constexpr int64_t kGemmRows = 96;  // output rows per task: 16 register groups of 6
// The most rows a task of the vector kernels takes: a product of few rows (the text encoder's 154)
// is one task per panel, so that each slice of the panel's weights, read from memory by one core,
// serves every row while it is in L1 (2-core Ice Lake, float32: 2-7% faster than two blocks of 96).
constexpr int64_t kTaskRows = 2 * kGemmRows;
constexpr int64_t kGemmCols = 64;  // output columns per packed panel: 4 vectors of 16 floats

// x, w_packed, out and addend hold bfloat16 bits (uint16) for the bfloat16 kernels, float32 values
// for the float32 one.
struct GemmArgs {
  const void* x;  // (batch, positions, channels), row-contiguous
  // w (out_channels, taps, channels) packed per panel of kGemmCols outputs and tap, in 32-bit words
  // (a bfloat16 channel pair, or one float32 channel): (words, kGemmCols), so one load holds 16
  // outputs' words, as the instructions take them.
  const void* w_packed;
  const float* bias;  // (out_channels) or null
  // (batch, out_rows, out_channels), row-contiguous. Of the `rows` computed, row m is written only
  // if m % row_period < row_valid, to row (m / row_period) row_valid + m % row_period: a
  // convolution over a padded map drops the columns that fall on the padding.
  void* out;
  const void* addend;  // null, or like out: added to the float32 sums (before the rounding)
  const int64_t* offsets;  // taps
  int64_t batch, positions, channels, rows, out_channels, taps;
  int64_t row_period, row_valid, out_rows;
};

// Rows [m0, m1) of batch item `b`, columns of `panel`: at most kTaskRows rows (kGemmRows for AMX).
void gemm_bf16_task_avx512bf16(const GemmArgs&, int64_t b, int64_t m0, int64_t m1, int64_t panel);
void gemm_bf16_task_amx(const GemmArgs&, int64_t b, int64_t m0, int64_t m1, int64_t panel);
void gemm_f32_task_avx512(const GemmArgs&, int64_t b, int64_t m0, int64_t m1, int64_t panel);
void gemm_f32_task_avx2(const GemmArgs&, int64_t b, int64_t m0, int64_t m1, int64_t panel);

// The epilogue's two lookups, shared by the kernels (plain code, no standard library inline
// functions): the columns of `panel` that are outputs (kGemmCols but in a last, partial panel)
// with their bias copied to `bias` (zeros past them, or all zeros without a bias); and where
// computed row m of batch item b goes, the offset of its column o0 in out (and addend), or -1
// for a row that falls on the padding (see row_period). Static: each kernel keeps its own copy,
// compiled with its flags, where an inline function's one merged copy might not be.
static inline int64_t panel_columns(const GemmArgs& a, int64_t panel, float* bias) {
  const int64_t o0 = panel * kGemmCols;
  const int64_t cols = a.out_channels - o0 < kGemmCols ? a.out_channels - o0 : kGemmCols;
  for (int64_t j = 0; j < kGemmCols; ++j) bias[j] = a.bias != nullptr && j < cols ? a.bias[o0 + j] : 0.0f;
  return cols;
}

static inline int64_t output_offset(const GemmArgs& a, int64_t b, int64_t m, int64_t o0) {
  const int64_t in_period = m % a.row_period;
  if (in_period >= a.row_valid) return -1;
  return (b * a.out_rows + m / a.row_period * a.row_valid + in_period) * a.out_channels + o0;
}

// The vector kernels' task: for each tap, in passes of kWordsPerPass words of the panel (a 32 KB
// slice, read by every register group of the task while it is in L1/L2), the task's rows in groups
// of R, the last one smaller: tile.template operator()<rows>(m, t, w0, w1, partial, first, last)
// computes `rows` rows from m over words [w0, w1) of tap t, carrying its sums in `partial` (rows x
// kGemmCols floats) from the first pass to the last. Written without the standard library's inline
// functions, so that nothing compiled with a kernel's -m flags is merged into baseline code.
constexpr int64_t kWordsPerPass = 128;

template <int R, class Tile>
inline void last_rows(int64_t n, int64_t m, int64_t t, int64_t w0, int64_t w1, float* partial, bool first, bool last,
                      Tile& tile) {
  if constexpr (R > 0) {
    if (n == R)
      tile.template operator()<R>(m, t, w0, w1, partial, first, last);
    else
      last_rows<R - 1>(n, m, t, w0, w1, partial, first, last, tile);
  }
}

template <int R, class Tile>
inline void for_passes_and_groups(const GemmArgs& a, int64_t m0, int64_t m1, int64_t words, Tile&& tile) {
  alignas(64) float partial[kTaskRows * kGemmCols];  // the sums between passes, per row
  for (int64_t t = 0; t < a.taps; ++t)
    for (int64_t w0 = 0; w0 < words; w0 += kWordsPerPass) {
      const int64_t w1 = words - w0 < kWordsPerPass ? words : w0 + kWordsPerPass;
      const bool first = t == 0 && w0 == 0, last = t == a.taps - 1 && w1 == words;
      int64_t m = m0;
      for (; m + R <= m1; m += R) tile.template operator()<R>(m, t, w0, w1, partial + (m - m0) * kGemmCols, first, last);
      last_rows<R - 1>(m1 - m, m, t, w0, w1, partial + (m - m0) * kGemmCols, first, last, tile);
    }
}

// The float32 kernels' task over the rows [m0, m1) of `panel`: for_passes_and_groups over all
// channels, with tile.template operator()<R, prefetch>(m, t, c0, c1, partial, first, last). The
// weights of the next pass (the panel's next channels, tap or panel: they follow in memory) are
// asked into L2 meanwhile. In a task of at most kGemmRows rows the first group does it, within its
// loop (prefetch = true). A task over all the rows of a product of few (kTaskRows) reads its
// weights from memory, and there the groups share it, each asking its part before its loop: the
// text encoder's products were 3-4% faster than with the first group asking all (2-core Ice
// Lake), where the UNet's were 2-5% slower, their weights mostly in L2 already.
template <int R, class Tile>
inline void f32_passes(const GemmArgs& a, int64_t panel, int64_t m0, int64_t m1, Tile&& tile) {
  constexpr int64_t kPassLines = kWordsPerPass * kGemmCols * 4 / 64;
  const bool shared = m1 - m0 > kGemmRows;
  const int64_t groups = (m1 - m0 + R - 1) / R;
  const char* panel_w = static_cast<const char*>(a.w_packed) + panel * a.taps * a.channels * kGemmCols * 4;
  for_passes_and_groups<R>(a, m0, m1, a.channels,
      [&]<int N>(int64_t m, int64_t t, int64_t c0, int64_t c1, float* partial, bool first, bool last) {
        if (shared) {
          const char* next = panel_w + (t * a.channels + c0 + kWordsPerPass) * kGemmCols * 4;
          const int64_t g = (m - m0) / R;
          for (int64_t line = g * kPassLines / groups; line < (g + 1) * kPassLines / groups; ++line)
            __builtin_prefetch(next + line * 64, 0, 2);  // prefetcht1: into L2
          tile.template operator()<N, false>(m, t, c0, c1, partial, first, last);
        } else if (m == m0) {
          tile.template operator()<N, true>(m, t, c0, c1, partial, first, last);
        } else {
          tile.template operator()<N, false>(m, t, c0, c1, partial, first, last);
        }
      });
}

// The AMX tasks need the tile configuration loaded on their thread (ldtilecfg is per thread, and
// another library on the thread may load its own): once per thread per product, before its first
// task; release puts the tiles back in their initial state, so that the thread's context switches
// stop saving 8 KB of tile data. Linux must have granted the process the tile state first
// (arch_prctl ARCH_REQ_XCOMP_PERM, native.cpp), or the first tile instruction faults.
void amx_configure();
void amx_release();

}  // namespace sd_native
