// The kernels for the build's baseline instruction set.
#include <cstdint>

#include "flash_attention.h"
#include "group_norm.h"

#define FLASH_W 4
#define FLASH_RT 4
#define FLASH_CT 2
#define FLASH_TASK flash_task_generic
#include "flash_kernel.inc"

#define NORM_W 4
#define NORM_KERNELS norm_kernels_generic
#include "norm_kernel.inc"
