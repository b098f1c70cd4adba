"""Shared machinery of the benchmark suite: timing, result rows, CSV files and the printed table.

Writing a benchmark module
--------------------------
`python -m benchmarks.run` imports every `benchmarks/bench_<name>.py` and calls its

    def cases(ctx: Context) -> list[Case]

A Case names one measurement (op, provider, mode, dtype, shape) and carries `fn`, a zero-argument
callable that performs exactly the work to be timed (inputs are built beforehand, in `cases` or in
the closure). Give `bytes` for memory-bound ops (throughput in GB/s) or `flops` for compute-bound
ones (GFLOP/s on CPU, TFLOP/s on CUDA); write the formula next to it. Rows sharing
(op, mode, dtype, shape) are compared with the provider named by the case's `baseline`
(default "torch_eager"): the table's "vs base" column is baseline time / this time, so 2.0x means
twice as fast as the baseline. A module may also define `NAME` (used by --only, default: the part
of the file name after bench_) and should keep its default run short on CPU (see run.py).

    from benchmarks.common import Case

    def cases(ctx):
        x = torch.randn(4096, 768, device=ctx.device)
        return [Case("my_op", "torch_eager", "fwd", "float32", "(4096, 768)", lambda: x * 2,
                     bytes=2 * x.numel() * 4)]

Timing
------
Cases compared with each other (same op, mode, dtype and shape) are warmed up, then timed in
interleaved rounds, one call of each per round in a rotating order, so that a machine whose speed
drifts (shared cores, a noisy neighbour, throttling) charges the drift to all providers alike; the
median and the 20th/80th percentiles of the per-call times are reported. CUDA calls are timed with
CUDA events around each call; CPU calls with time.perf_counter.

Allocation
----------
Outputs are allocated by each call (ours through at::empty, torch's through its allocator). On
CPU, glibc returns blocks above its mmap threshold (at most 32 MiB) to the OS on free, so every call
that allocates a large tensor pays page faults again: about 20 ms per 48 MiB on the 2-core
development machine, more than the kernels themselves. `tune_cpu_allocator()` (run.py's default;
--system-malloc turns it off) raises glibc's mmap and trim thresholds so freed memory is reused,
as PyTorch's CUDA caching allocator does on GPUs and as jemalloc/tcmalloc setups do on CPUs; both
sides of every comparison run under the same setting, which is recorded in the printed header.
"""
from __future__ import annotations

import csv
import ctypes
import datetime as _dt
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, List, Optional

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CSV_FIELDS = ["op", "provider", "mode", "dtype", "shape", "median_ms", "p20_ms", "p80_ms",
              "throughput", "unit", "device", "torch", "commit", "date"]


# ----------------------------------------------------------------------------------------------
# What a benchmark module returns and what the runner records
# ----------------------------------------------------------------------------------------------
@dataclass
class Context:
    device: str          # "cpu" or "cuda"
    quick: bool = False  # smaller shapes / fewer repetitions
    compile: bool = False  # include torch.compile providers (always on for CUDA in run.py)

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")


@dataclass
class Case:
    op: str
    provider: str
    mode: str                     # "fwd", "bwd" or "fwd_bwd"
    dtype: str                    # "float32", "bfloat16", ...
    shape: str                    # human-readable, e.g. "(8, 512, 768)"
    fn: Callable[[], object]
    bytes: Optional[float] = None  # bytes moved per call (memory-bound ops)
    flops: Optional[float] = None  # floating-point operations per call (GEMMs, attention)
    baseline: str = "torch_eager"
    setup: Optional[Callable[[], None]] = None  # run once before warm-up (e.g. compilation)
    work: Optional[float] = None  # other work per call (e.g. generated tokens), with work_unit
    work_unit: str = ""           # e.g. "tokens/s"


@dataclass
class Row:
    op: str
    provider: str
    mode: str
    dtype: str
    shape: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    throughput: float
    unit: str
    device: str
    torch: str
    commit: str
    date: str
    baseline: str = field(default="torch_eager", repr=False)  # not written to the CSV

    def csv_dict(self):
        d = asdict(self)
        return {k: d[k] for k in CSV_FIELDS}


