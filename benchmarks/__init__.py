"""tx_kernels benchmark suite: python -m benchmarks.run (see run.py and common.py)."""
