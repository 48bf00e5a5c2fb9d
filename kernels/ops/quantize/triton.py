"""Triton KV quantize / dequantize with packed codes (same format and rounding as `reference`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import QuantizedTensor, check_quantize_args


@triton.jit
def _quantize_token(X, DATA, SCALE, ZERO, R, D, BITS: tl.constexpr, G: tl.constexpr, BLOCK_R: tl.constexpr):
    """Rows of x [R, D]; one program quantizes one group of G channels for BLOCK_R rows."""
    PER_BYTE: tl.constexpr = 8 // BITS
    LEVELS: tl.constexpr = (1 << BITS) - 1
    i_r, i_g = tl.program_id(0), tl.program_id(1)
    o_r = (i_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    m_r = o_r < R
    o_c = tl.arange(0, G)
    x = tl.load(X + o_r[:, None] * D + i_g * G + o_c[None, :], mask=m_r[:, None], other=0.0).to(tl.float32)
    lo, hi = tl.min(x, 1), tl.max(x, 1)
    scale = ((hi - lo) / LEVELS).to(SCALE.dtype.element_ty)
    zero = lo.to(ZERO.dtype.element_ty)
    n_groups = D // G
    tl.store(SCALE + o_r * n_groups + i_g, scale, mask=m_r)
    tl.store(ZERO + o_r * n_groups + i_g, zero, mask=m_r)
    s, z = scale.to(tl.float32), zero.to(tl.float32)
    s = tl.where(s > 0, s, 1.0)
    o_b = tl.arange(0, G // PER_BYTE)
    packed = tl.zeros([BLOCK_R, G // PER_BYTE], dtype=tl.int32)
    for j in tl.static_range(PER_BYTE):
        xj = tl.load(X + o_r[:, None] * D + i_g * G + o_b[None, :] * PER_BYTE + j, mask=m_r[:, None], other=0.0)
        code = tl.floor((xj.to(tl.float32) - z[:, None]) / s[:, None] + 0.5)
        code = tl.minimum(tl.maximum(code, 0.0), LEVELS).to(tl.int32)
        packed = packed | (code << (j * BITS))
    p_data = DATA + o_r[:, None] * (D // PER_BYTE) + (i_g * G) // PER_BYTE + o_b[None, :]
    tl.store(p_data, packed.to(tl.uint8), mask=m_r[:, None])


@triton.jit
def _quantize_channel(X, DATA, SCALE, ZERO, L, D, BITS: tl.constexpr, G: tl.constexpr, BLOCK_B: tl.constexpr):
    """x [BH, L, D]; one program quantizes G tokens x (BLOCK_B * codes per byte) channels."""
    PER_BYTE: tl.constexpr = 8 // BITS
    LEVELS: tl.constexpr = (1 << BITS) - 1
    i_bh, i_t, i_c = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    o_t = i_t * G + tl.arange(0, G)
    o_b = i_c * BLOCK_B + tl.arange(0, BLOCK_B)
    m_b = o_b < D // PER_BYTE
    packed = tl.zeros([G, BLOCK_B], dtype=tl.int32)
    for j in tl.static_range(PER_BYTE):
        ch = o_b * PER_BYTE + j
        x = tl.load(X + i_bh * L * D + o_t[:, None] * D + ch[None, :], mask=m_b[None, :], other=0.0).to(tl.float32)
        lo, hi = tl.min(x, 0), tl.max(x, 0)
        scale = ((hi - lo) / LEVELS).to(SCALE.dtype.element_ty)
        zero = lo.to(ZERO.dtype.element_ty)
        p_sz = i_bh * (L // G) * D + i_t * D + ch
        tl.store(SCALE + p_sz, scale, mask=m_b)
        tl.store(ZERO + p_sz, zero, mask=m_b)
        s, z = scale.to(tl.float32), zero.to(tl.float32)
        s = tl.where(s > 0, s, 1.0)
        code = tl.floor((x - z[None, :]) / s[None, :] + 0.5)
        code = tl.minimum(tl.maximum(code, 0.0), LEVELS).to(tl.int32)
        packed = packed | (code << (j * BITS))
    p_data = DATA + i_bh * L * (D // PER_BYTE) + o_t[:, None] * (D // PER_BYTE) + o_b[None, :]
    tl.store(p_data, packed.to(tl.uint8), mask=m_b[None, :])


@triton.jit
def dequantize_tile(
    DATA, SCALE, ZERO, i_bh, o_n, o_d, mask, L, D, BITS: tl.constexpr, G: tl.constexpr, CHANNEL: tl.constexpr
):
    """Dequantized [N, BLOCK_D] tile of tokens o_n and channels o_d of one (batch, head) row in float32.
    Shared with the fused dequant-attention kernel."""
    PER_BYTE: tl.constexpr = 8 // BITS
    LEVELS: tl.constexpr = (1 << BITS) - 1
    row = i_bh * L + o_n  # [N]
    raw = tl.load(DATA + row[:, None] * (D // PER_BYTE) + (o_d // PER_BYTE)[None, :], mask=mask, other=0)
    code = ((raw.to(tl.int32) >> ((o_d % PER_BYTE) * BITS)[None, :]) & LEVELS).to(tl.float32)
    if CHANNEL:
        p_sz = i_bh * (L // G) * D + (o_n // G)[:, None] * D + o_d[None, :]
    else:
        p_sz = row[:, None] * (D // G) + (o_d // G)[None, :]
    s = tl.load(SCALE + p_sz, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(ZERO + p_sz, mask=mask, other=0.0).to(tl.float32)
    return code * s + z


@triton.jit
def _dequantize(
    DATA,
    SCALE,
    ZERO,
    OUT,
    BH,
    L,
    D,
    BITS: tl.constexpr,
    G: tl.constexpr,
    CHANNEL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i_bh, i_n = tl.program_id(0).to(tl.int64), tl.program_id(1)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    mask = (o_n < L)[:, None] & (o_d < D)[None, :]
    x = dequantize_tile(DATA, SCALE, ZERO, i_bh, o_n, o_d, mask, L, D, BITS, G, CHANNEL)
    tl.store(OUT + (i_bh * L + o_n)[:, None] * D + o_d[None, :], x.to(OUT.dtype.element_ty), mask=mask)


def quantize_kv(
    x: torch.Tensor, bits: int = 4, group_size: int = 32, axis: str = "token", scale_dtype: torch.dtype = torch.float16
) -> QuantizedTensor:
    check_quantize_args(x, bits, group_size, axis)
    b, h, length, d = x.shape
    x = x.contiguous()
    per = 8 // bits
    data = torch.empty((b, h, length, d // per), dtype=torch.uint8, device=x.device)
    if axis == "token":
        scale = torch.empty((b, h, length, d // group_size), dtype=scale_dtype, device=x.device)
        rows, block_r = b * h * length, 16
        _quantize_token[(triton.cdiv(rows, block_r), d // group_size)](
            x, data, scale, zero := torch.empty_like(scale), rows, d, BITS=bits, G=group_size, BLOCK_R=block_r
        )
    else:
        scale = torch.empty((b, h, length // group_size, d), dtype=scale_dtype, device=x.device)
        block_b = min(32, triton.next_power_of_2(d // per))
        grid = (b * h, length // group_size, triton.cdiv(d // per, block_b))
        _quantize_channel[grid](
            x, data, scale, zero := torch.empty_like(scale), length, d, BITS=bits, G=group_size, BLOCK_B=block_b
        )
    return QuantizedTensor(data, scale, zero, bits, group_size, axis, x.dtype)


def dequantize_kv(qt: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    b, h, length, d = qt.shape
    out = torch.empty((b, h, length, d), dtype=dtype or qt.dtype, device=qt.data.device)
    block_n = 16
    _dequantize[(b * h, triton.cdiv(length, block_n))](
        qt.data,
        qt.scale.contiguous(),
        qt.zero.contiguous(),
        out,
        b * h,
        length,
        d,
        BITS=qt.bits,
        G=qt.group_size,
        CHANNEL=qt.axis == "channel",
        BLOCK_N=block_n,
        BLOCK_D=triton.next_power_of_2(d),
    )
    return out
