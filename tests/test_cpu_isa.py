"""The two copies of the CPU kernels (csrc/cpu/isa.h): which one runs, and that both pass the op tests.

On x86-64 the extension holds the kernels compiled for AVX2 (the "default" copy) and for AVX-512,
and runs the AVX-512 one exactly when torch runs AVX-512 itself. The suite's own run exercises the
copy this machine picks; on an AVX-512 machine, the default copy is checked here by rerunning
every op file's CPU cases in a process where ATEN_CPU_CAPABILITY=avx2 makes torch, and so
tx_kernels, take AVX2. (On a machine without AVX-512 the suite's own run is the default copy's,
and the AVX-512 copy cannot run at all.)
"""
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch

import tx_kernels  # noqa: F401  (loads the extension)
from tx_kernels import _C

X86 = platform.machine() in ("x86_64", "AMD64")
TORCH_AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
OP_FILES = ["test_attention.py", "test_attention_bwd.py", "test_attention_varlen.py", "test_layer_norm.py",
            "test_bias_act.py", "test_feed_forward.py", "test_fuzz.py", "test_numerics_contract.py"]


def _run(code, **env):
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def test_the_copy_follows_torchs_capability():
    expected = "avx512" if (X86 and TORCH_AVX512) else "default"
    assert _C.cpu_kernel_isa() == expected
    forced = _run("import torch, tx_kernels; from tx_kernels import _C; "
                  "print(torch.backends.cpu.get_cpu_capability(), _C.cpu_kernel_isa())",
                  ATEN_CPU_CAPABILITY="avx2")
    assert forced == "AVX2 default"


if X86 and TORCH_AVX512:
    def test_default_copy_passes_the_op_tests():
        # torch's own fp16 CPU flash attention refuses to run with its capability forced down to
        # AVX2 ("pack_vnni2 is only supported when avx512 is supported"), so the cases that
        # compare against it (test_low_precision_within_2x_torch_*) are left to the main run.
        here = os.path.dirname(os.path.abspath(__file__))
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
               "-k", "not emu and not cuda and not low_precision_within_2x_torch", *(os.path.join(here, f) for f in OP_FILES)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=os.path.dirname(here),
                              env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2"})
        tail = proc.stdout[-3000:]
        assert proc.returncode == 0, tail
        assert " passed" in tail and " failed" not in tail, tail


# Operands only AVX-512 (EVEX) encodes: zmm, the mask registers, vector registers 16-31 and
# embedded broadcasts.
_AVX512_OPERAND = re.compile(r"%zmm|%k[0-7]\b|%[xy]mm(1[6-9]|2[0-9]|3[01])\b|\{1to(2|4|8|16)\}")


if X86 and shutil.which("objdump"):
    def test_no_avx512_instruction_outside_the_avx512_copy():
        # Both copies emit some of the same inline functions (standard library, c10); the linker
        # keeps one, which must be the default copy's (setup.py links the AVX-512 objects last),
        # or a machine without AVX-512 would fault in code that never meant to use it.
        dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", _C.__file__], capture_output=True,
                             text=True, check=True).stdout
        offenders, function = set(), None
        for line in dis.splitlines():
            if line.endswith(">:"):
                function = line
            elif function and _AVX512_OPERAND.search(line):
                offenders.add(function)
        avx512_copy = [f for f in offenders if "isa_avx512" in f or "AVX512" in f]
        stray = sorted(offenders - set(avx512_copy))
        assert not stray, stray[:10]
        assert avx512_copy, "no AVX-512 code found at all: is the AVX-512 copy built?"
