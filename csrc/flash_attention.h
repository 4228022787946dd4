// Flash-style attention for the CPU: the interface shared by the primitive (native.cpp) and the
// kernels, which are compiled once per instruction set (flash_<isa>.cpp) and chosen at run time.
#pragma once

#include <cstdint>

namespace sd_native {

// Query rows and keys per tile. Scores live in a (kQueryRows, kKeys) tile that stays in L2.
constexpr int64_t kQueryRows = 96;  // a multiple of every kernel's register rows (6 and 4)
constexpr int64_t kKeys = 128;      // a multiple of every kernel's column tile (64, 16, 8)
constexpr int64_t kDepthStep = 16;  // d is padded to a multiple of it (a vector of 16 floats)

struct FlashArgs {
  const float* q;     // (B, H, Lq, d), element strides q_strides
  const float* mask;  // additive, log2 units, broadcast view of (B, H, Lq, Lk); may be null
  float* out;         // (B, H, Lq, d), row-contiguous
  int64_t batch, heads, q_len, k_len, d;
  int64_t d_padded;  // d rounded up to a multiple of kDepthStep; packed rows use this stride
  int64_t q_strides[4];
  int64_t mask_strides[4];
  float q_scale;  // softmax scale times log2(e): the weights are 2**(score - max)
  // K and V packed per (batch * heads + head, key tile), zero-padded to full tiles:
  // K transposed, (d, kKeys) per tile; V as rows, (kKeys, d_padded) per tile.
  const float* k_packed;
  const float* v_packed;
  int64_t key_tiles;
};

// Scratch floats one task needs (query tile, score tile, output accumulator, row statistics).
int64_t scratch_floats(int64_t d_padded);

// One task: query tile `tile` of head `bh` (batch * heads + head). `scratch` is 64-byte aligned.
using TaskFn = void (*)(const FlashArgs&, int64_t bh, int64_t tile, float* scratch);

void flash_task_generic(const FlashArgs&, int64_t, int64_t, float*);
#if defined(__x86_64__)
void flash_task_avx2(const FlashArgs&, int64_t, int64_t, float*);
void flash_task_avx512(const FlashArgs&, int64_t, int64_t, float*);
#endif

// bfloat16 attention on AMX tiles (flash_amx.cpp): q, k, v and the output in bfloat16, the two
// products in tiles with float32 sums, the scores, softmax and output sums in float32; the weights
// are rounded to bfloat16 for the second product.
constexpr int64_t kAmxQueryRows = 64;  // four tile rows of queries per task
constexpr int64_t kAmxKeys = 512;      // keys per tile: a row's statistics are updated once per 512 keys
constexpr int64_t kAmxDepthStep = 32;  // d is padded to a multiple of it (a tile's depth)

struct FlashAmxArgs {
  const uint16_t* q;  // (B, H, Lq, d) bfloat16 bits, element strides q_strides
  const float* mask;  // as FlashArgs
  uint16_t* out;      // (B, H, Lq, d), row-contiguous bfloat16 bits
  int64_t batch, heads, q_len, k_len, d;
  int64_t d_padded;  // d rounded up to a multiple of kAmxDepthStep
  int64_t q_strides[4];
  int64_t mask_strides[4];
  float q_scale;  // softmax scale times log2(e), applied to the float32 scores
  // Per (batch * heads + head, key tile of kAmxKeys), zero-padded, in the pairs a tile product
  // takes: K as (d_padded / 2, kAmxKeys, 2), V as (kAmxKeys / 2, d_padded, 2).
  const uint16_t* k_packed;
  const uint16_t* v_packed;
  int64_t key_tiles;
};

// Scratch bytes one task needs; `scratch` is 64-byte aligned. The thread must have the AMX tile
// configuration loaded (amx_configure in gemm.h).
int64_t amx_scratch_bytes(int64_t d_padded);
#if defined(__x86_64__)
void flash_task_amx(const FlashAmxArgs&, int64_t bh, int64_t tile, void* scratch);
#endif

}  // namespace sd_native