# ----------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------
def tune_cpu_allocator() -> bool:
    """Keep freed memory in the process (glibc only); returns whether it took effect."""
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 1 << 30) == 1
        ok &= libc.mallopt(m_trim_threshold, 2**31 - 1) == 1
        return bool(ok)
    except (OSError, AttributeError):
        return False


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def git_commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        # Results already appended to benchmarks/results/ do not make the measured code dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------
def _percentile(sorted_values, q):
    if not sorted_values:
        return float("nan")
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _warm_up(fn, sync, warmup_s: float, min_warmup: int) -> float:
    """Calls fn until min_warmup calls and warmup_s seconds have passed (caches, allocator, lazy
    init, torch.compile's first-call compilation); returns the fastest call's seconds, from which
    the repetition count is sized, so a slow first call (compilation) does not shrink it."""
    start, n, per_call = time.perf_counter(), 0, float("inf")
    while n < min_warmup or time.perf_counter() - start < warmup_s:
        t0 = time.perf_counter()
        fn()
        sync()
        per_call = min(per_call, time.perf_counter() - t0)
        n += 1
        if n >= 50:
            break
    return per_call


def measure_interleaved(fns, device: str, budget_s: float = 1.0, min_reps: int = 5,
                        max_reps: int = 200, warmup_s: float = 0.1, min_warmup: int = 2):
    """[(median, p20, p80)] in ms per call of each of fns, timed in interleaved rounds.

    Each round calls every fn once, in an order rotated from round to round, so all of them see
    the same machine: on a shared or throttling machine the speed drifts over seconds, and timing
    one provider after the other would charge that drift to whichever ran in the slow stretch.
    Rounds: about budget_s / (slowest call) but within [min_reps, max_reps].
    """
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    slowest = max(_warm_up(fn, sync, warmup_s, min_warmup) for fn in fns)
    reps = int(max(min_reps, min(max_reps, budget_s / max(slowest, 1e-6))))
    times = [[] for _ in fns]
    for r in range(reps):
        order = [(r + j) % len(fns) for j in range(len(fns))]
        for j in order:
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fns[j]()
                end.record()
                end.synchronize()
                times[j].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fns[j]()
                times[j].append((time.perf_counter() - t0) * 1e3)
    out = []
    for t in times:
        t.sort()
        out.append((statistics.median(t), _percentile(t, 0.2), _percentile(t, 0.8)))
    return out


def measure(fn, device: str, budget_s: float = 1.0, **kwargs):
    """(median, p20, p80) in ms of one fn's time per call."""
    return measure_interleaved([fn], device, budget_s, **kwargs)[0]


def throughput_of(case: Case, median_ms: float, device: str):
    seconds = median_ms * 1e-3
    if case.flops is not None:
        if device.startswith("cuda"):
            return case.flops / seconds / 1e12, "TFLOP/s"
        return case.flops / seconds / 1e9, "GFLOP/s"
    if case.bytes is not None:
        return case.bytes / seconds / 1e9, "GB/s"
    if case.work is not None:
        return case.work / seconds, case.work_unit
    return float("nan"), ""


