"""Quantization policies: how kept tokens are stored."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..ops.quantize import BITS, GROUP_SIZES, QuantizedTensor, dequantize_kv, quantize_kv


class QuantizationPolicy:
    """Builds the per-layer store that holds K/V in compressed form (KIVI, MiKV, GEAR, ThinK). A store
    has `append(keys, values)`, `read() -> (keys, values)`, `length` and `nbytes_as(element_bytes)`.
    `needs` lists what the policy reads besides K/V ("queries", "all_queries")."""

    name: ClassVar[str] = "base"
    needs: ClassVar[frozenset[str]] = frozenset()

    def store(self, keys: torch.Tensor, values: torch.Tensor, inputs=None):
        """The store for one layer's keys / values [B, H, L, D]; `inputs`: a `ScoreInputs` with the
        queries when the cache has them."""
        raise NotImplementedError


class KIVIStore:
    """Quantized prefix (keys per channel, values per token) + a full-precision residual of recent
    tokens; whenever the residual exceeds `residual` tokens, its oldest `group` tokens are quantized."""

    def __init__(self, policy: KIVI, keys: torch.Tensor, values: torch.Tensor):
        self.policy = policy
        self.k_parts: list[QuantizedTensor] = []
        self.v_parts: list[QuantizedTensor] = []
        self.k_res, self.v_res = keys[:, :, :0], values[:, :, :0]
        self.append(keys, values)

    @property
    def length(self) -> int:
        return sum(p.shape[2] for p in self.k_parts) + self.k_res.shape[2]

    @property
    def nbytes(self) -> int:
        return self.nbytes_as(None)

    def nbytes_as(self, element_bytes: int | None) -> int:
        """Codes and scales as stored; the residual at `element_bytes` per entry (None: its dtype's)."""
        parts = sum(p.nbytes for p in self.k_parts + self.v_parts)
        return parts + 2 * self.k_res.numel() * (element_bytes or self.k_res.element_size())

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        p = self.policy
        self.k_res = torch.cat([self.k_res, keys], 2)
        self.v_res = torch.cat([self.v_res, values], 2)
        spill = max(0, self.k_res.shape[2] - p.residual)
        spill -= spill % p.group_size
        if spill:
            self.k_parts.append(quantize_kv(self.k_res[:, :, :spill], p.bits, p.group_size, "channel"))
            value_group = min(p.group_size, self.v_res.shape[3])  # per-token groups cannot exceed the head dim
            self.v_parts.append(quantize_kv(self.v_res[:, :, :spill], p.bits, value_group, "token"))
            self.k_res, self.v_res = self.k_res[:, :, spill:], self.v_res[:, :, spill:]

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-precision K/V (dequantized prefix + residual) for attention."""
        dtype = self.k_res.dtype
        keys = [dequantize_kv(p, dtype) for p in self.k_parts] + [self.k_res]
        values = [dequantize_kv(p, dtype) for p in self.v_parts] + [self.v_res]
        return torch.cat(keys, 2), torch.cat(values, 2)


@dataclass
class KIVI(QuantizationPolicy):
    """KIVI (Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache",
    arXiv 2402.02750): asymmetric min-max quantization, keys per channel over groups of `group_size`
    tokens, values per token over groups of `group_size` channels, the `residual` most recent tokens
    in full precision. (Values leave the residual in blocks of `group_size` tokens here, like keys,
    rather than one at a time.)"""

    bits: int = 2
    group_size: int = 32
    residual: int = 128
    name = "kivi"

    def __post_init__(self):
        if self.bits not in BITS:
            raise ValueError(f"bits={self.bits}: expected one of {BITS}")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size={self.group_size}: expected one of {GROUP_SIZES}")
        if self.residual < 0:
            raise ValueError(f"residual={self.residual} must be >= 0")

    def store(self, keys, values, inputs=None):
        return KIVIStore(self, keys, values)
