"""The activations of the fused bias_act kernel: the one table every layer of tx_kernels reads.

functional.bias_act takes the kernel's names (KERNEL), tx_kernels.nn maps torch.nn's string and
callable activations onto them, and the models and the Hugging Face patching map config names
(HF). The C++ side parses the same kernel names (parse_activation in csrc/binding).
"""
import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

# Kernel name -> the torch function that computes the same activation.
KERNEL = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
}

# Hugging Face config names (hidden_act, activation_function) -> kernel name. gelu_new, gelu_fast
# and gelu_pytorch_tanh are the same tanh approximation written three ways.
HF = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
      "gelu_fast": "gelu_tanh"}
assert set(HF.values()) <= set(KERNEL)


def kernel_name(name, arg="activation") -> str:
    """`name` itself when it is a kernel activation name, else a ValueError naming `arg`."""
    if not isinstance(name, str) or name not in KERNEL:
        raise ValueError(f"tx_kernels: `{arg}` must be one of {sorted(KERNEL)}, got {name!r}")
    return name


def hf_kernel_name(name, arg="activation") -> str:
    """The kernel name of a Hugging Face activation name, else a ValueError naming `arg`."""
    if not isinstance(name, str) or name not in HF:
        raise ValueError(f"tx_kernels: `{arg}`={name!r} is not supported; use one of {sorted(HF)}")
    return HF[name]


def of_callable(activation) -> Optional[str]:
    """The kernel name of an activation callable (torch functions and modules), or None when the
    kernel does not compute it (the caller then runs it unfused)."""
    if activation is F.relu or activation is torch.relu or type(activation) is nn.ReLU:
        return "relu"
    if activation is F.gelu:
        return "gelu"
    if type(activation) is nn.GELU:
        return "gelu" if activation.approximate == "none" else "gelu_tanh"
    if (isinstance(activation, functools.partial) and activation.func is F.gelu
            and not activation.args and set(activation.keywords) <= {"approximate"}):
        return "gelu_tanh" if activation.keywords.get("approximate", "none") == "tanh" else "gelu"
    return None


def torch_function(activation) -> Callable:
    """The callable torch.nn stores for a string activation (one of KERNEL), or `activation` itself
    when it is already callable. torch.nn raises RuntimeError for an unknown name, so this does too."""
    if isinstance(activation, str):
        if activation not in KERNEL:
            raise RuntimeError(f"tx_kernels: `activation` should be one of {sorted(KERNEL)} or a callable, "
                               f"not {activation!r}")
        return KERNEL[activation]
    if not callable(activation):
        raise TypeError(f"tx_kernels: `activation` must be a string or a callable, got "
                        f"{type(activation).__name__}")
    return activation
