"""CAKE (Qin et al., "CAKE: Cascading and Adaptive KV cache Eviction with Layer Preferences",
arXiv 2503.12491): layer budgets from attention dispersion, and a score that counts variance."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import EvictionPolicy, ScoreInputs, check_positive, pool1d, resolve_budget
from .budget import BudgetAllocator


@dataclass
class CAKEScore(EvictionPolicy):
    """Token score = mean + gamma * variance (over the last `window` queries) of the attention a token
    receives, averaged over each KV head's query group, avg-pooled with `kernel`; the window is kept."""

    window: int = 32
    gamma: float = 200.0
    kernel: int = 5
    name = "cake"
    needs = frozenset({"queries"})

    def __post_init__(self):
        check_positive("window", self.window)
        check_positive("gamma", self.gamma, allow_zero=True)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        attn = inputs.window_attention(self.window)  # [B, H, G, W, L]
        indicator = attn.mean(3) + self.gamma * attn.var(3, unbiased=False)
        return pool1d(indicator.mean(2), self.kernel, "avg", inputs.head_mask)


def layer_preference(inputs: ScoreInputs, window: int, tau1: float, tau2: float) -> float:
    """P_l = H_l^(1/tau1) * V_l^(1/tau2): H the entropy of the window's attention (summed over its
    entries), V the variance over the window's queries summed over keys (both averaged over heads)."""
    attn = inputs.window_attention(window)  # [B, H, G, W, L]
    entropy = -(attn * attn.clamp_min(1e-12).log()).sum((-1, -2)).mean().item()
    variance = attn.var(3, unbiased=False).sum(-1).mean().item()
    return max(entropy, 1e-9) ** (1 / tau1) * max(variance, 1e-12) ** (1 / tau2)


@dataclass
class CAKEBudget(BudgetAllocator):
    """CAKE's cascading layer budgets: the total (num_layers * budget) is shared in proportion to each
    layer's preference P_l. Layers are compressed as the prefill reaches them, so after layer l the
    budgets of layers 0..l are recomputed from their preferences and earlier layers are re-trimmed
    (peak memory never exceeds the total). Needs the model attached (it reads the queries)."""

    window: int = 32
    tau1: float = 1.0
    tau2: float = 1.0
    name = "cake_budget"
    cascading = True
    preferences: dict = field(default_factory=dict)

    def observe(self, inputs: ScoreInputs) -> None:
        self.preferences[inputs.layer_idx] = layer_preference(inputs, self.window, self.tau1, self.tau2)

    def cascade_budgets(self, budget, length: int, layers: list[int]) -> dict[int, int]:
        """Budgets of the layers seen so far: their share of len(layers) * budget by preference."""
        avg = resolve_budget(budget, length)
        prefs = torch.tensor([self.preferences[i] for i in layers], dtype=torch.float64)
        shares = prefs / prefs.sum() * avg * len(layers)
        return {i: int(max(1, min(length, round(float(v))))) for i, v in zip(layers, shares, strict=True)}

    def layer_budget(self, budget, length, layer_idx, num_layers):
        return resolve_budget(budget, length)
