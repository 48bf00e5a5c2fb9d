"""KV compaction by kept indices (Triton): one program copies BLOCK_K kept rows of K and V."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import check_gather_inputs


@triton.jit
def _gather_rows(
    SRC,
    DST,
    src,
    i_b,
    i_h,
    o_k,
    o_d,
    mask,
    stride_sb,
    stride_sh,
    stride_sl,
    stride_sd,
    stride_db,
    stride_dh,
    stride_dl,
    stride_dd,
):
    p_src = SRC + i_b * stride_sb + i_h * stride_sh + src[:, None] * stride_sl + o_d[None, :] * stride_sd
    p_dst = DST + i_b * stride_db + i_h * stride_dh + o_k[:, None] * stride_dl + o_d[None, :] * stride_dd
    tl.store(p_dst, tl.load(p_src, mask=mask), mask=mask)


@triton.jit
def _gather_kv(
    K,
    V,
    IDX,
    OUT_K,
    OUT_V,
    H,
    N,
    D,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vl,
    stride_vd,
    stride_ib,
    stride_ih,
    stride_ik,
    stride_okb,
    stride_okh,
    stride_okl,
    stride_okd,
    stride_ovb,
    stride_ovh,
    stride_ovl,
    stride_ovd,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i_bh, i_k = tl.program_id(0).to(tl.int64), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_k = i_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_k = o_k < N
    o_d = tl.arange(0, BLOCK_D)
    mask = m_k[:, None] & (o_d < D)[None, :]
    src = tl.load(IDX + i_b * stride_ib + i_h * stride_ih + o_k * stride_ik, mask=m_k, other=0).to(tl.int64)
    _gather_rows(
        K,
        OUT_K,
        src,
        i_b,
        i_h,
        o_k,
        o_d,
        mask,
        stride_kb,
        stride_kh,
        stride_kl,
        stride_kd,
        stride_okb,
        stride_okh,
        stride_okl,
        stride_okd,
    )
    _gather_rows(
        V,
        OUT_V,
        src,
        i_b,
        i_h,
        o_k,
        o_d,
        mask,
        stride_vb,
        stride_vh,
        stride_vl,
        stride_vd,
        stride_ovb,
        stride_ovh,
        stride_ovl,
        stride_ovd,
    )


def gather_kv(k, v, index, out_k=None, out_v=None):
    """Triton version of `reference.gather_kv`. Compaction into k / v themselves goes through a
    scratch buffer (programs would otherwise read rows that others have already overwritten)."""
    check_gather_inputs(k, v, index, out_k, out_v)
    b, h, _, d = k.shape
    n = index.shape[2]
    aliased = any(o is not None and o.data_ptr() in (k.data_ptr(), v.data_ptr()) for o in (out_k, out_v))
    dst_k = torch.empty((b, h, n, d), dtype=k.dtype, device=k.device) if aliased or out_k is None else out_k
    dst_v = torch.empty((b, h, n, d), dtype=v.dtype, device=v.device) if aliased or out_v is None else out_v
    block_k = 16
    _gather_kv[(b * h, triton.cdiv(n, block_k))](
        k,
        v,
        index,
        dst_k,
        dst_v,
        h,
        n,
        d,
        *k.stride(),
        *v.stride(),
        *index.stride(),
        *dst_k.stride(),
        *dst_v.stride(),
        BLOCK_K=block_k,
        BLOCK_D=triton.next_power_of_2(d),
    )
    if aliased:
        out_k[:, :, :n].copy_(dst_k)
        out_v[:, :, :n].copy_(dst_v)
        dst_k, dst_v = out_k, out_v
    return dst_k[:, :, :n], dst_v[:, :, :n]
