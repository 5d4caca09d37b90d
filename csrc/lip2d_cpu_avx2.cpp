// The CPU kernels built for avx2 (see lip2d_cpu.cpp).
#define LIP_CPU_ISA 1
#include "lip2d_cpu.cpp"
