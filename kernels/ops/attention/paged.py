"""Variable-length attention over a paged KV pool: every request's queries of a step in one call.

The queries of R requests come flattened, q [T, Hq, D] (request `query_row[t]`, its `query_rank[t]`-th
fed token); request r attends to the keys at pool slots `key_slots[r]` where `key_valid[r]` holds.
The call gathers each request's keys once, lays its queries out at their ranks and runs one batched
`attention` (so every backend of that op serves it), then puts the outputs back in flattened order.
A request's result does not depend on the others: its padded queries and keys are masked out.
"""

from __future__ import annotations

import torch

from . import attention


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key_slots: torch.LongTensor,
    key_valid: torch.BoolTensor,
    query_row: torch.LongTensor,
    query_rank: torch.LongTensor,
    max_queries: int,
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of the flattened queries q [T, Hq, D] over their own request's keys.

    k_cache / v_cache: one layer of the pool [S, Hkv, D]; key_slots [R, K]: the slot of each request's
    k-th key (any slot where `key_valid` [R, K] is False); query_row / query_rank [T]: the request of
    each query and its index among that request's queries (< `max_queries`, a host int, so the call
    needs no device-to-host copy). Returns [T, Hq, D]. GQA: Hq a multiple of Hkv.
    """
    if q.dim() != 3 or k_cache.dim() != 3 or k_cache.shape != v_cache.shape:
        raise ValueError(f"q {tuple(q.shape)} must be [T, Hq, D], the caches [S, Hkv, D], got {tuple(k_cache.shape)}")
    if key_slots.shape != key_valid.shape or key_slots.dim() != 2:
        raise ValueError(f"key_slots {tuple(key_slots.shape)} and key_valid {tuple(key_valid.shape)} must be [R, K]")
    rows, t = key_slots.shape[0], q.shape[0]
    k = k_cache[key_slots].transpose(1, 2)  # [R, Hkv, K, D]
    v = v_cache[key_slots].transpose(1, 2)
    at = query_row * max_queries + query_rank  # [T]
    padded = q.new_zeros(rows * max_queries, *q.shape[1:]).index_copy_(0, at, q)
    padded = padded.view(rows, max_queries, *q.shape[1:]).transpose(1, 2)  # [R, Hq, N, D]
    out = attention(padded, k, v, key_mask=key_valid, scale=scale, backend=backend)
    return out.transpose(1, 2).reshape(rows * max_queries, *q.shape[1:])[at].view(t, *q.shape[1:])
