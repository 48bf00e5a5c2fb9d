"""RMSNorm (Triton): one program per row, the whole row in one block, so a row's sum of squares is
the same reduction whatever the number of rows (torch's reduction may split a row across blocks when
there are few rows: the batch-invariant mode's norm)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm(X, W, OUT, D, eps, stride_x, stride_o, WIDE: tl.constexpr, BLOCK_D: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    x = tl.load(X + i * stride_x + o_d, mask=m_d, other=0.0)
    h = x.to(tl.float64) if WIDE else x.to(tl.float32)
    h = h * (1.0 / tl.sqrt(tl.sum(h * h, axis=0) / D + eps))
    w = tl.load(W + o_d, mask=m_d, other=0.0)
    # rounded to x's dtype first, as the model does, then weighed (a product of two such numbers is
    # exact in float32, so rounding it once to the output's dtype is torch's low-precision multiply)
    y = w.to(h.dtype) * h.to(x.dtype).to(h.dtype)
    tl.store(OUT + i * stride_o + o_d, y.to(OUT.dtype.element_ty), mask=m_d)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if x2.shape[0]:
        _rms_norm[(x2.shape[0],)](x2, weight, out, d, float(eps), x2.stride(0), out.stride(0),
                                  WIDE=x.dtype == torch.float64, BLOCK_D=triton.next_power_of_2(d))  # fmt: skip
    return out.reshape(*x.shape[:-1], d)
