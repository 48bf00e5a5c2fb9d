"""Attention of active queries over cached + active keys, in plain torch (the kernels' reference)."""

from __future__ import annotations

import math

import torch


def check_attention_inputs(q, k, v, kv_len, key_mask) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, L, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, hq, _, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be [B={b}, H_kv, L_k, D={d}]")
    if hq % k.shape[1]:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({k.shape[1]})")
    if kv_len is not None and (kv_len.shape != (b,) or kv_len.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"kv_len must be an integer tensor [B={b}], got {kv_len.dtype} {tuple(kv_len.shape)}")
    if key_mask is not None and (key_mask.shape != (b, k.shape[2]) or key_mask.dtype != torch.bool):
        raise ValueError(
            f"key_mask must be bool [B={b}, L_k={k.shape[2]}], got {key_mask.dtype} {tuple(key_mask.shape)}"
        )


def attention_mask(lq: int, lk: int, kv_len, key_mask, causal: bool, device) -> torch.Tensor:
    """Which keys each query may attend to: [B or 1, 1, Lq, Lk] (True = attend).

    Keys at or after kv_len[b] are invalid; key_mask[b, j] False removes key j; with `causal`, query i
    sits at position kv_len - Lq + i (queries are the last Lq tokens) and sees keys up to it.
    """
    keys = torch.arange(lk, device=device)
    length = kv_len.to(device)[:, None] if kv_len is not None else torch.tensor([[lk]], device=device)
    valid = (keys[None, :] < length)[:, None, None, :]
    if key_mask is not None:
        valid = valid & key_mask[:, None, None, :]
    if causal:
        qpos = length[:, :, None] - lq + torch.arange(lq, device=device)[None, :, None]  # [B, Lq, 1]
        valid = valid & (keys[None, None, :] <= qpos)[:, None]
    return valid


def attention(q, k, v, *, kv_len=None, key_mask=None, causal: bool = False, scale: float | None = None):
    """softmax(q k^T * scale) v with GQA (query head h uses key head h // (Hq // Hkv)).

    q: [B, Hq, Lq, D]; k, v: [B, Hkv, Lk, D]; kv_len: [B] valid keys per row (default Lk);
    key_mask: [B, Lk] bool (False = padding); causal: bottom-right aligned. Computed in float32 (float64
    for float64 inputs); a query with no valid key returns zeros. Output in q's dtype.
    """
    check_attention_inputs(q, k, v, kv_len, key_mask)
    acc = torch.promote_types(q.dtype, torch.float32)
    groups = q.shape[1] // k.shape[1]
    kf = k.to(acc).repeat_interleave(groups, dim=1)
    vf = v.to(acc).repeat_interleave(groups, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q.to(acc) @ kf.transpose(-1, -2)) * scale
    valid = attention_mask(q.shape[2], k.shape[2], kv_len, key_mask, causal, q.device)
    scores = scores.masked_fill(~valid, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no valid key
    return (probs @ vf).to(q.dtype)
