"""How a total budget splits over layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import resolve_budget


class BudgetAllocator:
    """Maps (budget, tokens seen, layer) to the tokens that layer keeps."""

    name: ClassVar[str] = "base"

    def validate(self, budget) -> None:
        resolve_budget(budget, 1 << 30)

    def layer_budget(self, budget, length: int, layer_idx: int, num_layers: int) -> int:
        raise NotImplementedError


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
