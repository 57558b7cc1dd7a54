"""Which implementation runs the kernels: Triton, the PyTorch path, or none.

``training.kernels`` chooses: ``auto`` takes Triton on a CUDA GPU and the PyTorch
path elsewhere, because on a CPU Triton can only run in its interpreter, which is
for testing and thousands of times slower. ``triton`` insists on Triton and says
plainly when it cannot have it; ``torch`` and ``off`` need nothing.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Literal

import torch

from tunelab.errors import UserError

Backend = Literal["triton", "torch"]


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_on() -> bool:
    """``TRITON_INTERPRET=1``: Triton kernels run on CPU tensors through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve(mode: str) -> Backend | None:
    """The backend for ``training.kernels`` on this machine (None for ``off``)."""
    if mode == "off":
        return None
    if mode == "torch":
        return "torch"
    usable = triton_installed() and (torch.cuda.is_available() or interpreter_on())
    if mode == "auto":
        return "triton" if usable and torch.cuda.is_available() else "torch"
    if not triton_installed():
        raise UserError('training.kernels is "triton" but the triton package is not installed; '
                        'run pip install triton, or set training.kernels: auto.')
    if not usable:
        raise UserError('training.kernels is "triton" but this machine has no CUDA GPU; '
                        "set training.kernels: auto (or torch) to use the PyTorch kernels on the CPU.")
    return "triton"
