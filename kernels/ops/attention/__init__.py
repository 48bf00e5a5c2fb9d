"""attention(q, k, v, *, kv_len, key_mask, causal, scale): active queries over cached + active keys."""

from __future__ import annotations

from ..backend import use_triton
from .reference import attention as attention_reference


def attention(
    q, k, v, *, kv_len=None, key_mask=None, causal: bool = False, scale: float | None = None, backend: str = "auto"
):
    """softmax(q k^T * scale) v with GQA, per-row key lengths, a key padding mask and bottom-right causal
    masking; float32 accumulation whatever the input dtype. Shapes: q [B, Hq, Lq, D], k / v
    [B, Hkv, Lk, D], kv_len [B] (keys at or after it are ignored), key_mask [B, Lk] bool.
    `backend`: "auto" (Triton on CUDA, torch on CPU), "triton" or "torch"."""
    if use_triton(backend, q, k, v):
        from .triton import attention as attention_triton

        return attention_triton(q, k, v, kv_len=kv_len, key_mask=key_mask, causal=causal, scale=scale)
    return attention_reference(q, k, v, kv_len=kv_len, key_mask=key_mask, causal=causal, scale=scale)


__all__ = ["attention", "attention_reference"]
