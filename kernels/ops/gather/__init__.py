"""gather_kv: compact K/V to the kept positions per (batch, head), into a preallocated buffer."""

from __future__ import annotations

from ..backend import use_triton
from .reference import gather_kv as gather_kv_reference


def gather_kv(k, v, index, out_k=None, out_v=None, backend: str = "auto"):
    """Keep positions `index` [B, H, K] of k, v [B, H, L, D]; returns out_k[:, :, :K], out_v[:, :, :K]
    (buffers may be preallocated, or k / v themselves for compaction in place)."""
    if use_triton(backend, k, v):
        from .triton import gather_kv as gather_kv_triton

        return gather_kv_triton(k, v, index, out_k, out_v)
    return gather_kv_reference(k, v, index, out_k, out_v)


__all__ = ["gather_kv", "gather_kv_reference"]
