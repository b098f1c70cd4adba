"""Builds tx_kernels._C: the CPU kernels always, the CUDA kernels when torch and nvcc have CUDA.

TX_KERNELS_CUDA=0 forces a CPU-only build, TX_KERNELS_CUDA=1 insists on CUDA (an error if it
cannot). TX_KERNELS_NATIVE_ISA=0 keeps the CPU kernels at the compiler's baseline instruction set
instead of AVX2+FMA on x86-64 machines that have them. With AVX2, the CPU kernels are compiled a
second time for AVX-512 (csrc/cpu/isa.h), picked at run time where torch runs AVX-512 itself;
TX_KERNELS_AVX512=0 leaves that copy out.
"""
import glob
import os
import platform

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _want_cuda():
    forced = os.environ.get("TX_KERNELS_CUDA")
    import torch

    available = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if forced == "1" and not available:
        raise RuntimeError("TX_KERNELS_CUDA=1 but torch has no CUDA build or nvcc was not found")
    return available if forced is None else forced == "1"


def _cpu_isa_flags():
    if os.environ.get("TX_KERNELS_NATIVE_ISA", "1") == "0":
        return []
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return []
    if " avx2" in flags and " fma" in flags:
        # at::vec picks its AVX2 implementation from these macros.
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return []


# The AVX-512 copy of the CPU kernels (csrc/cpu/isa.h): the ISA ATen compiles its own AVX-512
# kernels for, at::vec's 512-bit Vectorized, and the namespace the copy lives in.
_AVX512_FLAGS = ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
                 "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512", "-DTXK_CPU_ISA=isa_avx512"]


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension, plus the AVX-512 copies of the CPU kernels (csrc/cpu/isa.h), compiled
    with their own flags and linked after every other object. Inline functions that both copies
    emit out of line (from the standard library or c10) are kept once, from the first object that
    defines them: linked last, the AVX-512 objects never supply one that the default code calls, so
    no AVX-512 instruction is reached on a CPU without it."""

    def build_extension(self, ext):
        wrappers = getattr(ext, "avx512_sources", [])
        if wrappers:
            # The extension's C++ flags (BuildExtension has added its own by now) with the AVX-512
            # ISA in place of the default one.
            cxx = [f for f in ext.extra_compile_args["cxx"] if f not in _cpu_isa_flags()] + _AVX512_FLAGS
            objects = self.compiler.compile(wrappers, output_dir=self.build_temp, macros=ext.define_macros,
                                            include_dirs=ext.include_dirs, extra_postargs={"cxx": cxx, "nvcc": []},
                                            depends=ext.depends)
            ext.extra_objects = [o for o in ext.extra_objects if o not in objects] + objects
        super().build_extension(ext)


def extension():
    use_cuda = _want_cuda()
    isa = _cpu_isa_flags()
    avx512 = bool(isa) and os.environ.get("TX_KERNELS_AVX512", "1") != "0"
    cxx = ["-O3", "-g0", "-std=c++20", "-fopenmp", "-Wall", "-Wno-unused-function"] + isa
    if avx512:
        cxx.append("-DTXK_WITH_AVX512_KERNELS")
    sources = _rel("csrc/binding/registry.cpp") + _rel("csrc/binding/prepare.cpp")
    sources += _rel("csrc/binding/cpu_*.cpp") + _rel("csrc/cpu/*.cpp")
    # The CUDA emulator backend's operators (tx_kernels/emu.py builds and loads its library).
    sources += _rel("csrc/binding/emu_ops.cpp")
    avx512_sources = _rel("csrc/cpu/avx512/*.cpp") if avx512 else []
    kwargs = dict(extra_link_args=["-fopenmp", "-ldl"], depends=avx512_sources)
    if use_cuda:
        sources += _rel("csrc/binding/cuda_*.cpp") + _rel("csrc/kernels/*.cu")
        # Target GPUs come from TORCH_CUDA_ARCH_LIST (e.g. "8.0;9.0"; unset: the visible GPUs),
        # which BuildExtension turns into -gencode flags. It adds none as soon as any flag here
        # mentions an architecture, so these flags never do; extra targets go through the list.
        # TX_KERNELS_SM90A=1 adds sm_90a (wgmma / setmaxnreg need it) and defines
        # TX_KERNELS_SM90A so a kernel can compile such a path only there.
        nvcc = ["-O3", "-std=c++17", "--use_fast_math", "--expt-relaxed-constexpr", "-lineinfo",
                "-Xptxas=-warn-spills", "-DTX_KERNELS_WITH_CUDA"]
        if os.environ.get("TX_KERNELS_SM90A", "0") == "1":
            arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0")
            if "9.0a" not in arch_list.replace(" ", ";").split(";"):
                os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list + ";9.0a"
            nvcc.append("-DTX_KERNELS_SM90A")
        ext = cpp_extension.CUDAExtension(
            "tx_kernels._C", sources,
            extra_compile_args={"cxx": cxx + ["-DTX_KERNELS_WITH_CUDA"], "nvcc": nvcc}, **kwargs)
    else:
        ext = cpp_extension.CppExtension("tx_kernels._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)
    ext.avx512_sources = avx512_sources
    return ext


setup(
    name="tx_kernels",
    version="0.1.0",
    description="Fused C++/CUDA kernels for Transformer layers, as a PyTorch extension",
    packages=find_packages(include=["tx_kernels", "tx_kernels.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.11"],
)
