"""The backends the op tests run on, and what those tests share.

A test that takes the `backend` fixture of conftest.py runs once per backend present: "cpu" (the
C++ CPU kernels, torch.ops.tx_kernels on CPU tensors), "emu" (always: csrc/kernels/*.cu run thread
by thread on the CPU by tx_kernels.emu, CPU tensors, torch.ops.tx_kernels_emu) and "cuda" (a real
GPU, when present and this build has the CUDA kernels); the `cuda_backend` fixture runs the CUDA
kernels only (emu and cuda). The tests read the active backend from BE: BE.device for tensors,
BE.ops for the operators, BE.poison_blocks / BE.sync around the calls. The markers
`backends(...)` and `collect_if(predicate)` (conftest.py) keep a case off the backends it does not
apply to: it is not collected there, rather than skipped.

While "emu" is active, tx_kernels.functional and the autograd formulas of tx_kernels.ops call the
emulated operators, so TF.* and loss.backward() run the emulated CUDA kernels (the same Python
glue that routes to the real GPU).
"""
import math
import os

import pytest
import torch

import tx_kernels
import tx_kernels.functional
import tx_kernels.ops
from tx_kernels import reference as R


CPU_OPS = torch.ops.tx_kernels  # the C++ CPU kernels, for cross-checks that must not be emulated

# Row widths of the memory-bound ops (LayerNorm, bias + activation) that reach every path of their
# CUDA kernels: 1 and 7: one thread's worth; 768/4096/8192: the 16-byte path (8192 the last fp32
# register-path width of the LayerNorm backward); 1023/8191: the scalar path; 12288: the
# backward's block-per-row fallback; 16392: the forward's block-per-row fallback on the 16-byte path.
CUDA_WIDTHS = [1, 7, 768, 1023, 4096, 8191, 8192, 12288, 16392]


def rows_for(cols):
    """Enough rows for statistics on small rows (and several rows per CTA / warp), fewer for wide ones."""
    return 67 if cols <= 1024 else (9 if cols <= 12288 else 3)


def gpu_present():
    return torch.cuda.is_available() and tx_kernels.ops.has_cuda_kernels()


def backend_names(cpu=True):
    return (["cpu"] if cpu else []) + ["emu"] + (["cuda"] if gpu_present() else [])


class _Backend:
    name = None
    device = None
    ops = None

    @property
    def emu(self):
        return self.name == "emu"

    @property
    def cpu(self):
        return self.name == "cpu"

    def pick(self, emu_value, other_value):
        """A shape for this backend: the emulator runs every CUDA thread as a fiber on 2 cores;
        the CPU kernels and a GPU take the larger one."""
        return emu_value if self.name == "emu" else other_value

    def sync(self):
        if self.name == "cuda":
            torch.cuda.synchronize()

    def poison_blocks(self, nbytes_list):
        """Steer the op's next allocations onto NaN memory; returns the poisoned addresses.

        cuda: allocate all-ones blocks of the given byte sizes and free them, so the caching
        allocator (512-byte size classes, same stream) hands them to the op's outputs. All-ones
        bytes are NaN in fp16, bf16, fp32 and fp64 alike.
        cpu, emu: nothing to do; c10's junk fill (conftest's `poison`) is on for the whole test,
        so every CPU allocation, the op's outputs and workspaces included, starts as junk."""
        if self.name != "cuda":
            return []
        self.sync()
        bufs = [torch.full((max(int(n), 1),), 255, dtype=torch.uint8, device="cuda") for n in nbytes_list]
        ptrs = [b.data_ptr() for b in bufs]
        del bufs
        return ptrs


BE = _Backend()

# torch.library.opcheck (schema, fake kernel, autograd registration) and torch.compile need an
# op's fake kernel, which the tx_kernels ops have (cpu, cuda). The emulator's tx_kernels_emu ops
# have none: they exist to run the CUDA binding on CPU tensors under the tx_kernels schema, and on
# the emulator the numerical cases of each op file check that binding (output shapes, dtypes,
# strides and values) and the autograd formulas of tx_kernels.ops instead.
registered_ops = pytest.mark.backends("cpu", "cuda")
# The CUDA binding has fp64 kernels for attention only; the memory-bound ops' fp64 cases run on
# the CPU kernels (each file's test_fp64_rejected_on_cuda checks the error names the argument).
fp64_on_cpu = pytest.mark.collect_if(lambda p: p.get("dtype") != torch.float64 or p["backend"] == "cpu")

# Per-backend case counters for the session summary (conftest.pytest_terminal_summary).
CASES = {}


_EMU_STATE = {}


def load_emulator():
    """emu.load() once per session. An emulator that cannot be built is a skip with the reason,
    except under CI, where it must be there; any other error propagates."""
    if "error" in _EMU_STATE:
        skip_or_fail(_EMU_STATE["error"])
    if "path" in _EMU_STATE:
        return _EMU_STATE["path"]
    import tx_kernels.emu as emu

    try:
        _EMU_STATE["path"] = emu.load()
    except emu.EmulatorUnavailable as e:
        _EMU_STATE["error"] = str(e)
        skip_or_fail(str(e))
    _register_emu_autograd()
    return _EMU_STATE["path"]


def skip_or_fail(reason):
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but the CUDA emulator is unavailable: {reason}", pytrace=False)
    pytest.skip(f"CUDA emulator unavailable: {reason}")


def _register_emu_autograd():
    # The formulas of tx_kernels/ops.py look `ops` up at call time, so with the module global
    # pointed at tx_kernels_emu (see activate) they call the emulated backward kernels.
    O = tx_kernels.ops
    for op, backward, setup in [
            ("attention_fwd", O._attention_backward, O._attention_setup_context),
            ("layer_norm_fwd", O._layer_norm_backward, O._layer_norm_setup_context),
            ("add_layer_norm_fwd", O._add_layer_norm_backward, O._add_layer_norm_setup_context),
            ("bias_act_fwd", O._bias_act_backward, O._bias_act_setup_context)]:
        torch.library.register_autograd(f"tx_kernels_emu::{op}", backward, setup_context=setup)


def activate(name, monkeypatch):
    BE.name = name
    if name == "emu":
        BE.device = "cpu"
        BE.ops = torch.ops.tx_kernels_emu
        monkeypatch.setattr(tx_kernels.ops, "ops", BE.ops)
        monkeypatch.setattr(tx_kernels.functional, "ops", BE.ops)
    else:
        BE.device = name
        BE.ops = torch.ops.tx_kernels


def deactivate():
    BE.name = BE.device = BE.ops = None


def poison_outputs(*shapes_dtypes):
    """BE.poison_blocks for outputs given as (shape, dtype): each block twice and at double size,
    so the blocks also cover outputs the caching allocator rounds up."""
    sizes = []
    for shape, dtype in shapes_dtypes:
        n = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
        sizes += [2 * n, n]
    return BE.poison_blocks(sizes)


def allocation_sizes(fn):
    """Byte sizes of the CPU allocations made while fn() runs (an emulated op's outputs and
    workspaces); returns (fn's result, sizes)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    return result, [ev.cpu_memory_usage for ev in prof.events() if ev.cpu_memory_usage > 0]


def philox_keep(numel, p, rng):
    """Keep decisions of elements 0..numel-1 (flat index) for dropout probability p and the
    int64 [seed, offset] rng tensor (tx_kernels.reference's independent NumPy Philox)."""
    return R.dropout_keep_mask(int(rng[0]), int(rng[1]), numel, p)
