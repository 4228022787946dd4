// The bfloat16 product kernel for CPUs with AMX (Sapphire Rapids and later): the same tasks as
// gemm_avx512bf16.cpp, with the sums in tile registers through tdpbf16ps, which multiplies a
// 16 x 32 bfloat16 tile by a 32 x 16 one (held as 16 rows of 16 channel pairs) into 16 x 16
// floats. Compiled with AMX's and AVX-512's -m flags; native.cpp calls it only where the CPU has
// AMX and Linux has granted this process the tile state (gemm.h). Like the other kernel it
// uses no inline function of the standard library. Measured on 2 Sapphire Rapids cores shared
// with another job: a UNet linear layer (2, 4096, 320) -> 1280 in 15-19 ms against 83-86 ms by
// the AVX512_BF16 kernel; a 3x3 convolution 320 -> 320 on 2 x 64x64 in 28-37 ms against 165-190.
//
// Tiles: 0-3 the sums of 32 rows x 32 outputs (2 x 2), 4-5 two row groups' inputs, 6-7 two
// output groups' weights. The packed weights need no other layout: a channel pair of a panel is
// 64 outputs x 2 values, 256 bytes, so the 16 pairs of a chunk for 16 outputs are a tile of 16
// rows of 64 bytes, 256 bytes apart.
#include "amx.h"
#include "gemm.h"

namespace {

using sd_native::GemmArgs;
using sd_native::kGemmCols;
using sd_native::kGemmRows;
using sd_native::kTileRows;
using sd_native::load_block;
using sd_native::multiply_block;
using sd_native::store_block;
using sd_native::zero_block;

constexpr int64_t kChunkPairs = sd_native::kTilePairs;  // a tile's depth: 32 channels
constexpr int64_t kPanelRowBytes = kGemmCols * 2 * 2;  // one channel pair of a panel
static_assert(kGemmRows % (2 * kTileRows) == 0 && kGemmCols == 4 * 16, "tasks hold whole 2 x 2 tile blocks");

// Chunks per pass, at most: a pass's weights for the panel (8 chunks x 4 KB) and its inputs for
// one row pair (32 rows x 256 channels, 16 KB) fit Sapphire Rapids' 48 KB L1 while the other row
// pairs and output halves use them; the sums go to `partial` between passes. Measured on a
// 2-core Sapphire Rapids shared with another job (bench/bf16_kernels.py, so +-30%): 4 chunks took
// the UNet's 3x3 convolution 320 -> 320 on 64x64 from 28-37 ms to 52 ms; 16 was not different.
constexpr int64_t kChunksPerPass = 8;

struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Where a row group's input tile for chunk k of one tap comes from: straight from x when its 16
// rows and 32 channels all exist, else from `scratch`, filled with them and zeros (the last rows
// of a product, and channels past the last multiple of 32).
struct Source {
  const void* data;
  int64_t stride;
};

Source input_tile(const uint16_t* xt, int64_t channels, int64_t row0, int64_t rows, int64_t k, uint16_t* scratch) {
  const int64_t c0 = k * 2 * kChunkPairs;
  const int64_t n = rows - row0 < kTileRows ? rows - row0 : kTileRows;
  const int64_t cols = channels - c0 < 2 * kChunkPairs ? channels - c0 : 2 * kChunkPairs;
  if (n == kTileRows && cols == 2 * kChunkPairs) return {xt + row0 * channels + c0, channels * 2};
  // A row of the tile is 32 values, 64 bytes: one masked load (which reads nothing past `cols`).
  const __mmask32 valid = cols == 32 ? ~__mmask32{0} : (__mmask32{1} << cols) - 1;
  for (int64_t i = 0; i < kTileRows; ++i)
    _mm512_store_si512(scratch + i * 2 * kChunkPairs,
                       i < n ? _mm512_maskz_loadu_epi16(valid, xt + (row0 + i) * channels + c0) : _mm512_setzero_si512());
  return {scratch, 2 * kChunkPairs * 2};
}

}  // namespace

