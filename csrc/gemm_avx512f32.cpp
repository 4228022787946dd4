// The float32 product kernel for CPUs with AVX-512 (compiled with its -m flags; native.cpp calls
// it only where the CPU has the instructions). The structure of gemm_avx512bf16.cpp with one
// float32 channel per 32-bit word of the panel and an FMA in place of the pair's dot product: a
// 3x3 convolution's nine taps are summed in registers (and a pass's partial sums in L1), and each
// output is written once, where a BLAS takes nine products that each read and write the output.
#include <immintrin.h>

#include "gemm.h"

namespace {

using sd_native::GemmArgs;
using sd_native::kGemmCols;

constexpr int kRegisterRows = 6;  // 6 rows x 4 vectors = 24 accumulators of the 32 registers
constexpr int kVectors = kGemmCols / 16;

// R output rows from row m0, all kGemmCols columns of one panel, channels [c0, c1) of tap t. The
// sums carry over between passes in `partial` (R x kGemmCols floats); the last pass adds the bias
// and the addend and writes the outputs. With kPrefetch (see f32_passes), the weights of the next
// pass are asked into L2 meanwhile: the row blocks of the text encoder's products read a layer's
// weights from memory, and the first group of each pass waited for them (3-6% of the product).
template <int R, bool kPrefetch>
void tile(const GemmArgs& a, int64_t b, int64_t m0, int64_t panel, int64_t t, int64_t c0, int64_t c1,
          float* partial, bool first, bool last) {
  __m512 acc[R][kVectors];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < kVectors; ++c)
      acc[r][c] = first ? _mm512_setzero_ps() : _mm512_load_ps(partial + r * kGemmCols + c * 16);
  const float* rows[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    rows[r] = static_cast<const float*>(a.x) + (b * a.positions + m0 + r + a.offsets[t]) * a.channels;
  const float* wt = static_cast<const float*>(a.w_packed) + (panel * a.taps + t) * a.channels * kGemmCols;
  for (int64_t ch = c0; ch < c1; ++ch) {
    __m512 wv[kVectors];
#pragma GCC unroll 4
    for (int c = 0; c < kVectors; ++c) wv[c] = _mm512_loadu_ps(wt + ch * kGemmCols + c * 16);
    if constexpr (kPrefetch) {
      const char* next = reinterpret_cast<const char*>(wt + (ch + sd_native::kWordsPerPass) * kGemmCols);
#pragma GCC unroll 4
      for (int c = 0; c < kVectors; ++c) _mm_prefetch(next + c * 64, _MM_HINT_T1);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_set1_ps(rows[r][ch]);
#pragma GCC unroll 4
      for (int c = 0; c < kVectors; ++c) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
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
  float* out = static_cast<float*>(a.out);
  const float* addend = static_cast<const float*>(a.addend);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const int64_t at = sd_native::output_offset(a, b, m0 + r, o0);
    if (at < 0) continue;
#pragma GCC unroll 4
    for (int c = 0; c < kVectors; ++c) {
      const int64_t j = c * 16;
      if (j >= cols) break;
      // The columns of this vector that exist: all 16 but in a last panel of fewer outputs.
      const __mmask16 valid = cols - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (cols - j)) - 1);
      __m512 y = _mm512_add_ps(acc[r][c], _mm512_load_ps(bias + j));
      if (addend != nullptr) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(valid, addend + at + j));
      _mm512_mask_storeu_ps(out + at + j, valid, y);
    }
  }
}

}  // namespace

namespace sd_native {

void gemm_f32_task_avx512(const GemmArgs& a, int64_t b, int64_t m0, int64_t m1, int64_t panel) {
  f32_passes<kRegisterRows>(a, panel, m0, m1, [&]<int R, bool kPrefetch>(int64_t m, int64_t t, int64_t c0, int64_t c1,
                                                                  float* partial, bool first, bool last) {
    tile<R, kPrefetch>(a, b, m, panel, t, c0, c1, partial, first, last);
  });
}

}  // namespace sd_native
