"""The CUDA kernels on the CPU: builds csrc/kernels/*.cu for the execution harness of csrc/emu and
exposes them as a third backend of the same operators, ``torch.ops.tx_kernels_emu.*``, taking CPU
tensors through the CUDA backend's own binding code.

    import tx_kernels.emu as emu
    emu.load()                       # builds once (about a minute on 2 cores), cached by content
    with emu.device("A100"):         # the emulated GPU's SM count and shared-memory limit
        out, lse = torch.ops.tx_kernels_emu.attention_fwd(q, k, v, None, 0.125, True, 0.0, None)

A kernel that races on shared memory, reads or writes out of bounds, reads shared memory it never
wrote, deadlocks, or launches beyond the hardware's limits fails its op with a RuntimeError that
names the threads and source lines. This is a test tool: it needs the source tree, g++ and the
CUDA toolkit's headers (no GPU, no libcudart); nothing of it is built by ``pip install``.
"""
import contextlib
import hashlib
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from . import ops as _ops  # noqa: F401  (loads tx_kernels._C, which registers tx_kernels_emu)

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"

# The devices a test may emulate: (SMs, cudaDevAttrMaxSharedMemoryPerBlockOptin).
DEVICES = {
    "H100": (132, 227 * 1024),
    "H200": (132, 227 * 1024),
    "A100": (108, 163 * 1024),
}

_HARNESS = ["fiber.cpp", "runtime.cpp", "checks.cpp", "cuda_api.cpp"]
_COMMON = ["-std=c++17", "-O2", "-g1", "-fPIC", "-fvisibility=hidden", "-fno-strict-aliasing", "-Wall",
           "-Wno-unknown-pragmas", "-Wno-unused-function"]
# Kernel sources: every load and store reaches the harness's checkers through ThreadSanitizer's
# instrumentation, whose runtime csrc/emu/checks.cpp provides (libtsan is never linked).
_LINK = ["-Wl,-z,defs", "-Wl,-Bsymbolic", "-lpthread", "-ldl"]
_EXPORTS = "{ global: tx_kernels_emu_api; planted_*; local: *; };\n"
_KERNEL = ["-x", "c++", "-fsanitize=thread", "--param", "tsan-instrument-func-entry-exit=0",
           "-include", str(CSRC / "emu" / "device.h")]


class EmulatorUnavailable(RuntimeError):
    pass


def cuda_include_dir():
    """The CUDA toolkit's include folder (headers only: cuda_fp16.h, cuda_bf16.h, cuda_runtime.h)."""
    from torch.utils import cpp_extension

    candidates = [os.environ.get("CUDA_HOME"), cpp_extension.CUDA_HOME, "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_fp16.h").is_file():
            return str(Path(c) / "include")
    raise EmulatorUnavailable("the CUDA emulator needs the CUDA toolkit's headers (cuda_fp16.h); "
                              "set CUDA_HOME or install the toolkit (no GPU or driver is needed)")


def _compiler():
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise EmulatorUnavailable(f"the CUDA emulator needs a C++ compiler ({cxx} not found)")
    return cxx


def build(kernel_sources=None, extra_sources=(), api=None, name="tx_kernels_emu", jobs=None, verbose=False):
    """Compiles the harness with `kernel_sources` (default: csrc/kernels/*.cu) and `extra_sources`
    (also built as kernel code, e.g. a test's own kernels) into one shared library and returns its
    path; `api` (default: when building csrc/kernels) adds the entry table torch.ops.tx_kernels_emu
    loads, so a modified copy of the kernels can be loaded in their place. Rebuilt only when a
    source, header or flag changes."""
    if not (CSRC / "emu" / "runtime.cpp").is_file():
        raise EmulatorUnavailable(f"the CUDA emulator needs the tx_kernels source tree ({CSRC} not found)")
    cxx = _compiler()
    include = ["-I", cuda_include_dir(), "-I", str(CSRC / "emu")]
    kernels = sorted((CSRC / "kernels").glob("*.cu")) if kernel_sources is None else [Path(p) for p in kernel_sources]
    extra = [Path(p) for p in extra_sources]
    api = kernel_sources is None if api is None else api
    harness = [CSRC / "emu" / f for f in _HARNESS] + ([CSRC / "emu" / "api.cpp"] if api else [])
    headers = sorted(CSRC.glob("emu/*.h")) + sorted(CSRC.glob("kernels/*.h")) + sorted(CSRC.glob("kernels/*.cuh"))

    digest = hashlib.sha256()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    for part in [version, " ".join(_COMMON + _KERNEL + include + _LINK), _EXPORTS]:
        digest.update(part.encode())
    for f in harness + kernels + extra + headers:
        digest.update(str(f).encode())
        digest.update(f.read_bytes())
    cache = Path(os.environ.get("TX_KERNELS_EMU_CACHE", ROOT / "build" / "emu")) / f"{name}-{digest.hexdigest()[:16]}"
    lib = cache / f"lib{name}.so"
    if lib.is_file():
        return str(lib)
    # Objects in a folder of this process's own, so concurrent test processes never share one.
    objdir = cache / f"obj-{os.getpid()}"
    objdir.mkdir(parents=True, exist_ok=True)

    def compile_one(src, kernel):
        obj = objdir / (src.name + ".o")
        cmd = [cxx] + _COMMON + (_KERNEL if kernel else []) + include + ["-c", str(src), "-o", str(obj)]
        if verbose:
            print(" ".join(cmd))
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"compiling {src} for the CUDA emulator failed:\n{done.stderr[-6000:]}")
        return obj

    work = [(s, False) for s in harness] + [(s, True) for s in kernels + extra]
    # The largest kernel files first, so the critical path starts early.
    work.sort(key=lambda w: -w[0].stat().st_size)
    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 2) as pool:
        objects = list(pool.map(lambda w: compile_one(*w), work))
    tmp = cache / f"lib{name}.so.tmp{os.getpid()}"
    # Export only the entry points: the harness's own CUDA runtime functions must never resolve
    # another library's calls (a GPU process also has the real libcudart).
    exports = objdir / "exports.map"
    exports.write_text(_EXPORTS)
    cmd = [cxx, "-shared", "-o", str(tmp)] + [str(o) for o in objects] + _LINK + [f"-Wl,--version-script={exports}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"linking the CUDA emulator failed:\n{done.stderr[-6000:]}")
    os.replace(tmp, lib)
    shutil.rmtree(objdir, ignore_errors=True)
    return str(lib)


_loaded = None


def load(verbose=False):
    """Builds (if needed) and loads the emulated kernels; returns the library path."""
    global _loaded
    if _loaded is None:
        path = build(verbose=verbose)
        torch.ops.tx_kernels_emu._load(path)
        set_device("H100")
        _loaded = path
    return _loaded


_current = ["H100"]


def set_device(name):
    """Emulate `name` (a key of DEVICES): its SM count and shared-memory opt-in limit reach the
    params exactly as the CUDA binding reads them from a real device, and launches are checked
    against them."""
    if name not in DEVICES:
        raise ValueError(f"tx_kernels.emu: unknown device {name!r}; known: {sorted(DEVICES)}")
    sms, smem = DEVICES[name]
    torch.ops.tx_kernels_emu._set_device(name, sms, smem)
    _current[0] = name


@contextlib.contextmanager
def device(name):
    previous = _current[0]
    set_device(name)
    try:
        yield
    finally:
        set_device(previous)
