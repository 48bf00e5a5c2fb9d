"""Attention of active queries over cached + active keys, in plain torch (the kernels' reference), and
the merge of attentions computed over disjoint key sets."""

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
    check_key_mask(key_mask, b, k.shape[1], k.shape[2])


def check_key_mask(key_mask, b: int, hkv: int, lk: int) -> None:
    if key_mask is None:
        return
    shapes = ((b, lk), (b, hkv, lk))
    if key_mask.dtype != torch.bool or tuple(key_mask.shape) not in shapes:
        raise ValueError(
            f"key_mask must be bool [B={b}, L_k={lk}] or [B, H_kv={hkv}, L_k], got {key_mask.dtype} "
            f"{tuple(key_mask.shape)}"
        )


def attention_mask(lq: int, lk: int, kv_len, key_mask, causal: bool, device) -> torch.Tensor:
    """Which keys each query may attend to: [B or 1, H_kv or 1, Lq, Lk] (True = attend).

    Keys at or after kv_len[b] are invalid; key_mask[b, j] (or [b, h, j]) False removes key j; with
    `causal`, query i sits at position kv_len - Lq + i (queries are the last Lq tokens) and sees keys
    up to it.
    """
    keys = torch.arange(lk, device=device)
    length = kv_len.to(device)[:, None] if kv_len is not None else torch.tensor([[lk]], device=device)
    valid = (keys[None, :] < length)[:, None, None, :]
    if key_mask is not None:
        valid = valid & (key_mask[:, None, None, :] if key_mask.dim() == 2 else key_mask[:, :, None, :])
    if causal:
        qpos = length[:, :, None] - lq + torch.arange(lq, device=device)[None, :, None]  # [B, Lq, 1]
        valid = valid & (keys[None, None, :] <= qpos)[:, None]
    return valid


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
    attend=None,
):
    """softmax(q k^T * scale) v with GQA (query head h uses key head h // (Hq // Hkv)).

    q: [B, Hq, Lq, D]; k, v: [B, Hkv, Lk, D]; kv_len: [B] valid keys per row (default Lk);
    key_mask: [B, Lk] or [B, Hkv, Lk] bool (False = not attended); causal: bottom-right aligned.
    Computed in float32 (float64 for float64 inputs), the queries of a KV-head group stacked against
    its keys (no per-head copy of K / V); a query with no valid key returns zeros. Output in q's
    dtype; with `return_lse` also the log-sum-exp of each row's scaled scores [B, Hq, Lq] (float32 or
    wider; -inf for a row with no valid key), what `merge_attention` combines. `attend`: what computes
    it from the validity mask (`masked_attention`'s signature; None: `masked_attention` itself).
    """
    check_attention_inputs(q, k, v, kv_len, key_mask)
    valid = attention_mask(q.shape[2], k.shape[2], kv_len, key_mask, causal, q.device)
    out, lse = (attend or masked_attention)(q, k, v, valid, scale)
    return (out, lse) if return_lse else out


def masked_attention(q, k, v, valid: torch.Tensor, scale: float | None = None):
    """(output in q's dtype, log-sum-exp [B, Hq, Lq]) of q [B, Hq, Lq, D] over k, v [B, Hkv, Lk, D]
    where `valid` [B or 1, Hkv or 1, Lq or 1, Lk] says which keys each query attends to."""
    acc = torch.promote_types(q.dtype, torch.float32)
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    groups = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qg = q.to(acc).reshape(b, hkv, groups * lq, d)
    scores = (qg @ k.to(acc).transpose(-1, -2)).view(b, hkv, groups, lq, lk) * scale
    scores = scores.masked_fill(~valid[:, :, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, G, Lq]
    probs = torch.exp(scores - lse.clamp_min(torch.finfo(acc).min)[..., None]).nan_to_num(0.0)
    out = (probs.view(b, hkv, groups * lq, lk) @ v.to(acc)).view(b, hq, lq, d).to(q.dtype)
    return out, lse.reshape(b, hq, lq)


def merge_attention(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of disjoint key sets from each set's (output [B, Hq, Lq, D], log-sum-exp
    [B, Hq, Lq]): out = sum_i out_i exp(lse_i - lse), lse = log sum_i exp(lse_i). Rows with no key in
    any set stay zero. Computed in the lse's precision, returned in the outputs' dtype."""
    if not parts:
        raise ValueError("merge_attention needs at least one (output, lse) pair")
    if len(parts) == 1:
        return parts[0]
    lses = torch.stack([lse for _, lse in parts])  # [P, B, Hq, Lq]
    total = torch.logsumexp(lses, dim=0)
    weights = torch.exp(lses - total.clamp_min(torch.finfo(lses.dtype).min)).nan_to_num(0.0)
    out = sum(o.to(lses.dtype) * w[..., None] for (o, _), w in zip(parts, weights, strict=True))
    return out.to(parts[0][0].dtype), total
