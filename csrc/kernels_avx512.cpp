// The kernels for CPUs with AVX512 (compiled with its -m flags; chosen at run time).
#include <cstdint>

#include "flash_attention.h"
#include "group_norm.h"

#define FLASH_W 16
#define FLASH_RT 6
#define FLASH_CT 4
#define FLASH_TASK flash_task_avx512
#include "flash_kernel.inc"

#define NORM_W 16
#define NORM_KERNELS norm_kernels_avx512
#include "norm_kernel.inc"
