"""Which implementation an op runs: the Triton kernel or its plain-torch reference.

`auto` (the default) takes Triton for CUDA tensors and the reference on CPU. Under
`TRITON_INTERPRET=1` (set before triton is imported) `backend="triton"` runs the kernels on CPU
tensors too, which is how the tests check them without a GPU.
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    """Resolve `backend` for tensors on their device; raises when "triton" cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    if backend == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    runnable = triton_available() and (on_cuda or interpreting())
    if backend == "triton" and not runnable:
        raise ValueError(
            "backend='triton' needs triton and CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported)"
        )
    return runnable and (backend == "triton" or on_cuda)
