"""Shared test utilities: error measurement against references and device selection."""
import ctypes
import os

import pytest
import torch

import tx_kernels  # noqa: F401


def devices():
    """CPU always; CUDA when this build has CUDA kernels and a GPU is present."""
    out = ["cpu"]
    if torch.cuda.is_available() and tx_kernels.ops.has_cuda_kernels():
        out.append("cuda")
    return out


def max_abs_err(x, ref):
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


def rel_err(x, ref):
    """||x - ref|| / ||ref||, in float64; NaN anywhere makes it inf."""
    x, ref = x.double(), ref.double()
    if not torch.isfinite(x).all():
        return float("inf")
    denom = ref.norm().item()
    return (x - ref).norm().item() / (denom if denom > 0 else 1.0)


def grad_err(g, ref, floor):
    """Relative gradient error, with the denominator floored at `floor` (a fraction of the largest
    gradient norm): some gradients are exactly 0 in exact arithmetic (e.g. the attention key bias,
    since softmax ignores per-row constants) and hold only rounding noise."""
    return (g.double() - ref.double()).norm().item() / max(ref.double().norm().item(), floor)


def count_attention_calls(monkeypatch):
    """A list that records the dropout_p of every tx_kernels.functional.scaled_dot_product_attention
    call from now on (the models and modules look it up at call time)."""
    import tx_kernels.functional as TF

    calls = []
    orig = TF.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("dropout_p", 0.0))
        return orig(*args, **kwargs)

    monkeypatch.setattr(TF, "scaled_dot_product_attention", spy)
    return calls


def checkpoint_forward(module, use_reentrant):
    """Run module's forward under torch.utils.checkpoint from now on. An instance attribute, not a
    wrapper module, so parameter names (and FSDP's wrapping of the module) stay as they were."""
    from torch.utils.checkpoint import checkpoint

    orig = module.forward
    module.forward = lambda *args: checkpoint(orig, *args, use_reentrant=use_reentrant)


def ulp_floor(ref, dtype):
    """4 ulps (in `dtype`) of the reference's largest magnitude: the absolute slack of the
    project's low-precision rule (README: 2x stock torch's error plus 4 ulps of the scale)."""
    return 4 * torch.finfo(dtype).eps * max(ref.abs().max().item() if ref.numel() else 0.0, 1e-3)


def assert_within_torch_error(ours, torch_same_precision, ref, factor=2.0, atol=1e-6, name=""):
    """FlashAttention's rule: our max error vs the reference is at most factor x stock torch's."""
    ours_err = max_abs_err(ours, ref)
    torch_err = max_abs_err(torch_same_precision, ref)
    assert torch.isfinite(ours).all(), f"{name}: non-finite values in output"
    assert ours_err <= factor * torch_err + atol, (
        f"{name}: max error {ours_err:.3e} vs stock torch {torch_err:.3e} (allowed {factor}x + {atol})")


def check_low(ours, torch_lp, ref, name):
    """The 2x rule for a low-precision result, errors measured in fp32 against an fp32 reference."""
    assert_within_torch_error(ours.float(), torch_lp.float(), ref.float(), factor=2.0, atol=1e-6, name=name)


def check_rel_err(ours, ref, name, tol):
    """Finite, and relative error under `tol` (the full-precision rule)."""
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    err = rel_err(ours, ref)
    assert err < tol, f"{name}: relative error {err:.3e} >= {tol:.0e}"


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def assert_attention_within_torch_error(out, torch_out, ref, ours_in, torch_in, ref_in):
    """The 2x rule for an attention output and the gradients of its (q, k, v): ours from
    `ours_in`, stock torch's in the same precision from `torch_in`, the float64 reference's from
    `ref_in`, all for the same random output gradient."""
    assert_within_torch_error(out, torch_out, ref, name="out")
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, ours_in, grad)
    theirs = torch.autograd.grad(torch_out, torch_in, grad)
    want = torch.autograd.grad(ref, ref_in, grad.double())
    for name, a, b, c in zip(("dq", "dk", "dv"), got, theirs, want):
        assert_within_torch_error(a, b, c, name=name)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random inputs every run, but reproducible from the printed seed on failure.
    seed = torch.seed() % (2**31)
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


