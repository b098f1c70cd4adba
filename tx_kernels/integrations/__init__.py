"""Patching existing models to run on tx_kernels: see tx_kernels.integrations.patch.patch."""
from .patching import PatchReport, patch

__all__ = ["patch", "PatchReport"]
