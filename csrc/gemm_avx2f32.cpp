// The float32 product kernel for CPUs with AVX2 and FMA but not AVX-512 (compiled with -mavx2
// -mfma; native.cpp calls it only where the CPU has them). gemm_avx512f32.cpp's passes, groups
// and panels, with 16 registers of 8 floats: a group of rows takes the panel's 64 columns as four
// quarters of 16, each summed in 6 x 2 registers over the pass's channels (the rows' values are
// read again per quarter, from L1); the sums carry over between passes in `partial` as there.
#include <immintrin.h>

#include "gemm.h"

namespace {

using sd_native::GemmArgs;
using sd_native::kGemmCols;

constexpr int kRegisterRows = 6;  // 6 rows x 2 vectors = 12 accumulators of the 16 registers
constexpr int kQuarter = 16;      // columns per quarter: 2 vectors of 8

template <int R, bool kPrefetch>
void tile(const GemmArgs& a, int64_t b, int64_t m0, int64_t panel, int64_t t, int64_t c0, int64_t c1,
          float* partial, bool first, bool last) {
  const float* rows[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    rows[r] = static_cast<const float*>(a.x) + (b * a.positions + m0 + r + a.offsets[t]) * a.channels;
  const float* wt = static_cast<const float*>(a.w_packed) + (panel * a.taps + t) * a.channels * kGemmCols;
  const int64_t o0 = panel * kGemmCols;
  alignas(64) float bias[kGemmCols];
  const int64_t cols = last ? sd_native::panel_columns(a, panel, bias) : 0;
  float* out = static_cast<float*>(a.out);
  const float* addend = static_cast<const float*>(a.addend);
  for (int q = 0; q < kGemmCols / kQuarter; ++q) {
    const int64_t j0 = q * kQuarter;
    __m256 acc[R][2];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
      for (int c = 0; c < 2; ++c)
        acc[r][c] = first ? _mm256_setzero_ps() : _mm256_load_ps(partial + r * kGemmCols + j0 + c * 8);
    for (int64_t ch = c0; ch < c1; ++ch) {
      const float* w = wt + ch * kGemmCols + j0;
      const __m256 w0 = _mm256_loadu_ps(w), w1 = _mm256_loadu_ps(w + 8);
      // The first group asks the next pass's weights into L2 (one line per channel and quarter).
      if constexpr (kPrefetch) _mm_prefetch(reinterpret_cast<const char*>(w + sd_native::kWordsPerPass * kGemmCols), _MM_HINT_T1);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m256 xv = _mm256_broadcast_ss(rows[r] + ch);
        acc[r][0] = _mm256_fmadd_ps(xv, w0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(xv, w1, acc[r][1]);
      }
    }
    if (!last) {
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
        for (int c = 0; c < 2; ++c) _mm256_store_ps(partial + r * kGemmCols + j0 + c * 8, acc[r][c]);
      continue;
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const int64_t at = sd_native::output_offset(a, b, m0 + r, o0);
      if (at < 0) continue;
#pragma GCC unroll 2
      for (int c = 0; c < 2; ++c) {
        const int64_t j = j0 + c * 8;
        if (j >= cols) break;
        // The columns of this vector that exist: all 8 but in a last panel of fewer outputs.
        const int n = cols - j >= 8 ? 8 : static_cast<int>(cols - j);
        const __m256i valid = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        __m256 y = _mm256_add_ps(acc[r][c], _mm256_load_ps(bias + j));
        if (addend != nullptr) y = _mm256_add_ps(y, _mm256_maskload_ps(addend + at + j, valid));
        _mm256_maskstore_ps(out + at + j, valid, y);
      }
    }
  }
}

}  // namespace

namespace sd_native {

void gemm_f32_task_avx2(const GemmArgs& a, int64_t b, int64_t m0, int64_t m1, int64_t panel) {
  f32_passes<kRegisterRows>(a, panel, m0, m1, [&]<int R, bool kPrefetch>(int64_t m, int64_t t, int64_t c0, int64_t c1,
                                                                  float* partial, bool first, bool last) {
    tile<R, kPrefetch>(a, b, m, panel, t, c0, c1, partial, first, last);
  });
}

}  // namespace sd_native
