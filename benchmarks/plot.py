"""Bar charts from the benchmark CSV files (never reruns anything).

    python -m benchmarks.plot [CSV ...] [--out DIR] [--metric time|throughput]

Reads benchmarks/results/*.csv by default. For every (device, op) it draws one figure: a group
of bars per (mode, dtype, shape), one bar per provider, from the newest row of each measurement;
the label above each bar is its speed-up over the group's torch_eager row (or the first provider
present). Figures go to <out>/<device-slug>__<op>.png (default benchmarks/results/).
matplotlib is optional for the package; this script says so and exits if it is missing.
"""
import argparse
import glob
import os
import sys

from .common import RESULTS_DIR, device_slug, read_csv

PROVIDER_ORDER = ["tx_kernels", "torch_eager", "torch_compile", "torch_sdpa", "torch_sdpa_flash", "torch_nn", "torch"]
BASELINES = ["torch_eager", "torch_sdpa", "torch_nn", "torch"]


def latest_rows(rows):
    """The newest row per (device, op, provider, mode, dtype, shape)."""
    best = {}
    for r in rows:
        key = (r.device, r.op, r.provider, r.mode, r.dtype, r.shape)
        if key not in best or r.date >= best[key].date:
            best[key] = r
    return list(best.values())


def plot_op(plt, rows, metric, path):
    groups = []
    for r in rows:
        g = (r.mode, r.dtype, r.shape)
        if g not in groups:
            groups.append(g)
    mode_rank = {"fwd": 0, "bwd": 1, "fwd_bwd": 2}
    groups.sort(key=lambda g: (g[1], g[2], mode_rank.get(g[0], 9)))
    providers = sorted({r.provider for r in rows},
                       key=lambda p: PROVIDER_ORDER.index(p) if p in PROVIDER_ORDER else 99)
    by = {(r.mode, r.dtype, r.shape, r.provider): r for r in rows}
    width = 0.8 / max(1, len(providers))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(groups) * max(1, len(providers)) * 0.6), 4.5))
    unit = next((r.unit for r in rows if r.unit), "")
    for i, prov in enumerate(providers):
        xs, ys, labels = [], [], []
        for gi, g in enumerate(groups):
            r = by.get(g + (prov,))
            if r is None:
                continue
            base = next((by[g + (b,)] for b in BASELINES if g + (b,) in by), None)
            value = r.median_ms if metric == "time" else r.throughput
            xs.append(gi + (i - (len(providers) - 1) / 2) * width)
            ys.append(value)
            labels.append(f"{base.median_ms / r.median_ms:.2f}x" if base is not None and r.median_ms > 0 else "")
        bars = ax.bar(xs, ys, width, label=prov)
        for bar, label in zip(bars, labels):
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=7)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{m}\n{d}\n{s}" for m, d, s in groups], fontsize=8)
    ax.set_ylabel("median time (ms), lower is better" if metric == "time" else f"throughput ({unit}), higher is better")
    first = rows[0]
    ax.set_title(f"{first.op} on {first.device}\n(torch {first.torch}, commit {first.commit}; labels: speed-up vs baseline)",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Bar charts from benchmark CSV files")
    ap.add_argument("csv", nargs="*", help="CSV files (default: benchmarks/results/*.csv)")
    ap.add_argument("--out", default=RESULTS_DIR)
    ap.add_argument("--metric", choices=["time", "throughput"], default="time")
    args = ap.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("benchmarks.plot needs matplotlib, which is not installed: pip install matplotlib",
              file=sys.stderr)
        return 2
    files = args.csv or sorted(glob.glob(os.path.join(RESULTS_DIR, "*.csv")))
    if not files:
        print(f"no CSV files found (looked in {RESULTS_DIR}); run python -m benchmarks.run first",
              file=sys.stderr)
        return 1
    rows = latest_rows([r for f in files for r in read_csv(f)])
    os.makedirs(args.out, exist_ok=True)
    by_op = {}
    for r in rows:
        by_op.setdefault((r.device, r.op), []).append(r)
    for (device, op), members in sorted(by_op.items()):
        path = os.path.join(args.out, f"{device_slug(device)}__{op}.png")
        plot_op(plt, members, args.metric, path)
        print(f"wrote {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
