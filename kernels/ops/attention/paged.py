"""Variable-length attention over a paged KV pool: every request's queries of a step in one call.

The queries of R requests come flattened, q [T, Hq, D] (request `query_row[t]`, its `query_rank[t]`-th
fed token); request r attends to the keys at pool slots `key_slots[r]` where `key_valid[r]` holds.
`PagedLayout` holds what does not change from layer to layer (where each query goes, the key mask),
built once per step; `paged_attention` then gathers each request's keys from one layer of the pool,
lays its queries out at their ranks and runs one batched attention, and puts the outputs back in
flattened order. A request's result does not depend on the others: its padded queries and keys are
masked out.

Backends, as the other ops: "auto" (the Triton kernel on CUDA; torch's fused attention on CPU, its
tiled flash kernel), "torch" (the float32 reference, `reference.masked_attention` on the gathered
keys), "triton" (`paged_triton`: reads K / V through the slot table, no gathered copy; it needs each
row's queries contiguous and the rows in order, as `GenerationBatch` flattens them).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..backend import BACKENDS
from . import fused_cpu_attention, fused_cpu_available
from .reference import masked_attention


@dataclass(frozen=True)
class PagedLayout:
    """One step's varlen batch: query_row / query_rank [T], max_queries (a host int, so no
    device-to-host copy is needed), key_slots / key_valid [R, K], and `dense`: every row feeds
    max_queries tokens, so the queries need no padding and may come as rows [R, Hq, N, D]. Built on
    first use, once per step: `at` [T] each query's place in the padded [R * max_queries] layout,
    `bias` [R, 1, 1, K] the additive key mask, `cu_q` [R + 1] where each row's queries start in the
    flattened order (for the Triton kernel)."""

    query_row: torch.LongTensor
    query_rank: torch.LongTensor
    max_queries: int
    key_slots: torch.LongTensor
    key_valid: torch.BoolTensor
    dtype: torch.dtype
    dense: bool
    first_slot: int | None = None
    every_key: bool = False
    batch_invariant: bool = False

    @functools.cached_property
    def at(self) -> torch.LongTensor:
        return self.query_row * self.max_queries + self.query_rank

    @functools.cached_property
    def bias(self) -> torch.Tensor | None:
        if self.every_key:
            return None
        return key_bias(self.key_valid, self.dtype)

    @functools.cached_property
    def row_bounds(self) -> tuple[list[int], list[int]]:
        """(where each row's queries start in the flattened order [R + 1], each row's key extent
        [R]: one past its last valid key), on the host: one device-to-host read."""
        valid = self.key_valid
        ends = (valid * torch.arange(1, valid.shape[1] + 1, device=valid.device)).amax(1)
        both = torch.cat([self.cu_q.long(), ends]).tolist()
        rows = self.key_slots.shape[0]
        return both[: rows + 1], both[rows + 1 :]

    @functools.cached_property
    def cu_q(self) -> torch.Tensor:
        rows = self.key_slots.shape[0]
        cu_q = torch.zeros(rows + 1, dtype=torch.int32, device=self.key_slots.device)
        # (a scatter, not bincount: bincount reads its input's maximum on the host, which a CUDA graph
        # capture cannot do)
        ones = torch.ones_like(self.query_row, dtype=torch.int32)
        counts = torch.zeros(rows, dtype=torch.int32, device=cu_q.device).scatter_add_(0, self.query_row, ones)
        cu_q[1:] = counts.cumsum(0)
        return cu_q


def key_bias(valid: torch.BoolTensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive form [R, 1, 1, K] of a key mask [R, K]: 0 where valid, -inf elsewhere."""
    return torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill_(~valid, float("-inf"))[:, None, None]


