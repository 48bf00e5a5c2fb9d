"""attention(q, k, v, *, kv_len, key_mask, causal, scale, return_lse): active queries over cached +
active keys; merge_attention: one attention from attentions over disjoint key sets."""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
    `backend`: "auto" (Triton on CUDA; on CPU torch's tiled attention kernel, which also returns the
    log-sum-exp), "triton" or "torch" (the reference)."""
    kw = dict(kv_len=kv_len, key_mask=key_mask, causal=causal, scale=scale, return_lse=return_lse)
    if use_triton(backend, q, k, v):
        from .triton import attention as attention_triton

        return attention_triton(q, k, v, **kw)
    if backend == "auto" and fused_cpu_available(q):
        kw["attend"] = fused_cpu_attention
    return attention_reference(q, k, v, **kw)


_FUSED_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def fused_cpu_available(q: torch.Tensor) -> bool:
    """Whether torch's tiled CPU attention (the kernel behind SDPA on CPU) can serve `q`."""
    return _FUSED_CPU is not None and q.device.type == "cpu" and q.dtype in _FUSED_DTYPES


def fused_cpu_attention(q, k, v, valid: torch.Tensor, scale: float | None = None):
    """`masked_attention` through torch's tiled CPU attention, which also returns the log-sum-exp
    (what SDPA's public call drops): no [Lq, Lk] score matrix per head, several times faster than the
    reference at thousands of keys. `valid` [B or 1, Hkv or 1, Lq or 1, Lk] becomes an additive mask
    (per query head); a query with no valid key gets zeros and a log-sum-exp of -inf, as in the
    reference."""
    b, hq, lq, _ = q.shape
    if valid.shape[1] > 1 and valid.shape[1] != hq:
        valid = valid.repeat_interleave(hq // valid.shape[1], dim=1)
    bias = torch.zeros(valid.shape, dtype=q.dtype, device=q.device).masked_fill_(~valid, float("-inf"))
    out, lse = _FUSED_CPU(q, k, v, attn_mask=bias, scale=scale)
    empty = ~valid.any(-1).expand(b, hq, lq)
    if empty.any():
        out = out.masked_fill(empty[..., None], 0.0)
        lse = lse.masked_fill(empty, float("-inf"))
    return out, lse


def dense_attention(q, k, v, key_mask, backend: str = "auto"):
    """Bidirectional attention of q [B, Hq, n, D] over k / v [B, Hkv, L, D] with key_mask [B, L] (None:
    every key), as a cache-free forward computes it: the Triton kernel ("triton", or "auto" on CUDA)
    or torch's SDPA (bit for bit what the reference models compute on CPU). GQA: Hq a multiple of
    Hkv, keys shared by consecutive query heads. A key_mask [B, n, L] gives each query its own keys
    (block diffusion's block-causal mask); it goes through SDPA, whose masks take that shape."""
    per_query = key_mask is not None and key_mask.dim() == 3
    if not per_query and (backend == "triton" or (backend == "auto" and q.is_cuda)):
        return attention(q, k, v, key_mask=key_mask, backend="triton")
    mask = None if key_mask is None else key_mask[:, None] if per_query else key_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


from .paged import PagedLayout, paged_attention, paged_layout  # noqa: E402  (it calls `attention` above)

__all__ = [
    "PagedLayout",
    "attention",
    "attention_reference",
    "dense_attention",
    "masked_attention",
    "merge_attention",
    "paged_attention",
    "paged_layout",
]
