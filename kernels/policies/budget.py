"""Layer budgets: how a total budget splits over layers (uniform, PyramidKV's linear decay, and the
cascading budgets of CAKE and D2O, which share the total by a per-layer statistic of the prefill)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import BudgetAllocator, ScoreInputs, resolve_budget


@dataclass
class Uniform(BudgetAllocator):
    """Every layer keeps the same number of tokens (what GUI-KV argues for GUI screenshots)."""

    name = "uniform"

    def layer_budget(self, budget, length, layer_idx, num_layers):
        return resolve_budget(budget, length)


@dataclass
class Pyramid(BudgetAllocator):
    """PyramidKV (Cai et al., arXiv 2406.02069): budgets fall linearly with depth. With average budget B
    and observation window w: min = (B - w) / beta, max = 2 (B - w) - min, and layer l keeps
    max - l (max - min) / (L - 1) tokens plus the window; the average over layers is B."""

    beta: float = 20.0
    window: int = 8
    name = "pyramid"

    def __post_init__(self):
        if self.beta < 1:
            raise ValueError(f"beta={self.beta} must be >= 1")

    def layer_budget(self, budget, length, layer_idx, num_layers):
        avg = resolve_budget(budget, length)
        if num_layers == 1 or avg <= self.window:
            return avg
        lo = (avg - self.window) / self.beta
        hi = 2 * (avg - self.window) - lo
        keep = hi - layer_idx * (hi - lo) / (num_layers - 1) + self.window
        return max(1, min(length, round(keep)))


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


@dataclass
class D2OBudget(BudgetAllocator):
    """D2O's layer budgets (Wan et al., arXiv 2406.13035): layers whose attention varies less across the
    sequence keep fewer tokens: ratio_l = clamp(softmax(-v)_l * L * budget, 0.01, 1) with v_l the
    min-max normalised variance of the column sums of the prefill attention; layers 0, 1 and the last
    keep everything, paid for out of the same total (and only when that costs at most half of it), so
    the cache keeps its byte budget. Cascades like CAKE: budgets are shared over the layers seen so far."""

    name = "d2o_budget"
    cascading = True

    def __post_init__(self):
        self.variances: dict[int, float] = {}
        self.num_layers = 0

    def observe(self, inputs: ScoreInputs) -> None:
        cols = inputs.attention_received(None)  # [B, H, G, L]
        var = cols.var(-1)
        var = (var - var.amin()) / (var.amax() - var.amin()).clamp_min(1e-9)
        self.variances[inputs.layer_idx] = var.mean().item()
        self.num_layers = inputs.num_layers

    def cascade_budgets(self, budget, length, layers):
        avg = resolve_budget(budget, length)
        n = self.num_layers
        # The full layers are paid for out of the same total, and only when they take at most half
        # of it (at 10% of 30 layers they would take all of it).
        protected = {0, 1, n - 1} if 3 * length <= 0.5 * n * avg else set()
        avg_rest = (n * avg - len(protected) * length) / max(1, n - len(protected))
        rest = [i for i in layers if i not in protected]
        out = {i: length for i in layers if i in protected}
        if rest:
            v = torch.tensor([self.variances[i] for i in rest], dtype=torch.float64)
            share = torch.softmax(-v, 0) * len(rest) * avg_rest / length
            for i, r in zip(rest, share.clamp(0.01, 1.0).tolist(), strict=True):
                out[i] = max(1, round(r * length))
        return out

    def layer_budget(self, budget, length, layer_idx, num_layers):
        return resolve_budget(budget, length)
