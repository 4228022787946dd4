// bfloat16 products with float32 accumulation through AVX512_BF16's dot-product instruction
// (vdpbf16ps) or AMX's tile product (tdpbf16ps): the interface shared by the primitive
// (native.cpp) and the kernels (gemm_avx512bf16.cpp, gemm_amx.cpp, each compiled with its -m
// flags, used only where the CPU has the instructions).
//
// One kernel serves linear layers and convolutions. With T taps at row offsets off[t],
//   out[b, m, o] = bias[o] + sum_t sum_c x[b, m + off[t], c] w[o, t, c]
// a linear layer is T = 1, off = {0}; a 3x3 convolution with stride 1 and padding 1 is T = 9 over
// the padded input flattened to rows of W + 2 pixels, off[t] = dy (W + 2) + dx (see ops.conv3x3).
#pragma once

#include <cstdint>

namespace sd_native {

constexpr int64_t kGemmRows = 96;  // output rows per task: 16 register groups of 6
constexpr int64_t kGemmCols = 64;  // output columns per packed panel: 4 vectors of 16 floats

struct GemmArgs {
  const uint16_t* x;  // (batch, positions, channels), row-contiguous bfloat16 bits
  // w (out_channels, taps, channels) packed per panel of kGemmCols outputs, tap and channel pair:
  // (kGemmCols, 2) values, so one load holds 16 outputs' pairs, as the instruction takes them.
  const uint16_t* w_packed;
  const float* bias;  // (out_channels) or null
  // (batch, out_rows, out_channels), row-contiguous bfloat16 bits. Of the `rows` computed, row m is
  // written only if m % row_period < row_valid, to row (m / row_period) row_valid + m % row_period:
  // a convolution over a padded map drops the columns that fall on the padding.
  uint16_t* out;
  const uint16_t* addend;  // null, or bfloat16 like out: added to the sums before the rounding
  const int64_t* offsets;  // taps
  int64_t batch, positions, channels, rows, out_channels, taps;
  int64_t row_period, row_valid, out_rows;
};

// Row block `row_block` (of kGemmRows) of batch item `b`, columns of `panel`.
void gemm_bf16_task_avx512bf16(const GemmArgs&, int64_t b, int64_t row_block, int64_t panel);
void gemm_bf16_task_amx(const GemmArgs&, int64_t b, int64_t row_block, int64_t panel);

// The AMX tasks need the tile configuration loaded on their thread (ldtilecfg is per thread, and
// another library on the thread may load its own): once per thread per product, before its first
// task; release puts the tiles back in their initial state, so that the thread's context switches
// stop saving 8 KB of tile data. Linux must have granted the process the tile state first
// (arch_prctl ARCH_REQ_XCOMP_PERM, native.cpp), or the first tile instruction faults.
void amx_configure();
void amx_release();

}  // namespace sd_native
