"""Attention over quantized K/V plus a full-precision window of recent tokens, in plain torch.

The quantized part is dequantized `chunk` tokens at a time and attended chunk by chunk, the partial
results merged by their log-sum-exps, so a step never holds a dequantized copy of the whole cache
(`peak_dequantized_tokens` records the largest chunk dequantized, for tests)."""

from __future__ import annotations

import torch

from ..attention.reference import check_key_mask, masked_attention, merge_attention
from ..quantize.reference import QuantizedTensor, dequantize_kv

DEFAULT_CHUNK = 1024
peak_dequantized_tokens = 0


def check_quantized_inputs(q, k_q: QuantizedTensor, v_q: QuantizedTensor, k_res, v_res, key_mask=None) -> None:
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
    b, h, lz, _ = k_q.shape
    check_key_mask(key_mask, b, h, lz + (0 if k_res is None else k_res.shape[2]))


def quantized_attention(
    q,
    k_q: QuantizedTensor,
    v_q: QuantizedTensor,
    k_res=None,
    v_res=None,
    *,
    kv_len=None,
    key_mask=None,
    causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
    chunk: int = DEFAULT_CHUNK,
    attend=masked_attention,
):
    """Attention over keys [dequantize(k_q); k_res] and values [dequantize(v_q); v_res] (the residual
    window holds the most recent tokens in full precision, as KIVI keeps them); `key_mask` [B, Lz + R]
    or [B, H_kv, Lz + R] as in `attention`. Chunks of `chunk` tokens (a multiple of the channel-axis
    group size) are dequantized one at a time, each attended by `attend` (`masked_attention`'s
    signature: the reference, or torch's tiled CPU attention)."""
    global peak_dequantized_tokens
    check_quantized_inputs(q, k_q, v_q, k_res, v_res, key_mask)
    acc = torch.promote_types(q.dtype, torch.float32)
    b, h, lz, _ = k_q.shape
    total = lz + (0 if k_res is None else k_res.shape[2])
    groups = [g for g, qt in ((k_q.group_size, k_q), (v_q.group_size, v_q)) if qt.axis == "channel"]
    step = max(chunk // max(groups, default=1), 1) * max(groups, default=1)
    kv_len = kv_len if kv_len is not None else torch.full((b,), total, dtype=torch.long, device=q.device)
    lq = q.shape[2]
    qpos = kv_len[:, None] - lq + torch.arange(lq, device=q.device)  # [B, Lq] each query's position
    parts = []
    for start in range(0, total, step):
        end = min(start + step, total)
        k, v = _keys_values(k_q, v_q, k_res, v_res, start, end, acc)
        peak_dequantized_tokens = max(peak_dequantized_tokens, min(end, lz) - min(start, lz))
        valid = _chunk_mask(key_mask, kv_len, qpos, causal, start, end)
        parts.append(attend(q.to(acc), k, v, valid, scale))
    if not parts:
        empty = torch.zeros_like(q), torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)
        return empty if return_lse else empty[0]
    out, lse = merge_attention(parts)
    return (out.to(q.dtype), lse) if return_lse else out.to(q.dtype)


def _keys_values(k_q, v_q, k_res, v_res, start: int, end: int, dtype):
    """Keys and values [B, H, end - start, D] of positions start..end of [quantized; residual]."""
    lz = k_q.shape[2]
    ks, vs = [], []
    if start < lz:
        ks.append(dequantize_kv(k_q.tokens(start, min(end, lz)), dtype))
        vs.append(dequantize_kv(v_q.tokens(start, min(end, lz)), dtype))
    if end > lz:
        ks.append(k_res[:, :, max(start, lz) - lz : end - lz].to(dtype))
        vs.append(v_res[:, :, max(start, lz) - lz : end - lz].to(dtype))
    return (torch.cat(ks, 2), torch.cat(vs, 2)) if len(ks) > 1 else (ks[0], vs[0])


def _chunk_mask(key_mask, kv_len, qpos, causal: bool, start: int, end: int) -> torch.Tensor:
    """[B, H or 1, Lq or 1, n] validity of keys start..end: below kv_len, in the key mask, and with
    `causal` at or before each query's position (`qpos` [B, Lq])."""
    keys = torch.arange(start, end, device=qpos.device)
    valid = (keys[None, :] < kv_len[:, None])[:, None, None, :]
    if key_mask is not None:
        part = key_mask[..., start:end]
        valid = valid & (part[:, None, None, :] if part.dim() == 2 else part[:, :, None, :])
    if causal:
        valid = valid & (keys[None, None, :] <= qpos[:, :, None])[:, None]
    return valid
