"""The experts of a mixture-of-experts layer, token by token (the grouped path's reference)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_moe_inputs(x, weights, experts, w_gate, w_up, w_down) -> None:
    if x.dim() != 2:
        raise ValueError(f"x {tuple(x.shape)}: expected [tokens, hidden]")
    t, d = x.shape
    if weights.shape != experts.shape or experts.dim() != 2 or experts.shape[0] != t:
        raise ValueError(
            f"weights {tuple(weights.shape)} and experts {tuple(experts.shape)} must both be [tokens={t}, top_k]"
        )
    if experts.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"experts: expected an integer tensor, got {experts.dtype}")
    if w_gate.dim() != 3 or w_gate.shape != w_up.shape or w_gate.shape[2] != d:
        raise ValueError(f"w_gate {tuple(w_gate.shape)} and w_up {tuple(w_up.shape)} must both be [E, I, {d}]")
    e, i, _ = w_gate.shape
    if w_down.shape != (e, d, i):
        raise ValueError(f"w_down {tuple(w_down.shape)}: expected [{e}, {d}, {i}]")
    if experts.numel() and (int(experts.min()) < 0 or int(experts.max()) >= e):
        raise ValueError(f"experts holds ids outside [0, {e}): {int(experts.min())}..{int(experts.max())}")
    dtypes = {x.dtype, w_gate.dtype, w_up.dtype, w_down.dtype}
    if len(dtypes) != 1:
        raise ValueError(f"x and the expert weights must share a dtype, got {sorted(map(str, dtypes))}")


def moe_experts_reference(x, weights, experts, w_gate, w_up, w_down, combine: str = "expert") -> torch.Tensor:
    """sum_j weights[t, j] * W_down[e] (silu(W_gate[e] x_t) * W_up[e] x_t), e = experts[t, j], one
    token and one expert at a time. x [T, d]; weights, experts [T, k]; w_gate, w_up [E, I, d];
    w_down [E, d, I]. combine="expert": the weights are cast to x's dtype first, as the OLMoE-style
    reference models do; "slot": each term is weighed in the wider of x's and the weights' dtypes
    and the sum cast back to x's (DeepSeek-V3 style). See `moe_experts`."""
    check_moe_inputs(x, weights, experts, w_gate, w_up, w_down)
    if combine not in ("expert", "slot"):
        raise ValueError(f"combine={combine!r}: expected 'expert' or 'slot'")
    dtype = x.dtype if combine == "expert" else torch.promote_types(x.dtype, weights.dtype)
    out = torch.zeros(x.shape, dtype=dtype, device=x.device)
    weights = weights.to(dtype)
    for t in range(x.shape[0]):
        for j in range(experts.shape[1]):
            e = int(experts[t, j])
            h = F.silu(F.linear(x[t], w_gate[e])) * F.linear(x[t], w_up[e])
            out[t] += weights[t, j] * F.linear(h, w_down[e]).to(dtype)
    return out.to(x.dtype)
