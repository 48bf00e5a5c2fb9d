"""The experts of a mixture-of-experts layer, grouped by expert: one GEMM per projection and active
expert, no loop over tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import check_moe_inputs


def moe_experts(x, weights, experts, w_gate, w_up, w_down, check: bool = True, combine: str = "expert",
                linear=None, activation=None) -> torch.Tensor:  # fmt: skip
    """What `moe_experts_reference` computes (same arguments), grouped: the (token, slot) pairs are
    sorted by expert (stable, so each expert's tokens stay in order), each active expert multiplies
    its tokens' rows at once, and the weighted results are added back into their tokens' rows. One
    device-to-host read (the tokens per expert); `check=False` skips the input checks, which read the
    expert ids' range on the host too. The weights may also be sequences of per-expert matrices (a
    model's expert modules, unstacked), then unchecked.

    combine: the order a token's weighted expert outputs are summed in, which fixes the low bits:
    "expert" adds them in expert-id order with the weights cast to x's dtype (Mixtral / OLMoE /
    Qwen3-MoE's loop over experts); "slot" gathers them to [T, k, d], weighs them in the wider of
    x's and the weights' dtypes (float32 for a bf16 model's float32 router) and sums over the k
    slots in routing order (DeepSeek-V3's `moe_infer`, which LLaDA2 keeps). "slot" adds no
    atomics, so its sum does not depend on the batch either.

    linear: the product (rows [n, d], weight [I, d]) -> [n, I] of each projection (default
    `F.linear`), activation: the gate's (default `F.silu`); the batch-invariant mode passes its own."""
    if combine not in ("expert", "slot"):
        raise ValueError(f"combine={combine!r}: expected 'expert' or 'slot'")
    if check:
        check_moe_inputs(x, weights, experts, w_gate, w_up, w_down)
    linear, activation = linear or F.linear, activation or F.silu
    t, k = experts.shape
    flat = experts.reshape(-1).long()
    order = flat.argsort(stable=True)
    token = torch.div(order, k, rounding_mode="floor")
    slot_weight = weights.reshape(-1).to(x.dtype)[order]
    counts = torch.bincount(flat, minlength=len(w_gate)).tolist()
    out = torch.zeros_like(x) if combine == "expert" else x.new_empty(t * k, x.shape[-1])
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = token[start : start + n]
        h = x.index_select(0, rows)
        y = linear(activation(linear(h, w_gate[e])) * linear(h, w_up[e]), w_down[e])
        if combine == "expert":
            out.index_add_(0, rows, y * slot_weight[start : start + n, None])
        else:  # each (token, slot) pair's output in its own row
            out[order[start : start + n]] = y
        start += n
    if combine == "expert":
        return out
    dtype = torch.promote_types(x.dtype, weights.dtype)
    return (out.view(t, k, x.shape[-1]).to(dtype) * weights[..., None].to(dtype)).sum(1).to(x.dtype)
