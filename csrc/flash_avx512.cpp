// The flash attention task for CPUs with AVX512 (compiled with its -m flags; chosen at run time).
#include "flash_attention.h"

#define FLASH_W 16
#define FLASH_RT 6
#define FLASH_CT 4
#define FLASH_TASK flash_task_avx512
#include "flash_kernel.inc"
