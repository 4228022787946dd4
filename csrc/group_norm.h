// Group normalisation (and an optional SiLU) of channels-last maps for the CPU, and the row
// kernels of the transformer blocks (layer norm, GEGLU): the interface
// shared by the primitive (native.cpp) and the kernels, compiled once per instruction set
// (kernels_<isa>.cpp, from norm_kernel.inc) and chosen at run time.
//
// The primitive works in three passes over the rows of the map, each on all cores: per-channel
// sums of a row, per-channel sums of squared deviations from the group's mean, then
// y = x scale + shift (and SiLU) written out. Each row's partial sums are kept apart and added up
// in a fixed order in double precision, so the result does not depend on how rows met threads.
#pragma once

#include <cstdint>

namespace sd_native {

struct NormArgs {
  const void* x;  // (B, H, W, C): float32 or bfloat16 bits
  void* out;      // same dtype; row-contiguous, inside a zero border (see pad_*)
  bool bf16;
  bool silu;
  int64_t height, width, channels;
  int64_t x_strides[4];  // in elements; vectorised where the channels are contiguous (stride 1)
  // The output map is (B, pad_top + H + pad_bottom, pad_left + W + pad_right, C); the primitive
  // writes the border's zeros. out_row and out_image are its strides in elements.
  int64_t pad_top, pad_left, pad_right;
  int64_t out_row, out_image;
};

// Rows of a row-contiguous (rows, channels) output, from rows of x `x_row` elements apart.
struct RowArgs {
  const void* x;  // float32 or bfloat16 bits, as out
  void* out;
  bool bf16;
  int64_t channels, x_row;
  const float* weight;  // layer norm: (channels)
  const float* bias;
  float eps;
};

struct NormKernels {
  // sums[c] = sum over the pixels of row h of image b of x[c]
  void (*sums)(const NormArgs&, int64_t b, int64_t h, float* sums);
  // sums[c] = sum over the same pixels of (x[c] - mean[c])**2
  void (*squares)(const NormArgs&, int64_t b, int64_t h, const float* mean, float* sums);
  // out = x scale + shift, per channel, SiLU if asked; the row's border pixels set to zero
  void (*apply)(const NormArgs&, int64_t b, int64_t h, const float* scale, const float* shift);
  // out = (x - mean) / sqrt(variance + eps) weight + bias over the row, in float32 (three passes
  // over the row, which stays in L1)
  void (*layer_norm)(const RowArgs&, int64_t row);
  // out = x[:channels] gelu(x[channels:]) (a GEGLU projection's row of 2 channels); gelu is
  // ops.py's rational approximation of the exact (erf) GELU
  void (*geglu)(const RowArgs&, int64_t row);
  // out = gelu(x), the same gelu
  void (*gelu)(const RowArgs&, int64_t row);
};

extern const NormKernels norm_kernels_generic;
#if defined(__x86_64__)
extern const NormKernels norm_kernels_avx2;
extern const NormKernels norm_kernels_avx512;
#endif

}  // namespace sd_native
