// What the AMX kernels (gemm_amx.cpp, flash_amx.cpp) share: the tile configuration they all use,
// 8 tiles of 16 rows x 64 bytes (16 x 16 floats, or 16 x 32 bfloat16), and a tile load that
// tells the compiler what it reads. Include only from files compiled with AMX's -m flags.
#pragma once

#include <cstdint>

#include <immintrin.h>

// GCC 12's _tile_loadconfig tells the compiler it reads 8 bytes of the configuration (so the
// stores of the rest were dropped as dead, and the first tile instruction faulted), and its
// _tile_loadd that it reads no memory at all (so the scratch tiles' stores could move past it).
// These say what the instructions read.
#define SD_TILE_LOAD(tile, base, stride) \
  __asm__ volatile("tileloadd (%0,%1,1), %%tmm" #tile ::"r"(base), "r"(static_cast<long>(stride)) : "memory")

namespace sd_native {

constexpr int64_t kTileRows = 16;  // rows of every tile
constexpr int64_t kTilePairs = 16;  // bfloat16 pairs in a row of an input tile (32 values, 64 bytes)

// The kernels work on 2 x 2 blocks of float sums, 32 rows x 32 columns, held in tiles 0-3 (0 1
// over 2 3); `at` is the block's first sum, its rows `row_floats` apart. Static: both AMX files
// include these, compiled with the same flags, and nothing else may.
static inline void zero_block() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}

static inline void load_block(const float* at, int64_t row_floats) {
  const int64_t stride = row_floats * 4;
  SD_TILE_LOAD(0, at, stride);
  SD_TILE_LOAD(1, at + kTileRows, stride);
  SD_TILE_LOAD(2, at + kTileRows * row_floats, stride);
  SD_TILE_LOAD(3, at + kTileRows * row_floats + kTileRows, stride);
}

static inline void store_block(float* at, int64_t row_floats) {
  const int64_t stride = row_floats * 4;
  _tile_stored(0, at, stride);
  _tile_stored(1, at + kTileRows, stride);
  _tile_stored(2, at + kTileRows * row_floats, stride);
  _tile_stored(3, at + kTileRows * row_floats + kTileRows, stride);
}

// One step of a block's sums: tiles 0-3 += [top; bottom] x [left right], the inputs (16 rows of
// 32 bfloat16 values) loaded into tiles 4 and 5, the weights (16 rows of 16 pairs) into 6 and 7;
// strides in bytes. A null `bottom` is a tile of zeros (a block whose second row group does not exist).
static inline void multiply_block(const void* top, int64_t top_stride, const void* bottom, int64_t bottom_stride,
                                  const void* left, const void* right, int64_t weight_stride) {
  SD_TILE_LOAD(4, top, top_stride);
  if (bottom != nullptr)
    SD_TILE_LOAD(5, bottom, bottom_stride);
  else
    _tile_zero(5);
  SD_TILE_LOAD(6, left, weight_stride);
  SD_TILE_LOAD(7, right, weight_stride);
  _tile_dpbf16ps(0, 4, 6);
  _tile_dpbf16ps(1, 4, 7);
  _tile_dpbf16ps(2, 5, 6);
  _tile_dpbf16ps(3, 5, 7);
}

}  // namespace sd_native
