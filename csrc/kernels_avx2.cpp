// The kernels for CPUs with AVX2 (compiled with its -m flags; chosen at run time).
#include <cstdint>

#include "flash_attention.h"
#include "group_norm.h"

#define FLASH_W 8
#define FLASH_RT 6
#define FLASH_CT 2
#define FLASH_TASK flash_task_avx2
#include "flash_kernel.inc"

#define NORM_W 8
#define NORM_KERNELS norm_kernels_avx2
#include "norm_kernel.inc"
