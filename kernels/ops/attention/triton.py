"""Flash attention over cached + active keys (Triton), GQA-packed and split along the keys.

One program handles BLOCK_M rows of the packed (query position, query head of the group) axis of one
(batch, KV head) pair, so each key/value tile is loaded once for every query head that shares it
(decode with GQA reads K/V once). `num_splits > 1` splits the keys over programs (flash-decoding):
each writes a partial (max, sum, accumulator) that `_reduce_splits` combines, which keeps the GPU busy
when B * H_kv is small. Softmax runs online in float32 with exp2; the row's log-sum-exp can be written
too (natural log, for `merge_attention`).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..backend import interpreting
from .reference import check_attention_inputs

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _online_softmax_tile(b_q, b_k, b_v, valid, b_m, b_l, b_acc, qk_scale, DOT_FP32: tl.constexpr):
    """Fold one key tile into the running (max, sum, accumulator) of a row block."""
    if DOT_FP32:
        s = tl.dot(b_q.to(tl.float32), tl.trans(b_k.to(tl.float32)))
    else:
        s = tl.dot(b_q, tl.trans(b_k))
    s = tl.where(valid, s * qk_scale, float("-inf"))
    m_new = tl.maximum(b_m, tl.max(s, 1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing valid yet stay at zero
    alpha = tl.exp2(b_m - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    b_l = b_l * alpha + tl.sum(p, 1)
    if DOT_FP32:
        b_acc = b_acc * alpha[:, None] + tl.dot(p, b_v.to(tl.float32))
    else:
        b_acc = b_acc * alpha[:, None] + tl.dot(p.to(b_v.dtype), b_v)
    return m_new, b_l, b_acc


@triton.jit
def _store_rows(
    OUT,
    LSE,
    O_PART,
    ML_PART,
    b_m,
    b_l,
    b_acc,
    i_b,
    o_h,
    o_q,
    o_d,
    m_rows,
    m_d,
    i_s,
    stride_ob,
    stride_oh,
    stride_ol,
    stride_od,
    Hq,
    Lq,
    D,
    NUM_SPLITS: tl.constexpr,
    RETURN_LSE: tl.constexpr,
):
    """Final rows (one split; and their log-sum-exp) or this split's partial state for `_reduce_splits`."""
    if NUM_SPLITS == 1:
        out = b_acc / tl.where(b_l > 0, b_l, 1.0)[:, None]
        p_o = OUT + i_b * stride_ob + o_h[:, None] * stride_oh + o_q[:, None] * stride_ol + o_d[None, :] * stride_od
        tl.store(p_o, out.to(OUT.dtype.element_ty), mask=m_rows[:, None] & m_d[None, :])
        if RETURN_LSE:
            lse = tl.where(b_l > 0, (b_m + tl.log2(tl.where(b_l > 0, b_l, 1.0))) * LN2, float("-inf"))
            tl.store(LSE + (i_b * Hq + o_h) * Lq + o_q, lse, mask=m_rows)
    else:
        row = (i_b * Hq + o_h) * Lq + o_q  # [BLOCK_M] row of the [B, Hq, Lq] output
        p_acc = O_PART + (row[:, None] * NUM_SPLITS + i_s) * D + o_d[None, :]
        tl.store(p_acc, b_acc, mask=m_rows[:, None] & m_d[None, :])
        tl.store(ML_PART + (row * NUM_SPLITS + i_s) * 2, b_m, mask=m_rows)
        tl.store(ML_PART + (row * NUM_SPLITS + i_s) * 2 + 1, b_l, mask=m_rows)


