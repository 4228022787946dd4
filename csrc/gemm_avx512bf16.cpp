// The bfloat16 product kernel for CPUs with AVX512_BF16 (compiled with its -m flags; native.cpp
// calls it only where the CPU has the instruction). Like flash_kernel.inc, it uses no inline
// function of the standard library, so nothing compiled here is merged into baseline code.
#include <immintrin.h>

#include "gemm.h"

namespace {

using sd_native::GemmArgs;
using sd_native::kGemmCols;

constexpr int kRegisterRows = 6;  // 6 rows x 4 vectors = 24 accumulators of the 32 registers
constexpr int kVectors = kGemmCols / 16;

// R output rows from row m0, all kGemmCols columns of one panel, channel pairs [p0, p1) of tap t.
// The sums carry over between passes in `partial` (R x kGemmCols floats); the last pass adds the
// bias and writes bfloat16.
template <int R>
void tile(const GemmArgs& a, int64_t b, int64_t m0, int64_t panel, int64_t t, int64_t p0, int64_t p1,
          float* partial, bool first, bool last) {
  const int64_t pairs = a.channels / 2;
  __m512 acc[R][kVectors];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < kVectors; ++c)
      acc[r][c] = first ? _mm512_setzero_ps() : _mm512_load_ps(partial + r * kGemmCols + c * 16);
  const uint16_t* rows[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) rows[r] = static_cast<const uint16_t*>(a.x) + (b * a.positions + m0 + r + a.offsets[t]) * a.channels;
  const uint16_t* wt = static_cast<const uint16_t*>(a.w_packed) + ((panel * a.taps + t) * pairs) * kGemmCols * 2;
  for (int64_t p = p0; p < p1; ++p) {
    __m512bh wv[kVectors];
#pragma GCC unroll 4
    for (int c = 0; c < kVectors; ++c) wv[c] = (__m512bh)_mm512_loadu_si512(wt + (p * kGemmCols + c * 16) * 2);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      int pair;
      __builtin_memcpy(&pair, rows[r] + 2 * p, sizeof pair);
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
      for (int c = 0; c < kVectors; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], xv, wv[c]);
    }
  }
  if (!last) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int c = 0; c < kVectors; ++c) _mm512_store_ps(partial + r * kGemmCols + c * 16, acc[r][c]);
    return;
  }
  const int64_t o0 = panel * kGemmCols;
  alignas(64) float bias[kGemmCols];
  const int64_t cols = sd_native::panel_columns(a, panel, bias);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const int64_t at = sd_native::output_offset(a, b, m0 + r, o0);
    if (at < 0) continue;
    alignas(64) uint16_t row[kGemmCols] = {};
    if (a.addend != nullptr) __builtin_memcpy(row, static_cast<const uint16_t*>(a.addend) + at, cols * sizeof(uint16_t));
#pragma GCC unroll 4
    for (int c = 0; c < kVectors; ++c) {
      __m512 y = _mm512_add_ps(acc[r][c], _mm512_load_ps(bias + c * 16));
      if (a.addend != nullptr) {  // bfloat16 bits are the high half of a float32's
        const __m512i wide = _mm512_cvtepu16_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(row + c * 16)));
        y = _mm512_add_ps(y, _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16)));
      }
      _mm256_store_si256(reinterpret_cast<__m256i*>(row + c * 16), (__m256i)_mm512_cvtneps_pbh(y));
    }
    __builtin_memcpy(static_cast<uint16_t*>(a.out) + at, row, cols * sizeof(uint16_t));
  }
}

}  // namespace

namespace sd_native {

void gemm_bf16_task_avx512bf16(const GemmArgs& a, int64_t b, int64_t m0, int64_t m1, int64_t panel) {
  for_passes_and_groups<kRegisterRows>(a, m0, m1, a.channels / 2,
      [&]<int R>(int64_t m, int64_t t, int64_t p0, int64_t p1, float* partial, bool first, bool last) {
        tile<R>(a, b, m, panel, t, p0, p1, partial, first, last);
      });
}

}  // namespace sd_native
