// Flash attention in bfloat16 on AMX tiles (Sapphire Rapids and later): the float32 kernel's
// online softmax (flash_kernel.inc) with its two products, q k^T and weights times v, as tile
// products (tdpbf16ps: a 16 x 32 bfloat16 tile times 16 rows of 16 pairs into 16 x 16 floats).
// Compiled with AMX's and AVX-512's -m flags; native.cpp calls it only where the CPU has AMX and
// Linux has granted the tile state, on threads with the tile configuration loaded (amx.h).
//
// A task is kAmxQueryRows queries of one head. Per key tile of kAmxKeys keys: the scores, in blocks
// of 2 x 2 tiles (32 queries x 32 keys) over the depth's 32-value chunks, stored as float32; each
// row's softmax step, its weights rounded to bfloat16; the output's float32 sums, rescaled, back
// into tiles, and 2 x 2 blocks (32 queries x 32 values) over the key tile's 32-key chunks.
#include "amx.h"
#include "flash_attention.h"
#include "gemm.h"

#define FLASH_W 16
#include "flash_vector.inc"

namespace {

using sd_native::FlashAmxArgs;
using sd_native::kAmxQueryRows;
using sd_native::kAmxKeys;
using sd_native::kTilePairs;
using sd_native::kTileRows;
using sd_native::load_block;
using sd_native::multiply_block;
using sd_native::store_block;
using sd_native::zero_block;

constexpr int64_t kBlock = 2 * kTileRows;  // rows (and columns) of a 2 x 2 block of tiles
static_assert(kAmxQueryRows % kBlock == 0 && kAmxKeys % kBlock == 0, "tasks and key tiles hold whole blocks");
static_assert(sd_native::kAmxDepthStep == 2 * kTilePairs, "the depth is padded to whole tiles");

struct Scratch {
  uint16_t* q;   // (kAmxQueryRows, d_padded): the task's queries, zero-padded
  float* s;      // (kAmxQueryRows, kAmxKeys): scores, then weights
  uint16_t* p;   // (kAmxQueryRows, kAmxKeys): weights in bfloat16
  float* o;      // (kAmxQueryRows, d_padded): unnormalised output
  float* m;      // running maximum per row
  float* l;      // running sum per row
  float* alpha;  // per key tile: the rescaling of the sums before it
};

Scratch carve(void* scratch, int64_t dp) {
  Scratch t;
  char* at = static_cast<char*>(scratch);
  auto take = [&](int64_t bytes) {
    char* here = at;
    at += (bytes + 63) / 64 * 64;
    return here;
  };
  t.q = reinterpret_cast<uint16_t*>(take(kAmxQueryRows * dp * 2));
  t.s = reinterpret_cast<float*>(take(kAmxQueryRows * kAmxKeys * 4));
  t.p = reinterpret_cast<uint16_t*>(take(kAmxQueryRows * kAmxKeys * 2));
  t.o = reinterpret_cast<float*>(take(kAmxQueryRows * dp * 4));
  t.m = reinterpret_cast<float*>(take(kAmxQueryRows * 4));
  t.l = reinterpret_cast<float*>(take(kAmxQueryRows * 4));
  t.alpha = reinterpret_cast<float*>(take(kAmxQueryRows * 4));
  return t;
}

// Round to nearest even: the instruction's rounding, as the product kernels round their outputs.
inline void to_bf16(uint16_t* dst, vf x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), (__m256i)_mm512_cvtneps_pbh((__m512)x));
}

// 2**y for y <= 0 within 3e-6 (relative) of it, as exp2v but by a degree-4 polynomial (fitted
// here to the relative error on [-1/2, 1/2]): the weights it gives are rounded to bfloat16, whose
// spacing is 4e-3, so the float32 kernel's degree 6 would spend time on digits that are dropped.
inline vf exp2_short(vf y) {
  const vf low = splat(-127.0f);
  y = y < low ? low : y;
  const vf round = splat(12582912.0f);
  const vf r = y + round;
  const vi n = reinterpret_cast<vi>(r) - 0x4B400000;
  const vf f = y - (r - round);
  const vf f2 = f * f;
  const vf poly = (0.9999992847442627f + 0.6931217908859253f * f) +
                  f2 * ((0.240247443318367f + 0.05591786280274391f * f) + f2 * 0.009570098482072353f);
  return poly * reinterpret_cast<vf>((n + 127) << 23);
}

