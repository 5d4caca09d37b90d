// The CPU kernels built for avx512 (see lip2d_cpu.cpp).
#define LIP_CPU_ISA 2
#include "lip2d_cpu.cpp"
