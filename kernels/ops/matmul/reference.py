"""The plain-torch reference of the batch-invariant linear: x @ weight.T + bias, in float64."""

from __future__ import annotations

import torch


def check_linear_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} must be [..., K] and weight {tuple(weight.shape)} [N, K]")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias {tuple(bias.shape)} must be [N] = [{weight.shape[0]}]")
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"x ({x.dtype}), weight ({weight.dtype}) and bias must share a dtype")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight [N, K].T (+ bias [N]) computed in float64, returned in x's dtype."""
    check_linear_inputs(x, weight, bias)
    out = x.double() @ weight.double().T
    if bias is not None:
        out = out + bias.double()
    return out.to(x.dtype)
