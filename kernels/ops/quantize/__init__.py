"""quantize_kv / dequantize_kv: int8 / int4 / int2 group-wise KV quantization with packed codes."""

from __future__ import annotations

import torch

from ..backend import use_triton
from .reference import AXES, BITS, GROUP_SIZES, QuantizedTensor, pack, unpack
from .reference import dequantize_kv as dequantize_kv_reference
from .reference import quantize_kv as quantize_kv_reference


def quantize_kv(
    x: torch.Tensor,
    bits: int = 4,
    group_size: int = 32,
    axis: str = "token",
    scale_dtype: torch.dtype = torch.float16,
    backend: str = "auto",
) -> QuantizedTensor:
    """Quantize x [B, H, L, D] (KIVI: axis="channel" for keys, "token" for values); see `reference`."""
    if use_triton(backend, x):
        from .triton import quantize_kv as quantize_kv_triton

        return quantize_kv_triton(x, bits, group_size, axis, scale_dtype)
    return quantize_kv_reference(x, bits, group_size, axis, scale_dtype)


def dequantize_kv(qt: QuantizedTensor, dtype: torch.dtype | None = None, backend: str = "auto") -> torch.Tensor:
    """The dequantized [B, H, L, D] tensor."""
    if use_triton(backend, qt.data):
        from .triton import dequantize_kv as dequantize_kv_triton

        return dequantize_kv_triton(qt, dtype)
    return dequantize_kv_reference(qt, dtype)


__all__ = ["AXES", "BITS", "GROUP_SIZES", "QuantizedTensor", "dequantize_kv", "pack", "quantize_kv", "unpack"]
