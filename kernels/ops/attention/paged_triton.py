"""Paged variable-length attention (Triton): keys and values read through each row's slot table.

One program handles BLOCK_M queries of one row (request) and one query head: its queries are the
contiguous range [cu_q[r], cu_q[r + 1]) of the flattened queries, and it walks the row's key slots
BLOCK_N at a time, loading K / V straight from the pool (no gathered copy) and folding each tile into
an online softmax in float32 (the same tile update as the dense kernel, `triton._online_softmax_tile`).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..backend import interpreting
from .triton import LN2, LOG2E, _online_softmax_tile


@triton.jit
def _paged_attention_fwd(
    Q,
    K,
    V,
    OUT,
    LSE,
    CU_Q,
    SLOTS,
    VALID,
    stride_qt,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_ot,
    stride_oh,
    K_LEN,
    GROUP,
    HQ,
    D,
    qk_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
    RETURN_LSE: tl.constexpr,
):
    i_r, i_m, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(CU_Q + i_r)
    q_end = tl.load(CU_Q + i_r + 1)
    if i_m * BLOCK_M < q_end - q_start:
        i_kvh = i_h // GROUP
        o_q = q_start + i_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_q = o_q < q_end
        o_d = tl.arange(0, BLOCK_D)
        m_d = o_d < D
        p_q = Q + o_q[:, None].to(tl.int64) * stride_qt + i_h * stride_qh + o_d[None, :]
        b_q = tl.load(p_q, mask=m_q[:, None] & m_d[None, :], other=0.0)
        b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
        b_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        row = i_r.to(tl.int64) * K_LEN
        for start in range(0, K_LEN, BLOCK_N):
            o_n = start + tl.arange(0, BLOCK_N)
            m_n = o_n < K_LEN
            slots = tl.load(SLOTS + row + o_n, mask=m_n, other=0).to(tl.int64)
            m_k = (tl.load(VALID + row + o_n, mask=m_n, other=0) != 0) & m_n
            m_kd = m_k[:, None] & m_d[None, :]
            b_k = tl.load(K + slots[:, None] * stride_ks + i_kvh * stride_kh + o_d[None, :], mask=m_kd, other=0.0)
            b_v = tl.load(V + slots[:, None] * stride_vs + i_kvh * stride_vh + o_d[None, :], mask=m_kd, other=0.0)
            valid = m_q[:, None] & m_k[None, :]
            b_m, b_l, b_acc = _online_softmax_tile(b_q, b_k, b_v, valid, b_m, b_l, b_acc, qk_scale, DOT_FP32)
        out = b_acc / tl.where(b_l > 0, b_l, 1.0)[:, None]
        p_o = OUT + o_q[:, None].to(tl.int64) * stride_ot + i_h * stride_oh + o_d[None, :]
        tl.store(p_o, out.to(OUT.dtype.element_ty), mask=m_q[:, None] & m_d[None, :])
        if RETURN_LSE:  # natural log, -inf where no key is valid
            lse = tl.where(b_l > 0, (b_m + tl.log2(tl.where(b_l > 0, b_l, 1.0))) * LN2, float("-inf"))
            tl.store(LSE + o_q.to(tl.int64) * HQ + i_h, lse, mask=m_q)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_q: torch.Tensor,
    key_slots: torch.LongTensor,
    key_valid: torch.Tensor,
    max_queries: int,
    scale: float | None = None,
    return_lse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q [T, Hq, D] (row r's queries at [cu_q[r], cu_q[r + 1])), one pool layer k / v [S, Hkv, D],
    key_slots [R, K] (int64), key_valid [R, K] (int8) -> ([T, Hq, D], the log-sum-exps [T, Hq] in
    float32 when `return_lse`, else None). D's last stride must be 1."""
    t, hq, d = q.shape
    hkv = k_cache.shape[1]
    rows, k_len = key_slots.shape
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
    out = torch.empty_like(q)
    lse = torch.empty(t, hq, dtype=torch.float32, device=q.device) if return_lse else None
    if t == 0:
        return out, lse
    block_m = 16
    block_d = max(16, triton.next_power_of_2(d))
    block_n = 64 if block_d <= 64 else 32
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    grid = (rows, triton.cdiv(max_queries, block_m), hq)
    _paged_attention_fwd[grid](
        q, k_cache, v_cache, out, lse if return_lse else out, cu_q, key_slots.contiguous(), key_valid.contiguous(),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        out.stride(0), out.stride(1), k_len, hq // hkv, hq, d, scale * LOG2E,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, DOT_FP32=interpreting() or q.dtype == torch.float32,
        RETURN_LSE=return_lse,
    )  # fmt: skip
    return out, lse
