"""Fused dequant-attention (Triton): packed int2/int4/int8 K/V are dequantized in registers, tile by
tile, inside the flash-attention loop; a full-precision residual window follows the quantized part."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..attention.triton import (
    LOG2E,
    _mask_strides,
    _online_softmax_tile,
    _store_rows,
    launch_config,
    reduce_splits,
    split_workspace,
)
from ..backend import interpreting
from ..quantize.reference import QuantizedTensor
from ..quantize.triton import dequantize_tile
from .reference import check_quantized_inputs


@triton.jit
def _quantized_attention_fwd(
    Q,
    K_DATA,
    K_SCALE,
    K_ZERO,
    V_DATA,
    V_SCALE,
    V_ZERO,
    K_RES,
    V_RES,
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
    stride_rb,
    stride_rh,
    stride_rl,
    stride_rd,
    stride_ob,
    stride_oh,
    stride_ol,
    stride_od,
    stride_mb,
    stride_mh,
    stride_ml,
    Hkv,
    Lq,
    Lz,
    R,
    D,
    qk_scale,
    split_len,
    K_BITS: tl.constexpr,
    V_BITS: tl.constexpr,
    K_G: tl.constexpr,
    V_G: tl.constexpr,
    K_CHANNEL: tl.constexpr,
    V_CHANNEL: tl.constexpr,
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
    o_q = (o_m // GROUPS).to(tl.int64)
    o_h = i_hkv * GROUPS + o_m % GROUPS
    m_rows = o_q < Lq
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    p_q = Q + i_b * stride_qb + o_h[:, None] * stride_qh + o_q[:, None] * stride_ql + o_d[None, :] * stride_qd
    b_q = tl.load(p_q, mask=m_rows[:, None] & m_d[None, :], other=0.0)
    if DOT_FP32:
        b_q = b_q.to(tl.float32)
    if HAS_KV_LEN:
        kv_len = tl.load(KV_LEN + i_b).to(tl.int32)
    else:
        kv_len = Lz + R
    q_pos = kv_len - Lq + o_q
    lo = i_s * split_len
    hi = tl.minimum(lo + split_len, kv_len)
    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # The quantized part: dequantize each K/V tile in registers.
    for start in range(lo, tl.minimum(hi, Lz), BLOCK_N):
        o_n = start + tl.arange(0, BLOCK_N)
        m_n = o_n < tl.minimum(hi, Lz)
        tile = m_n[:, None] & m_d[None, :]
        b_k = dequantize_tile(K_DATA, K_SCALE, K_ZERO, i_bh, o_n, o_d, tile, Lz, D, K_BITS, K_G, K_CHANNEL)
        b_v = dequantize_tile(V_DATA, V_SCALE, V_ZERO, i_bh, o_n, o_d, tile, Lz, D, V_BITS, V_G, V_CHANNEL)
        valid = m_n[None, :] & m_rows[:, None]
        if HAS_MASK:
            keep = tl.load(KEY_MASK + i_b * stride_mb + i_hkv * stride_mh + o_n * stride_ml, mask=m_n, other=0)
            valid = valid & (keep != 0)[None, :]
        if CAUSAL:
            valid = valid & (o_n[None, :] <= q_pos[:, None])
        b_m, b_l, b_acc = _online_softmax_tile(
            b_q, b_k.to(b_q.dtype), b_v.to(b_q.dtype), valid, b_m, b_l, b_acc, qk_scale, DOT_FP32
        )
    # The full-precision residual window (keys Lz .. Lz + R - 1).
    for start in range(tl.maximum(lo, Lz), hi, BLOCK_N):
        o_n = start + tl.arange(0, BLOCK_N)
        m_n = o_n < hi
        o_r = o_n - Lz
        p_k = K_RES + i_b * stride_rb + i_hkv * stride_rh + o_r[:, None] * stride_rl + o_d[None, :] * stride_rd
        p_v = V_RES + i_b * stride_rb + i_hkv * stride_rh + o_r[:, None] * stride_rl + o_d[None, :] * stride_rd
        b_k = tl.load(p_k, mask=m_n[:, None] & m_d[None, :], other=0.0)
        b_v = tl.load(p_v, mask=m_n[:, None] & m_d[None, :], other=0.0)
        valid = m_n[None, :] & m_rows[:, None]
        if HAS_MASK:
            keep = tl.load(KEY_MASK + i_b * stride_mb + i_hkv * stride_mh + o_n * stride_ml, mask=m_n, other=0)
            valid = valid & (keep != 0)[None, :]
        if CAUSAL:
            valid = valid & (o_n[None, :] <= q_pos[:, None])
        b_m, b_l, b_acc = _online_softmax_tile(
            b_q, b_k.to(b_q.dtype), b_v.to(b_q.dtype), valid, b_m, b_l, b_acc, qk_scale, DOT_FP32
        )
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
    num_splits: int | None = None,
    block_n: int | None = None,
    out: torch.Tensor | None = None,
):
    """Triton version of `reference.quantized_attention`; `out` may be a preallocated output."""
    check_quantized_inputs(q, k_q, v_q, k_res, v_res, key_mask)
    b, hq, lq, d = q.shape
    _, hkv, lz, _ = k_q.shape
    if q.shape[0] != b or q.shape[3] != d or hq % hkv:
        raise ValueError(f"q {tuple(q.shape)} does not fit quantized K/V {k_q.shape}")
    r = 0 if k_res is None else k_res.shape[2]
    if k_res is None:
        k_res = v_res = q.new_zeros(b, hkv, 1, d)
    else:
        k_res, v_res = k_res.contiguous(), v_res.contiguous()
    groups = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.empty_like(q) if out is None else out
    block_m, block_n, block_d, num_splits, split_len, m_blocks = launch_config(q, groups, lz + r, num_splits, block_n)
    o_part, ml_part = split_workspace(q, num_splits)
    lse = q.new_empty((b, hq, lq), dtype=torch.float32) if return_lse else None
    _quantized_attention_fwd[(m_blocks, b * hkv, num_splits)](
        q,
        k_q.data,
        k_q.scale.contiguous(),
        k_q.zero.contiguous(),
        v_q.data,
        v_q.scale.contiguous(),
        v_q.zero.contiguous(),
        k_res,
        v_res,
        out,
        lse if lse is not None else ml_part,
        kv_len if kv_len is not None else q,
        key_mask.view(torch.uint8) if key_mask is not None else q,
        o_part,
        ml_part,
        *q.stride(),
        *k_res.stride(),
        *out.stride(),
        *_mask_strides(key_mask),
        hkv,
        lq,
        lz,
        r,
        d,
        scale * LOG2E,
        split_len,
        K_BITS=k_q.bits,
        V_BITS=v_q.bits,
        K_G=k_q.group_size,
        V_G=v_q.group_size,
        K_CHANNEL=k_q.axis == "channel",
        V_CHANNEL=v_q.axis == "channel",
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