// Above this (log2 units, 2**22) the scores' scaling rounds by more than 1/4: see softmax_row_bf16.
constexpr float kExactMax = 4194304.0f;

// softmax_row (flash_vector.inc) for unscaled scores: `scale` applied on the way, the weights
// written as bfloat16 into `p`, in two passes over the row instead of five.
inline void softmax_row_bf16(float* row, uint16_t* p, float scale, const float* mask, int64_t step, int64_t keys,
                             int64_t keys_r, float& m, float& l, float& alpha) {
  if (mask != nullptr || !(scale > 0.0f)) {  // the mask (log2 units) adds to scaled scores; max needs scale > 0
    for (int64_t j = 0; j < keys; ++j) row[j] = row[j] * scale + (mask != nullptr ? mask[j * step] : 0.0f);
    scale = 1.0f;
  }
  for (int64_t j = keys; j < keys_r; ++j) row[j] = kEmpty;
  vf vmax = load(row);
  for (int64_t j = W; j < keys_r; j += W) {
    const vf x = load(row + j);
    vmax = x > vmax ? x : vmax;
  }
  const float tile_max = _mm512_reduce_max_ps((__m512)vmax) * scale;
  // The weights below take score * scale - max as one fused multiply-add, exact, while max is
  // rounded: the row's largest score gets an exponent up to half an ulp of max away from 0, which
  // beyond 2**22 is no longer small (past 2**32, below -127: every weight 0, the output NaN; above
  // 127: the exponent field overflowed). Such rows are scaled first, as the mask's are.
  if (scale != 1.0f && !(tile_max < kExactMax && tile_max > -kExactMax)) {
    for (int64_t j = 0; j < keys; ++j) row[j] *= scale;
    scale = 1.0f;
  }
  const float m_new = tile_max > m ? tile_max : m;
  alpha = exp2v(splat(m - shift_of(m_new)))[0];
  const vf shift = splat(shift_of(m_new)), by = splat(scale);
  vf vsum = vf{};
  for (int64_t j = 0; j < keys_r; j += W) {
    const vf x = exp2_short(load(row + j) * by - shift);
    to_bf16(p + j, x);
    vsum += x;
  }
  l = l * alpha + _mm512_reduce_add_ps((__m512)vsum);
  m = m_new;
}

// The scores of rows [r0, r0 + 32) and keys [j0, j0 + 32): q (rows, dp) times the key tile's
// pairs (dp / 2, kAmxKeys, 2), into s (rows, kAmxKeys).
void score_block(const uint16_t* q, int64_t dp, const uint16_t* kp, float* s, int64_t r0, int64_t j0) {
  zero_block();
  constexpr int64_t kRowBytes = kAmxKeys * 2 * 2;  // one pair of K's depth for every key
  for (int64_t c = 0; c < dp; c += 2 * kTilePairs) {
    const uint16_t* k = kp + (c / 2) * kAmxKeys * 2 + j0 * 2;
    multiply_block(q + r0 * dp + c, dp * 2, q + (r0 + kTileRows) * dp + c, dp * 2, k, k + kTileRows * 2, kRowBytes);
  }
  store_block(s + r0 * kAmxKeys + j0, kAmxKeys);
}

// o[r0 .. r0 + 32, c0 .. c0 + 32) += p (rows, kAmxKeys) times the value tile's pairs
// (kAmxKeys / 2, dp, 2), over the first `keys_r` keys (a multiple of 32).
void output_block(const uint16_t* p, const uint16_t* vp, int64_t dp, int64_t keys_r, float* o, int64_t r0,
                  int64_t c0) {
  load_block(o + r0 * dp + c0, dp);
  for (int64_t j = 0; j < keys_r; j += 2 * kTilePairs) {
    const uint16_t* v = vp + (j / 2) * dp * 2 + c0 * 2;
    multiply_block(p + r0 * kAmxKeys + j, kAmxKeys * 2, p + (r0 + kTileRows) * kAmxKeys + j, kAmxKeys * 2, v,
                   v + kTileRows * 2, dp * 4);
  }
  store_block(o + r0 * dp + c0, dp);
}

}  // namespace

