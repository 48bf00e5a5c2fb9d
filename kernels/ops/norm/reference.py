"""The plain-torch RMSNorm the models compute (`dlmcache.models.layers.RMSNorm`)."""

from __future__ import annotations

import torch


def check_norm_inputs(x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    if weight.dim() != 1 or x.dim() < 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"x {tuple(x.shape)} must be [..., D] and weight {tuple(weight.shape)} [D]")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps={eps!r} must be a non-negative number")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / sqrt(mean(x^2) + eps)), the normalisation in float32 at least, cast back to x's
    dtype before the weight multiplies it."""
    check_norm_inputs(x, weight, eps)
    acc = torch.promote_types(x.dtype, torch.float32)
    h = x.to(acc)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)
