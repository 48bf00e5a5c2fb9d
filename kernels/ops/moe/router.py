"""Which experts a token uses: `Router`, a validated rule over the router's logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCORINGS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class Router:
    """The routing rule of a mixture-of-experts layer.

    - scoring="softmax" (OLMoE, arXiv 2409.02060; Qwen3-MoE; LLaDA-MoE): probabilities over all
      experts in float32, the `top_k` largest kept; `norm_topk_prob` rescales them to sum to 1.
    - scoring="sigmoid" (DeepSeek-V3, arXiv 2412.19437; the BailingMoeV2 layers of LLaDA2.x): each
      expert's affinity is sigmoid(logit); the choice adds a per-expert `bias` (auxiliary-loss-free
      balancing: it moves which experts win, not their weights); with `n_group` > 1 the experts split
      into groups, a group scores the sum of its two highest biased affinities, and only the
      `topk_group` best groups compete (the others' affinities count as 0). The weights are the
      chosen experts' unbiased affinities, normalized to sum 1 when `norm_topk_prob` (a 1e-20 floor
      on the sum).
    - routed_scaling_factor multiplies every weight at the end.

    `router(logits [T, E], bias=None)` -> (weights [T, top_k] float32, experts [T, top_k] int64).
    """

    num_experts: int
    top_k: int
    scoring: str = "softmax"
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1

    def __post_init__(self):
        for name in ("num_experts", "top_k", "n_group", "topk_group"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Router: {name}={value!r} must be a positive integer")
        if self.top_k > self.num_experts:
            raise ValueError(f"Router: top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.scoring not in SCORINGS:
            raise ValueError(f"Router: scoring={self.scoring!r}: expected one of {SCORINGS}")
        if not isinstance(self.norm_topk_prob, bool):
            raise TypeError(f"Router: norm_topk_prob={self.norm_topk_prob!r} must be a bool")
        scale = self.routed_scaling_factor
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"Router: routed_scaling_factor={scale!r} must be a positive number")
        if self.num_experts % self.n_group:
            raise ValueError(f"Router: n_group={self.n_group} does not divide num_experts={self.num_experts}")
        if self.topk_group > self.n_group:
            raise ValueError(f"Router: topk_group={self.topk_group} exceeds n_group={self.n_group}")
        if self.n_group > 1 and self.scoring != "sigmoid":
            raise ValueError(f"Router: n_group={self.n_group} (group-limited routing) needs scoring='sigmoid'")
        if self.n_group > 1 and self.num_experts // self.n_group < 2:
            raise ValueError(f"Router: groups of {self.num_experts // self.n_group} expert: a group scores its top 2")
        if self.topk_group * (self.num_experts // self.n_group) < self.top_k:
            raise ValueError(
                f"Router: topk_group={self.topk_group} groups of {self.num_experts // self.n_group} experts "
                f"hold fewer than top_k={self.top_k}"
            )

    def __call__(self, logits: torch.Tensor, bias: torch.Tensor | None = None):
        if logits.dim() != 2 or logits.shape[1] != self.num_experts:
            raise ValueError(f"router logits {tuple(logits.shape)}: expected [tokens, {self.num_experts}]")
        if bias is not None and (bias.dim() != 1 or bias.shape[0] != self.num_experts):
            raise ValueError(f"router bias {tuple(bias.shape)}: expected [{self.num_experts}]")
        if bias is not None and self.scoring != "sigmoid":
            raise ValueError("router bias: only the sigmoid scoring takes a selection bias")
        logits = logits.float()
        if self.scoring == "softmax":
            weights, experts = torch.softmax(logits, -1).topk(self.top_k, -1)
            if self.norm_topk_prob:
                weights = weights / weights.sum(-1, keepdim=True)
        else:
            scores = torch.sigmoid(logits)
            choice = scores if bias is None else scores + bias.float()
            if self.n_group > 1:
                t = choice.shape[0]
                grouped = choice.view(t, self.n_group, -1)
                best = grouped.topk(2, -1).values.sum(-1).topk(self.topk_group, -1).indices  # [T, topk_group]
                keep = torch.zeros(t, self.n_group, dtype=torch.bool, device=logits.device)
                keep.scatter_(1, best, True)
                choice = grouped.masked_fill(~keep[..., None], 0.0).view(t, -1)
            experts = choice.topk(self.top_k, -1).indices
            weights = scores.gather(1, experts)
            if self.norm_topk_prob:
                weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, experts