@triton.jit
def _attention_fwd(
    Q,
    K,
    V,
    OUT,
    LSE,
    KV_LEN,
    KEY_MASK,
    O_PART,
    ML_PART,
    stride_qb,
    stride_qh,
    stride_ql,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vl,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_ol,
    stride_od,
    stride_mb,
    stride_mh,
    stride_ml,
    Hkv,
    Lq,
    Lk,
    D,
    qk_scale,
    split_len,
    GROUPS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_KV_LEN: tl.constexpr,
    HAS_MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    RETURN_LSE: tl.constexpr,
):
    i_m, i_bh, i_s = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    i_b, i_hkv = i_bh // Hkv, i_bh % Hkv
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_q = (o_m // GROUPS).to(tl.int64)  # query position
    o_h = i_hkv * GROUPS + o_m % GROUPS  # query head
    m_rows = o_q < Lq
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    p_q = Q + i_b * stride_qb + o_h[:, None] * stride_qh + o_q[:, None] * stride_ql + o_d[None, :] * stride_qd
    b_q = tl.load(p_q, mask=m_rows[:, None] & m_d[None, :], other=0.0)
    if HAS_KV_LEN:
        kv_len = tl.load(KV_LEN + i_b).to(tl.int32)
    else:
        kv_len = Lk
    q_pos = kv_len - Lq + o_q  # causal: queries are the last Lq tokens
    lo = i_s * split_len
    hi = tl.minimum(lo + split_len, kv_len)
    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        o_n = start + tl.arange(0, BLOCK_N)
        m_n = o_n < hi
        p_k = K + i_b * stride_kb + i_hkv * stride_kh + o_n[:, None] * stride_kl + o_d[None, :] * stride_kd
        p_v = V + i_b * stride_vb + i_hkv * stride_vh + o_n[:, None] * stride_vl + o_d[None, :] * stride_vd
        b_k = tl.load(p_k, mask=m_n[:, None] & m_d[None, :], other=0.0)
        b_v = tl.load(p_v, mask=m_n[:, None] & m_d[None, :], other=0.0)
        valid = m_n[None, :] & m_rows[:, None]
        if HAS_MASK:
            keep = tl.load(KEY_MASK + i_b * stride_mb + i_hkv * stride_mh + o_n * stride_ml, mask=m_n, other=0)
            valid = valid & (keep != 0)[None, :]
        if CAUSAL:
            valid = valid & (o_n[None, :] <= q_pos[:, None])
        b_m, b_l, b_acc = _online_softmax_tile(b_q, b_k, b_v, valid, b_m, b_l, b_acc, qk_scale, DOT_FP32)
    _store_rows(
        OUT,
        LSE,
        O_PART,
        ML_PART,
        b_m,
        b_l,
        b_acc,
        i_b,
        o_h,
        o_q,
        o_d,
        m_rows,
        m_d,
        i_s,
        stride_ob,
        stride_oh,
        stride_ol,
        stride_od,
        Hkv * GROUPS,
        Lq,
        D,
        NUM_SPLITS,
        RETURN_LSE,
    )


@triton.jit
def _reduce_splits(
    OUT,
    LSE,
    O_PART,
    ML_PART,
    stride_ob,
    stride_oh,
    stride_ol,
    stride_od,
    Hq,
    Lq,
    D,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    RETURN_LSE: tl.constexpr,
):
    """Combine the splits of one output row: out = sum_s acc_s 2^(m_s - M) / sum_s l_s 2^(m_s - M)."""
    row = tl.program_id(0).to(tl.int64)
    i_b, rest = row // (Hq * Lq), row % (Hq * Lq)
    i_h, i_q = rest // Lq, rest % Lq
    o_s = tl.arange(0, BLOCK_S)
    m_s = o_s < NUM_SPLITS
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    b_m = tl.load(ML_PART + (row * NUM_SPLITS + o_s) * 2, mask=m_s, other=float("-inf"))
    b_l = tl.load(ML_PART + (row * NUM_SPLITS + o_s) * 2 + 1, mask=m_s, other=0.0)
    m_max = tl.max(b_m, 0)
    m_ref = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(b_m - m_ref)
    total = tl.sum(b_l * w, 0)
    b_acc = tl.load(
        O_PART + (row * NUM_SPLITS + o_s[:, None]) * D + o_d[None, :], mask=m_s[:, None] & m_d[None, :], other=0.0
    )
    out = tl.sum(b_acc * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    p_o = OUT + i_b * stride_ob + i_h * stride_oh + i_q * stride_ol + o_d * stride_od
    tl.store(p_o, out.to(OUT.dtype.element_ty), mask=m_d)
    if RETURN_LSE:
        lse = tl.where(total > 0, (m_ref + tl.log2(tl.where(total > 0, total, 1.0))) * LN2, float("-inf"))
        tl.store(LSE + row, lse)


def default_num_splits(rows_programs: int, lk: int, device: torch.device) -> int:
    """Enough programs to fill the GPU (2 per SM) without splits shorter than 256 keys."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, max(rows_programs, 1)), triton.cdiv(lk, 256), 64))


def launch_config(q: torch.Tensor, groups: int, lk: int, num_splits: int | None, block_n: int | None):
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_splits, split_len, grid rows) for a [B, Hq, Lq, D] query."""
    rows = q.shape[2] * groups
    block_m = 16 if rows <= 16 else (32 if rows <= 32 else 64)
    block_n = block_n or (64 if q.is_cuda else 32)
    block_d = max(16, triton.next_power_of_2(q.shape[3]))
    m_blocks = triton.cdiv(rows, block_m)
    if num_splits is None:
        num_splits = default_num_splits(m_blocks * q.shape[0] * (q.shape[1] // groups), lk, q.device)
    split_len = triton.cdiv(triton.cdiv(max(lk, 1), num_splits), block_n) * block_n
    return block_m, block_n, block_d, num_splits, split_len, m_blocks


def reduce_splits(
    out: torch.Tensor, lse: torch.Tensor | None, o_part: torch.Tensor, ml_part: torch.Tensor, num_splits: int
) -> None:
    b, hq, lq, d = out.shape
    _reduce_splits[(b * hq * lq,)](
        out,
        lse if lse is not None else ml_part,
        o_part,
        ml_part,
        *out.stride(),
        hq,
        lq,
        d,
        NUM_SPLITS=num_splits,
        BLOCK_S=max(2, triton.next_power_of_2(num_splits)),
        BLOCK_D=max(16, triton.next_power_of_2(d)),
        RETURN_LSE=lse is not None,
    )


def split_workspace(q: torch.Tensor, num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    b, hq, lq, d = q.shape
    if num_splits == 1:
        return q.new_empty(1, dtype=torch.float32), q.new_empty(1, dtype=torch.float32)
    return (
        q.new_empty((b, hq, lq, num_splits, d), dtype=torch.float32),
        q.new_empty((b, hq, lq, num_splits, 2), dtype=torch.float32),
    )


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
    num_splits: int | None = None,
    block_n: int | None = None,
    out: torch.Tensor | None = None,
):
    """Triton version of `reference.attention` (same arguments and semantics); `out` may be a
    preallocated [B, Hq, Lq, D] tensor."""
    check_attention_inputs(q, k, v, kv_len, key_mask)
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    groups = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.empty_like(q) if out is None else out
    block_m, block_n, block_d, num_splits, split_len, m_blocks = launch_config(q, groups, lk, num_splits, block_n)
    o_part, ml_part = split_workspace(q, num_splits)
    lse = q.new_empty((b, hq, lq), dtype=torch.float32) if return_lse else None
    mask = key_mask.view(torch.uint8) if key_mask is not None else q
    _attention_fwd[(m_blocks, b * hkv, num_splits)](
        q,
        k,
        v,
        out,
        lse if lse is not None else ml_part,
        kv_len if kv_len is not None else q,
        mask,
        o_part,
        ml_part,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.stride(),
        *_mask_strides(key_mask),
        hkv,
        lq,
        lk,
        d,
        scale * LOG2E,
        split_len,
        GROUPS=groups,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        HAS_KV_LEN=kv_len is not None,
        HAS_MASK=key_mask is not None,
        CAUSAL=causal,
        NUM_SPLITS=num_splits,
        DOT_FP32=interpreting() or q.dtype == torch.float32,
        RETURN_LSE=return_lse,
    )
    if num_splits > 1:
        reduce_splits(out, lse, o_part, ml_part, num_splits)
    return (out, lse) if return_lse else out


def _mask_strides(key_mask: torch.Tensor | None) -> tuple[int, int, int]:
    """(batch, head, key) strides of a [B, Lk] or [B, H, Lk] key mask (head stride 0 for the former)."""
    if key_mask is None:
        return 0, 0, 0
    if key_mask.dim() == 2:
        return key_mask.stride(0), 0, key_mask.stride(1)
    return key_mask.stride(0), key_mask.stride(1), key_mask.stride(2)
