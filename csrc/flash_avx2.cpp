// The flash attention task for CPUs with AVX2 (compiled with its -m flags; chosen at run time).
#include "flash_attention.h"

#define FLASH_W 8
#define FLASH_RT 6
#define FLASH_CT 2
#define FLASH_TASK flash_task_avx2
#include "flash_kernel.inc"
