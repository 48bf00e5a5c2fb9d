"""The batch-invariant linear (Triton): x [M, K] @ weight [N, K].T with one fixed tiling.

One program computes a BLOCK_M x BLOCK_N tile of the output over the whole reduction, BLOCK_K at a
time in ascending order, in float32 (float64 for float64 inputs). The tile sizes and warps are
constants, never tuned to the shape, and the reduction is never split: so every output element is
the same sum in the same order whatever M is and wherever its row sits in the batch. That is the
property cuBLAS does not promise (it picks kernels and split-K by shape), and what makes a request's
logits the same alone and in a batch (He et al., "Defeating Nondeterminism in LLM Inference",
Thinking Machines, 2025).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M, BLOCK_N, BLOCK_K, NUM_WARPS = 32, 64, 32, 4


@triton.jit
def _linear(
    X,
    W,
    B,
    OUT,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_om,
    stride_on,
    HAS_BIAS: tl.constexpr,
    WIDE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    i_m, i_n = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64 if WIDE else tl.float32)
    for k0 in range(0, K, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + o_m[:, None] * stride_xm + o_k[None, :] * stride_xk,
                    mask=(o_m < M)[:, None] & (o_k < K)[None, :], other=0.0)  # fmt: skip
        w = tl.load(W + o_n[None, :] * stride_wn + o_k[:, None] * stride_wk,
                    mask=(o_n < N)[None, :] & (o_k < K)[:, None], other=0.0)  # fmt: skip
        if WIDE:
            acc += tl.dot(x.to(tl.float64), w.to(tl.float64))
        else:  # float32 products as float32 ("ieee"): no TF32 rounding of the inputs
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(B + o_n, mask=o_n < N, other=0.0).to(acc.dtype)[None, :]
    mask = (o_m < M)[:, None] & (o_n < N)[None, :]
    tl.store(OUT + o_m[:, None] * stride_om + o_n[None, :] * stride_on, acc.to(OUT.dtype.element_ty), mask=mask)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight [N, K].T (+ bias [N]) with the fixed tiling; returns [..., N] in x's dtype."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    m, n = x2.shape[0], weight.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m and n:
        grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N))
        _linear[grid](
            x2, weight, bias if bias is not None else x2, out, m, n, k,
            x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), out.stride(0), out.stride(1),
            HAS_BIAS=bias is not None, WIDE=x.dtype == torch.float64,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS,
        )  # fmt: skip
    return out.reshape(*lead, n)
