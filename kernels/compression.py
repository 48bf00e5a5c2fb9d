"""What compressing a layer's cached entries means, for every cache front-end: `Compression`.

A `Compression` is the settings (an eviction `policy`, the `budget` kept, the `allocator` that splits it
over layers, a `quantizer` that stores what is kept), validated once where they are given, and the
steps that apply them to a `KVSegment` given the `ScoreInputs` the policy reads:

- `evict`: the policy ranks the entries; the top `keep` (per KV head, or ragged across heads) stay,
  folded with the evicted ones when the policy merges (D2O, EMS), through `ops.gather_kv`;
- cascading allocators (CAKE, D2O) share the budget over the layers seen so far: `observe` each layer,
  `cascade_budgets`, and earlier layers are re-trimmed by the rankings they kept (`retrim`);
- recall policies keep everything and build the per-step selection state instead (`build`);
- `quantize`: the kept entries go to the quantizer's store (KIVI: packed codes read by fused
  attention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .policies.base import BudgetAllocator, EvictionPolicy, QuantizationPolicy, ScoreInputs
from .policies.budget import Uniform
from .store import KVSegment


@dataclass
class Compression:
    """policy: an `EvictionPolicy` (None: keep every entry); budget: fraction *kept* in (0, 1] or a
    token count; allocator: how the budget splits over layers (uniform by default); quantizer: a
    `QuantizationPolicy` for what is kept (None: full precision)."""

    policy: EvictionPolicy | None = None
    budget: float | int = 1.0
    allocator: BudgetAllocator | None = None
    quantizer: QuantizationPolicy | None = None

    def __post_init__(self):
        for name, value, cls in (
            ("policy", self.policy, EvictionPolicy),
            ("allocator", self.allocator, BudgetAllocator),
            ("quantizer", self.quantizer, QuantizationPolicy),
        ):
            if value is not None and not isinstance(value, cls):
                article = "an" if cls.__name__[0] in "AEIOU" else "a"
                raise TypeError(f"{name} must be {article} {cls.__name__}, got {type(value).__name__}: {value!r}")
        self.allocator = self.allocator or Uniform()
        self.allocator.validate(self.budget)

    @property
    def active(self) -> bool:
        """Whether anything is evicted or quantized."""
        return self.policy is not None or self.quantizer is not None

    @property
    def reads(self) -> frozenset[str]:
        """What the policy and quantizer read besides the keys and values."""
        return (self.policy.needs if self.policy else frozenset()) | (
            self.quantizer.needs if self.quantizer else frozenset()
        )

    @property
    def recall(self) -> bool:
        return self.policy is not None and self.policy.is_recall

    def layer_budget(self, seen: int, layer_idx: int, num_layers: int) -> int:
        """Entries layer `layer_idx` keeps out of `seen`."""
        return self.allocator.layer_budget(self.budget, seen, layer_idx, num_layers)

    def evict(self, segment: KVSegment, inputs: ScoreInputs, keep: int) -> None:
        """Keep `keep` entries per KV head (or ragged across heads) of the segment, ranked by the
        policy on `inputs` (its keys are the segment's)."""
        if keep >= segment.length:
            return
        index, kept = self.policy.select_ragged(inputs, keep)  # [B, H, K]
        segment.gather(index, kept, self.policy.merge(inputs, index))

    def evict_ranked(self, segment: KVSegment, ranking: torch.Tensor, keep: int) -> torch.Tensor:
        """Keep the `keep` best entries by `ranking` [B, H, S] (cascading budgets, which re-trim later);
        returns the kept entries' ranking for the next re-trim."""
        index = ranking.topk(min(keep, segment.length), dim=-1).indices.sort(-1).values
        segment.gather(index)
        return ranking.gather(2, index)

    def quantize(self, segment: KVSegment, inputs: ScoreInputs | None = None) -> None:
        if self.quantizer is not None:
            segment.store_with(self.quantizer, inputs)


def score_inputs(segment: KVSegment, layer_idx: int, num_layers: int, **extra) -> ScoreInputs:
    """What a policy reads of a dense segment: its keys, values and validity, plus `extra` (queries,
    hidden states, token ids, budget, scale, ...)."""
    keys, values = segment.read()
    return ScoreInputs(
        keys=keys,
        values=values,
        layer_idx=layer_idx,
        num_layers=num_layers,
        key_mask=segment.valid,
        tags=segment.tags,
        **extra,
    )
