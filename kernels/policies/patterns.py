"""Structured eviction: positions chosen by a pattern across layers (LaCache's ladder) or by per-head
profiles of the prompt's own attention (FastGen)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import EvictionPolicy, ScoreInputs, check_positive
from .eviction import H2O
from .heads import ragged_topk


@dataclass
class LaCache(EvictionPolicy):
    """Ladder-shaped cache (Shi et al., "LaCache", arXiv 2507.14204): the first `n_sink` tokens and the
    `window` newest stay in every layer; older tokens form units of P = 1 + ceil((L - S) / (S - O))
    positions (S = `span`, O = `overlap`, L = number of layers) and layer l keeps p = min(ceil(S / (S -
    O)), P) positions of each unit at offset (l mod (P - p + 1)), so consecutive layers cover different
    old tokens. Budget left after sinks and window goes to the newest units first."""

    n_sink: int = 4
    window: int = 32
    span: int = 16
    overlap: int = 0
    name = "lacache"

    def __post_init__(self):
        check_positive("span", self.span)
        if not 0 <= self.overlap < self.span:
            raise ValueError(f"overlap={self.overlap} must be in [0, span={self.span})")

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        layers = max(inputs.num_layers, 1)
        unit = 1 + max(0, math.ceil((layers - self.span) / (self.span - self.overlap)))
        per_layer = min(math.ceil(self.span / (self.span - self.overlap)), unit)
        offset = inputs.layer_idx % (unit - per_layer + 1)
        pos = torch.arange(inputs.length, device=inputs.keys.device, dtype=torch.float32)
        in_ladder = ((pos.long() % unit) >= offset) & ((pos.long() % unit) < offset + per_layer)
        score = pos + torch.where(in_ladder, float(inputs.length), 0.0)  # ladder rungs first, newest first
        score = torch.where(pos < self.n_sink, float("inf"), score)
        return score.expand(inputs.batch, inputs.heads, -1)


def largest_remainder(shares: torch.Tensor) -> torch.LongTensor:
    """Integers per row summing to round(row sum), each the floor of its share plus one for the
    largest fractional parts."""
    floor = shares.floor()
    missing = (shares.sum(-1, keepdim=True).round() - floor.sum(-1, keepdim=True)).long()
    order = (shares - floor).argsort(-1, descending=True).argsort(-1)
    return (floor + (order < missing).float()).long()


@dataclass
class FastGen(EvictionPolicy):
    """Adaptive per-head profiles (Ge et al., "Model Tells You What to Discard", arXiv 2310.01801): each
    head takes the cheapest of special (+ `special_ids`), + punctuation (`punct_ids`), + frequent
    (heavy hitters, `frequent` of the tokens), + local (`local` newest), full, whose kept tokens hold
    >= `recovery` of the head's prefill attention. The heads' kept counts are then scaled so the layer
    holds H * budget tokens in total (FastGen itself has no budget; the profile sets the shape).
    Needs `token_ids` for the special / punctuation sets."""

    recovery: float = 0.85
    frequent: float = 0.3
    local: float = 0.3
    special_ids: tuple[int, ...] = ()
    punct_ids: tuple[int, ...] = ()
    name = "fastgen"
    needs = frozenset({"all_queries"})

    def score(self, inputs):
        return H2O().score(inputs)

    def _candidate_sets(self, inputs: ScoreInputs, heavy: torch.Tensor) -> list[torch.Tensor]:
        b, h, length = heavy.shape
        device = heavy.device
        pos = torch.arange(length, device=device)
        ids = inputs.token_ids if inputs.token_ids is not None else torch.full((b, length), -1, device=device)
        special = (torch.isin(ids, torch.tensor(self.special_ids, device=device)) | (pos == 0))[:, None].expand(
            b, h, -1
        )
        punct = special | torch.isin(ids, torch.tensor(self.punct_ids, device=device))[:, None]
        top = heavy.topk(max(1, int(self.frequent * length)), dim=-1).indices
        frequent = punct | torch.zeros_like(punct).scatter_(-1, top, True)
        local = frequent | (pos >= length - max(1, int(self.local * length)))
        return [special, punct, frequent, local, torch.ones_like(local)]

    def select_ragged(self, inputs, keep):
        attn = inputs.attention_received(None).mean(2)  # [B, H, L] attention each token receives
        heavy = attn.clone()
        if inputs.key_mask is not None:
            heavy = heavy.masked_fill(~inputs.head_mask, float("-inf"))
        total = attn.sum(-1, keepdim=True).clamp_min(1e-9)
        chosen = torch.ones_like(attn, dtype=torch.bool)  # "full" unless a cheaper profile recovers enough
        done = torch.zeros_like(total, dtype=torch.bool)
        for mask in self._candidate_sets(inputs, heavy):  # cheapest first
            ok = (attn * mask).sum(-1, keepdim=True) / total >= self.recovery
            chosen = torch.where(ok & ~done, mask, chosen)
            done = done | ok
        counts = chosen.sum(-1).float()
        scaled = largest_remainder(counts / counts.sum(-1, keepdim=True).clamp_min(1) * inputs.heads * keep)
        # Inside its profile a head ranks tokens by the attention they receive.
        rank = torch.where(chosen, heavy + 1e6, heavy)
        return ragged_topk(rank, scaled.clamp(1, inputs.length))
