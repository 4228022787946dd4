// The flash attention task for the build's baseline instruction set.
#include "flash_attention.h"

#define FLASH_W 4
#define FLASH_RT 4
#define FLASH_CT 2
#define FLASH_TASK flash_task_generic
#include "flash_kernel.inc"
