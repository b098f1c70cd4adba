"""Argument checks shared by tx_kernels.functional, varlen and nn: each written once, each error
naming the argument (the C++ binding checks tensors the same way, csrc/binding/checks.h)."""
from numbers import Real

import torch


def require_tensor(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"tx_kernels: `{name}` must be a torch.Tensor, got {type(x).__name__}")


def check_number(x, name, allow_none=False):
    # bool is an int subclass: True must not pass for eps or scale.
    if x is None and allow_none:
        return
    if isinstance(x, bool) or not isinstance(x, Real):
        raise TypeError(f"tx_kernels: `{name}` must be a number{' or None' if allow_none else ''}, "
                        f"got {type(x).__name__}")


def check_bool(x, name):
    # bool("no") is True: a string or number passed for a flag must not be read as one.
    if not isinstance(x, bool):
        raise TypeError(f"tx_kernels: `{name}` must be a bool, got {type(x).__name__} {x!r}")


def check_dropout_p(p, name="dropout_p"):
    if not isinstance(p, (float, int)) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
        raise ValueError(f"tx_kernels: `{name}` must be a number in [0, 1], got {p!r}")


def new_rng():
    """[seed, offset] for one dropout call, drawn from torch's default CPU generator.

    Drawing it as a tensor keeps torch.compile graphs free of Python-side randomness, and the
    backward regenerates the same mask from it.
    """
    return torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64)


def autocast_inputs(*tensors):
    """The floating tensors cast to the autocast dtype when autocast is on for their device, as
    torch's SDPA runs under autocast."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)