namespace sd_native {

int64_t amx_scratch_bytes(int64_t d_padded) {
  const int64_t q = kAmxQueryRows;
  return (q * d_padded * 2 + 63) / 64 * 64 + q * kAmxKeys * 4 + q * kAmxKeys * 2 + q * d_padded * 4 + 3 * 64 * 4 + 64;
}

void flash_task_amx(const FlashAmxArgs& a, int64_t bh, int64_t tile, void* scratch) {
  const int64_t d = a.d, dp = a.d_padded;
  const int64_t b = bh / a.heads, h = bh % a.heads;
  const int64_t q0 = tile * kAmxQueryRows;
  const int64_t rows = a.q_len - q0 < kAmxQueryRows ? a.q_len - q0 : kAmxQueryRows;
  const int64_t rows_r = (rows + kBlock - 1) / kBlock * kBlock;  // rows computed: whole blocks
  const Scratch t = carve(scratch, dp);

  // 1. The queries, zero past the rows and the depth; the output sums and statistics.
  const uint16_t* qb = a.q + b * a.q_strides[0] + h * a.q_strides[1];
  for (int64_t r = 0; r < rows_r; ++r) {
    uint16_t* row = t.q + r * dp;
    const uint16_t* src = qb + (q0 + r) * a.q_strides[2];
    for (int64_t k = 0; k < dp; ++k) row[k] = r < rows && k < d ? src[k * a.q_strides[3]] : 0;
    for (int64_t k = 0; k < dp; ++k) t.o[r * dp + k] = 0.0f;
    t.m[r] = kEmpty;
    t.l[r] = 0.0f;
  }

  // 2. Key tiles: scores, the softmax step, the weighted values.
  const int64_t tile_words = kAmxKeys * dp;
  for (int64_t kt = 0; kt < a.key_tiles; ++kt) {
    const uint16_t* kp = a.k_packed + (bh * a.key_tiles + kt) * tile_words;
    const uint16_t* vp = a.v_packed + (bh * a.key_tiles + kt) * tile_words;
    const int64_t k0 = kt * kAmxKeys;
    const int64_t keys = a.k_len - k0 < kAmxKeys ? a.k_len - k0 : kAmxKeys;
    const int64_t keys_r = (keys + kBlock - 1) / kBlock * kBlock;

    for (int64_t r = 0; r < rows_r; r += kBlock)
      for (int64_t j = 0; j < keys_r; j += kBlock) score_block(t.q, dp, kp, t.s, r, j);

    for (int64_t r = 0; r < rows_r; ++r) {
      const float* mask_row = a.mask != nullptr && r < rows ? a.mask + b * a.mask_strides[0] + h * a.mask_strides[1] +
                                                                  (q0 + r) * a.mask_strides[2] + k0 * a.mask_strides[3]
                                                            : nullptr;
      softmax_row_bf16(t.s + r * kAmxKeys, t.p + r * kAmxKeys, a.q_scale, mask_row, a.mask_strides[3], keys, keys_r,
                       t.m[r], t.l[r], t.alpha[r]);
      const vf alpha = splat(t.alpha[r]);
      for (int64_t k = 0; k < dp; k += W) store(t.o + r * dp + k, load(t.o + r * dp + k) * alpha);
    }

    for (int64_t r = 0; r < rows_r; r += kBlock)
      for (int64_t c = 0; c < dp; c += kBlock) output_block(t.p, vp, dp, keys_r, t.o, r, c);
  }

  // 3. Normalised, rounded once, into the output rows.
  uint16_t* out = a.out + ((b * a.heads + h) * a.q_len + q0) * d;
  for (int64_t r = 0; r < rows; ++r) {
    const vf inv = splat(1.0f / t.l[r]);
    for (int64_t k = 0; k < d; k += W) {
      alignas(64) uint16_t rounded[16];
      to_bf16(rounded, load(t.o + r * dp + k) * inv);
      const int64_t n = d - k < W ? d - k : W;
      for (int64_t i = 0; i < n; ++i) out[r * d + k + i] = rounded[i];
    }
  }
}

}  // namespace sd_native