def run_cases(case_list: List[Case], ctx: Context, budget_s: float, progress=True) -> List[Row]:
    """Times the cases, interleaving those compared with each other: same (op, mode, dtype, shape)."""
    dev = device_name(ctx.device)
    meta = dict(device=dev, torch=torch.__version__, commit=git_commit(), date=now_iso())
    groups = {}
    for case in case_list:
        groups.setdefault((case.op, case.mode, case.dtype, case.shape), []).append(case)
    rows, done = [], 0
    for (op, mode, dtype, shape), members in groups.items():
        if progress:
            names = ", ".join(c.provider for c in members)
            print(f"[{done + 1}-{done + len(members)}/{len(case_list)}] {op} {mode} {dtype} {shape}: {names} ...",
                  end="", file=sys.stderr, flush=True)
        done += len(members)
        ready = []
        for case in members:  # one broken provider must not sink the others or the suite
            try:
                if case.setup is not None:
                    case.setup()
                ready.append(case)
            except Exception as exc:
                print(f" {case.provider} setup FAILED: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        try:
            results = measure_interleaved([c.fn for c in ready], ctx.device, budget_s=budget_s * len(ready))
        except Exception:
            results = []
            for case in ready:  # find the broken one: time each alone
                try:
                    results.append(measure(case.fn, ctx.device, budget_s=budget_s))
                except Exception as exc:
                    print(f" {case.provider} FAILED: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                    results.append(None)
        for case, res in zip(ready, results):
            if res is None:
                continue
            med, p20, p80 = res
            tp, unit = throughput_of(case, med, ctx.device)
            rows.append(Row(case.op, case.provider, case.mode, case.dtype, case.shape, round(med, 4),
                            round(p20, 4), round(p80, 4), round(tp, 3) if tp == tp else float("nan"),
                            unit, baseline=case.baseline, **meta))
            if progress:
                print(f" {case.provider} {med:.3f} ms", end="", file=sys.stderr, flush=True)
        release_inputs()
        if progress:
            print("", file=sys.stderr, flush=True)
    return rows


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
def write_csv(rows: List[Row], out_dir: str = RESULTS_DIR) -> Optional[str]:
    """Appends rows to <out_dir>/<device-slug>.csv (header written once); returns the path."""
    if not rows:
        return None
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, device_slug(rows[0].device) + ".csv")
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow(r.csv_dict())
    return path


def read_csv(path: str) -> List[Row]:
    out = []
    with open(path, newline="") as f:
        for d in csv.DictReader(f):
            kw = {}
            for fld in fields(Row):
                if fld.name not in d:
                    continue
                v = d[fld.name]
                kw[fld.name] = float(v) if fld.type in ("float", float) and v != "" else v
            out.append(Row(**kw))
    return out


def format_table(rows: List[Row]) -> str:
    """One line per row, grouped by (op, mode, dtype, shape), with the speed-up vs the baseline."""
    if not rows:
        return "(no results)"
    groups = {}
    for r in rows:
        groups.setdefault((r.op, r.mode, r.dtype, r.shape), []).append(r)
    header = ["op", "mode", "dtype", "shape", "provider", "median ms", "p20-p80 ms", "vs base", "throughput"]
    lines = []
    for key, members in groups.items():
        base = {m.provider: m for m in members}.get(members[0].baseline)
        for m in members:
            timed = m.median_ms == m.median_ms  # NaN for rows that are not timings (memory)
            ratio = f"{base.median_ms / m.median_ms:.2f}x" if base is not None and timed and m.median_ms > 0 else "-"
            if not timed and base is not None and m.throughput > 0:
                ratio = f"{m.throughput / base.throughput:.2f}x mem"
            if base is not None and m is base:
                ratio = "base"
            tp = f"{m.throughput:.1f} {m.unit}" if m.unit and m.throughput == m.throughput else "-"
            lines.append([m.op, m.mode, m.dtype, m.shape, m.provider, f"{m.median_ms:.3f}",
                          f"{m.p20_ms:.3f}-{m.p80_ms:.3f}", ratio, tp])
    widths = [max(len(header[i]), *(len(l[i]) for l in lines)) for i in range(len(header))]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    prev = None
    for l in lines:
        key = tuple(l[:4])
        if prev is not None and key[:2] != prev[:2]:
            out.append("")
        out.append(fmt.format(*l))
        prev = key
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# Helpers for benchmark modules
# ----------------------------------------------------------------------------------------------
def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def shape_str(shape) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def maybe_compile(fn, ctx: Context):
    """torch.compile(fn) for the torch_compile provider, or None when compilation is off."""
    if not (ctx.compile or ctx.is_cuda):
        return None
    return torch.compile(fn)


def grad_fn_case(forward, leaves, grad_out_like=None):
    """(fwd, bwd, fwd_bwd) callables for a differentiable forward(*leaves) -> Tensor | tuple.

    bwd re-runs the backward of one retained graph (so it times the backward alone); fwd_bwd builds
    the graph and runs the backward every call.
    """
    def first(out):
        return out[0] if isinstance(out, (tuple, list)) else out

    with torch.no_grad():
        probe = first(forward(*leaves))
    g = torch.randn_like(probe) if grad_out_like is None else grad_out_like

    def fwd():
        with torch.no_grad():
            return forward(*leaves)

    holder = {}

    def bwd():
        if "out" not in holder:
            holder["out"] = first(forward(*leaves))
        return torch.autograd.grad(holder["out"], leaves, g, retain_graph=True)

    def fwd_bwd():
        return torch.autograd.grad(first(forward(*leaves)), leaves, g)

    return fwd, bwd, fwd_bwd


# ----------------------------------------------------------------------------------------------
# Inputs built when a case runs, shared by the cases that follow with the same builder
# ----------------------------------------------------------------------------------------------
_live_inputs = {}


def lazy_inputs(make: Callable[[], object], run: Callable[[object], object]):
    """(setup, fn) for a Case whose inputs come from make() and whose timed work is run(inputs).

    Inputs are built in the case's setup, not when the case list is made, and run_cases releases
    them once the cases compared with each other are timed: only one comparison's inputs are alive
    at a time, however many shapes the suite covers (GPU attention inputs at 16k tokens are
    hundreds of MB per shape). Cases passing the same `make` (providers of one shape) share them.
    """
    def setup():
        if make not in _live_inputs:
            _live_inputs[make] = make()

    def fn():
        return run(_live_inputs[make])

    return setup, fn


def release_inputs():
    _live_inputs.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
