"""Attention over quantized K/V plus a full-precision window of recent tokens, in plain torch."""

from __future__ import annotations

import torch

from ..attention.reference import attention
from ..quantize.reference import QuantizedTensor, dequantize_kv


def check_quantized_inputs(q, k_q: QuantizedTensor, v_q: QuantizedTensor, k_res, v_res) -> None:
    if k_q.shape != v_q.shape:
        raise ValueError(f"quantized keys {k_q.shape} and values {v_q.shape} differ in shape")
    if (k_res is None) != (v_res is None):
        raise ValueError("k_res and v_res must be given together")
    if k_res is not None and (
        k_res.shape != v_res.shape or k_res.shape[:2] != k_q.shape[:2] or k_res.shape[3] != k_q.shape[3]
    ):
        raise ValueError(
            f"residual k {tuple(k_res.shape)} / v {tuple(v_res.shape)} must be [B, H_kv, R, D] "
            f"matching the quantized {k_q.shape}"
        )


def quantized_attention(
    q,
    k_q: QuantizedTensor,
    v_q: QuantizedTensor,
    k_res=None,
    v_res=None,
    *,
    kv_len=None,
    causal: bool = False,
    scale: float | None = None,
):
    """Attention over keys [dequantize(k_q); k_res] and values [dequantize(v_q); v_res] (the residual
    window holds the most recent tokens in full precision, as KIVI keeps them)."""
    check_quantized_inputs(q, k_q, v_q, k_res, v_res)
    acc = torch.promote_types(q.dtype, torch.float32)
    k, v = dequantize_kv(k_q, acc), dequantize_kv(v_q, acc)
    if k_res is not None:
        k, v = torch.cat([k, k_res.to(acc)], 2), torch.cat([v, v_res.to(acc)], 2)
    return attention(q.to(acc), k, v, kv_len=kv_len, causal=causal, scale=scale).to(q.dtype)