namespace sd_native {

void amx_configure() {
  TileConfig config = {};
  config.palette = 1;
  for (int i = 0; i < 8; ++i) {
    config.colsb[i] = 64;
    config.rows[i] = kTileRows;
  }
  __asm__ volatile("ldtilecfg %0" ::"m"(config));
}

void amx_release() { _tile_release(); }

void gemm_bf16_task_amx(const GemmArgs& a, int64_t b, int64_t m0, int64_t m1, int64_t panel) {
  const int64_t rows = m1 - m0;  // at most kGemmRows (its ProductKernel's task_rows)
  const int64_t pairs = a.channels / 2;
  const int64_t chunks = (pairs + kChunkPairs - 1) / kChunkPairs;
  const int64_t tail_pairs = pairs - (chunks - 1) * kChunkPairs;  // in the last chunk, 1 to 16
  const int64_t row_pairs = (rows + 2 * kTileRows - 1) / (2 * kTileRows);
  // The taps' chunks, in order, are the steps of the sums; passes of equal size over them, across
  // taps (a 3x3 convolution of 320 channels: 90 steps as 12 passes, where passes within a tap
  // would take 18, each loading and storing the sums).
  const int64_t steps = a.taps * chunks;
  const int64_t passes = (steps + kChunksPerPass - 1) / kChunksPerPass;
  const int64_t per_pass = (steps + passes - 1) / passes;
  const bool tails = tail_pairs < kChunkPairs;
  alignas(64) float partial[kGemmRows * kGemmCols];  // the sums between passes, per row
  alignas(64) uint16_t scratch[2][kTileRows * 2 * kChunkPairs];
  // A pass's last chunks of taps when they have fewer than 16 pairs, zero past them: the tile
  // must not read the next tap's weights (or past the end), whose values could be infinite.
  alignas(64) uint16_t tail_w[kChunksPerPass][kChunkPairs * kGemmCols * 2];
  constexpr int64_t kChunkWords = kChunkPairs * kGemmCols * 2;
  const uint16_t* panel_w = static_cast<const uint16_t*>(a.w_packed) + panel * a.taps * pairs * kGemmCols * 2;
  if (steps == 0)  // no channels (or taps): the outputs are the bias
    for (int64_t i = 0; i < kGemmRows * kGemmCols; ++i) partial[i] = 0.0f;
  for (int64_t s0 = 0; s0 < steps; s0 += per_pass) {
    const int64_t s1 = steps - s0 < per_pass ? steps : s0 + per_pass;
    if (tails)
      for (int64_t s = s0; s < s1; ++s)
        if (s % chunks == chunks - 1) {
          const uint16_t* src = panel_w + (s / chunks * pairs + (chunks - 1) * kChunkPairs) * kGemmCols * 2;
          for (int64_t i = 0; i < kChunkWords; ++i) tail_w[s - s0][i] = i < tail_pairs * kGemmCols * 2 ? src[i] : 0;
        }
    for (int64_t rp = 0; rp < row_pairs; ++rp)
      for (int64_t half = 0; half < 2; ++half) {
        float* c = partial + rp * 2 * kTileRows * kGemmCols + half * 32;
        if (s0 == 0)
          zero_block();
        else
          load_block(c, kGemmCols);
        const int64_t row0 = rp * 2 * kTileRows, row1 = row0 + kTileRows;
        int64_t t = s0 / chunks, k = s0 % chunks;
        for (int64_t s = s0; s < s1; ++s) {
          const uint16_t* xt = static_cast<const uint16_t*>(a.x) + (b * a.positions + m0 + a.offsets[t]) * a.channels;
          const Source top = input_tile(xt, a.channels, row0, rows, k, scratch[0]);
          // A block whose last row pair has one group: its second (zeros) adds nothing.
          const Source bottom = row1 < rows ? input_tile(xt, a.channels, row1, rows, k, scratch[1]) : Source{};
          const uint16_t* w = tails && k == chunks - 1 ? tail_w[s - s0]
                                                       : panel_w + (t * pairs + k * kChunkPairs) * kGemmCols * 2;
          multiply_block(top.data, top.stride, bottom.data, bottom.stride, w + half * 32 * 2, w + (half * 32 + 16) * 2,
                         kPanelRowBytes);
          if (++k == chunks) {
            k = 0;
            ++t;
          }
        }
        store_block(c, kGemmCols);
      }
  }
  // As gemm_avx512bf16.cpp: bias, addend, one rounding to bfloat16, the dropped rows skipped.
  const int64_t o0 = panel * kGemmCols;
  alignas(64) float bias[kGemmCols];
  const int64_t cols = panel_columns(a, panel, bias);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t at = output_offset(a, b, m0 + r, o0);
    if (at < 0) continue;
    alignas(64) uint16_t row[kGemmCols] = {};
    if (a.addend != nullptr) __builtin_memcpy(row, static_cast<const uint16_t*>(a.addend) + at, cols * sizeof(uint16_t));
#pragma GCC unroll 4
    for (int c = 0; c < kGemmCols / 16; ++c) {
      __m512 y = _mm512_add_ps(_mm512_load_ps(partial + r * kGemmCols + c * 16), _mm512_load_ps(bias + c * 16));
      if (a.addend != nullptr) {  // bfloat16 bits are the high half of a float32's
        const __m512i wide = _mm512_cvtepu16_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(row + c * 16)));
        y = _mm512_add_ps(y, _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16)));
      }
      _mm256_store_si256(reinterpret_cast<__m256i*>(row + c * 16), (__m256i)_mm512_cvtneps_pbh(y));
    }
    __builtin_memcpy(static_cast<uint16_t*>(a.out) + at, row, cols * sizeof(uint16_t));
  }
}

}  // namespace sd_native
