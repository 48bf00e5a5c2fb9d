"""KV compaction by kept indices, in plain torch (the kernel's reference)."""

from __future__ import annotations

import torch


def check_gather_inputs(k, v, index, out_k, out_v) -> None:
    if k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must both be [B, H, L, D]")
    b, h, length, d = k.shape
    if index.dim() != 3 or index.shape[:2] != (b, h) or index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"index must be an integer [B={b}, H={h}, K] tensor, got {index.dtype} {tuple(index.shape)}")
    for name, out in (("out_k", out_k), ("out_v", out_v)):
        if out is not None and (
            out.shape[:2] != (b, h) or out.shape[3] != d or out.shape[2] < index.shape[2] or out.dtype != k.dtype
        ):
            raise ValueError(
                f"{name} {tuple(out.shape)} {out.dtype} cannot hold [B={b}, H={h}, K={index.shape[2]}, D={d}] {k.dtype}"
            )


def gather_kv(k, v, index, out_k=None, out_v=None):
    """Keep positions `index` [B, H, K] of k, v [B, H, L, D] per (batch, head): returns views
    out_k[:, :, :K], out_v[:, :, :K]. `out_k` / `out_v` are preallocated buffers (they may be k and v
    themselves: compaction in place); new ones are made when absent."""
    check_gather_inputs(k, v, index, out_k, out_v)
    n = index.shape[2]
    idx = index.long()[..., None].expand(-1, -1, -1, k.shape[3])
    kept_k, kept_v = k.gather(2, idx), v.gather(2, idx)  # copies, so in-place compaction is safe
    out_k = torch.empty_like(kept_k) if out_k is None else out_k
    out_v = torch.empty_like(kept_v) if out_v is None else out_v
    out_k[:, :, :n].copy_(kept_k)
    out_v[:, :, :n].copy_(kept_v)
    return out_k[:, :, :n], out_v[:, :, :n]
