"""rms_norm: the models' RMSNorm, with a Triton kernel that normalises each row in one program (the
batch-invariant mode's norm on CUDA; the reference elsewhere)."""

from __future__ import annotations

import torch

from ..backend import use_triton
from .reference import check_norm_inputs
from .reference import rms_norm as rms_norm_reference


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "auto") -> torch.Tensor:
    """weight * (x / sqrt(mean(x^2) + eps)) over the last dim of x [..., D] (see `reference.rms_norm`)."""
    check_norm_inputs(x, weight, eps)
    if use_triton(backend, x, weight):
        from .triton import rms_norm as rms_norm_triton

        return rms_norm_triton(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


__all__ = ["rms_norm", "rms_norm_reference"]