def paged_layout(
    key_slots: torch.LongTensor,
    key_valid: torch.BoolTensor,
    query_row: torch.LongTensor,
    query_rank: torch.LongTensor,
    max_queries: int,
    dtype: torch.dtype,
    first_slot: int | None = None,
    every_key: bool = False,
    batch_invariant: bool = False,
) -> PagedLayout:
    """The layout of one step (see `PagedLayout`); `dtype` is the queries'. `first_slot`: the caller
    knows that the one row's keys are the consecutive slots from there (the pool's block table);
    `every_key`: that key_valid is all true. `batch_invariant`: off the Triton kernel, attend row by
    row, each over its own keys up to its last valid one, so a row's result has the same bits
    whatever the other rows (the Triton kernel already reads every row on its own). Like the kernel,
    it needs each row's queries contiguous and the rows in order, as `GenerationBatch` flattens them."""
    if key_slots.shape != key_valid.shape or key_slots.dim() != 2:
        raise ValueError(f"key_slots {tuple(key_slots.shape)} and key_valid {tuple(key_valid.shape)} must be [R, K]")
    if query_row.shape != query_rank.shape or query_row.dim() != 1:
        raise ValueError(f"query_row {tuple(query_row.shape)} and query_rank {tuple(query_rank.shape)} must be [T]")
    if not isinstance(max_queries, int) or max_queries < 1:
        raise ValueError(f"max_queries={max_queries!r} must be a positive int")
    if first_slot is not None and (key_slots.shape[0] != 1 or not isinstance(first_slot, int) or first_slot < 0):
        raise ValueError(f"first_slot={first_slot!r} needs one row and a non-negative int")
    if batch_invariant and first_slot is not None:
        raise ValueError("batch_invariant gathers every row's keys: it takes no first_slot view")
    dense = key_slots.shape[0] * max_queries == query_row.numel()
    return PagedLayout(query_row, query_rank, max_queries, key_slots, key_valid, dtype, dense, first_slot, every_key,
                       batch_invariant)  # fmt: skip


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: PagedLayout,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Attention of the flattened queries q [T, Hq, D] over their own request's keys in one layer of
    the pool, k_cache / v_cache [S, Hkv, D], laid out by `layout`; returns [T, Hq, D]. With a dense
    layout the queries may come as rows, [R, Hq, N, D] (what a model's [1, Hq, T, D] is for one
    row), and the result is shaped so too. GQA: Hq a multiple of Hkv (query head h reads KV head
    h // (Hq / Hkv)). Every request needs one valid key. `return_lse`: also each query's log-sum-exp
    ([T, Hq], or [R, Hq, N] for rows) in float32 or wider, to merge with attention over other keys
    (`merge_attention`)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    as_rows = q.dim() == 4
    if (q.dim() != 3 and not as_rows) or k_cache.dim() != 3 or k_cache.shape != v_cache.shape:
        raise ValueError(f"q {tuple(q.shape)} must be [T, Hq, D] or [R, Hq, N, D], the caches [S, Hkv, D], "
                         f"got {tuple(k_cache.shape)}")  # fmt: skip
    if as_rows and not layout.dense:
        raise ValueError("queries as rows [R, Hq, N, D] need a dense layout (every row feeds max_queries tokens)")
    rows, n = layout.key_slots.shape[0], layout.max_queries
    hq, d = q.shape[-3] if as_rows else q.shape[1], q.shape[-1]
    kernel = backend == "triton" or (backend == "auto" and q.is_cuda)
    if kernel or layout.batch_invariant:  # each row on its own, the queries flattened
        flat = q.transpose(1, 2).reshape(rows * n, hq, d) if as_rows else q
        if kernel:
            from .paged_triton import paged_attention as paged_triton

            valid = layout.key_valid.to(torch.int8)
            out, lse = paged_triton(
                flat, k_cache, v_cache, layout.cu_q, layout.key_slots, valid, layout.max_queries, scale, return_lse
            )
        else:
            out, lse = _row_by_row(flat, k_cache, v_cache, layout, scale, return_lse, backend)
        if as_rows:
            out = out.view(rows, n, hq, d).transpose(1, 2)
            lse = None if lse is None else lse.view(rows, n, hq).transpose(1, 2)
        return (out, lse) if return_lse else out
    if layout.first_slot is not None:  # one row on consecutive slots: a view, no gathered copy
        keys = slice(layout.first_slot, layout.first_slot + layout.key_slots.shape[1])
        k, v = k_cache[keys].transpose(0, 1)[None], v_cache[keys].transpose(0, 1)[None]
    else:
        k = k_cache[layout.key_slots].transpose(1, 2)  # [R, Hkv, K, D]
        v = v_cache[layout.key_slots].transpose(1, 2)
    if as_rows:
        padded = q
    else:
        padded = q if layout.dense else q.new_zeros(rows * n, hq, d).index_copy_(0, layout.at, q)
        padded = padded.view(rows, n, hq, d).transpose(1, 2)  # [R, Hq, N, D]
    out, lse = _attend(padded, k, v, layout.key_valid, layout.bias, scale, return_lse, backend)
    if not as_rows:
        out = out.transpose(1, 2).reshape(rows * n, hq, d)
        out = out if layout.dense else out[layout.at]
        if lse is not None:
            lse = lse.transpose(1, 2).reshape(rows * n, hq)
            lse = lse if layout.dense else lse[layout.at]
    return (out, lse) if return_lse else out


def _attend(q, k, v, valid, bias, scale, return_lse: bool, backend: str):
    """(out, lse or None) of rows q [R, Hq, N, D] over k / v [R, Hkv, K, D], valid [R, K] (bias: its
    additive form [R, 1, 1, K], None when every key is valid), off the Triton kernel."""
    if backend == "torch" or return_lse:  # the reference, or torch's tiled CPU kernel (it keeps the lse)
        fused = backend != "torch" and fused_cpu_available(q)
        return (fused_cpu_attention if fused else masked_attention)(q, k, v, valid[:, None, None, :], scale)
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, enable_gqa=gqa), None


def _row_by_row(q, k_cache, v_cache, layout: PagedLayout, scale, return_lse: bool, backend: str):
    """`paged_attention` of flattened queries q [T, Hq, D], one row at a time at its own shapes: its
    queries, its keys up to its last valid one. Returns (out [T, Hq, D], lse [T, Hq] or None)."""
    starts, extents = layout.row_bounds
    outs, lses = [], []
    for r, extent in enumerate(extents):
        rows_q = q[starts[r] : starts[r + 1]].transpose(0, 1)[None]  # [1, Hq, n_r, D]
        slots, valid = layout.key_slots[r : r + 1, :extent], layout.key_valid[r : r + 1, :extent]
        k, v = k_cache[slots].transpose(1, 2), v_cache[slots].transpose(1, 2)  # [1, Hkv, extent, D]
        out, lse = _attend(rows_q, k, v, valid, key_bias(valid, q.dtype), scale, return_lse, backend)
        outs.append(out[0].transpose(0, 1))
        if lse is not None:
            lses.append(lse[0].transpose(0, 1))
    return torch.cat(outs), (torch.cat(lses) if return_lse else None)
