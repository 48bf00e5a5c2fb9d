"""attention(q, k, v, *, kv_len, key_mask, causal, scale, return_lse): active queries over cached +
active keys; merge_attention: one attention from attentions over disjoint key sets."""

from __future__ import annotations

from ..backend import use_triton
from .reference import attention as attention_reference
from .reference import masked_attention, merge_attention


def attention(
    q,
    k,
    v,
    *,
    kv_len=None,
    key_mask=None,
    causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """softmax(q k^T * scale) v with GQA, per-row key lengths, a key mask per row or per (row, KV head)
    and bottom-right causal masking; float32 accumulation whatever the input dtype. Shapes: q [B, Hq,
    Lq, D], k / v [B, Hkv, Lk, D], kv_len [B] (keys at or after it are ignored), key_mask [B, Lk] or
    [B, Hkv, Lk] bool. `return_lse`: also each row's log-sum-exp [B, Hq, Lq] (for `merge_attention`).
    `backend`: "auto" (Triton on CUDA, torch on CPU), "triton" or "torch"."""
    kw = dict(kv_len=kv_len, key_mask=key_mask, causal=causal, scale=scale, return_lse=return_lse)
    if use_triton(backend, q, k, v):
        from .triton import attention as attention_triton

        return attention_triton(q, k, v, **kw)
    return attention_reference(q, k, v, **kw)


__all__ = ["attention", "attention_reference", "masked_attention", "merge_attention"]
