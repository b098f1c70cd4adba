// ../attention.cpp, compiled by setup.py for AVX-512 into namespace tx_kernels::cpu::isa_avx512 (../isa.h).
#include "../attention.cpp"
