"""KV reuse across denoising steps: the shared loop and Fast-dLLM's prefix and dual caches.

Every strategy here keeps one `KVBuffer` and, per step, either refreshes it with a full forward or
feeds a window of positions that attends to cached KV for the rest. They differ only in `_plan`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import DenoisingCache
from .buffer import KVBuffer


@dataclass
class Plan:
    """What the next forward computes: everything (`full`), or positions [start, end) (or the sorted
    positions `index`) attending to [0, attend_end) with cached KV for the rest."""

    full: bool
    start: int = 0
    end: int = 0
    attend_end: int = 0
    index: torch.LongTensor | None = None
    write: torch.Tensor | None = None  # [b, len(index)]: rows that store each fed position's KV
    rows: torch.LongTensor | None = None  # the batch rows this forward feeds (None: all)


class KVReuseCache(DenoisingCache):
    """Base of the KV-reusing strategies: allocation, the refresh/window dispatch and statistics."""

    def prepare(self, model, layout) -> None:
        super().prepare(model, layout)
        self.kv = KVBuffer(model, self.attention_mask, batch=layout.key_mask.shape[0], length=layout.length)
        self.shift = model.logit_shift
        self.stats.extra["kv_bytes"] = self.kv.nbytes

    def _plan(self, targets: torch.LongTensor, start: int, end: int) -> Plan | list[Plan]:
        """One plan for the batch, or several: the first for the whole batch, the next ones redo some
        of its `rows` (one forward each; their logits replace those rows')."""
        raise NotImplementedError

    def _logits(self, x, targets, start, end):
        self.canvas = x  # the plans of token-level strategies read it
        plans = self._plan(targets, start, end)
        if isinstance(plans, Plan):
            return self._forward(x, targets, plans)
        logits = self._forward(x, targets, plans[0])  # the whole batch first, then some of its rows
        for plan in plans[1:]:
            logits[plan.rows] = self._forward(x, targets, plan)
        return logits

    def _forward(self, x, targets, plan: Plan) -> torch.Tensor:
        self.kv.select(plan.rows)
        rows = slice(None) if plan.rows is None else plan.rows
        if plan.full:
            self.kv.plan()
            return self.full_forward(x[rows], targets, kv=self.kv, rows=plan.rows)
        if plan.index is not None:  # scattered positions (token-level freezing)
            self.kv.plan_index(plan.index, plan.attend_end, plan.write)
            fed, n_fed, logits_index = plan.index, plan.index.numel(), torch.searchsorted(plan.index, targets)
        else:
            # Targets lie in [start, end) of the block; every plan's window starts at or before
            # start - shift, since Dream predicts token i from hidden state i-1.
            self.kv.plan(plan.start, plan.end, plan.attend_end)
            fed, n_fed, logits_index = slice(plan.start, plan.end), plan.end - plan.start, targets - plan.start
        self.stats.forwards += 1
        self.stats.fed_tokens += n_fed * self._share(plan.rows)
        self.stats.reused_tokens += (plan.attend_end - n_fed) * self._share(plan.rows)
        return self.model(
            x[rows][:, fed], positions=self.layout.positions[rows][:, fed], cache=self.kv, logits_index=logits_index
        ).logits


class PrefixCache(KVReuseCache):
    """`cache="prefix"` (Fast-dLLM prefix cache, Wu et al., arXiv 2505.22618): a full forward at the
    first step of every block refreshes all KV; the block's other steps feed the block and everything
    after it, reusing the KV of the prompt and the finished blocks."""

    name = "prefix"

    def __init__(self):
        super().__init__()
        self._block = None

    def prepare(self, model, layout) -> None:
        super().prepare(model, layout)
        self._block = None

    def _new_block(self, start: int) -> bool:
        new = self._block != start
        self._block = start
        return new

    def _plan(self, targets, start, end):
        if self._new_block(start):
            return Plan(full=True)
        length = self.layout.length
        return Plan(full=False, start=start - self.shift, end=length, attend_end=length)


class DualCache(PrefixCache):
    """`cache="dual"` (Fast-dLLM DualCache): like `prefix`, but the masked suffix after the block is
    reused too, so only the current block is fed between refreshes."""

    name = "dual"

    def _plan(self, targets, start, end):
        if self._new_block(start):
            return Plan(full=True)
        return Plan(full=False, start=start - self.shift, end=end, attend_end=self.layout.length)