@pytest.fixture
def poison():
    """Poisoned outputs on the CPU: c10's allocator fills every new allocation with a junk pattern
    (NaN as fp32, ~1.7e308 as fp64) while this fixture is active, so an output element a kernel
    fails to write shows up as a huge error against the reference. (A GPU is poisoned through the
    caching allocator instead: cuda_backends.BE.poison_blocks.)"""
    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so"))
    flag = ctypes.c_bool.in_dll(lib, "FLAGS_caffe2_cpu_allocator_do_junk_fill")
    old = flag.value
    flag.value = True
    assert torch.empty(4).isnan().all(), "junk fill did not take effect"
    yield
    flag.value = old


# ----------------------------------------------------------------------------------------------
# Op backends (tests/cuda_backends.py): cpu, the CUDA emulator always, a GPU when present
# ----------------------------------------------------------------------------------------------
import cuda_backends  # noqa: E402


def _use_backend(request, monkeypatch):
    name = request.param
    request.node.user_properties.append(("backend", name))
    if name == "emu":
        cuda_backends.load_emulator()
    # Junk-filled CPU allocations for the whole test: every output element the kernel does not
    # write reads as NaN (fp32/fp16/bf16 halves) or ~1.7e308 (fp64). (A GPU is poisoned through
    # the caching allocator instead: BE.poison_blocks.)
    if name in ("cpu", "emu"):
        request.getfixturevalue("poison")
    cuda_backends.activate(name, monkeypatch)
    yield cuda_backends.BE
    cuda_backends.deactivate()


@pytest.fixture(params=cuda_backends.backend_names())
def backend(request, monkeypatch):
    """Every backend of the op: the CPU kernels, the CUDA kernels emulated, a GPU."""
    yield from _use_backend(request, monkeypatch)


@pytest.fixture(params=cuda_backends.backend_names(cpu=False))
def cuda_backend(request, monkeypatch):
    """The CUDA kernels only: emulated, and on a GPU."""
    yield from _use_backend(request, monkeypatch)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # A failure report names the seed _fresh_seed drew, so the failing inputs can be drawn again.
    outcome = yield
    report = outcome.get_result()
    seed = dict(item.user_properties).get("seed")
    if report.failed and seed is not None:
        report.sections.append(("random seed", f"torch.manual_seed({seed}) before the test reproduces its inputs"))


def pytest_runtest_logreport(report):
    backend = dict(report.user_properties).get("backend")
    if backend is None or (report.when != "call" and not (report.when == "setup" and report.outcome != "passed")):
        return
    key = (report.nodeid.split("::")[0], backend, report.outcome)
    cuda_backends.CASES[key] = cuda_backends.CASES.get(key, 0) + 1


def pytest_terminal_summary(terminalreporter):
    if not cuda_backends.CASES:
        return
    terminalreporter.section("op cases per backend")
    for (path, name, outcome), n in sorted(cuda_backends.CASES.items()):
        terminalreporter.write_line(f"{path}: {n} {name} cases {outcome}")


def pytest_configure(config):
    config.addinivalue_line("markers", "backends(*names): collect the case for these backends only "
                                       "(cpu, emu, cuda), e.g. for a property of one implementation")
    config.addinivalue_line("markers", "collect_if(predicate): collect the case only where predicate(params) "
                                       "holds, params being its parameters (e.g. fp64 on the CPU only)")
    config.addinivalue_line("markers", "gpu_only: a case too large for the emulator and the CPU (cuda only)")
    config.addinivalue_line("markers", "emu_only: a case about the emulated device itself (emu only)")


def _collected(item):
    params = getattr(item, "callspec", None) and item.callspec.params
    if not params:
        return True
    name = params.get("backend", params.get("cuda_backend"))
    if name is not None:
        allowed = [m.args for m in item.iter_markers("backends")]
        if item.get_closest_marker("gpu_only"):
            allowed.append(("cuda",))
        if item.get_closest_marker("emu_only"):
            allowed.append(("emu",))
        if any(name not in names for names in allowed):
            return False
    return all(m.args[0](params) for m in item.iter_markers("collect_if"))


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        (keep if _collected(item) else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
