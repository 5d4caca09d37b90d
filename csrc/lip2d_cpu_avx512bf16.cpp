// The CPU kernels built for avx512 with the bfloat16 conversions of
// AVX512-BF16 (see lip2d_cpu.cpp).
#define LIP_CPU_ISA 3
#include "lip2d_cpu.cpp"
