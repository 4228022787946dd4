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

}  // namespace sd_native
