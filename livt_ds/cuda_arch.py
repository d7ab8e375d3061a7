"""The CUDA architecture DeepSpeed's op builders compile for (FusedAdam, CPUAdam's CUDA parts, ...).

Without ``TORCH_CUDA_ARCH_LIST`` DeepSpeed takes the list from torch, which names Hopper "9.0a"; DeepSpeed's
builders then fail with ``ValueError: invalid literal for int()`` on the "0a". Naming the device's plain compute
capability ("9.0") before the first op is built avoids that and compiles for the card the run uses.
"""

from __future__ import annotations

import os

import torch


def set_plain_cuda_arch_list() -> str | None:
    """Set ``TORCH_CUDA_ARCH_LIST`` to the current CUDA device's compute capability (e.g. "9.0") when it is unset
    and a GPU is visible; a value already set is kept. Returns the value in effect (None: unset, no GPU)."""
    current = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if current or not torch.cuda.is_available():
        return current or None
    major, minor = torch.cuda.get_device_capability()
    os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    return os.environ["TORCH_CUDA_ARCH_LIST"]
