// isa.h: the instruction set a translation unit's CPU kernels are compiled for.
//
// The kernel sources (attention.cpp, bias_act.cpp, layernorm.cpp) are compiled twice on x86-64:
// once with the build's flags (AVX2 + FMA, setup.py), and once for AVX-512 through the one-line
// wrappers in avx512/ (setup.py's BuildExtension gives them the AVX-512 flags and
// -DTXK_CPU_ISA=isa_avx512), the way ATen compiles its own CPU kernels per capability. Each copy lives in its own
// namespace, tx_kernels::cpu::TXK_CPU_ISA, with at::vec's Vectorized in its matching inline
// namespace (at::vec::CPU_CAPABILITY), and kernels.cpp's entry points call the AVX-512 copy when
// torch itself runs AVX-512 (torch.backends.cpu.get_cpu_capability(), which ATEN_CPU_CAPABILITY
// overrides), so the two libraries always use the same vector width.
#pragma once

#ifndef TXK_CPU_ISA
#define TXK_CPU_ISA isa_default
#endif

// 256-bit AVX2/FMA intrinsics are usable (an AVX-512 build has them too).
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#define TXK_HAVE_AVX2 1
#endif
