"""The benchmark suite: python -m benchmarks.run [--only op,...] [--quick] [--device cpu|cuda] [--out DIR]

Discovers benchmarks/bench_*.py (interface documented in benchmarks/common.py), times every case,
prints a table (median, p20-p80, speed-up vs the baseline provider, throughput) and appends the
rows to <out>/<device-slug>.csv (default benchmarks/results/). Plots: python -m benchmarks.plot.

Defaults are sized for the 2-core development CPU (a few minutes for the whole suite); on CUDA the
modules switch to the GPU shapes and add torch.compile baselines. torch.compile runs on CPU only
with --compile: inductor's C++ compilation of every case (tens of seconds each on 2 cores, more on a
cold cache) would dominate the suite.
"""
import argparse
import importlib
import os
import pkgutil
import sys
import time

import torch

from . import common


def discover():
    pkg_dir = os.path.dirname(os.path.abspath(__file__))
    mods = []
    for info in sorted(pkgutil.iter_modules([pkg_dir]), key=lambda i: i.name):
        if info.name.startswith("bench_"):
            mods.append(info.name)
    return mods


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated benchmark names (e.g. layer_norm,bias_act)")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (and smaller shapes where a module says so)")
    ap.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available")
    ap.add_argument("--out", default=common.RESULTS_DIR, help="directory for the CSV file")
    ap.add_argument("--no-csv", action="store_true", help="print only, write nothing")
    ap.add_argument("--compile", action="store_true", help="add torch.compile baselines on CPU too")
    ap.add_argument("--system-malloc", action="store_true",
                    help="leave glibc's allocator alone (every large allocation then page-faults anew)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for CPU runs")
    args = ap.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    tuned = False if args.system_malloc else common.tune_cpu_allocator()
    ctx = common.Context(device=device, quick=args.quick, compile=args.compile or device == "cuda")

    names = discover()
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    budget = 0.3 if args.quick else 1.0
    if device == "cuda":
        budget = 0.2 if args.quick else 0.5

    print(f"# device: {common.device_name(device)} | torch {torch.__version__} | commit {common.git_commit()}"
          f" | allocator: {'glibc tuned (freed memory reused)' if tuned else 'system default'}"
          f"{' | quick' if args.quick else ''}", flush=True)

    rows = []
    t_start = time.perf_counter()
    for mod_name in names:
        short = mod_name[len("bench_"):]
        try:
            mod = importlib.import_module(f"{__package__}.{mod_name}")
        except Exception as exc:
            print(f"# skipping {mod_name}: import failed: {exc}", file=sys.stderr)
            continue
        name = getattr(mod, "NAME", short)
        if wanted and name not in wanted and short not in wanted:
            continue
        t0 = time.perf_counter()
        try:
            case_list = mod.cases(ctx)
        except Exception as exc:
            print(f"# skipping {name}: cases() failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        print(f"# {name}: {len(case_list)} cases", file=sys.stderr, flush=True)
        rows += common.run_cases(case_list, ctx, budget)
        if hasattr(mod, "extra_rows"):  # measurements that are not timings (e.g. peak memory)
            try:
                rows += mod.extra_rows(ctx)
            except Exception as exc:
                print(f"# {name}: extra rows failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        print(f"# {name}: done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        del case_list

    print()
    print(common.format_table(rows))
    print(f"\n# {len(rows)} rows in {time.perf_counter() - t_start:.1f} s")
    if rows and not args.no_csv:
        path = common.write_csv(rows, args.out)
        print(f"# appended to {os.path.relpath(path)}")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
